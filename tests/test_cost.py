"""Cost counts against a hand count, and the `report` command on a tiny model."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import tiny_config, tiny_model
from mhacompress.cli import main
from mhacompress.reduction import cost
from mhacompress.reduction.config import ReductionConfig
from mhacompress.reduction.modeling import arch_for, attention_modules
from mhacompress.reduction.surgery import qk_parameters, reduce_

# tiny BERT: d = 32, H = 4, dh = 8; key dim R = 8
HAND = {  # (Q/K params, projection MACs per token, score MACs per token pair)
    None: (2 * 32 * 32 + 2 * 32, 2 * 32 * 32, 32),  # W_q, W_k, b_q, b_k; d per pair
    "cp": (2 * 32 * 8 + 4 * 8 + 4 * 32, 2 * 32 * 8 + 4 * 8 + 4 * 32, 4 * 8),  # U, V, mixing H*R, content bias H*d
    "tucker": (2 * 32 * 8 + 4 * 8 * 8 + 4 * 32, 2 * 32 * 8 + 4 * 8 * 8 + 4 * 32, 4 * 8),  # core H*R*R
    "svd": (2 * 32 * 8 + 4 * 32, 2 * 32 * 8 + 4 * 32, 8),  # H heads of R/H = 2
}


@pytest.mark.parametrize("method", [None, "cp", "tucker", "svd"])
def test_counts_match_a_hand_count(method):
    s = cost.LayerShape(32, 4, method, 8 if method else 32)
    assert (cost.qk_params(s), cost.projection_macs(s), cost.score_macs(s)) == HAND[method]
    c = cost.layer_cost(s, seq_len=10, batch_size=2)
    assert c["projection_macs"] == 20 * HAND[method][1] and c["score_macs"] == 200 * HAND[method][2]
    assert c["qk_macs"] == c["projection_macs"] + c["score_macs"]


@pytest.mark.parametrize("method", ["cp", "tucker", "svd"])
def test_parameter_counts_match_the_modules(method):
    model = tiny_model("bert")
    arch = arch_for(model.config)
    before = [qk_parameters(m, arch) for _, _, m in attention_modules(model)]
    original = cost.layer_shapes(model)
    reduce_(model, ReductionConfig(key_dim=8, method=method, n_iter_max=3))
    reduced = cost.layer_shapes(model)
    assert [cost.qk_params(s) for s in original] == before
    assert [cost.qk_params(s) for s in reduced] == [qk_parameters(m, arch) for _, _, m in attention_modules(model)]
    assert cost.original_shapes(reduced) == original


def test_compare_totals_and_ratios():
    orig, red = [cost.LayerShape(32, 4)] * 2, [cost.LayerShape(32, 4, "cp", 8)] * 2
    report = cost.compare(orig, red, seq_len=16, batch_size=1)
    assert len(report["layers"]) == 2 and report["layers"][1]["key_dim"] == 8
    t = report["total"]
    assert t["qk_params"] == {"original": 2 * 2112, "reduced": 2 * 672, "ratio": 672 / 2112}
    assert t["score_macs"]["ratio"] == 1.0  # cp at R = dh scores as much as the original
    assert t["qk_macs"]["original"] == 2 * (16 * 2048 + 256 * 32)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, minilm_path):
    """A tiny random BERT with the bundled tokenizer, and its cp reduction at key dim 8 (reduced by the CLI)."""
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    root = tmp_path_factory.mktemp("cost")
    BertModel(tiny_config("bert", vocab_size=tokenizer.vocab_size)).save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    result = CliRunner().invoke(main, ["reduce", str(root / "bert"), "-k", "8", "-o", str(root / "cp8"), "--json"])
    assert result.exit_code == 0, result.output
    reduce_json = json.loads(result.stdout)
    return root / "bert", root / "cp8", reduce_json


def test_reduce_prints_the_cost_totals(tiny_dirs):
    *_, reduce_json = tiny_dirs
    c = reduce_json["cost"]
    assert c["seq_len"] == 128 and c["qk_params"] == {"original": 2 * 2112, "reduced": 2 * 672, "ratio": 672 / 2112}
    assert c["score_macs"]["reduced"] == 2 * 128 * 128 * 32


def test_report_json_on_a_reduced_folder(tiny_dirs):
    _, reduced, _ = tiny_dirs
    args = ["report", str(reduced), "--seq-len", "8", "--batch-size", "2", "--repeats", "1", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["method"] == "cp" and out["key_dim"] == 8 and len(out["layers"]) == 2
    assert out["total"]["projection_macs"] == {"original": 2 * 16 * 2048, "reduced": 2 * 16 * 672,
                                               "ratio": 672 / 2048}
    for part in ("model", "attention_layer"):
        x = out["latency"][part]
        assert x["original_ms"] > 0 and x["reduced_ms"] > 0 and x["ratio"] == x["reduced_ms"] / x["original_ms"]
        assert x["cpu_ratio"] > 0  # on a CPU, the steadier process-time ratio beside it


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_report_measures_a_half_precision_model(tiny_dirs, tmp_path, dtype):
    """The attention layers' latency fed float32 hidden states to half-precision weights: a traceback ('mat1 and
    mat2 must have the same dtype')."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    original, _, _ = tiny_dirs
    AutoModel.from_pretrained(original, dtype=getattr(torch, dtype)).save_pretrained(tmp_path / "half")
    AutoTokenizer.from_pretrained(original).save_pretrained(tmp_path / "half")
    args = ["report", str(tmp_path / "half"), "-k", "8", "--seq-len", "8", "--batch-size", "1", "--repeats", "1",
            "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["latency"]["attention_layer"]["reduced_ms"] > 0


def test_report_reduces_an_original_in_memory(tiny_dirs):
    original, _, _ = tiny_dirs
    args = ["report", str(original), "-k", "8", "--method", "svd", "--no-latency", "--seq-len", "4", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["method"] == "svd" and "latency" not in out
    assert out["total"]["score_macs"]["reduced"] == 2 * 32 * 16 * 8  # batch 32, 4x4 pairs, R = 8


@pytest.mark.parametrize("extra,fragment", [([], "--key-dim"), (["-k", "4"], "already reduced")])
def test_report_bad_inputs_are_one_line_errors(tiny_dirs, extra, fragment):
    original, reduced, _ = tiny_dirs
    target = reduced if extra else original
    result = CliRunner().invoke(main, ["report", str(target), "--no-latency", *extra])
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code != 0 and len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0]


def test_report_missing_folder_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(main, ["report", str(tmp_path / "nope"), "--no-latency"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
