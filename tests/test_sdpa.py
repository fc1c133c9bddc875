"""The fast attention path: sdpa equals eager, runs in PyTorch's fused kernel, and the [CLS] shortcut is exact."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import padded_batch, tiny_model
from mhacompress.compress.config import ReductionConfig
from mhacompress.compress.modeling import attention_modules, first_token_only_
from mhacompress.compress.surgery import reduce_

# key dims below, at and above the head dim (8): the fused kernel needs q, k and v padded to one width
CASES = [("cp", 4), ("cp", 8), ("cp", 20), ("tucker", 6), ("tucker", 16), ("svd", 4), ("svd", 16), ("svd", 32)]


def hidden(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch, **kwargs).last_hidden_state


@pytest.mark.parametrize("method,key_dim", CASES)
def test_sdpa_equals_eager_in_the_fused_kernel(method, key_dim):
    model = tiny_model("bert", attn="sdpa")
    reduce_(model, ReductionConfig(key_dim=key_dim, method=method, n_iter_max=5))
    batch, keep = padded_batch(), padded_batch()["attention_mask"].bool()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if the fused CPU kernel cannot take these shapes
        fast = hidden(model, batch)
    model.config._attn_implementation = "eager"
    assert (fast[keep] - hidden(model, batch)[keep]).abs().max() <= 1e-5


def test_fused_projection_is_rebuilt_when_weights_change():
    model = tiny_model("bert", attn="sdpa")
    reduce_(model, ReductionConfig(key_dim=8, n_iter_max=5))
    batch = padded_batch()
    before = hidden(model, batch)
    layer = attention_modules(model)[0][2]
    with torch.no_grad():
        layer.key_proj.weight.mul_(2)  # in place: same storage, new version
    after = hidden(model, batch)
    model.config._attn_implementation = "eager"
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, hidden(model, batch), atol=1e-5, rtol=0)


def test_training_mode_gets_gradients_through_the_fused_projection():
    model = tiny_model("bert", attn="sdpa")
    reduce_(model, ReductionConfig(key_dim=8, n_iter_max=5))
    model.train()
    model(**padded_batch()).last_hidden_state.sum().backward()
    layer = attention_modules(model)[0][2]
    assert all(p.grad is not None for p in (layer.query_proj.weight, layer.key_proj.weight, layer.mixing))


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert", "mpnet", "electra"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_first_token_shortcut_is_exact(model_type, attn):
    model = tiny_model(model_type, head=True, attn=attn)
    reduce_(model, ReductionConfig(key_dim=6, n_iter_max=5))
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
    again, _ = load(tmp_path / "m")
    with torch.no_grad():
        got = again.eval()(**batch, output_hidden_states=True)
    assert got.hidden_states[-1].shape[1] == 1
    torch.testing.assert_close(got.logits, want, atol=1e-6, rtol=0)


def test_first_token_shortcut_needs_a_reduced_model():
    with pytest.raises(ValueError, match="reduced model"):
        first_token_only_(tiny_model("bert", head=True))
