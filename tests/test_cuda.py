"""On a GPU the reduction is the same reduction: exact at full key dim, equal to the CPU's up to rounding, and its
model saves and reloads like one reduced on the CPU. Skipped where torch sees no CUDA device (CI has none); run on a
GPU machine with `python -m pytest tests/test_cuda.py` (MHACOMPRESS_TEST_DEVICE=mps for an Apple GPU; =cpu runs the
same checks CPU against CPU, a check of the tests themselves)."""

import json
import os

import pytest
import torch
from click.testing import CliRunner

import mhacompress
from conftest import padded_batch, tiny_model
from mhacompress.hub import load, load_pretrained
from mhacompress.reduction.config import ReductionConfig
from mhacompress.reduction.sequential import Plan, reduce_sequential_
from mhacompress.reduction.surgery import finish_, reduce_

DEVICE = os.environ.get("MHACOMPRESS_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")

TEXTS = ["the cat sat on the mat", "a second, somewhat longer calibration sentence about nothing in particular",
         "short", "numbers 1 2 3 and words", "the last text of the calibration set"] * 4


def on(device, batch):
    return {k: v.to(device) for k, v in batch.items()}


def hidden(model, batch):
    with torch.no_grad():
        out = model(**on(next(model.parameters()).device, batch)).last_hidden_state
    return out[batch["attention_mask"].bool().to(out.device)].double().cpu()


def test_weights_only_full_key_dim_on_the_gpu_reproduces_the_original():
    model, original, batch = tiny_model("bert").to(DEVICE), tiny_model("bert").to(DEVICE), padded_batch()
    reduce_(model, ReductionConfig(key_dim=32))
    assert all(p.device.type == torch.device(DEVICE).type for p in model.parameters())
    torch.testing.assert_close(hidden(model, batch), hidden(original, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("objective", ["output", "score"])
def test_sequential_full_key_dim_on_the_gpu_reproduces_the_original(objective):
    model, original = tiny_model("bert").to(DEVICE), tiny_model("bert").to(DEVICE)
    batches = [on(DEVICE, padded_batch(lengths=(9, 4, 7, 1, 8, 6), seed=i)) for i in range(6)]
    config = ReductionConfig(key_dim=32, n_iter_max=30)
    p = reduce_sequential_(model, config, [32, 32], batches, Plan(objective=objective, compensation_strength=1e-9))
    finish_(model, config, p.reports, source="tiny", tool_version="test", modified=p.modified)
    for batch in (padded_batch(seed=100), padded_batch(seed=101)):
        torch.testing.assert_close(hidden(model, batch), hidden(original, batch), atol=1e-4, rtol=0)


@pytest.mark.parametrize("calibration", [
    mhacompress.Calibration("python", refine_steps=0),  # closed form: allocation, solves and compensation
    mhacompress.Calibration("python"),  # the default path (refined at this key dim)
    mhacompress.Calibration("python", sequential=False),  # every layer whitened by the original's moments
], ids=["closed-form", "default", "all-layers-at-once"])
def test_a_calibrated_reduction_on_the_gpu_is_the_one_on_cpu(tiny_bert_dir, calibration):
    """Rounding apart, the GPU's reduction is the CPU's: the two reduced models differ from each other by far less
    than either differs from the original (a term lost or computed differently on one device would not)."""
    config = ReductionConfig(key_dim=8, n_iter_max=30, allocate=calibration.sequential, calibration=calibration)
    gpu = mhacompress.compress(str(tiny_bert_dir), config, calibration=TEXTS, device=DEVICE)
    cpu = mhacompress.compress(str(tiny_bert_dir), config, calibration=TEXTS, device="cpu")
    original, _, _ = load_pretrained(str(tiny_bert_dir))
    assert all(p.device.type == torch.device(DEVICE).type for p in gpu.model.parameters())
    assert gpu.report["key_dims"] == cpu.report["key_dims"]
    batch = padded_batch(vocab_size=1000, seed=7)
    apart = (hidden(gpu.model, batch) - hidden(cpu.model, batch)).norm()
    error = (hidden(cpu.model, batch) - hidden(original, batch)).norm()
    assert error > 1e-3 and apart < 1e-2 * error


def test_a_model_reduced_on_the_gpu_saves_and_reloads_on_the_cpu(tiny_bert_dir, tmp_path):
    config = ReductionConfig(key_dim=8, calibration=mhacompress.Calibration("python", refine_steps=0))
    result = mhacompress.compress(str(tiny_bert_dir), config, calibration=TEXTS, device=DEVICE)
    result.save(tmp_path / "out")
    reloaded, _ = load(tmp_path / "out")
    assert all(p.device.type == "cpu" for p in reloaded.parameters())
    batch = padded_batch(vocab_size=1000, seed=3)
    torch.testing.assert_close(hidden(reloaded, batch), hidden(result.model, batch), atol=1e-5, rtol=0)


def test_reduce_on_the_gpu_from_the_command_line(tiny_bert_dir, tmp_path):
    from mhacompress.cli import main

    texts = tmp_path / "calibration.txt"
    texts.write_text("\n".join(TEXTS))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["reduce", str(tiny_bert_dir), "-k", "8", "--calibrate", str(texts),
                                       "--device", DEVICE, "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["output"] == str(out)
    assert (out / "model.safetensors").is_file()


def test_scores_on_the_gpu_are_the_scores_on_cpu(tiny_bert_dir, glue_dir):
    from mhacompress.eval.compare import Scorer

    model, tok, _ = load_pretrained(str(tiny_bert_dir))
    cpu = Scorer.for_task("stsb", data_dir=glue_dir, limit=64)(model, tok)
    gpu = Scorer.for_task("stsb", data_dir=glue_dir, limit=64, device=DEVICE)(model.to(DEVICE), tok)
    assert gpu == pytest.approx(cpu, abs=1e-4)


def test_report_on_the_gpu_gives_no_cpu_time_ratio_and_names_the_device(tiny_bert_dir):
    """On an accelerator the host's process time is its wait for the device: a 'CPU-time ratio' there is no
    measure of anything, so it is not given, and the human line names the device instead of the CPU threads."""
    from mhacompress.cli import main

    on_cpu = torch.device(DEVICE).type == "cpu"
    out = mhacompress.report(str(tiny_bert_dir), key_dim=8, seq_len=16, batch_size=2, repeats=1, device=DEVICE)
    for part in ("model", "attention_layer"):
        assert out["latency"][part]["reduced_ms"] > 0
        assert ("cpu_ratio" in out["latency"][part]) == on_cpu
    args = ["report", str(tiny_bert_dir), "-k", "8", "--seq-len", "16", "--batch-size", "2", "--repeats", "1",
            "--device", DEVICE]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert ("CPU-time ratio" in result.output) == on_cpu
