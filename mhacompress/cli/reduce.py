"""`mhacompress reduce`: re-parametrize a checkpoint's self-attention and save it."""

from __future__ import annotations

import click

from ._common import (
    FiniteFloat,
    ProgressBars,
    allow_pickle_option,
    console,
    device_option,
    emit_json,
    first_token_option,
    given_on_command_line,
    method_choice,
    method_help,
    parse_dims,
    resolved_device,
    task_names,
    user_errors,
)
from .eval import check_drop, data_options, render_eval


@click.command()
@click.argument("model")
@click.option("--key-dim", "-k", type=int, help="Shared query/key width D~k: 1..H*dh (H*dh is exact for cp). "
              "With --calibrate where it is allocated (see --allocate), the average: per-layer widths share its Q/K "
              "parameters.")
@click.option("--allocate/--uniform", default=None, help="With --calibrate: spread the Q/K parameters of --key-dim "
              "over the layers by their measured effect on the output (default at key dims <= d/8, where it pays, "
              "and for a classifier at <= d/4 on models of MiniLM size, in place of refinement; a few forward passes "
              "per layer), or keep --key-dim in every layer (default otherwise).")
@click.option("--key-dims", help="One key dim per layer, comma-separated (e.g. 64,96,96,128,128,192).")
@click.option("--budget", type=float, help="Instead of key dims: keep this fraction (0 < F <= 1) of the original Q/K "
              "parameters, with per-layer key dims chosen where they cost least.")
@click.option("--calibrate", "calibrate_source", metavar="SOURCE", help="Data-aware reduction (recommended): a GLUE "
              "task name (its train split, no labels), a .txt file (one sequence a line) or a .jsonl file. Layers "
              "are fitted bottom-up to reproduce the original model on these sequences.")
@click.option("--samples", type=click.IntRange(min=1), default=512, show_default=True,
              help="Calibration sequences (sentences for a sentence encoder, examples for a classifier).")
@click.option("--sequential/--parallel", default=True, show_default=True, help="With --calibrate: fit each layer on "
              "the inputs the already-reduced layers produce (sequential), or all layers on the original's inputs.")
@click.option("--objective", type=click.Choice(["output", "score"]), help="With --calibrate --sequential: fit each "
              "layer's attention output (default; centred, head- and token-weighted) or only its scores.")
@click.option("--compensate/--no-compensate", default=None, help="With --calibrate --sequential (on by default): "
              "also refit each layer's attention output projection by least squares (recorded in the saved block).")
@click.option("--refine", type=click.IntRange(min=0), metavar="STEPS", help="With --calibrate: Adam steps per layer "
              "fitting the reduced layer to the original's output. Default: 200, or 400 for a sentence encoder read at "
              "every token (mean or max pooled), at key dims <= d/8 (where the closed form alone loses the most) and "
              "at <= d/4 on models where the steps are cheap (MiniLM size, not BERT-base) unless a classifier is "
              "allocated there; else 0; --refine 0 for the closed form alone (faster).")
@click.option("--weights-only", is_flag=True, help="Reduce from the weights alone, even with --eval (which otherwise "
              "calibrates on the task's train sentences).")
@click.option("--method", type=method_choice(), default="cp", show_default=True, help=method_help())
@click.option("--solver", type=click.Choice(["structured", "tensorly"]), default="structured", show_default=True,
              help="structured: fast ALS that never builds the score tensor; tensorly: tensorly's parafac / "
                   "partial_tucker on the dense tensor (the paper's procedure; slow).")
@click.option("--output", "-o", help="Folder to write (atomically). Without it nothing is written: a dry run that "
              "reports errors and sizes.")
@click.option("--force", is_flag=True, help="Replace a non-empty --output folder (never the source model).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the solver and the calibration sample.")
@click.option("--init", type=click.Choice(["svd", "random"]), default="svd", show_default=True,
              help="Initialisation of the ALS solver.")
@click.option("--iterations", "n_iter_max", type=int, default=100, show_default=True, help="Maximum ALS sweeps.")
@click.option("--tol", type=float, default=1e-5, show_default=True,
              help="Stop when the relative error improves by less than this between sweeps.")
