"""Broken data files (GLUE TSVs, calibration .txt and .jsonl) fail with one line naming file:line and the fix, before
any model is loaded."""

import pytest
from click.testing import CliRunner

from mhacompress.calibration import calibration_texts
from mhacompress.cli import main
from mhacompress.errors import UsageError
from mhacompress.eval.data import load_examples
from mhacompress.eval.tasks import get_task

STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
STSB_ROW = "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man.\tA person.\t4.5\n"

TSV = {
    "empty": (b"", "dev.tsv is empty"),
    "header only": (STSB_HEADER.encode(), "has a header but no examples"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "dev.tsv:3: binary data"),
    "latin-1": ((STSB_HEADER + STSB_ROW.replace("A man.", "A caf\xe9.")).encode("latin-1"),
                "dev.tsv:2: not UTF-8 text (byte 0xe9)"),
    "utf-16": ((STSB_HEADER + STSB_ROW).encode("utf-16"), "UTF-16"),
}


@pytest.mark.parametrize("case", TSV, ids=list(TSV))
def test_broken_glue_files(tmp_path, case):
    data, fragment = TSV[case]
    (tmp_path / "STS-B").mkdir()
    (tmp_path / "STS-B" / "dev.tsv").write_bytes(data)
    with pytest.raises(UsageError) as err:
        load_examples(get_task("stsb"), "validation", data_dir=tmp_path)
    assert fragment in str(err.value) and "official GLUE STS-B/dev.tsv" in str(err.value)


CALIBRATION = {
    "empty.txt": (b"", "is empty", "one sequence a line"),
    "blank.txt": (b"\n  \n", "is empty", "one sequence a line"),
    "binary.txt": (b"a line\n\x00\x01\x02\x03", "binary.txt:2: binary data", "one sequence a line"),
    "latin1.txt": ("ok\ncaf\xe9\n".encode("latin-1"), "latin1.txt:2: not UTF-8 text", "UTF-8"),
    "binary.jsonl": (b'{"text": "a"}\n\x00\x9f\x92', "binary.jsonl:2: binary data", "one JSON object a line"),
    "array.jsonl": (b'{"text": "a"}\n\n[1, 2]\n', "array.jsonl:3: an array, not an object", '{"text": "..."}'),
    "number.jsonl": (b"42\n", "number.jsonl:1: a number, not an object", "one JSON object a line"),
    "null.jsonl": (b'"fine"\nnull\n', "null.jsonl:2: null, not an object", "one JSON object a line"),
    "notext.jsonl": (b'{"label": 1}\n', "notext.jsonl:1: no text field", '{"text": "..."}'),
    "labelonly.jsonl": (b'{"label": "positive", "idx": "7"}\n', "labelonly.jsonl:1: no text field", '{"text": "..."}'),
    "numbertext.jsonl": (b'{"text": 5, "label": "positive"}\n', "numbertext.jsonl:1: its text field is not a string",
                         '{"text": "..."}'),
    "train.tsv": (b"sentence\tlabel\nit is good\t1\n", "is a .tsv file", "convert it"),
    "rows.CSV": (b"text,label\nit is good,1\n", "is a .csv file", "convert it"),
    "bad.jsonl": (b'{"text": "a"}\n{"text": \n', "bad.jsonl:2 is not valid JSON", "one JSON object a line"),
    # a JSON escape can hold half a UTF-16 pair (a tweet cut mid-emoji): the tokenizer's TypeError traceback
    "surrogate.jsonl": (b'{"text": "fine"}\n{"text": "cut \\ud83d"}\n', "surrogate.jsonl:2: its text holds half a "
                        "character", "fix or drop that line"),
    "surrogate-pair.jsonl": (b'{"sentence1": "a", "sentence2": "\\udc00 b"}\n', "surrogate-pair.jsonl:1: its text "
                             "holds half a character", "fix or drop that line"),
}


@pytest.mark.parametrize("name", CALIBRATION)
def test_broken_calibration_files(tmp_path, name):
    data, where, fix = CALIBRATION[name]
    (tmp_path / name).write_bytes(data)
    with pytest.raises(UsageError) as err:
        calibration_texts(str(tmp_path / name), 8)
    assert where in str(err.value) and fix in str(err.value) and "\n" not in str(err.value)


def test_the_cli_stops_on_a_broken_data_file_before_loading_the_model(tmp_path):
    (tmp_path / "calib.jsonl").write_bytes(b"[1]\n")
    result = CliRunner().invoke(main, ["reduce", str(tmp_path / "no-such-model-is-loaded"), "-k", "8", "--calibrate",
                                       str(tmp_path / "calib.jsonl"), "-o", str(tmp_path / "out")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "calib.jsonl:1: an array" in lines[0], result.output
    assert not (tmp_path / "out").exists()
