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


def compute(task: Task, preds, labels) -> dict[str, float]:
    """The task's official metrics; ``preds`` are class indices, or scores for STS-B."""
    assert len(preds) == len(labels), f"{len(preds)} predictions for {len(labels)} labels"
    return {name: METRICS[name](preds, labels) for name in task.metrics}
