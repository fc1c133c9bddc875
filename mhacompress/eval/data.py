"""GLUE examples from a local glue_data/ folder (the official TSV layout) or from the `nyu-mll/glue` hub copy."""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, UsageError, given, named
from ..fsio import read_text
from .tasks import Task, canonical_split, get_task

ENV_DIR = "MHACOMPRESS_GLUE_DIR"
HUB_DATASET = "nyu-mll/glue"


@dataclass
class Examples:
    """One split of one task: ``texts[i]`` is a tuple of one or two strings; ``labels`` are class indices (in the
    task's label order), floats for STS-B, or None when the split has no labels (test files)."""

    task: Task
    split: str
    texts: list[tuple[str, ...]]
    labels: list | None
    source: str  # the file or hub split read
    limited: bool = False  # a subset (--limit): the split itself has more

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, limit: int | None, *, seed: int | None = None) -> "Examples":
        """The first ``limit`` examples, or a random sample of them when ``seed`` is given."""
        if limit is None or limit >= len(self):
            return self
        idx = sorted(random.Random(seed).sample(range(len(self)), limit)) if seed is not None else range(limit)
        labels = None if self.labels is None else [self.labels[i] for i in idx]
        return Examples(self.task, self.split, [self.texts[i] for i in idx], labels, self.source, limited=True)


def check_data_dir(data_dir) -> None:
    """Refuse a ``data_dir`` that is not a path, or is empty: Path('') is the current folder, which would be read
    as if it had been named. (An empty $MHACOMPRESS_GLUE_DIR is taken as unset, like any empty variable.)"""
    if data_dir is None:
        return
    if not isinstance(data_dir, (str, os.PathLike)):
        raise UsageError(f"{named('--data-dir')} must be a folder path; got {type(data_dir).__name__}")
    if isinstance(data_dir, str) and not data_dir.strip():
        raise UsageError(f"{named('--data-dir')} is empty; pass the folder that holds the GLUE tasks in the official "
                         f"glue_data layout (DIR/STS-B/dev.tsv, ...), or drop it to use ${ENV_DIR} or the hub copy")


def env_folder() -> str | None:
    """$MHACOMPRESS_GLUE_DIR (None when unset or empty, like any empty variable), refused in one line when it is
    blank or names something that is not a folder (a file was reported as 'has no RTE/ file', and ' ' was read as a
    folder of that name)."""
    env = os.environ.get(ENV_DIR) or None
    if env is None:
        return None
    fix = "set it to the folder that holds the GLUE tasks in the official glue_data layout, or unset it"
    if not env.strip():
        raise UsageError(f"${ENV_DIR} is blank ({env!r}); {fix}")
    if os.path.exists(os.path.expanduser(env)) and not os.path.isdir(os.path.expanduser(env)):
        raise UsageError(f"${ENV_DIR}={env} is not a folder; {fix}")
    return env


def glue_folder(data_dir=None):
    """The local GLUE folder ``load_examples`` reads: ``data_dir``, else $MHACOMPRESS_GLUE_DIR (None: neither). A
    source like the model: no output may be, contain or lie inside it."""
    check_data_dir(data_dir)
    return data_dir if data_dir is not None else env_folder()


def glue_folder_if_usable(data_dir=None):
    """``glue_folder``, or None where it would be refused: for what reads no GLUE data itself but must still know
    the folder (never written into; a resume key), and leaves refusing a bad one to the command that reads it."""
    try:
        return glue_folder(data_dir)
    except UsageError:
        return None


