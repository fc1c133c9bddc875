"""Collaborative self-attention: the module, the architecture table, and the structural swap.

This file is self-contained (torch, transformers and the standard library only) because it is also copied into every
saved model folder as ``modeling_mhacompress.py`` and referenced from ``config.json``'s ``auto_map``: a reduced model
then loads with ``AutoModel.from_pretrained(dir, trust_remote_code=True)`` in a process that never imports mhacompress.

Math (per layer, hidden size d, H heads of size dh, key dim R; see docs/method.md):
  original score of head h  (W_q^h x + b_q^h) . (W_k^h y + b_k^h) * dh**-0.5
  collaborative score       ((U^T x) M_h) . (V^T y) * dh**-0.5  +  (W_k^h^T b_q^h) . y * dh**-0.5
where M_h is diag(m_h) for ``cp``, a full R x R core for ``tucker``, and ``svd`` gives every head its own rank-r
projections instead of sharing. The terms constant over keys cancel in the softmax and are dropped; the scale stays
the ORIGINAL dh**-0.5.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

COMPRESSION_KEY = "compression"  # the block in config.json that describes a reduction
FORMAT_VERSION = 1
METHODS = ("cp", "tucker", "svd")


@dataclass(frozen=True)
class Arch:
    """Where self-attention lives in one architecture, relative to ``model.base_model``."""

    layers: str  # the ModuleList of transformer layers
    attention: str  # self-attention module, relative to one layer
    query: str
    key: str
    value: str
    output: str | None  # output projection, when it lives inside the self-attention module
    heads: str  # config attribute: number of heads
    hidden: str  # config attribute: hidden size
    dropout: str  # config attribute: attention-probability dropout
    returns: str  # "pair": (output, weights) as transformers v5 modules; "mpnet": (output,) or (output, probs)


_BERT_LIKE = Arch(
    layers="encoder.layer", attention="attention.self", query="query", key="key", value="value", output=None,
    heads="num_attention_heads", hidden="hidden_size", dropout="attention_probs_dropout_prob", returns="pair",
)

ARCHITECTURES: dict[str, Arch] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "mpnet": Arch(
        layers="encoder.layer", attention="attention.attn", query="q", key="k", value="v", output="o",
        heads="num_attention_heads", hidden="hidden_size", dropout="attention_probs_dropout_prob", returns="mpnet",
    ),
    "distilbert": Arch(
        layers="transformer.layer", attention="attention", query="q_lin", key="k_lin", value="v_lin",
        output="out_lin", heads="n_heads", hidden="dim", dropout="attention_dropout", returns="pair",
    ),
}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not in ARCHITECTURES."""


def arch_for(config) -> Arch:
    """The table entry for ``config.model_type``; an unknown type is an error naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise UnsupportedModelError(f"{model_type} configured as a decoder is not supported; only encoders are")
    return ARCHITECTURES[model_type]


def is_classifier(model: nn.Module) -> bool:
    """A sequence-classification head (original, or reduced: CollaborativeBertForSequenceClassification): it reads
    only the first token of the last layer."""
    return type(model).__name__.endswith("ForSequenceClassification")


def attention_modules(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, attribute, self_attention)`` for every layer, in order."""
    arch = arch_for(model.config)
    layers = model.base_model.get_submodule(arch.layers)
    parent_path, _, name = arch.attention.rpartition(".")
    found = []
    for layer in layers:
        parent = layer.get_submodule(parent_path) if parent_path else layer
        found.append((parent, name, getattr(parent, name)))
    return found


