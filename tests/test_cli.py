"""The command line: instant help, one JSON object for scripts, one-line errors for bad input, nothing half-written."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from mhacompress.cli import main
from mhacompress.reduction.config import REFINE_STEPS, TOKEN_REFINE_STEPS


@pytest.fixture(scope="module")
def tiny_dir(tiny_bert_dir):
    return tiny_bert_dir


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("command", [[]] + [[name] for name in main.commands])
def test_every_command_has_help_with_an_example(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output
    assert "mhacompress" in result.output


def test_the_command_alone_shows_its_help():
    result = invoke()
    assert "Usage:" in result.output and "Commands:" in result.output and "Error" not in result.output


def test_help_does_not_import_torch():
    code = ("import sys; from mhacompress.cli import main; "
            "print(any(m in sys.modules for m in ('torch', 'transformers')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_python_dash_m_runs_the_same_command_line():
    result = subprocess.run([sys.executable, "-m", "mhacompress", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("mhacompress"), result.stderr


def test_a_deleted_current_folder_is_one_line_not_a_crash(tiny_dir, tmp_path):
    """A shell left in a folder that was deleted: torch's libraries could not load (an 'Intel oneMKL FATAL ERROR'
    and exit 2, for any command), so it is refused before they load."""
    gone = tmp_path / "gone"
    gone.mkdir()
    code = (f"import os; os.chdir({str(gone)!r}); os.rmdir({str(gone)!r}); from mhacompress.cli import main; "
            f"main(['reduce', {str(tiny_dir)!r}, '-k', '8', '--json'], prog_name='mhacompress')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and result.stdout == "", result.stderr
    assert len(lines) == 1 and "the current folder" in lines[0] and "cd to" in lines[0], result.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_json_to_a_full_stdout_is_one_line_saying_the_work_was_done(tiny_dir, tmp_path):
    """--json > FILE on a full disk: the write fails after the work (here the output folder) is done; it was a
    33-line traceback ending in 'OSError: [Errno 28]'."""
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "mhacompress", "reduce", str(tiny_dir), "-k", "8", "-o",
                                 str(tmp_path / "out"), "--json"], stdout=full, stderr=subprocess.PIPE, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "cannot write the JSON result to stdout: No space left on device" in lines[0] and "written" in lines[0]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_json_with_stdout_closed_is_one_line_saying_the_work_was_done(tiny_dir, tmp_path):
    """--json >&-: Python starts with no sys.stdout, and the result's flush was an AttributeError traceback after the
    output folder had been written."""
    result = subprocess.run([sys.executable, "-m", "mhacompress", "reduce", str(tiny_dir), "-k", "8", "-o",
                             str(tmp_path / "out"), "--json"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: os.close(1))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "cannot write the JSON result: stdout is closed" in lines[0] and "written" in lines[0]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_out_of_memory_suggests_only_the_options_the_command_has(tiny_dir, tmp_path, monkeypatch):
    """reduce has --samples, not --batch-size, --seq-len or --limit, which the message used to suggest to it."""
    import mhacompress.pipeline as pipeline

    def exhausted(*args):
        raise MemoryError

    monkeypatch.setattr(pipeline, "_calibration_texts", exhausted)
    result = CliRunner().invoke(main, ["reduce", str(tiny_dir), "-k", "8", "--calibrate", "mrpc"])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == ("Error: out of memory (MemoryError); pass a smaller --samples, or use a device "
                                     "with more memory")


def test_a_refusal_before_any_work_is_the_one_line_alone_on_stderr(tiny_dir, tmp_path):
    """Without --json, on a stderr that is not a terminal (a CI log): the progress display, stopped before it showed
    anything, printed a blank line above the error."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("the user's")
    result = CliRunner().invoke(main, ["reduce", str(tiny_dir), "-k", "8", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, \
        repr(result.stderr)


def test_a_refusal_after_the_work_began_is_the_one_line_alone_on_stderr(tiny_dir, tmp_path):
    """Without --json, on a stderr that is not a terminal: the progress bars (started by "loading") printed a blank
    line above the error when they stopped; off a terminal they are not shown at all."""
    shutil.copytree(tiny_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["model_type"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["reduce", str(tmp_path / "m"), "-k", "8"])
    assert result.exit_code == 1 and "model_type" in result.stderr, result.stderr
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, repr(result.stderr)


@pytest.mark.parametrize("args,code", [
    (["-k", "0"], 2),  # refused by the settings check
    (["-k", "8", "--refine", "2"], 2),  # needs --calibrate
    (["-k", "8", "--tol", "-1"], 2),
    (["-k", "1000"], 2),  # wider than the model
    (["-k", "8", "--samples", "0"], 2),  # refused by click's parser
    (["-k", "8", "--calibrate", "no-such-file.txt"], 1),  # data that cannot be read
], ids=["key-dim-0", "refine-alone", "tol", "too-wide", "samples-0", "missing-data"])
def test_a_bad_command_line_exits_2_and_a_model_or_data_that_fails_exits_1(tiny_dir, args, code):
    """docs/usage.md: a script tells a bad setting (2, wherever it is checked) from an input that failed (1)."""
    result = CliRunner().invoke(main, ["reduce", str(tiny_dir), *args, "--json"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code and len(lines) == 1 and lines[0].startswith("Error: "), result.output


@pytest.mark.parametrize("args", [
    ["eval", "{tiny}", "-t", "nosuch"],
    ["eval", "{tiny}", "-t", "stsb", "--split", "foo"],
    ["reduce", "{tiny}", "-k", "8", "--eval", "nosuch"],
    ["sweep", "{tiny}", "-t", "stsb", "--key-dims", "8", "--limit", "4", "--force"],  # --force without --plot
    ["export", "{tiny}", "-o", "{out}/m.onnx", "--format", "tflite"],
    ["reduce", "{tiny}", "-k", "8", "--force"],  # a dry run: nothing to replace (was accepted, and ignored)
    ["report", "{tiny}", "-k", "8", "--seq-len", "16", "--repeats", "5", "--no-latency"],  # was ignored
    ["reduce", "{tiny}", "-k", "8", "--data-dir", "{out}"],  # no GLUE task read: was ignored
], ids=["task", "split", "reduce-eval-task", "sweep-force-alone", "export-format", "reduce-force-alone",
        "report-repeats-without-latency", "reduce-data-dir-unread"])
def test_an_unknown_choice_or_an_option_without_its_partner_exits_2(tiny_dir, tmp_path, glue_dir, args):
    """These exited 1, as a model or data set that cannot be used does; docs/usage.md gives 2 to a bad command
    line (a value out of range, settings that do not go together), as click's own refusals."""
    args = [a.format(tiny=tiny_dir, out=tmp_path) for a in args]
    result = CliRunner().invoke(main, [*args, "--data-dir", str(glue_dir)] if args[0] in ("eval", "sweep") or
                                "--eval" in args else args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), result.output


def test_a_sweep_whose_original_cannot_be_scored_exits_1_as_eval_does(tiny_dir, tmp_path, glue_dir):
    """sweep said 2, a bad setting, for a model that cannot be scored (here: a folder without a tokenizer), which eval
    answers with 1: a CI script read it as its own mistake."""
    shutil.copytree(tiny_dir, tmp_path / "model", ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "special*"))
    for args in (["sweep", str(tmp_path / "model"), "-t", "stsb", "--key-dims", "8", "--methods", "cp"],
                 ["eval", str(tmp_path / "model"), "-t", "stsb"]):
        result = CliRunner().invoke(main, [*args, "--limit", "4", "--data-dir", str(glue_dir), "--json"])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and "no tokenizer files" in lines[0], result.output


@pytest.mark.parametrize("args", [
    ["-k", "8"],  # the default --seq-len 128 is more than the tiny model's 64 positions, as a key dim too wide
    ["-k", "8", "--seq-len", "8", "--reduced"],  # -k on an already reduced folder
    ["--seq-len", "8"],  # an original without -k
], ids=["seq-len-beyond-positions", "key-dim-on-a-reduced-folder", "original-without-key-dim"])
def test_report_settings_the_model_cannot_take_exit_2(tiny_dir, tmp_path, args):
    """docs/usage.md: a setting the model cannot take is a bad command line (2), as a key dim too wide is; report
    said 1 for these."""
    model = str(tiny_dir)
    if "--reduced" in args:
        args = [a for a in args if a != "--reduced"]
        model = str(tmp_path / "reduced")
        assert CliRunner().invoke(main, ["reduce", str(tiny_dir), "-k", "8", "-o", model]).exit_code == 0
    result = CliRunner().invoke(main, ["report", model, *args, "--no-latency", "--json"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), result.output


def test_reduce_json_is_one_object_with_the_documented_keys(tiny_dir, tmp_path):
    result = CliRunner().invoke(main, ["reduce", str(tiny_dir), "--key-dim", "8", "-o", str(tmp_path / "out"),
                                       "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"model", "method", "key_dim", "output", "seconds", "params", "layers"} <= report.keys()
    assert report["method"] == "cp" and report["key_dim"] == 8 and report["output"] == str(tmp_path / "out")
    assert report["params"]["after"] < report["params"]["before"]
    assert [x["index"] for x in report["layers"]] == [0, 1]
    assert all({"index", "relative_error", "key_dim"} <= x.keys() for x in report["layers"])
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "tokenizer.json").exists()


def test_reduce_without_output_is_a_dry_run(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("reduce", tiny_dir, "-k", "8", "--method", "tucker")
    assert result.exit_code == 0, result.output
    assert "dry run" in result.output and list(tmp_path.iterdir()) == []


def test_reduce_from_the_weights_alone_points_to_calibration_and_a_calibrated_reduce_does_not(tiny_dir, tmp_path):
    plain = invoke("reduce", tiny_dir, "-k", "8")
    assert plain.exit_code == 0, plain.output
    assert "hint: reduced from the weights alone; --calibrate SOURCE" in plain.output
    texts = tmp_path / "texts.txt"
    texts.write_text("a first sentence to calibrate on\nand another one, a little longer than the first\n")
    calibrated = invoke("reduce", tiny_dir, "-k", "8", "--calibrate", texts, "--samples", "2")
    assert calibrated.exit_code == 0, calibrated.output
    assert "hint:" not in calibrated.output


@pytest.mark.parametrize("args,fragments", [
    ([], ["give exactly one of --key-dim"]),
    (["-k", "0"], ["positive integers"]),
    (["-k", "33"], ["out of range", "1..32"]),
    (["-k", "10", "--method", "svd"], ["not a multiple of 4"]),
    (["-k", "8", "--tol", "-1"], ["--tol", "finite number >= 0"]),
    (["-k", "8", "--tol", "nan"], ["--tol", "finite number >= 0"]),
    (["-k", "8", "--iterations", "0"], ["--iterations", ">= 1"]),
])
def test_reduce_bad_key_dims(tiny_dir, tmp_path, args, fragments):
    result = invoke("reduce", tiny_dir, *args, "-o", tmp_path / "out")
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_reduce_bad_method_is_a_usage_error(tiny_dir):
    result = invoke("reduce", tiny_dir, "-k", "8", "--method", "pca")
    assert result.exit_code == 2 and "Invalid value for '--method'" in result.output


def test_method_names_are_read_in_any_case_as_the_format_is(tiny_dir):
    result = invoke("reduce", tiny_dir, "-k", "8", "--method", "Tucker", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["config"]["method"] == "tucker"
    report = invoke("report", tiny_dir, "-k", "8", "--method", "SVD", "--seq-len", "16", "--no-latency", "--json")
    assert report.exit_code == 0, report.output


def test_reduce_missing_folder(tmp_path):
    assert_one_line_error(invoke("reduce", tmp_path / "nope", "-k", "8"), "no model folder at")


def test_reduce_unsupported_architecture_lists_the_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2Model

    GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    result = invoke("reduce", tmp_path / "gpt2", "-k", "8", "-o", tmp_path / "out")
    assert_one_line_error(result, "'gpt2' is not supported", "bert", "distilbert", "mpnet")
    assert not (tmp_path / "out").exists()


def test_reduce_refuses_a_non_empty_output_and_keeps_it(tiny_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert_one_line_error(invoke("reduce", tiny_dir, "-k", "8", "-o", tmp_path / "out"), "--force")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["offline-flag", "unreachable"])
def test_hub_ids_fail_fast_offline_with_a_hint(env, tmp_path):
    env = {**env, "HF_HOME": str(tmp_path / "hf")}  # an empty cache
    start = time.perf_counter()
    result = invoke("reduce", "bert-base", "-k", "384", env=env)
    assert_one_line_error(result, "google-bert/bert-base-uncased", "local model folder")
    assert time.perf_counter() - start < 15


def test_a_hub_that_takes_the_connection_and_drops_it_is_a_download_error_not_a_broken_checkpoint(tmp_path):
    """A proxy that accepts and then fails was answered 'pass a complete checkpoint written by save_pretrained'. A
    fresh process: huggingface_hub reads HF_ENDPOINT when imported."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def drop():
        while True:
            try:
                connection, _ = server.accept()
            except OSError:  # closed: the test is over
                return
            connection.close()

    threading.Thread(target=drop, daemon=True).start()
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{port}", "PATH": "/usr/bin:/bin"}
    try:
        done = subprocess.run([sys.executable, "-m", "mhacompress", "reduce", "owner/model", "-k", "8"], env=env,
                              capture_output=True, text=True, timeout=120)
    finally:
        server.close()
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith("Error: cannot download owner/model") and "network" in lines[0], lines[0]
    assert "save_pretrained" not in lines[0]


def test_a_missing_folder_under_a_local_folder_is_named_as_a_folder_offline(tmp_path, monkeypatch):
    """OUT/NAME with one slash is also a hub id: a mistyped local folder was answered 'cannot download', as if the
    user had meant the hub."""
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    result = invoke("reduce", "out/does-not-exist", "-k", "8", env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(result, "no model folder at 'out/does-not-exist' (out has no 'does-not-exist')",
                          "pass an existing model folder")


def test_a_cached_hub_model_loads_from_the_cache_alone_when_the_hub_is_unreachable(tiny_dir, tmp_path):
    """Asked with the network down, transformers retried every file a tokenizer may have (added_tokens.json,
    chat_template.jinja, ...) with back-off, about 150 s of 'Retrying in 1s [Retry 1/5]' on stderr, before it read
    the cache. A cached model is read from the cache alone instead, as with HF_HUB_OFFLINE=1. A fresh process: the
    hub's cache folder is fixed when huggingface_hub is imported."""
    from pathlib import Path

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--owner--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "blobs").mkdir()
    (repo / "snapshots" / revision).mkdir(parents=True)
    for i, file in enumerate(sorted(Path(tiny_dir).iterdir())):  # the layout hf_hub_download leaves
        (repo / "blobs" / str(i)).write_bytes(file.read_bytes())
        (repo / "snapshots" / revision / file.name).symlink_to(Path("..", "..", "blobs", str(i)))
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "mhacompress", "reduce", "owner/tiny", "-k", "8", "-o",
                           str(tmp_path / "out"), "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Retrying" not in done.stderr and "127.0.0.1" not in done.stderr, done.stderr
    assert json.loads(done.stdout)["model"] == "owner/tiny"
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.fixture
def calibration_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(f"sentence number {i} about attention heads and their keys" for i in range(24)))
    return path


def test_reduce_calibrated_reports_the_expected_error_of_its_objective(tiny_dir, calibration_file):
    result = invoke("reduce", tiny_dir, "-k", "8", "--calibrate", calibration_file, "--samples", "16", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["calibration"]["source"] == str(calibration_file) and report["calibration"]["samples"] == 16
    assert report["calibration"]["sequential"] is True  # the default data-aware path: output objective, compensated
    assert report["calibration"]["objective"] == "output" and report["calibration"]["compensate"] is True
    assert all(0 < x["expected_output_error"] < 1 for x in report["layers"])
    assert len(report["modified"]) == 2  # both layers' output projections, named in the saved block
    assert report["calibration"]["sequences"] == 16 and report["warnings"] == []


def test_a_calibration_source_shorter_than_samples_is_reported_as_used(tiny_dir, calibration_file):
    """24 lines asked for as 512 samples: the report said samples 512, without a word that 24 were used."""
    result = invoke("reduce", tiny_dir, "-k", "8", "--calibrate", calibration_file, "--samples", "512", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["calibration"]["samples"] == 512 and report["calibration"]["sequences"] == 24
    assert any("calibrated on 24 sequences, fewer than the 512 asked for" in w for w in report["warnings"])


def test_reduce_budget_chooses_per_layer_dims_within_budget(tiny_dir, tmp_path):
    result = invoke("reduce", tiny_dir, "--budget", "0.5", "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["key_dim"] is None and len(report["key_dims"]) == 2
    assert report["params"]["after"] <= 0.5 * report["params"]["before"]
    import mhacompress

    model, _ = mhacompress.load(tmp_path / "out")
    from mhacompress.reduction.modeling import attention_modules

    assert [m.key_dim for _, _, m in attention_modules(model)] == report["key_dims"]


def test_calibrated_budget_allocates_by_the_measured_output_divergence(tiny_dir, calibration_file):
    result = invoke("reduce", tiny_dir, "--budget", "0.5", "--calibrate", calibration_file, "--samples", "16",
                    "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["params"]["after"] <= 0.5 * report["params"]["before"]
    curves = report["budget"]["curves"]  # 1 - cosine of the embeddings, per layer and candidate key dim
    assert len(curves) == 2 and all(str(k) in c for c, k in zip(curves, report["key_dims"]))
    assert all(0 <= e < 1 for c in curves for e in c.values()) and any(e > 0 for c in curves for e in c.values())


def test_calibrated_key_dim_is_an_average_spread_over_layers_at_d_over_8(tiny_dir, calibration_file, tmp_path):
    """--key-dim K --calibrate allocates per-layer dims under K's Q/K parameters by default at K <= d/8 (d = 32
    here) or with --allocate; otherwise, or with --uniform, K is in every layer. All reload."""
    import mhacompress
    from mhacompress.reduction.modeling import attention_modules

    common = ["--calibrate", calibration_file, "--samples", "16", "--json"]
    allocated = json.loads(invoke("reduce", tiny_dir, "-k", "8", "--allocate", *common, "-o", tmp_path / "a").stdout)
    uniform = json.loads(invoke("reduce", tiny_dir, "-k", "8", *common, "-o", tmp_path / "u").stdout)
    small = json.loads(invoke("reduce", tiny_dir, "-k", "4", *common).stdout)
    small_uniform = json.loads(invoke("reduce", tiny_dir, "-k", "4", "--uniform", *common).stdout)
    assert uniform["key_dims"] == [8, 8] and uniform["budget"] is None and uniform["config"]["allocate"] is False
    assert allocated["config"]["allocate"] is True and len(allocated["budget"]["curves"]) == 2
    assert small["config"]["allocate"] is True and small_uniform["key_dims"] == [4, 4]
    # refined too at d/8 (saved as decided; a sentence encoder's steps), and at d/4 on a model whose steps are
    # cheap; the closed form above
    wide = json.loads(invoke("reduce", tiny_dir, "-k", "9", *common).stdout)
    assert small["config"]["calibration"]["refine_steps"] == TOKEN_REFINE_STEPS and "refined" in small["layers"][0]
    assert uniform["config"]["calibration"]["refine_steps"] == TOKEN_REFINE_STEPS and "refined" in uniform["layers"][0]
    assert wide["config"]["calibration"]["refine_steps"] == 0 and "refined" not in wide["layers"][0]
    human = invoke("reduce", tiny_dir, "-k", "4", "--calibrate", calibration_file, "--samples", "16")
    assert human.exit_code == 0 and "key dim 4 on average" in " ".join(human.stderr.split())
    assert f"of 2 layers kept their {TOKEN_REFINE_STEPS} steps" in " ".join(human.stderr.split())
    assert allocated["params"]["after"] <= uniform["params"]["after"]
    for folder, report in ((tmp_path / "a", allocated), (tmp_path / "u", uniform)):
        model, _ = mhacompress.load(folder)
        assert [m.key_dim for _, _, m in attention_modules(model)] == report["key_dims"]


def test_parallel_calibration_refuses_the_sequential_steps(tiny_dir, calibration_file):
    result = invoke("reduce", tiny_dir, "-k", "8", "--calibrate", calibration_file, "--parallel", "--compensate")
    assert_one_line_error(result, "drop --parallel")


def test_reduce_refine_reports_output_errors(tiny_dir, calibration_file):
    result = invoke("reduce", tiny_dir, "-k", "8", "--calibrate", calibration_file, "--refine", "5", "--json")
    assert result.exit_code == 0, result.output
    assert all("output_error_after" in x for x in json.loads(result.stdout)["layers"])


@pytest.mark.parametrize("args,fragment", [
    (["-k", "8", "--refine", "5"], "give --calibrate SOURCE (or --eval TASK) too"),
    (["-k", "8", "--refine", "0"], "give --calibrate SOURCE (or --eval TASK) too"),  # accepted and ignored before
    (["-k", "8", "--samples", "4"], "give --calibrate SOURCE (or --eval TASK) too"),
    (["-k", "8", "--parallel"], "give --calibrate SOURCE (or --eval TASK) too"),
    # --eval was given: it was --weights-only that left the settings without a calibration
    (["-k", "8", "--eval", "stsb", "--weights-only", "--refine", "5"], "drop --weights-only"),
    (["-k", "8", "--budget", "0.5"], "give exactly one of --key-dim"),
    (["--key-dims", "8,x"], "comma-separated positive integers"),
    (["--budget", "1.5"], "0 < F <= 1"),
    (["-k", "8", "--calibrate", "nope.txt"], "no calibration file"),
])
def test_reduce_bad_calibration_and_budget_options(tiny_dir, args, fragment):
    assert_one_line_error(invoke("reduce", tiny_dir, *args), fragment)


def test_help_shows_no_meaningless_range_for_an_unbounded_number():
    result = CliRunner().invoke(main, ["reduce", "--help"], terminal_width=200)
    line = next(line for line in result.output.splitlines() if "--max-drop" in line and "RANGE" in line)
    assert "None" not in line and "[finite]" in line, line


def test_reduce_help_gives_the_refinement_steps_the_default_takes():
    """--help is written without importing the reduction (it stays instant), so it names the step counts as text."""
    result = CliRunner().invoke(main, ["reduce", "--help"], terminal_width=400)
    text = " ".join(result.output.split())
    assert f"Default: {REFINE_STEPS}, or {TOKEN_REFINE_STEPS} for a sentence encoder" in text
