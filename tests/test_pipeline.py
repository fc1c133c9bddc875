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


def _raise(event):
    raise AssertionError("never called: the arguments are refused first")


CAL = mhacompress.Calibration("python", samples=4)


@pytest.mark.parametrize("args,kwargs,fragment", [
    (("{src}", {"key_dim": 8}), {}, "config must be a ReductionConfig"),
    (("{src}", None), {}, "config must be a ReductionConfig"),
    ((None, ReductionConfig(key_dim=8)), {}, "model_or_name must be a model folder"),
    ((123, ReductionConfig(key_dim=8)), {}, "model_or_name must be a model folder"),
    (("{src}", ReductionConfig(key_dim=8)), {"on_progress": True}, "on_progress must be a function"),
    (("{src}", ReductionConfig(key_dim=8, calibration=CAL)), {"tokenizer": "bert", "calibration": ["a"]},
     "tokenizer must be the model's tokenizer"),
    # the class, not a tokenizer: it was a TypeError from inside the calibration ("AutoTokenizer.__init__() got an
    # unexpected keyword argument 'truncation'"), after the model had loaded
    (("{src}", ReductionConfig(key_dim=8, calibration=CAL)), {"tokenizer": "AutoTokenizer", "calibration": ["a"]},
     "tokenizer must be the model's tokenizer, not the class AutoTokenizer"),
    (("{src}", ReductionConfig(key_dim=8, calibration=CAL)), {"tokenizer": "BertTokenizerFast", "calibration": ["a"]},
     "tokenizer must be the model's tokenizer, not the class BertTokenizer"),  # an alias of it in transformers 5
    (("{src}", ReductionConfig(key_dim=8, calibration=CAL)), {"calibration": "a whole text"},
     "must be a list of texts; got str"),
    (("{src}", ReductionConfig(key_dim=8, calibration=CAL)), {"calibration": b"bytes"}, "got bytes"),
    (("{src}", ReductionConfig(key_dim=8, calibration=CAL)), {"calibration": 5}, "got int 5"),
    # a set has no order (a different sample, so different weights, under another PYTHONHASHSEED); a dict's keys
    # are not its texts
    (("{src}", ReductionConfig(key_dim=8, calibration=CAL)), {"calibration": {"a text", "another"}}, "got set"),
    (("{src}", ReductionConfig(key_dim=8, calibration=CAL)), {"calibration": {"text": "a text"}}, "got dict"),
    (("{src}", ReductionConfig(key_dim=8, calibration=CAL)), {"calibration": [None]}, "strings or pairs of strings"),
    (("{src}", ReductionConfig(key_dim=8, calibration=CAL)), {"calibration": [1, 2]}, "strings or pairs of strings"),
    (("{src}", ReductionConfig(key_dim=8, calibration=CAL)), {"calibration": [("a", "b", "c")]},
     "strings or pairs of strings"),
    (("{src}", ReductionConfig(key_dim=8, calibration=CAL)), {"calibration": ["", " ", ("", "")]},
     "every calibration text is empty"),
    (("{src}", ReductionConfig(key_dim=8, calibration=CAL)), {}, "no texts were given"),
    (("{src}", ReductionConfig(key_dim=8, calibration=CAL)), {"calibration": ["fine", ("a", "cut \ud83d")]},
     "calibration text 1: its text holds half a character"),  # a lone surrogate: the tokenizer's TypeError
])
def test_arguments_of_the_wrong_kind_are_one_line_errors_before_anything_loads(tiny_bert_dir, args, kwargs,
                                                                                fragment):
    """Not an AttributeError or TypeError from deep inside, and never a string read as a list of its letters."""
    args = tuple(str(tiny_bert_dir) if a == "{src}" else a for a in args)
    if kwargs.get("tokenizer") in ("AutoTokenizer", "BertTokenizerFast"):
        import transformers

        kwargs = {**kwargs, "tokenizer": getattr(transformers, kwargs["tokenizer"])}
    with pytest.raises(UsageError, match=fragment):
        mhacompress.compress(*args, **{"on_progress": _raise, **kwargs} if "on_progress" not in kwargs else kwargs)