class CollaborativeSelfAttention(nn.Module):
    """Self-attention whose heads score with shared (``cp``, ``tucker``) or shrunk (``svd``) query/key projections.

    Takes the same forward arguments as the module it replaces and returns the same structure. Values, the output
    projection and dropout are the original ones, kept under their original attribute names so the rest of the
    state dict is unchanged.
    """

    def __init__(self, *, arch: Arch, config, method: str, key_dim: int, value: nn.Linear,
                 output: nn.Linear | None = None):
        nn.Module.__init__(self)  # not super(): subclasses also derive from the replaced class (see below)
        d, heads = getattr(config, arch.hidden), getattr(config, arch.heads)
        assert method in METHODS, f"method must be one of {METHODS}, got {method!r}"
        assert d % heads == 0, f"hidden size {d} is not a multiple of {heads} heads"
        assert 1 <= key_dim <= d, f"key_dim must be in 1..{d}, got {key_dim}"
        assert method != "svd" or key_dim % heads == 0, f"svd key_dim {key_dim} must be a multiple of {heads} heads"
        self.arch, self.config, self.method = arch, config, method
        self.num_heads, self.head_dim, self.key_dim = heads, d // heads, key_dim
        self.scaling = self.head_dim**-0.5  # the ORIGINAL scale, whatever the key dim
        self.is_causal = False
        self.query_proj = nn.Linear(d, key_dim, bias=False)  # U^T (svd: per-head blocks, stacked)
        self.key_proj = nn.Linear(d, key_dim, bias=False)  # V^T
        mixing_shape = {"cp": (heads, key_dim), "tucker": (heads, key_dim, key_dim)}.get(method)
        self.mixing = nn.Parameter(torch.empty(mixing_shape)) if mixing_shape else None
        self.content_bias = nn.Linear(d, heads, bias=False)  # row h: W_k^h^T b_q^h
        self.dropout = nn.Dropout(getattr(config, arch.dropout, 0.0))
        self.full_sequence: torch.Tensor | None = None  # keys/values for one call when queries are a prefix
        self._fused: tuple | None = None  # (weights' identity, fused weight, fused bias), see _fused_weight
        setattr(self, arch.value, value)
        if arch.output:
            setattr(self, arch.output, output)

    def extra_repr(self) -> str:
        return f"method={self.method}, heads={self.num_heads}, key_dim={self.key_dim}, head_dim={self.head_dim}"

    def queries_keys(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head queries (B, H, Tq, Rq) of ``x`` and keys (B, H or 1, T, Rq) of ``y`` (default ``x``) whose dot
        products are the bilinear scores."""
        return self._per_head(self.query_proj(x), self.key_proj(x if y is None else y))

    def _per_head(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared queries (B, Tq, R) and keys (B, T, R) -> per-head (B, H, Tq, Rq) and (B, H|1, T, Rq)."""
        (B, Tq, _), T = q.shape, k.shape[1]
        if self.method != "svd":
            return self._head_queries(q), k[:, None]  # key shared by all heads: (B, 1, T, R)
        r = self.key_dim // self.num_heads
        return q.view(B, Tq, self.num_heads, r).transpose(1, 2), k.view(B, T, self.num_heads, r).transpose(1, 2)

    def _head_queries(self, q: torch.Tensor, heads: slice = slice(None), out: torch.Tensor | None = None):
        """cp and tucker: shared queries (B, Tq, R) -> queries (B, hh, Tq, R) of the heads in ``heads``; into ``out``
        when given. cp: q * m_h; tucker: q M_h."""
        if self.method == "cp":
            return torch.mul(q[:, None], self.mixing[None, heads, None, :], out=out)
        return torch.matmul(q[:, None], self.mixing[None, heads], out=out)  # (B, 1, Tq, R) x (1, hh, R, R)

    def _shared_key_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              bias: torch.Tensor) -> torch.Tensor:
        """Attention output (B, Tq, H * dh) of shared queries (B, Tq, R), the shared key (B, T, R), values
        (B, T, H, dh) and an additive bias (B, H, Tq|1, T), exact, for CPU inference (see ``_shared_key_is_faster``).

        Works through blocks of examples x heads whose per-head queries and scores stay in cache: the block's
        per-head queries are formed in a buffer (never all (B, H, Tq, R) at once), one GEMM scores all its heads
        against their shared key, and values keep their own head dim. Blocks are written in place, so no autograd.
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
                qh = self._head_queries(q[b:b + e], slice(h, h + hh), out=queries[:e * hh * Tq * R].view(e, hh, Tq, R))
                s = scores[:e * hh * Tq * T].view(e, hh * Tq, T)
                torch.baddbmm(s, qh.view(e, hh * Tq, R), keys[b:b + e], beta=0, alpha=self.scaling, out=s)
                s = s.view(e, hh, Tq, T).add_(bias[b:b + e, h:h + hh])
                torch.softmax(s, dim=-1, out=s)
                # (e, hh, Tq, dh); a GEMM into a strided slice of the output ran 30% slower than this copy
                out[b:b + e, :, h:h + hh] = torch.matmul(s, v[b:b + e, :, h:h + hh].transpose(1, 2)).transpose(1, 2)
        return out.view(B, Tq, H * dh)

    def _fused_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[U^T; V^T; content bias * scale; W_v; zero rows] (N, d) and its bias, N = 2R + H + d rounded up to a
        multiple of 16: one GEMM instead of four, three narrow (which run several times slower per multiply-add on
        CPU); an output width that is not a multiple of 8 ran at 70% of the GEMM's speed (588 vs 592 columns on
        MiniLM at key dim 96, measured). Cached in inference; rebuilt when any weight changes (in-place updates bump
        ``_version``) and whenever autograd or a compiler/exporter is tracing."""
        value = getattr(self, self.arch.value)
        parts = (self.query_proj.weight, self.key_proj.weight, self.content_bias.weight, value.weight)
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in parts)
        key = None if _tracing() or grad else (torch.is_inference_mode_enabled(),  # inference tensors stay in inference
                                            *((id(p), p.data_ptr(), p._version, p.dtype, p.device) for p in parts))
        if key is not None and self._fused is not None and self._fused[0] == key:
            return self._fused[1], self._fused[2]
        n = 2 * self.key_dim + self.num_heads
        vb = value.bias if value.bias is not None else value.weight.new_zeros(value.weight.shape[0])
        pad = -(n + len(vb)) % 16
        scaled = (*parts[:2], parts[2] * self.scaling, parts[3], vb.new_zeros(pad, parts[3].shape[1]))
        weight, bias = torch.cat(scaled), torch.cat([vb.new_zeros(n), vb, vb.new_zeros(pad)])  # (N, d), (N,)
        if key is not None:
            self._fused = (key, weight, bias)
        return weight, bias

    def _project(self, x: torch.Tensor, y: torch.Tensor):
        """Shared queries (B, Tq, R) of x; keys (B, T, R), scaled content bias (B, T, H) and values (B, T, d) of y."""
        R, H, d = self.key_dim, self.num_heads, self.num_heads * self.head_dim
        weight, bias = self._fused_weight()
        pad = weight.shape[0] - 2 * R - H - d
        if x is y:
            return torch.split(F.linear(x, weight, bias), [R, R, H, d, pad], dim=-1)[:4]
        q = F.linear(x, weight[:R])  # (B, Tq, R)
        return (q, *torch.split(F.linear(y, weight[R:], bias[R:]), [R, H, d, pad], dim=-1)[:3])

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_bias: torch.Tensor | None = None, output_attentions: bool = False, **kwargs):
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise ValueError("collaborative attention is encoder-only: a key/value cache is not supported")
        if kwargs.get("encoder_hidden_states") is not None:
            raise ValueError("collaborative attention replaces self-attention only, not cross-attention")
        x = hidden_states  # queries: (B, Tq, d)
        y = x if self.full_sequence is None else self.full_sequence  # keys, values: (B, T, d) (see first_token_only_)
        (B, Tq, _), T = x.shape, y.shape[1]
        q, k, c, v = self._project(x, y)  # (B, Tq, R), (B, T, R), (B, T, H), (B, T, d)
        v = v.view(B, T, self.num_heads, self.head_dim)  # (B, T, H, dh)
        # key-dependent part of the query bias, constant over queries: (B, H, 1, T)
        # already scaled by dh**-0.5; made contiguous, because a mask with c's (B, T, H) strides makes the CPU flash
        # kernel copy an expanded (B, H, Tq, T) mask on every call
        bias = c.transpose(1, 2).contiguous()[:, :, None, :]
        if position_bias is not None:  # MPNet's relative position bias, (B|1, H, T, T)
            bias = bias + position_bias[..., :Tq, :]
        mask = _additive_mask(attention_mask, x.dtype)  # (B, 1, T|1, T) or None
        if mask is not None:
            bias = bias + mask[..., :Tq, :]
        head_mask = kwargs.get("head_mask")
        p_drop = self.dropout.p if self.training else 0.0
        weights, sdpa = None, _implementation(self.config) == "sdpa" and head_mask is None and not output_attentions
        if sdpa and _shared_key_is_faster(self, q, p_drop):
            out = self._shared_key_attention(q, k, v, bias.to(q.dtype))  # (B, Tq, d)
        else:
            q, k = self._per_head(q, k)  # (B, H, Tq, Rq), (B, H|1, T, Rq)
            v = v.transpose(1, 2)  # (B, H, T, dh)
            if sdpa:
                ctx = _sdpa(q, k, v, bias.to(q.dtype), p_drop, self.scaling)  # (B, H, Tq, dh)
            else:
                scores = torch.matmul(q, k.transpose(-1, -2)) * self.scaling + bias  # (B, H, Tq, T)
                weights = self.dropout(scores.softmax(dim=-1))
                if head_mask is not None:
                    weights = weights * head_mask
                ctx = torch.matmul(weights, v)  # (B, H, Tq, dh)
            out = ctx.transpose(1, 2).reshape(B, Tq, self.num_heads * self.head_dim)  # (B, Tq, d)
        if self.arch.output:
            out = getattr(self, self.arch.output)(out)
        if self.arch.returns == "mpnet":
            return (out, weights) if output_attentions else (out,)
        return out, weights


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, p_drop: float,
          scale: float) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on (B, H, Tq, Rq) queries, (B, H|1, T, Rq) keys and (B, H, T, dh) values.

    PyTorch's fused CPU kernel (flash) needs one head dim for q, k and v and otherwise silently falls back to the math
    path, which materialises the (B, H, Tq, T) scores. On CPU, zero-pad q and k (Rq < dh) or v (Rq > dh) to a common
    width: zeros add nothing to a dot product, and padded value columns are sliced off, so the result is exact.
    Padding v to Rq multiplies the weighted-value work by Rq / dh, which is why CPU inference with a shared key wider
    than the head dim goes to ``CollaborativeSelfAttention._shared_key_attention`` instead. An ONNX export is not
    padded: the exporter writes sdpa as matrix products, which take two head dims.
    """
    B, H, _, dh = v.shape
    pad = q.device.type == "cpu" and not torch.onnx.is_in_onnx_export()  # GPU kernels take two head dims
    width = max(q.shape[-1], dh) if pad else 0
    if q.shape[-1] < width:
        q, k = _zero_pad(q, width), _zero_pad(k, width)
    if dh < width:
        v = _zero_pad(v, width)  # (B, H, T, width)
    k = k.expand(B, H, *k.shape[2:])  # a shared key is broadcast across heads as a view, no copy
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p_drop, scale=scale)
    return ctx[..., :dh]  # (B, H, Tq, dh)


SCORE_BLOCK = 1 << 19  # score elements per block (2 MiB in float32): 2**18 to 2**20 measured within 10% of each other


def _shared_key_is_faster(layer: CollaborativeSelfAttention, q: torch.Tensor, p_drop: float) -> bool:
    """CPU inference with one key for all heads (cp, tucker), wider than the head dim. Measured against the fused
    kernel with values padded to the key dim (docs/performance.md): 1.2 to 3 times faster per attention core at key
    dims 1.5 to 3 times the head dim, 1 and 2 threads, 32 to 512 tokens. Not when tracing (the block loop would fix
    the batch size in the graph), with dropout, or when autograd records (blocks are written in place)."""
    return (q.device.type == "cpu" and layer.method != "svd" and layer.key_dim > layer.head_dim and p_drop == 0.0
            and not (torch.is_grad_enabled() and q.requires_grad) and not _tracing())


def _tracing() -> bool:
    """A tracer, compiler or exporter is recording: no caches, no Python loops over data-dependent sizes."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def _zero_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """(..., w) -> (..., width), zeros on the right. A concatenation with a broadcast zero writes the result once;
    F.pad on these strided views (slices of the fused projection) was 8x slower (measured, 1 thread)."""
    return torch.cat([x, x.new_zeros(()).expand(*x.shape[:-1], width - x.shape[-1])], dim=-1)


def _implementation(config) -> str:
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in ("eager", "sdpa"):
        warnings.warn(f"collaborative attention has no {impl!r} kernel; computing it with eager attention",
                      stacklevel=3)
        return "eager"
    return impl


def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Attention masks arrive as booleans (True = attend) or as additive floats; return the additive form."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask.to(dtype)


def collaborative_class(original: type[nn.Module]) -> type[nn.Module]:
    """A subclass of both CollaborativeSelfAttention and the replaced class, so that transformers' output recorders
    (``output_attentions=True``), which match modules with isinstance, still find the attention layers."""
    name = "Collaborative" + original.__name__
    cls = _CLASSES.get(name)
    if cls is None:
        cls = type(name, (CollaborativeSelfAttention, original), {"__init__": CollaborativeSelfAttention.__init__})
        _CLASSES[name] = cls
    return cls


_CLASSES: dict[str, type] = {}


def collaborate_(model: nn.Module, compression: dict) -> nn.Module:
    """Replace every self-attention module of ``model`` by an (uninitialised) collaborative one, in place.

    ``compression`` is the block saved in config.json: its ``method`` and per-layer ``key_dim`` fix the shapes. The
    weights are filled by the reduction (mhacompress.compress.surgery) or by loading a saved state dict.
    """
    arch = arch_for(model.config)
    version = compression.get("format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise ValueError(f"compression format {version} is newer than this code understands ({FORMAT_VERSION})")
    layers = compression["layers"]
    found = attention_modules(model)
    if len(layers) != len(found):
        raise ValueError(f"compression block describes {len(layers)} layers, the model has {len(found)}")
    for spec, (parent, name, old) in zip(layers, found):
        if isinstance(old, CollaborativeSelfAttention):
            raise ValueError(f"layer {spec['index']} is already collaborative")
        new = collaborative_class(type(old))(
            arch=arch, config=model.config, method=compression["method"], key_dim=int(spec["key_dim"]),
            value=getattr(old, arch.value), output=getattr(old, arch.output) if arch.output else None,
        )
        ref = getattr(old, arch.value).weight
        new.train(old.training)  # a fresh module is in training mode: keep eval models deterministic (dropout off)
        setattr(parent, name, new.to(device=ref.device, dtype=ref.dtype))
    if compression.get("first_token_only"):
        first_token_only_(model)
    return model


def first_token_only_(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Exact shortcut for heads that read only the first token ([CLS]: every ``*ForSequenceClassification`` head of
    ARCHITECTURES, and BERT's pooler): the last layer computes attention for that query alone, and its feed-forward
    for that token alone. In place; recorded in the compression block so a saved model keeps it.

    Afterwards ``last_hidden_state`` has length 1 (the first token, equal to the full model's); pooled outputs and
    classification logits are unchanged. Do not enable it for models read at every token (mean pooling, tagging).
    """
    layers = model.base_model.get_submodule(arch_for(model.config).layers)
    last, attn = layers[-1], attention_modules(model)[-1][2]
    if not isinstance(attn, CollaborativeSelfAttention):
        raise ValueError("the first-token shortcut needs a reduced model (collaborative attention in the last layer)")
    for handle in getattr(last, "_first_token_hooks", ()):
        handle.remove()
    last._first_token_hooks = ()
    if enabled:
        def take_first(layer, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, d)
            attn.full_sequence = hidden  # keys and values still see every token
            first = hidden[:, :1]  # (B, 1, d): the only query, and the residual stream from here on
            return ((first, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": first})

        def release(layer, args, kwargs, output):
            attn.full_sequence = None

        last._first_token_hooks = (last.register_forward_pre_hook(take_first, with_kwargs=True),
                                   last.register_forward_hook(release, with_kwargs=True))
    block = getattr(model.config, COMPRESSION_KEY, None)
    if isinstance(block, dict):
        block["first_token_only"] = enabled
    return model


# ---- remote-code entry points --------------------------------------------------------------------------------
# config.json's auto_map names e.g. "modeling_mhacompress.CollaborativeBertForSequenceClassification". The class is
# built on first access (PEP 562 module __getattr__): the transformers class of the same name, with its self-attention
# swapped for collaborative attention right after construction, before the weights are loaded.

_MODEL_CLASSES: dict[str, type] = {}


def collaborative_model_class(base_name: str) -> type:
    """``CollaborativeX``: transformers' class ``X`` whose constructor installs collaborative attention."""
    if base_name not in _MODEL_CLASSES:
        import transformers

        base = getattr(transformers, base_name)

        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            collaborate_(self, getattr(config, COMPRESSION_KEY))

        cls = type("Collaborative" + base_name, (base,), {"__init__": __init__, "__module__": __name__})
        _MODEL_CLASSES[base_name] = cls
    return _MODEL_CLASSES[base_name]


def __getattr__(name: str):
    if name.startswith("Collaborative") and name != "CollaborativeSelfAttention":
        try:
            return collaborative_model_class(name[len("Collaborative"):])
        except AttributeError:
            pass
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
