"""Reduce and score one model at many settings: every (method, key dim) cell is one ``compress`` call on a fresh
copy of the model, scored on a task's dev split beside the original. Cells are plain dicts and ``run_cell`` is a
top-level function, so an executor can run them anywhere (this process, or Ray workers)."""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

from . import fsio
from .errors import UsageError, check_callback, named
from .reduction.config import (
    REFINE_RULE,
    REFINE_STEPS,
    TOKEN_REFINE_STEPS,
    Calibration,
    ConfigError,
    ReductionConfig,
    _flag,
)


def grid(model: str, task: str, methods: list[str], key_dims: list[int], *, calibration: Calibration | None = None,
         seed: int = 0, data_dir: str | None = None, limit: int | None = None, device: str = "auto",
         allow_pickle: bool = False) -> list[dict]:
    """The cells of a sweep: the original first, then every distinct (method, key dim), each a JSON-able dict
    (``allow_pickle`` in it only when set: the resume names of the cells of other sweeps stay as they were)."""
    from .commands import checked_call

    checked_call(None, model=model)  # not an AttributeError from deep inside
    for name, value, example in (("methods", methods, "['cp', 'svd']"), ("key_dims", key_dims, "[96, 48]")):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, e.g. {example}; got {type(value).__name__} {value!r:.40}")
    if calibration is not None and not isinstance(calibration, Calibration):
        raise ConfigError(f"calibration must be a Calibration or None, e.g. Calibration('mrpc'); got "
                          f"{type(calibration).__name__}")
    if calibration is not None and calibration.source == "python":  # else "unknown task 'python'"
        raise ConfigError("run_sweep reads its calibration from a GLUE task or a .txt / .jsonl file, e.g. "
                          "Calibration('mrpc'); Calibration('python') is for texts handed to compress(..., "
                          "calibration=[...])")
    if not methods:
        example = named("--methods cp,svd", "methods=['cp', 'svd']")
        raise ConfigError(f"{named('--methods')} is empty; give at least one method, e.g. {example}")
    if not key_dims:
        raise ConfigError(f"{named('--key-dims')} is empty; give at least one key dim, e.g. "
                          f"{named('--key-dims 96,48', 'key_dims=[96, 48]')}")
    from .hub import fingerprint
    from .reduction.config import _plain

    # numpy integers (np.arange(...) key dims), which the config takes, as the Python numbers they hold: the cells
    # are JSON (resume names, --json), which has no numpy types
    key_dims, seed, limit = [_plain(k) for k in key_dims], _plain(seed), _plain(limit)
    calibration = calibration and calibration.seeded(seed)  # drawn with the sweep's seed unless it names its own
    model, data_dir = (os.fspath(x) if isinstance(x, os.PathLike) else x for x in (model, data_dir))  # cells are JSON
    common = {"model": model, "task": task, "seed": seed, "data_dir": data_dir, "limit": limit, "device": device,
              "calibration": None if calibration is None else calibration.__dict__.copy(),
              # the files behind the names: a model, calibration file or GLUE data replaced at the same path is a
              # new cell
              "inputs": fingerprint([model] + ([calibration.source] if calibration is not None else [])
                                    + _task_folders(data_dir, task, calibration)),
              **({"allow_pickle": True} if allow_pickle else {})}
    if calibration is not None and calibration.refine_steps is None:  # steps decided per cell, by these defaults:
        common["refine_defaults"] = [REFINE_STEPS, TOKEN_REFINE_STEPS, REFINE_RULE]  # not another version's cells
    cells = [{**common, "method": None, "key_dim": None}]
    for method in _distinct(methods):  # a repeated method or key dim is one cell
        for key_dim in _distinct(key_dims):
            ReductionConfig(key_dim=key_dim, method=method, seed=seed)  # refuse bad settings before any work
            cells.append({**common, "method": method, "key_dim": key_dim})
    return cells


def _task_folders(data_dir, task: str, calibration: Calibration | None) -> list[Path]:
    """The local GLUE folders a sweep reads: the scored task's and a GLUE calibration task's (none from the hub, and
    none for a name that is no task or a bad ``data_dir``: ``prepare`` refuses those in one line)."""
    from .eval.data import glue_folder_if_usable
    from .eval.tasks import get_task

    root = glue_folder_if_usable(data_dir)
    if root is None:
        return []
    found = []
    for name in [task] + ([calibration.source] if calibration is not None else []):
        with contextlib.suppress(UsageError):
            found.append(Path(root).expanduser() / get_task(name).folder)
    return found


