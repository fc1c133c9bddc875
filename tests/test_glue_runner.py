"""Batched inference: sorted dynamic-padding batches equal naive padding, heads mapped through id2label, fidelity;
and (slow) the bundled MiniLM's STS-B dev Spearman and Pearson."""

import math
import warnings

import pytest
import torch

from mhacompress.errors import UsageError
from mhacompress.eval import runner
from mhacompress.eval.data import Examples, load_examples
from mhacompress.eval.tasks import get_task


def tiny(head_labels=None, seed=0, **overrides):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, **overrides)
    if head_labels is None:
        return BertModel(config).eval()
    config.num_labels = len(head_labels)
    config.id2label = dict(enumerate(head_labels))
    config.label2id = {n: i for i, n in enumerate(head_labels)}
    return BertForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


def examples(task, n=13):
    words = "the a cat dog sat ran on under mat house quickly red blue very big".split()
    texts = [tuple(" ".join(words[(i * 7 + j * 3 + k) % len(words)] for k in range(1 + (i * 5 + j) % 11))
                   for j in range(2)) for i in range(n)]
    spec = get_task(task)
    labels = [float(i % 6) for i in range(n)] if spec.regression else [i % spec.num_labels for i in range(n)]
    return Examples(spec, "validation", texts, labels, "synthetic")


LONG = "antidisestablishmentarianism and the " + "quick brown fox jumps, over the lazy dog. " * 1500  # 63 kB


PAIRED = LONG[:20_000]  # a pair's full encoding, the reference, holds every overflowing window of both: kept small


@pytest.mark.parametrize("fields", [(LONG,), (PAIRED, "a short second sentence"), ("a short first one", PAIRED),
                                    (PAIRED, ", " * 500), (", " * 500, PAIRED), ("x" * 9000 + " y",),
                                    ("a" + " " * 20_000 + "b",)])
@pytest.mark.parametrize("max_length", [16, 128])
def test_a_very_long_field_encodes_as_the_whole_text_does_without_reading_all_of_it(tokenizer, fields, max_length):
    """One 40 MB calibration line took 6 GB to tokenize before truncation threw it away: a long field is cut to a
    prefix first, with the same truncated encoding (single texts and pairs, whichever is longer; a word of 9,000
    letters; a run of spaces, which makes no tokens, where the text is read to its end)."""
    seen = []

    class Watched:
        pad_token = tokenizer.pad_token

        def __call__(self, *args, **kwargs):
            seen.extend(len(t) for a in args for t in ([a] if isinstance(a, str) else a))
            return tokenizer(*args, **kwargs)

    got = runner.encode(Watched(), [fields], max_length)
    want = tokenizer(*[[f] for f in fields], truncation=True, max_length=max_length)
    assert got["input_ids"] == want["input_ids"] and got.get("token_type_ids") == want.get("token_type_ids")
    assert max(seen) < len(PAIRED) if LONG in fields or PAIRED in fields else True  # never the whole field


def test_a_pair_of_two_very_long_fields_keeps_the_start_of_each(tokenizer):
    """Both fields cut: each keeps half of max_length, the first tokens of its text (which of the two keeps the odd
    token is decided on the prefixes)."""
    got = runner.encode(tokenizer, [(LONG, LONG[3:])], 16)["input_ids"][0]
    sep = got.index(tokenizer.sep_token_id)
    first, second = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (LONG[:200], LONG[3:200]))
    assert len(got) == 16 and got[1:sep] == first[:sep - 1] and got[sep + 1:-1] == second[:len(got) - sep - 2]


