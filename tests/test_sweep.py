"""`sweep`: every (method, key dim) scored beside the original in one run, a table, JSON and a plot."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import tiny_config
from mhacompress.cli import main
from mhacompress.sweep import grid, table

FIXTURES = Path(__file__).parent / "fixtures" / "glue"


@pytest.fixture(scope="module")
def tiny_encoder(tiny_bert_dir):
    return tiny_bert_dir


def test_sweep_json_and_plot(tiny_encoder, glue_dir, tmp_path):
    plot = tmp_path / "sweep.png"
    result = CliRunner().invoke(main, ["sweep", str(tiny_encoder), "--task", "stsb", "--data-dir", str(glue_dir),
                                       "--limit", "40", "--key-dims", "32,8", "--methods", "cp,svd",
                                       "--plot", str(plot), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [(r["method"], r["key_dim"]) for r in report["results"]] == [("cp", 32), ("cp", 8), ("svd", 32), ("svd", 8)]
    full = report["results"][0]
    assert full["score"] == pytest.approx(report["original"]["score"], abs=1e-4)  # full key dim is exact
    assert all(r["interval"][0] <= r["interval"][1] for r in report["results"])
    assert report["results"][1]["qk_params"] < report["original"]["qk_params"]
    assert plot.stat().st_size > 10_000


def test_sweep_calibrated(tiny_encoder, glue_dir):
    result = CliRunner().invoke(main, ["sweep", str(tiny_encoder), "-t", "stsb", "--data-dir", str(glue_dir),
                                       "--limit", "20", "--key-dims", "12", "--methods", "CP",
                                       "--calibrate", "mrpc", "--samples", "16", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    row = report["results"][0]
    assert row["method"] == "cp"  # method names are read in any case, as reduce --method takes them
    assert 0 < row["mean_expected_output_error"] < 1  # the default objective's error, averaged over layers
    # refinement left to its default is decided per cell (none above d/4, d = 32 here): each row says what it got
    assert report["calibration"]["refine_steps"] is None and row["refine_steps"] == 0
    assert row["allocate"] is False  # so is allocation (off above d/8)


def test_sweep_refine_reaches_every_cell_as_reduce_takes_it(tiny_encoder, glue_dir):
    """--refine 0 keeps the closed form at d/8 (d = 32 here), where a calibrated reduction refines by default."""
    from mhacompress.reduction.config import TOKEN_REFINE_STEPS
    from mhacompress.sweep import cell_config

    def calibration(*extra):
        result = CliRunner().invoke(main, ["sweep", str(tiny_encoder), "-t", "stsb", "--data-dir", str(glue_dir),
                                           "--limit", "8", "--key-dims", "4", "--methods", "cp", "--calibrate",
                                           "mrpc", "--samples", "8", "--json", *extra])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    def steps(saved):
        return cell_config({"key_dim": 4, "method": "cp", "seed": 0, "calibration": saved}).refines(32, 2)

    closed, default = calibration("--refine", "0"), calibration()
    assert steps(closed["calibration"]) == 0 and steps(default["calibration"]) == TOKEN_REFINE_STEPS
    # and each row reports the steps its cell took: the sweep's calibration says null for "decided per cell"
    assert [r["refine_steps"] for r in closed["results"] + default["results"]] == [0, TOKEN_REFINE_STEPS]
    assert [r["allocate"] for r in closed["results"] + default["results"]] == [True, True]  # at d/8 either way


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory, minilm_path):
    """A tiny random BERT with a 2-label head (MRPC's shape) and the bundled tokenizer."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    path = tmp_path_factory.mktemp("tiny-clf") / "bert"
    BertForSequenceClassification(tiny_config("bert", vocab_size=tokenizer.vocab_size, num_labels=2)).save_pretrained(
        path)
    tokenizer.save_pretrained(path)
    return path


def test_a_sweep_of_a_classifier_from_the_weights_alone_warns_with_the_fix_as_reduce_does(tiny_classifier, glue_dir):
    common = ["sweep", str(tiny_classifier), "-t", "mrpc", "--data-dir", str(glue_dir), "--limit", "8",
              "--key-dims", "8", "--methods", "cp", "--json"]
    plain = CliRunner().invoke(main, common)
    assert plain.exit_code == 0, plain.output
    warnings = json.loads(plain.stdout)["warnings"]
    assert len(warnings) == 1 and "--calibrate" in warnings[0]
    human = CliRunner().invoke(main, common[:-1])  # tables and warnings on stderr
    assert human.exit_code == 0 and "warning" in human.stderr and "--calibrate TASK" in human.stderr, human.output
    calibrated = CliRunner().invoke(main, [*common, "--calibrate", "mrpc", "--samples", "8"])
    assert calibrated.exit_code == 0, calibrated.output
    assert json.loads(calibrated.stdout)["warnings"] == []


@pytest.mark.parametrize("args", [["--samples", "4"], ["--refine", "0"]], ids=["samples", "refine"])
def test_calibration_settings_without_calibrate_are_refused_not_ignored(tiny_encoder, glue_dir, args):
    result = CliRunner().invoke(main, ["sweep", str(tiny_encoder), "-t", "stsb", "--data-dir", str(glue_dir), *args])
    assert result.exit_code == 2 and "give --calibrate SOURCE too" in result.output, result.output


@pytest.mark.parametrize("args,fragment", [
    (["--methods", "cp,pca"], "--methods takes cp, tucker, svd"),
    (["--methods", ""], "--methods takes cp, tucker, svd"),
    (["--methods", ","], "--methods takes cp, tucker, svd"),
    (["--key-dims", "8,x"], "comma-separated positive integers"),
    (["--key-dims", "10", "--methods", "svd"], "not a multiple of 4"),
])
def test_sweep_bad_grids(tiny_encoder, glue_dir, args, fragment):
    """A bad command line: exit 2, as click's own refusals."""
    result = CliRunner().invoke(main, ["sweep", str(tiny_encoder), "-t", "stsb", "--data-dir", str(glue_dir), *args])
    assert result.exit_code == 2 and fragment in result.output and "Traceback" not in result.output


def test_a_grid_runs_each_cell_once_whatever_the_repeats():
    cells = grid("tiny", "stsb", ["cp", "svd", "cp"], [8, 16, 8])
    assert [(c["method"], c["key_dim"]) for c in cells[1:]] == [("cp", 8), ("cp", 16), ("svd", 8), ("svd", 16)]


@pytest.mark.parametrize("name,fragment", [("sweep.xyz", "cannot write .xyz figures"),
                                           ("sweep.png", "pip install 'mhacompress[plot]'")])
def test_a_plot_that_cannot_be_written_is_refused_before_any_cell(tiny_encoder, glue_dir, tmp_path, monkeypatch,
                                                                  name, fragment):
    import sys

    if name.endswith(".png"):
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    monkeypatch.setattr("mhacompress.executors.run_cells", lambda *a, **k: pytest.fail("a cell ran first"))
    result = CliRunner().invoke(main, ["sweep", str(tiny_encoder), "-t", "stsb", "--data-dir", str(glue_dir),
                                       "--limit", "4", "--key-dims", "8", "--plot", str(tmp_path / name), "--json"])
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and fragment in lines[0], result.output
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


def scored(spearman: float) -> dict:
    """A cell's outcome with a known STS-B score."""
    return {"ok": True, "error": None, "result": {"metrics": {"spearman": spearman, "pearson": 0.0}, "examples": 10,
                                                    "qk_params": 100}}


def test_drop_is_the_original_score_minus_the_reduced_one():
    """Positive drop = the reduction lost that much; negative = it scored higher."""
    cells = grid("tiny", "stsb", ["cp"], [8, 16])  # the original, then cp at 8 and 16
    result = table(cells, [scored(0.80), scored(0.70), scored(0.85)], "tiny", "stsb", seconds=1.0)
    assert result["original"]["score"] == 0.80
    assert [(r["key_dim"], r["score"]) for r in result["results"]] == [(8, 0.70), (16, 0.85)]
    assert [r["drop"] for r in result["results"]] == pytest.approx([0.10, -0.05])


def test_each_row_has_its_drops_bootstrap_interval_when_the_cells_kept_their_predictions():
    from mhacompress.eval.metrics import drop_interval

    cells = grid("tiny", "sst2", ["cp"], [8, 16])
    labels = [0, 1, 1, 0, 1, 0, 1, 1]
    preds = [[0, 1, 1, 0, 1, 0, 1, 1], [0, 1, 0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 1, 0, 1, 1]]
    outcomes = [{"ok": True, "result": {"metrics": {"accuracy": sum(p == y for p, y in zip(ps, labels)) / 8},
                                        "examples": 8, "qk_params": 10, "seconds": 1.0, "mean_relative_error": 0.1,
                                        "preds": ps}} for ps in preds]
    outcomes[0]["result"].pop("mean_relative_error")
    rows = table(cells, outcomes, "tiny", "sst2", seconds=1.0, labels=labels)["results"]
    assert rows[0]["interval"] == drop_interval("accuracy", preds[0], preds[1], labels)  # the original vs cp at 8
    assert rows[1]["interval"] == [0.0, 0.0]  # the same predictions: no drop on any draw
    assert all("preds" not in r for r in rows)  # kept in the cell files, not printed
    assert "interval" not in table(cells, outcomes, "tiny", "sst2", seconds=1.0, labels=labels[:7])["results"][0]
    flipped = [1 - x for x in preds[1]]  # valid class indices, but not the ones cp at 8 was scored on
    outcomes[1]["result"]["preds"] = flipped
    assert "interval" not in table(cells, outcomes, "tiny", "sst2", seconds=1.0, labels=labels)["results"][0]
    del outcomes[1]["result"]["preds"]  # a cell file from before the intervals
    assert "interval" not in table(cells, outcomes, "tiny", "sst2", seconds=1.0, labels=labels)["results"][0]


def test_the_plot_draws_each_rows_interval_as_error_bars_around_its_score(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from mhacompress.sweep import plot

    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    rows = [{"method": "cp", "key_dim": 8, "score": 0.7, "drop": 0.1, "interval": [0.04, 0.13], "qk_params": 10},
            {"method": "cp", "key_dim": 16, "score": 0.8, "drop": 0.0, "qk_params": 20}]  # resumed: no interval
    plot({"task": "stsb", "metric": "spearman", "examples": 8, "original": {"score": 0.8, "qk_params": 40},
          "results": rows}, tmp_path / "p.png")
    bars = [c for ax in drawn[0].axes for c in ax.containers]
    assert len(bars) == 2  # one line of error bars in each panel
    low, high = bars[0].lines[2][0].get_segments()[0][:, 1]  # the first row's bar: 0.8 - 0.13 to 0.8 - 0.04
    assert (low, high) == pytest.approx((0.67, 0.76))


def test_sweep_resume_skips_finished_cells_and_gives_the_same_table(tiny_encoder, glue_dir, tmp_path):
    args = ["sweep", str(tiny_encoder), "-t", "stsb", "--data-dir", str(glue_dir), "--limit", "20", "--key-dims",
            "8", "--methods", "cp", "--resume", str(tmp_path / "cells"), "--json"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert len(list((tmp_path / "cells").glob("*.json"))) == 2  # the original and one reduction
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    a, b = json.loads(first.stdout), json.loads(again.stdout)
    assert a["results"][0]["score"] == b["results"][0]["score"] and a["original"] == b["original"]


def test_a_model_replaced_at_the_same_path_is_not_given_the_old_models_cells(tiny_encoder, glue_dir, tmp_path):
    """Cells were named by the model's path: a model saved again at that path (trained on, or another seed) was given
    the old model's scores from the resume folder, beside fresh cells of the new one, in one table."""
    from transformers import BertModel

    model = tmp_path / "model"
    shutil.copytree(tiny_encoder, model)
    args = ["sweep", str(model), "-t", "stsb", "--data-dir", str(glue_dir), "--limit", "20", "--key-dims", "8",
            "--methods", "cp", "--resume", str(tmp_path / "cells"), "--json"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    torch.manual_seed(1)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    BertModel(tiny_config("bert", vocab_size=vocab)).save_pretrained(model)  # same path, other weights
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert len(list((tmp_path / "cells").glob("*.json"))) == 4  # both models' cells, none reused
    fresh = CliRunner().invoke(main, ["eval", str(model), "-t", "stsb", "--data-dir", str(glue_dir), "--limit", "20",
                                      "--json"])
    assert json.loads(again.stdout)["original"]["metrics"] == json.loads(fresh.stdout)["metrics"]
    assert json.loads(again.stdout)["original"] != json.loads(first.stdout)["original"]
    unchanged = CliRunner().invoke(main, args)  # and the folder still serves a rerun on the same files
    assert json.loads(unchanged.stdout)["results"] == json.loads(again.stdout)["results"]
    assert len(list((tmp_path / "cells").glob("*.json"))) == 4


def test_cells_whose_steps_the_version_decides_are_named_by_its_defaults(tiny_encoder, glue_dir, monkeypatch):
    """A calibrated cell leaves its refinement steps to the model's shape and the version's defaults: a resume folder
    of a version with other defaults is swept afresh, not read as this one's. Steps given by hand name themselves."""
    import mhacompress.sweep as sweep
    from mhacompress import Calibration
    from mhacompress.executors import cell_key

    def names(**calibration):
        cells = sweep.grid(str(tiny_encoder), "stsb", ["cp"], [4], data_dir=str(glue_dir),
                           calibration=Calibration("mrpc", samples=8, **calibration))
        return [cell_key(c) for c in cells]

    default, by_hand = names(), names(refine_steps=400)
    monkeypatch.setattr(sweep, "TOKEN_REFINE_STEPS", 300)
    assert names() != default and names(refine_steps=400) == by_hand
    monkeypatch.undo()
    monkeypatch.setattr(sweep, "REFINE_RULE", sweep.REFINE_RULE + 1)  # the same counts, decided by a new rule
    assert names() != default and names(refine_steps=400) == by_hand


def test_a_resumed_rerun_replaces_its_own_figure_only_with_force(tiny_encoder, glue_dir, tmp_path):
    """--plot replaced any file there, a user's notes too; a rerun with --resume keeps the same --plot, so --force is
    the way to replace the figure it wrote before."""
    plot = tmp_path / "sweep.png"
    args = ["sweep", str(tiny_encoder), "-t", "stsb", "--data-dir", str(glue_dir), "--limit", "8", "--key-dims",
            "8", "--methods", "cp", "--resume", str(tmp_path / "cells"), "--plot", str(plot), "--json"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    plot.write_bytes(b"an older figure")
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1 and "exists; choose another --plot or pass --force" in refused.stderr, refused.output
    assert plot.read_bytes() == b"an older figure"
    forced = CliRunner().invoke(main, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert plot.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("damage", [{"metrics": "garbage"}, {"metrics": {}}, {}, ["a list"], None])
def test_a_resume_file_with_a_damaged_result_is_run_again_not_a_traceback(tiny_encoder, glue_dir, tmp_path, damage):
    args = ["sweep", str(tiny_encoder), "-t", "stsb", "--data-dir", str(glue_dir), "--limit", "8", "--key-dims",
            "8", "--methods", "cp", "--resume", str(tmp_path / "cells"), "--json"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    for path in (tmp_path / "cells").glob("*.json"):  # an edited file, or one written by another version
        stored = json.loads(path.read_text())
        path.write_text(json.dumps({**stored, "result": damage}))
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    a, b = json.loads(first.stdout), json.loads(again.stdout)
    assert a["original"] == b["original"] and a["results"][0]["score"] == b["results"][0]["score"]


def test_a_resumed_cell_with_numbers_no_run_can_give_is_run_again(tiny_encoder, glue_dir, tmp_path):
    """A cell edited to spearman 123.0 (and qk_params 1) was put in the table as measured: drop -122.76, exit 0."""
    args = ["sweep", str(tiny_encoder), "-t", "stsb", "--data-dir", str(glue_dir), "--limit", "8", "--key-dims",
            "8", "--methods", "cp", "--resume", str(tmp_path / "cells"), "--json"]
    first = CliRunner().invoke(main, args)
    for path in (tmp_path / "cells").glob("*.json"):
        stored = json.loads(path.read_text())
        stored["result"]["metrics"]["spearman"] = 123.0
        path.write_text(json.dumps(stored))
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    a, b = json.loads(first.stdout), json.loads(again.stdout)
    assert a["original"] == b["original"] and a["results"][0]["score"] == b["results"][0]["score"]


@pytest.mark.parametrize("preds,kept", [
    ([1, 0] * 4, True),
    ([0.5] * 8, False),  # a classifier predicts class indices
    ([7] * 8, False),  # MRPC has two classes
    ([-1] * 8, False),
    ([True, False] * 4, False),
])
def test_a_classifiers_stored_predictions_must_be_its_class_indices(preds, kept):
    from mhacompress.sweep import usable

    value = {"metrics": {"f1": 0.8, "accuracy": 0.7}, "examples": 8, "qk_params": 2048, "seconds": 1.5,
             "mean_relative_error": 0.3, "preds": preds}
    assert usable({"method": "cp", "task": "mrpc"}, value) is kept


@pytest.mark.parametrize("edit,kept", [
    (lambda r: r, True),
    (lambda r: r["metrics"].update(spearman=float("nan")), True),  # constant predictions: undefined, as measured
    (lambda r: r["metrics"].update(pearson=-1.0), True),
    (lambda r: r["metrics"].update(spearman=123.0), False),
    (lambda r: r["metrics"].update(pearson=-1.5), False),
    (lambda r: r["metrics"].update(spearman=float("inf")), False),
    (lambda r: r["metrics"].update(spearman="0.5"), False),
    (lambda r: r.update(qk_params=0), False),
    (lambda r: r.update(qk_params=2.5), False),
    (lambda r: r.update(examples=0), False),
    (lambda r: r.update(seconds=-1.0), False),
    (lambda r: r.update(mean_relative_error=float("nan")), False),
    (lambda r: r.update(qk_params=10 ** 400), False),  # broke the figure: int too large to convert to float
    (lambda r: r.update(score=0.99), False),  # the table's own columns: a stored one overwrote the measured
    (lambda r: r.update(method="fake"), False),
    (lambda r: r.update(key_dim=9999), False),
    (lambda r: r.update(nested={"a": 1}), False),
    (lambda r: r["metrics"].update(accuracy=0.5), False),  # not one of STS-B's metrics
    (lambda r: r.update(refine_steps=200, allocate=False, mean_expected_output_error=0.2), True),
    (lambda r: r.update(refine_steps=-5), False),
    (lambda r: r.update(allocate="yes"), False),
    (lambda r: r.update(mean_expected_output_error=-1.0), False),
    (lambda r: r.update(preds=[0.5] * 8), True),  # each example's prediction, for the drop's interval
    (lambda r: r.update(preds=[0.5] * 7), False),  # not one per example
    (lambda r: r.update(preds=[0.5] * 7 + [float("nan")]), False),
    (lambda r: r.update(preds=[0.5] * 7 + ["x"]), False),
    (lambda r: r.update(preds="0.5"), False),
])
def test_a_resumed_value_is_usable_only_if_a_run_could_have_given_it(edit, kept):
    from mhacompress.sweep import usable

    value = {"metrics": {"pearson": 0.8, "spearman": 0.79}, "examples": 8, "qk_params": 2048, "seconds": 1.5,
             "mean_relative_error": 0.3}
    edit(value)
    assert usable({"method": "cp", "task": "stsb"}, value) is kept


@pytest.mark.slow
def test_sweep_on_a_real_local_ray_instance_gives_the_local_numbers(tiny_encoder, glue_dir):
    pytest.importorskip("ray")
    common = ["sweep", str(tiny_encoder), "-t", "stsb", "--data-dir", str(glue_dir), "--limit", "20",
              "--key-dims", "32,8", "--methods", "cp,svd", "--device", "cpu", "--json"]
    local = CliRunner().invoke(main, common)
    distributed = CliRunner().invoke(main, [*common, "--executor", "ray"])
    assert local.exit_code == 0 and distributed.exit_code == 0, (local.output, distributed.output)
    a, b = json.loads(local.stdout), json.loads(distributed.stdout)
    # the same cells and numbers, to float32 rounding: a Ray task runs on its num_cpus=1 thread, this process on all
    # cores, and a threaded sum rounds differently (correlations 1e-6 apart on a 2-core Xeon; near 0, so absolute)
    assert [(r["method"], r["key_dim"]) for r in a["results"]] == [(r["method"], r["key_dim"]) for r in b["results"]]
    assert [r["score"] for r in a["results"]] == pytest.approx([r["score"] for r in b["results"]], abs=1e-5)
    assert a["original"]["qk_params"] == b["original"]["qk_params"]
    assert a["original"]["metrics"] == pytest.approx(b["original"]["metrics"], abs=1e-5)


def test_run_sweep_takes_the_same_paths_as_the_other_calls(tiny_encoder, glue_dir):
    """The model and data_dir as Paths, as compress and evaluate take them (cells are JSON: it was a TypeError)."""
    import mhacompress

    result = mhacompress.run_sweep(tiny_encoder, "stsb", ["cp"], [8], data_dir=glue_dir, limit=4)
    assert [(r["method"], r["key_dim"]) for r in result["results"]] == [("cp", 8)] and not result["failed"]


def closed_port() -> int:
    import socket

    with socket.socket() as sock:  # a port that was just free: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("existing", [False, True])
def test_a_sweep_that_fails_after_its_checks_removes_only_the_folders_it_created(tiny_encoder, tmp_path, monkeypatch,
                                                                                  existing):
    """An unreachable cluster is found once the checks passed and the resume folder was made: new/ and new/cells
    were left behind; a resume folder that was there before stays."""
    import mhacompress
    from mhacompress.errors import UsageError

    pytest.importorskip("ray")
    monkeypatch.chdir(tmp_path)
    if existing:
        (tmp_path / "new" / "cells").mkdir(parents=True)
    with pytest.raises(UsageError, match="cannot reach the Ray cluster"):
        mhacompress.run_sweep(tiny_encoder, "stsb", ["cp"], [8], data_dir=FIXTURES, limit=4, resume="new/cells",
                              executor="ray", address=f"127.0.0.1:{closed_port()}")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == (
        ["new", "new/cells"] if existing else [])


def test_glue_data_replaced_at_the_same_path_is_not_given_the_old_datas_cells(tiny_encoder, glue_dir, tmp_path):
    """The cells' fingerprint covered the model and a calibration file, not the GLUE data: a dev set edited (or
    replaced by another copy) at the same --data-dir was scored with the old data's cells from the resume folder."""
    data = tmp_path / "glue"
    shutil.copytree(Path(glue_dir) / "STS-B", data / "STS-B")
    args = ["sweep", str(tiny_encoder), "-t", "stsb", "--data-dir", str(data), "--limit", "20", "--key-dims", "8",
            "--methods", "cp", "--resume", str(tmp_path / "cells"), "--json"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    dev = data / "STS-B" / "dev.tsv"
    header, *rows = dev.read_text(encoding="utf-8").splitlines()
    dev.write_text("\n".join([header, *rows[20:40], *rows[:20]]) + "\n", encoding="utf-8")  # other first 20
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert len(list((tmp_path / "cells").glob("*.json"))) == 4  # both data's cells, none reused
    assert json.loads(again.stdout)["original"] != json.loads(first.stdout)["original"]
    unchanged = CliRunner().invoke(main, args)
    assert json.loads(unchanged.stdout)["results"] == json.loads(again.stdout)["results"]
    assert len(list((tmp_path / "cells").glob("*.json"))) == 4


def test_numpy_key_dims_seed_and_limit_make_the_same_json_cells_as_python_numbers(tiny_encoder, glue_dir):
    """The config takes numpy integers (np.arange(...) key dims); the cells kept them, and naming a cell for
    resume= (json.dumps) failed in a TypeError, as did json.dumps of run_sweep's result."""
    import numpy as np

    def cells(key_dims, seed, limit):
        return grid(str(tiny_encoder), "stsb", ["cp"], key_dims, seed=seed, data_dir=str(glue_dir), limit=limit)

    got = cells(list(np.array([8, 16])), np.int64(1), np.int32(20))
    assert json.dumps(got) == json.dumps(cells([8, 16], 1, 20))
