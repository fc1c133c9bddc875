"""Integration on the bundled, real pretrained MiniLM (sentence-transformers/all-MiniLM-L6-v2)."""

import json

import pytest
import torch
from click.testing import CliRunner

import mhacompress
from mhacompress.cli import main
from mhacompress.hub import load_pretrained
from mhacompress.reduction.config import ReductionConfig
from mhacompress.reduction.surgery import reduce_

SENTENCES = [
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog while the farmer, unaware of anything, keeps ploughing the field.",
    "Yes.",
    "Collaborative attention shares one query/key projection across all heads of a layer.",
]


@pytest.fixture(scope="module")
def batch():
    _, tokenizer, _ = load_pretrained("minilm")
    return tokenizer(SENTENCES, padding=True, return_tensors="pt")


def hidden(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_full_key_dim_reproduces_minilm_on_padded_real_inputs(batch, attn):
    model, _, _ = load_pretrained("minilm", attn_implementation=attn)
    before = hidden(model, batch)
    reduce_(model, ReductionConfig(key_dim=384))
    keep = batch["attention_mask"].bool()
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 4  # mixed lengths, really padded
    assert (hidden(model, batch)[keep] - before[keep]).abs().max() <= 1e-4


@pytest.mark.slow
def test_cli_reduce_minilm_then_reload_both_ways(tmp_path, batch):
    out = tmp_path / "minilm-cp96"
    result = CliRunner().invoke(main, ["reduce", "minilm", "--key-dim", "96", "--output", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["layers"]) == 6 and all(0 < x["relative_error"] < 1 for x in report["layers"])
    assert report["params"]["after"] < 0.3 * report["params"]["before"]
    model, _ = mhacompress.load(out)
    a = hidden(model, batch)

    from transformers import AutoModel

    remote = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    assert torch.equal(hidden(remote, batch), a)
