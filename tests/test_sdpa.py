"""The fast attention path: sdpa equals eager, runs in PyTorch's fused kernel, and the [CLS] shortcut is exact."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import padded_batch, tiny_model
from mhacompress.reduction.config import ReductionConfig
from mhacompress.reduction.modeling import attention_modules, first_token_only_, kernels
from mhacompress.reduction.surgery import reduce_

# key dims below, at and above the head dim (8): the fused kernel needs q, k and v padded to one width
CASES = [("cp", 4), ("cp", 8), ("cp", 20), ("tucker", 6), ("tucker", 16), ("svd", 4), ("svd", 16), ("svd", 32)]


def hidden(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch, **kwargs).last_hidden_state


def reduced_and_eager(method, key_dim):
    model = tiny_model("bert", attn="sdpa")
    reduce_(model, ReductionConfig(key_dim=key_dim, method=method, n_iter_max=5))
    batch = padded_batch()
    model.config._attn_implementation = "eager"
    want = hidden(model, batch)
    model.config._attn_implementation = "sdpa"
    return model, batch, batch["attention_mask"].bool(), want


@pytest.mark.parametrize("method,key_dim", CASES)
def test_sdpa_equals_eager_in_inference(method, key_dim):
    model, batch, keep, want = reduced_and_eager(method, key_dim)
    assert (hidden(model, batch)[keep] - want[keep]).abs().max() <= 1e-5


@pytest.mark.parametrize("method,key_dim", CASES)
def test_sdpa_equals_eager_in_the_fused_kernel(method, key_dim, monkeypatch):
    model, batch, keep, want = reduced_and_eager(method, key_dim)
    monkeypatch.setattr(kernels, "shared_key_is_faster", lambda *args: False)  # as when exporting
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if the fused CPU kernel cannot take these shapes
        fast = hidden(model, batch)
    assert (fast[keep] - want[keep]).abs().max() <= 1e-5


@pytest.mark.parametrize("method,key_dim", CASES)
def test_sdpa_equals_eager_when_autograd_records(method, key_dim):
    model, batch, keep, want = reduced_and_eager(method, key_dim)
    fast = model(**batch).last_hidden_state  # not the in-place shared-key blocks
    assert fast.requires_grad and (fast.detach()[keep] - want[keep]).abs().max() <= 1e-5


def test_inference_with_a_wide_shared_key_does_not_pad_values(monkeypatch):
    model = tiny_model("bert", attn="sdpa")
    reduce_(model, ReductionConfig(key_dim=20, n_iter_max=5))  # cp, key dim 20 > head dim 8

    def refuse(*args, **kwargs):
        raise AssertionError("the fused kernel would need values padded to the key dim")

    monkeypatch.setattr(kernels.F, "scaled_dot_product_attention", refuse)
    hidden(model, padded_batch())


@pytest.mark.parametrize("method", ["cp", "tucker"])
# H 4 heads, Tq 7, T 11: all at once; examples 2 + 2 + 1; heads 3 + 1; one head per block
@pytest.mark.parametrize("block", [1 << 19, 2 * 4 * 7 * 11, 3 * 7 * 11, 30])
@pytest.mark.parametrize("bias_shape", [(5, 4, 1, 11), (1, 4, 7, 11), (5, 1, 1, 11)])
def test_shared_key_attention_is_softmax_attention_in_any_blocking(monkeypatch, method, block, bias_shape):
    model = tiny_model("bert", attn="sdpa")  # 4 heads of dim 8
    reduce_(model, ReductionConfig(key_dim=12, method=method, n_iter_max=3))
    layer = attention_modules(model)[0][2]
    torch.manual_seed(0)
    q, k = torch.randn(5, 7, 12), torch.randn(5, 11, 20)[..., 2:14]  # keys strided, as slices of the projection
    v, bias = torch.randn(5, 11, 40)[..., 3:35].view(5, 11, 4, 8), torch.randn(bias_shape)
    with torch.no_grad():
        qh, kh = layer.head_queries(q), layer.head_keys(k)  # (5, 4, 7, 12), (5, 1, 11, 12)
        want = ((qh @ kh.transpose(-1, -2)) * layer.scaling + bias).softmax(dim=-1) @ v.transpose(1, 2)
        monkeypatch.setattr(kernels, "SCORE_BLOCK", block)
        got = kernels.shared_key_attention(layer, q, k, v, bias)  # (5, 7, 32)
    torch.testing.assert_close(got, want.transpose(1, 2).reshape(5, 7, 32), atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert", "mpnet", "electra", "camembert", "ernie"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("key_dim", [6, 12])  # below and above the head dim (8)
def test_first_token_shortcut_is_exact(model_type, attn, key_dim):
    model = tiny_model(model_type, head=True, attn=attn)
    reduce_(model, ReductionConfig(key_dim=key_dim, n_iter_max=5))
    batch = padded_batch()
    with torch.no_grad():
        full = model(**batch, output_hidden_states=True)
        first_token_only_(model)
        short = model(**batch, output_hidden_states=True)
    assert short.hidden_states[-1].shape[1] == 1  # the last layer computed [CLS] alone
    torch.testing.assert_close(short.logits, full.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(short.hidden_states[-1], full.hidden_states[-1][:, :1], atol=1e-5, rtol=0)
    assert model.config.compression["first_token_only"] is True
    first_token_only_(model, enabled=False)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, full.logits, atol=1e-6, rtol=0)


def test_first_token_shortcut_survives_save_and_load(tmp_path):
    from mhacompress.hub import load, save

    model = tiny_model("bert", head=True, attn="sdpa")
    reduce_(model, ReductionConfig(key_dim=6, n_iter_max=5))
    first_token_only_(model)
    batch = padded_batch()
    with torch.no_grad():
        want = model(**batch).logits
    save(model, None, tmp_path / "m")
    again, _ = load(tmp_path / "m", tokenizer=False)
    with torch.no_grad():
        got = again.eval()(**batch, output_hidden_states=True)
    assert got.hidden_states[-1].shape[1] == 1
    torch.testing.assert_close(got.logits, want, atol=1e-6, rtol=0)


def test_first_token_shortcut_needs_a_reduced_model():
    with pytest.raises(ValueError, match="reduced model"):
        first_token_only_(tiny_model("bert", head=True))


@pytest.mark.parametrize("method", ["cp", "tucker"])
def test_shared_key_attention_is_exact_in_double_precision(method):
    model, batch, keep, _ = reduced_and_eager(method, 20)  # key dim 20 > head dim 8: the blocked path
    model.double()
    fast = hidden(model, batch)
    model.config._attn_implementation = "eager"
    assert fast.dtype == torch.float64 and (fast[keep] - hidden(model, batch)[keep]).abs().max() <= 1e-12


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_one_model_served_from_eight_threads_gives_the_serial_outputs(attn):
    from concurrent.futures import ThreadPoolExecutor

    model = tiny_model("bert", head=True, attn=attn)
    reduce_(model, ReductionConfig(key_dim=12, n_iter_max=5))
    first_token_only_(model)  # the path that once passed keys through a shared attribute
    batches = [padded_batch(lengths=(9, 4, 7, 1)[: 1 + i % 4], seed=i) for i in range(200)]

    def serve(batch):
        with torch.inference_mode():  # per thread: grad mode is thread-local
            return model(**batch).logits

    serial = [serve(b) for b in batches]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(serve, batches))
    assert all(torch.equal(a, b) for a, b in zip(serial, threaded))


def test_a_forward_that_raises_leaves_no_state_behind():
    model = tiny_model("bert", head=True, attn="sdpa")
    reduce_(model, ReductionConfig(key_dim=12, n_iter_max=5))
    first_token_only_(model)
    batch = padded_batch()
    with torch.no_grad():
        want = model(**batch).logits
        with pytest.raises(Exception):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"][:, :3])  # mismatched mask
        torch.testing.assert_close(model(**batch).logits, want, atol=0, rtol=0)
    layer = attention_modules(model)[-1][2]
    # no stashed hidden states
    assert not any(isinstance(v, torch.Tensor) and v.dim() == 3 for v in vars(layer).values())
