"""Saved folders keep every file of the source that the tool does not rewrite, so that the ecosystem's loaders work on
them as on the original: sentence-transformers (modules.json, pooling, normalisation) and transformers' pipeline."""

import json
import re
import shutil

import pytest
import torch

from conftest import tiny_model
from mhacompress.hub import load_pretrained, save
from mhacompress.reduction.config import ReductionConfig
from mhacompress.reduction.surgery import reduce_

SENTENCES = ["A man is playing a guitar.", "Attention heads can share their keys.", "short"]


def tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def minilm_reduced(tmp_path_factory):
    """The bundled MiniLM (a sentence-transformers folder), reduced in memory and saved with its source."""
    model, tokenizer, source = load_pretrained("minilm")
    reduce_(model, ReductionConfig(key_dim=96, method="svd"))  # the fastest method: the point is the folder
    out = tmp_path_factory.mktemp("ecosystem") / "minilm-cp96"
    save(model, tokenizer, out, source=source.location)
    return model, tokenizer, out, source.location


def test_the_files_the_tool_does_not_change_are_carried_over_unchanged(minilm_reduced):
    from pathlib import Path

    _, _, out, source = minilm_reduced
    original, saved = tree(Path(source)), tree(out)
    for name in ("modules.json", "1_Pooling/config.json", "sentence_bert_config.json",
                 "config_sentence_transformers.json", "vocab.txt", "special_tokens_map.json", "README.md"):
        assert saved.get(name) == original[name], name
    assert saved["model.safetensors"] != original["model.safetensors"]  # the reduced weights, not the original's


def mean_pooled(model, tokenizer, sentences):
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (B, T, d)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, d)
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_sentence_transformers_loads_the_reduced_folder_whole(minilm_reduced):
    st = pytest.importorskip("sentence_transformers")
    model, tokenizer, out, _ = minilm_reduced
    encoder = st.SentenceTransformer(str(out), trust_remote_code=True, device="cpu")
    assert [type(m).__name__ for m in encoder] == ["Transformer", "Pooling", "Normalize"]
    got = encoder.encode(SENTENCES, convert_to_tensor=True)  # (B, d)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5, rtol=0)
    torch.testing.assert_close(got, mean_pooled(model, tokenizer, SENTENCES), atol=1e-5, rtol=0)


def test_the_feature_extraction_pipeline_round_trip(minilm_reduced):
    from transformers import pipeline

    model, tokenizer, out, _ = minilm_reduced
    extract = pipeline("feature-extraction", model=str(out), trust_remote_code=True, device="cpu")
    got = torch.tensor(extract(SENTENCES[1]))  # (1, T, d)
    with torch.no_grad():
        want = model(**tokenizer(SENTENCES[1], return_tensors="pt")).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_stale_weights_of_the_original_are_never_carried_over(tiny_bert_dir, tmp_path):
    from transformers import AutoTokenizer

    src = shutil.copytree(tiny_bert_dir, tmp_path / "src")
    stale = ["pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "model.safetensors.index.json",
             "model-00001-of-00002.safetensors", "onnx/model.onnx", "openvino/openvino_model.xml", "rust_model.ot",
             "checkpoint-500/optimizer.pt", ".git/HEAD"]
    kept = ["modules.json", "1_Pooling/config.json", "2_Dense/model.safetensors", "2_Dense/config.json",
            "README.md", ".gitattributes", "sentence_bert_config.json"]
    for name in stale + kept:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(b"from the source: " + name.encode())
    model = tiny_model("bert")
    reduce_(model, ReductionConfig(key_dim=8, n_iter_max=3))
    save(model, AutoTokenizer.from_pretrained(src), tmp_path / "out", source=src)
    saved = tree(tmp_path / "out")
    assert not [name for name in stale if name in saved]
    assert all(saved[name] == b"from the source: " + name.encode() for name in kept)
    assert not saved["model.safetensors"].startswith(b"from the source")  # its own weights, not the source's
    assert b"compression" in saved["config.json"]  # what the save writes wins over the source's copy


def test_only_the_sources_own_tree_is_carried_over_linked_files_by_content_linked_folders_and_pipes_never(
        tiny_bert_dir, tmp_path):
    """A linked folder may lead anywhere: a data set to publish by mistake, or `..`, which holds the output being
    written (an endless walk); a pipe would never end. A linked file is how a hub cache's snapshot holds every file."""
    import os

    from transformers import AutoTokenizer

    src = shutil.copytree(tiny_bert_dir, tmp_path / "models" / "src")
    outside = tmp_path / "data"
    (outside / "private").mkdir(parents=True)
    (outside / "private" / "secret.txt").write_bytes(b"not the model's")
    (tmp_path / "blob").write_bytes(b"a blob")
    (src / "data").symlink_to(outside)
    (src / "up").symlink_to("..")
    (src / "README.md").symlink_to(tmp_path / "blob")
    os.mkfifo(src / "pipe")
    model = tiny_model("bert")
    reduce_(model, ReductionConfig(key_dim=8, n_iter_max=3))
    save(model, AutoTokenizer.from_pretrained(src), tmp_path / "models" / "out", source=src)
    saved = tree(tmp_path / "models" / "out")
    assert saved["README.md"] == b"a blob" and not (tmp_path / "models" / "out" / "README.md").is_symlink()
    assert not [name for name in saved if name.startswith(("data", "up", "pipe"))]