def _distinct(values) -> list:
    """``values`` without repeats, in the order first given (unhashable ones too: the config refuses them next)."""
    return [v for i, v in enumerate(values) if v not in values[:i]]


def prepare(model: str, task: str, methods: list[str], key_dims: list[int], *, calibration: Calibration | None = None,
            seed: int = 0, data_dir=None, limit=None, device: str = "auto", resume=None, allow_pickle: bool = False):
    """(the cells of a sweep, the resume folder reserved: None without one, the warnings, the scored split's
    labels), after everything `sweep` checks before any cell runs: the settings, the ``resume`` folder (never in a
    source), the task's data and the model. A sweep that fails after this gives the folder back with
    ``give_back``."""
    from .calibration import calibration_texts
    from .eval.data import glue_folder, load_examples
    from .eval.tasks import get_task
    from .hub import check_output

    cells = grid(model, task, methods, key_dims, calibration=calibration, seed=seed, data_dir=data_dir, limit=limit,
                 device=device, allow_pickle=allow_pickle)
    target = None
    if resume is not None:  # cell files go in beside what is there, without a lock: several runs may fill it
        target = check_output(resume, True, kind="contents", option="--resume", lock=False,
                              sources=[model, glue_folder(data_dir), calibration and calibration.source])
    try:
        labels = load_examples(get_task(task), "validation", data_dir=data_dir, limit=limit).labels  # problems now
        if calibration is not None:  # a missing or broken --calibrate file too, not once per cell
            calibration_texts(calibration.source, calibration.samples, seed=calibration.seeded(seed).seed,
                              data_dir=data_dir)
        warnings = check_model(cells[0]["model"], methods, key_dims, calibrated=calibration is not None,
                               allow_pickle=allow_pickle)
    except BaseException:
        if target is not None:  # the parent folders made for it go again (a Python session does not exit)
            fsio.release(target)
        raise
    return cells, target, warnings, labels


def run_or_give_back(cells: list[dict], folder, **options) -> list[dict]:
    """``run_cells`` on the cells; when it fails (an unreachable cluster, Ctrl-C), the resume ``folder`` that
    ``prepare`` reserved goes again as far as this call created it (``give_back``)."""
    from .executors import run_cells

    made = folder is not None and not folder.exists()  # its parents are made by now; run_cells makes it
    try:
        return run_cells(cells, run_cell, usable=usable, **options)
    except BaseException:
        if folder is not None:
            give_back(folder, made)
        raise


def give_back(folder, made: bool) -> None:
    """After a sweep failed: the resume ``folder`` removed if this sweep ``made`` it and no cell was stored in it,
    then the parent folders made for it, if still empty. A folder that was there before, or holds a finished cell
    (of this run or another one filling it), stays."""
    if made:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty
    fsio.release(folder)


def check_model(model: str, methods: list[str], key_dims: list[int], *, calibrated: bool = True,
                allow_pickle: bool = False) -> list[str]:
    """Refuse, before any cell runs, a model that does not load or is already reduced, and key dims it cannot take:
    the sweep fails in seconds with the reason, not cell by cell. Returns the sweep's warnings: a classifier reduced
    from the weights alone (not ``calibrated``) gets reduce's."""
    from .hub import load_pretrained
    from .pipeline import WEIGHTS_ONLY_CLASSIFIER
    from .reduction.modeling import is_classifier
    from .reduction.surgery import check_reducible, model_shape

    loaded, _, _ = load_pretrained(model, allow_pickle=allow_pickle, tokenizer=False)
    check_reducible(loaded)
    shape = model_shape(loaded)
    for method in methods:
        for key_dim in key_dims:
            ReductionConfig(key_dim=key_dim, method=method).layer_key_dims(*shape)
    weights_only = not calibrated and is_classifier(loaded)
    return [f"{WEIGHTS_ONLY_CLASSIFIER} (run_sweep: calibration=Calibration(TASK))"] if weights_only else []


def cell_config(cell: dict) -> ReductionConfig:
    calibration = None if cell["calibration"] is None else Calibration(**cell["calibration"])
    return ReductionConfig(key_dim=cell["key_dim"], method=cell["method"], seed=cell["seed"], calibration=calibration)


