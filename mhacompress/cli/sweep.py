"""`mhacompress sweep`: reduce and score a model at many settings in one run."""

from __future__ import annotations

import click

from ._common import console, emit_json, progress, user_errors
from .eval import data_options


@click.command()
@click.argument("model")
@click.option("--task", "-t", required=True, help="GLUE task to score on (dev split), e.g. stsb.")
@click.option("--key-dims", default="384,192,96,48", show_default=True, help="Comma-separated key dims.")
@click.option("--methods", default="cp,svd", show_default=True, help="Comma-separated methods: cp, tucker, svd.")
@click.option("--calibrate", "calibrate_source", metavar="SOURCE",
              help="Calibrate every reduction on this GLUE task's train split, .txt or .jsonl file.")
@click.option("--samples", type=int, default=256, show_default=True, help="Calibration sequences.")
@data_options
@click.option("--limit", type=click.IntRange(min=1), help="Score only the first N dev examples (quick looks).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False), help="Write a PNG: score vs key dim and vs Q/K "
              "parameters, one line per method.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of a table.")
def sweep(model, task, key_dims, methods, calibrate_source, samples, data_dir, limit, seed, plot_file, as_json):
    """Reduce MODEL at every (method, key dim) and score each on TASK beside the original, without retraining.

    \b
    Example:
      mhacompress sweep minilm --task stsb --key-dims 384,192,96,48 --methods cp,svd --plot sweep.png
      mhacompress sweep minilm -t stsb --calibrate mrpc --key-dims 96,48 --methods cp --json
    """
    from .reduce import _parse_dims, collect_moments, load_calibration

    with user_errors():
        from ..compress.config import ConfigError
        from ..compress.modeling import METHODS
        from ..eval.compare import Scorer
        from ..hub import load_pretrained
        from ..sweep import check_grid, plot, sweep as run_sweep

        dims = list(_parse_dims(key_dims))
        method_list = [m.strip() for m in methods.split(",") if m.strip()]
        for m in method_list:
            if m not in METHODS:
                raise ConfigError(f"--methods takes {', '.join(METHODS)}; got {m!r}")
        if plot_file:
            from ..hub import check_output

            check_output(plot_file, True, kind="file", sources=[model, data_dir], option="--plot")
        scorer = Scorer.for_task(task, data_dir=data_dir, limit=limit)
        calibration = {"source": calibrate_source, "samples": samples} if calibrate_source else None
        texts = load_calibration(calibration, seed, data_dir)
        original, tokenizer, _ = load_pretrained(model)
        check_grid(original, method_list, dims)
        moments = collect_moments(original, tokenizer, texts, not as_json) if texts else None
        with progress(not as_json) as bar:
            step = bar.add_task("sweep", total=len(dims) * len(method_list))
            result = run_sweep(original, tokenizer, scorer, method_list, dims, moments=moments, seed=seed,
                               on_step=lambda name: bar.advance(step))
        result = {"model": model, **({"calibration": calibration} if calibration else {}), **result}
        if plot_file:
            plot(result, plot_file)
            result["plot"] = plot_file
    if as_json:
        emit_json(result)
    else:
        render(result)


def render(result: dict) -> None:
    from rich.table import Table

    metric = result["metric"]
    table = Table(title=f"{result['model']} on {result['task']} ({result['examples']} examples)", title_justify="left")
    for col in ("method", "key dim", metric, "drop", "Q/K params", "mean rel. error", "seconds"):
        table.add_column(col, justify="right")
    table.add_row("original", "", f"{result['original']['score']:.4f}", "", f"{result['original']['qk_params']:,}",
                  "", "")
    for r in result["results"]:
        table.add_row(r["method"], str(r["key_dim"]), f"{r['score']:.4f}", f"{r['drop']:+.4f}", f"{r['qk_params']:,}",
                      f"{r['mean_relative_error']:.3f}", f"{r['seconds']:.1f}")
    console().print(table)
    if result.get("plot"):
        console().print(f"plot written to {result['plot']}")