def test_sorted_batches_match_naive_padding(tokenizer):
    model, ex = tiny(["entailment", "not_entailment"]), examples("rte")
    fast = runner.forward_all(model, tokenizer, ex.texts, fn=runner._logits, batch_size=4)
    naive = runner.forward_all(model, tokenizer, ex.texts, fn=runner._logits, batch_size=4, sort=False,
                               pad_to_max=True, max_length=64)
    one = torch.cat([runner.forward_all(model, tokenizer, [t], fn=runner._logits) for t in ex.texts])
    torch.testing.assert_close(fast, one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(naive, one, atol=1e-5, rtol=1e-5)


def test_a_tokenizer_saved_to_pad_on_the_left_scores_as_one_padded_on_the_right(minilm_path):
    """A tokenizer_config.json with padding_side "left" made every score depend on --batch-size: the absolute
    positions of the padded sequences moved, and the classifier read a pad token where [CLS] should be."""
    from transformers import AutoTokenizer

    left = AutoTokenizer.from_pretrained(minilm_path, padding_side="left")
    model, ex = tiny(["entailment", "not_entailment"]), examples("rte")
    one = torch.cat([runner.forward_all(model, left, [t], fn=runner._logits) for t in ex.texts])
    torch.testing.assert_close(runner.forward_all(model, left, ex.texts, fn=runner._logits, batch_size=5), one,
                               atol=1e-5, rtol=1e-5)
    assert left.padding_side == "left"  # the user's tokenizer is not changed


def test_head_labels_are_mapped_through_id2label(tokenizer):
    ex = examples("rte")
    named = tiny(["not_entailment", "entailment"])  # the reverse of the task's order
    out = runner.run(named, tokenizer, ex)
    raw = runner.forward_all(named, tokenizer, ex.texts, fn=runner._logits)
    torch.testing.assert_close(out.scores, raw[:, [1, 0]])
    assert out.preds == raw[:, [1, 0]].argmax(-1).tolist()
    default = tiny(["LABEL_0", "LABEL_1"])
    assert runner.head_order(default, get_task("rte")) == [0, 1]
    upper = tiny(["CONTRADICTION", "NEUTRAL", "ENTAILMENT"])
    assert runner.head_order(upper, get_task("mnli")) == [2, 1, 0]


def test_a_model_with_one_token_type_scores_sentence_pairs_as_segment_zero(tokenizer):
    """A checkpoint with type_vocab_size 1 and a BERT tokenizer: the tokenizer's segment ids of the second sentence
    (1) are not fed to it (they ended in 'IndexError: index out of range in self' from eval, reduce and finetune)."""
    model, ex = tiny(["entailment", "not_entailment"], type_vocab_size=1), examples("rte")
    out = runner.forward_all(model, tokenizer, ex.texts, fn=runner._logits, batch_size=4)
    enc = tokenizer(*[list(c) for c in zip(*ex.texts)], padding=True, return_tensors="pt")
    with torch.no_grad():
        plain = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("labels,task,match", [
    (["a", "b", "c"], "rte", "3-label head; rte needs 2"),
    (["positive", "negative"], "rte", "do not match.*score it on the task it was fine-tuned for"),
    (["x", "y"], "stsb", "regression head"),
    (["score"], "sst2", "1-label head"),
])
def test_heads_that_do_not_fit(labels, task, match):
    with pytest.raises(UsageError, match=match):
        runner.head_order(tiny(labels), get_task(task))


def test_encoder_scores_stsb_and_refuses_the_rest(tokenizer):
    model = tiny()
    out = runner.run(model, tokenizer, examples("stsb"))
    assert out.kind == "encoder" and out.scores.shape == (13,) and out.embeddings.shape == (2, 13, 32)
    assert float(out.scores.abs().max()) <= 1 + 1e-6
    with pytest.raises(UsageError, match="fine-tune it first"):
        runner.run(model, tokenizer, examples("mrpc"))


def test_the_fine_tuning_hint_is_the_python_call_in_python_and_the_command_on_the_command_line(tokenizer):
    """A Python caller was told to run `mhacompress finetune MODEL --task mrpc --output DIR`; the CLI's own hint
    (tests/test_eval_cli.py) stays the command."""
    from mhacompress.errors import command_line

    with pytest.raises(UsageError, match=r"fine-tune it first: mhacompress\.finetune\(MODEL, 'mrpc', DIR\)$"):
        runner.run(tiny(), tokenizer, examples("mrpc"))
    with pytest.raises(UsageError, match=r"fine-tune one: mhacompress\.finetune\(MODEL, 'rte', DIR\)$") as err:
        runner.head_order(tiny(["a", "b", "c"]), get_task("rte"))
    assert "--" not in str(err.value)
    with command_line(), pytest.raises(UsageError, match="fine-tune one: mhacompress finetune MODEL --task rte "
                                                          "--output DIR$"):
        runner.head_order(tiny(["a", "b", "c"]), get_task("rte"))


@pytest.mark.parametrize("model_type", ["bert", "roberta", "xlm-roberta", "electra", "camembert", "data2vec-text",
                                        "ernie", "mpnet", "distilbert"])
def test_inputs_are_capped_at_exactly_the_positions_the_architecture_has(model_type):
    """eval, finetune and calibration (usable_length) allow the longest input that report (--seq-len) does, and that
    is what the model takes: every position of a BERT-style table, all but padding_idx + 1 of a RoBERTa-style one
    (its positions are numbered from there). usable_length took two off every table: BERT's 512 became 510."""
    from conftest import tiny_model

    model = tiny_model(model_type)
    longest = runner.usable_length(model, 10**6)
    assert longest == runner.max_tokens(model)  # report's limit
    assert runner.usable_length(model, 8) == 8
    model(input_ids=torch.full((1, longest), 5))
    with pytest.raises((IndexError, RuntimeError)):
        model(input_ids=torch.full((1, longest + 1), 5))


@pytest.mark.parametrize("model_max_length", [0, -1, "x", None, 4, int(1e30)])
def test_the_tokenizer_configs_model_max_length_is_never_the_limit(model_max_length, tiny_bert_dir, glue_dir,
                                                                    tmp_path, capfd):
    """Inputs are cut at max_length (--max-length), capped by the model's positions (usable_length): the tokenizer's
    own model_max_length, damaged (0, -1, "x"), small (4) or transformers' 'unknown' sentinel (int(1e30)), changes
    nothing and warns nothing, as an explicit max_length does in transformers."""
    import json
    import shutil

    import mhacompress

    folder = shutil.copytree(tiny_bert_dir, tmp_path / "model")
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["model_max_length"] = model_max_length
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    expected = mhacompress.evaluate(str(tiny_bert_dir), "stsb", data_dir=glue_dir, limit=8)["metrics"]
    capfd.readouterr()
    assert mhacompress.evaluate(str(folder), "stsb", data_dir=glue_dir, limit=8)["metrics"] == expected
    assert capfd.readouterr().err == ""


def test_fidelity(tokenizer):
    ex = examples("mnli")
    a, b = tiny(["entailment", "neutral", "contradiction"]), tiny(["entailment", "neutral", "contradiction"], seed=1)
    same = runner.fidelity(runner.run(a, tokenizer, ex), runner.run(a, tokenizer, ex))
    assert same["agreement"] == 1.0 and same["kl"] == pytest.approx(0.0, abs=1e-6)
    other = runner.fidelity(runner.run(b, tokenizer, ex), runner.run(a, tokenizer, ex))
    assert other["kl"] > 0
    enc = runner.fidelity(runner.run(tiny(), tokenizer, examples("stsb")),
                          runner.run(tiny(), tokenizer, examples("stsb")))
    assert enc["embedding_cosine"] == pytest.approx(1.0)


# The bundled MiniLM on STS-B dev (docs/evaluation.md): Spearman 0.8672, Pearson 0.8696. The bands are narrow enough
# to be disjoint, so a metric reported under the other's name fails.
MINILM_STSB = {"spearman": 0.8672, "pearson": 0.8696}
BAND = 0.001


@pytest.mark.slow
def test_minilm_stsb_spearman_and_pearson(glue_dir):
    from mhacompress.hub import load_pretrained

    assert abs(MINILM_STSB["spearman"] - MINILM_STSB["pearson"]) > 2 * BAND
    model, tok, _ = load_pretrained("minilm")
    ex = load_examples(get_task("stsb"), data_dir=glue_dir)
    assert len(ex) == 1500
    metrics = runner.score(ex, runner.run(model, tok, ex))
    assert metrics["spearman"] == pytest.approx(MINILM_STSB["spearman"], abs=BAND)
    assert metrics["pearson"] == pytest.approx(MINILM_STSB["pearson"], abs=BAND)


def test_outputs_that_overflow_are_refused_naming_the_model_and_the_task(tokenizer):
    """Finite weights too large for the model's dtype: NaN logits were read as class 0 (a score, exit 0), NaN
    embeddings and regression scores as null metrics. The first batch that has them is refused; the fix names float32
    for a half-precision model."""
    for labels, task in ((["entailment", "not_entailment"], "rte"), (None, "stsb"), (["score"], "stsb")):
        model = tiny(labels)
        with torch.no_grad():
            model.base_model.encoder.layer[1].attention.self.query.weight[:, 0].mul_(1e30)
            model.base_model.encoder.layer[1].attention.self.key.weight.mul_(1e37)
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
        with pytest.raises(UsageError, match=rf"^the big one's outputs overflowed to nan/inf on {task}'s inputs "
                                             r"\(its float32 weights .*: check the checkpoint"):
            runner.run(model, tokenizer, examples(task), name="the big one")
    half = tiny(["score"]).to(torch.float16)
    with torch.no_grad():
        half.base_model.encoder.layer[0].intermediate.dense.weight.mul_(1e4)  # finite in float16 (200s)...
        half.base_model.encoder.layer[0].output.dense.weight.mul_(1e3)  # ...but not the sums they make
    assert all(bool(torch.isfinite(p).all()) for p in half.parameters())
    with pytest.raises(UsageError, match="its float16 weights .*or load it in float32"):
        runner.run(half, tokenizer, examples("stsb"))


def test_a_metric_undefined_for_a_finite_model_is_scored_not_refused(tokenizer):
    """A regression head that predicts one constant has no Pearson or Spearman correlation (nan, reported as null):
    its outputs are finite, so it is scored, not refused as an overflow."""
    model = tiny(["score"])
    with torch.no_grad():
        model.classifier.weight.zero_()
    ex = examples("stsb")
    out = runner.run(model, tokenizer, ex)
    assert len(set(out.preds)) == 1
    with warnings.catch_warnings():  # nor scipy's ConstantInputWarning, with its source line, on stderr
        warnings.simplefilter("error")
        scores = runner.score(ex, out)
    assert all(math.isnan(v) for v in scores.values())
