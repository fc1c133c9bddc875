"""Per-layer key dims under a global budget: measure each layer's error curve, then pick the dims that minimise the
total (squared) error for the Q/K parameters allowed. The choice is exact (a Pareto-front dynamic programme)."""

from __future__ import annotations

from typing import Callable

from ..errors import named
from . import methods
from .config import ConfigError
from .cost import LayerShape, qk_params


def candidate_dims(heads: int, head_dim: int, method: str, count: int = 8) -> list[int]:
    """About ``count`` evenly spaced key dims up to H*dh, plus the small powers-of-two fractions (only those the
    method accepts: svd takes multiples of H)."""
    top = heads * head_dim
    step = max(heads, (top // count) // heads * heads)
    dims = set(range(step, top + 1, step)) | {top >> j for j in range(1, 6)} | {top}
    spec = methods.get(method)
    return sorted(k for k in dims if k >= 1 and spec.check_key_dim(k, heads, head_dim) is None)


def allocate(curves: list[dict[int, float]], cost: Callable[[int], int], budget: int) -> list[int]:
    """The key dim of each layer minimising sum of squared errors with total ``cost`` <= ``budget``.

    ``curves[l][k]`` is layer l's error at key dim k. Exact: the cheapest way to reach every achievable total error
    is kept layer by layer (states dominated in both cost and error are dropped)."""
    front: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]  # (cost, error, dims so far)
    for curve in curves:
        states = [(c + cost(k), e + err**2, dims + (k,)) for c, e, dims in front for k, err in curve.items()]
        states = sorted((s for s in states if s[0] <= budget), key=lambda s: (s[0], s[1]))
        front, best = [], float("inf")
        for state in states:  # increasing cost: keep only states that lower the error
            if state[1] < best - 1e-15:
                front.append(state)
                best = state[1]
        if not front:
            smallest = sum(cost(min(c)) for c in curves)
            raise ConfigError(f"the budget allows {budget:,} Q/K parameters, but the smallest key dims need "
                              f"{smallest:,}; raise {named('--budget')}")
    return list(min(front, key=lambda s: s[1])[2])


def error_curves(model, config, moments=None, dims: list[int] | None = None,
                 on_step: Callable[[], None] | None = None) -> list[dict[int, float]]:
    """Each layer's error at each candidate key dim: the expected score error with calibration ``moments``, else the
    weight error. Solved with at most 30 ALS sweeps: curves rank the choices, the final reduction refines them."""
    from dataclasses import replace

    from .calibrate import whiten
    from .decompose import solving_layer
    from .modeling import arch_for, attention_modules
    from .surgery import decompose_layer, model_shape

    arch = arch_for(model.config)
    _, heads, head_dim = model_shape(model)
    dims = dims or candidate_dims(heads, head_dim, config.method)
    quick = replace(config, n_iter_max=min(config.n_iter_max, 30))
    curves = []
    for index, (_, _, module) in enumerate(attention_modules(model)):
        wq, wk = getattr(module, arch.query).weight.detach(), getattr(module, arch.key).weight.detach()
        with solving_layer(index):
            # same numbers as one decomposition per key dim, with one init (and whitening) per layer
            if config.method == "cp" and config.init == "svd" and config.solver == "structured":
                if moments is not None:
                    wq, wk, _, _ = whiten(wq, wk, moments[index])
                curves.append(cp_error_curve(wq, wk, heads, dims, n_iter_max=quick.n_iter_max, tol=quick.tol,
                                             on_step=on_step))
                continue
            curve = {}
            for k in dims:
                _, report = decompose_layer(wq, wk, heads, k, quick, None if moments is None else moments[index])
                curve[k] = report.get("expected_score_error", report["relative_error"])
                if on_step:
                    on_step()
        curves.append(curve)
    return curves


def cp_error_curve(wq, wk, num_heads: int, dims: list[int], *, n_iter_max: int = 30, tol: float = 1e-5,
                   on_step: Callable[[], None] | None = None) -> dict[int, float]:
    """CP relative error at each key dim, SVD-initialised, exactly as one ``decompose(..., init="svd")`` per key
    dim would give, faster: the SVD init of every key dim is a prefix of the largest one's, so T's two (d, d)
    eigendecompositions are done once instead of once per key dim."""
    from .decompose import cp_als, cp_exact, cp_init

    full = wq.shape[0]
    largest = max((k for k in dims if k < full), default=0)
    U0, V0 = cp_init(wq, wk, num_heads, largest) if largest else (None, None)  # (d, largest) each
    curve = {}
    for k in dims:
        if k == full:  # what cp_als returns at full rank
            curve[k] = cp_exact(wq, wk, num_heads).relative_error
        else:
            init = (U0[:, :k], V0[:, :k])
            curve[k] = cp_als(wq, wk, num_heads, k, n_iter_max=n_iter_max, tol=tol, init=init).relative_error
        if on_step:
            on_step()
    return curve


def budget_parameters(model, method: str, budget: float) -> tuple[int, Callable[[int], int]]:
    """(Q/K parameters ``budget`` allows, a layer's Q/K parameters at key dim k). A budget too small for the
    smallest key dims is refused here, before any error curve is measured."""
    from .modeling import arch_for, attention_modules
    from .surgery import model_shape, qk_parameters

    if not 0 < budget <= 1:
        raise ConfigError(f"{named('--budget')} is a fraction of the original Q/K parameters: 0 < F <= 1, got {budget}")
    arch = arch_for(model.config)
    layers, heads, head_dim = model_shape(model)
    original = sum(qk_parameters(m, arch) for _, _, m in attention_modules(model))
    cost = lambda k: qk_params(LayerShape(heads * head_dim, heads, method, k))  # noqa: E731
    allowed, smallest = int(budget * original), layers * cost(min(candidate_dims(heads, head_dim, method)))
    if smallest > allowed:
        raise ConfigError(f"the budget allows {allowed:,} Q/K parameters, but the smallest key dims need "
                          f"{smallest:,}; raise {named('--budget')} to at least {smallest / original:.3g}")
    return allowed, cost


def budget_key_dims(model, config, budget: float, moments=None, on_step=None) -> tuple[list[int], list[dict]]:
    """Key dims keeping ``budget`` (0 < budget <= 1) of the original Q/K parameters with the smallest total error;
    also the curves they were chosen from."""
    allowed, cost = budget_parameters(model, config.method, budget)
    curves = error_curves(model, config, moments, on_step=on_step)
    return allocate(curves, cost, allowed), curves
