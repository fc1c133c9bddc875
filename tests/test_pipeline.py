"""compress() as a library user meets it: refusals that protect what would be saved."""

import pytest
import torch

import mhacompress
from conftest import tiny_model
from mhacompress import ReductionConfig
from mhacompress.errors import UsageError


def test_non_finite_weights_are_refused_before_anything_is_returned(monkeypatch):
    from mhacompress import pipeline

    real = pipeline._reduce

    def poisoned(model, *args):
        out = real(model, *args)
        with torch.no_grad():
            model.encoder.layer[1].attention.output.dense.weight[0, 0] = float("nan")
        return out

    monkeypatch.setattr(pipeline, "_reduce", poisoned)
    with pytest.raises(UsageError, match="non-finite weights .*encoder.layer.1.attention.output.dense.weight"):
        mhacompress.compress(tiny_model("bert"), ReductionConfig(key_dim=8))


def test_the_library_prints_nothing_itself(tiny_bert_dir, tmp_path, capfd):
    """No transformers progress bars from loading, saving or reloading: progress is the caller's on_progress. The
    user's own progress-bar setting is left as it was."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.enable_progress_bar()  # as a fresh Python session has it (the CLI tests switch it off)
    try:
        result = mhacompress.compress(str(tiny_bert_dir), ReductionConfig(key_dim=8))
        result.save(tmp_path / "out")
        mhacompress.load(tmp_path / "out")
        out, err = capfd.readouterr()
        assert out == "" and err == ""
        assert logging.is_progress_bar_enabled()
    finally:
        (logging.enable_progress_bar if was else logging.disable_progress_bar)()
