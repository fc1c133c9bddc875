"""Data-aware reduction: each layer's input second moment C = E[x x^T] from calibration text, and the whitening
that turns "error of the weights" into "expected error of the attention scores on that data".

For x, y drawn from the layer's inputs, E[(x^T (A - A_hat) y)^2] = ||C^1/2 (A - A_hat) C^1/2||_F^2 (independent x, y
with second moment C). So decomposing the whitened products C^1/2 A_h C^1/2 = (W_q^h C^1/2)^T (W_k^h C^1/2) and
mapping the factors back (U <- C^-1/2 U, V <- C^-1/2 V) minimises the expected score error; the solver's relative
error in the whitened space is that expected error, relative to E[(x^T A y)^2].
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterable

import torch

from ..devices import work_device
from .decompose import Factors, NonFiniteProblem
from .modeling import arch_for, attention_modules


@torch.no_grad()
def second_moments(model, encodings: Iterable[dict], on_batch: Callable[[int], None] | None = None
                   ) -> list[torch.Tensor]:
    """C_l = mean over real (non-padding) tokens of x x^T (d, d), float64, for the input x of every self-attention
    layer, from one forward pass over ``encodings`` (tokenizer outputs with an attention_mask) of the model, which
    must still be the ORIGINAL."""
    found = attention_modules(model)
    d = getattr(model.config, arch_for(model.config).hidden)
    sums = [torch.zeros(d, d, dtype=torch.float64) for _ in found]
    counts = [0] * len(found)
    mask: dict[str, torch.Tensor] = {}

    def hook(index):
        def pre(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]  # (B, T, d)
            x = x[mask["tokens"].bool()]  # (N, d) real tokens only
            x = x.to(work_device(x.device)).double()  # MPS has no float64
            sums[index].add_((x.T @ x).cpu())
            counts[index] += x.shape[0]
        return pre

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, (_, _, m) in enumerate(found)]
    device = next(model.parameters()).device
    try:
        for enc in encodings:
            mask["tokens"] = enc["attention_mask"].to(device)
            model(**{k: v.to(device) for k, v in enc.items()})
            if on_batch:
                on_batch(enc["attention_mask"].shape[0])
    finally:
        for h in handles:
            h.remove()
    return [s / max(c, 1) for s, c in zip(sums, counts)]


def check_finite_statistics(*statistics: torch.Tensor) -> None:
    """Calibration statistics that hold NaN or infinite values (activations that overflowed on the calibration data)
    as a NonFiniteProblem, which ``solving_layer`` words in one line naming the layer: checked where they enter any
    linear algebra (``whitening``, ``objectives.ridge_map``), whatever the path, method or objective. Past this
    point they became a LinAlgError traceback (svd), non-finite factors refused as if the solver had failed (tucker,
    cp at the full key dim), or NaN error curves that ``--budget`` read as too small a budget."""
    if not all(bool(torch.isfinite(s).all()) for s in statistics):
        raise NonFiniteProblem("the statistics of its calibration inputs are NaN or infinite")


def whitening(moment: torch.Tensor, eps: float = 1e-6, shrink: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(C^1/2, C^-1/2), symmetric, with eigenvalues floored at ``eps`` x the largest (rank-deficient data), then
    raised by ``shrink`` x their mean: C shrunk towards a multiple of the identity, as a covariance estimated from a
    small sample is (Ledoit & Wolf 2004), so that a decomposition in this metric does not spend its rank on
    directions that only the calibration sample makes large, nor let factors grow in the ones it leaves out. A
    moment that is not finite is a NonFiniteProblem (``check_finite_statistics``)."""
    check_finite_statistics(moment)
    evals, vecs = torch.linalg.eigh(moment.to(torch.float64))  # (d,), (d, d)
    evals = evals.clamp_min(eps * evals.max()) + shrink * evals.clamp_min(0).mean()
    return (vecs * evals.sqrt()) @ vecs.T, (vecs * evals.rsqrt()) @ vecs.T


def whiten(wq: torch.Tensor, wk: torch.Tensor, moment: torch.Tensor, key_moment: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whitened problem: W_q Cq^1/2 and W_k Ck^1/2 (float64), whose score tensor's error is the expected score
    error on the calibration data (query inputs with second moment Cq = ``moment``, key inputs with Ck =
    ``key_moment``, by default the same), and Cq^-1/2, Ck^-1/2 to map its factors back (``unwhiten``). Not shrunk:
    the raw moments' few outlier features make their mean eigenvalue a pull towards the weights-only fit (MiniLM
    fine-tuned on MRPC, key dim 96, the score objective with shrinkage 0.3: F1 85.7 -> 77.2)."""
    sqrt_q, inv_q = whitening(moment.to(wq.device))  # the moments are summed on the CPU, the weights may be elsewhere
    sqrt_k, inv_k = (sqrt_q, inv_q) if key_moment is None else whitening(key_moment.to(wk.device))
    return wq.double() @ sqrt_q, wk.double() @ sqrt_k, inv_q, inv_k


def unwhiten(factors: Factors, inv_q: torch.Tensor, inv_k: torch.Tensor | None = None) -> Factors:
    """Map factors of Cq^1/2 A Ck^1/2 back to A: U <- Cq^-1/2 U, V <- Ck^-1/2 V (per head for svd)."""
    return replace(factors, U=inv_q @ factors.U, V=(inv_q if inv_k is None else inv_k) @ factors.V)
