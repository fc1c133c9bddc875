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
        setattr(self, arch.value, value)
        if arch.output:
            setattr(self, arch.output, output)

    def extra_repr(self) -> str:
        return f"method={self.method}, heads={self.num_heads}, key_dim={self.key_dim}, head_dim={self.head_dim}"

    def queries_keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head queries (B, H, T, Rq) and keys (B, H or 1, T, Rq) whose dot products are the bilinear scores."""
        B, T, _ = x.shape
        q, k = self.query_proj(x), self.key_proj(x)  # (B, T, R)
        if self.method == "cp":
            q = q[:, None] * self.mixing[None, :, None, :]  # (B, H, T, R)
            return q, k[:, None]  # key shared by all heads: (B, 1, T, R)
        if self.method == "tucker":
            return torch.einsum("btr,hrs->bhts", q, self.mixing), k[:, None]  # (B, H, T, R), (B, 1, T, R)
        r = self.key_dim // self.num_heads
        return q.view(B, T, self.num_heads, r).transpose(1, 2), k.view(B, T, self.num_heads, r).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_bias: torch.Tensor | None = None, output_attentions: bool = False, **kwargs):
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise ValueError("collaborative attention is encoder-only: a key/value cache is not supported")
        if kwargs.get("encoder_hidden_states") is not None:
            raise ValueError("collaborative attention replaces self-attention only, not cross-attention")
        x = hidden_states
        B, T, _ = x.shape
        q, k = self.queries_keys(x)  # (B, H, T, Rq), (B, H|1, T, Rq)
        v = getattr(self, self.arch.value)(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B,H,T,dh)
        # key-dependent part of the query bias, constant over queries: (B, H, 1, T)
        bias = self.content_bias(x).transpose(1, 2)[:, :, None, :] * self.scaling
        if position_bias is not None:  # MPNet's relative position bias, (B|1, H, T, T)
            bias = bias + position_bias
        mask = _additive_mask(attention_mask, x.dtype)  # (B, 1, T|1, T) or None
        if mask is not None:
            bias = bias + mask
        head_mask = kwargs.get("head_mask")
        p_drop = self.dropout.p if self.training else 0.0
        weights = None
        if _implementation(self.config) == "sdpa" and head_mask is None and not output_attentions:
            k = k.expand(B, self.num_heads, T, k.shape[-1])  # broadcast view, no copy
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=p_drop,
                                                 scale=self.scaling)  # (B, H, T, dh)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.scaling + bias  # (B, H, T, T)
            weights = self.dropout(scores.softmax(dim=-1))
            if head_mask is not None:
                weights = weights * head_mask
            ctx = torch.matmul(weights, v)  # (B, H, T, dh)
        out = ctx.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, d)
        if self.arch.output:
            out = getattr(self, self.arch.output)(out)
        if self.arch.returns == "mpnet":
            return (out, weights) if output_attentions else (out,)
        return out, weights


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
        setattr(parent, name, new.to(device=ref.device, dtype=ref.dtype))
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
