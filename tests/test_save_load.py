"""A reduced model is an ordinary HF folder: it reloads with one call, both ways, with identical outputs."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import mhacompress
from conftest import padded_batch, tiny_model
from mhacompress.errors import UsageError
from mhacompress.hub import REMOTE_CODE_FILE, save
from mhacompress.reduction.config import ReductionConfig
from mhacompress.reduction.surgery import reduce_


def reduced(model_type="bert", head=False, key_dim=8, method="cp", seed=0):
    model = tiny_model(model_type, head=head)
    reduce_(model, ReductionConfig(key_dim=key_dim, method=method, seed=seed), source="tiny", tool_version="test")
    return model


def run(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("model_type,head,method", [
    ("bert", False, "cp"), ("bert", True, "tucker"), ("mpnet", False, "cp"), ("distilbert", True, "svd"),
    ("roberta", True, "cp"), ("electra", False, "cp"), ("xlm-roberta", False, "tucker"), ("camembert", True, "cp"),
    ("data2vec-text", False, "svd"), ("ernie", True, "cp"),
])
def test_save_then_load_gives_identical_outputs(tmp_path, model_type, head, method):
    model = reduced(model_type, head, method=method)
    batch = padded_batch()
    save(model, None, tmp_path / "out")
    again, _ = mhacompress.load(tmp_path / "out", attn_implementation=model.config._attn_implementation,
                                tokenizer=False)
    assert type(again).__name__ == type(model).__name__ == "Collaborative" + type(tiny_model(model_type, head)).__name__
    assert torch.equal(run(again, batch), run(model, batch))


def test_a_reloaded_model_saves_and_reloads_again(tmp_path):
    model = reduced(head=True)
    save(model, None, tmp_path / "a")
    again, _ = mhacompress.load(tmp_path / "a", attn_implementation="eager", tokenizer=False)
    save(again, None, tmp_path / "b")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_mhacompress.CollaborativeBertModel"
    third, _ = mhacompress.load(tmp_path / "b", attn_implementation="eager", tokenizer=False)
    batch = padded_batch()
    assert torch.equal(run(third, batch), run(model, batch))


def test_saved_folder_layout_and_compression_block(tmp_path):
    model = reduced(head=True)
    save(model, None, tmp_path / "out")
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "model.safetensors", REMOTE_CODE_FILE} <= files
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    block = config["compression"]
    assert block["format_version"] == 2 and block["method"] == "cp" and block["key_dim"] == 8
    assert block["layout"] == "diagonal" and block["base_model_type"] == "bert" and block["modified"] == []
    assert config["model_type"] == "mhacompress-bert"  # plain transformers refuses it instead of loading random Q/K
    assert config["architectures"] == ["CollaborativeBertForSequenceClassification"]
    assert block["source_model"] == "tiny" and block["tool_version"] == "test" and block["reduction"]["seed"] == 0
    assert [layer["key_dim"] for layer in block["layers"]] == [8, 8]
    assert all(0 < layer["relative_error"] < 1 for layer in block["layers"])
    assert config["auto_map"] == {
        "AutoConfig": "modeling_mhacompress.CollaborativeBertConfig",
        "AutoModel": "modeling_mhacompress.CollaborativeBertModel",
        "AutoModelForSequenceClassification": "modeling_mhacompress.CollaborativeBertForSequenceClassification",
    }
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert "bert.encoder.layer.0.attention.self.mixing" in weights
    assert "bert.encoder.layer.0.attention.self.query.weight" not in weights


REMOTE = """
import sys, torch
from transformers import AutoModel, AutoModelForSequenceClassification
cls = AutoModelForSequenceClassification if sys.argv[2] == "head" else AutoModel
model = cls.from_pretrained(sys.argv[1], trust_remote_code=True, attn_implementation="eager").eval()
batch = torch.load(sys.argv[1] + "/batch.pt")
with torch.no_grad():
    out = model(**batch)
