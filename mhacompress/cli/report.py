"""`mhacompress report`: what a reduction saves and costs, original beside reduced, counted and measured."""

from __future__ import annotations

import click

from ._common import (
    ProgressBars,
    allow_pickle_option,
    console,
    device_option,
    emit_json,
    first_token_option,
    given_on_command_line,
    method_choice,
    resolved_device,
    user_errors,
)


@click.command()
@click.argument("model")
@click.option("--seq-len", type=click.IntRange(1), default=128, show_default=True, help="Tokens per sequence.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True, help="Sequences per batch.")
@click.option("--key-dim", "-k", type=click.IntRange(1), help="With an ORIGINAL model: reduce it in memory to this "
              "key dim for the comparison (a reduced folder already has one).")
@click.option("--method", type=method_choice(), default=None,
              help="With --key-dim: the reduction method (default: cp).")
@click.option("--repeats", type=click.IntRange(1), default=7, show_default=True,
              help="Timed runs of each side (median reported), after 2 warm-up runs.")
@click.option("--no-latency", is_flag=True, help="Counts only; skip the timing.")
@first_token_option("Times the reduced classifier with the shortcut.")
@click.option("--attn-implementation", type=click.Choice(["sdpa", "eager"]), default="sdpa", show_default=True,
              help="Attention kernels of both models.")
@device_option("Where both models run")
@allow_pickle_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of tables.")
def report(model, seq_len, batch_size, key_dim, method, repeats, no_latency, first_token_only, attn_implementation,
           device, allow_pickle, as_json):
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
        if no_latency and given_on_command_line("repeats"):
            from ..errors import ConfigError

            raise ConfigError("--repeats sets how many timed passes the latency is the median of; drop it with "
                              "--no-latency")
        device = resolved_device(device)
        from ..commands import report as measure

        with ProgressBars(not as_json) as bars:
            result = measure(model, seq_len=seq_len, batch_size=batch_size, key_dim=key_dim, method=method,
                             repeats=repeats, latency=not no_latency, first_token_only=first_token_only,
                             attn_implementation=attn_implementation, device=device, allow_pickle=allow_pickle,
                             on_progress=bars)
    if as_json:
        emit_json(result, "report", device)
    else:
        render(result, device)


def verdict(ratio: float) -> str:
    if ratio <= 1:
        return f"[green]{1 / ratio:.2f}x faster[/green]"
    return f"[red]{ratio:.2f}x SLOWER[/red]"


def render(result: dict, device: str = "cpu") -> None:
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
        where = f"{result['threads']} threads" if "cpu_ratio" in x else device
        steadier = f"; CPU-time ratio {x['cpu_ratio']:.2f}" if "cpu_ratio" in x else ""
        out.print(f"{label:>20}: original {x['original_ms']:.1f} ms, reduced {x['reduced_ms']:.1f} ms -> reduced is "
                  f"{verdict(x['ratio'])} (median of {lat['repeats']}, {where}, "
                  f"{result['attn_implementation']}{steadier})")
    if lat["model"]["ratio"] > 1:
        out.print("[red]the reduced model is slower than the original here[/red]: every head scores in the shared key "
                  "dim (H x key dim MACs per token pair); try a smaller key dim, --method svd, or a shorter sequence")
