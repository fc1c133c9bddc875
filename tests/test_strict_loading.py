"""Loading refuses, with one line naming the problem and the fix, every checkpoint transformers would load wrongly or
fail on with a traceback: damaged files, configs that disagree with the weights, weights that do not cover the model,
missing tokenizers, names no file system can hold. Nothing is unpickled without allow_pickle."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import mhacompress
from mhacompress.cli import main
from mhacompress.errors import UsageError
from mhacompress.hub import load_pretrained, save
from mhacompress.reduction.config import ReductionConfig
from mhacompress.reduction.surgery import reduce_


@pytest.fixture(scope="module")
def reduced_master(tmp_path_factory, tiny_bert_dir):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(tiny_bert_dir)  # its vocabulary is the tokenizer's
    reduce_(model, ReductionConfig(key_dim=8, n_iter_max=3))
    path = tmp_path_factory.mktemp("strict") / "reduced"
    save(model, AutoTokenizer.from_pretrained(tiny_bert_dir), path)
    return path


@pytest.fixture
def original(tiny_bert_dir, tmp_path):
    return shutil.copytree(tiny_bert_dir, tmp_path / "original")


@pytest.fixture
def reduced(reduced_master, tmp_path):
    return shutil.copytree(reduced_master, tmp_path / "reduced")


def edit_config(folder, change):
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def edit_weights(folder, change):
    weights = load_file(folder / "model.safetensors")
    change(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def loaders(folder):
    """Both entry points: load_pretrained (any checkpoint) and, for reduced folders, mhacompress.load."""
    calls = [lambda: load_pretrained(str(folder))]
    if "compression" in (folder / "config.json").read_text(errors="ignore"):
        calls.append(lambda: mhacompress.load(folder))
    return calls


def refused(folder, *fragments):
    for call in loaders(folder):
        with pytest.raises(UsageError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message
        for fragment in fragments:
            assert fragment in message, message


def truncate(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


DAMAGE = {
    "truncated weights": (truncate, ["model.safetensors is corrupt or truncated", "save the checkpoint again"]),
    "garbage weights": (lambda f: (f / "model.safetensors").write_bytes(b"\x00garbage" * 9),
                        ["corrupt or truncated"]),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), ["holds no model weights"]),
    "empty config": (lambda f: (f / "config.json").write_text(""), ["config.json is empty", "restore"]),
    "invalid config": (lambda f: (f / "config.json").write_text('{"model_type": "bert",\n oops}'),
                       ["config.json:2: not valid JSON", "restore"]),
    "config is a list": (lambda f: (f / "config.json").write_text("[1, 2]"), ["not an object"]),
    "binary config": (lambda f: (f / "config.json").write_bytes(b"\xff\xfe\x00x"), ["not UTF-8"]),
    "no model_type": (lambda f: edit_config(f, lambda c: c.pop("model_type")), ['no "model_type"', "bert"]),
    "no tokenizer": (lambda f: [(f / n).unlink() for n in ("tokenizer.json", "vocab.txt") if (f / n).exists()],
                     ["no tokenizer files", "tokenizer.save_pretrained"]),
    # transformers refuses a byte-order mark in any of its JSON files: "is not a valid JSON file.; pass a complete
    # checkpoint", the wrong fix
    "config with a BOM": (lambda f: _with_bom(f / "config.json"),
                          ["config.json starts with a UTF-8 byte-order mark", "save it without one"]),
    "tokenizer config with a BOM": (lambda f: _with_bom(f / "tokenizer_config.json"),
                                    ["tokenizer_config.json starts with a UTF-8 byte-order mark"]),
}


def _with_bom(file) -> None:
    file.write_bytes(b"\xef\xbb\xbf" + file.read_bytes())


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
@pytest.mark.parametrize("kind", ["original", "reduced"])
def test_damaged_folders_are_refused_in_one_line(damage, kind, request):
    folder = request.getfixturevalue(kind)
    change, fragments = DAMAGE[damage]
    change(folder)
    refused(folder, *fragments)


def test_weights_whose_shapes_disagree_with_the_config(original):
    edit_config(original, lambda c: c.update(intermediate_size=48))
    refused(original, "intermediate.dense.bias has shape (64,) in the weights but config.json needs (48,)", "restore")


def test_a_config_promising_more_layers_than_the_weights_hold(original):
    edit_config(original, lambda c: c.update(num_hidden_layers=3))
    refused(original, "do not cover the model", "encoder.layer.2.", "missing", "complete checkpoint")


def test_misnamed_tensors_are_named(original):
    def rename(w):
        w["encoder.layer.0.attention.self.qry.weight"] = w.pop("encoder.layer.0.attention.self.query.weight")

    edit_weights(original, rename)
    refused(original, "encoder.layer.0.attention.self.query.weight is missing", "attention.self.qry.weight")


def test_a_missing_pooler_is_tolerated(original):
    """Sentence encoders often ship without pooler weights (they pool by mean): transformers' usual case."""
    edit_weights(original, lambda w: [w.pop(k) for k in list(w) if k.startswith("pooler.")])
    model, _, _ = load_pretrained(str(original))
    assert model.config.num_hidden_layers == 2