def test_blank_calibration_texts_are_skipped_as_the_file_readers_skip_blank_lines(tiny_bert_dir):
    """A .txt file's blank lines and a .jsonl record's empty fields are not calibrated on; an empty string handed to
    compress was ([CLS] [SEP] alone), and changed the weights."""
    config = ReductionConfig(key_dim=8, n_iter_max=3, calibration=CAL)
    weights = lambda texts: mhacompress.compress(str(tiny_bert_dir), config, calibration=texts).model.state_dict()  # noqa: E731
    plain, blanks = weights(["a text", "another one"]), weights(["a text", "", ("another one", " "), ("  ", "")])
    for name, value in plain.items():
        torch.testing.assert_close(blanks[name], value, rtol=0, atol=0)


def test_the_calibration_length_recorded_is_the_one_used(tiny_bert_dir):
    """A model with 64 positions is calibrated on at most 64 tokens a sequence, whatever max_length asked: the report
    and the saved block say 64, not the 128 that was never used."""
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tiny_bert_dir).max_position_embeddings == 64
    config = ReductionConfig(key_dim=8, n_iter_max=3, calibration=mhacompress.Calibration("python", max_length=128))
    result = mhacompress.compress(str(tiny_bert_dir), config, calibration=["a text " * 100, "another one"])
    assert result.config.calibration.max_length == 64
    assert result.model.config.compression["reduction"]["calibration"]["max_length"] == 64


def test_texts_handed_in_under_a_named_source_are_not_called_all_that_source_holds(tiny_bert_dir, tmp_path):
    """A sample drawn by hand from a source, handed in with that source as its provenance (benchmarks/encoder_seeds
    does): the texts are what the caller chose, so no 'fewer than asked for (SOURCE has no more)' warning, which was
    false (the file held more). The file read by the pipeline itself still warns."""
    (tmp_path / "ten.txt").write_text("".join(f"sentence number {i} here\n" for i in range(10)))
    config = ReductionConfig(key_dim=8, n_iter_max=3,
                             calibration=mhacompress.Calibration(str(tmp_path / "ten.txt"), samples=16))
    handed = mhacompress.compress(str(tiny_bert_dir), config, calibration=["a b c", "d e f", "g h"])
    assert not any("fewer than" in w for w in handed.report["warnings"]), handed.report["warnings"]
    read = mhacompress.compress(str(tiny_bert_dir), config)
    assert any("calibrated on 10 sequences, fewer than the 16 asked for" in w for w in read.report["warnings"])


@pytest.mark.parametrize("entry", ["compress", "reduce_"])
def test_an_unsupported_architecture_is_a_usage_error_from_every_entry_point(entry):
    from transformers import GPT2Config, GPT2Model

    from mhacompress.reduction.modeling import UnsupportedModelError

    model = GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=4))
    call = {"compress": lambda: mhacompress.compress(model, ReductionConfig(key_dim=8), tokenizer=lambda text: text),
            "reduce_": lambda: mhacompress.reduce_(model, ReductionConfig(key_dim=8))}[entry]
    with pytest.raises(UsageError, match="'gpt2' is not supported; supported: bert") as caught:
        call()
    assert isinstance(caught.value, UnsupportedModelError)  # and still what older code caught


@pytest.mark.parametrize("entry", ["compress", "reduce_"])
@pytest.mark.parametrize("head", ["BertForMaskedLM", "BertForTokenClassification"])
def test_a_model_with_another_head_is_refused_from_every_entry_point(entry, head):
    """Encoders and sequence classifiers are what a saved folder can be; any other head was reduced too, into a folder
    that load then refused ('names no base architecture'): refused before any work, pointing at its encoder."""
    import transformers

    from conftest import tiny_config

    model = getattr(transformers, head)(tiny_config("bert")).eval()
    call = {"compress": lambda: mhacompress.compress(model, ReductionConfig(key_dim=8), tokenizer=lambda text: text),
            "reduce_": lambda: mhacompress.reduce_(model, ReductionConfig(key_dim=8))}[entry]
    with pytest.raises(UsageError, match=f"{head}.*encoders.*sequence classifiers.*model.base_model"):
        call()
    assert type(model.base_model.encoder.layer[0].attention.self).__name__ == "BertSelfAttention"  # untouched


