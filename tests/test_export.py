"""ONNX export: dynamic axes, checked in onnxruntime against PyTorch, never a file that was not checked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import tiny_config, tiny_model
from mhacompress.cli import main
from mhacompress.reduction.config import ReductionConfig
from mhacompress.reduction.surgery import reduce_

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def run_onnx(path, batch):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in batch.items()})


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, minilm_path):
    """A tiny original BERT (with the bundled tokenizer) and its cp reduction, saved."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    from mhacompress.hub import save

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config("bert", vocab_size=tokenizer.vocab_size)).eval()
    model.save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    reduce_(model, ReductionConfig(key_dim=6, n_iter_max=5))
    save(model, tokenizer, root / "cp6")
    return root / "bert", root / "cp6"


def test_cli_export_round_trip_on_padded_batches(tiny_dirs, tmp_path):
    from mhacompress.export import padded_batch
    from mhacompress.hub import load

    _, reduced = tiny_dirs
    out = tmp_path / "m.onnx"
    result = invoke("export", reduced, "--output", out, "--first-token-only", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and report["max_abs_diff"] <= 1e-4 and report["outputs"] == ["logits"]
    assert report["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]  # BERT: sentence pairs' segments
    assert {(r["batch_size"], r["seq_len"]) for r in report["runs"]} == {(1, 5), (2, 16), (3, 37)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary file left
    model, _ = load(reduced)  # without the shortcut: the exported shortcut must agree with the full model
    batch = padded_batch(model.config.vocab_size, 5, 23, seed=7, inputs=report["inputs"])  # a shape not checked
    with torch.no_grad():
        want = model(**batch).logits.numpy()
        segment_0 = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.numpy()
    assert np.abs(want - segment_0).max() > 1e-3  # the pairs' segments matter to these logits: the graph must read them
    assert np.abs(run_onnx(out, batch)[0] - want).max() <= 1e-4


# svd heads (3) are narrower than the head dim (8), cp's shared key (20) wider; in PyTorch on CPU both are padded
# or blocked for the fused kernel, which the exported graph does not need: it computes at the heads' own widths
@pytest.mark.parametrize("method,key_dim", [("svd", 12), ("cp", 20)])
def test_export_of_an_encoder_returns_hidden_states(tmp_path, method, key_dim, monkeypatch):
    from mhacompress.export import export_onnx, padded_batch
    from mhacompress.reduction.modeling import kernels

    model = tiny_model("bert", attn="sdpa")
    reduce_(model, ReductionConfig(key_dim=key_dim, method=method, n_iter_max=5))
    zero_pad, padded_in_export = kernels.zero_pad, []

    def recorded(x, width):
        padded_in_export.append(torch.onnx.is_in_onnx_export())
        return zero_pad(x, width)

    monkeypatch.setattr(kernels, "zero_pad", recorded)
    report = export_onnx(model, tmp_path / "e.onnx")
    assert not any(padded_in_export)
    assert report["outputs"] == ["last_hidden_state", "pooler_output"] and report["passed"]
    batch = padded_batch(100, 2, 11, seed=3, inputs=report["inputs"])
    keep = batch["attention_mask"].bool().numpy()
    with torch.no_grad():
        want = model(**batch).last_hidden_state.numpy()
    assert np.abs(run_onnx(tmp_path / "e.onnx", batch)[0][keep] - want[keep]).max() <= 1e-4



def test_a_half_precision_model_that_fails_the_check_is_told_its_dtype_and_the_fix(tmp_path):
    """onnxruntime runs no bfloat16 Add on CPU, and float16 rounds differently there: the one-line errors said
    'NOT_IMPLEMENTED ... Add(14)' or 'differs by 3.9e-03', nothing of the dtype or what to do."""
    from mhacompress.errors import UsageError
    from mhacompress.export import export_onnx

    model = tiny_model("bert", attn="sdpa").to(torch.bfloat16)
    reduce_(model, ReductionConfig(key_dim=8, n_iter_max=3))
    with pytest.raises(UsageError, match="nothing was written.*the model is bfloat16.*export a float32 copy"):
        export_onnx(model, tmp_path / "b.onnx")
    assert not list(tmp_path.iterdir())
    model = model.to(torch.float16)
    with pytest.raises(UsageError, match=r"differs from PyTorch.*the model is float16.*pass tol=0.01"):
        export_onnx(model, tmp_path / "h.onnx", tol=1e-7)
    assert not list(tmp_path.iterdir())


def test_a_model_with_fewer_positions_than_the_check_shapes_is_checked_at_its_longest(tmp_path):
    """The check ran fixed shapes up to 37 tokens: a model of 32 positions (or 6) failed in onnxruntime with a
    traceback after the export."""
    from transformers import BertModel

    from mhacompress.export import export_onnx

    for positions in (32, 6):
        torch.manual_seed(0)
        model = BertModel(tiny_config("bert", max_position_embeddings=positions)).eval()
        reduce_(model, ReductionConfig(key_dim=8, n_iter_max=3))
        report = export_onnx(model, tmp_path / f"p{positions}.onnx")
        assert report["passed"] and max(r["seq_len"] for r in report["runs"]) == positions


def test_an_mpnet_model_exports_and_reports(tmp_path):
    """transformers has no sdpa attention for MPNet: export and report load it with its eager path, as every other
    command does (both asked for sdpa, and transformers refused the folder)."""
    import mhacompress
    from mhacompress.hub import save

    original = tiny_model("mpnet")
    original.save_pretrained(tmp_path / "mpnet")
    reduce_(original, ReductionConfig(key_dim=8, n_iter_max=3), source=str(tmp_path / "mpnet"))
    save(original, None, tmp_path / "cp8")
    assert mhacompress.to_onnx(tmp_path / "cp8", tmp_path / "m.onnx")["passed"]
    report = mhacompress.report(tmp_path / "cp8", seq_len=8, batch_size=1, latency=False)
    assert report["key_dim"] == 8 and report["attn_implementation"] == "eager"


def fake_export(monkeypatch):
    """torch.onnx.export writes a stand-in file (fast): what follows is the check and the rename."""
    def write(model, args, f, **kwargs):
        with open(f, "wb") as out:
            out.write(b"not an onnx graph")

    monkeypatch.setattr(torch.onnx, "export", write)


def test_a_failed_check_writes_nothing(tiny_dirs, tmp_path, monkeypatch):
    import mhacompress.export as ex

    _, reduced = tiny_dirs
    fake_export(monkeypatch)
    monkeypatch.setattr(ex, "check", lambda path, model, names, tol, **kw: {"max_abs_diff": 0.5, "passed": False})
    result = invoke("export", reduced, "-o", tmp_path / "m.onnx")
    assert_one_line_error(result, "differs from PyTorch", "nothing was written")
    assert list(tmp_path.iterdir()) == []


def test_a_graph_onnxruntime_cannot_load_writes_nothing(tiny_dirs, tmp_path, monkeypatch):
    _, reduced = tiny_dirs
    fake_export(monkeypatch)
    result = invoke("export", reduced, "-o", tmp_path / "m.onnx")
    assert_one_line_error(result, "cannot load", "nothing was written")
    assert list(tmp_path.iterdir()) == []


def test_an_export_that_cannot_be_checked_writes_nothing(tiny_dirs, tmp_path, monkeypatch):
    import sys

    _, reduced = tiny_dirs
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    result = invoke("export", reduced, "-o", tmp_path / "m.onnx")
    assert_one_line_error(result, "cannot check", "nothing was written")
    assert list(tmp_path.iterdir()) == []


def test_a_broken_onnxruntime_is_named_not_blamed_on_the_output_path(tiny_dirs, tmp_path, monkeypatch):
    """An onnxruntime whose shared library does not load raised OSError at import, reported as 'cannot access: ...
    (check the path, its permissions and free space)', about the output."""
    import sys

    _, reduced = tiny_dirs
    (tmp_path / "fake" / "onnxruntime").mkdir(parents=True)
    (tmp_path / "fake" / "onnxruntime" / "__init__.py").write_text("raise OSError('libonnxruntime.so: cannot open')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
    result = invoke("export", reduced, "-o", tmp_path / "out" / "m.onnx")
    assert_one_line_error(result, "onnxruntime is installed but fails to import (OSError: libonnxruntime.so: cannot "
                                  "open)", "reinstall it: pip install 'mhacompress[export]'")
    assert not (tmp_path / "out").exists()


def test_a_full_disk_during_the_export_names_the_output_and_writes_nothing(tiny_dirs, tmp_path, monkeypatch):
    """onnx's write error carries no file name: the one-line message said 'cannot access: No space left on device'
    without saying where."""
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.onnx, "export", full)
    result = invoke("export", tiny_dirs[1], "-o", tmp_path / "m.onnx")
    assert_one_line_error(result, f"cannot access {tmp_path / 'm.onnx'}: No space left on device", "nothing was")
    assert list(tmp_path.iterdir()) == []


def test_the_format_is_read_in_any_case(tiny_dirs, tmp_path):
    result = invoke("export", tiny_dirs[1], "--format", "ONNX", "-o", tmp_path / "m.onnx", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["format"] == "onnx" and (tmp_path / "m.onnx").is_file()


def test_bad_inputs_are_one_line_errors(tiny_dirs, tmp_path):
    original, reduced = tiny_dirs
    assert_one_line_error(invoke("export", reduced, "--format", "tflite", "-o", tmp_path / "m"), "unsupported",
                          "onnx")
    assert_one_line_error(invoke("export", tmp_path / "missing", "-o", tmp_path / "m.onnx"), "not a model folder")
    assert_one_line_error(invoke("export", original, "-o", tmp_path / "m.onnx"), "not a reduced model")
    (tmp_path / "taken.onnx").write_text("keep me")
    assert_one_line_error(invoke("export", reduced, "-o", tmp_path / "taken.onnx"), "exists", "--force")
    assert (tmp_path / "taken.onnx").read_text() == "keep me"


def test_first_token_only_needs_a_classifier(tmp_path):
    from mhacompress.hub import save

    model = tiny_model("bert")
    reduce_(model, ReductionConfig(key_dim=8, n_iter_max=3))
    save(model, None, tmp_path / "enc")
    assert_one_line_error(invoke("export", tmp_path / "enc", "-o", tmp_path / "e.onnx", "--first-token-only"),
                          "sequence classifiers")


@pytest.mark.slow
def test_minilm_export_round_trip(tmp_path):
    from mhacompress.hub import load

    assert invoke("reduce", "minilm", "-k", "96", "-o", tmp_path / "m").exit_code == 0
    result = invoke("export", tmp_path / "m", "-o", tmp_path / "m.onnx", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["max_abs_diff"] <= 1e-4
    model, tokenizer = load(tmp_path / "m")
    batch = dict(tokenizer(["a short one", "a somewhat longer sentence to pad the first against"],
                           padding=True, return_tensors="pt"))  # token_type_ids too: MiniLM is a BERT
    keep = batch["attention_mask"].bool().numpy()
    with torch.no_grad():
        want = model(**batch).last_hidden_state.numpy()
    assert np.abs(run_onnx(tmp_path / "m.onnx", batch)[0][keep] - want[keep]).max() <= 1e-4