def test_a_pooler_initialised_at_load_is_reported_not_saved_as_if_trained(original):
    """transformers warns that it initialised the pooler; loading keeps its warnings off stderr, so the reduction
    says it, in its report's warnings."""
    config = ReductionConfig(key_dim=8, n_iter_max=3)
    assert not [w for w in mhacompress.compress(str(original), config).report["warnings"] if "pooler" in w]
    edit_weights(original, lambda w: [w.pop(k) for k in list(w) if k.startswith("pooler.")])
    warnings = mhacompress.compress(str(original), config).report["warnings"]
    assert [w for w in warnings if "no pooler weights (pooler.dense.bias)" in w and "pooler_output" in w]


def test_weights_a_checkpoint_lacks_are_the_same_on_every_load(original):
    """A masked-LM checkpoint (roberta-base's and mpnet-base's layout) has no pooler: transformers initialised it from
    the global generator, so two identical `reduce` runs saved different weights. From a fixed seed now, and the
    caller's generator is left where it was."""
    edit_weights(original, lambda w: [w.pop(k) for k in list(w) if k.startswith("pooler.")])
    torch.manual_seed(1)
    first, _, _ = load_pretrained(str(original))
    after_first = torch.rand(1)
    torch.manual_seed(2)
    second, _, _ = load_pretrained(str(original))
    torch.testing.assert_close(first.pooler.dense.weight, second.pooler.dense.weight, rtol=0, atol=0)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after_first)  # the load drew nothing from the caller's generator


@pytest.mark.parametrize("label", [{"dtype": "float16"}, {"torch_dtype": "bfloat16"}, {"dtype": "int8"}])
def test_a_model_is_loaded_in_the_dtype_its_weights_are_stored_in_not_its_config_label(original, reduced, label):
    """transformers' dtype="auto" trusts config.json's label: a stale "float16" over float32 weights loaded (and
    `reduce` saved) the model at half precision, without a word; "int8" failed to load. The stored tensors decide."""
    for folder in (original, reduced):
        edit_config(folder, lambda c: [c.pop("dtype", None), c.update(label)])
        for call in loaders(folder):
            model = call()[0]
            assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.float8_e4m3fn])
def test_weights_stored_as_integers_or_8_bit_floats_are_refused_not_cast_to_float32(original, reduced, dtype):
    """A quantized checkpoint's codes were cast to float32 by transformers and reduced as if they were weights. The
    line fits every command that loads it (it said 'cannot be reduced' to eval, report and export too)."""
    for folder in (original, reduced):
        edit_weights(folder, lambda w: w.update({k: v.to(dtype) for k, v in w.items() if "intermediate.dense" in k}))
        refused(folder, "dense.weight is stored as", "not as floating point", "which mhacompress does not read",
                "float32, float16 or bfloat16")


def test_integer_buffers_beside_floating_weights_are_loaded_as_before(original):
    edit_weights(original, lambda w: w.update({"embeddings.position_ids": torch.arange(16)[None]}))
    model = load_pretrained(str(original))[0]
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_a_tokenizer_with_more_tokens_than_the_embedding_table_is_refused_at_load(original, reduced):
    """A tokenizer that is not the model's was found only when some text reached a high id: `eval --limit 16`
    scored, the full split failed, and a calibration that never reached one saved a folder eval then refused."""
    edit_config(original, lambda c: c.update(vocab_size=100))
    edit_weights(original, lambda w: w.update({k: v[:100] for k, v in w.items() if "word_embeddings" in k}))
    edit_config(reduced, lambda c: c.update(vocab_size=100))
    edit_weights(reduced, lambda w: w.update({k: v[:100] for k, v in w.items() if "word_embeddings" in k}))
    for folder in (original, reduced):
        for call in loaders(folder):
            with pytest.raises(UsageError, match=r"tokenizer has 30522 tokens but the model's embedding table has "
                                                 r"100 rows.*not this model's"):
                call()
        load_pretrained(str(folder), tokenizer=False)  # without its tokenizer the model itself is sound


