"""`mhacompress reduce`: re-parametrize a checkpoint's self-attention and save it."""

from __future__ import annotations

import time

import click

from ._common import (console, emit_json, first_token_option, first_token_shortcut, progress, require_classifier,
                      status, user_errors)
from .eval import check_drop, data_options, eval_scorer, render_eval, side_by_side


@click.command()
@click.argument("model")
@click.option("--key-dim", "-k", type=int, help="Shared query/key width D~k: 1..H*dh (H*dh is exact for cp).")
@click.option("--key-dims", help="One key dim per layer, comma-separated (e.g. 64,96,96,128,128,192).")
@click.option("--budget", type=float, help="Instead of key dims: keep this fraction (0 < F <= 1) of the original Q/K "
              "parameters, with per-layer key dims chosen for the smallest total error.")
@click.option("--calibrate", "calibrate_source", metavar="SOURCE", help="Data-aware reduction: a GLUE task name (its "
              "train split), a .txt file (one sequence a line) or a .jsonl file. Minimises the expected score error "
              "on these sequences instead of the weight error.")
@click.option("--samples", type=int, default=256, show_default=True, help="Calibration sequences to use.")
@click.option("--refine", type=click.IntRange(min=0), default=0, show_default=True, metavar="STEPS",
              help="With --calibrate: fit each layer's projections, mixing and content bias to the ORIGINAL layer's "
                   "attention output on the calibration sequences for STEPS Adam steps (layer-local, unlabelled).")
@click.option("--method", type=click.Choice(["cp", "tucker", "svd"]), default="cp", show_default=True,
              help="cp: collaborative heads; tucker: shared U, V with a per-head core; svd: per-head truncated SVD "
                   "(the baseline; key dim split evenly over heads).")
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Folder to write (atomically). Without it "
              "nothing is written: a dry run that reports errors and sizes.")
@click.option("--force", is_flag=True, help="Replace a non-empty --output folder.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the solver (same seed, same weights).")
@click.option("--init", type=click.Choice(["svd", "random"]), default="svd", show_default=True,
              help="Initialisation of the ALS solver.")
@click.option("--iterations", "n_iter_max", type=int, default=100, show_default=True, help="Maximum ALS sweeps.")
@click.option("--tol", type=float, default=1e-5, show_default=True,
              help="Stop when the relative error improves by less than this between sweeps.")
@click.option("--allow-pickle", is_flag=True, help="Also load pickled (.bin) weights. Only for checkpoints you trust.")
@click.option("--eval", "eval_task", metavar="TASK", help="Score the original and the reduced model on this GLUE "
              "task's dev split (cola, sst2, mrpc, stsb, qqp, mnli, mnli-mm, qnli, rte, wnli) and print both.")
@data_options
@click.option("--max-drop", type=float, help="With --eval: exit 1 when the reduced model loses more than this on the "
              "task's main metric (absolute, e.g. 0.01), for CI gates.")
@first_token_option("Saved with the model (reloads keep it); --eval scores it.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of tables.")
def reduce(model, key_dim, key_dims, budget, calibrate_source, samples, refine, method, output, force, seed, init,
           n_iter_max, tol, allow_pickle, eval_task, data_dir, max_drop, first_token_only, as_json):
    """Share one query/key projection of size KEY_DIM across the heads of every self-attention layer of MODEL.

    MODEL is a local folder, a Hugging Face hub id, or an alias: bert-base, bert-large, roberta-base, distilbert,
    electra-base, mpnet, and minilm (bundled, no network). The result is an ordinary HF folder that reloads with
    mhacompress.load(DIR) or AutoModel.from_pretrained(DIR, trust_remote_code=True).

    \b
    Examples:
      mhacompress reduce minilm --key-dim 96 --output out/minilm-cp96
      mhacompress reduce bert-base -k 384 --method tucker -o out/bert-tucker384 --json
      mhacompress reduce minilm -k 96 --eval stsb --data-dir ../glue_data --max-drop 0.02
      mhacompress reduce minilm --budget 0.25 --calibrate mrpc --samples 256 -o out/minilm-b25
    """
    with user_errors():
        from ..compress.config import ConfigError, ReductionConfig

        if sum(x is not None for x in (key_dim, key_dims, budget)) != 1:
            raise ConfigError("give exactly one of --key-dim (e.g. --key-dim 96), --key-dims or --budget")
        dims = _parse_dims(key_dims) if key_dims else None
        if refine and not calibrate_source:
            raise ConfigError("--refine fits layers to calibration data: give --calibrate SOURCE too")
        calibration = {"source": calibrate_source, "samples": samples} if calibrate_source else None
        if calibration and refine:
            calibration["refine_steps"] = refine
        extra = {k: v for k, v in (("calibration", calibration), ("budget", budget)) if v is not None}
        config = ReductionConfig(key_dim=key_dim if budget is None else 1, key_dims=dims, method=method, seed=seed,
                                 init=init, n_iter_max=n_iter_max, tol=tol, extra=extra)
        if output is not None:
            from ..hub import check_output

            check_output(output, force, sources=[model, data_dir, calibrate_source])
        scorer = eval_scorer(eval_task, data_dir, max_drop)  # data problems show before any work
        texts = load_calibration(calibration, seed, data_dir)
        result = run_reduce(model, config, output=output, force=force, allow_pickle=allow_pickle,
                            show_progress=not as_json, scorer=scorer, calibration=texts,
                            first_token_only=first_token_only)
    if as_json:
        emit_json(result)
    else:
        render(result)
    check_drop(result, max_drop)


