"""GLUE metrics against values computed by hand."""

import math

import pytest

from mhacompress.eval import metrics as M
from mhacompress.eval.tasks import TASKS, get_task


def test_accuracy_and_f1_by_hand():
    preds, labels = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    assert M.accuracy(preds, labels) == pytest.approx(3 / 5)
    # tp = 2, fp = 1, fn = 1: precision 2/3, recall 2/3, F1 2/3
    assert M.f1(preds, labels) == pytest.approx(2 / 3)


def test_matthews_by_hand():
    preds, labels = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    tp, tn, fp, fn = 2, 1, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert M.matthews(preds, labels) == pytest.approx(expected)  # 1/6
    assert M.matthews([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert M.matthews([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0  # constant predictions: 0, not NaN
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one class everywhere (a short --limit): 0, and nothing on stderr
        assert M.matthews([0, 0, 0], [0, 0, 0]) == 0.0


def test_correlations_of_constant_predictions_are_nan_without_a_warning():
    """A collapsed regression head predicts one value: no correlation (NaN, reported as null), and not scipy's
    ConstantInputWarning with its source line among a command's output."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(M.pearson([0.5] * 4, [1.0, 2.0, 3.0, 4.0]))
        assert math.isnan(M.spearman([0.5] * 4, [1.0, 2.0, 3.0, 4.0]))


def test_pearson_and_spearman_by_hand():
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 4.0]
    # means 2.5 and 3.75; sum of products of deviations 3.5; sums of squares 5 and 4.75
    assert M.pearson(x, y) == pytest.approx(3.5 / math.sqrt(5 * 4.75))
    # ranks of y: 1, 2.5, 4, 2.5 -> Pearson of ranks
    assert M.spearman(x, y) == pytest.approx(M.pearson([1, 2, 3, 4], [1, 2.5, 4, 2.5]))
    assert M.spearman([1, 2, 3], [10, 20, 1000]) == pytest.approx(1.0)


def test_stsb_reports_spearman_and_pearson_each_under_its_own_name():
    """Monotone but far from linear: Spearman is exactly 1, Pearson well below it."""
    preds, labels = [1.0, 2.0, 3.0, 4.0, 100.0], [0.0, 1.0, 2.0, 3.0, 4.0]
    # deviations from the means 22 and 2: products sum to 200; squares sum to 7610 and 10
    scores = M.compute(get_task("stsb"), preds, labels)
    assert scores == {"spearman": pytest.approx(1.0), "pearson": pytest.approx(200 / math.sqrt(7610 * 10))}
    assert scores["pearson"] < 0.73


@pytest.mark.parametrize("task,keys", [("cola", ["matthews"]), ("sst2", ["accuracy"]), ("mrpc", ["f1", "accuracy"]),
                                       ("qqp", ["f1", "accuracy"]), ("stsb", ["spearman", "pearson"]),
                                       ("mnli", ["accuracy"]), ("mnli-mm", ["accuracy"]), ("qnli", ["accuracy"]),
                                       ("rte", ["accuracy"]), ("wnli", ["accuracy"])])
def test_every_task_reports_its_official_metrics(task, keys):
    spec = get_task(task)
    preds = [0.1, 0.9, 0.5, 0.3] if spec.regression else [0, 1, 1, 0]
    labels = [0.0, 1.0, 0.4, 0.5] if spec.regression else [0, 1, 0, 0]
    assert list(M.compute(spec, preds, labels)) == keys
    assert spec.main == keys[0]


def test_task_table_is_complete():
    assert set(TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "mnli-mm", "qnli", "rte", "wnli"}
    assert get_task("SST-2").name == "sst2" and get_task("sts-b").name == "stsb"


# ---- the drop's bootstrap interval ----------------------------------------------------------------------------------

def _rows(seed, regression=False, classes=2, n=60):
    """(B, N) predictions and labels with ties, all-one-class rows and constant rows among them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if regression:
        labels = rng.integers(0, 6, (8, n)).astype(float)  # ties, as STS-B's scores have
        preds = labels + rng.normal(0, 1.5, (8, n))
        preds[0] = 2.5  # a collapsed head
        return preds, labels
    labels = rng.integers(0, classes, (8, n))
    preds = np.where(rng.random((8, n)) < 0.7, labels, rng.integers(0, classes, (8, n)))
    preds[0], labels[1], preds[2] = 1, 0, 0  # all "positive"; no positive label; no positive prediction
    preds[3], labels[3] = 0, 0  # no positive anywhere: F1 0 (zero_division), MCC 0
    return preds, labels


@pytest.mark.parametrize("metric,kind", [("accuracy", {}), ("f1", {}), ("matthews", {}), ("matthews", {"classes": 3}),
                                         ("pearson", {"regression": True}), ("spearman", {"regression": True})])
def test_each_batched_metric_equals_the_official_one_row_by_row(metric, kind):
    preds, labels = _rows(7, **kind)
    batched = M.BATCHED[metric](preds, labels)
    official = [M.METRICS[metric](p, y) for p, y in zip(preds, labels)]
    assert batched == pytest.approx(official, abs=1e-12, nan_ok=True)


def _reference_interval(metric, a, b, y, resamples):
    """scipy.stats.bootstrap over the official (scikit-learn, scipy) metric, one resample at a time."""
    import numpy as np
    from scipy.stats import bootstrap

    f = M.METRICS[metric]
    result = bootstrap((a, b, y), lambda o, r, t: f(o, t) - f(r, t), paired=True, vectorized=False,
                       n_resamples=resamples, method="percentile", rng=np.random.default_rng(0))
    return [result.confidence_interval.low, result.confidence_interval.high]


@pytest.mark.parametrize("metric", ["accuracy", "f1", "matthews", "spearman"])
def test_the_drop_interval_is_the_paired_bootstrap_of_the_official_metric(metric):
    import numpy as np

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 80) if metric != "spearman" else rng.integers(0, 6, 80).astype(float)
    a = np.where(rng.random(80) < 0.8, y, 1 - y) if metric != "spearman" else y + rng.normal(0, 1, 80)
    b = np.where(rng.random(80) < 0.9, a, 1 - a) if metric != "spearman" else a + rng.normal(0, 1, 80)
    interval = M.drop_interval(metric, a, b, y, resamples=200)
    assert interval == pytest.approx(_reference_interval(metric, a, b, y, 200), abs=1e-12)
    assert interval[0] < M.METRICS[metric](a, y) - M.METRICS[metric](b, y) < interval[1]
    assert M.drop_interval(metric, a, b, y, resamples=200) == interval  # seeded: the same inputs, the same interval


def test_the_drop_interval_is_paired_not_two_independent_samples():
    """The same draw for both models: two models that differ on 2 of 400 examples have a drop near 0 whose interval
    is narrow, although each model's own accuracy varies by several points from one resample to the next."""
    import numpy as np

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    a = np.where(rng.random(400) < 0.8, y, 1 - y)
    b = a.copy()
    b[:2] = 1 - b[:2]
    low, high = M.drop_interval("accuracy", a, b, y)
    # the drop moves by 1/400 per draw of a differing example (about Poisson(2) of them per resample), while two
    # independent resamples of 80% accuracy would spread it over about +-5.5 points
    assert 0 < high - low <= 8 / 400
    assert M.drop_interval("accuracy", a, a, y) == [0.0, 0.0]


def test_an_undefined_drop_has_no_interval():
    collapsed, working, labels = [0.5] * 6, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [1.0, 3.0, 2.0, 5.0, 4.0, 6.0]
    assert M.drop_interval("spearman", collapsed, working, labels) is None
    assert M.drop_interval("accuracy", [1], [0], [1]) is None  # one example: nothing to resample