def test_a_config_asking_for_attention_maps_is_reduced_saved_and_reloaded(original, tmp_path):
    """"output_attentions": true in config.json (saved by attention-analysis code): sdpa cannot give the maps, so the
    reduction ran to the end and saving failed with transformers' traceback; report's sdpa load failed too."""
    edit_config(original, lambda c: c.update(output_attentions=True))
    load_pretrained(str(original), attn_implementation="sdpa")
    result = mhacompress.compress(str(original), ReductionConfig(key_dim=8, n_iter_max=3))
    result.save(tmp_path / "out")
    mhacompress.load(tmp_path / "out", attn_implementation="sdpa")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_checkpoint_is_loaded_in_its_own_dtype(original, dtype):
    edit_weights(original, lambda w: w.update({k: v.to(dtype) for k, v in w.items()}))
    edit_config(original, lambda c: c.pop("dtype", None))
    model, _, _ = load_pretrained(str(original))
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_a_sharded_checkpoint_whose_shards_link_into_a_hub_cache_loads(tiny_bert_dir, tmp_path):
    """Shard names must stay inside the folder ('../x', '/x' are refused: tests/test_bad_inputs.py), but a hub cache's
    snapshot folder holds its shards as symlinks into ../../blobs: those are followed as usual."""
    from transformers import AutoModel, AutoTokenizer

    snapshot, blobs = tmp_path / "snapshots" / "abc", tmp_path / "blobs"
    AutoModel.from_pretrained(tiny_bert_dir).save_pretrained(snapshot, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(snapshot)
    shards = sorted(snapshot.glob("model-*.safetensors"))
    assert len(shards) >= 2
    blobs.mkdir()
    for shard in shards:
        shard.rename(blobs / shard.name)
        shard.symlink_to(Path("..", "..", "blobs", shard.name))
    model, _, _ = load_pretrained(str(snapshot))
    assert model.config.num_hidden_layers == 2


def test_a_fine_tuned_head_that_would_be_dropped_is_refused(tiny_bert_dir, tmp_path):
    """A token-classification (or question-answering, multiple-choice) checkpoint was loaded as its bare encoder and
    reduced without a word: its fine-tuned head silently gone. A pre-training head (masked LM: bert-base-uncased) is
    still read as the encoder, the documented way to reduce a base model."""
    from transformers import AutoTokenizer, BertForMaskedLM, BertForTokenClassification

    from conftest import tiny_config

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    for cls in (BertForTokenClassification, BertForMaskedLM):
        cls(tiny_config("bert", vocab_size=len(tokenizer))).save_pretrained(tmp_path / cls.__name__)
        tokenizer.save_pretrained(tmp_path / cls.__name__)
    with pytest.raises(UsageError, match="BertForTokenClassification head.*dropped.*sequence-classification"):
        mhacompress.compress(str(tmp_path / "BertForTokenClassification"), ReductionConfig(key_dim=8))
    reduced = mhacompress.compress(str(tmp_path / "BertForMaskedLM"), ReductionConfig(key_dim=8, n_iter_max=3))
    assert type(reduced.model).__name__ == "CollaborativeBertModel"


def test_a_classifier_whose_config_names_no_architectures_is_refused_not_read_without_its_head(tiny_bert_dir,
                                                                                                  tmp_path):
    """Without "architectures" the checkpoint was read as its bare encoder: reduce exited 0 and saved no classifier.
    An encoder without architectures still loads."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    from conftest import tiny_config

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    BertForSequenceClassification(tiny_config("bert", vocab_size=len(tokenizer))).save_pretrained(tmp_path / "cls")
    tokenizer.save_pretrained(tmp_path / "cls")
    shutil.copytree(tiny_bert_dir, tmp_path / "encoder")
    for folder in (tmp_path / "cls", tmp_path / "encoder"):
        edit_config(folder, lambda c: c.pop("architectures"))
    with pytest.raises(UsageError, match=r"classification head \(classifier.bias\).*names no architectures.*"
                                         r"\[\"BertForSequenceClassification\"\]"):
        load_pretrained(str(tmp_path / "cls"))
    assert type(load_pretrained(str(tmp_path / "encoder"))[0]).__name__ == "BertModel"


def test_a_reduced_config_whose_block_was_emptied_is_named_not_run_as_remote_code(reduced):
    """The folder then read as an original, and transformers asked to run the code its auto_map names."""
    edit_config(reduced, lambda c: c.update(compression={}))
    with pytest.raises(UsageError, match="config.json says model_type 'mhacompress-bert', a reduced model, but its "
                                         "'compression' block is missing or empty"):
        load_pretrained(str(reduced))


def test_an_edited_key_dim_is_refused(reduced):
    edit_config(reduced, lambda c: c["compression"].update(key_dim=12))
    refused(reduced, "says key_dim 12 but its layers have [8]")


def test_an_edited_layer_key_dim_disagrees_with_the_weights(reduced):
    def change(config):  # edited consistently everywhere in the block: only the weights can tell
        block = config["compression"]
        block["key_dim"] = block["reduction"]["key_dim"] = None
        block["layers"][0]["key_dim"] = 12
        block["reduction"]["key_dims"] = [layer["key_dim"] for layer in block["layers"]]

    edit_config(reduced, change)
    refused(reduced, "in the weights but config.json needs")


def test_a_layer_key_dim_that_disagrees_with_the_saved_reduction_settings_is_refused(reduced):
    def change(config):
        config["compression"]["key_dim"] = None
        config["compression"]["layers"][0]["key_dim"] = 12

    edit_config(reduced, change)
    refused(reduced, "reduction settings")


@pytest.mark.parametrize("change,fragment", [
    (lambda b: b.update(method="pca"), "method 'pca'"),
    (lambda b: b.update(layers=b["layers"][:1]), "describes 1 layers"),
    (lambda b: b["layers"][1].update(key_dim="8"), "positive integer key_dim"),
    (lambda b: b.pop("base_architecture"), "base architecture"),
    (lambda b: b["reduction"].update(n_iter_max=0), "n_iter_max (--iterations) must be an integer >= 1"),
    (lambda b: b["reduction"].update(shiny=True), "unknown reduction settings"),
    (lambda b: b["layers"][1].update(index=0), "layers are numbered 0, 0, not 0 to 1 in order"),
    (lambda b: b["layers"][1].update(index=-1), "layers are numbered 0, -1"),
    (lambda b: b["layers"][1].update(index=True), "layers are numbered 0, True"),
    (lambda b: b.update(key_dim=8.0), "key_dim 8.0 is not a whole number"),
    (lambda b: b.update(base_model_type="gpt2"), "says base_model_type 'gpt2' but config.json describes a bert model"),
    (lambda b: b.update(modified=["zzz"]), "modified list names 'zzz', not the attention output projection"),
    (lambda b: b.update(modified=["encoder.layer.2.attention.output.dense"]), "names 'encoder.layer.2.attention"),
    (lambda b: b.update(modified=["encoder.layer.0.attention.self.query"]), "not the attention output projection"),
])
def test_broken_compression_blocks_are_refused(reduced, change, fragment):
    edit_config(reduced, lambda c: change(c["compression"]))
    refused(reduced, fragment)


def test_tokenizer_false_loads_a_folder_without_tokenizer_files(reduced):
    (reduced / "tokenizer.json").unlink()
    (reduced / "vocab.txt").unlink(missing_ok=True)
    model, tokenizer = mhacompress.load(reduced, tokenizer=False)
    assert tokenizer is None and model.config.compression["key_dim"] == 8


def test_pickled_weights_are_never_unpickled_without_allow_pickle(original, monkeypatch):
    model = load_pretrained(str(original))[0]
    (original / "model.safetensors").unlink()
    torch.save(model.state_dict(), original / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    refused(original, "no safetensors weights", "allow_pickle=True")


@pytest.mark.parametrize("command", [
    ["report", "{src}", "-k", "8", "--no-latency", "--seq-len", "8"],
    ["sweep", "{src}", "-t", "stsb", "--key-dims", "8", "--methods", "cp", "--limit", "4", "--data-dir", "{glue}"],
], ids=["report", "sweep"])
def test_the_option_a_pickle_refusal_names_is_one_the_command_takes(original, glue_dir, command):
    """report and sweep refused pickled weights saying 'pass --allow-pickle', an option they did not have."""
    model = load_pretrained(str(original))[0]
    (original / "model.safetensors").unlink()
    torch.save(model.state_dict(), original / "pytorch_model.bin")
    args = [a.format(src=original, glue=glue_dir) for a in command]
    refused = CliRunner().invoke(main, [*args, "--json"])
    assert refused.exit_code == 1 and "no safetensors weights" in refused.output, refused.output
    assert "--allow-pickle" in refused.output
    allowed = CliRunner().invoke(main, [*args, "--allow-pickle", "--json"])
    assert allowed.exit_code == 0, allowed.output
    report = json.loads(allowed.stdout)
    assert report["model"] == str(original) and not report.get("failed")


@pytest.mark.parametrize("command", [
    ["eval", "{r}", "-t", "stsb", "--limit", "4", "--data-dir", "{glue}"],
    ["eval", "{r}", "-t", "stsb", "--limit", "4", "--data-dir", "{glue}", "--allow-pickle"],
    ["report", "{r}", "--no-latency", "--seq-len", "8"],
    ["report", "{r}", "--no-latency", "--seq-len", "8", "--allow-pickle"],
    ["export", "{r}", "-o", "{r}.onnx"],
], ids=["eval", "eval-allow-pickle", "report", "report-allow-pickle", "export"])
def test_a_reduced_folder_with_pickled_weights_is_refused_without_advice_that_cannot_help(reduced, glue_dir, command,
                                                                                           monkeypatch):
    """Reduced folders are read from safetensors alone: the refusal said 'pass --allow-pickle', which then gave the
    same refusal (export has no such option, mhacompress.load no such argument)."""
    weights = load_file(reduced / "model.safetensors")
    (reduced / "model.safetensors").unlink()
    torch.save(weights, reduced / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    result = CliRunner().invoke(main, [*(a.format(r=reduced, glue=glue_dir) for a in command), "--json"])
    assert result.exit_code == 1 and "a reduced model without safetensors weights" in result.output, result.output
    assert "allow-pickle" not in result.output.splitlines()[-1] and "Traceback" not in result.output
    with pytest.raises(UsageError, match="reduce the original again") as refusal:
        mhacompress.load(reduced)
    assert "allow_pickle" not in str(refusal.value)


class _NotATensor:
    pass


def test_a_pickle_that_a_safe_load_refuses_is_refused_without_torchs_advice_to_load_it_unsafely(original):
    """torch's message was cut to '... Re-running `torch.load` with `weights_only` set to `False`; pass a complete
    checkpoint', which reads as advice to run the pickle."""
    (original / "model.safetensors").unlink()
    torch.save({"embeddings.word_embeddings.weight": _NotATensor()}, original / "pytorch_model.bin")
    with pytest.raises(UsageError, match=r"its pickled weights hold objects that a safe load refuses .*safetensors$") \
            as refusal:
        load_pretrained(str(original), allow_pickle=True)
    assert "False" not in str(refusal.value)


@pytest.mark.parametrize("message,shown", [
    ("short.", "short."),
    ("First sentence, long enough to keep. " + "x " * 120, "First sentence, long enough to keep."),
    ("word " * 60, ("word " * 40).strip() + " ..."),
    ("word " * 10 + "x" * 300, ("word " * 10).strip() + " ..."),
])
def test_a_long_error_is_cut_after_a_sentence_or_a_word(message, shown):
    from mhacompress.hub import _first_line

    assert _first_line(OSError(message)) == shown


@pytest.mark.parametrize("name,fragment", [
    ("x" * 300, "more than a file name can be"),
    ("/tmp/" + "a/" * 2100, "more than a path can be"),
    ("not a hub id!", "neither a model folder nor a hub id"),
    ("", "no model given"),
])
def test_impossible_names_are_refused(name, fragment):
    with pytest.raises(UsageError, match=fragment):
        load_pretrained(name)


def test_the_cli_shows_loading_problems_as_one_line(original, tmp_path):
    truncate(original)
    result = CliRunner().invoke(main, ["reduce", str(original), "-k", "8", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "corrupt or truncated" in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_a_refused_checkpoint_warns_nothing_besides_its_line(original):
    """transformers builds the model before the weights are checked: torch warned "Initializing zero-element tensors
    is a no-op" for a zero width, two lines on stderr before the error's one."""
    import warnings

    edit_config(original, lambda c: c.update(intermediate_size=0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refused(original, "has shape", "restore the checkpoint's own config.json")
    assert [str(w.message) for w in caught] == []