torch.save(out.logits if sys.argv[2] == "head" else out.last_hidden_state, sys.argv[1] + "/remote.pt")
assert not any(name.startswith("mhacompress") for name in sys.modules), "remote code imported mhacompress"
"""


@pytest.mark.parametrize("head,writer", [(False, "hub.save"), (True, "hub.save"), (False, "save_pretrained"),
                                         (True, "save_pretrained")])
def test_automodel_with_remote_code_in_a_process_without_mhacompress(tmp_path, head, writer):
    model = reduced(head=head)
    out = tmp_path / "out"
    save(model, None, out) if writer == "hub.save" else model.save_pretrained(out)  # the model saves itself
    batch = padded_batch()
    torch.save(batch, out / "batch.pt")
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", REMOTE, str(out), "head" if head else "encoder"], check=True, cwd=tmp_path,
                   env=env, timeout=120)
    assert torch.equal(torch.load(out / "remote.pt"), run(model, batch))


def test_plain_save_pretrained_reloads_as_the_reduced_model(tmp_path):
    model = reduced(head=True)
    model.save_pretrained(tmp_path / "out")
    again, _ = mhacompress.load(tmp_path / "out", attn_implementation="eager", tokenizer=False)
    batch = padded_batch()
    assert torch.equal(run(again, batch), run(model, batch))
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"modeling_mhacompress.py", "attention.py", "kernels.py",
                                                              "architectures.py"}


def test_plain_transformers_refuses_a_reduced_folder_instead_of_loading_random_weights(tmp_path):
    from transformers import AutoModel

    reduced().save_pretrained(tmp_path / "out")
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModel.from_pretrained(tmp_path / "out")


def test_a_format_1_folder_still_loads(tmp_path):
    model = reduced()
    model.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    block = config["compression"]
    for key in ("layout", "base_model_type", "modified", "first_token_only"):
        del block[key]
    block["format_version"], config["model_type"] = 1, "bert"
    block["reduction"] = {"key_dim": 8, "method": "cp", "key_dims": None, "n_iter_max": 100, "tol": 1e-5,
                          "init": "svd", "seed": 0, "extra": {}}
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    again, _ = mhacompress.load(tmp_path / "old", attn_implementation="eager", tokenizer=False)
    batch = padded_batch()
    assert torch.equal(run(again, batch), run(model, batch))


def test_same_seed_gives_bit_identical_weights():
    a, b = reduced(seed=3).state_dict(), reduced(seed=3).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_existing_output_is_refused_without_force_and_replaced_with_it(tmp_path):
    out = tmp_path / "out"
    save(reduced(), None, out)
    (out / "notes.txt").write_text("a file of the earlier model")
    with pytest.raises(UsageError, match="exists and is not empty; choose another output or pass force=True"):
        save(reduced(), None, out)
    assert (out / "notes.txt").exists()
    save(reduced(), None, out, force=True)
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or backup folders left behind


def test_force_never_deletes_a_folder_that_holds_no_model(tmp_path):
    out = tmp_path / "projects"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(UsageError, match="holds files but no model .no config.json., so force=True will not delete it"):
        save(reduced(), None, out, force=True)
    assert (out / "keep.txt").read_text() == "precious" and [p.name for p in tmp_path.iterdir()] == ["projects"]


@pytest.mark.parametrize("config,extra,message", [
    ('{"name": "my web app", "port": 8080}', None, "holds a config.json that is not a model's .no model_type."),
    ("not json at all", None, "holds a config.json that is not a model's"),
    ('{"model_type": "bert"}', ".git", r"is under version control \(.git\)"),
], ids=["a-project-config", "a-damaged-config", "a-git-clone"])
def test_force_never_deletes_a_project_that_happens_to_hold_a_config_json(tmp_path, config, extra, message):
    """Any config.json made a folder a model's: a project folder with its own config.json, its code and its .git was
    deleted whole by --force."""
    out = tmp_path / "project"
    (out / "src").mkdir(parents=True)
    (out / "config.json").write_text(config)
    (out / "src" / "main.py").write_text("print(1)")
    if extra:
        (out / extra).mkdir()
        (out / extra / "HEAD").write_text("ref: refs/heads/main")
    with pytest.raises(UsageError, match=message + ".*force=True will not delete it"):
        save(reduced(), None, out, force=True)
    assert (out / "src" / "main.py").read_text() == "print(1)" and (out / "config.json").read_text() == config
    assert [p.name for p in tmp_path.iterdir()] == ["project"]


def test_a_failed_save_leaves_nothing_and_keeps_the_old_folder(tmp_path, monkeypatch):
    model = reduced()
    out = tmp_path / "out"
    save(model, None, out)
    before = sorted(p.name for p in out.iterdir())

    class Boom(RuntimeError):
        pass

    def explode(*args, **kwargs):
        raise Boom("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", explode)
    with pytest.raises(Boom):
        save(model, None, out, force=True)
    with pytest.raises(Boom):
        save(model, None, tmp_path / "fresh")
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_load_refuses_folders_that_are_not_reduced_models(tmp_path):
    with pytest.raises(UsageError, match="not a model folder"):
        mhacompress.load(tmp_path)
    tiny_model("bert").save_pretrained(tmp_path / "plain")
    with pytest.raises(UsageError, match="not a reduced model"):
        mhacompress.load(tmp_path / "plain")


@pytest.mark.parametrize("name", ["minilm", "BAAI/bge-small-en-v1.5"])
def test_load_given_a_model_name_says_to_reduce_it_first(name, tmp_path, monkeypatch):
    """An alias or hub id is what reduce takes; load (and export, report) take the folder reduce writes."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=f"^{name} names an original model.*mhacompress reduce {name} --key-dim"):
        mhacompress.load(name)
    (tmp_path / "out").mkdir()  # out/typo is a path under a folder that exists, not a hub id
    for path in ("out/typo", "./BAAI/bge-small-en-v1.5"):
        with pytest.raises(UsageError, match="not a model folder"):
            mhacompress.load(path)


