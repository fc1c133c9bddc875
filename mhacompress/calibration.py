"""Calibration text: sequences drawn from a GLUE task's train split, a text file (one sequence a line) or a jsonl
file. The pipeline reads them before the model loads, so that a bad source fails at once; compress/ never reads data
itself (it takes tokenized batches)."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

from .errors import UsageError, named
from .eval.tasks import TASKS
from .fsio import read_text


def calibration_texts(source: str, samples: int, *, seed: int = 0, pairs: bool = True,
                      data_dir: str | None = None) -> list[tuple[str, ...]]:
    """``samples`` texts from a GLUE task's TRAIN split, a text file (one sequence a line) or a jsonl file (``text``,
    or ``sentence1``/``sentence2``, or ``question``/``sentence``...: see ``_record_texts``).
    ``pairs=False`` splits sentence pairs into single sentences (for sentence encoders)."""
    if samples < 1:
        raise UsageError(f"--samples must be at least 1, got {samples}")
    path = Path(source).expanduser()
    suffix = path.suffix.lower()  # c.JSONL is a jsonl file too (read as text, its lines were calibrated on as JSON)
    task = task_named(source)
    if task is not None:  # a task's name is the task, whatever the current folder holds (./rte for a folder named so)
        from .eval.data import load_examples

        texts = load_examples(task, "train", data_dir=data_dir, limit=samples, seed=seed).texts
    elif path.is_file() and suffix in TABLE_SUFFIXES:  # read as text, a .tsv's labels would be calibrated on
        raise UsageError(f"{source} is a {suffix} file; calibration reads a .txt file (one sequence a line) or a "
                         f".jsonl file (one JSON object a line): convert it to one of those")
    elif path.is_file():
        texts = _read_file(path)
    elif path.is_dir():
        raise UsageError(f"{source} is a folder; calibration reads a GLUE task name, a .txt file (one sequence a "
                         f"line) or a .jsonl file: pass one of those")
    elif os.path.exists(path):  # a pipe or device: never read to its end
        raise UsageError(f"{source} is not a regular file (a pipe or a device); pass a .txt or .jsonl file")
    elif os.path.islink(path):  # it was 'no calibration file at', though ls lists it
        raise UsageError(f"{source} is a symbolic link to nothing (its target is missing, or the links loop); point "
                         f"it at a .txt or .jsonl file, or pass the file itself")
    elif suffix in (".txt", ".jsonl", ".json") or "/" in source:
        raise UsageError(f"no calibration file at {source!r}; pass a GLUE task name, a .txt or a .jsonl file")
    else:  # neither a path nor a task: get_task's refusal names the tasks
        from .eval.tasks import get_task

        try:
            get_task(source)
        except UsageError as err:
            raise UsageError(f"{err} (or pass a .txt / .jsonl file to "
                             f"{named('--calibrate', 'Calibration(source)')})") from None
    if not pairs:
        texts = [(t,) for pair in texts for t in pair]
    if not texts:
        raise UsageError(f"no calibration text in {source!r}; pass a file with one sequence a line, or a GLUE task")
    if len(texts) > samples:
        texts = [texts[i] for i in sorted(random.Random(seed).sample(range(len(texts)), samples))]
    return texts


def task_named(source: str):
    """The GLUE task ``source`` names (``mrpc``, ``SST-2``: a bare name, no folder), or None. A file or folder of that
    name in the current folder (a model fine-tuned with ``-o rte``) does not hide the task: a path says ./rte."""
    from .eval.tasks import get_task

    if not source or "/" in source or os.sep in source:
        return None
    try:
        return get_task(source)
    except UsageError:
        return None


TABLE_SUFFIXES = (".json", ".csv", ".tsv", ".parquet", ".arrow")
# the text fields of the common layouts (GLUE's and the hub's, SNLI / MultiNLI, SQuAD-style, text_a / text_b): where a
# record has any of them, only those are read, in the record's order; other string fields (genre, captionID,
# gold_label, *_parse) are metadata
TEXT_FIELDS = frozenset({field for task in TASKS.values() for field in task.hub_text}
                        | {"text_a", "text_b", "context", "passage", "query"})
NOT_TEXT = frozenset({"label", "labels", "idx", "id", "guid"})  # string fields of a record that are not its text
FILE_LIMIT = 256 * 2**20  # bytes: some two million sentences, thousands of times what calibration draws
JSONL_HINT = 'a .jsonl file holds one JSON object a line, e.g. {"text": "..."}'
TXT_HINT = "a calibration .txt file holds one sequence a line, as UTF-8 text"


def _read_file(path: Path) -> list[tuple[str, ...]]:
    jsonl = path.suffix.lower() == ".jsonl"
    size = path.stat().st_size
    if size > FILE_LIMIT:  # read whole, at about 4x its size in memory, to draw a few hundred lines
        raise UsageError(f"{path} is {size / 2**20:,.0f} MiB, and a calibration file is read whole (at most "
                         f"{FILE_LIMIT // 2**20} MiB); draw a sample of its lines first, e.g. shuf -n 10000 {path} > "
                         f"sample{path.suffix or '.txt'}")
    text = read_text(path, hint=JSONL_HINT if jsonl else TXT_HINT)
    # lines end at \n (\r\n, \r): not at str.splitlines' other breaks (form feed, U+2028, ...), which a sentence
    # may hold and a JSON string may hold raw
    lines = [(n, line) for n, line in enumerate(re.split(r"\r\n|\r|\n", text), 1) if line.strip()]
    if not jsonl:
        return [(line,) for _, line in lines]
    records = (_record_texts(path, n, line) for n, line in lines)
    return [r for r in records if r]  # records whose text is empty are skipped, like blank lines


def _record_texts(path: Path, n: int, line: str) -> tuple[str, ...]:
    """The text of one jsonl line: a string, or an object's ``text`` field, else its known text fields
    (``TEXT_FIELDS``: sentence1 / sentence2, question / sentence, premise / hypothesis, ...: strings, two at most), else
    its string fields other than a label or an id (two at most); empty strings dropped (an empty tuple when nothing is
    left)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}:{n} is not valid JSON ({err.msg}); {JSONL_HINT}") from None
    except RecursionError:
        raise UsageError(f"{path}:{n} is not valid JSON (nested too deeply); {JSONL_HINT}") from None
    except ValueError:  # an integer of more digits than int() converts (sys.get_int_max_str_digits)
        raise UsageError(f"{path}:{n} is not valid JSON (a number too long to read); {JSONL_HINT}") from None
    if isinstance(record, str):
        return (record,) if record.strip() else ()
    if not isinstance(record, dict):
        kind = {list: "an array", bool: "a boolean", type(None): "null"}.get(type(record), "a number")
        raise UsageError(f"{path}:{n}: {kind}, not an object or a string; {JSONL_HINT}")
    if "text" in record and not isinstance(record["text"], str):
        raise UsageError(f"{path}:{n}: its text field is not a string; {JSONL_HINT}")
    known = [k for k in record if k.lower() in TEXT_FIELDS]
    wrong = [k for k in known if not isinstance(record[k], str)]
    if wrong and "text" not in record:  # a pair's second half as a number was calibrated on as a single sentence
        raise UsageError(f"{path}:{n}: its {wrong[0]} field is not a string; {JSONL_HINT}")
    if len(known) > 2 and "text" not in record:  # the first two in the record's order: the third was dropped
        raise UsageError(f"{path}:{n}: {len(known)} text fields ({', '.join(known)}), where a sequence is one text or "
                         f"a pair; keep the two to encode together, or give them as one \"text\" field")
    fields = [record["text"]] if "text" in record else [record[k] for k in known] if known else [
        v for k, v in record.items() if isinstance(v, str) and not _metadata(k)]
    if not fields:
        raise UsageError(f"{path}:{n}: no text field; {JSONL_HINT}")
    if not all(map(encodable, fields)):
        raise UsageError(f"{path}:{n}: {SURROGATE}; fix or drop that line")
    return tuple(f for f in fields if f.strip())[:2]


SURROGATE = "its text holds half a character (a lone UTF-16 surrogate escape such as \\ud83d: text cut mid-emoji)"


def encodable(text: str) -> bool:
    """Whether ``text`` is text a tokenizer can take: no lone surrogate (a JSON escape or a Python string can hold
    one; no UTF-8 file can)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _metadata(key: str) -> bool:
    """A field that names, labels or identifies a record rather than holding its text: label, gold_label, pairID..."""
    lower = key.lower()
    return (lower in NOT_TEXT or lower.endswith(("_label", "_labels", "_id", "_ids", "_parse"))
            or key.endswith(("ID", "Id", "IDs", "Ids")))
