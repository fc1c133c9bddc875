"""`mhacompress analyze`: how low-rank and how shared a model's attention scores already are, before reducing."""

from __future__ import annotations

import click

from ..figures import ANALYSIS_FIGURES as FIGURES
from ._common import ProgressBars, allow_pickle_option, console, emit_json, integers, user_errors


@click.command()
@click.argument("model")
@click.option("--seq-len", type=click.IntRange(1), default=128, show_default=True, help="The sequence length you "
              "evaluate at: layers whose heads' rank limit (head dim) is below it are flagged (the low-rank "
              "bottleneck, Bhojanapalli et al. 2020).")
@click.option("--key-dims", help="Key dims of the error curves, comma-separated (default: about 8 up to H*dh).")
@click.option("--no-curve", is_flag=True, help="Skip the CP error curve (the only slow part: a few ALS runs a layer).")
@click.option("--plot", "plot_dir", type=click.Path(), metavar="DIR",
              help=f"Write PNG figures into DIR (created): {', '.join(FIGURES)}.")
@click.option("--force", is_flag=True, help="Replace the figures of an earlier run in the --plot folder (files of "
              "those names; a cp_error.png is removed with --no-curve). Without it such files are left and the "
              "command refused.")
@allow_pickle_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of tables.")
def analyze(model, seq_len, key_dims, no_curve, plot_dir, force, allow_pickle, as_json):
    """Spectra of every self-attention layer of MODEL: per head, the singular values of A_h = W_q^h^T W_k^h; for
    the stacked tensor (H, d, d), the singular values of its head, query and key unfoldings; their effective ranks;
    and the relative error of a collaborative (CP) reduction at each key dim, beside per-head SVD and a lower bound
    for any shared projection. Flags layers whose heads are narrower than --seq-len (the low-rank bottleneck).

    MODEL is a local folder, a Hugging Face hub id, or an alias (minilm is bundled, no network).

    \b
    Examples:
      mhacompress analyze minilm --plot out/analyze-minilm
      mhacompress analyze bert-base --no-curve --seq-len 512 --json
    """
    with user_errors():
        from ..commands import analyze as run

        dims = None if key_dims is None else _parse_dims(key_dims)
        with ProgressBars(not as_json) as bars:
            result = run(model, seq_len=seq_len, key_dims=dims, curve=not no_curve, plot=plot_dir, force=force,
                         allow_pickle=allow_pickle, on_progress=bars)
    if as_json:
        emit_json(result, "analyze", None)
    else:
        render(result)


def _parse_dims(text: str) -> list[int]:
    from ..errors import ConfigError

    dims = integers(text)
    if dims is None:
        raise ConfigError(f"--key-dims takes comma-separated integers, e.g. 48,96,192; got {text!r}")
    return dims


# ---- rich summary -----------------------------------------------------------------------------------------------


def _shown_dims(dims: list[int], top: int) -> list[int]:
    """Up to three key dims for the table: those nearest top/8, top/4 and top/2."""
    if not dims:
        return []
    return sorted({min(dims, key=lambda k: abs(k - top / f)) for f in (8, 4, 2)})


def render(result: dict) -> None:
    from rich import box
    from rich.table import Table

    H, dh, d = result["heads"], result["head_dim"], result["hidden"]
    shown = _shown_dims(result["key_dims"], d)
    table = Table(title=f"{result['model']}: {result['num_layers']} layers, {H} heads of {dh} (d = {d})",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, caption_justify="left",
                  caption=f"head, heads, query, key: effective ranks (exp of the entropy of s / sum(s)) of each head's "
                          f"A_h (mean; of {dh}) and of T's unfoldings (of {H}, {d}, {d})"
                          + ("; @k: relative error of CP|per-head SVD at key dim k" if shown else ""))
    columns = ["layer", "||T||", "head", "heads", "query", "key"] + [f"@{k}" for k in shown]
    for col in columns:
        table.add_column(col, justify="right", no_wrap=True)
    for x in result["layers"]:
        erank, unfold = x["head_effective_rank"], x["unfolding_effective_rank"]
        errors = [f"{x['cp_error'][k]:.2f}|" + (f"{x['svd_error'][k]:.2f}" if k in x["svd_error"] else "-")
                  for k in shown]
        table.add_row(str(x["index"]), f"{x['norm']:.1f}", f"{sum(erank) / H:.1f}", f"{unfold['heads']:.1f}",
                      f"{unfold['query']:.0f}", f"{unfold['key']:.0f}", *errors)
    out = console()
    out.print(table)
    for warning in result["warnings"]:
        out.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if not result["warnings"]:
        out.print(f"no low-rank bottleneck at sequence length {result['seq_len']} (head score matrices have rank "
                  f"<= {result['bottleneck']['rank_limit']})", highlight=False)
    for path in result.get("figures", []):
        out.print(f"wrote {path}", highlight=False)
    out.print(f"{result['seconds']:.1f} s", highlight=False)