@pytest.mark.parametrize("path", [None, 5, ["out"]])
def test_load_refuses_a_path_of_the_wrong_kind_in_one_line(path):
    with pytest.raises(UsageError, match="load takes the folder of a reduced model"):
        mhacompress.load(path)


@pytest.mark.parametrize("reduction,fragment", [
    ("cp at 8", "must be an object"), ({"key_dim": 8, "extra": "x"}, "extra settings must be an object"),
    ({"key_dim": 8, "extra": {"calibration": {}}}, "need a source and samples"),
    ({"key_dim": 8, "extra": {"calibration": "mrpc"}}, "need a source and samples"),
])
def test_damaged_saved_settings_are_config_errors(reduction, fragment):
    from mhacompress.reduction.config import ConfigError

    with pytest.raises(ConfigError, match=fragment):
        ReductionConfig.from_dict(reduction)


def test_a_folder_reduced_from_a_relative_path_reports_against_its_original_from_any_folder(tiny_bert_dir, tmp_path,
                                                                                           monkeypatch):
    # the block recorded 'bert' as typed, so `report` from another working folder looked for a hub model 'bert'
    monkeypatch.chdir(tiny_bert_dir.parent)
    mhacompress.compress(tiny_bert_dir.name, ReductionConfig(key_dim=8, n_iter_max=3)).save(tmp_path / "out")
    monkeypatch.chdir(tmp_path)
    block = json.loads((tmp_path / "out" / "config.json").read_text())["compression"]
    assert block["source_model"] == str(tiny_bert_dir)
    assert mhacompress.report(tmp_path / "out", seq_len=32, latency=False)["original"] == str(tiny_bert_dir)


def test_reduce_records_a_path_source_as_the_text_of_the_path(tmp_path):
    """source=Path(...) was stored as a Path in the compression block, and saving the model then failed with the JSON
    encoder's 'Object of type PosixPath is not JSON serializable'."""
    model = tiny_model("bert")
    block = reduce_(model, ReductionConfig(key_dim=8, n_iter_max=2), source=tmp_path / "original")
    assert block["source_model"] == str(tmp_path / "original")
    save(model, None, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["compression"]
    assert saved["source_model"] == str(tmp_path / "original")


def test_the_saved_block_records_what_the_reduction_did_not_what_was_left_to_decide():
    """A key dim's allocation is decided per model (ReductionConfig.allocates); the block records the decision, as
    compress does: reduce_ from the weights alone stored allocate null."""
    block = reduce_(tiny_model("bert"), ReductionConfig(key_dim=8, n_iter_max=2))
    assert block["reduction"]["allocate"] is False


@pytest.mark.parametrize("kwargs,fragment", [({"source": 5}, "source is recorded .* must be the name or folder"),
                                             ({"source": None}, "source is recorded .* must be the name or folder"),
                                             ({"tool_version": 1.0}, "tool_version is recorded .* must be a str")])
def test_reduce_refuses_a_source_or_version_that_is_not_text_before_any_layer(kwargs, fragment):
    model = tiny_model("bert")
    with pytest.raises(UsageError, match=fragment) as err:
        reduce_(model, ReductionConfig(key_dim=8), **kwargs)
    assert "\n" not in str(err.value)
    assert type(model.encoder.layer[0].attention.self).__name__ == "BertSelfAttention"  # untouched


@pytest.mark.parametrize("attn", ["flash", "flash_attention_2", 5])
def test_load_refuses_an_attention_implementation_it_has_no_kernel_for_as_a_bad_argument(tiny_reduced_dir, attn):
    """It was transformers' error behind 'pass a complete checkpoint written by save_pretrained' (blaming the folder),
    an AttributeError's text for a non-str, or an ImportError for flash_attention_2; collaborative attention has
    eager and sdpa kernels only."""
    with pytest.raises(UsageError, match=r"attn_implementation must be one of sdpa, eager .*got") as err:
        mhacompress.load(tiny_reduced_dir, attn_implementation=attn)
    assert "\n" not in str(err.value) and "checkpoint" not in str(err.value)