@pytest.mark.parametrize("allocate", [False, True], ids=["reduction", "sensitivity"])
def test_a_second_ctrl_c_while_the_calibration_activations_are_removed_still_removes_them(tiny_bert_dir, tmp_path,
                                                                                         monkeypatch, allocate):
    """The first Ctrl-C can take a while to act (inside a long torch call), so users press it again: the second one
    landed in the removal of the spilled activations and left them, as large as the calibration data, in /tmp."""
    import os
    import shutil
    import signal
    import tempfile

    from mhacompress.reduction import sensitivity, sequential

    real = shutil.rmtree

    def interrupted(path, *args, **kwargs):
        if "mhacompress-" in os.fspath(path):
            signal.raise_signal(signal.SIGINT)  # the second Ctrl-C
        return real(path, *args, **kwargs)

    def first_ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(shutil, "rmtree", interrupted)
    monkeypatch.setattr(sensitivity if allocate else sequential, "solve_qk_", first_ctrl_c)
    config = ReductionConfig(key_dim=4, n_iter_max=5, allocate=allocate, calibration=CAL)
    with pytest.raises(KeyboardInterrupt):
        mhacompress.compress(str(tiny_bert_dir), config, calibration=["a first text", "and a second one", "three",
                                                                       "the fourth and last text"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stop_at", [1, 2], ids=["first-layer", "all-layers-no-block"])
def test_a_model_whose_reduction_was_stopped_half_way_is_neither_reduced_again_nor_saved(tiny_bert_dir, tmp_path,
                                                                                        stop_at):
    """compress reduces an in-memory model in place: Ctrl-C in a notebook (here from the progress callback) leaves
    some layers reduced and no compression block. Saved, that folder reloaded with those layers' query/key weights
    missing, drawn at random by transformers."""
    from transformers import AutoTokenizer

    model, tokenizer = tiny_model("bert"), AutoTokenizer.from_pretrained(tiny_bert_dir)

    def stop(event):
        if event.stage == "layers" and event.done == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mhacompress.compress(model, ReductionConfig(key_dim=8, n_iter_max=3), tokenizer=tokenizer, on_progress=stop)
    reduced = [type(layer.attention.self).__name__.startswith("Collaborative") for layer in model.encoder.layer]
    assert any(reduced) and not getattr(model.config, "compression", None)  # which layers: the order solves finish in
    for again in (lambda: mhacompress.compress(model, ReductionConfig(key_dim=8), tokenizer=tokenizer),
                  lambda: mhacompress.save(model, tokenizer, tmp_path / "out")):
        with pytest.raises(UsageError, match="a reduction that did not finish.*load the original checkpoint again"):
            again()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("use", ["calibration", "evaluation"])
def test_a_tokenizer_of_another_model_is_refused_in_one_line_before_any_layer_is_reduced(tiny_bert_dir, glue_dir,
                                                                                          use):
    """Another checkpoint's tokenizer gives ids beyond the model's embeddings: it was torch's 'IndexError: index out
    of range in self' from inside the embedding lookup."""
    from transformers import AutoTokenizer

    model = tiny_model("bert")  # a vocabulary of 100
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)  # MiniLM's, of 30522
    kwargs = {"calibration": {"calibration": ["a text", "another text"]},
              "evaluation": {"evaluate": "stsb", "data_dir": glue_dir}}[use]
    calibration = mhacompress.Calibration("python", samples=4) if use == "calibration" else None
    with pytest.raises(UsageError, match=r"token id \d+ .*embeddings have 100 rows.*the model's own") as err:
        mhacompress.compress(model, ReductionConfig(key_dim=8, calibration=calibration), tokenizer=tokenizer,
                             **kwargs)
    assert "\n" not in str(err.value)
    assert type(model.encoder.layer[0].attention.self).__name__ == "BertSelfAttention"  # untouched


def test_a_refined_reduction_leaves_no_gradients_on_the_model(tiny_bert_dir):
    """compress with refinement (the default at key dims <= d/8) returned a model whose refined float32 parameters
    still held their last .grad."""
    config = ReductionConfig(key_dim=4, n_iter_max=3, calibration=mhacompress.Calibration("python", refine_steps=5))
    model = mhacompress.compress(str(tiny_bert_dir), config, calibration=["a text", "another one"]).model
    assert [name for name, p in model.named_parameters() if p.grad is not None] == []


def test_at_d_over_8_a_model_read_at_every_token_takes_more_refinement_steps(tiny_bert_dir):
    """The default steps at key dims <= d/8 are decided by how the model is read: a sentence encoder (mean pooled)
    at every token takes TOKEN_REFINE_STEPS, a classifier, read at its first token, REFINE_STEPS; saved as taken."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    from mhacompress.reduction.config import REFINE_STEPS, TOKEN_REFINE_STEPS

    config = ReductionConfig(key_dim=4, n_iter_max=3, calibration=mhacompress.Calibration("python"))  # d = 32
    texts = ["a text", "another one", "a third text to calibrate on"]
    encoder = mhacompress.compress(str(tiny_bert_dir), config, calibration=texts)
    classifier = BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    head = mhacompress.compress(classifier, config, tokenizer=tokenizer, calibration=texts)
    assert encoder.config.calibration.refine_steps == TOKEN_REFINE_STEPS
    assert head.config.calibration.refine_steps == REFINE_STEPS
    assert head.model.config.compression["reduction"]["calibration"]["refine_steps"] == REFINE_STEPS


def test_reduce_in_place_with_a_budget_names_the_call_that_allocates():
    """reduce_ reduces from the weights at given key dims; a budget needs compress, which allocates."""
    from mhacompress.reduction.config import ConfigError
    from mhacompress.reduction.surgery import reduce_

    with pytest.raises(ConfigError, match=r"which reduce_ does not do: call mhacompress.compress"):
        reduce_(tiny_model("bert"), ReductionConfig(budget=0.5))


# ---- a model object is the caller's: reduced in place, nothing else of theirs changed ---------------------------

TEXTS = ["a text", "another one", "a third text to calibrate on"]


def _calibrated(tiny_bert_dir, model):
    from transformers import AutoTokenizer

    config = ReductionConfig(key_dim=4, n_iter_max=3, calibration=mhacompress.Calibration("python", refine_steps=3))
    return mhacompress.compress(model, config, tokenizer=AutoTokenizer.from_pretrained(tiny_bert_dir),
                                calibration=TEXTS)


def test_a_calibrated_reduction_called_inside_inference_mode_gives_the_same_model(tiny_bert_dir):
    """Inside torch.inference_mode() the refinement raised torch's 'Inference tensors do not track version counter'
    and left the caller's model half-reduced, for good."""
    from transformers import AutoModel

    outside = _calibrated(tiny_bert_dir, AutoModel.from_pretrained(tiny_bert_dir)).model.state_dict()
    model = AutoModel.from_pretrained(tiny_bert_dir)
    with torch.inference_mode():
        inside = _calibrated(tiny_bert_dir, model).model.state_dict()
    assert outside.keys() == inside.keys()
    assert all(torch.equal(outside[k], inside[k]) for k in outside)


def test_weights_that_are_not_there_or_cannot_change_are_refused_before_any_layer_is_touched(tiny_bert_dir):
    from transformers import AutoConfig, AutoModel

    from mhacompress.reduction.modeling.attention import CollaborativeSelfAttention

    with torch.device("meta"):
        empty = AutoModel.from_config(AutoConfig.from_pretrained(tiny_bert_dir))
    with torch.inference_mode():
        built = AutoModel.from_config(AutoConfig.from_pretrained(tiny_bert_dir))  # inference tensors
    for call in (lambda: mhacompress.compress(empty, ReductionConfig(key_dim=8)),
                 lambda: mhacompress.reduce_(empty, ReductionConfig(key_dim=8))):
        with pytest.raises(UsageError, match="on the meta device"):
            call()
    with pytest.raises(UsageError, match="inference tensors .* cannot change in place"):
        _calibrated(tiny_bert_dir, built)
    for model in (empty, built):
        assert not any(isinstance(m, CollaborativeSelfAttention) for m in model.modules())


def test_a_config_shared_with_another_model_is_left_to_that_model(tiny_bert_dir):
    """Two models built on one config object: reducing one made the other save as a reduced model without reduced
    layers (a folder neither transformers nor mhacompress could load)."""
    from transformers import AutoModel, BertModel

    a = AutoModel.from_pretrained(tiny_bert_dir)
    b = BertModel(a.config)
    _calibrated(tiny_bert_dir, a)
    assert a.config.compression and type(a.config).__name__.startswith("Collaborative")
    assert not getattr(b.config, "compression", None) and type(b.config).__name__ == "BertConfig"
    assert all(getattr(m, "config", a.config) is a.config for m in a.modules())  # one config inside the model


def test_the_callers_training_mode_frozen_weights_and_random_state_are_kept(tiny_bert_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert_dir).train().requires_grad_(False)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    reduced = _calibrated(tiny_bert_dir, model).model
    assert torch.equal(torch.get_rng_state(), state)  # new modules' initial weights drew from it
    assert reduced.training  # calibrated in eval mode, given back as handed over
    assert [n for n, p in reduced.named_parameters() if p.requires_grad] == []  # the new query/key ones were trainable


def test_a_wrapper_is_refused_naming_the_encoder_inside_it(tiny_bert_dir):
    from transformers import AutoModel

    compiled = torch.compile(AutoModel.from_pretrained(tiny_bert_dir))
    with pytest.raises(UsageError, match=r"reduce its encoder, model\._orig_mod, instead"):
        mhacompress.compress(compiled, ReductionConfig(key_dim=8))


def test_a_model_built_in_memory_is_calibrated_at_the_tokens_its_given_pooling_reads(tiny_bert_dir):
    """Without a sentence-transformers folder to read, a CLS-pooled encoder object was calibrated as mean pooled
    (at every token, with the steps of a model read there), and Python had no way to say otherwise."""
    from transformers import AutoModel, AutoTokenizer, BertModel

    from mhacompress.reduction.config import REFINE_STEPS, TOKEN_REFINE_STEPS

    def built():
        model = BertModel(AutoModel.from_pretrained(tiny_bert_dir).config)
        model.load_state_dict(AutoModel.from_pretrained(tiny_bert_dir).state_dict())
        model.config._name_or_path = ""
        return model.eval()

    config = ReductionConfig(key_dim=4, n_iter_max=3, calibration=mhacompress.Calibration("python"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    steps = {pooling: mhacompress.compress(built(), config, tokenizer=tokenizer, calibration=TEXTS,
                                           pooling=pooling).config.calibration.refine_steps
             for pooling in (None, "mean", "cls")}
    assert steps == {None: TOKEN_REFINE_STEPS, "mean": TOKEN_REFINE_STEPS, "cls": REFINE_STEPS}
    with pytest.raises(mhacompress.ConfigError, match=r"pooling must be one of 'mean', 'cls', 'max'.*got 'CLS'"):
        mhacompress.compress(built(), config, tokenizer=tokenizer, calibration=TEXTS, pooling="CLS")


def test_hooks_on_a_replaced_attention_module_are_reported_not_lost_without_a_word(tiny_bert_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert_dir)
    model.encoder.layer[1].attention.self.register_forward_hook(lambda *args: None)
    model.encoder.layer[0].attention.output.register_forward_hook(lambda *args: None)  # kept: not replaced
    warnings = mhacompress.compress(model, ReductionConfig(key_dim=8, n_iter_max=3)).report["warnings"]
    assert [w for w in warnings if "hooks" in w] == [
        "the self-attention modules of layers [1] had hooks, which do not carry over to the collaborative modules "
        "that replace them; register them again on the reduced model's attention modules"]
    assert not [w for w in mhacompress.compress(AutoModel.from_pretrained(tiny_bert_dir),
                                                ReductionConfig(key_dim=8, n_iter_max=3)).report["warnings"]
                if "hooks" in w]


def test_reduce_in_place_warns_of_hooks_on_the_attention_modules_it_replaces(tiny_bert_dir, recwarn):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert_dir)
    model.encoder.layer[0].attention.self.register_forward_pre_hook(lambda *args: None)
    with pytest.warns(UserWarning, match=r"layers \[0\] had hooks, which do not carry over"):
        mhacompress.reduce_(model, ReductionConfig(key_dim=8, n_iter_max=3))
    recwarn.clear()
    mhacompress.reduce_(AutoModel.from_pretrained(tiny_bert_dir), ReductionConfig(key_dim=8, n_iter_max=3))
    assert not [w for w in recwarn if "hooks" in str(w.message)]
