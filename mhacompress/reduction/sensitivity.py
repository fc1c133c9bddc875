"""Label-free per-layer sensitivity, for ``--budget`` with calibration data: the MEASURED effect on what the model is
read at of reducing one layer to each candidate key dim (every other layer original, the same objective and
compensation as the final reduction), on calibration sequences:

  classifier: KL(original logits' softmax || reduced), or half the squared difference for one regression output;
  encoder:    1 - cosine of the mean-pooled embeddings.

Score or weight errors rank layers badly (a layer's error can be large where the model does not read it); the
divergence of the output is what the budget should buy down (K-prune, ICLR 2024, ranks by the same KL).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..residency import trim
from . import methods
from .config import ReductionConfig
from .modeling import arch_for, attention_modules, is_classifier
from .modeling import layers as model_layers
from .modeling.modeling_mhacompress import _keep_first_token
from .objectives import pooled, pooling_of
from .sequential import (
    Batch,
    Plan,
    compensate_,
    embed,
    layer_at,
    layer_statistics,
    one_layer_resident,
    solve_qk_,
    token_weights,
)
from .surgery import model_shape

Progress = Callable[[str, int, int], None]
# calibration sequences the curves are measured on (the reduction itself uses them all), and ALS sweeps per candidate
SENSITIVITY_SEQUENCES = 128  # 64 was measurably worse on MRPC at key dim 48 (F1/acc 86.2/79.9 against 86.9/80.9)
CURVE_SWEEPS = 30


def readout(model: nn.Module, encoding: dict) -> torch.Tensor:
    """What the model is read at: a classifier's logits (B, C), its last feed-forward run on the first token alone
    (``_first_token_feed_forward``), an encoder's unit pooled embedding (B, d) (mean pooled unless its
    sentence-transformers folder says otherwise: ``pooling_of``)."""
    if is_classifier(model):
        with _first_token_feed_forward(model):
            return model(**encoding).logits.float()
    out = model(**encoding)
    embedding = pooled(out.last_hidden_state, encoding["attention_mask"], pooling_of(model))
    return nn.functional.normalize(embedding.float(), dim=-1)


@contextmanager
def _first_token_feed_forward(model: nn.Module):
    """A classifier whose last layer's feed-forward runs on the first token alone, the one its head reads (the
    LayerNorm before it keeps that position only): the same logits, without the feed-forward of every other token."""
    norm = model_layers(model)[-1].get_submodule(arch_for(model.config).norm)
    handle = norm.register_forward_hook(_keep_first_token)  # the [CLS] shortcut's hook (first_token_only_)
    try:
        yield
    finally:
        handle.remove()


class _Replay(nn.Module):
    """Stands in for a layer below the one being measured: returns the stored hidden states of that depth, so the
    model runs only from the measured layer up (whatever the layers below would compute is already known)."""

    def __init__(self, hidden: torch.Tensor, as_tuple: bool):
        super().__init__()
        self.hidden, self.as_tuple = hidden, as_tuple

    def forward(self, *args, **kwargs):
        return (self.hidden,) if self.as_tuple else self.hidden


def readout_from(model: nn.Module, index: int, hidden: torch.Tensor, encoding: dict, as_tuple: bool) -> torch.Tensor:
    """``readout`` with the layers below ``index`` replaced by their known output ``hidden`` (B, T, d)."""
    layers = model_layers(model)
    below = list(layers[:index])
    try:
        for j in range(index):
            layers[j] = _Replay(hidden, as_tuple)
        return readout(model, encoding)
    finally:
        for j, layer in enumerate(below):
            layers[j] = layer


def divergence(reference: torch.Tensor, output: torch.Tensor, classifier: bool) -> torch.Tensor:
    """Per example (B,): KL of the class distributions (half squared error for one output), or 1 - cosine."""
    if not classifier:
        return 1 - (reference * output).sum(-1)
    if reference.shape[-1] == 1:
        return 0.5 * (reference - output).pow(2).sum(-1)
    log_p, log_q = reference.log_softmax(-1), output.log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def candidates(model: nn.Module, method: str, key_dim: int) -> list[int]:
    """Key dims tried per layer around the uniform ``key_dim``: k/2 .. 2k, those the method accepts (svd: multiples
    of H), and the full width when 2k reaches it."""
    _, heads, head_dim = model_shape(model)
    full, spec = heads * head_dim, methods.get(method)
    step = heads if method == "svd" else 1
    dims = set()
    for k in (key_dim // 2, 2 * key_dim // 3, key_dim, 4 * key_dim // 3, 5 * key_dim // 3, 2 * key_dim):
        k = min(full, max(step, round(k / step) * step))
        if spec.check_key_dim(k, heads, head_dim) is None:
            dims.add(k)
    return sorted(dims)


@torch.no_grad()
def output_curves(model: nn.Module, config: ReductionConfig, dims: list[int], batches: list[dict], plan: Plan,
                  on_progress: Progress | None = None, workdir: str | None = None) -> list[dict[int, float]]:
    """curves[l][k] = mean output divergence over the ``batches``' examples when layer l alone is reduced to key
    dim k (solved from the original model's statistics, under ``plan``'s objective and compensation). The model is
    left as it was."""
    progress = on_progress or (lambda stage, done, total: None)
    classifier = is_classifier(model)
    arch = arch_for(model.config)
    _, heads, head_dim = model_shape(model)
    device = next(model.parameters()).device
    data = [Batch(b, b["attention_mask"].bool()) for b in batches]
    with one_layer_resident(model):  # as the reduction after the curves: one layer's weights resident at a time
        reference = [readout(model, b.encoding) for b in data]
    as_tuple = _returns_tuple(model, data[0].encoding)
    examples = sum(r.shape[0] for r in reference)
    scratch = Plan(objective=plan.objective, compensate=plan.compensate,
                   compensation_strength=plan.compensation_strength, first_token_last=plan.first_token_last)
    quick = replace(config, n_iter_max=min(config.n_iter_max, CURVE_SWEEPS))  # curves rank; the reduction refines
    curves = []
    with tempfile.TemporaryDirectory(prefix="mhacompress-sensitivity-", dir=workdir) as folder:
        spill = embed(model, data, Path(folder))
        weights = token_weights(model, data, spill, plan.first_token_last, device, progress) \
            if plan.objective == "output" else None
        for index in range(len(model_layers(model))):
            at = layer_at(model, index, None if weights is None else weights[index], plan.first_token_last)
            moments = layer_statistics(model, index, at, data, spill, True, plan.compensate, scratch, device,
                                       progress)
            parent, name, original = attention_modules(model)[index]
            proj = at.layer.get_submodule(arch.out_proj)
            saved = {k: v.clone() for k, v in proj.state_dict().items()}
            curve = {}
            for k in dims:
                if k >= heads * head_dim and config.method == "cp":
                    curve[k] = 0.0  # exact
                    continue
                try:
                    solve_qk_(model, index, quick, k, moments, identity=True)
                    if plan.compensate:
                        compensate_(model, index, at, data, spill, scratch, True, device, lambda *a: None)
                    with one_layer_resident(model):
                        total = sum(float(divergence(ref, readout_from(model, index, spill.read("x", i, device),
                                                                       b.encoding, as_tuple), classifier).sum())
                                    for i, (ref, b) in enumerate(zip(reference, data)))
                    curve[k] = max(total / examples, 0.0)
                finally:
                    setattr(parent, name, original)
                    proj.load_state_dict(saved)
                progress("sensitivity", index * len(dims) + len(curve), len(dims) * len(model_layers(model)))
            spill.rename("x_next", "x", len(data))
            curves.append(curve)
            trim()  # the layer's statistics and candidates
    return curves


def _returns_tuple(model: nn.Module, encoding: dict) -> bool:
    """Whether the model's layers return a tuple (MPNet) or the hidden states themselves (BERT-like, v5)."""
    from .sequential import layer_inputs

    hidden, args, kwargs = layer_inputs(model, encoding)
    return isinstance(model_layers(model)[0](hidden, *args, **kwargs), tuple)
