"""The fast paths of collaborative attention: the same numbers as ``CollaborativeSelfAttention.reference``, computed
with a fused projection, PyTorch's fused attention kernels (sdpa) and, for CPU inference with a shared key wider than
the head dim, a blocked kernel. Chosen automatically (``usable``); tests hold every path to the reference.

Nothing here keeps per-call state. The one cache, the fused projection weight, is keyed by the identity and version
of the weights it was built from, so concurrent callers at worst build it twice.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

SCORE_BLOCK = 1 << 19  # score elements per block (2 MiB in float32): 2**18 to 2**20 measured within 10% of each other


def usable(module, output_attentions: bool, head_mask) -> bool:
    """The transformers attention switch says sdpa, nothing asks for the attention weights, and the module is not
    told to run by its formula (``by_formula``: set by the reduction while it takes gradient steps on the module)."""
    return implementation(module.config) == "sdpa" and not output_attentions and head_mask is None \
        and not getattr(module, "by_formula", False)


def attend(module, x: torch.Tensor, attention_mask=None, position_bias=None) -> torch.Tensor:
    """Attention output (B, Tq, H*dh), equal to ``module.reference(...)[0]``."""
    xq = x[:, :1] if module.first_token_only else x
    (B, T, _), Tq = x.shape, xq.shape[1]
    H, dh = module.num_heads, module.head_dim
    q, k, c, v = project(module, xq, x)  # (B, Tq, R), (B, T, R), (B, T, H) scaled, (B, T, H*dh)
    v = v.view(B, T, H, dh)  # (B, T, H, dh)
    # content bias, constant over queries: (B, H, 1, T), made contiguous: a mask with c's (B, T, H) strides makes the
    # CPU flash kernel copy an expanded (B, H, Tq, T) mask on every call
    bias = c.transpose(1, 2).contiguous()[:, :, None, :]
    extra = module.additive_bias(attention_mask, position_bias, Tq, q.dtype)
    if extra is not None:
        bias = bias + extra
    p_drop = module.dropout.p if module.training else 0.0
    if shared_key_is_faster(module, q, p_drop):
        return shared_key_attention(module, q, k, v, bias.to(q.dtype))
    ctx = _sdpa(module.head_queries(q), module.head_keys(k), v.transpose(1, 2), bias.to(q.dtype), p_drop,
                module.scaling)  # (B, H, Tq, dh)
    return ctx.transpose(1, 2).reshape(B, Tq, H * dh)


def fused_weight(module) -> tuple[torch.Tensor, torch.Tensor]:
    """[U^T; V^T; content bias * scale; W_v; zero rows] (N, d) and its bias, N = 2R + H + d rounded up to a multiple
    of 16: one GEMM instead of four, three of them narrow (which run several times slower per multiply-add on CPU); an
    output width that is not a multiple of 8 ran at 70% of the GEMM's speed (588 vs 592 columns on MiniLM at key dim
    96, measured). Cached in inference, keyed by the weights' identity and in-place version; rebuilt whenever autograd
    or a compiler/exporter is tracing."""
    value = getattr(module, module.arch.value)
    parts = (module.query_proj.weight, module.key_proj.weight, module.content_bias.weight, value.weight)
    grad = torch.is_grad_enabled() and any(p.requires_grad for p in parts)
    key = None if tracing() or grad else (torch.is_inference_mode_enabled(),  # inference tensors stay in inference
                                          *((id(p), p.data_ptr(), p._version, p.dtype, p.device) for p in parts))
    cached = getattr(module, "_fused", None)
    if key is not None and cached is not None and cached[0] == key:
        return cached[1], cached[2]
    n = 2 * module.key_dim + module.num_heads
    vb = value.bias if value.bias is not None else value.weight.new_zeros(value.weight.shape[0])
    pad = -(n + len(vb)) % 16
    scaled = (*parts[:2], parts[2] * module.scaling, parts[3], vb.new_zeros(pad, parts[3].shape[1]))
    weight, bias = torch.cat(scaled), torch.cat([vb.new_zeros(n), vb, vb.new_zeros(pad)])  # (N, d), (N,)
    if key is not None:
        module._fused = (key, weight, bias)  # one tuple, assigned at once
    return weight, bias


def forget_fused(module) -> None:
    """Drop ``module``'s cached fused weight (a copy of its query, key, content-bias and value weights), which the
    next inference call builds again: the reduction's passes need it only while they run the layer."""
    module.__dict__.pop("_fused", None)


def project(module, xq: torch.Tensor, x: torch.Tensor):
    """Shared queries (B, Tq, R) of xq; keys (B, T, R), scaled content bias (B, T, H) and values (B, T, d) of x."""
    R, H, d = module.key_dim, module.num_heads, module.num_heads * module.head_dim
    weight, bias = fused_weight(module)
    pad = weight.shape[0] - 2 * R - H - d
    if xq is x:
        return torch.split(F.linear(x, weight, bias), [R, R, H, d, pad], dim=-1)[:4]
    q = F.linear(xq, weight[:R])  # (B, Tq, R)
    return (q, *torch.split(F.linear(x, weight[R:], bias[R:]), [R, H, d, pad], dim=-1)[:3])


