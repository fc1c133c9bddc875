"""release() gives back the resident pages of weights mapped from a checkpoint, and never a value: a weight written
in place and anonymous memory keep theirs. Linux only (it does nothing elsewhere)."""

import sys

import pytest
import torch

from conftest import padded_batch, tiny_config
from mhacompress.reduction.config import ReductionConfig
from mhacompress.reduction.sequential import Plan, reduce_sequential_
from mhacompress.residency import release, trim

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page residency is Linux's")
MB = 2**20


def resident(path) -> int:
    """Bytes of ``path`` mapped into this process and resident (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                inside = len(fields) > 5 and fields[5] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


@pytest.fixture
def mapped(tmp_path):
    """A BERT of about 8 MB saved as safetensors and loaded as transformers loads it (mapped from the file)."""
    from transformers import AutoModel, BertModel

    torch.manual_seed(0)
    BertModel(tiny_config("bert", vocab_size=1000, hidden_size=256, intermediate_size=1024)).save_pretrained(tmp_path)
    model = AutoModel.from_pretrained(tmp_path, use_safetensors=True).eval()
    path = tmp_path / "model.safetensors"
    touch(model)
    assert resident(path) > 0.9 * path.stat().st_size, "transformers no longer maps the checkpoint"
    return model, path


def touch(model) -> None:
    for p in model.parameters():
        float(p.detach().sum())


def test_release_gives_back_the_pages_of_mapped_weights_and_they_read_the_same_after(mapped):
    model, path = mapped
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    freed = release(model.parameters())
    assert freed > 0.9 * path.stat().st_size
    assert resident(path) < 0.05 * path.stat().st_size
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_release_keeps_a_weight_written_in_place(mapped):
    model, _ = mapped
    weight = model.encoder.layer[1].attention.output.dense.weight  # as the ridge refit writes it
    with torch.no_grad():
        weight.add_(1.0)
    written = weight.detach().clone()
    release(model.parameters())
    assert torch.equal(weight, written)


def test_release_leaves_anonymous_memory_alone():
    x = torch.randn(1 << 20)
    kept = x.clone()
    assert release([x]) == 0
    assert torch.equal(x, kept)


def test_release_of_nothing_mapped_and_trim_are_harmless():
    assert release([]) == 0
    assert release([torch.empty(0)]) == 0
    assert trim() in (True, False)


def test_the_sequential_reduction_ends_with_no_layer_resident_and_the_same_result(mapped, monkeypatch):
    model, path = mapped
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = [padded_batch(1000, lengths=(12, 7, 9, 3), seed=s) for s in range(2)]
    config = ReductionConfig(key_dim=16)
    reduce_sequential_(model, config, [16, 16], batches, Plan(compensate=True))
    assert resident(path) < 0.2 * path.stat().st_size  # what remains: the kernel's fault-around at page edges
    touch(model)
    kept = {n: p.detach().clone() for n, p in model.named_parameters()}

    from transformers import AutoModel

    monkeypatch.setattr("mhacompress.reduction.sequential.release", lambda tensors: 0)
    again = AutoModel.from_pretrained(path.parent, use_safetensors=True).eval()
    reduce_sequential_(again, config, [16, 16], batches, Plan(compensate=True))
    for n, p in again.named_parameters():
        assert torch.equal(p, kept[n]), n
    assert any(not torch.equal(kept[n], original[n]) for n in original if n in kept and "output.dense" in n)


def test_the_checks_that_read_every_weight_leave_none_resident(mapped):
    from mhacompress.pipeline import _check_finite
    from mhacompress.reduction.surgery import nonfinite_weight

    model, path = mapped
    assert nonfinite_weight(model) is None
    assert resident(path) < 0.2 * path.stat().st_size
    touch(model)
    _check_finite(model, calibrated=False)  # the layers only, after the reduction
    layers = sum(p.numel() * p.element_size() for p in model.encoder.parameters())
    assert resident(path) < path.stat().st_size - 0.8 * layers


def test_one_layer_resident_gives_back_each_layer_as_a_pass_leaves_it_and_changes_no_output(mapped):
    from mhacompress.reduction.sequential import one_layer_resident

    model, path = mapped
    batch = padded_batch(1000, lengths=(12, 7, 9, 3))
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
        release(model.parameters())
        seen = []  # the checkpoint's resident bytes as each layer starts
        hooks = [layer.register_forward_pre_hook(lambda *a: seen.append(resident(path)))
                 for layer in model.encoder.layer]
        with one_layer_resident(model):
            out = model(**batch).last_hidden_state
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    layer = sum(p.numel() * p.element_size() for p in model.encoder.layer[0].parameters())
    assert seen[1] < seen[0] + 0.5 * layer  # layer 0 was given back before layer 1 ran
    assert resident(path) < 0.2 * path.stat().st_size
    model(**batch)  # outside the block: nothing given back
    assert resident(path) > 2 * layer


def test_the_sensitivity_curves_end_with_no_layer_resident_and_the_same_curves(mapped, monkeypatch):
    from transformers import AutoModel

    from mhacompress.reduction.sensitivity import output_curves

    model, path = mapped
    batches = [padded_batch(1000, lengths=(12, 7, 9, 3), seed=s) for s in range(2)]
    config, plan = ReductionConfig(key_dim=16), Plan(compensate=True)
    release(model.parameters())  # as the checks after loading leave it
    seen = []  # the checkpoint's resident bytes as each layer starts, in every pass of the curves
    for layer in model.encoder.layer:
        layer.register_forward_pre_hook(lambda *a: seen.append(resident(path)))
    curves = output_curves(model, config, [8, 16], batches, plan)
    layer = sum(p.numel() * p.element_size() for p in model.encoder.layer[0].parameters())
    assert max(seen) < path.stat().st_size - 0.5 * layer  # never the whole checkpoint (it was, in every readout)
    assert resident(path) < 0.2 * path.stat().st_size
    monkeypatch.setattr("mhacompress.reduction.sequential.release", lambda tensors: 0)
    again = AutoModel.from_pretrained(path.parent, use_safetensors=True).eval()
    assert output_curves(again, config, [8, 16], batches, plan) == curves
    assert resident(path) > 0.5 * path.stat().st_size  # without release, the readouts leave every layer resident