@device_option("Where to run calibration and the solvers")
@allow_pickle_option
@click.option("--eval", "eval_task", metavar="TASK", help="Score the original and the reduced model on this GLUE "
              f"task's dev split ({task_names()}) and print both. "
              "Without --calibrate, calibrates on the task's train sentences (refused when it has none: pass "
              "--calibrate SOURCE or --weights-only).")
@data_options
@click.option("--max-drop", type=FiniteFloat(), help="With --eval: exit 1 when the reduced model loses more than "
              "this on the task's main metric (absolute, e.g. 0.01), for CI gates.")
@first_token_option("Saved with the model (reloads keep it); --eval scores it.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of tables.")
def reduce(model, key_dim, allocate, key_dims, budget, calibrate_source, samples, sequential, objective, compensate,
           refine, weights_only, method, solver, output, force, seed, init, n_iter_max, tol, device, allow_pickle,
           eval_task, data_dir, max_drop, first_token_only, as_json):
    """Share one query/key projection of size KEY_DIM across the heads of every self-attention layer of MODEL.

    MODEL is a local folder, a Hugging Face hub id, or an alias: bert-base, bert-large, roberta-base, distilbert,
    electra-base, mpnet, and minilm (bundled, no network). The result is an ordinary HF folder that reloads with
    mhacompress.load(DIR) or AutoModel.from_pretrained(DIR, trust_remote_code=True).

    \b
    Examples:
      mhacompress reduce minilm --key-dim 96 --calibrate mrpc --output out/minilm-cp96
      mhacompress reduce out/minilm-mrpc -k 48 --eval mrpc --data-dir ../glue_data --max-drop 0.02
      mhacompress reduce bert-base -k 384 --method tucker -o out/bert-tucker384 --json
      mhacompress reduce minilm --budget 0.25 --calibrate mrpc -o out/minilm-b25
    """
    with user_errors():
        device = resolved_device(device)
        from ..calibration import task_named
        from ..pipeline import check_gate, compress
        from ..reduction.config import Calibration, ConfigError, ReductionConfig

        if allocate is False and key_dim is None:  # (--allocate without --key-dim: the config refuses it)
            raise ConfigError("--uniform keeps --key-dim in every layer: it needs --key-dim; drop it with "
                              f"{'--budget (which allocates)' if budget is not None else '--key-dims'}")
        check_gate(max_drop, eval_task)  # before --eval's data is read (compress checks it again)
        source = calibration_source(calibrate_source, eval_task, weights_only, data_dir)
        if given_on_command_line("data_dir") and eval_task is None and (source is None or task_named(source) is None):
            raise ConfigError("--data-dir is where GLUE tasks are read (--eval TASK, --calibrate TASK), and this run "
                              "reads none; give one of those, or drop --data-dir")
        if source is None and given_on_command_line("samples", "sequential", "objective", "compensate", "refine"):
            fix = ("drop --weights-only, which reduces from the weights alone" if weights_only else
                   "give --calibrate SOURCE (or --eval TASK) too")
            raise ConfigError("--samples, --sequential/--parallel, --objective, --compensate and --refine set the "
                              f"calibration: {fix}")
        calibration = None if source is None else Calibration(
            source, samples=samples, seed=seed, sequential=sequential, objective=objective, compensate=compensate,
            refine_steps=refine)
        config = ReductionConfig(key_dim=key_dim, key_dims=None if key_dims is None else tuple(parse_dims(key_dims)),
                                 budget=budget, method=method, solver=solver, seed=seed, init=init,
                                 n_iter_max=n_iter_max, tol=tol, calibration=calibration,
                                 first_token_only=first_token_only, allocate=allocate)
        with ProgressBars(not as_json) as bars:  # the output is refused before any work, written at the end
            report = compress(model, config, on_progress=bars, device=device, allow_pickle=allow_pickle,
                              data_dir=data_dir, evaluate=eval_task, max_drop=max_drop, output=output,
                              force=force, weights_only=weights_only).report
    if as_json:
        emit_json(report, "reduce", device)
    else:
        render(report)
    check_drop(report)


