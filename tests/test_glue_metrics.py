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
