"""Reduce and score one model at many (method, key dim) settings in one run: the original is loaded, calibrated and
scored once; every setting reduces a fresh copy of it."""

from __future__ import annotations

import copy
import os
import time
from typing import Callable

from .compress.config import ReductionConfig
from .compress.surgery import model_shape, reduce_


def check_grid(model, methods: list[str], key_dims: list[int]) -> None:
    """Refuse impossible settings before any work (key dims out of range, svd dims not a multiple of H)."""
    layers, heads, head_dim = model_shape(model)
    for method in methods:
        for k in key_dims:
            ReductionConfig(key_dim=k, method=method).layer_key_dims(layers, heads, head_dim)


def sweep(model, tokenizer, scorer, methods: list[str], key_dims: list[int], *, moments=None, seed: int = 0,
          on_step: Callable[[str], None] | None = None) -> dict:
    """Score the original, then each (method, key dim) reduction of a copy of ``model``. ``scorer`` is an
    eval.compare.Scorer; ``moments`` calibration second moments (from the original) or None."""
    check_grid(model, methods, key_dims)
    metric = scorer.task.main
    start = time.perf_counter()
    original = scorer(model, tokenizer, "the original")
    qk_before = None
    rows = []
    for method in methods:
        for key_dim in key_dims:
            t = time.perf_counter()
            reduced = copy.deepcopy(model)
            block = reduce_(reduced, ReductionConfig(key_dim=key_dim, method=method, seed=seed), moments=moments)
            scores = scorer(reduced, tokenizer, f"{method} at key dim {key_dim}")
            layers = block["layers"]
            qk_before = sum(x["qk_params_before"] for x in layers)
            rows.append({
                "method": method, "key_dim": key_dim, "metric": metric, "score": scores[metric],
                "drop": original[metric] - scores[metric], "metrics": scores,
                "qk_params": sum(x["qk_params_after"] for x in layers),
                "mean_relative_error": sum(x["relative_error"] for x in layers) / len(layers),
                **({"mean_expected_score_error": sum(x["expected_score_error"] for x in layers) / len(layers)}
                   if moments is not None else {}),
                "seconds": round(time.perf_counter() - t, 3),
            })
            del reduced
            if on_step:
                on_step(f"{method} {key_dim}")
    return {"task": scorer.task.name, "metric": metric, "examples": len(scorer.examples),
            "original": {"score": original[metric], "metrics": original, "qk_params": qk_before},
            "results": rows, "seconds": round(time.perf_counter() - start, 3)}


def plot(result: dict, path) -> None:
    """Score vs key dim and vs Q/K parameters, one line per method, the original as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    methods = sorted({r["method"] for r in result["results"]}, key=["cp", "tucker", "svd"].index)
    for method in methods:
        rows = sorted((r for r in result["results"] if r["method"] == method), key=lambda r: r["key_dim"])
        axes[0].plot([r["key_dim"] for r in rows], [r["score"] for r in rows], "o-", label=method)
        axes[1].plot([r["qk_params"] / 1e6 for r in rows], [r["score"] for r in rows], "o-", label=method)
    original = result["original"]
    for ax, xlabel in zip(axes, ("key dim D~k", "Q/K parameters (millions)")):
        ax.axhline(original["score"], color="gray", ls="--", label="original")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{result['task']} {result['metric']}")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_xscale("log", base=2)
    if original.get("qk_params"):
        axes[1].axvline(original["qk_params"] / 1e6, color="gray", ls=":")
    fig.suptitle(f"{result.get('model', '')}: {result['task']} ({result['examples']} examples), no retraining")
    from .fsio import atomic_file

    with atomic_file(path) as tmp:  # the format from the name the user gave, not the temporary one's
        fig.savefig(tmp, dpi=120, format=os.path.splitext(path)[1][1:] or "png")
    plt.close(fig)

