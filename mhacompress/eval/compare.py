"""Score one model, or an original and its reduced version side by side, on a GLUE task (the library half of
`mhacompress eval` and `mhacompress reduce --eval`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..errors import UsageError, given, named
from ..reduction.config import _int
from .data import Examples, load_examples
from .runner import Outputs, fidelity, is_classifier, run, score
from .tasks import Task, get_task


@dataclass
class Scorer:
    """A task's split, loaded once, and the inference settings; call it on (model, tokenizer)."""

    task: Task
    examples: Examples
    batch_size: int = 64
    max_length: int = 128
    device: str = "cpu"
    on_batch: object = None
    last: Outputs | None = field(default=None, repr=False)

    def __post_init__(self):
        """Settings that would fail deep inside a run (an IndexError for batch_size=-1, a shape error for
        max_length=0), refused in one line before any model runs."""
        self.batch_size = _int("batch_size", self.batch_size, 1)
        self.max_length = _int("max_length", self.max_length, 8)
        if not isinstance(self.task, Task) or not isinstance(self.examples, Examples):
            raise UsageError("Scorer takes a Task and its Examples; build one with Scorer.for_task('mrpc', ...)")
        if self.on_batch is not None and not callable(self.on_batch):
            raise UsageError(f"on_batch must be a function taking a batch size; got {type(self.on_batch).__name__}")
        from ..devices import resolve_device

        self.device = str(resolve_device(self.device))
        limited = self.examples.limited  # else the split itself is that short: --limit cannot help (reduce has none)
        if self.task.regression and len(self.examples) < 2:
            fix = f"pass {given('--limit', 2)} or more" if limited else "score on a split that has at least 2"
            raise UsageError(f"{self.task.name}'s correlations (Pearson, Spearman) need at least 2 examples, got "
                             f"{len(self.examples)} from {self.examples.source}; {fix}")
        labels = self.examples.labels
        if self.task.regression and labels is not None and len(set(labels)) == 1:  # every model would score null
            larger = f", or a larger {named('--limit')}" if limited else ""
            raise UsageError(f"{self.examples.source}: every label is {labels[0]:g}, so {self.task.name}'s "
                             f"correlations are undefined for any model; score on examples whose labels differ "
                             f"(another split{larger})")

    @classmethod
    def for_task(cls, task: str | Task, split: str = "validation", *, data_dir=None, limit=None, **kw) -> "Scorer":
        spec = get_task(task)
        return cls(spec, load_examples(spec, split, data_dir=data_dir, limit=limit), **kw)

    def outputs(self, model, tokenizer, name: str = "the model", **kw) -> Outputs:
        self.last = run(model, tokenizer, self.examples, name=name, batch_size=self.batch_size,
                        max_length=self.max_length, device=self.device, on_batch=self.on_batch, **kw)
        return self.last

    def __call__(self, model, tokenizer, name: str = "the model") -> dict[str, float]:
        return score(self.examples, self.outputs(model, tokenizer, name))

    def drop_interval(self, original: Outputs, reduced: Outputs, metric: str | None = None) -> list[float] | None:
        """The 95% paired bootstrap interval of ``metric``'s (default: the main metric's) drop from ``original`` to
        ``reduced`` (both models' outputs on this split; ``metrics.drop_interval``), or None on a split without
        labels."""
        from .metrics import drop_interval

        labels, metric = self.examples.labels, metric or self.task.main
        return None if labels is None else drop_interval(metric, original.preds, reduced.preds, labels)

    def drop_intervals(self, original: Outputs, reduced: Outputs) -> dict[str, list[float]]:
        """``drop_interval`` of each of the task's metrics that has one (MRPC: F1 and accuracy)."""
        intervals = {m: self.drop_interval(original, reduced, m) for m in self.task.metrics}
        return {m: interval for m, interval in intervals.items() if interval is not None}


def evaluate(model, tokenizer, scorer: Scorer, *, model_name: str, reference=None) -> dict:
    """The `eval --json` object: model, task, split, examples, metrics, seconds (and fidelity with a reference,
    given as (model, tokenizer, name))."""
    start = time.perf_counter()
    if reference is not None and is_classifier(model) != is_classifier(reference[0]):  # before either model runs
        kinds = [("a classifier" if is_classifier(m) else "an encoder") for m in (model, reference[0])]
        raise UsageError(f"cannot compare {kinds[0]} ({model_name}) with {kinds[1]} ({reference[2]}) as the "
                         f"reference; pass the original that {model_name} was reduced from, a model of the same kind")
    if reference is not None and not is_classifier(model):  # encoders are compared by their embeddings
        widths = [_width(m) for m in (model, reference[0])]
        if widths[0] != widths[1]:
            raise UsageError(f"cannot compare {model_name} (embeddings of width {widths[0]}) with the reference "
                             f"{reference[2]} (width {widths[1]}); pass the original that {model_name} was reduced "
                             f"from")
    outputs = scorer.outputs(model, tokenizer, model_name, allow_encoder_any_task=reference is not None)
    scored = lambda out: score(scorer.examples, out) if out.kind == "classifier" or scorer.task.regression else {}  # noqa: E731
    result = {"model": model_name, "task": scorer.task.name, "split": scorer.examples.split,
              "examples": len(scorer.examples), "metrics": scored(outputs)}
    if reference is not None:
        ref_model, ref_tokenizer, ref_name = reference
        ref = scorer.outputs(ref_model, ref_tokenizer, ref_name, allow_encoder_any_task=True)
        result["reference"] = {"model": ref_name, "metrics": scored(ref)}
        main = scorer.task.main
        if main in result["metrics"] and main in result["reference"]["metrics"]:  # as reduce --eval's block says it
            result["reference"]["drop"] = result["reference"]["metrics"][main] - result["metrics"][main]
            interval = scorer.drop_interval(ref, outputs)
            if interval is not None:
                result["reference"]["interval"] = interval
        result["fidelity"] = fidelity(outputs, ref)
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def _width(model) -> int:
    """The width of an encoder's embeddings (hidden_size, or DistilBERT's dim)."""
    from ..reduction.modeling import arch_for

    return getattr(model.config, arch_for(model.config).hidden)


def side_by_side(task: Task, original: dict[str, float], reduced: dict[str, float],
                 intervals: dict[str, list[float]] | None = None) -> dict:
    """The `reduce --json` "eval" block: the main metric before and after, the drop (positive = worse) and, given,
    its 95% paired bootstrap interval; ``all`` holds every metric of both and, given, each one's drop interval
    (``Scorer.drop_intervals``)."""
    metric, intervals = task.main, intervals or {}
    block = {"task": task.name, "metric": metric, "original": original[metric], "reduced": reduced[metric],
             "drop": original[metric] - reduced[metric]}
    if metric in intervals:
        block["interval"] = intervals[metric]
    return {**block, "all": {"original": original, "reduced": reduced, **({"intervals": intervals} if intervals
                                                                           else {})}}


def gated(block: dict, max_drop: float) -> dict:
    """``block`` (``side_by_side``'s) with the gate of ``reduce --max-drop``: ``passed`` when the drop is at most
    ``max_drop``. An undefined drop (nan: constant predictions or labels) never passes: every comparison with nan is
    False."""
    return {**block, "max_drop": max_drop, "passed": bool(block["drop"] <= max_drop)}
