"""What a model's attention scores look like before any reduction: the spectrum of every head's A_h = W_q^h^T W_k^h,
the spectra of the stacked tensor T (H, d, d)'s three unfoldings, effective ranks, the CP error curve over key dims,
and the low-rank bottleneck (Bhojanapalli et al. 2020: a head's T x T score matrix has rank <= dh).

Pure functions of the weights, plus ``analyze_model`` that walks a model's layers; nothing is printed or drawn here
(the ``analyze`` command renders). T is never built: everything comes from (d, d), (H, H) or (H, dh, dh) matrices.
Computed in float64, like the decompositions.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import named
from .allocate import cp_error_curve
from .decompose import head_cores, mode_gram, solving_layer

Tensor = torch.Tensor
RANK_RTOL = 1e-7  # a singular value below this fraction of its head's largest does not count towards the rank


def _f64(wq: Tensor, wk: Tensor) -> tuple[Tensor, Tensor]:
    assert wq.shape == wk.shape and wq.ndim == 2, f"wq {tuple(wq.shape)} and wk {tuple(wk.shape)} must match"
    return wq.detach().to(torch.float64), wk.detach().to(torch.float64)


def head_spectra(wq: Tensor, wk: Tensor, num_heads: int) -> Tensor:
    """Singular values of every A_h (H, dh), descending: the SVD of the (dh, dh) thin-QR core, not of A_h (d, d)."""
    wq, wk = _f64(wq, wk)
    _, core, _ = head_cores(wq, wk, num_heads)  # (H, dh, dh)
    return torch.linalg.svdvals(core)  # (H, dh)


def head_gram(wq: Tensor, wk: Tensor, num_heads: int) -> Tensor:
    """<A_h, A_g> (H, H) = sum_ij (W_q W_q^T)[hi, gj] (W_k W_k^T)[hi, gj]: the Gram matrix of T's mode-0 unfolding."""
    wq, wk = _f64(wq, wk)
    H, dh = num_heads, wq.shape[0] // num_heads
    gq = (wq @ wq.T).view(H, dh, H, dh)  # W_q^h W_q^g^T   (H, dh, H, dh)
    gk = (wk @ wk.T).view(H, dh, H, dh)
    return (gq * gk).sum((1, 3))  # (H, H)


def gram_spectrum(gram: Tensor) -> Tensor:
    """Singular values of a matrix X from its Gram matrix X X^T, descending (tiny negative eigenvalues are zero)."""
    return torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0).sqrt()


def unfolding_spectra(wq: Tensor, wk: Tensor, num_heads: int) -> dict[str, Tensor]:
    """Singular values of T's unfoldings: ``heads`` (mode 0, H x d^2: how alike the heads are), ``query`` (mode 1,
    d x Hd: the query-side subspace all heads use) and ``key`` (mode 2). Each squares-sums to ||T||_F^2."""
    wq, wk = _f64(wq, wk)
    return {
        "heads": gram_spectrum(head_gram(wq, wk, num_heads)),  # (H,)
        "query": gram_spectrum(mode_gram(wq, wk, num_heads)),  # sum_h A_h A_h^T   (d,)
        "key": gram_spectrum(mode_gram(wk, wq, num_heads)),  # sum_h A_h^T A_h   (d,)
    }


def effective_rank(s: Tensor) -> float:
    """Roy & Vetterli (2007): exp of the Shannon entropy of s / sum(s). n equal values give n; one value gives 1."""
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def tail_error(s: Tensor, keep: int) -> float:
    """sqrt(sum_{i >= keep} s_i^2 / sum s_i^2): the relative error of the best rank-``keep`` approximation."""
    s2 = s.to(torch.float64) ** 2
    return float((s2[keep:].sum() / s2.sum()).sqrt()) if s2.sum() > 0 else 0.0