def load_examples(task: Task, split: str = "validation", *, data_dir: str | os.PathLike | None = None,
                  limit: int | None = None, seed: int | None = None) -> Examples:
    """Read ``task``'s split from ``data_dir``, else from $MHACOMPRESS_GLUE_DIR, else from the hub.

    An explicit ``data_dir`` is never bypassed: a file missing there is an error. ``limit`` keeps the first N
    examples (a seeded random sample when ``seed`` is given)."""
    from ..reduction.config import _plain

    task, limit, seed = get_task(task), _plain(limit), _plain(seed)  # a name too; a numpy integer as its int
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ConfigError(f"limit must be a positive number of examples (or None for all); got {limit!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ConfigError(f"seed must be an integer (or None for the first examples); got {seed!r}")
    check_data_dir(data_dir)
    local_name, hub_split = task.split(split)
    split = canonical_split(split)
    if data_dir is not None:
        if not Path(data_dir).expanduser().is_dir():
            raise UsageError(f"{named('--data-dir')} {data_dir} is not a folder; pass the folder in the official "
                             f"glue_data layout (<dir>/{task.folder}/{local_name})")
        path = Path(data_dir).expanduser() / task.folder / local_name
        _check_regular(path, task, local_name)
        if not path.is_file():
            raise UsageError(f"no {path}: {named('--data-dir')} must hold the official glue_data layout "
                             f"(<dir>/{task.folder}/{local_name})")
        return read_tsv(task, split, path).subset(limit, seed=seed)
    env = env_folder()
    path = Path(env).expanduser() / task.folder / local_name if env else None
    if path is not None:
        _check_regular(path, task, local_name)
    if path is not None and path.is_file():
        return read_tsv(task, split, path).subset(limit, seed=seed)
    return load_hub(task, split, hub_split, missing_local=env).subset(limit, seed=seed)


def _check_regular(path: Path, task: Task, local_name: str) -> None:
    """A folder, pipe or device where a GLUE file belongs is named as such (it was reported missing)."""
    if os.path.exists(path) and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a pipe or a device)"
        raise UsageError(f"{path} is {kind}; put the official GLUE {task.folder}/{local_name} file there")


def read_tsv(task: Task, split: str, path: Path) -> Examples:
    """Official GLUE TSV: tab-separated, quoting off (quote characters are text), UTF-8 with or without a BOM,
    CoLA without a header row."""
    hint = f"pass the official GLUE {task.folder}/{path.name} (tab-separated UTF-8 text)"
    text = read_text(path, hint=hint)
    if "\r" in text.rstrip("\r") and "\n" not in text:
        raise UsageError(f"{path} ends its lines with a carriage return alone (old Mac line ends); convert them to "
                         f"newlines (e.g. tr '\\r' '\\n') or {hint}")
    lines = text.split("\n")
    while lines and not lines[-1].rstrip("\r"):
        lines.pop()  # the final newline (CoLA dev has none, as in GLUE), and blank lines an editor or `echo >>` added
    rows = [line.rstrip("\r").split("\t") for line in lines]
    if task.header:
        header, rows = rows[0], rows[1:]
        text_cols = [_column(header, c, path) for c in task.text]
        label_col = _column(header, task.label, path, required=split != "test")  # unlabelled: test files alone
    else:
        header, text_cols, label_col = None, list(task.text), task.label
        if split == "test":  # CoLA test.tsv: index, sentence (with a header, unlike train and dev)
            header, rows = rows[0], rows[1:]
            text_cols, label_col = [len(header) - 1], None
    width = max([*text_cols, label_col if label_col is not None else 0]) + 1
    texts, labels = [], [] if label_col is not None else None
    for number, row in enumerate(rows, start=2 if task.header else 1):
        if len(row) < width or (header is not None and len(row) != len(header)):
            if task.skip_malformed:
                continue
            if row == [""]:  # said as such: 'found 1' field did not tell a blank line from a line without tabs
                raise UsageError(f"{path}:{number} is blank; remove the blank line, or {hint}")
            raise UsageError(f"{path}:{number}: expected {len(header) if header else width} tab-separated fields, "
                             f"found {len(row)}; is this the official GLUE file?")
        texts.append(tuple(row[c] for c in text_cols))
        if labels is not None:
            labels.append(parse_label(task, row[label_col], f"{path}:{number}"))
    if not texts:
        what = "a header but no examples" if rows == [] else "no well-formed rows"
        raise UsageError(f"{path} has {what}; {hint}")
    return Examples(task, split, texts, labels, str(path))


