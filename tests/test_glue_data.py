"""Each task's loader on the shared GLUE files (row counts and label balance from SOURCES.md) and on the fixtures
in tests/fixtures/glue (the tasks that ../shared does not hold), plus the files' quirks."""

from collections import Counter
from pathlib import Path

import pytest

from mhacompress.errors import UsageError
from mhacompress.eval import data as D
from mhacompress.eval.tasks import get_task

FIXTURES = Path(__file__).parent / "fixtures" / "glue"

SHARED = [  # task, split, rows, label counts (None: regression)
    ("sst2", "train", 67349, {0: 29780, 1: 37569}), ("sst2", "validation", 872, {0: 428, 1: 444}),
    ("mrpc", "train", 3668, {1: 2474, 0: 1194}), ("mrpc", "validation", 408, {1: 279, 0: 129}),
    ("stsb", "train", 5749, None), ("stsb", "validation", 1500, None),
    ("cola", "train", 8551, {1: 6023, 0: 2528}), ("cola", "validation", 1043, {1: 721, 0: 322}),
    ("rte", "train", 2490, {0: 1249, 1: 1241}), ("rte", "validation", 277, {0: 146, 1: 131}),
    ("wnli", "train", 635, {0: 323, 1: 312}), ("wnli", "validation", 71, {0: 40, 1: 31}),
    ("qnli", "validation", 5463, {0: 2702, 1: 2761}),
]


@pytest.mark.parametrize("task,split,rows,counts", SHARED, ids=[f"{t}-{s}" for t, s, _, _ in SHARED])
def test_shared_files(glue_dir, task, split, rows, counts):
    ex = D.load_examples(get_task(task), split, data_dir=glue_dir)
    assert len(ex) == rows and len(ex.labels) == rows
    assert all(isinstance(t, tuple) and all(isinstance(s, str) and s for s in t) for t in ex.texts)
    assert len(ex.texts[0]) == (1 if task in ("sst2", "cola") else 2)
    if counts is None:
        assert min(ex.labels) == 0.0 and max(ex.labels) == 5.0
    else:
        assert dict(Counter(ex.labels)) == counts


def test_quirks_of_the_real_files(glue_dir):
    cola = D.load_examples(get_task("cola"), "dev", data_dir=glue_dir)  # no header, no final newline
    assert cola.texts[0] == ("The sailors rode the breeze clear of the rocks.",)
    mrpc = D.load_examples(get_task("mrpc"), "validation", data_dir=glue_dir)  # an unbalanced quote is text
    assert mrpc.texts[0][1].startswith('"The foodservice pie business')
    rte = D.load_examples(get_task("rte"), "validation", data_dir=glue_dir)  # string labels, in hub order
    assert rte.labels[0] == get_task("rte").labels.index("not_entailment") == 1


def test_environment_variable(glue_dir, monkeypatch):
    monkeypatch.setenv(D.ENV_DIR, str(glue_dir))
    assert len(D.load_examples(get_task("wnli"))) == 71


def test_limit_and_seeded_sample(glue_dir):
    task = get_task("sst2")
    first = D.load_examples(task, data_dir=glue_dir, limit=5)
    assert first.texts == D.load_examples(task, data_dir=glue_dir).texts[:5]
    a = D.load_examples(task, "train", data_dir=glue_dir, limit=50, seed=1)
    b = D.load_examples(task, "train", data_dir=glue_dir, limit=50, seed=1)
    assert a.texts == b.texts and a.texts != D.load_examples(task, "train", data_dir=glue_dir, limit=50).texts


@pytest.mark.parametrize("task,split,rows,labels", [
    ("qqp", "train", 4, [1, 0, 1, 0]),  # the broken row is skipped, as the hub loader does
    ("qqp", "validation", 4, [1, 0, 1, 0]),
    ("mnli", "train", 4, [0, 2, 1, 0]),
    ("mnli", "validation", 3, [0, 2, 1]),
    ("mnli-mm", "validation", 2, [0, 2]),
    ("qnli", "train", 3, [0, 1, 0]),
    ("qnli", "dev", 2, [0, 1]),
    ("cola", "validation", 3, [1, 0, 1]),
    ("mrpc", "validation", 2, [1, 0]),
    ("stsb", "validation", 6, [4.8, 0.0, 3.6, 2.4, 5.0, 0.4]),
])
def test_fixtures(task, split, rows, labels):
    ex = D.load_examples(get_task(task), split, data_dir=FIXTURES)
    assert len(ex) == rows and ex.labels == labels


def test_fixture_columns():
    mnli = D.load_examples(get_task("mnli"), data_dir=FIXTURES)
    assert mnli.texts[0] == ("She opened the window.", "The window was opened.")
    mrpc = D.load_examples(get_task("mrpc"), data_dir=FIXTURES)  # BOM before the header, quote in the text
    assert mrpc.texts[0] == ('He said "yes.', "He agreed.")
    qqp = D.load_examples(get_task("qqp"), "train", data_dir=FIXTURES)
    assert qqp.texts[2] == ('Is "dark matter" real?', "Does dark matter exist?")