def svd_error_curve(spectra: Tensor, dims: list[int]) -> dict[int, float]:
    """Per-head truncated SVD (the baseline) at each key dim that is a multiple of H: r = k / H per head.
    Exact from the head spectra (H, dh)."""
    H = spectra.shape[0]
    s2 = spectra**2  # (H, dh)
    return {k: float((s2[:, k // H:].sum() / s2.sum()).sqrt()) for k in dims if k % H == 0}


def shared_bound(unfolded: dict[str, Tensor], dims: list[int]) -> dict[int, float]:
    """A lower bound on the error of ANY key dim k model with shared projections (CP, Tucker-2): its mode-1 and
    mode-2 unfoldings have rank <= k, so it cannot beat the truncated SVD of either."""
    return {k: max(tail_error(unfolded["query"], k), tail_error(unfolded["key"], k)) for k in dims}


def _rounded(x: Tensor) -> list:
    """A tensor as (nested) lists of floats with 6 significant digits: JSON-sized, plot-exact."""
    return [float(f"{v:.6g}") for v in x.tolist()] if x.ndim == 1 else [_rounded(row) for row in x]


def analyze_layer(wq: Tensor, wk: Tensor, num_heads: int, seq_len: int) -> tuple[dict, Tensor, dict[str, Tensor]]:
    """One layer's report (spectra, effective ranks, bottleneck flag; no CP curve), its head spectra (H, dh) and
    unfolding spectra."""
    spectra = head_spectra(wq, wk, num_heads)  # (H, dh)
    unfolded = unfolding_spectra(wq, wk, num_heads)
    ranks = (spectra > RANK_RTOL * spectra[:, :1]).sum(1)  # (H,) numerical rank of each A_h, <= dh
    limit = spectra.shape[1]  # scores (X W_q^h^T + 1 b_q^T)(X W_k^h^T + 1 b_k^T)^T: rank <= dh, biases included
    return {
        "norm": float(spectra.square().sum().sqrt()),
        "head_spectra": _rounded(spectra),
        "head_effective_rank": [round(effective_rank(s), 3) for s in spectra],
        "head_rank": ranks.tolist(),
        "rank_limit": limit,  # every head's T x T score matrix has at most this rank
        "bottleneck": limit < seq_len,
        "unfolding_spectra": {mode: _rounded(s) for mode, s in unfolded.items()},
        "unfolding_effective_rank": {mode: round(effective_rank(s), 3) for mode, s in unfolded.items()},
    }, spectra, unfolded


def analyze_model(model, key_dims: list[int] | None = None, seq_len: int = 128, curve: bool = True,
                  on_step: Callable[[], None] | None = None) -> dict:
    """The analysis report of every self-attention layer of an original (not reduced) model.

    ``key_dims``: where to evaluate the error curves (default ``allocate.candidate_dims``); ``seq_len``: the sequence
    length the user evaluates at, compared with each layer's per-head rank limit; ``curve=False`` skips the CP
    curve (the only slow part). ``on_step`` is called once per layer and once per (layer, key dim) of the curve.
    """
    from ..errors import UsageError
    from .allocate import candidate_dims
    from .config import ConfigError
    from .modeling import CollaborativeSelfAttention, arch_for, attention_modules
    from .surgery import check_finite_weights, model_shape

    arch = arch_for(model.config)
    check_finite_weights(model)
    num_layers, H, dh = model_shape(model)
    top = H * dh
    dims = sorted(set(key_dims or candidate_dims(H, dh, "cp")))
    if not all(1 <= k <= top for k in dims):
        raise ConfigError(f"key dims must be in 1..{top} ({H} heads x {dh}); got {','.join(map(str, dims))}")
    layers = []
    for index, (_, _, module) in enumerate(attention_modules(model)):
        if isinstance(module, CollaborativeSelfAttention):
            raise UsageError("this model is already reduced; analyze the original checkpoint it was made from")
        wq, wk = getattr(module, arch.query).weight, getattr(module, arch.key).weight
        report, spectra, unfolded = analyze_layer(wq, wk, H, seq_len)
        if on_step:
            on_step()
        if curve:
            with solving_layer(index, fix=f"pass {named('--no-curve', 'curve=False')} to skip the CP error curve"):
                report["cp_error"] = cp_error_curve(wq.detach().double(), wk.detach().double(), H, dims,
                                                    on_step=on_step)
            report["svd_error"] = svd_error_curve(spectra, dims)
            report["shared_bound"] = shared_bound(unfolded, dims)
        layers.append({"index": index, **report})
    flagged = [x["index"] for x in layers if x["bottleneck"]]
    return {
        "num_layers": num_layers, "heads": H, "head_dim": dh, "hidden": top, "seq_len": seq_len,
        "key_dims": dims if curve else [],
        "bottleneck": {"layers": flagged, "rank_limit": min((x["rank_limit"] for x in layers), default=dh)},
        "warnings": [_bottleneck_warning(flagged, layers, seq_len)] if flagged else [],
        "layers": layers,
    }


def _bottleneck_warning(flagged: list[int], layers: list[dict], seq_len: int) -> str:
    limit = max(layers[i]["rank_limit"] for i in flagged)
    which = "every layer" if len(flagged) == len(layers) else "layers " + ", ".join(map(str, flagged))
    return (f"low-rank bottleneck in {which}: a head's score matrix has rank <= {limit} (its head dim) but "
            f"the sequence length is {seq_len}, so no head can express an arbitrary {seq_len} x {seq_len} attention "
            f"pattern (Bhojanapalli et al. 2020)")
