"""Every command is one Python call that returns what the command prints with --json (less the schema envelope),
reports progress through a callback and prints nothing itself."""

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import mhacompress
from mhacompress.cli import main
from mhacompress.errors import UsageError
from mhacompress.schema import envelope

TIMINGS = ("seconds",)
FIXTURES = Path(__file__).parent / "fixtures" / "glue"


def cli_json(*args) -> dict:
    result = CliRunner().invoke(main, [*map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    return {k: v for k, v in out.items() if k not in envelope("eval", "cpu") and k not in TIMINGS}


def without(d: dict, keys=TIMINGS) -> dict:
    return json.loads(json.dumps({k: v for k, v in d.items() if k not in keys}, default=float))


def test_evaluate_is_eval(tiny_reduced_dir, glue_dir, capfd):
    events = []
    got = mhacompress.evaluate(tiny_reduced_dir, "stsb", data_dir=glue_dir, limit=16, on_progress=events.append)
    assert capfd.readouterr() == ("", "")
    assert without(got) == cli_json("eval", tiny_reduced_dir, "--task", "stsb", "--data-dir", glue_dir, "--limit", 16)
    assert events[0].stage.startswith("loading") and events[-1].done == events[-1].total == 2 * 16  # two sentences


def test_report_is_report(tiny_reduced_dir):
    got = mhacompress.report(tiny_reduced_dir, seq_len=16, batch_size=2, latency=False)
    assert without(got) == cli_json("report", tiny_reduced_dir, "--seq-len", 16, "--batch-size", 2, "--no-latency")
    assert got["key_dim"] == 8 and got["layers"]


def test_evaluate_reference_is_eval_reference(tiny_reduced_dir, tiny_bert_dir, glue_dir):
    """eval --reference ORIGINAL: two models compared in one call, the fidelity block included."""
    got = mhacompress.evaluate(tiny_reduced_dir, "stsb", data_dir=glue_dir, limit=8, reference=tiny_bert_dir)
    cli = cli_json("eval", tiny_reduced_dir, "-t", "stsb", "--data-dir", glue_dir, "--limit", 8, "--reference",
                   tiny_bert_dir)
    assert without(got) == cli and got["reference"]["model"] == str(tiny_bert_dir) and got["fidelity"]


def test_evaluate_scores_a_model_in_memory_as_its_saved_folder(tiny_reduced_dir, tiny_bert_dir, glue_dir):
    """compress(...).model or a reduce_d model, scored without saving it first: the same metrics and fidelity as the
    folder it was read from, named as in memory; the model stays where it was."""
    from mhacompress.hub import load_pretrained

    model, tokenizer, _ = load_pretrained(str(tiny_reduced_dir))
    original = load_pretrained(str(tiny_bert_dir))[0]
    got = mhacompress.evaluate(model, "stsb", data_dir=glue_dir, limit=8, tokenizer=tokenizer, reference=original)
    saved = mhacompress.evaluate(tiny_reduced_dir, "stsb", data_dir=glue_dir, limit=8, reference=tiny_bert_dir)
    assert got["metrics"] == saved["metrics"] and got["fidelity"] == saved["fidelity"], (got, saved)
    assert got["model"] == f"{tiny_reduced_dir} (in memory)" and got["reference"]["model"].endswith("(in memory)")
    assert str(next(model.parameters()).device) == "cpu"


@pytest.mark.parametrize("kwargs,message", [
    ({}, "model is a model in memory: pass its tokenizer too"),
    ({"tokenizer": "bert-base-uncased"}, "pass its tokenizer too"),
    ({"tokenizer": "TOKENIZER", "first_token_only": True}, "a model in memory is scored as it is"),
])
def test_evaluate_of_a_model_in_memory_refuses_what_it_cannot_use(tiny_reduced_dir, glue_dir, kwargs, message):
    from mhacompress.hub import load_pretrained

    model, tokenizer, _ = load_pretrained(str(tiny_reduced_dir))
    kwargs = {k: tokenizer if v == "TOKENIZER" else v for k, v in kwargs.items()}
    with pytest.raises(UsageError, match=re.escape(message)):
        mhacompress.evaluate(model, "stsb", data_dir=glue_dir, limit=8, **kwargs)


def test_evaluate_of_a_folder_refuses_a_tokenizer_it_would_not_use(tiny_reduced_dir, glue_dir):
    from mhacompress.hub import load_pretrained

    tokenizer = load_pretrained(str(tiny_reduced_dir))[1]
    with pytest.raises(UsageError, match="tokenizer is for a model in memory"):
        mhacompress.evaluate(tiny_reduced_dir, "stsb", data_dir=glue_dir, limit=8, tokenizer=tokenizer)


def test_report_returns_the_measured_latency_as_report_does(tiny_reduced_dir):
    """report --seq-len --batch-size times both models; the call returns the same block (timings differ)."""
    got = mhacompress.report(tiny_reduced_dir, seq_len=8, batch_size=2, repeats=1)
    cli = cli_json("report", tiny_reduced_dir, "--seq-len", 8, "--batch-size", 2, "--repeats", 1)
    assert got.keys() == cli.keys() and got["latency"].keys() == cli["latency"].keys() == {"model", "attention_layer",
                                                                                         "repeats"}
    assert got["latency"]["model"].keys() == cli["latency"]["model"].keys()
    assert without(got, ("latency",)) == without(cli, ("latency",))


def test_report_compares_a_model_in_memory_as_its_saved_folder(tiny_reduced_dir, tiny_bert_dir):
    """compress(...).model, a reduce_d model or an original with key_dim, reported without saving: the same counts as
    the folders, the caller's models untouched (a reduced one is timed as it is, an original reduced in a copy)."""
    import copy

    import torch

    from mhacompress.hub import load_pretrained

    reduced, original = load_pretrained(str(tiny_reduced_dir))[0], load_pretrained(str(tiny_bert_dir))[0]
    before = {k: v.clone() for k, v in original.state_dict().items()}
    on = dict(seq_len=16, batch_size=2, latency=False)
    saved = without(mhacompress.report(tiny_reduced_dir, **on), ("model", "original"))
    for got in (mhacompress.report(reduced, **on),  # its original: the source its block records
                mhacompress.report(reduced, reference=original, **on),
                mhacompress.report(reduced, reference=str(tiny_bert_dir), **on)):
        assert without(got, ("model", "original")) == saved
        assert got["model"] == f"{tiny_reduced_dir} (in memory)"
    reduced_here = copy.deepcopy(original)
    mhacompress.reduce_(reduced_here, mhacompress.ReductionConfig(key_dim=8))  # records no original
    assert without(mhacompress.report(reduced_here, reference=original, **on), ("model", "original")) == saved
    got = mhacompress.report(original, key_dim=8, **on)
    assert without(got, ("model", "original")) == without(mhacompress.report(tiny_bert_dir, key_dim=8, **on),
                                                           ("model", "original"))
    assert got["original"] == got["model"] == f"{tiny_bert_dir} (in memory)"
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in before.items())
    assert not hasattr(original.config, "compression")


@pytest.mark.parametrize("call,message", [
    ("report(reduce_d)", "records no original to compare with; pass it as reference"),
    ("report(original)", "is an original model: pass key_dim"),
    ("report(original, key_dim=8, reference=original)", "reference is the original of a reduced model"),
    ("report(reduced, reference=reduced)", "is itself a reduced model; pass the original"),
    ("report(reduced, attn_implementation='eager')", "runs with its own attention implementation ('sdpa')"),
    ("report(reduced, first_token_only=True)", "a reduced model in memory is timed as it is"),
    ("report(reduced, key_dim=4)", "is already reduced (key dim 8); drop key_dim"),
    ("report(reduced, reference=eager)", "the timings would compare kernels, not the reduction"),
])
def test_report_of_a_model_in_memory_refuses_what_it_cannot_use(tiny_reduced_dir, tiny_bert_dir, call, message):
    import copy

    from mhacompress.hub import load_pretrained

    reduced, original = load_pretrained(str(tiny_reduced_dir))[0], load_pretrained(str(tiny_bert_dir))[0]
    eager = load_pretrained(str(tiny_bert_dir), attn_implementation="eager")[0]
    reduce_d = copy.deepcopy(original)
    mhacompress.reduce_(reduce_d, mhacompress.ReductionConfig(key_dim=8))
    scope = {"report": lambda m, **kw: mhacompress.report(m, seq_len=8, latency=False, **kw), "reduced": reduced,
             "original": original, "reduce_d": reduce_d, "eager": eager}
    with pytest.raises(UsageError, match=re.escape(message)) as err:
        eval(call, scope)
    assert "\n" not in str(err.value)


def test_report_resolves_its_device_as_the_command_does(tiny_reduced_dir):
    """device='auto' (the command's default) is CUDA, then MPS, then the CPU: it was torch's 'Expected one of cpu,
    cuda, ...' error."""
    got = mhacompress.report(tiny_reduced_dir, seq_len=16, batch_size=2, latency=False, device="auto")
    assert got["key_dim"] == 8


def test_to_onnx_is_export(tiny_reduced_dir, tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    got = mhacompress.to_onnx(tiny_reduced_dir, tmp_path / "a.onnx")
    cli = cli_json("export", tiny_reduced_dir, "-o", tmp_path / "b.onnx")
    strip = lambda d: {k: v for k, v in without(d).items() if k not in ("output", "runs", "max_abs_diff")}  # noqa: E731
    assert strip(got) == strip(cli) and (tmp_path / "a.onnx").is_file()


def test_to_onnx_exports_a_reduced_model_in_memory_as_it_would_its_saved_folder(tiny_bert_dir, tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort
    import torch

    result = mhacompress.compress(str(tiny_bert_dir), mhacompress.ReductionConfig(key_dim=8))
    result.model.train()  # given back as it came
    from_memory = mhacompress.to_onnx(result, tmp_path / "memory.onnx")
    assert result.model.training and from_memory["passed"] and "(in memory)" in from_memory["model"]
    assert mhacompress.to_onnx(result.model, tmp_path / "model.onnx")["passed"]
    from_folder = mhacompress.to_onnx(result.save(tmp_path / "saved"), tmp_path / "folder.onnx")
    same = lambda d: {k: v for k, v in d.items() if k not in ("model", "output", "bytes", "runs")}  # noqa: E731
    assert same(from_memory) == same(from_folder)
    feed = {"input_ids": torch.tensor([[2, 5, 7, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
            "token_type_ids": torch.zeros(1, 4, dtype=torch.long)}
    feed = {k: feed[k].numpy() for k in from_memory["inputs"]}
    outputs = [ort.InferenceSession(str(tmp_path / f)).run(None, feed)[0]
               for f in ("memory.onnx", "folder.onnx")]
    assert abs(outputs[0] - outputs[1]).max() == 0  # the same graph and weights


def test_to_onnx_refuses_a_model_in_memory_it_cannot_export_as_it_is(tiny_bert_dir, tmp_path):
    from transformers import AutoModel

    original = AutoModel.from_pretrained(tiny_bert_dir)
    with pytest.raises(mhacompress.UsageError, match="is not a reduced model: reduce it first"):
        mhacompress.to_onnx(original, tmp_path / "m.onnx")
    reduced = mhacompress.compress(original, mhacompress.ReductionConfig(key_dim=8)).model
    with pytest.raises(mhacompress.ConfigError, match="a model in memory is exported as it is"):
        mhacompress.to_onnx(reduced, tmp_path / "m.onnx", first_token_only=True)
    assert not (tmp_path / "m.onnx").exists()


def test_run_sweep_is_sweep_and_survives_the_submodule_import(tiny_bert_dir, glue_dir):
    import mhacompress.sweep  # noqa: F401  (the submodule of the same stem must not shadow the function)

    got = mhacompress.run_sweep(str(tiny_bert_dir), "stsb", ["cp"], [8], data_dir=str(glue_dir), limit=8,
                                device="cpu")
    cli = cli_json("sweep", tiny_bert_dir, "-t", "stsb", "--key-dims", 8, "--methods", "cp", "--data-dir", glue_dir,
                   "--limit", 8, "--device", "cpu")
    drop = lambda rows: [without(r) for r in rows]  # noqa: E731
    assert drop(got["results"]) == drop(cli["results"]) and got["original"] == cli["original"]


def test_compress_max_drop_reports_whether_the_gate_passed_as_reduce_max_drop_decides_it(tiny_bert_dir):
    """reduce --max-drop exits 1 when the reduction loses more; a Python call reports it (eval.passed) instead."""
    from mhacompress import ReductionConfig

    config = ReductionConfig(key_dim=4, n_iter_max=5)
    run = lambda drop: mhacompress.compress(tiny_bert_dir, config, evaluate="stsb", data_dir=FIXTURES,  # noqa: E731
                                            max_drop=drop, weights_only=True).report["eval"]
    tight, passed = run(0), run(2)  # none exceeds 2 (a negative bound is refused: test_bad_inputs)
    assert (tight["max_drop"], tight["passed"]) == (0, tight["drop"] <= 0)
    assert (passed["max_drop"], passed["passed"]) == (2, True)
    assert "max_drop" not in mhacompress.compress(tiny_bert_dir, config, evaluate="stsb", data_dir=FIXTURES,
                                                  weights_only=True).report["eval"]
    cli = cli_json("reduce", tiny_bert_dir, "-k", 4, "--iterations", 5, "--weights-only", "--eval", "stsb",
                   "--data-dir", FIXTURES, "--max-drop", 2)
    assert cli["eval"] == without(passed)


def test_compress_evaluate_calibrates_on_the_task_as_reduce_eval_does(tiny_bert_dir, glue_dir):
    """reduce --eval TASK alone calibrates on TASK's train sentences (a classifier reduced from its weights alone
    collapses); compress(evaluate=TASK) did not, so the same call in Python gave another, worse, model."""
    from mhacompress import ReductionConfig

    config = ReductionConfig(key_dim=4, n_iter_max=5)
    got = mhacompress.compress(tiny_bert_dir, config, evaluate="stsb", data_dir=glue_dir).report
    cli = cli_json("reduce", tiny_bert_dir, "-k", 4, "--iterations", 5, "--eval", "stsb", "--data-dir", glue_dir)
    assert got["calibration"] == cli["calibration"] and got["calibration"]["source"] == "stsb"
    assert got["eval"]["reduced"] == cli["eval"]["reduced"]
    alone = mhacompress.compress(tiny_bert_dir, config, evaluate="stsb", data_dir=glue_dir, weights_only=True).report
    assert alone["calibration"] is None  # reduce --weights-only --eval TASK
    assert mhacompress.compress(tiny_bert_dir, config).report["calibration"] is None  # nothing to calibrate on


def test_compress_evaluate_without_train_sentences_is_refused_before_any_work(tiny_bert_dir):
    """As reduce --eval TASK is: not a silent fall back to the weights alone. The fixtures have STS-B's dev split
    only."""
    from mhacompress import Calibration, ReductionConfig
    from mhacompress.errors import UsageError
    from mhacompress.reduction.config import ConfigError

    with pytest.raises(UsageError, match=r"evaluate='stsb' calibrates on its train sentences.*weights_only=True"):
        mhacompress.compress(tiny_bert_dir, ReductionConfig(key_dim=4), evaluate="stsb", data_dir=FIXTURES)
    with pytest.raises(ConfigError, match="contradict"):
        mhacompress.compress(tiny_bert_dir, ReductionConfig(key_dim=4, calibration=Calibration("stsb")),
                             weights_only=True)


def test_compress_output_is_reduce_output(tiny_bert_dir, tmp_path):
    """reduce --output DIR writes the folder and reports it; compress(output=DIR) is the same one call: the Python
    report had no 'output' (reduce --json's key: the folder written, null for a dry run), and saving took a second
    call, whose checks (the source, a non-empty folder) came only after the reduction had run."""
    from mhacompress import ReductionConfig

    config = ReductionConfig(key_dim=8, n_iter_max=3)
    got = mhacompress.compress(tiny_bert_dir, config, output=tmp_path / "a").report
    cli = cli_json("reduce", tiny_bert_dir, "-k", 8, "--iterations", 3, "-o", tmp_path / "b")
    assert (tmp_path / "a" / "config.json").is_file() and got["output"] == str(tmp_path / "a")
    assert without(got, envelope("reduce", "cpu").keys() | {"seconds", "output"}) == without(cli, ("output",))
    assert mhacompress.compress(tiny_bert_dir, config).report["output"] is None  # a dry run, as without --output
    again = mhacompress.compress(tiny_bert_dir, config, output=tmp_path / "a", force=True)  # --force
    assert again.report["output"] == str(tmp_path / "a")


def test_a_key_dim_the_method_cannot_take_is_refused_in_pythons_words(tiny_bert_dir):
    """The refusal said '--method svd ... or --method cp' to a Python caller, who passes method='svd'."""
    from mhacompress import ConfigError, ReductionConfig

    with pytest.raises(ConfigError, match=re.escape("method='svd' splits the key dim over 4 heads: 6 is not a "
                                                    "multiple of 4; pass 4 or 8, or method='cp'")):
        mhacompress.compress(tiny_bert_dir, ReductionConfig(key_dim=6, method="svd"))


@pytest.mark.parametrize("output,force,fragment", [("source", False, "is the source"),
                                                   ("full", False, "pass force=True to replace it")])
def test_compress_refuses_its_output_before_any_work(tiny_bert_dir, tmp_path, monkeypatch, output, force, fragment):
    from mhacompress import ReductionConfig, hub

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    monkeypatch.setattr(hub, "load_pretrained", lambda *a, **k: pytest.fail("the model loaded first"))
    where = tiny_bert_dir if output == "source" else tmp_path / output
    with pytest.raises(UsageError, match=re.escape(fragment)):
        mhacompress.compress(tiny_bert_dir, ReductionConfig(key_dim=8), output=where, force=force)
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"


def test_compress_that_fails_leaves_its_output_free(tiny_bert_dir, tmp_path):
    """A Python session goes on after a failed call: no lock, no parent folder made for the output stays."""
    from mhacompress import ReductionConfig

    with pytest.raises(Exception, match="key dim"):
        mhacompress.compress(tiny_bert_dir, ReductionConfig(key_dim=999), output=tmp_path / "new" / "out")
    assert list(tmp_path.iterdir()) == []


def test_run_sweep_plot_is_sweep_plot(tiny_bert_dir, tmp_path):
    got = mhacompress.run_sweep(tiny_bert_dir, "stsb", ["cp"], [8], data_dir=FIXTURES, plot=tmp_path / "s.png")
    assert got["plot"] == str(tmp_path / "s.png") and (tmp_path / "s.png").stat().st_size > 10_000


def test_run_sweep_replaces_an_existing_plot_only_with_force(tiny_bert_dir, tmp_path, monkeypatch):
    """plot= replaced any file there (a user's own, too): refused before any cell, as sweep --plot is."""
    notes = tmp_path / "notes.png"
    notes.write_bytes(b"the user's own figure")
    monkeypatch.setattr("mhacompress.executors.run_cells", lambda *a, **k: pytest.fail("a cell ran first"))
    with pytest.raises(UsageError, match=re.escape("exists; choose another plot or pass force=True to replace it")):
        mhacompress.run_sweep(tiny_bert_dir, "stsb", ["cp"], [8], data_dir=FIXTURES, plot=notes)
    assert notes.read_bytes() == b"the user's own figure"
    monkeypatch.undo()
    got = mhacompress.run_sweep(tiny_bert_dir, "stsb", ["cp"], [8], data_dir=FIXTURES, limit=8, plot=notes, force=True)
    assert got["plot"] == str(notes) and notes.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("name,fragment", [("s.xyz", "cannot write .xyz figures"), ("s.png", "mhacompress[plot]")])
def test_run_sweep_refuses_a_plot_it_cannot_write_before_any_cell(tiny_bert_dir, tmp_path, monkeypatch, name,
                                                                   fragment):
    import sys

    if name.endswith(".png"):
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    monkeypatch.setattr("mhacompress.executors.run_cells", lambda *a, **k: pytest.fail("a cell ran first"))
    with pytest.raises(UsageError, match=re.escape(fragment)):
        mhacompress.run_sweep(tiny_bert_dir, "stsb", ["cp"], [8], data_dir=FIXTURES, plot=tmp_path / "new" / name)
    assert list(tmp_path.iterdir()) == []


def test_run_sweep_resolves_its_device_as_the_command_does(tiny_bert_dir, glue_dir):
    """device='auto' runs where the command's --device auto runs, and the result names that device, not 'auto'."""
    from mhacompress.devices import resolve_device

    got = mhacompress.run_sweep(str(tiny_bert_dir), "stsb", ["cp"], [8], data_dir=str(glue_dir), limit=8)
    assert got["device"] == str(resolve_device("auto")) and not got["failed"]


def test_finetune_is_finetune(tiny_bert_dir, tmp_path, capfd):
    events = []
    got = mhacompress.finetune(tiny_bert_dir, "qnli", tmp_path / "a", data_dir=FIXTURES, epochs=2, batch_size=2,
                               lr=1e-3, on_progress=events.append)
    assert capfd.readouterr() == ("", "")
    cli = cli_json("finetune", tiny_bert_dir, "-t", "qnli", "-o", tmp_path / "b", "--data-dir", FIXTURES, "--epochs",
                   2, "--batch-size", 2, "--lr", "1e-3")
    assert without(got, TIMINGS + ("output",)) == without(cli, ("output",))
    assert got["output"] == str(tmp_path / "a") and (tmp_path / "a" / "config.json").is_file()
    counted = [e for e in events if e.total]
    assert events[0].stage.startswith("loading") and counted[-1].done == counted[-1].total == got["steps"] == 4


def test_analyze_is_analyze(tiny_bert_dir, tmp_path, capfd):
    events = []
    got = mhacompress.analyze(tiny_bert_dir, seq_len=8, key_dims=[8, 16], plot=tmp_path / "a",
                              on_progress=events.append)
    assert capfd.readouterr() == ("", "")
    cli = cli_json("analyze", tiny_bert_dir, "--seq-len", 8, "--key-dims", "8,16", "--plot", tmp_path / "b")
    assert without(got, TIMINGS + ("figures",)) == without(cli, ("figures",))
    assert got["figures"] == [str(tmp_path / "a" / Path(f).name) for f in cli["figures"]]
    counted = [e for e in events if e.total]
    assert events[0].stage.startswith("loading") and counted[-1].done == counted[-1].total == 2 * (1 + 2)


@pytest.mark.parametrize("call,command,renamed", [("finetune", "finetune", {"do_eval": "evaluate"}),
                                                  ("analyze", "analyze", {"no_curve": None, "plot_dir": "plot"})])
def test_finetune_and_analyze_take_their_commands_defaults(call, command, renamed):
    import inspect

    parameters = inspect.signature(getattr(mhacompress, call)).parameters
    options = main.commands[command].make_context(command, [], resilient_parsing=True).params  # as parsed
    for option in main.commands[command].params:
        name = renamed.get(option.name, option.name)
        if name and option.name != "as_json" and not option.required:
            assert parameters[name].default == options[option.name], name


def test_every_command_is_an_exported_and_documented_call():
    for call in ("compress", "evaluate", "report", "to_onnx", "run_sweep", "finetune", "analyze"):
        assert call in mhacompress.__all__ and f"mhacompress.{call}(" in mhacompress.__doc__
        assert callable(getattr(mhacompress, call))


COMMANDS = {"compress": "reduce", "evaluate": "eval", "report": "report", "to_onnx": "export", "run_sweep": "sweep",
            "finetune": "finetune", "analyze": "analyze", "reduce_": "reduce", "save": "reduce", "load": "reduce"}


# command option -> the call's argument, where the names differ (None: nothing to pass; docs/usage.md's table)
RENAMED = {"reduce": {"model": "model_or_name", "calibrate_source": "calibration", "refine": "refine_steps",
                      "eval_task": "evaluate"},
           "eval": {}, "report": {"no_latency": "latency"}, "export": {}, "finetune": {"do_eval": "evaluate"},
           "sweep": {"calibrate_source": "calibration", "refine": "refine_steps", "cpus_per_cell": "num_cpus",
                     "gpus_per_cell": "num_gpus", "resume_dir": "resume", "plot_file": "plot"},
           "analyze": {"no_curve": "curve", "plot_dir": "plot"}}


@pytest.mark.parametrize("command", RENAMED)
def test_every_option_of_a_command_is_an_argument_of_its_call(command):
    """The promise that a Python user gets everything the CLI does: an option added to a command without its
    argument in the call (or, for reduce and sweep, in ReductionConfig / Calibration) fails here."""
    import inspect

    call = {v: k for k, v in COMMANDS.items() if k not in ("reduce_", "save", "load")}[command]
    arguments = set(inspect.signature(getattr(mhacompress, call)).parameters)
    if command in ("reduce", "sweep"):
        arguments |= {*inspect.signature(mhacompress.Calibration).parameters}
    if command == "reduce":
        arguments |= {*inspect.signature(mhacompress.ReductionConfig).parameters}
    for option in main.commands[command].params:
        name = RENAMED[command].get(option.name, option.name)
        assert name is None or option.name == "as_json" or name in arguments, f"{command} {option.opts[0]}"


def test_help_lists_every_public_name_and_each_call_names_its_command():
    """help(mhacompress) showed one function, the lazy loader's __getattr__: the calls are imported on first use,
    so pydoc did not see them. Each call's own help says which command it is."""
    import pydoc

    text = pydoc.render_doc(mhacompress, renderer=pydoc.plaintext)
    public = [name for name in mhacompress.__all__ if name != "__version__"]
    assert set(COMMANDS) | {"Calibration", "Compressed", "Progress", "ReductionConfig", "UsageError",
                            "ConfigError"} == set(public)
    # docs/usage.md names both beside each other: catchable from the package, one class wherever it is raised
    assert issubclass(mhacompress.ConfigError, (mhacompress.UsageError, ValueError))
    from mhacompress.reduction.config import ConfigError

    assert ConfigError is mhacompress.ConfigError is mhacompress.errors.ConfigError
    for name in public:
        assert name in mhacompress.__doc__, name
        assert re.search(rf"^ {{4}}(class )?{name}\b", text, re.M), f"help(mhacompress) does not list {name}"
    for call, command in COMMANDS.items():
        assert f"mhacompress {command}" in getattr(mhacompress, call).__doc__, call
    assert "__getattr__" not in text


@pytest.mark.parametrize("call,command", [("evaluate", "eval"), ("report", "report"), ("run_sweep", "sweep")])
def test_each_call_runs_where_its_command_runs_by_default(call, command):
    """The command's --device auto (CUDA, then MPS, then the CPU): evaluate and report ran on the CPU by default,
    so on a GPU machine the same call was slower than the command and could score differently."""
    import inspect

    option = next(p for p in main.commands[command].params if p.name == "device")
    assert inspect.signature(getattr(mhacompress, call)).parameters["device"].default == option.default == "auto"


def test_bad_input_is_a_usage_error_before_any_model_loads(tiny_bert_dir, glue_dir):
    with pytest.raises(UsageError, match="pass key_dim to reduce it"):
        mhacompress.report(tiny_bert_dir, latency=False)  # an original model needs a key dim to compare with
    with pytest.raises(UsageError):
        mhacompress.evaluate(tiny_bert_dir, "no-such-task", data_dir=glue_dir)


CALLBACK_CALLS = {
    "compress": lambda src, cb: mhacompress.compress(src, mhacompress.ReductionConfig(key_dim=8), on_progress=cb),
    "reduce_": lambda src, cb: mhacompress.reduce_(_tiny_bert(), mhacompress.ReductionConfig(key_dim=8), on_layer=cb),
    "evaluate": lambda src, cb: mhacompress.evaluate(src, "stsb", limit=4, on_progress=cb),
    "report": lambda src, cb: mhacompress.report(src, key_dim=8, latency=False, on_progress=cb),
    "to_onnx": lambda src, cb: mhacompress.to_onnx(src, "m.onnx", on_progress=cb),
    "finetune": lambda src, cb: mhacompress.finetune(src, "stsb", "ft", limit=4, on_progress=cb),
    "analyze": lambda src, cb: mhacompress.analyze(src, curve=False, on_progress=cb),
    "run_sweep": lambda src, cb: mhacompress.run_sweep(src, "stsb", ["cp"], [8], limit=4, on_result=cb),
}


def _tiny_bert():
    from conftest import tiny_model

    return tiny_model("bert")


@pytest.mark.parametrize("call", CALLBACK_CALLS)
def test_a_callback_that_takes_no_event_is_refused_before_any_model_loads(call, tiny_bert_dir, glue_dir, tmp_path,
                                                                          monkeypatch):
    """on_progress=lambda: ... was a TypeError at its first event; run_sweep's on_result one only after the model had
    loaded and the original's cell had run."""
    from mhacompress import hub

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the callback was checked")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MHACOMPRESS_GLUE_DIR", str(glue_dir))
    monkeypatch.setattr(hub, "load_pretrained", loaded)
    monkeypatch.setattr(hub, "load", loaded)
    with pytest.raises(UsageError, match=r"(on_progress|on_result|on_layer) must be a function taking .*cannot be "
                                         r"called with one") as err:
        CALLBACK_CALLS[call](str(tiny_bert_dir), lambda: None)
    assert "\n" not in str(err.value) and not list(tmp_path.iterdir())


@pytest.mark.parametrize("callback", [print, [].append, lambda *events: None, lambda event, extra=1: None],
                         ids=["builtin", "bound-method", "varargs", "a-default"])
def test_a_callback_that_takes_one_event_is_accepted(callback, tiny_bert_dir):
    mhacompress.compress(str(tiny_bert_dir), mhacompress.ReductionConfig(key_dim=8, n_iter_max=2), on_progress=callback)


@pytest.mark.parametrize("bad,fragment", [({"eval_batch_size": "8"}, "eval_batch_size"),
                                          ({"eval_batch_size": 0}, "eval_batch_size"), ({"force": "yes"}, "force")])
def test_compress_checks_an_argument_even_when_nothing_uses_it(tiny_bert_dir, bad, fragment):
    """eval_batch_size='8' without evaluate, force='yes' without output: accepted and ignored."""
    from mhacompress import ReductionConfig

    with pytest.raises(mhacompress.ConfigError, match=fragment):
        mhacompress.compress(tiny_bert_dir, ReductionConfig(key_dim=8), **bad)


def test_an_allocation_that_fails_is_the_commands_one_line_in_python_too(tiny_reduced_dir, tiny_bert_dir,
                                                                        monkeypatch):
    """report(batch_size=10**12) raised torch's multi-line RuntimeError in Python, where the command prints one line
    naming the options that lower its memory; in Python they are named as the call's arguments."""
    import mhacompress.bench as bench
    import mhacompress.pipeline as pipeline

    def exhausted(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 64000000000000 bytes.\nError code 12")

    monkeypatch.setattr(bench, "inputs", exhausted)
    with pytest.raises(UsageError) as err:
        mhacompress.report(tiny_reduced_dir, seq_len=8, batch_size=10**6, repeats=1)
    assert str(err.value) == ("out of memory (you tried to allocate 64000000000000 bytes. Error code 12); pass a "
                              "smaller batch_size (or seq_len), or use a device with more memory")
    result = CliRunner().invoke(main, ["report", str(tiny_reduced_dir), "--seq-len", "8", "--batch-size", "1000000"])
    assert result.exit_code == 1 and "pass a smaller --batch-size (or --seq-len)" in result.stderr, result.output
    monkeypatch.setattr(pipeline, "_calibration_texts", exhausted)
    with pytest.raises(UsageError, match="pass a smaller samples, or use a device with more memory"):
        mhacompress.compress(str(tiny_bert_dir), mhacompress.ReductionConfig(
            key_dim=8, calibration=mhacompress.Calibration("mrpc")))
