"""In-place model surgery: decompose every layer's W_q, W_k and install collaborative attention (torchao style:
``reduce_(model, config)``)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .config import ConfigError, ReductionConfig, compression_block
from .calibrate import unwhiten, whiten
from .decompose import Factors, decompose, relative_error
from .modeling import COMPRESSION_KEY, Arch, CollaborativeSelfAttention, arch_for, attention_modules, collaborate_


def model_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, heads, head_dim) of a supported model."""
    arch = arch_for(model.config)
    heads, hidden = getattr(model.config, arch.heads), getattr(model.config, arch.hidden)
    return len(attention_modules(model)), heads, hidden // heads


def content_bias(wk: torch.Tensor, bq: torch.Tensor | None, num_heads: int) -> torch.Tensor:
    """Row h: W_k^h^T b_q^h (H, d), the key-dependent part of the query bias, kept exactly."""
    d_out, d = wk.shape
    if bq is None:
        return wk.new_zeros(num_heads, d)
    return torch.einsum("hid,hi->hd", wk.reshape(num_heads, d_out // num_heads, d), bq.reshape(num_heads, -1))


def qk_parameters(module: nn.Module, arch: Arch) -> int:
    """Parameters that score tokens: W_q, W_k and their biases, or the collaborative projections, mixing and
    content bias."""
    if isinstance(module, CollaborativeSelfAttention):
        parts = [module.query_proj, module.key_proj, module.content_bias]
        mixing = module.mixing.numel() if module.mixing is not None else 0
        return sum(p.numel() for m in parts for p in m.parameters()) + mixing
    return sum(p.numel() for name in (arch.query, arch.key) for p in getattr(module, name).parameters())


@torch.no_grad()
def fill_(module: CollaborativeSelfAttention, factors: Factors, bias: torch.Tensor) -> None:
    """Copy a layer's factors into its (freshly built) collaborative module."""
    dtype = module.query_proj.weight.dtype
    if factors.method == "svd":  # per-head (H, d, r) -> stacked (H*r, d)
        u = factors.U.transpose(1, 2).reshape(-1, factors.U.shape[1])
        v = factors.V.transpose(1, 2).reshape(-1, factors.V.shape[1])
    else:
        u, v = factors.U.T, factors.V.T  # (R, d)
        module.mixing.copy_(factors.mixing.to(dtype))
    module.query_proj.weight.copy_(u.to(dtype))
    module.key_proj.weight.copy_(v.to(dtype))
    module.content_bias.weight.copy_(bias.to(dtype))


def reduce_(model: nn.Module, config: ReductionConfig, *, source: str = "", tool_version: str = "",
            moments: list[torch.Tensor] | None = None, on_layer: Callable[[dict], None] | None = None) -> dict:
    """Replace every self-attention layer of ``model`` by collaborative attention, in place.

    Returns the compression block (also stored as ``model.config.compression``): per layer its key dim, the relative
    error of its score tensor, solver iterations, and Q/K parameters before and after. ``on_layer`` is called after
    each layer's decomposition (progress bars).

    ``moments``: per-layer input second moments (calibrate.second_moments). Each layer is then decomposed in the
    whitened space, which minimises the expected score error on the calibration data; the report adds that error
    as ``expected_score_error``.
    """
    if getattr(model.config, COMPRESSION_KEY, None):
        raise ConfigError("this model is already reduced; reduce the original checkpoint instead")
    arch = arch_for(model.config)
    found = attention_modules(model)
    n_layers, heads, head_dim = model_shape(model)
    dims = config.layer_key_dims(n_layers, heads, head_dim)
    if moments is not None and len(moments) != n_layers:
        raise ValueError(f"{len(moments)} second moments given for {n_layers} layers")
    layers, weights = [], []
    for index, ((_, _, old), key_dim) in enumerate(zip(found, dims)):
        q, k = getattr(old, arch.query), getattr(old, arch.key)
        factors, report = decompose_layer(q.weight.detach(), k.weight.detach(), heads, key_dim, config,
                                          None if moments is None else moments[index])
        weights.append((factors, content_bias(k.weight.detach().double(), _bias(q), heads)))
        layers.append({"index": index, "key_dim": key_dim, **report, "qk_params_before": qk_parameters(old, arch)})
        if on_layer:
            on_layer(layers[-1])
    block = compression_block(config, source=source, layers=layers, tool_version=tool_version)
    block["base_architecture"] = type(model).__name__
    collaborate_(model, block)
    for (factors, bias), (_, _, new), layer in zip(weights, attention_modules(model), layers):
        fill_(new, factors, bias)
        layer["qk_params_after"] = qk_parameters(new, arch)
    setattr(model.config, COMPRESSION_KEY, block)
    return block


def decompose_layer(wq: torch.Tensor, wk: torch.Tensor, heads: int, key_dim: int, config: ReductionConfig,
                    moment: torch.Tensor | None = None) -> tuple[Factors, dict]:
    """One layer's factors and report; with a second moment, solved in the whitened space and mapped back."""
    options = config.solver_options()
    if moment is None:
        f = decompose(wq, wk, heads, key_dim, config.method, **options)
        return f, {"relative_error": f.relative_error, "n_iter": f.n_iter}
    wq_white, wk_white, inv_sqrt = whiten(wq, wk, moment)
    f = decompose(wq_white, wk_white, heads, key_dim, config.method, **options)
    expected = f.relative_error
    f = unwhiten(f, inv_sqrt)
    return f, {"relative_error": relative_error(wq.double(), wk.double(), heads, f), "expected_score_error": expected,
               "n_iter": f.n_iter}


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().double()
