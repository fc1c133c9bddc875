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
from pathlib import Path

import torch
from torch import nn

from . import methods
from .config import ReductionConfig
from .modeling import arch_for, attention_modules, is_classifier
from .modeling import layers as model_layers
from .sequential import (Batch, Plan, compensate_, embed, layer_at, layer_statistics, solve_qk_,
                         token_weights)
from .surgery import model_shape

Progress = Callable[[str, int, int], None]
SENSITIVITY_SEQUENCES = 128  # calibration sequences the curves are measured on (the reduction uses them all)


def readout(model: nn.Module, encoding: dict) -> torch.Tensor:
    """What the model is read at: a classifier's logits (B, C), an encoder's unit mean-pooled embedding (B, d)."""
    out = model(**encoding)
    if is_classifier(model):
        return out.logits.float()
    mask = encoding["attention_mask"].to(out.last_hidden_state.dtype)[..., None]  # (B, T, 1)
    pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp_min(1)
    return nn.functional.normalize(pooled.float(), dim=-1)


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
    reference = [readout(model, b.encoding) for b in data]
    examples = sum(r.shape[0] for r in reference)
    scratch = Plan(objective=plan.objective, compensate=plan.compensate,
                   compensation_strength=plan.compensation_strength, first_token_last=plan.first_token_last)
    curves = []
    with tempfile.TemporaryDirectory(prefix="mhacompress-sensitivity-", dir=workdir) as folder:
        spill = embed(model, data, Path(folder))
        weights = token_weights(model, data, spill, plan.first_token_last, device, progress) \
            if plan.objective == "output" else None
        for index in range(len(model_layers(model))):
            at = layer_at(model, index, None if weights is None else weights[index])
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
                    solve_qk_(model, index, config, k, moments, identity=True)
                    if plan.compensate:
                        compensate_(model, index, at, data, spill, scratch, True, device, lambda *a: None)
                    total = sum(float(divergence(ref, readout(model, b.encoding), classifier).sum())
                                for ref, b in zip(reference, data))
                    curve[k] = max(total / examples, 0.0)
                finally:
                    setattr(parent, name, original)
                    proj.load_state_dict(saved)
                progress("sensitivity", index * len(dims) + len(curve), len(dims) * len(model_layers(model)))
            spill.rename("x_next", "x", len(data))
            curves.append(curve)
    return curves