def run_cell(cell: dict) -> dict:
    """Score one cell: the original (method None), or the model reduced as the cell says."""
    from .devices import resolve_device
    from .eval.compare import Scorer
    from .hub import load_pretrained
    from .pipeline import compress

    start = time.perf_counter()
    device = str(resolve_device(cell["device"]))  # where the cell runs: a Ray worker resolves "auto" itself
    scorer = Scorer.for_task(cell["task"], data_dir=cell["data_dir"], limit=cell["limit"], device=device)
    model, tokenizer, _ = load_pretrained(cell["model"], device=device, allow_pickle=cell.get("allow_pickle", False))
    if cell["method"] is None:
        from .reduction.cost import layer_shapes, qk_params

        scores = scorer(model, tokenizer, "the original")
        return {"metrics": scores, "examples": len(scorer.examples), "preds": scorer.last.preds,
                "qk_params": sum(map(qk_params, layer_shapes(model))), "seconds": round(time.perf_counter() - start, 3)}
    result = compress(model, tokenizer=tokenizer, config=cell_config(cell), data_dir=cell["data_dir"], device=device)
    scores = scorer(result.model, tokenizer, f"{cell['method']} at key dim {cell['key_dim']}")
    layers = result.report["layers"]
    row = {"metrics": scores, "examples": len(scorer.examples), "preds": scorer.last.preds,  # for the drop's interval
           "qk_params": result.report["params"]["after"],
           "mean_relative_error": sum(x["relative_error"] for x in layers) / len(layers),
           "seconds": round(time.perf_counter() - start, 3)}
    if result.config.calibration is not None:  # as decided for the model: the sweep's calibration says None then
        row["refine_steps"] = result.config.calibration.refine_steps
        row["allocate"] = result.config.allocate  # so is allocation (on at d/8 and below)
    for kind in ("expected_score_error", "expected_output_error"):  # what the calibrated objective minimised
        if all(kind in x for x in layers):
            row[f"mean_{kind}"] = sum(x[kind] for x in layers) / len(layers)
    return row


def usable(cell: dict, value) -> bool:
    """Whether ``value`` is what ``run_cell`` can return for ``cell``: a resume file edited by hand, damaged or
    written by another version is run again rather than breaking the table or putting numbers in it that no run
    measured. Only the keys ``run_cell`` writes (a stored "method" or "score" would overwrite the row's own), the
    task's own metrics, each in [-1, 1] (nan where it is undefined, as for constant predictions); counts are positive
    integers a float holds exactly, seconds and errors finite and not negative."""
    from .eval.tasks import get_task

    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and not abs(x) >= 2 ** 53  # nan passes

    def score(x) -> bool:
        return number(x) and (math.isnan(x) or -1.0 - 1e-9 <= x <= 1.0 + 1e-9)  # a correlation rounds past 1

    def count(x) -> bool:
        return number(x) and isinstance(x, int) and x >= 1

    def amount(x) -> bool:
        return number(x) and math.isfinite(x) and x >= 0

    if not isinstance(value, dict) or not isinstance(value.get("metrics"), dict):
        return False
    task, metrics = get_task(cell["task"]), value["metrics"]
    reduced = cell["method"] is not None  # the original's cell has none of the reduction's keys
    required = ("seconds",) + (("mean_relative_error",) if reduced else ())
    optional = ("mean_expected_score_error", "mean_expected_output_error") if reduced else ()
    settings = ("refine_steps", "allocate") if reduced else ()
    if not set(value) <= {"metrics", "examples", "preds", "qk_params", *required, *optional, *settings}:
        return False
    preds = value.get("preds", [])  # optional: a cell file from before the intervals has none
    prediction = (lambda x: number(x) and math.isfinite(x)) if task.regression else \
        (lambda x: number(x) and isinstance(x, int) and 0 <= x < task.num_labels)  # a class index
    if not isinstance(preds, list) or not all(prediction(x) for x in preds) or \
            ("preds" in value and len(preds) != value.get("examples")):
        return False
    return (task.main in metrics and set(metrics) <= set(task.metrics) and all(score(x) for x in metrics.values())
            and count(value.get("examples")) and count(value.get("qk_params"))
            and all(amount(value.get(k)) for k in required)
            and all(amount(value[k]) for k in optional if k in value)
            and (value.get("refine_steps", 0) == 0 or count(value.get("refine_steps")))
            and isinstance(value.get("allocate", False), bool))


