"""GLUE's official metrics, computed locally (scikit-learn, scipy): never a metric script fetched from a hub."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np

from .tasks import Task


def accuracy(preds, labels) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    return float((preds == labels).mean())


def f1(preds, labels) -> float:
    """Binary F1 of the positive class (1: equivalent / duplicate), as GLUE reports for MRPC and QQP."""
    from sklearn.metrics import f1_score

    return float(f1_score(labels, preds, pos_label=1, average="binary", zero_division=0))


def matthews(preds, labels) -> float:
    from sklearn.metrics import matthews_corrcoef

    with warnings.catch_warnings():  # one class in both (a short --limit): 0, without scikit-learn's UserWarning
        warnings.filterwarnings("ignore", "A single label was found", UserWarning)
        return float(matthews_corrcoef(labels, preds))


def pearson(preds, labels) -> float:
    from scipy.stats import pearsonr

    with _constant_allowed():
        return float(pearsonr(preds, labels)[0])


def spearman(preds, labels) -> float:
    from scipy.stats import spearmanr

    with _constant_allowed():
        return float(spearmanr(preds, labels)[0])


@contextmanager
def _constant_allowed():
    """Constant predictions (a collapsed regression head) have no correlation: NaN, reported as null, not scipy's
    ConstantInputWarning with its source line on stderr."""
    from scipy.stats import ConstantInputWarning, NearConstantInputWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        warnings.simplefilter("ignore", NearConstantInputWarning)
        yield


METRICS = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}


# ---- the same metrics over many resamples at once: rows of (B, N) arrays -> (B,) --------------------------------
# Only for the bootstrap interval of a drop (scikit-learn's metrics cost milliseconds a call, and an interval takes a
# thousand); tests/test_glue_metrics.py holds each to the official one above.


def _batched_accuracy(preds, labels):
    return (preds == labels).mean(axis=-1)


def _batched_f1(preds, labels):
    tp = ((preds == 1) & (labels == 1)).sum(axis=-1)
    wrong = (preds != labels).sum(axis=-1)  # false positives + false negatives
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(2 * tp + wrong > 0, 2 * tp / (2 * tp + wrong), 0.0)  # zero_division=0, as f1 above


def _batched_matthews(preds, labels):
    classes = np.union1d(np.unique(preds), np.unique(labels))
    p = np.stack([(preds == c).sum(axis=-1) for c in classes], axis=-1)  # (B, K) predicted counts
    t = np.stack([(labels == c).sum(axis=-1) for c in classes], axis=-1)  # (B, K) true counts
    n, correct = preds.shape[-1], (preds == labels).sum(axis=-1)
    cov_pt, cov_pp, cov_tt = correct * n - (p * t).sum(-1), n * n - (p * p).sum(-1), n * n - (t * t).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cov_pp * cov_tt > 0, cov_pt / np.sqrt(cov_pp * cov_tt.astype(float)), 0.0)  # as sklearn


def _batched_pearson(preds, labels):
    a = preds - preds.mean(axis=-1, keepdims=True)
    b = labels - labels.mean(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):  # a constant resample: nan, as pearson above
        return (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))


def _batched_spearman(preds, labels):
    from scipy.stats import rankdata

    return _batched_pearson(rankdata(preds, axis=-1), rankdata(labels, axis=-1))  # ties: average ranks, as spearmanr


BATCHED = {"accuracy": _batched_accuracy, "f1": _batched_f1, "matthews": _batched_matthews,
           "pearson": _batched_pearson, "spearman": _batched_spearman}


def drop_interval(metric: str, original, reduced, labels, *, confidence: float = 0.95, resamples: int = 1000,
                  seed: int = 0) -> list[float] | None:
    """The paired bootstrap interval of ``metric(original) - metric(reduced)`` (the drop; ``original`` and
    ``reduced`` are both models' predictions on the same examples): the examples are drawn with replacement, the
    same draw for both models, ``resamples`` times (percentile method, scipy.stats.bootstrap, seeded: the same
    inputs give the same interval). It says how much of a drop the split's size alone could make or hide. None where
    the drop is undefined on some resample (constant predictions), or for a single example."""
    import warnings

    from scipy.stats import bootstrap

    statistic = BATCHED[metric]
    data = tuple(np.asarray(x, dtype=float) for x in (original, reduced, labels))
    if len(data[2]) < 2:  # one example: nothing to resample
        return None
    with warnings.catch_warnings():  # a degenerate distribution: reported as None below, not as scipy's warning
        warnings.simplefilter("ignore")
        result = bootstrap(data, lambda o, r, y, axis=-1: statistic(o, y) - statistic(r, y), paired=True,
                           vectorized=True, n_resamples=resamples, batch=max(1, 2_000_000 // max(len(data[2]), 1)),
                           confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return [low, high] if np.isfinite(low) and np.isfinite(high) else None


def compute(task: Task, preds, labels) -> dict[str, float]:
    """The task's official metrics; ``preds`` are class indices, or scores for STS-B."""
    assert len(preds) == len(labels), f"{len(preds)} predictions for {len(labels)} labels"
    return {name: METRICS[name](preds, labels) for name in task.metrics}
