"""Every command's --json output follows mhacompress/schema.json, envelope first: a CI script can rely on it."""

import json

import pytest
import torch
import transformers
from click.testing import CliRunner

import mhacompress
from mhacompress.cli import main
from mhacompress.schema import SCHEMA_VERSION, validate

jsonschema = pytest.importorskip("jsonschema")


@pytest.fixture(scope="module")
def reduced_dir(tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("schema") / "cp8"
    result = CliRunner().invoke(main, ["reduce", str(tiny_bert_dir), "-k", "8", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return out


def commands(tiny, reduced, glue, tmp):
    return {
        "reduce": ["reduce", tiny, "-k", "8", "--json"],
        "eval": ["eval", reduced, "-t", "stsb", "--limit", "8", "--data-dir", glue, "--json"],
        "sweep": ["sweep", tiny, "-t", "stsb", "--limit", "8", "--key-dims", "8", "--methods", "cp", "--data-dir", glue,
                  "--json"],
        "report": ["report", reduced, "--seq-len", "4", "--batch-size", "1", "--repeats", "1", "--json"],
        "export": ["export", reduced, "-o", f"{tmp}/m.onnx", "--json"],
        "analyze": ["analyze", tiny, "--key-dims", "8", "--json"],
        "finetune": ["finetune", tiny, "-t", "stsb", "--limit", "8", "--epochs", "1", "-o", f"{tmp}/ft",
                     "--data-dir", glue, "--no-eval", "--json"],
    }


@pytest.mark.parametrize("command", ["reduce", "eval", "sweep", "report", "export", "analyze", "finetune"])
def test_json_output_validates_against_the_schema(command, tiny_bert_dir, reduced_dir, glue_dir, tmp_path):
    args = commands(str(tiny_bert_dir), str(reduced_dir), str(glue_dir), str(tmp_path))[command]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    validate(out)
    assert out["command"] == command and out["schema_version"] == SCHEMA_VERSION
    assert (out["tool_version"], out["torch"], out["transformers"]) == (mhacompress.__version__, torch.__version__,
                                                                         transformers.__version__)
    assert out["device"] == "cpu"


def test_the_schema_rejects_what_it_should():
    good = {"schema_version": SCHEMA_VERSION, "command": "eval", "tool_version": "0", "torch": "2", "transformers": "5",
            "device": "cpu", "model": "m", "task": "stsb", "split": "validation", "examples": 3,
            "metrics": {"spearman": 0.5}, "seconds": 1.0}
    validate(good)
    for broken in ({**good, "schema_version": 99}, {k: v for k, v in good.items() if k != "device"},
                   {**good, "command": "reduce"}, {**good, "metrics": {"spearman": "high"}}):
        with pytest.raises(jsonschema.ValidationError):
            validate(broken)


def test_the_library_report_is_the_reduce_json(tiny_bert_dir):
    from mhacompress import ReductionConfig, compress

    report = compress(str(tiny_bert_dir), ReductionConfig(key_dim=8)).report
    validate({**report, "output": None})


def test_an_undefined_metric_is_null_in_strict_json(capsys):
    """A correlation of constant predictions is NaN; --json must stay parseable by strict parsers (jq): null."""
    from mhacompress.cli._common import emit_json

    emit_json({"model": "m", "task": "stsb", "split": "validation", "examples": 3, "seconds": 1.0,
               "metrics": {"spearman": float("nan"), "pearson": float("inf")}}, "eval")
    text = capsys.readouterr().out

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    out = json.loads(text, parse_constant=refuse)
    assert out["metrics"] == {"spearman": None, "pearson": None}
    validate(out)
