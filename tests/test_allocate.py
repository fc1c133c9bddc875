"""Per-layer key dims under a budget: the budget is respected and the choice beats a uniform one."""

import pytest

from conftest import tiny_model
from mhacompress.reduction.allocate import allocate, budget_key_dims, candidate_dims
from mhacompress.reduction.config import ConfigError, ReductionConfig
from mhacompress.reduction.cost import LayerShape, qk_params
from mhacompress.reduction.surgery import reduce_


def test_candidate_dims():
    assert candidate_dims(12, 32, "cp") == [12, 24, 48, 96, 144, 192, 240, 288, 336, 384]
    assert all(k % 12 == 0 for k in candidate_dims(12, 64, "svd"))
    assert candidate_dims(4, 8, "cp")[-1] == 32


def test_allocation_gives_dims_to_the_layer_that_needs_them():
    steep = {8: 0.9, 16: 0.5, 24: 0.1, 32: 0.0}  # a layer whose error falls fast with key dim
    flat = {8: 0.30, 16: 0.28, 24: 0.27, 32: 0.0}
    cost = lambda k: k  # noqa: E731
    dims = allocate([steep, flat], cost, budget=32)
    assert dims == [24, 8]
    uniform = steep[16] ** 2 + flat[16] ** 2
    assert steep[24] ** 2 + flat[8] ** 2 < uniform
    assert sum(cost(k) for k in dims) <= 32


def test_allocation_is_exact_on_a_small_case():
    import itertools

    curves = [{1: 0.9, 2: 0.4, 3: 0.35}, {1: 0.5, 2: 0.45, 3: 0.1}, {1: 0.6, 2: 0.2, 3: 0.19}]
    cost = lambda k: 3 * k + 1  # noqa: E731
    for budget in range(12, 31):  # 12: the smallest dims
        feasible = [c for c in itertools.product(*[sorted(x) for x in curves]) if sum(map(cost, c)) <= budget]
        best = min(sum(curves[i][k] ** 2 for i, k in enumerate(c)) for c in feasible)
        dims = allocate(curves, cost, budget)
        assert sum(map(cost, dims)) <= budget
        assert sum(curves[i][k] ** 2 for i, k in enumerate(dims)) == pytest.approx(best)


def test_too_small_a_budget_is_refused():
    with pytest.raises(ConfigError, match="raise budget"):
        allocate([{8: 0.1}], lambda k: k, budget=4)


def test_budget_on_a_model_and_reload_shapes():
    model = tiny_model("bert")
    config = ReductionConfig(key_dim=1)
    dims, curves = budget_key_dims(model, config, 0.5)
    original = 2 * (2 * (32 * 32 + 32))
    assert sum(qk_params(LayerShape(32, 4, "cp", k)) for k in dims) <= 0.5 * original
    assert len(curves) == 2 and all(curve[32] < 1e-9 for curve in curves)
    block = reduce_(model, ReductionConfig(key_dims=tuple(dims)))
    assert [x["key_dim"] for x in block["layers"]] == dims


@pytest.mark.parametrize("budget", [0, 1.5])
def test_budget_must_be_a_fraction(budget):
    with pytest.raises(ConfigError, match="0 < F <= 1"):
        budget_key_dims(tiny_model("bert"), ReductionConfig(key_dim=1), budget)
