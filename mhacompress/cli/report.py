"""`mhacompress report`: what a reduction saves and costs, original beside reduced, counted and measured."""

from __future__ import annotations

import click

from ._common import (console, device_option, emit_json, first_token_option, method_choice, resolved_device, status,
                       user_errors)


@click.command()
@click.argument("model")
@click.option("--seq-len", type=click.IntRange(1), default=128, show_default=True, help="Tokens per sequence.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True, help="Sequences per batch.")
@click.option("--key-dim", "-k", type=click.IntRange(1), help="With an ORIGINAL model: reduce it in memory to this "
              "key dim for the comparison (a reduced folder already has one).")
@click.option("--method", type=method_choice(), default="cp", show_default=True,
              help="With --key-dim: the reduction method.")
@click.option("--repeats", type=click.IntRange(1), default=7, show_default=True,
              help="Timed runs of each side (median reported), after 2 warm-up runs.")
@click.option("--no-latency", is_flag=True, help="Counts only; skip the timing.")
@first_token_option("Times the reduced classifier with the shortcut.")
@click.option("--attn-implementation", type=click.Choice(["sdpa", "eager"]), default="sdpa", show_default=True,
              help="Attention kernels of both models.")
@device_option("Where both models run")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of tables.")
def report(model, seq_len, batch_size, key_dim, method, repeats, no_latency, first_token_only, attn_implementation,
           device, as_json):
    """Q/K parameters, multiply-adds and measured latency of a reduced MODEL against its original, per layer and
    in total, in one run.

    MODEL is a folder written by `mhacompress reduce` (its original is reloaded from the source it records), or an
    original model with --key-dim to reduce it in memory. Latency is the median of --repeats forward passes after
    warm-up, original and reduced interleaved, on this machine's threads; ratios below 1 mean the reduced model is
    faster.

    \b
    Examples:
      mhacompress report out/minilm-cp96 --seq-len 128 --batch-size 32
      mhacompress report minilm --key-dim 48 --method svd --json
    """
    with user_errors():
        device = resolved_device(device)
        result = run_report(model, seq_len=seq_len, batch_size=batch_size, key_dim=key_dim, method=method,
                            repeats=repeats, latency=not no_latency, first_token_only=first_token_only,
                            attn_implementation=attn_implementation, show_progress=not as_json, device=device)
    if as_json:
        emit_json(result, "report", device)
    else:
        render(result)


def load_pair(name: str, *, key_dim=None, method="cp", attn_implementation="sdpa"):
    """(original, reduced, description): a reduced folder and its source, or an original reduced in memory."""
    import copy

    from ..errors import UsageError
    from ..hub import load_pretrained
    from ..pipeline import compress
    from ..reduction.config import ReductionConfig
    from ..reduction.modeling import COMPRESSION_KEY

    model, _, _ = load_pretrained(name, attn_implementation=attn_implementation, tokenizer=False)
    block = getattr(model.config, COMPRESSION_KEY, None)
    if block:
        if key_dim is not None:
            raise UsageError(f"{name} is already reduced (key dim {block.get('key_dim')}); drop --key-dim")
        source = block.get("source_model") or ""
        try:
            original, _, _ = load_pretrained(source, attn_implementation=attn_implementation, tokenizer=False)
        except UsageError as err:
            raise UsageError(f"cannot load the original {source!r} recorded in {name}: {err}") from None
        return original, model, {"method": block["method"], "key_dim": block.get("key_dim"), "original": source}
    if key_dim is None:
        raise UsageError(f"{name} is an original model: pass --key-dim to reduce it in memory, or give a folder "
                         f"written by `mhacompress reduce`")
    config = ReductionConfig(key_dim=key_dim, method=method)  # weights only: latency does not depend on the data
    reduced = compress(copy.deepcopy(model), config).model
    return model, reduced, {"method": method, "key_dim": key_dim, "original": name}


def run_report(name: str, *, seq_len=128, batch_size=32, key_dim=None, method="cp", repeats=7, latency=True,
               first_token_only=False, attn_implementation="sdpa", show_progress=True, device="cpu") -> dict:
    """The JSON report: counts per layer and total, and (``latency``) measured medians with ratios."""
    import torch

    from .. import bench
    from ..reduction import cost
    from ._common import first_token_shortcut

    with status(f"loading {name}", show_progress):
        original, reduced, info = load_pair(name, key_dim=key_dim, method=method,
                                            attn_implementation=attn_implementation)
    if first_token_only:
        first_token_shortcut(reduced, name)
    limit = max_tokens(original)
    if limit is not None and seq_len > limit:
        from ..errors import UsageError

        raise UsageError(f"--seq-len {seq_len} is more than {name} can take ({limit} positions); pass --seq-len "
                         f"{limit} or less")
    original, reduced = original.to(device), reduced.to(device)
    result = {"model": name, **info, "attn_implementation": attn_implementation, "threads": torch.get_num_threads(),
              "first_token_only": first_token_only,
              **cost.compare(cost.layer_shapes(original), cost.layer_shapes(reduced), seq_len, batch_size)}
    if latency:
        with status(f"timing batch {batch_size} x {seq_len} tokens, {repeats} runs per side", show_progress):
            batch = {k: v.to(device) for k, v in bench.inputs(original.config.vocab_size, batch_size, seq_len).items()}
            cpu_model, cpu_layer = {}, {}
            model_s = bench.model_latency(original, reduced, batch, repeats=repeats, cpu=cpu_model, device=device)
            layer_s = bench.attention_latency(original, reduced, batch_size, seq_len, repeats=repeats, cpu=cpu_layer,
                                              device=device)
            result["latency"] = {"model": bench.with_ratio(model_s, cpu_model),
                                 "attention_layer": bench.with_ratio(layer_s, cpu_layer), "repeats": repeats}
    return result


def max_tokens(model) -> int | None:
    """The longest sequence the model's learned position embeddings can take (None: it has none). RoBERTa-style
    embeddings number positions from padding_idx + 1."""
    embeddings = getattr(model.base_model, "embeddings", None)
    table = getattr(embeddings, "position_embeddings", None)
    if not hasattr(table, "num_embeddings"):
        return None
    offset = getattr(embeddings, "padding_idx", None)
    return table.num_embeddings - (offset + 1 if isinstance(offset, int) else 0)


def verdict(ratio: float) -> str:
    if ratio <= 1:
        return f"[green]{1 / ratio:.2f}x faster[/green]"
    return f"[red]{ratio:.2f}x SLOWER[/red]"


def render(result: dict) -> None:
    from rich.table import Table

    def fmt(n):
        return f"{n / 1e9:,.2f} G" if n >= 1e9 else f"{n / 1e6:,.2f} M" if n >= 1e6 else f"{n:,}"

    title = (f"{result['model']}: {result['method']} key dim {result['key_dim']} vs {result['original']}; "
             f"batch {result['batch_size']} x {result['seq_len']} tokens")
    table = Table(title=title, title_justify="left")
    table.add_column("layer", justify="right")
    for col in ("Q/K params", "Q/K proj. MACs", "score MACs", "Q/K total MACs"):
        table.add_column(f"{col}\norig -> reduced", justify="right")
    keys = ("qk_params", "projection_macs", "score_macs", "qk_macs")
    for x in result["layers"]:
        table.add_row(str(x["index"]), *(f"{fmt(x[k]['original'])} -> {fmt(x[k]['reduced'])}" for k in keys))
    table.add_section()
    t = result["total"]
    table.add_row("total", *(f"{fmt(t[k]['original'])} -> {fmt(t[k]['reduced'])} ({t[k]['ratio']:.0%})" for k in keys))
    out = console()
    out.print(table)
    if result["first_token_only"]:
        out.print("reduced model run with the [CLS] shortcut: its last layer computes the first token only (the counts "
                  "above are for the full computation)")
    lat = result.get("latency")
    if not lat:
        return
    for label, key in (("whole model", "model"), ("one attention layer", "attention_layer")):
        x = lat[key]
        out.print(f"{label:>20}: original {x['original_ms']:.1f} ms, reduced {x['reduced_ms']:.1f} ms -> reduced is "
                  f"{verdict(x['ratio'])} (median of {lat['repeats']}, {result['threads']} threads, "
                  f"{result['attn_implementation']}; CPU-time ratio {x['cpu_ratio']:.2f})")
    if lat["model"]["ratio"] > 1:
        out.print("[red]the reduced model is slower than the original here[/red]: every head scores in the shared key "
                  "dim (H x key dim MACs per token pair); try a smaller key dim, --method svd, or a shorter sequence")