def shared_key_is_faster(module, q: torch.Tensor, p_drop: float) -> bool:
    """CPU inference with one key for all heads, wider than the head dim. Measured against the fused kernel with
    values padded to the key dim (docs/performance.md): 1.2 to 3 times faster per attention core at key dims 1.5 to
    3 times the head dim, 1 and 2 threads, 32 to 512 tokens. Not when tracing (the block loop would fix the batch size
    in the graph), with dropout, or when autograd records (blocks are written in place)."""
    return (q.device.type == "cpu" and module.layout != "per-head" and module.key_dim > module.head_dim
            and p_drop == 0.0 and not (torch.is_grad_enabled() and q.requires_grad) and not tracing())


def shared_key_attention(module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Attention output (B, Tq, H * dh) of shared queries (B, Tq, R), the shared key (B, T, R), values (B, T, H, dh)
    and an additive bias (B, H, Tq|1, T), exact, for CPU inference.

    Works through blocks of examples x heads whose per-head queries and scores stay in cache: the block's per-head
    queries are formed in a buffer (never all (B, H, Tq, R) at once), one GEMM scores all its heads against their
    shared key, and values keep their own head dim. Buffers belong to the call, so concurrent calls never share them.
    """
    (B, Tq, R), T, (H, dh) = q.shape, k.shape[1], v.shape[2:]
    out = v.new_empty(B, Tq, H, dh)
    heads = max(1, min(H, SCORE_BLOCK // (Tq * T)))
    examples = min(B, max(1, SCORE_BLOCK // (H * Tq * T)) if heads == H else 1)
    bias = bias.expand(B, H, *bias.shape[2:])  # (B, H, Tq|1, T), a view
    keys = k.transpose(1, 2)  # (B, R, T)
    queries, scores = q.new_empty(examples * heads * Tq * R), q.new_empty(examples * heads * Tq * T)
    for b in range(0, B, examples):
        e = min(examples, B - b)
        for h in range(0, H, heads):
            hh = min(heads, H - h)
            qh = module.head_queries(q[b:b + e], slice(h, h + hh), out=queries[:e * hh * Tq * R].view(e, hh, Tq, R))
            s = scores[:e * hh * Tq * T].view(e, hh * Tq, T)
            torch.baddbmm(s, qh.view(e, hh * Tq, R), keys[b:b + e], beta=0, alpha=module.scaling, out=s)
            s = s.view(e, hh, Tq, T).add_(bias[b:b + e, h:h + hh])
            torch.softmax(s, dim=-1, out=s)
            # (e, hh, Tq, dh); a GEMM into a strided slice of the output ran 30% slower than this copy
            out[b:b + e, :, h:h + hh] = torch.matmul(s, v[b:b + e, :, h:h + hh].transpose(1, 2)).transpose(1, 2)
    return out.view(B, Tq, H * dh)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, p_drop: float,
          scale: float) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on (B, H, Tq, Rq) queries, (B, H|1, T, Rq) keys and (B, H, T, dh) values.

    PyTorch's fused CPU kernel (flash) needs one head dim for q, k and v and otherwise silently falls back to the math
    path, which materialises the (B, H, Tq, T) scores. On CPU, zero-pad q and k (Rq < dh) or v (Rq > dh) to a common
    width: zeros add nothing to a dot product, and padded value columns are sliced off, so the result is exact. An
    ONNX export is not padded: the exporter writes sdpa as matrix products, which take two head dims.
    """
    B, H, _, dh = v.shape
    pad = q.device.type == "cpu" and not torch.onnx.is_in_onnx_export()  # GPU kernels take two head dims
    width = max(q.shape[-1], dh) if pad else 0
    if q.shape[-1] < width:
        q, k = zero_pad(q, width), zero_pad(k, width)
    if dh < width:
        v = zero_pad(v, width)  # (B, H, T, width)
    k = k.expand(B, H, *k.shape[2:])  # a shared key is broadcast across heads as a view, no copy
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p_drop, scale=scale)
    return ctx[..., :dh]  # (B, H, Tq, dh)


def zero_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """(..., w) -> (..., width), zeros on the right. A concatenation with a broadcast zero writes the result once;
    F.pad on these strided views (slices of the fused projection) was 8x slower (measured, 1 thread)."""
    return torch.cat([x, x.new_zeros(()).expand(*x.shape[:-1], width - x.shape[-1])], dim=-1)


def tracing() -> bool:
    """A tracer, compiler or exporter is recording: no caches, no Python loops over data-dependent sizes."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


_WARNED: set[str] = set()


def implementation(config) -> str:
    """transformers' attention switch, as far as collaborative attention has kernels for it (eager, sdpa)."""
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in ("eager", "sdpa"):
        if impl not in _WARNED:
            _WARNED.add(impl)
            warnings.warn(f"collaborative attention has no {impl!r} kernel; computing it with eager attention",
                          stacklevel=4)
        return "eager"
    return impl
