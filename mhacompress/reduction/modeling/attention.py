"""Collaborative self-attention: the module, with ONE readable reference forward.

Math (per layer, hidden size d, H heads of size dh, key dim R; see docs/method.md):
  original score of head h  (W_q^h x + b_q^h) . (W_k^h y + b_k^h) * dh**-0.5
  collaborative score       ((U^T x) M_h) . (V^T y) * dh**-0.5  +  (W_k^h^T b_q^h) . y * dh**-0.5
The terms constant over keys cancel in the softmax and are dropped; the scale stays the ORIGINAL dh**-0.5.

How the shared query and key combine per head is the module's *layout* (each reduction method declares one):
  diagonal  M_h = diag(m_h), mixing (H, R)            (cp: collaborative heads)
  core      M_h a full R x R core, mixing (H, R, R)    (tucker)
  per-head  no sharing: head h owns R/H columns         (svd: per-head truncated SVD, the baseline)

``reference`` is the definition. ``kernels.attend`` computes the same thing faster (fused projection, sdpa, a blocked
CPU kernel) and is chosen automatically; tests hold it to the reference. The module keeps no per-call state.
"""

from __future__ import annotations

import torch
from torch import nn

from .architectures import Arch
from .kernels import attend, usable

LAYOUTS = ("diagonal", "core", "per-head")