def _column(header: list[str], name, path: Path, required: bool = True):
    if isinstance(name, int):
        return name
    if header.count(name) > 1:  # the first was read silently (an index column renamed: ids scored as sentences)
        raise UsageError(f"{path}: the header names column {name!r} {header.count(name)} times (columns "
                         f"{', '.join(str(i + 1) for i, h in enumerate(header) if h == name)}); is this the official "
                         f"GLUE file?")
    if name in header:
        return header.index(name)
    if name == "gold_label" and header and header[-1] == "gold_label":
        return len(header) - 1
    if required:
        columns = ", ".join(header)
        columns = columns if len(columns) <= 200 else columns[:200].rsplit(" ", 1)[0] + " ..."
        raise UsageError(f"{path}: no column {name!r} in the header ({columns}); is this the official GLUE file?")
    return None


def parse_label(task: Task, value: str, where: str):
    """A class index in the task's label order (names or digits), or a float for regression."""
    value = value.strip()
    try:
        if task.regression:
            if not math.isfinite(float(value)):  # float() reads nan and inf: the scores would be NaN
                raise ValueError(value)
            low, high = task.scale or (-math.inf, math.inf)
            if not low <= float(value) <= high:  # another scale or another column: fine-tuning would learn it
                raise UsageError(f"{where}: label {value} is outside {task.folder}'s scale {low:g}..{high:g}; is "
                                 f"this the official GLUE {task.folder} file (the score column)?")
            return float(value)
        if value.isdigit() and int(value) < task.num_labels:
            return int(value)
        return task.labels.index(value.lower())
    except ValueError:
        expected = "a number" if task.regression else ", ".join(task.labels) + f" or 0..{task.num_labels - 1}"
        raise UsageError(f"{where}: label {value!r} is not {expected}; is this the official GLUE {task.folder} "
                         f"file?") from None


def load_hub(task: Task, split: str, hub_split: str, *, missing_local: str | None = None) -> Examples:
    """The hub copy (``nyu-mll/glue``); fails within seconds, with what to pass instead, when it cannot be had."""
    from ..hub import hub_reachable

    where = (f"${ENV_DIR}={missing_local} has no {task.folder}/ file for split {split!r}" if missing_local
             else f"no local GLUE folder given ({named('--data-dir')} or ${ENV_DIR})")
    hint = (f"pass {given('--data-dir', 'DIR')} or set {ENV_DIR} to a folder in the official glue_data layout "
            f"(DIR/{task.folder}/)")
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if offline or not hub_reachable(timeout=2.0):
        why = "offline mode is set" if offline else "the Hugging Face hub is unreachable"
        raise UsageError(f"no GLUE data for {task.name}: {where} and {why}; {hint}")
    from ..errors import imported

    install = "pip install 'mhacompress[hub]'"
    datasets = imported("datasets", f"no GLUE data for {task.name}: {where} and the `datasets` package is not "
                                    f"installed ({install}); {hint}", install)
    try:
        ds = datasets.load_dataset(HUB_DATASET, task.hub_config, split=hub_split)
    except Exception as err:  # network errors come in many types; all mean the same to the user
        raise UsageError(f"could not load {HUB_DATASET}/{task.hub_config} [{hub_split}] from the hub "
                         f"({type(err).__name__}); {hint}") from None
    texts = list(zip(*(ds[c] for c in task.hub_text)))
    labels = list(ds["label"])
    if not task.regression and all(x == -1 for x in labels):
        labels = None  # hub test splits carry label -1
    elif task.regression:
        labels = [float(x) for x in labels]
    return Examples(task, split, texts, labels, f"hub:{HUB_DATASET}/{task.hub_config}[{hub_split}]")
