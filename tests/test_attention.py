"""Collaborative attention is a drop-in: at full key dim every supported architecture reproduces its outputs."""

import inspect

import pytest
import torch

from conftest import TINY, padded_batch, tiny_config, tiny_model
from mhacompress.reduction.config import ConfigError, ReductionConfig
from mhacompress.reduction.modeling import (
    ARCHITECTURES,
    CollaborativeSelfAttention,
    UnsupportedModelError,
    arch_for,
    attention_modules,
    layers,
)
from mhacompress.reduction.modeling.attention import head_scores
from mhacompress.reduction.surgery import reduce_

FULL = 32  # H * dh of the tiny models


def outputs(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_every_table_entry_has_a_tiny_model():
    assert set(TINY) == set(ARCHITECTURES)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("head", [False, True], ids=["encoder", "classifier"])
@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_full_key_dim_cp_reproduces_the_original(model_type, head, attn):
    model = tiny_model(model_type, head=head, attn=attn)
    batch = padded_batch()
    before = outputs(model, batch)
    reduce_(model, ReductionConfig(key_dim=FULL, method="cp"))
    assert all(isinstance(m, CollaborativeSelfAttention) for _, _, m in attention_modules(model))
    after = outputs(model, batch)
    keep = batch["attention_mask"].bool() if not head else slice(None)  # padded positions are free to differ
    assert (after[keep] - before[keep]).abs().max() <= 1e-5


@pytest.mark.parametrize("method,key_dim", [("tucker", 32), ("svd", 32)])
@pytest.mark.parametrize("model_type", ["bert", "mpnet", "distilbert"])
def test_full_rank_tucker_and_svd_reproduce_the_original(model_type, method, key_dim):
    model = tiny_model(model_type)
    batch = padded_batch()
    before = outputs(model, batch)
    reduce_(model, ReductionConfig(key_dim=key_dim, method=method))
    keep = batch["attention_mask"].bool()
    assert (outputs(model, batch)[keep] - before[keep]).abs().max() <= 1e-4


def test_padding_does_not_leak_into_real_tokens():
    model = tiny_model("bert")
    reduce_(model, ReductionConfig(key_dim=8))
    batch = padded_batch(lengths=(5, 9))
    alone = {k: v[:1, :5] for k, v in batch.items()}
    torch.testing.assert_close(outputs(model, batch)[0, :5], outputs(model, alone)[0], atol=1e-5, rtol=0)


def test_dropping_the_content_bias_breaks_exactness():
    """The key-dependent query-bias term b_q^h . W_k^h y matters: without it the full-rank model is not exact."""
    model = tiny_model("bert")
    batch = padded_batch()
    before = outputs(model, batch)
    reduce_(model, ReductionConfig(key_dim=FULL))
    for _, _, m in attention_modules(model):
        m.content_bias.weight.data.zero_()
    assert (outputs(model, batch) - before)[batch["attention_mask"].bool()].abs().max() > 1e-3


def test_reduction_keeps_the_original_scale():
    model = tiny_model("bert")
    reduce_(model, ReductionConfig(key_dim=4))
    assert all(m.scaling == 8**-0.5 for _, _, m in attention_modules(model))


@pytest.mark.parametrize("method,key_dim", [("cp", 12), ("tucker", 12), ("svd", 12)])
def test_sdpa_equals_eager_for_a_reduced_model(method, key_dim):
    model = tiny_model("bert", attn="eager")
    reduce_(model, ReductionConfig(key_dim=key_dim, method=method))
    batch = padded_batch()
    eager = outputs(model, batch)
    model.config._attn_implementation = "sdpa"
    keep = batch["attention_mask"].bool()
    assert (outputs(model, batch)[keep] - eager[keep]).abs().max() <= 1e-5


def test_output_attentions_are_returned_by_collaborative_layers():
    model = tiny_model("bert", attn="eager")
    reduce_(model, ReductionConfig(key_dim=8))
    with torch.no_grad():
        out = model(**padded_batch(), output_attentions=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (4, 4, 9, 9)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(4, 4, 9))


def test_reduced_model_stays_in_eval_mode():
    model = tiny_model("bert")
    reduce_(model, ReductionConfig(key_dim=8))
    assert not any(m.training for m in model.modules())


def test_unknown_model_type_names_the_supported_ones():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedModelError,
                       match="'gpt2' is not supported; supported: bert, camembert, data2vec-text, distilbert"):
        arch_for(GPT2Config())