def table(cells: list[dict], outcomes: list[dict], model: str, task: str, seconds: float, labels=None) -> dict:
    """The `sweep --json` object from the outcomes (in cell order): the original, one row per reduction (its drop
    is original minus reduced on the task's main metric: positive = worse; with the split's ``labels``, the drop's
    95% paired bootstrap interval, ``metrics.drop_interval``), and the failed cells."""
    from .eval.metrics import drop_interval
    from .eval.tasks import get_task

    metric = get_task(task).main
    original = outcomes[0]
    if not original["ok"]:
        raise UsageError(f"scoring the original failed: {original['error']}")  # a model or data problem: exit 1
    base = original["result"]
    paired = labels is not None and _scored_from(base, metric, labels)  # the original's predictions, checked once
    rows, failed = [], []
    for cell, out in zip(cells[1:], outcomes[1:]):
        if not out["ok"]:
            failed.append({"method": cell["method"], "key_dim": cell["key_dim"], "error": out["error"]})
            continue
        r = out["result"]
        row = {"method": cell["method"], "key_dim": cell["key_dim"], "metric": metric,
               "score": r["metrics"][metric], "drop": base["metrics"][metric] - r["metrics"][metric],
               **{k: v for k, v in r.items() if k not in ("examples", "preds")}}
        if paired and _scored_from(r, metric, labels):
            interval = drop_interval(metric, base["preds"], r["preds"], labels)
            if interval is not None:
                row["interval"] = interval
        rows.append(row)
    from .schema import envelope

    return {**envelope("sweep", cells[0]["device"]), "model": model, "task": get_task(task).name, "metric": metric,
            "examples": base["examples"],
            "calibration": cells[0]["calibration"],
            "original": {"score": base["metrics"][metric], "metrics": base["metrics"], "qk_params": base["qk_params"]},
            "results": rows, "failed": failed, "seconds": round(seconds, 3)}


def _scored_from(result: dict, metric: str, labels) -> bool:
    """Whether a cell's stored predictions are the ones its score was measured on: one per example of the split,
    giving that score again (a resume file's predictions edited, or written for another sample, are not used)."""
    from .eval.metrics import METRICS

    preds, score = result.get("preds"), result["metrics"][metric]
    if not isinstance(preds, list) or len(preds) != len(labels):
        return False
    again = METRICS[metric](preds, labels)
    return (math.isnan(again) and math.isnan(score)) or abs(again - score) <= 1e-9


def sweep(model: str, task: str, methods: list[str], key_dims: list[int], *, calibration: Calibration | None = None,
          seed: int = 0, data_dir=None, limit=None, device: str = "auto", executor: str = "local",
          address: str | None = None, resume=None, num_cpus: float = 1, num_gpus: float = 0, plot=None,
          force: bool = False, allow_pickle: bool = False, on_result=None) -> dict:
    """Every (method, key dim) of ``model`` scored on ``task`` beside the original: each cell in this process
    (``executor="local"``) or as a Ray task (``"ray"``, on the cluster at ``address``, with ``num_cpus`` /
    ``num_gpus`` per task). ``resume``: a folder of finished cells (one JSON file each), skipped on a rerun and
    shareable between executors and machines. ``plot``: a figure file (PNG, or the format of its suffix; an existing
    file is replaced only with ``force``, as a rerun with ``resume`` needs) of score vs key dim and vs Q/K parameters,
    checked before any cell runs. The table is the same whatever the order the cells finish in. `mhacompress sweep`
    in one call (exported as ``mhacompress.run_sweep``; its --calibrate, --samples and --refine are
    ``calibration=Calibration(SOURCE, samples=, refine_steps=)``, --cpus-per-cell and --gpus-per-cell ``num_cpus``
    and ``num_gpus``): returns what ``sweep --json`` prints, with the envelope; ``on_result`` is called with each
    cell's outcome. ``allow_pickle``: also load pickled (.bin) weights, which can run code (``--allow-pickle``)."""
    from .executors import check_settings

    start = time.perf_counter()
    # before any work: run_cells would refuse them only later
    num_cpus, num_gpus = check_settings(executor, address, num_cpus, num_gpus)
    _flag("allow_pickle", allow_pickle)  # 'no' is a true value: it would read pickles, which can run code
    check_callback("on_result", on_result, "one result")  # not after the model has loaded (run_cells checks it too)
    device = cell_device(device, executor, address, num_gpus)
    figure = check_plot(plot, model, data_dir, force)
    try:
        cells, folder, warnings, labels = prepare(model, task, methods, key_dims, calibration=calibration, seed=seed,
                                          data_dir=data_dir, limit=limit, device=device, resume=resume,
                                          allow_pickle=allow_pickle)
        outcomes = run_or_give_back(cells, folder, executor=executor, address=address, resume=resume,
                                    num_cpus=num_cpus, num_gpus=num_gpus, on_result=on_result)
        result = {**table(cells, outcomes, cells[0]["model"], task, time.perf_counter() - start, labels),
                  "warnings": warnings}
        return result if plot is None else plotted(result, plot)
    finally:  # a refusal leaves no lock or parent folder behind (the CLI's process ends; a Python session goes on)
        if figure is not None:
            fsio.release(figure)