@pytest.mark.parametrize("model_max_length", ["x", -1, float("nan"), 1e30])
def test_a_sources_damaged_model_max_length_is_carried_over_as_it_is_and_breaks_nothing(model_max_length,
                                                                                         tiny_bert_dir, tmp_path):
    """Inputs are cut at max_length, capped by the model's positions, never at the tokenizer's model_max_length
    (tests/test_glue_runner.py): a damaged one is the source's own setting, which reduce neither refuses nor edits."""
    import json

    import mhacompress

    src = shutil.copytree(tiny_bert_dir, tmp_path / "src")
    settings = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": model_max_length}))
    mhacompress.compress(str(src), ReductionConfig(key_dim=8, n_iter_max=3), output=tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["model_max_length"]
    assert json.dumps(saved) == json.dumps(model_max_length)  # NaN too
    model, tokenizer = mhacompress.load(tmp_path / "out")
    with torch.no_grad():
        model(**tokenizer(SENTENCES, padding=True, truncation=True, max_length=16, return_tensors="pt"))


def _sentence_folder(tiny_bert_dir, path, pooling: str, dense: bool):
    """A sentence-transformers folder around the tiny BERT: ``pooling``, then (``dense``) a Dense layer to 16 with
    tanh, then Normalize; and its own encoder."""
    st = pytest.importorskip("sentence_transformers")
    try:  # sentence-transformers 6; `models` before (still there, deprecated)
        from sentence_transformers.sentence_transformer import modules as stm
    except ImportError:
        from sentence_transformers import models as stm
    torch.manual_seed(0)
    word = stm.Transformer(str(tiny_bert_dir))
    width = (word.get_embedding_dimension if hasattr(word, "get_embedding_dimension")  # renamed in 6
             else word.get_word_embedding_dimension)()
    modules = [word, stm.Pooling(width, pooling_mode=pooling)]
    if dense:
        modules.append(stm.Dense(width, 16, activation_function=torch.nn.Tanh()))
    encoder = st.SentenceTransformer(modules=[*modules, stm.Normalize()], device="cpu")
    encoder.save(str(path))
    return encoder


@pytest.mark.parametrize("pooling,dense", [("cls", False), ("max", False), ("mean", True)])
def test_an_encoder_is_scored_by_the_embedding_its_sentence_transformers_folder_makes(tiny_bert_dir, tmp_path,
                                                                                     pooling, dense):
    """eval (and the calibration's readout) mean-pooled every encoder: a CLS-pooled one (BGE, GTE), or one with a
    Dense layer, was scored by an embedding its users never see. The folder's Pooling and Dense modules are read,
    the reduced folder keeps them, and at full key dim its embedding is the original pipeline's."""
    import mhacompress
    from mhacompress.eval.runner import _embedding

    encoder = _sentence_folder(tiny_bert_dir, tmp_path / "st", pooling, dense)
    want = encoder.encode(SENTENCES, convert_to_tensor=True)  # (B, d')
    mhacompress.compress(str(tmp_path / "st"), ReductionConfig(key_dim=32), output=tmp_path / "reduced")
    for model, tokenizer in (load_pretrained(str(tmp_path / "st"))[:2], mhacompress.load(tmp_path / "reduced")):
        assert model.sentence_head.pooling == pooling and (model.sentence_head.dense is not None) == dense
        batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
        with torch.no_grad():
            got = torch.nn.functional.normalize(_embedding(model, dict(batch)), dim=-1)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_an_embedding_mhacompress_cannot_reproduce_is_refused_for_scoring_but_reduced(tiny_bert_dir, tmp_path,
                                                                                      glue_dir):
    import mhacompress
    from mhacompress.errors import UsageError

    _sentence_folder(tiny_bert_dir, tmp_path / "st", "lasttoken", False)
    with pytest.raises(UsageError, match=r"sentence embedding cannot be reproduced: .*pooling 'lasttoken'.*score it "
                                         r"with sentence-transformers"):
        mhacompress.evaluate(str(tmp_path / "st"), "stsb", data_dir=glue_dir, limit=4)
    result = mhacompress.compress(str(tmp_path / "st"), ReductionConfig(key_dim=8, n_iter_max=3),
                                  output=tmp_path / "out")
    assert not [w for w in result.report["warnings"] if "cannot be reproduced" in w]  # the weights alone: no embedding
    # calibrated, it fits token states under a pooling that is not the model's: said, not silent
    config = ReductionConfig(key_dim=8, n_iter_max=3, calibration=mhacompress.Calibration("python", samples=8,
                                                                                          refine_steps=0))
    warnings = mhacompress.compress(str(tmp_path / "st"), config, calibration=SENTENCES).report["warnings"]
    assert [w for w in warnings if "cannot be reproduced: mhacompress does not read its pooling 'lasttoken'" in w
            and "the calibration fitted the transformer's token states" in w], warnings


@pytest.mark.parametrize("pooling,first_token", [("cls", True), ("mean", False)])
def test_a_cls_pooled_encoder_is_calibrated_where_it_is_read(tiny_bert_dir, tmp_path, pooling, first_token):
    """Its last layer's first token alone reaches the embedding, as a classifier's does: fitted there (the token
    weights, the last layer's queries), not at the mean of its tokens."""
    from mhacompress import Calibration
    from mhacompress.pipeline import _plan

    _sentence_folder(tiny_bert_dir, tmp_path / "st", pooling, False)
    model = load_pretrained(str(tmp_path / "st"))[0]
    assert _plan(Calibration("python"), model).first_token_last is first_token


def test_a_model_object_loaded_by_transformers_is_calibrated_as_its_folder_is(tiny_bert_dir, tmp_path):
    """compress(model) on an AutoModel from a CLS-pooled sentence-transformers folder reads that folder's pooling,
    as compress(folder) does: the same calibration gives the same weights either way (it was mean-pooled)."""
    from transformers import AutoModel, AutoTokenizer

    import mhacompress
    from mhacompress import Calibration

    _sentence_folder(tiny_bert_dir, tmp_path / "st", "cls", False)
    config = ReductionConfig(key_dim=4, n_iter_max=3, calibration=Calibration("python", samples=8, refine_steps=0))
    by_name = mhacompress.compress(str(tmp_path / "st"), config, calibration=SENTENCES).model
    model = AutoModel.from_pretrained(tmp_path / "st")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "st")
    by_object = mhacompress.compress(model, config, tokenizer=tokenizer, calibration=SENTENCES).model
    assert by_object.sentence_head.pooling == "cls"
    for got, want in zip(by_object.state_dict().values(), by_name.state_dict().values()):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def _module_path_outside(folder):
    modules = json.loads((folder / "modules.json").read_text())
    modules[1]["path"] = "../elsewhere"
    (folder / "modules.json").write_text(json.dumps(modules))


