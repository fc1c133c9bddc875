"""What scoring tokens costs, original vs reduced: Q/K parameters and multiply-adds, counted from shapes.

Per layer with hidden size d, H heads of size dh and key dim R (multiply-adds, biases not counted as MACs):

  method     Q/K parameters            Q/K projection MACs per token     score MACs per token pair
  original   2*d*d + 2*d  (W, b)        2*d*d                             d            (H heads x dh)
  cp         2*d*R + H*R + H*d          2*d*R + H*R + H*d                 H*R          (every head scores in R)
  tucker     2*d*R + H*R*R + H*d        2*d*R + H*R*R + H*d               H*R
  svd        2*d*R + H*d                2*d*R + H*d                       R            (H heads x R/H)

The H*d terms are the content bias (the key-dependent part of the query bias), H*R the cp mixing, H*R*R the Tucker
core applied to every query. Scoring a sequence of T tokens costs T * projection + T*T * score. cp and tucker are
cheaper to score than the original only when R < dh: shared projections save parameters and projection MACs, but
every head still scores in the full key dim. The pure functions below take numbers; ``layer_shapes`` reads a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import methods


@dataclass(frozen=True)
class LayerShape:
    """One self-attention layer: ``method`` is None for the original layer (then ``key_dim`` is d)."""

    hidden: int
    heads: int
    method: str | None = None
    key_dim: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def qk_params(s: LayerShape) -> int:
    """Parameters that score tokens (matches surgery.qk_parameters on the module)."""
    if s.method is None:
        return 2 * s.hidden * s.hidden + 2 * s.hidden
    return methods.get(s.method).qk_params(s.hidden, s.heads, s.key_dim)


def projection_macs(s: LayerShape) -> int:
    """Multiply-adds per token of the query/key side: projections, mixing (cp, tucker) and content bias."""
    if s.method is None:
        return 2 * s.hidden * s.hidden
    return methods.get(s.method).projection_macs(s.hidden, s.heads, s.key_dim)


def score_macs(s: LayerShape) -> int:
    """Multiply-adds per (query, key) pair of the score computation, all heads."""
    if s.method is None:
        return s.hidden
    return methods.get(s.method).score_macs(s.hidden, s.heads, s.key_dim)


def layer_cost(s: LayerShape, seq_len: int, batch_size: int = 1) -> dict:
    """Counts of one layer for ``batch_size`` sequences of ``seq_len`` tokens."""
    tokens, pairs = batch_size * seq_len, batch_size * seq_len * seq_len
    proj, score = tokens * projection_macs(s), pairs * score_macs(s)
    return {"qk_params": qk_params(s), "projection_macs": proj, "score_macs": score, "qk_macs": proj + score}


COUNTS = ("qk_params", "projection_macs", "score_macs", "qk_macs")


def compare(original: list[LayerShape], reduced: list[LayerShape], seq_len: int, batch_size: int = 1) -> dict:
    """Per layer and total counts, original beside reduced, and the reduced/original ratios of the totals."""
    assert len(original) == len(reduced), f"{len(original)} original layers vs {len(reduced)} reduced"
    layers = []
    for i, (a, b) in enumerate(zip(original, reduced)):
        ca, cb = layer_cost(a, seq_len, batch_size), layer_cost(b, seq_len, batch_size)
        layers.append({"index": i, "method": b.method, "key_dim": b.key_dim,
                       **{k: {"original": ca[k], "reduced": cb[k]} for k in COUNTS}})
    total = {k: {side: sum(x[k][side] for x in layers) for side in ("original", "reduced")} for k in COUNTS}
    for v in total.values():
        v["ratio"] = v["reduced"] / v["original"] if v["original"] else float("nan")
    return {"seq_len": seq_len, "batch_size": batch_size, "layers": layers, "total": total}


def layer_shapes(model) -> list[LayerShape]:
    """The LayerShape of every self-attention layer of a (reduced or original) model."""
    from .modeling import COMPRESSION_KEY, CollaborativeSelfAttention, arch_for, attention_modules

    arch = arch_for(model.config)
    d, H = getattr(model.config, arch.hidden), getattr(model.config, arch.heads)
    method = (getattr(model.config, COMPRESSION_KEY, None) or {}).get("method")
    shapes = []
    for _, _, module in attention_modules(model):
        if isinstance(module, CollaborativeSelfAttention):
            shapes.append(LayerShape(d, H, method, module.key_dim))
        else:
            shapes.append(LayerShape(d, H, None, d))
    return shapes


def original_shapes(reduced: list[LayerShape]) -> list[LayerShape]:
    """The shapes of the model a reduced model was made from."""
    return [LayerShape(s.hidden, s.heads, None, s.hidden) for s in reduced]
