"""In-place model surgery: decompose every layer's W_q, W_k and install collaborative attention (torchao style:
``reduce_(model, config)``)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .config import ReductionConfig, compression_block
from .decompose import Factors, decompose
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
            on_layer: Callable[[dict], None] | None = None) -> dict:
    """Replace every self-attention layer of ``model`` by collaborative attention, in place.

    Returns the compression block (also stored as ``model.config.compression``): per layer its key dim, the relative
    error of its score tensor, solver iterations, and Q/K parameters before and after. ``on_layer`` is called after
    each layer's decomposition (progress bars).
    """
    if getattr(model.config, COMPRESSION_KEY, None):
        raise ValueError("this model is already reduced; reduce the original checkpoint instead")
    arch = arch_for(model.config)
    found = attention_modules(model)
    n_layers, heads, head_dim = model_shape(model)
    dims = config.layer_key_dims(n_layers, heads, head_dim)
    layers, weights = [], []
    for index, ((_, _, old), key_dim) in enumerate(zip(found, dims)):
        q, k = getattr(old, arch.query), getattr(old, arch.key)
        factors = decompose(q.weight, k.weight, heads, key_dim, config.method, **config.solver_options())
        weights.append((factors, content_bias(k.weight.detach().double(), _bias(q), heads)))
        layers.append({"index": index, "key_dim": key_dim, "relative_error": factors.relative_error,
                       "n_iter": factors.n_iter, "qk_params_before": qk_parameters(old, arch)})
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


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().double()