def _parse_dims(text: str) -> tuple[int, ...]:
    from ..compress.config import ConfigError

    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--key-dims takes comma-separated integers, e.g. 64,96,128; got {text!r}") from None


def load_calibration(calibration: dict | None, seed: int, data_dir) -> list | None:
    """Calibration sequences (read before the model loads, so a bad source fails at once); both members of a pair
    are kept together and split later for sentence encoders."""
    if not calibration:
        return None
    from ..calibration import calibration_texts

    return calibration_texts(calibration["source"], calibration["samples"], seed=seed, data_dir=data_dir)


def run_reduce(model_name: str, config, *, output=None, force=False, allow_pickle=False, show_progress=True,
               scorer=None, calibration: list | None = None, first_token_only: bool = False) -> dict:
    """Load, (calibrate, allocate,) reduce, save; the JSON report of the run."""
    from .. import __version__
    from ..compress.refine import input_moments
    from ..compress.surgery import reduce_
    from ..hub import load_pretrained, save

    start = time.perf_counter()
    with status(f"loading {model_name}", show_progress):
        model, tokenizer, source = load_pretrained(model_name, allow_pickle=allow_pickle)
    if first_token_only:
        require_classifier(model, model_name)  # before any work
    params_before = sum(p.numel() for p in model.parameters())
    original = scorer(model, tokenizer, model_name) if scorer else None  # before reduce_, which works in place
    steps = config.extra.get("calibration", {}).get("refine_steps", 0)
    calls = record(model, tokenizer, calibration, show_progress) if steps else None  # the ORIGINAL layers' calls
    moments = None
    if calibration:  # one forward pass over the calibration data either way
        moments = input_moments(calls) if calls else collect_moments(model, tokenizer, calibration, show_progress)
    curves = None
    if "budget" in config.extra:
        config, curves = _allocate(model, config, moments, show_progress)
    with progress(show_progress) as bar:
        label = f"key dim {config.key_dim}" if config.key_dims is None else "per-layer key dims"
        task = bar.add_task(f"{config.method} {label}", total=_num_layers(model))
        block = reduce_(model, config, source=source.location, tool_version=__version__, moments=moments,
                        on_layer=lambda layer: bar.advance(task))
    if steps:
        refine_layers(model, calls, steps, block, config.seed, show_progress)
    if first_token_only:
        first_token_shortcut(model, model_name)
    evaluated = side_by_side(scorer.task, original, scorer(model, tokenizer, "the reduced model")) if scorer else None
    if output:
        save(model, tokenizer, output, force=force, source=source.location)
    layers = block["layers"]
    return {
        "model": model_name,
        "source": source.location,
        "method": config.method,
        "key_dim": config.key_dim,
        "key_dims": [x["key_dim"] for x in block["layers"]],
        **({"calibration": config.extra["calibration"]} if "calibration" in config.extra else {}),
        **({"budget": {"fraction": config.extra["budget"], "curves": curves}} if curves else {}),
        "output": str(output) if output else None,
        "seconds": round(time.perf_counter() - start, 3),
        "params": {"before": sum(x["qk_params_before"] for x in layers),
                   "after": sum(x["qk_params_after"] for x in layers)},
        "model_params": {"before": params_before, "after": sum(p.numel() for p in model.parameters())},
        "cost": _cost_totals(model),
        "layers": layers,
        "first_token_only": first_token_only,
        **({"eval": evaluated} if evaluated else {}),
    }


