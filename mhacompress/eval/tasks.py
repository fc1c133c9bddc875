"""The GLUE tasks as data: where their text and labels live (local glue_data/ TSV and the `nyu-mll/glue` hub copy),
their label names (class index i is the hub's label i) and their official metrics."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Task:
    name: str                     # what the user types: cola, sst2, ..., mnli, mnli-mm
    folder: str                   # glue_data/<folder>/
    hub_config: str               # nyu-mll/glue configuration
    text: tuple                   # TSV columns of the one or two texts (names, or indices when there is no header)
    label: str | int              # TSV column of the label
    hub_text: tuple[str, ...]     # the same fields in the hub copy
    labels: tuple[str, ...] | None  # class names in hub order; None: regression (STS-B)
    metrics: tuple[str, ...]      # official metrics, the main one first
    files: tuple[tuple[str, str, str], ...] = (("train", "train.tsv", "train"), ("validation", "dev.tsv", "validation"),
                                               ("test", "test.tsv", "test"))  # (split, local file, hub split)
    header: bool = True
    skip_malformed: bool = False  # the official QQP train file has a few broken rows; the hub loader skips them too
    scale: tuple[float, float] | None = None  # a regression label's range (STS-B: similarity 0..5)

    @property
    def main(self) -> str:
        return self.metrics[0]

    @property
    def regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    def split(self, name: str) -> tuple[str, str]:
        """(local file, hub split) of a split, named in any case; ``dev`` is an alias of ``validation``."""
        name = canonical_split(name)
        for split, local, hub in self.files:
            if split == name:
                return local, hub
        raise ConfigError(f"{self.name} has no split {name!r}; choose one of {', '.join(s for s, _, _ in self.files)}")


def canonical_split(name: str) -> str:
    """``train``, ``validation`` or ``test`` from any spelling a user types (``DEV``, `` Validation``)."""
    name = name.strip().lower() if isinstance(name, str) else name
    return {"dev": "validation"}.get(name, name)


_NLI = ("entailment", "not_entailment")
_MNLI_FILES = lambda which: (("train", "train.tsv", "train"),  # noqa: E731
                             ("validation", f"dev_{which}.tsv", f"validation_{which}"),
                             ("test", f"test_{which}.tsv", f"test_{which}"))

TASKS: dict[str, Task] = {t.name: t for t in (
    Task("cola", "CoLA", "cola", (3,), 1, ("sentence",), ("unacceptable", "acceptable"), ("matthews",), header=False),
    Task("sst2", "SST-2", "sst2", ("sentence",), "label", ("sentence",), ("negative", "positive"), ("accuracy",)),
    Task("mrpc", "MRPC", "mrpc", ("#1 String", "#2 String"), "Quality", ("sentence1", "sentence2"),
         ("not_equivalent", "equivalent"), ("f1", "accuracy")),
    Task("stsb", "STS-B", "stsb", ("sentence1", "sentence2"), "score", ("sentence1", "sentence2"), None,
         ("spearman", "pearson"), scale=(0.0, 5.0)),
    Task("qqp", "QQP", "qqp", ("question1", "question2"), "is_duplicate", ("question1", "question2"),
         ("not_duplicate", "duplicate"), ("f1", "accuracy"), skip_malformed=True),
    Task("mnli", "MNLI", "mnli", ("sentence1", "sentence2"), "gold_label", ("premise", "hypothesis"),
         ("entailment", "neutral", "contradiction"), ("accuracy",), files=_MNLI_FILES("matched")),
    Task("mnli-mm", "MNLI", "mnli", ("sentence1", "sentence2"), "gold_label", ("premise", "hypothesis"),
         ("entailment", "neutral", "contradiction"), ("accuracy",), files=_MNLI_FILES("mismatched")),
    Task("qnli", "QNLI", "qnli", ("question", "sentence"), "label", ("question", "sentence"), _NLI, ("accuracy",)),
    Task("rte", "RTE", "rte", ("sentence1", "sentence2"), "label", ("sentence1", "sentence2"), _NLI, ("accuracy",)),
    Task("wnli", "WNLI", "wnli", ("sentence1", "sentence2"), "label", ("sentence1", "sentence2"),
         ("not_entailment", "entailment"), ("accuracy",)),
)}
ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli_matched": "mnli", "mnli_mismatched": "mnli-mm"}


def get_task(name: str | Task) -> Task:
    """The task called ``name`` (case-insensitive; aliases such as sst-2), or ``name`` itself when it is a Task."""
    if isinstance(name, Task):
        return name
    if not isinstance(name, str):
        raise ConfigError(f"the task must be a GLUE task name ({', '.join(TASKS)}); got {type(name).__name__}")
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[key]