def calibration_source(calibrate: str | None, eval_task: str | None, weights_only: bool, data_dir) -> str | None:
    """--calibrate, else (for --eval TASK) the task's own train sentences, refused when they cannot be read; None
    with --weights-only or with neither option."""
    if weights_only:
        if calibrate is not None:
            from ..errors import ConfigError

            raise ConfigError("--weights-only and --calibrate contradict each other; drop one")
        return None
    if calibrate is not None or not eval_task:
        return calibrate
    from ..pipeline import check_task_train

    check_task_train(eval_task, data_dir)  # a bad task, or unreadable splits, fail here, not after a warning
    return eval_task


def render(result: dict) -> None:
    from rich.table import Table

    dims = f"key dim {result['key_dim']}" if result["key_dim"] else "per-layer key dims"
    if result["key_dim"] and result["config"].get("allocate"):
        dims += " on average (per-layer dims allocated by measured output sensitivity)"
    calibrated = result.get("calibration") is not None
    title = f"{result['model']}: {result['method']} at {dims}" + (
        f", calibrated on {result['calibration']['source']}" if calibrated else "")
    table = Table(title=title, title_justify="left")
    kind = next((k for k in ("expected_output_error", "expected_score_error")
                 if calibrated and all(k in x for x in result["layers"])), None)  # the calibrated objective's error
    columns = (["layer", "key dim", "rel. error"]
               + ([kind.replace("expected_", "exp. ").replace("_", " ")] if kind else [])
               + ["iters", "Q/K params before", "Q/K params after"])
    for col in columns:
        table.add_column(col, justify="right")
    for x in result["layers"]:
        extra = [f"{x[kind]:.4f}"] if kind else []
        table.add_row(str(x["index"]), str(x["key_dim"]), f"{x['relative_error']:.4f}", *extra, str(x["n_iter"]),
                      f"{x['qk_params_before']:,}", f"{x['qk_params_after']:,}")
    before, after = result["params"]["before"], result["params"]["after"]
    table.add_section()
    table.add_row("total", *[""] * (len(columns) - 3), f"{before:,}", f"{after:,} ({after / before:.1%})")
    out = console()
    out.print(table)
    mb, ma = result["model_params"]["before"], result["model_params"]["after"]
    out.print(f"model parameters {mb:,} -> {ma:,} ({ma / mb:.1%}); {result['seconds']:.1f} s")
    if result["modified"]:
        out.print(f"also refitted: {len(result['modified'])} attention output projections (--compensate)")
    refined = [x for x in result["layers"] if "refined" in x]
    if refined:
        steps = result["config"]["calibration"]["refine_steps"]
        mean = lambda k: sum(x[k] for x in refined) / len(refined)  # noqa: E731
        out.print(f"refined: {sum(x['refined'] for x in refined)} of {len(refined)} layers kept their {steps} steps "
                  f"(mean output error {mean('output_error_before'):.4f} -> {mean('output_error_after'):.4f}); "
                  f"--refine 0 skips them")
    c = result["cost"]
    out.print(f"per {c['seq_len']}-token sequence: Q/K projection MACs {c['projection_macs']['ratio']:.0%}, score "
              f"MACs {c['score_macs']['ratio']:.0%}, Q/K total {c['qk_macs']['ratio']:.0%} of the original "
              f"(counts; `mhacompress report DIR` measures latency)")
    for warning in result.get("warnings", ()):
        out.print(f"[yellow]warning[/yellow]: {warning}")
    if not calibrated and not result.get("warnings"):  # the classifier's warning already says it
        out.print("hint: reduced from the weights alone; --calibrate SOURCE (unlabelled text like the model's "
                  "inputs: a GLUE task's train split, a .txt or .jsonl file) keeps more of its scores")
    if result.get("eval"):
        render_eval(result["eval"])
    out.print(f"saved to {result['output']}" if result["output"] else "dry run: nothing written (pass --output DIR)")