class CollaborativeSelfAttention(nn.Module):
    """Self-attention whose heads score with shared (diagonal, core) or shrunk (per-head) query/key projections.

    Takes the same forward arguments as the module it replaces and returns the same structure. Values, the output
    projection and dropout are the original ones, kept under their original attribute names, so the rest of the
    state dict is unchanged. ``first_token_only``: queries are the first token alone (the exact [CLS] shortcut, see
    modeling_mhacompress.first_token_only_); keys and values still see every token.
    """

    def __init__(self, *, arch: Arch, config, layout: str, key_dim: int, value: nn.Linear,
                 output: nn.Linear | None = None):
        nn.Module.__init__(self)  # not super(): subclasses also derive from the replaced class
        d, heads = getattr(config, arch.hidden), getattr(config, arch.heads)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
        if d % heads or not 1 <= key_dim <= d or (layout == "per-head" and key_dim % heads):
            raise ValueError(f"key dim {key_dim} does not fit {heads} heads of hidden size {d}"
                             + (" (per-head layouts need a multiple of the heads)" if layout == "per-head" else ""))
        self.arch, self.config, self.layout = arch, config, layout
        self.num_heads, self.head_dim, self.key_dim = heads, d // heads, key_dim
        self.scaling = self.head_dim**-0.5  # the ORIGINAL scale, whatever the key dim
        self.is_causal = False
        self.first_token_only = False
        self.query_proj = nn.Linear(d, key_dim, bias=False)  # U^T (per-head: the heads' blocks, stacked)
        self.key_proj = nn.Linear(d, key_dim, bias=False)  # V^T
        mixing_shape = {"diagonal": (heads, key_dim), "core": (heads, key_dim, key_dim)}.get(layout)
        self.mixing = nn.Parameter(torch.empty(mixing_shape)) if mixing_shape else None
        self.content_bias = nn.Linear(d, heads, bias=False)  # row h: W_k^h^T b_q^h
        self.dropout = nn.Dropout(getattr(config, arch.dropout, 0.0))
        setattr(self, arch.value, value)
        if arch.output:
            setattr(self, arch.output, output)

    def extra_repr(self) -> str:
        return f"layout={self.layout}, heads={self.num_heads}, key_dim={self.key_dim}, head_dim={self.head_dim}"

    # ---- the pieces both paths share -------------------------------------------------------------------------

    def head_queries(self, q: torch.Tensor, heads: slice = slice(None), out: torch.Tensor | None = None):
        """Shared queries (B, Tq, R) -> per-head queries of the heads in ``heads``: (B, hh, Tq, R) for shared
        layouts (q * m_h, or q M_h), (B, hh, Tq, R/H) for per-head; into ``out`` when given (shared layouts)."""
        if self.layout == "diagonal":
            return torch.mul(q[:, None], self.mixing[None, heads, None, :], out=out)
        if self.layout == "core":
            return torch.matmul(q[:, None], self.mixing[None, heads], out=out)  # (B, 1, Tq, R) x (1, hh, R, R)
        B, Tq, _ = q.shape
        return q.view(B, Tq, self.num_heads, -1).transpose(1, 2)[:, heads]

    def head_keys(self, k: torch.Tensor) -> torch.Tensor:
        """Shared keys (B, T, R) -> (B, 1, T, R), one key for all heads; per-head: (B, H, T, R/H)."""
        if self.layout != "per-head":
            return k[:, None]
        B, T, _ = k.shape
        return k.view(B, T, self.num_heads, -1).transpose(1, 2)

    def additive_bias(self, attention_mask, position_bias, Tq: int, dtype,
                      queries: torch.Tensor | None = None) -> torch.Tensor | None:
        """The padding mask and MPNet's relative position bias, as one additive term (B|1, H|1, Tq|1, T) or None:
        the rows of the first ``Tq`` queries, or of the positions ``queries`` (Tq,)."""
        def rows(t):
            return t if t.shape[-2] == 1 else t[..., :Tq, :] if queries is None else t[..., queries, :]

        bias = None if position_bias is None else rows(position_bias)  # (B|1, H, Tq, T)
        mask = additive_mask(attention_mask, dtype)  # (B, 1, Tq|1, T)
        if mask is not None:
            mask = rows(mask)
            bias = mask if bias is None else bias + mask
        return bias

    def value_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> the heads' values (B, H, T, dh)."""
        B, T, _ = x.shape
        return getattr(self, self.arch.value)(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    # ---- forward --------------------------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_bias: torch.Tensor | None = None, output_attentions: bool = False, **kwargs):
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise ValueError("collaborative attention is encoder-only: a key/value cache is not supported")
        if kwargs.get("encoder_hidden_states") is not None:
            raise ValueError("collaborative attention replaces self-attention only, not cross-attention")
        head_mask = kwargs.get("head_mask")
        if usable(self, output_attentions, head_mask):
            out, weights = attend(self, hidden_states, attention_mask, position_bias), None
        else:
            out, weights = self.reference(hidden_states, attention_mask, position_bias, head_mask)
        if self.arch.output:
            out = getattr(self, self.arch.output)(out)
        if self.arch.returns == "mpnet":
            return (out, weights) if output_attentions else (out,)
        return out, weights

    def reference(self, x: torch.Tensor, attention_mask=None, position_bias=None, head_mask=None, *,
                  queries: torch.Tensor | None = None, values: torch.Tensor | None = None):
        """Attention output (B, Tq, H*dh) and weights (B, H, Tq, T), by the formula. Tq = 1 with first_token_only;
        the positions ``queries`` (Tq,) alone when given (those a refinement step's loss weighs). ``values`` (B, H,
        T, dh): the value heads of ``x``, when the caller has them already."""
        xq = x[:, :1] if self.first_token_only else x if queries is None else x[:, queries]  # queries (B, Tq, d)
        B, Tq, H, dh = x.shape[0], xq.shape[1], self.num_heads, self.head_dim
        q = self.head_queries(self.query_proj(xq))  # (B, H, Tq, Rq)
        k = self.head_keys(self.key_proj(x))  # (B, H|1, T, Rq)
        v = self.value_heads(x) if values is None else values  # (B, H, T, dh)
        content = self.content_bias(x).transpose(1, 2)[:, :, None, :]  # key-dependent query bias (B, H, 1, T)
        scores = (head_scores(q, k) + content) * self.scaling  # (B, H, Tq, T)
        bias = self.additive_bias(attention_mask, position_bias, Tq, scores.dtype,
                                  None if self.first_token_only else queries)
        if bias is not None:
            scores = scores + bias
        weights = self.dropout(scores.softmax(dim=-1))
        if head_mask is not None:
            weights = weights * head_mask
        ctx = torch.matmul(weights, v)  # (B, H, Tq, dh)
        return ctx.transpose(1, 2).reshape(B, Tq, H * dh), weights


def head_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q k^T per head (B, H, Tq, T) for queries (B, H, Tq, R) and keys (B, H|1, T, R). One key shared by every
    head (the shared layouts) is one product per sequence, with the heads' queries stacked, instead of a broadcast
    one per head: in a refinement step's backward the key's gradient is then summed over the heads inside that
    product, not by a reduction over an expanded copy: a refinement step (forward and backward) takes 0.80-0.97x
    the time, 2-core CPU, MiniLM and BERT-base sizes, batch 32 x 64-100 tokens."""
    B, H, Tq, R = q.shape
    if k.shape[1] == 1 and H > 1:
        return torch.matmul(q.reshape(B, H * Tq, R), k[:, 0].transpose(-1, -2)).view(B, H, Tq, -1)
    return torch.matmul(q, k.transpose(-1, -2))


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Attention masks arrive as booleans (True = attend) or as additive floats; return the additive form."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask.to(dtype)