def test_missing_file_in_data_dir(tmp_path):
    with pytest.raises(UsageError, match=r"QQP/dev.tsv"):
        D.load_examples(get_task("qqp"), data_dir=tmp_path)


def test_an_empty_environment_variable_is_unset_not_the_current_folder(glue_dir, tmp_path, monkeypatch):
    (tmp_path / "STS-B").mkdir()
    (tmp_path / "STS-B" / "dev.tsv").write_bytes((glue_dir / "STS-B" / "dev.tsv").read_bytes())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(D.ENV_DIR, "")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert D.glue_folder() is None
    with pytest.raises(UsageError, match="no local GLUE folder given"):
        D.load_examples(get_task("stsb"))


def test_offline_fails_fast_with_a_hint(monkeypatch):
    monkeypatch.delenv(D.ENV_DIR, raising=False)
    monkeypatch.setattr("mhacompress.hub.hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(UsageError, match="unreachable.*data_dir=DIR") as err:
        D.load_examples(get_task("qqp"))
    assert "\n" not in str(err.value)


def test_env_dir_without_the_task_falls_back_to_the_hub(glue_dir, monkeypatch):
    monkeypatch.setenv(D.ENV_DIR, str(glue_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="has no QQP/ file"):
        D.load_examples(get_task("qqp"))


@pytest.mark.parametrize("value,problem", [(" ", "is blank"), ("file", "is not a folder")])
def test_env_dir_that_cannot_be_a_glue_folder_is_named_as_such(value, problem, tmp_path, monkeypatch):
    """Was read as a folder named ' ', or reported as 'has no STS-B/ file' for a file: both then blamed the hub."""
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(D.ENV_DIR, value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for read in (lambda: D.load_examples(get_task("stsb")), D.glue_folder):
        with pytest.raises(UsageError, match=f"MHACOMPRESS_GLUE_DIR.* {problem}.*; set it to the folder") as err:
            read()
        assert "\n" not in str(err.value)


def test_bad_rows_and_labels(tmp_path):
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(UsageError, match="label 'maybe'"):
        D.load_examples(get_task("rte"), data_dir=tmp_path)
    (tmp_path / "RTE" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tentailment\n")
    with pytest.raises(UsageError, match="expected 4 tab-separated fields"):
        D.load_examples(get_task("rte"), data_dir=tmp_path)


def test_blank_lines_at_the_end_are_read_past_and_one_inside_is_named(glue_dir, tmp_path):
    """One trailing blank line (an editor's, `echo >>`'s) made the whole file 'not the official GLUE file'."""
    (tmp_path / "MRPC").mkdir()
    official = (glue_dir / "MRPC" / "dev.tsv").read_text(encoding="utf-8-sig")
    (tmp_path / "MRPC" / "dev.tsv").write_text(official.rstrip("\n") + "\n\n\r\n\n")
    read = D.load_examples(get_task("mrpc"), data_dir=tmp_path)
    assert read.texts == D.load_examples(get_task("mrpc"), data_dir=glue_dir).texts
    lines = official.split("\n")
    (tmp_path / "MRPC" / "dev.tsv").write_text("\n".join(lines[:3] + [""] + lines[3:]))
    with pytest.raises(UsageError, match=r"dev.tsv:4 is blank; remove the blank line"):
        D.load_examples(get_task("mrpc"), data_dir=tmp_path)


def test_a_header_naming_a_column_twice_is_refused(tmp_path):
    """The first 'sentence1' (here the example ids) was read silently, and the ids scored as sentences."""
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "dev.tsv").write_text("sentence1\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(UsageError, match="names column 'sentence1' 2 times \\(columns 1, 2\\)"):
        D.load_examples(get_task("rte"), data_dir=tmp_path)


@pytest.mark.parametrize("typed", ["validation", "dev", "DEV", " Validation "])
def test_split_names_are_read_in_any_case(typed):
    assert get_task("rte").split(typed) == get_task("rte").split("validation")


def test_unknown_split():
    with pytest.raises(UsageError, match="no split 'tset'"):
        get_task("rte").split("tset")


def test_hub_copy_is_read_through_datasets(monkeypatch):
    """The hub path (network mocked): nyu-mll/glue's field names and split names, label -1 on test splits."""
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        label = [-1, -1] if split.startswith("test") else [2, 0]
        return {"premise": ["p1", "p2"], "hypothesis": ["h1", "h2"], "label": label}

    monkeypatch.delenv(D.ENV_DIR, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr("mhacompress.hub.hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ex = D.load_examples(get_task("mnli-mm"))
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched")]
    assert ex.texts == [("p1", "h1"), ("p2", "h2")] and ex.labels == [2, 0]
    assert D.load_examples(get_task("mnli"), "test").labels is None