def _dense_of_another_width(folder):
    from safetensors.torch import save_file

    dense = next(folder.glob("*_Dense"))
    save_file({"linear.weight": torch.zeros(16, 7), "linear.bias": torch.zeros(16)}, dense / "model.safetensors")


@pytest.mark.parametrize("damage,fragment", [(_module_path_outside, "outside the folder"),
                                             (_dense_of_another_width, "Dense module of 7 inputs after 32")])
def test_a_sentence_pipeline_that_does_not_fit_is_refused_for_scoring_in_one_line(tiny_bert_dir, tmp_path, glue_dir,
                                                                                  damage, fragment):
    import mhacompress
    from mhacompress.errors import UsageError

    _sentence_folder(tiny_bert_dir, tmp_path / "st", "mean", True)
    damage(tmp_path / "st")
    with pytest.raises(UsageError, match=rf"cannot be reproduced: .*{re.escape(fragment)}"):
        mhacompress.evaluate(str(tmp_path / "st"), "stsb", data_dir=glue_dir, limit=4)


def test_a_hub_models_sentence_files_are_fetched_beside_the_transformers(monkeypatch):
    """transformers fetches only its own files: a sentence-transformers model given by hub id had no modules.json in
    the cache, so it was mean pooled whatever its Pooling module says, and saved without its modules. A failed
    download leaves a plain encoder (best effort), and nothing prints."""
    from fnmatch import fnmatch

    import huggingface_hub

    from mhacompress.hub import fetch_sentence_files

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: calls.append((repo, kw)))
    fetch_sentence_files("org/encoder")
    (repo, kw), = calls
    assert repo == "org/encoder" and {"modules.json", "*_Pooling/*", "*_Dense/*"} <= set(kw["allow_patterns"])
    weights = ("model.safetensors", "pytorch_model.bin", "model-00001-of-00002.safetensors")  # transformers' to fetch
    assert not any(fnmatch(name, p) for p in kw["allow_patterns"] for name in weights)

    def offline(repo, **kw):
        raise OSError("no route to the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    fetch_sentence_files("org/encoder")
