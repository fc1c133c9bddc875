"""`mhacompress reduce`: re-parametrize a checkpoint's self-attention and save it."""

from __future__ import annotations

import time
from contextlib import nullcontext

import click

from ._common import console, emit_json, progress, user_errors


@click.command()
@click.argument("model")
@click.option("--key-dim", "-k", type=int, help="Shared query/key width D~k: 1..H*dh (H*dh is exact for cp).")
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
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of tables.")
def reduce(model, key_dim, method, output, force, seed, init, n_iter_max, tol, allow_pickle, as_json):
    """Share one query/key projection of size KEY_DIM across the heads of every self-attention layer of MODEL.

    MODEL is a local folder, a Hugging Face hub id, or an alias: bert-base, bert-large, roberta-base, distilbert,
    electra-base, mpnet, and minilm (bundled, no network). The result is an ordinary HF folder that reloads with
    mhacompress.load(DIR) or AutoModel.from_pretrained(DIR, trust_remote_code=True).

    \b
    Examples:
      mhacompress reduce minilm --key-dim 96 --output out/minilm-cp96
      mhacompress reduce bert-base -k 384 --method tucker -o out/bert-tucker384 --json
    """
    from pathlib import Path

    with user_errors():
        from ..compress.config import ConfigError, ReductionConfig

        if key_dim is None:
            raise ConfigError("--key-dim is required (e.g. --key-dim 96)")
        config = ReductionConfig(key_dim=key_dim, method=method, seed=seed, init=init, n_iter_max=n_iter_max, tol=tol)
        if output:
            from ..hub import check_output

            check_output(Path(output), force)
        result = run_reduce(model, config, output=output, force=force, allow_pickle=allow_pickle,
                            show_progress=not as_json)
    if as_json:
        emit_json(result)
    else:
        render(result)


def run_reduce(model_name: str, config, *, output=None, force=False, allow_pickle=False, show_progress=True) -> dict:
    """Load, reduce, save; the JSON report of the run."""
    from .. import __version__
    from ..compress.surgery import reduce_
    from ..hub import load_pretrained, save

    start = time.perf_counter()
    with console().status(f"loading {model_name}", spinner="dots") if show_progress else nullcontext():
        model, tokenizer, source = load_pretrained(model_name, allow_pickle=allow_pickle)
    params_before = sum(p.numel() for p in model.parameters())
    with progress(show_progress) as bar:
        task = bar.add_task(f"{config.method} key dim {config.key_dim}", total=_num_layers(model))
        block = reduce_(model, config, source=source.location,
                        tool_version=__version__, on_layer=lambda layer: bar.advance(task))
    if output:
        save(model, tokenizer, output, force=force)
    layers = block["layers"]
    return {
        "model": model_name,
        "source": source.location,
        "method": config.method,
        "key_dim": config.key_dim,
        "output": str(output) if output else None,
        "seconds": round(time.perf_counter() - start, 3),
        "params": {"before": sum(x["qk_params_before"] for x in layers),
                   "after": sum(x["qk_params_after"] for x in layers)},
        "model_params": {"before": params_before, "after": sum(p.numel() for p in model.parameters())},
        "layers": layers,
    }


def _num_layers(model) -> int:
    from ..compress.modeling import attention_modules

    return len(attention_modules(model))


def render(result: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{result['model']}: {result['method']} at key dim {result['key_dim']}", title_justify="left")
    for col in ("layer", "key dim", "rel. error", "iters", "Q/K params before", "Q/K params after"):
        table.add_column(col, justify="right")
    for x in result["layers"]:
        table.add_row(str(x["index"]), str(x["key_dim"]), f"{x['relative_error']:.4f}", str(x["n_iter"]),
                      f"{x['qk_params_before']:,}", f"{x['qk_params_after']:,}")
    before, after = result["params"]["before"], result["params"]["after"]
    table.add_section()
    table.add_row("total", "", "", "", f"{before:,}", f"{after:,} ({after / before:.1%})")
    out = console()
    out.print(table)
    mb, ma = result["model_params"]["before"], result["model_params"]["after"]
    out.print(f"model parameters {mb:,} -> {ma:,} ({ma / mb:.1%}); {result['seconds']:.1f} s")
    out.print(f"saved to {result['output']}" if result["output"] else "dry run: nothing written (pass --output DIR)")
