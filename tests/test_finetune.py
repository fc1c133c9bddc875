"""Fine-tuning: a fresh head on a plain encoder, loss goes down on a tiny random model, atomic save and reload, and
a reduced model keeps its collaborative layers through fine-tuning and saving."""

import json
import math
from pathlib import Path

import pytest
import torch

from mhacompress.eval import finetune as F
from mhacompress.eval import runner
from mhacompress.eval.data import load_examples
from mhacompress.eval.tasks import get_task
from mhacompress.hub import save

FIXTURES = Path(__file__).parent / "fixtures" / "glue"


def tiny_encoder(seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=128)).eval()


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.mark.parametrize("task,num_labels", [("mnli", 3), ("rte", 2), ("stsb", 1)])
def test_fresh_head(task, num_labels):
    encoder = tiny_encoder()
    model = F.with_head(encoder, get_task(task))
    assert runner.is_classifier(model) and model.config.num_labels == num_labels
    assert model.config.problem_type == ("regression" if task == "stsb" else "single_label_classification")
    torch.testing.assert_close(model.bert.embeddings.word_embeddings.weight, encoder.embeddings.word_embeddings.weight)
    assert runner.head_order(model, get_task(task)) == (None if task == "stsb" else list(range(num_labels)))


@pytest.mark.parametrize("model_type", ["roberta", "xlm-roberta", "camembert", "data2vec-text", "mpnet", "electra",
                                        "distilbert", "ernie"])
@pytest.mark.parametrize("reduced", [False, True], ids=["original", "reduced"])
def test_a_fresh_head_on_every_supported_encoder_keeps_its_weights(model_type, reduced):
    """RoBERTa's family and MPNet build their classifier's encoder without the pooler their bare encoder has: the
    pooler's weights were 'unexpected' and every such encoder (roberta-base included) was refused."""
    from conftest import tiny_model
    from mhacompress.reduction.config import ReductionConfig
    from mhacompress.reduction.surgery import reduce_

    encoder = tiny_model(model_type)
    if reduced:
        reduce_(encoder, ReductionConfig(key_dim=8, n_iter_max=3))
    model = F.with_head(encoder, get_task("rte"))
    assert runner.is_classifier(model) and model.config.num_labels == 2
    inner = model.base_model.state_dict()
    for name, value in encoder.state_dict().items():
        if not name.startswith("pooler."):
            torch.testing.assert_close(inner[name], value, msg=name)


def test_loss_goes_down_and_reloads(tokenizer, glue_dir, tmp_path):
    task = get_task("sst2")
    data = load_examples(task, "train", data_dir=glue_dir, limit=16, seed=0)
    model = F.with_head(tiny_encoder(), task)
    log = F.train(model, tokenizer, data, epochs=16, lr=3e-3, batch_size=8, warmup=0.1, seed=0)
    assert log["steps"] == 32 and len(log["losses"]) == 32
    first, last = sum(log["losses"][:4]) / 4, sum(log["losses"][-4:]) / 4
    assert last < 0.7 * first, log["losses"]
    out = save(model, tokenizer, tmp_path / "ft")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    from mhacompress.hub import load_pretrained

    again, tok, _ = load_pretrained(str(out))
    assert again.config.id2label == {0: "negative", 1: "positive"}
    ex = load_examples(task, data_dir=glue_dir, limit=16)
    torch.testing.assert_close(runner.run(again, tok, ex).scores, runner.run(model, tokenizer, ex).scores)


def test_training_is_seeded(tokenizer):
    data = load_examples(get_task("stsb"), data_dir=FIXTURES)
    losses = [F.train(F.with_head(tiny_encoder(), get_task("stsb")), tokenizer, data, epochs=2, batch_size=4,
                      lr=1e-3, seed=3)["losses"] for _ in range(2)]
    assert losses[0] == losses[1]


def test_reduced_model_keeps_collaborative_layers(tokenizer, tmp_path):
    from mhacompress.hub import load_pretrained
    from mhacompress.reduction.config import ReductionConfig
    from mhacompress.reduction.modeling import CollaborativeSelfAttention
    from mhacompress.reduction.surgery import reduce_

    encoder = tiny_encoder()
    reduce_(encoder, ReductionConfig(key_dim=8, method="cp", n_iter_max=5))
    task = get_task("qnli")
    model = F.with_head(encoder, task)
    collab = [m for m in model.modules() if isinstance(m, CollaborativeSelfAttention)]
    assert len(collab) == 2
    before = collab[0].query_proj.weight.detach().clone()
    torch.testing.assert_close(before, next(m for m in encoder.modules()
                                            if isinstance(m, CollaborativeSelfAttention)).query_proj.weight)
    data = load_examples(task, "train", data_dir=FIXTURES)
    F.train(model, tokenizer, data, epochs=2, batch_size=2, lr=1e-3)
    assert not torch.equal(before, collab[0].query_proj.weight)  # the collaborative projections are trained too
    out = save(model, tokenizer, tmp_path / "reduced-ft")
    block = json.loads((out / "config.json").read_text())["compression"]
    assert block["base_architecture"] == "BertForSequenceClassification"
    again, tok, _ = load_pretrained(str(out))
    assert sum(isinstance(m, CollaborativeSelfAttention) for m in again.modules()) == 2
    ex = load_examples(task, data_dir=FIXTURES)
    torch.testing.assert_close(runner.run(again, tok, ex).scores, runner.run(model, tokenizer, ex).scores)


def test_head_that_does_not_fit_is_refused():
    from mhacompress.errors import UsageError

    model = F.with_head(tiny_encoder(), get_task("mnli"))
    with pytest.raises(UsageError, match="3-label head; rte needs 2"):
        F.with_head(model, get_task("rte"))


@pytest.mark.parametrize("stored", ["regression", "multi_label_classification"])
def test_the_task_decides_the_loss_whatever_problem_type_the_checkpoint_says(tokenizer, stored):
    """A 2-label head whose config.json said problem_type "regression" failed inside mse_loss with a shape error."""
    task = get_task("qnli")
    model = F.with_head(tiny_encoder(), task)
    model.config.problem_type = stored
    same = F.with_head(model, task)
    assert same is model and model.config.problem_type == "single_label_classification"
    losses = F.train(model, tokenizer, load_examples(task, "train", data_dir=FIXTURES), epochs=1, batch_size=4,
                     lr=1e-3)["losses"]
    assert all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_half_precision_checkpoint_trains_in_float32_and_is_saved_in_its_own_dtype(tiny_bert_dir, tmp_path, dtype):
    """AdamW on float16 weights divides by squared gradients that underflow to 0: every run was refused as
    'training diverged ... try a lower --lr', at any --lr."""
    from safetensors import safe_open
    from transformers import AutoModel, AutoTokenizer

    import mhacompress

    AutoModel.from_pretrained(tiny_bert_dir, dtype=getattr(torch, dtype)).save_pretrained(tmp_path / "half")
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(tmp_path / "half")
    out = mhacompress.finetune(tmp_path / "half", "qnli", tmp_path / "ft", data_dir=FIXTURES, limit=16, epochs=16,
                               lr=3e-3, batch_size=8, evaluate=False)
    assert out["loss"]["last"] < 0.9 * out["loss"]["first"], out["loss"]  # trained, not refused as diverged
    with safe_open(tmp_path / "ft" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16" if dtype == "float16" else "BF16"}