def check_plot(path, model, data_dir, force: bool = False):
    """The reserved path of ``sweep --plot``'s figure (None without one; release it when done), after refusing before
    any work what would fail only after it: no matplotlib, a format it cannot write, a source, an unwritable place,
    an existing file without ``force``; and ``force`` without a figure, which would replace nothing."""
    if path is None:
        _flag("force", force)  # 'no' is a true value, checked here too when there is no figure to check it
        if force:
            force_ = named("--force", "force=True")
            raise ConfigError(f"{force_} replaces an existing {named('--plot')} figure; give "
                              f"{named('--plot FILE', 'plot=FILE')} or drop {force_}")
        return None
    from .eval.data import glue_folder
    from .figures import figure_format
    from .hub import check_output

    figure_format(path)
    return check_output(path, force, kind="file", sources=[model, glue_folder(data_dir)], option="--plot")


def plotted(result: dict, path) -> dict:
    """``result`` with its figure written at ``path`` (``plot``)."""
    plot(result, path)
    return {**result, "plot": str(path)}


def cell_device(device: str, executor: str = "local", address: str | None = None, num_gpus: float = 0) -> str:
    """The device the cells get, refused at once when this machine lacks it: resolved here ('auto' too) where the
    cells run on this machine's devices (this process, or a local Ray instance without GPUs per cell); as given for a
    cluster, whose workers resolve it themselves."""
    if executor == "local" or (address is None and num_gpus == 0):
        from .devices import resolve_device

        return str(resolve_device(device))
    return device


def plot(result: dict, path) -> None:
    """Score vs key dim and vs Q/K parameters, one line per method (with the drop's 95% interval as error bars
    where the rows have one), the original as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    methods = list(dict.fromkeys(r["method"] for r in result["results"]))
    for method in methods:
        rows = sorted((r for r in result["results"] if r["method"] == method), key=lambda r: r["key_dim"])
        # score = original - drop: the score is as far below its interval's top as the drop is above its low end
        spread = [[max(r["interval"][1] - r["drop"], 0) if "interval" in r else 0 for r in rows],
                  [max(r["drop"] - r["interval"][0], 0) if "interval" in r else 0 for r in rows]]
        for ax, x in zip(axes, ([r["key_dim"] for r in rows], [r["qk_params"] / 1e6 for r in rows])):
            ax.errorbar(x, [r["score"] for r in rows], yerr=spread, fmt="o-", capsize=3, label=method)
    original = result["original"]
    for ax, xlabel in zip(axes, ("key dim D~k", "Q/K parameters (millions)")):
        ax.axhline(original["score"], color="gray", ls="--", label="original")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{result['task']} {result['metric']}")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_xscale("log", base=2)
    if original.get("qk_params"):
        axes[1].axvline(original["qk_params"] / 1e6, color="gray", ls=":")
    fig.suptitle(f"{result.get('model', '')}: {result['task']} ({result['examples']} examples), no retraining")
    from .fsio import atomic_file

    with atomic_file(path) as tmp:  # the format from the name the user gave, not the temporary one's
        fig.savefig(tmp, dpi=120, format=os.path.splitext(path)[1][1:] or "png")
    plt.close(fig)
