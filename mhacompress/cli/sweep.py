"""`mhacompress sweep`: reduce and score a model at many settings in one run."""

from __future__ import annotations

import click

from ._common import (
    FiniteFloat,
    allow_pickle_option,
    console,
    device_option,
    emit_json,
    given_on_command_line,
    interval_text,
    parse_dims,
    progress,
    user_errors,
)
from .eval import data_options


@click.command()
@click.argument("model")
@click.option("--task", "-t", required=True, help="GLUE task to score on (dev split), e.g. stsb.")
@click.option("--key-dims", default="384,192,96,48", show_default=True, help="Comma-separated key dims.")
@click.option("--methods", default="cp,svd", show_default=True, help="Comma-separated registered methods.")
@click.option("--calibrate", "calibrate_source", metavar="SOURCE",
              help="Calibrate every reduction on this GLUE task's train split, .txt or .jsonl file.")
@click.option("--samples", type=click.IntRange(min=1), default=512, show_default=True, help="Calibration sequences.")
@click.option("--refine", type=click.IntRange(min=0), metavar="STEPS", help="With --calibrate: Adam steps per layer, "
              "as in reduce (default: 200 at key dims <= d/8, and at <= d/4 on MiniLM-sized models; else 0).")
@data_options
@click.option("--limit", type=click.IntRange(min=1), help="Score only the first N dev examples (quick looks).")
@click.option("--seed", type=int, default=0, show_default=True)
@device_option("Where every cell runs (with --executor ray each worker resolves auto itself)")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: every cell in this process; ray: every cell a Ray task (pip install "
                   "'mhacompress[distributed]').")
@click.option("--address", help="With --executor ray: the cluster to join (e.g. ray://head:10001); default a local "
              "Ray instance.")
@click.option("--cpus-per-cell", type=FiniteFloat(min=0, min_open=True), default=1.0, show_default=True,
              help="With --executor ray: CPUs each cell's task asks for.")
@click.option("--gpus-per-cell", type=FiniteFloat(min=0), default=0.0, show_default=True,
              help="With --executor ray: GPUs each cell's task asks for (e.g. 0.5 shares a GPU between two).")
@click.option("--resume", "resume_dir", metavar="DIR", help="Keep each finished "
              "cell in DIR (one JSON file) and skip the cells already there: rerun after an interruption, or split "
              "a sweep across machines or a CI matrix and merge the folders.")
@click.option("--plot", "plot_file", help="Write a figure (PNG, or the format of the name's suffix): score vs key "
              "dim and vs Q/K parameters, one line per method.")
@click.option("--force", is_flag=True, help="Replace an existing --plot file (the figure of an earlier run, as a rerun "
              "with --resume writes it again).")
@allow_pickle_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of a table.")
def sweep(model, task, key_dims, methods, calibrate_source, samples, refine, data_dir, limit, seed, device, executor,
          address, cpus_per_cell, gpus_per_cell, resume_dir, plot_file, force, allow_pickle, as_json):
    """Reduce MODEL at every (method, key dim) and score each on TASK beside the original, without retraining.

    \b
    Example:
      mhacompress sweep minilm --task stsb --key-dims 384,192,96,48 --methods cp,svd --plot sweep.png
      mhacompress sweep minilm -t stsb --calibrate mrpc --key-dims 96,48 --methods cp --json
      mhacompress sweep minilm -t stsb --executor ray --address ray://head:10001 --resume out/sweep-cells
    """
    with user_errors():
        from ..reduction import methods as registry
        from ..reduction.config import Calibration, ConfigError
        from ..sweep import sweep as run_sweep

        dims = parse_dims(key_dims)
        method_list = [m.strip().lower() for m in methods.split(",") if m.strip()]  # CP is cp
        unknown = [m for m in method_list if m not in registry.names()] or ([] if method_list else [methods])
        if unknown:
            raise ConfigError(f"--methods takes {', '.join(registry.names())}; got {unknown[0]!r}")
        if calibrate_source is None and given_on_command_line("samples", "refine"):
            raise ConfigError("--samples and --refine set the calibration: give --calibrate SOURCE too")
        calibration = None if calibrate_source is None else Calibration(calibrate_source, samples=samples, seed=seed,
                                                                        refine_steps=refine)
        with progress(not as_json) as bar:
            step = bar.add_task("sweep", total=1 + len(set(method_list)) * len(set(dims)))  # the original too
            result = run_sweep(model, task, method_list, dims, calibration=calibration, seed=seed, data_dir=data_dir,
                               limit=limit, device=device, executor=executor, address=address, resume=resume_dir,
                               num_cpus=cpus_per_cell, num_gpus=gpus_per_cell, plot=plot_file, force=force,
                               allow_pickle=allow_pickle,
                               on_result=lambda out: bar.advance(step))
    if as_json:
        emit_json(result, "sweep", result["device"])  # where the cells ran (auto resolved unless on a cluster)
    else:
        render(result)
    failed = result["failed"]
    if failed:
        first, cells = failed[0], len(failed) + len(result["results"])
        raise click.ClickException(f"{len(failed)} of {cells} reductions failed (first: {first['method']} at key dim "
                                   f"{first['key_dim']}: {first['error']}); the rest are in the results")


def render(result: dict) -> None:
    from rich.table import Table

    metric = result["metric"]
    table = Table(title=f"{result['model']} on {result['task']} ({result['examples']} examples)", title_justify="left")
    for col in ("method", "key dim", metric, "drop", "95% interval", "Q/K params", "mean rel. error", "seconds"):
        table.add_column(col, justify="right", no_wrap=col in (metric, "drop", "95% interval"))  # the figures
    table.add_row("original", "", f"{result['original']['score']:.4f}", "", "", f"{result['original']['qk_params']:,}",
                  "", "")
    for r in result["results"]:
        table.add_row(r["method"], str(r["key_dim"]), f"{r['score']:.4f}", f"{r['drop']:+.4f}",
                      interval_text(r.get("interval")),
                      f"{r['qk_params']:,}", f"{r['mean_relative_error']:.3f}", f"{r['seconds']:.1f}")
    out = console()
    out.print(table)
    for f in result["failed"]:
        out.print(f"[red]failed[/red]: {f['method']} at key dim {f['key_dim']}: {f['error']}")
    if result.get("plot"):
        out.print(f"plot written to {result['plot']}")
    for warning in result["warnings"]:
        out.print(f"[yellow]warning[/yellow]: {warning}")
