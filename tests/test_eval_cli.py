"""`mhacompress eval`, `finetune` and `reduce --eval` end to end on tiny random models and the fixture GLUE files;
bad inputs give one-line errors without a traceback."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mhacompress.cli import main

FIXTURES = str(Path(__file__).parent / "fixtures" / "glue")


def _save_tiny(folder: Path, head_labels=None) -> str:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    from mhacompress.hub import bundled_model_path

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    if head_labels:
        config.num_labels, config.id2label = len(head_labels), dict(enumerate(head_labels))
        config.label2id = {n: i for i, n in enumerate(head_labels)}
    model = (BertForSequenceClassification if head_labels else BertModel)(config)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(bundled_model_path()).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("tiny") / "encoder")


@pytest.fixture(scope="module")
def mnli_classifier(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("tiny") / "mnli", ["entailment", "neutral", "contradiction"])


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def one_line_error(result, *fragments):
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_eval_json_on_fixtures(encoder):
    result = invoke("eval", encoder, "--task", "stsb", "--data-dir", FIXTURES, "--json")
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    assert set(obj) == {"model", "task", "split", "examples", "metrics", "seconds", "schema_version", "command",
                        "tool_version", "torch", "transformers", "device"}
    assert obj["task"] == "stsb" and obj["split"] == "validation" and obj["examples"] == 6
    assert set(obj["metrics"]) == {"spearman", "pearson"}


def test_eval_classifier_and_reference(mnli_classifier):
    result = invoke("eval", mnli_classifier, "-t", "mnli-mm", "--data-dir", FIXTURES, "--limit", "1",
                    "--reference", mnli_classifier, "--json")
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    assert obj["examples"] == 1 and set(obj["metrics"]) == {"accuracy"}
    assert obj["fidelity"]["agreement"] == 1.0 and obj["fidelity"]["kl"] == pytest.approx(0, abs=1e-6)
    assert obj["reference"]["drop"] == 0 and "interval" not in obj["reference"]  # one example: nothing to resample


def test_eval_reference_reports_the_drop_and_its_interval_as_reduce_does(encoder, tmp_path):
    reduced = tmp_path / "reduced"
    assert invoke("reduce", encoder, "-k", "4", "--weights-only", "-o", reduced).exit_code == 0
    result = invoke("eval", reduced, "-t", "stsb", "--data-dir", FIXTURES, "--reference", encoder, "--json")
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    ref = obj["reference"]
    assert ref["drop"] == pytest.approx(ref["metrics"]["spearman"] - obj["metrics"]["spearman"])
    low, high = ref["interval"]
    assert low <= high
    table = invoke("eval", reduced, "-t", "stsb", "--data-dir", FIXTURES, "--reference", encoder)
    assert "drop in spearman from the reference" in table.output and "95% interval" in table.output


def test_a_reference_of_the_other_kind_is_refused_before_either_model_runs(mnli_classifier, encoder, monkeypatch):
    from mhacompress.eval import compare

    def never(*args, **kwargs):
        raise AssertionError("a model ran before the kinds were checked")

    monkeypatch.setattr(compare.Scorer, "outputs", never)
    result = invoke("eval", mnli_classifier, "-t", "mnli", "--data-dir", FIXTURES, "--reference", encoder)
    one_line_error(result, "cannot compare a classifier", "with an encoder", "pass the original")


def test_eval_encoder_fidelity_on_any_task(encoder):
    result = invoke("eval", encoder, "-t", "mrpc", "--data-dir", FIXTURES, "--reference", encoder, "--json")
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    assert obj["metrics"] == {} and obj["fidelity"]["embedding_cosine"] == pytest.approx(1.0)


def test_eval_table(encoder):
    result = invoke("eval", encoder, "--task", "stsb", "--data-dir", FIXTURES)
    assert result.exit_code == 0 and "spearman" in result.output


@pytest.mark.parametrize("args,fragments", [
    (["--task", "glue"], ["unknown task 'glue'", "cola"]),
    (["--task", "qqp", "--data-dir", "."], ["QQP/dev.tsv", "glue_data layout"]),
    (["--task", "mrpc", "--data-dir", FIXTURES], ["plain encoder", "mhacompress finetune MODEL --task mrpc --output "
                                                   "DIR"]),
    (["--task", "rte", "--split", "tset", "--data-dir", FIXTURES], ["no split 'tset'"]),
])
def test_eval_bad_inputs(encoder, args, fragments):
    one_line_error(invoke("eval", encoder, *args), *fragments)


def test_eval_wrong_head(mnli_classifier, glue_dir):
    one_line_error(invoke("eval", mnli_classifier, "--task", "rte", "--data-dir", glue_dir),
                   "3-label head; rte needs 2 labels", "fine-tune one: mhacompress finetune MODEL --task rte")


def test_eval_no_data_offline(encoder, monkeypatch):
    monkeypatch.delenv("MHACOMPRESS_GLUE_DIR", raising=False)
    one_line_error(invoke("eval", encoder, "--task", "qqp", env={"HF_HUB_OFFLINE": "1"}),
                   "no GLUE data for qqp", "--data-dir")


def test_eval_missing_model():
    one_line_error(invoke("eval", "./no/such/model", "--task", "stsb", "--data-dir", FIXTURES), "no model folder")


def test_finetune_end_to_end(encoder, tmp_path):
    out = tmp_path / "qnli"
    result = invoke("finetune", encoder, "--task", "qnli", "--output", out, "--data-dir", FIXTURES, "--epochs", 2,
                    "--batch-size", 2, "--lr", "1e-3", "--json")
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    assert obj["steps"] == 4 and obj["examples"] == 3 and set(obj["eval"]["metrics"]) == {"accuracy"}
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "entailment", "1": "not_entailment"}
    one_line_error(invoke("finetune", encoder, "--task", "qnli", "--output", out, "--data-dir", FIXTURES),
                   "exists and is not empty")
    again = invoke("eval", out, "--task", "qnli", "--data-dir", FIXTURES, "--json")
    assert json.loads(again.stdout)["metrics"] == obj["eval"]["metrics"]


def test_finetune_without_train_split(encoder, tmp_path):
    one_line_error(invoke("finetune", encoder, "--task", "wnli", "--output", tmp_path / "x", "--data-dir", FIXTURES),
                   "WNLI/train.tsv")


def test_reduce_eval_refuses_a_task_without_train_sentences_instead_of_reducing_from_the_weights(encoder, tmp_path):
    out = tmp_path / "out"
    result = invoke("reduce", encoder, "-k", "4", "--eval", "stsb", "--data-dir", FIXTURES, "-o", out)
    one_line_error(result, "--eval stsb calibrates on its train sentences", "STS-B/train.tsv", "--calibrate SOURCE",
                   "--weights-only")
    assert not out.exists()


def test_reduce_eval_and_max_drop(encoder, monkeypatch):
    args = ["reduce", encoder, "-k", "4", "--iterations", "5", "--eval", "stsb", "--weights-only", "--data-dir",
            FIXTURES]
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    block = json.loads(result.stdout)["eval"]
    assert block["task"] == "stsb" and block["metric"] == "spearman"
    assert block["drop"] == pytest.approx(block["original"] - block["reduced"])
    low, high = block["interval"]  # the drop's paired bootstrap interval over the split's pairs
    assert low <= high and -2 <= low and high <= 2
    assert set(block["all"]["intervals"]) == {"spearman", "pearson"}  # one for each metric
    assert block["all"]["intervals"]["spearman"] == block["interval"]
    assert invoke(*args, "--max-drop", 2).exit_code == 0  # no Spearman falls by more than 2
    import mhacompress.eval.compare as compare  # the fixture's 6 pairs rank alike after reduction (drop 0): worsen

    real = compare.side_by_side  # the reduced model's score, so that the gate has a drop to bound
    monkeypatch.setattr(compare, "side_by_side", lambda task, original, reduced, intervals: real(
        task, original, {**reduced, task.main: reduced[task.main] - 0.25}, intervals))
    gate = invoke(*args, "--max-drop", 0.2)
    one_line_error(gate, "more than --max-drop 0.2")
    assert gate.exit_code == 1
    assert invoke(*args, "--max-drop", 0.3).exit_code == 0
    assert invoke("reduce", encoder, "-k", "4", "--max-drop", "0.1").exit_code != 0


# ---- the exact [CLS] shortcut on reduce and eval ----------------------------------------------------------------

@pytest.fixture(scope="module")
def reduced_pair(mnli_classifier, tmp_path_factory):
    """The same reduction saved twice: plain, and with --first-token-only (scored by --eval on the way)."""
    root = tmp_path_factory.mktemp("cls")
    args = ("reduce", mnli_classifier, "-k", "8", "--eval", "mnli", "--data-dir", FIXTURES, "--json")
    plain, shortcut = invoke(*args, "-o", root / "plain"), invoke(*args, "-o", root / "cls", "--first-token-only")
    assert plain.exit_code == 0 and shortcut.exit_code == 0, plain.output + shortcut.output
    return root / "plain", root / "cls", json.loads(plain.stdout), json.loads(shortcut.stdout)


def test_reduce_first_token_only_is_saved_and_scores_the_same(reduced_pair):
    plain_dir, cls_dir, plain, shortcut = reduced_pair
    assert shortcut["first_token_only"] is True and plain["first_token_only"] is False
    assert shortcut["eval"]["reduced"] == pytest.approx(plain["eval"]["reduced"], abs=1e-12)
    saved = json.loads((cls_dir / "config.json").read_text())["compression"]
    assert saved["first_token_only"] is True

    from mhacompress import load

    with_shortcut, tok = load(cls_dir)
    without, _ = load(plain_dir)
    batch = tok(["a short one", "a somewhat longer sentence with padding after it"], padding=True,
                return_tensors="pt")
    with torch.no_grad():
        got = with_shortcut.eval()(**batch, output_hidden_states=True)
        want = without.eval()(**batch)
    assert got.hidden_states[-1].shape[1] == 1  # the last layer really ran for [CLS] alone
    torch.testing.assert_close(got.logits, want.logits, atol=1e-6, rtol=0)


def test_eval_first_token_only_agrees_with_the_full_model(reduced_pair):
    plain_dir, *_ = reduced_pair
    result = invoke("eval", plain_dir, "-t", "mnli", "--data-dir", FIXTURES, "--first-token-only",
                    "--reference", plain_dir, "--json")
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    assert obj["fidelity"]["agreement"] == 1.0 and obj["fidelity"]["kl"] == pytest.approx(0, abs=1e-9)


def test_first_token_only_bad_inputs(encoder, mnli_classifier, tmp_path):
    """Both are a flag the model cannot take (exit 2, as a key dim too wide): an encoder, an unreduced classifier."""
    out = tmp_path / "never"
    result = invoke("reduce", encoder, "-k", "8", "-o", out, "--first-token-only")
    one_line_error(result, "sequence classifiers")
    assert result.exit_code == 2 and not out.exists()
    result = invoke("eval", mnli_classifier, "-t", "mnli", "--data-dir", FIXTURES, "--first-token-only")
    one_line_error(result, "reduced model")
    assert result.exit_code == 2


def test_max_drop_gate_fails_on_an_undefined_metric():
    """A nan drop (STS-B correlations of constant predictions) must not pass the CI gate: nan > x is False."""
    import click

    from mhacompress.cli.eval import check_drop
    from mhacompress.eval.compare import gated

    block = {"task": "stsb", "metric": "spearman", "original": 0.8, "reduced": float("nan"), "drop": float("nan")}
    assert gated(block, 0.01)["passed"] is False
    with pytest.raises(click.ClickException, match="undefined"):
        check_drop({"eval": gated(block, 0.01)})
    check_drop({"eval": gated({**block, "reduced": 0.8, "drop": 0.0}, 0.01)})  # a real drop within bounds passes