def test_decoder_configs_are_refused():
    with pytest.raises(UnsupportedModelError, match="decoder"):
        arch_for(tiny_config("bert", is_decoder=True))


@pytest.mark.parametrize("kwargs,message", [
    ({"key_dim": 0}, "positive integers"),
    ({"key_dim": 33}, "out of range: this model takes 1..32"),
    ({"key_dim": 10, "method": "svd"}, "not a multiple of 4"),
    ({"key_dims": (8, 8, 8)}, "3 key dims given for a model with 2 layers"),
    ({"key_dim": 8, "method": "pca"}, "method must be one of"),
])
def test_impossible_reductions_are_refused_before_any_change(kwargs, message):
    model = tiny_model("bert")
    with pytest.raises(ConfigError, match=message):
        reduce_(model, ReductionConfig(**kwargs))
    assert not any(isinstance(m, CollaborativeSelfAttention) for m in model.modules())


def test_a_reduced_model_cannot_be_reduced_again():
    model = tiny_model("bert")
    reduce_(model, ReductionConfig(key_dim=8))
    with pytest.raises(ValueError, match="already reduced"):
        reduce_(model, ReductionConfig(key_dim=8))


def test_per_layer_key_dims_and_report():
    model = tiny_model("bert")
    block = reduce_(model, ReductionConfig(key_dims=(8, 32)))
    assert [m.key_dim for _, _, m in attention_modules(model)] == [8, 32]
    assert [x["key_dim"] for x in block["layers"]] == [8, 32]
    assert block["layers"][1]["relative_error"] == 0.0 < block["layers"][0]["relative_error"]
    # Q/K parameters: original 2 * (32*32 + 32); cp at 8: 2*32*8 + 4*8 mixing + 4*32 content bias
    assert block["layers"][0]["qk_params_before"] == 2112
    assert block["layers"][0]["qk_params_after"] == 2 * 32 * 8 + 4 * 8 + 4 * 32


@pytest.mark.parametrize("method", ["cp", "tucker", "svd"])
@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_attention_for_some_query_positions_is_those_rows_of_the_whole_attention(model_type, method):
    """What a refinement step computes at the positions its loss weighs (with the values handed in): the same rows
    as the whole attention, position bias (MPNet) and padding mask included."""
    from mhacompress.reduction.sequential import layer_inputs, run_recording

    model = tiny_model(model_type)
    reduce_(model, ReductionConfig(key_dim=8, method=method))
    module = attention_modules(model)[0][2]
    with torch.no_grad():
        x, args, kwargs = layer_inputs(model, padded_batch())
        _, seen = run_recording(layers(model)[0], {"attention": module}, x, args, kwargs)
        call = inspect.signature(module.forward).bind(*seen["attention"][0], **seen["attention"][1]).arguments
        mask, bias = call.get("attention_mask"), call.get("position_bias")
        whole, weights = module.reference(x, mask, bias)
        rows = torch.tensor([0, 3, 4, 8])
        some, some_weights = module.reference(x, mask, bias, queries=rows, values=module.value_heads(x))
    torch.testing.assert_close(some, whole[:, rows], rtol=1e-5, atol=1e-5)  # float32 rounding
    torch.testing.assert_close(some_weights, weights[:, :, rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key_heads", [1, 4], ids=["one-key-for-all-heads", "a-key-per-head"])
def test_head_scores_are_each_heads_own_query_key_product(key_heads):
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 4, 5, 6, generator=gen), torch.randn(3, key_heads, 7, 6, generator=gen)  # B, H, T, R
    expected = torch.stack([q[:, h] @ k[:, h if key_heads > 1 else 0].transpose(-1, -2) for h in range(4)], dim=1)
    torch.testing.assert_close(head_scores(q, k), expected)