def collect_moments(model, tokenizer, texts: list, show_progress: bool) -> list:
    from ..compress.calibrate import second_moments

    count, encodings = _encodings(model, tokenizer, texts)
    with progress(show_progress) as bar:
        task = bar.add_task("calibrating", total=count)
        return second_moments(model, encodings, on_batch=lambda n: bar.advance(task, n))


def _encodings(model, tokenizer, texts: list):
    from ..compress.modeling import is_classifier
    from ..eval.runner import batches

    if not is_classifier(model):  # sentence encoders see one sentence at a time
        texts = [(t,) for pair in texts for t in pair]
    return len(texts), (enc for _, enc in batches(tokenizer, texts, batch_size=32, max_length=128))


def record(model, tokenizer, texts: list, show_progress: bool):
    from ..compress.refine import record_calls

    count, encodings = _encodings(model, tokenizer, texts)
    with progress(show_progress) as bar:
        task = bar.add_task("recording the original layers", total=count)
        return record_calls(model, encodings, on_batch=lambda n: bar.advance(task, n))


def refine_layers(model, calls, steps: int, block: dict, seed: int, show_progress: bool) -> None:
    """Refine in place; each layer's report gains its output error before and after refinement."""
    from ..compress.refine import refine_

    with progress(show_progress) as bar:
        task = bar.add_task(f"refining ({steps} steps a layer)", total=len(calls))
        for r in refine_(model, calls, steps, seed=seed, on_layer=lambda r: bar.advance(task)):
            block["layers"][r["index"]].update(r)


def _allocate(model, config, moments, show_progress: bool):
    from dataclasses import replace

    from ..compress.allocate import budget_key_dims, candidate_dims
    from ..compress.surgery import model_shape

    layers, heads, head_dim = model_shape(model)
    with progress(show_progress) as bar:
        task = bar.add_task("error curves", total=layers * len(candidate_dims(heads, head_dim, config.method)))
        dims, curves = budget_key_dims(model, config, config.extra["budget"], moments,
                                       on_step=lambda: bar.advance(task))
    return replace(config, key_dim=None, key_dims=tuple(dims)), [{str(k): e for k, e in c.items()} for c in curves]


def _cost_totals(model, seq_len: int = 128) -> dict:
    """Q/K parameters and multiply-adds per sequence of ``seq_len`` tokens, original vs reduced (counts only; for
    measured latency run `mhacompress report`)."""
    from ..compress import cost

    shapes = cost.layer_shapes(model)
    return {"seq_len": seq_len, **cost.compare(cost.original_shapes(shapes), shapes, seq_len)["total"]}


def _num_layers(model) -> int:
    from ..compress.modeling import attention_modules

    return len(attention_modules(model))


def render(result: dict) -> None:
    from rich.table import Table

    dims = f"key dim {result['key_dim']}" if result["key_dim"] else "per-layer key dims"
    calibrated = "calibration" in result
    title = f"{result['model']}: {result['method']} at {dims}" + (
        f", calibrated on {result['calibration']['source']}" if calibrated else "")
    table = Table(title=title, title_justify="left")
    columns = ["layer", "key dim", "rel. error"] + (["exp. score error"] if calibrated else []) + [
        "iters", "Q/K params before", "Q/K params after"]
    for col in columns:
        table.add_column(col, justify="right")
    for x in result["layers"]:
        expected = [f"{x['expected_score_error']:.4f}"] if calibrated else []
        table.add_row(str(x["index"]), str(x["key_dim"]), f"{x['relative_error']:.4f}", *expected, str(x["n_iter"]),
                      f"{x['qk_params_before']:,}", f"{x['qk_params_after']:,}")
    before, after = result["params"]["before"], result["params"]["after"]
    table.add_section()
    table.add_row("total", *[""] * (len(columns) - 3), f"{before:,}", f"{after:,} ({after / before:.1%})")
    out = console()
    out.print(table)
    mb, ma = result["model_params"]["before"], result["model_params"]["after"]
    out.print(f"model parameters {mb:,} -> {ma:,} ({ma / mb:.1%}); {result['seconds']:.1f} s")
    if result.get("cost"):
        c = result["cost"]
        out.print(f"per {c['seq_len']}-token sequence: Q/K projection MACs {c['projection_macs']['ratio']:.0%}, score "
                  f"MACs {c['score_macs']['ratio']:.0%}, Q/K total {c['qk_macs']['ratio']:.0%} of the original "
                  f"(counts; `mhacompress report DIR` measures latency)")
    if result.get("eval"):
        render_eval(result["eval"])
    out.print(f"saved to {result['output']}" if result["output"] else "dry run: nothing written (pass --output DIR)")
