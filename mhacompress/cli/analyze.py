"""`mhacompress analyze`: how low-rank and how shared a model's attention scores already are, before reducing."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import allow_pickle_option, console, emit_json, figure_format, progress, status, user_errors

FIGURES = ("head_spectra.png", "unfolding_spectra.png", "cp_error.png")


@click.command()
@click.argument("model")
@click.option("--seq-len", type=click.IntRange(1), default=128, show_default=True, help="The sequence length you "
              "evaluate at: layers whose heads' rank limit (head dim) is below it are flagged (the low-rank "
              "bottleneck, Bhojanapalli et al. 2020).")
@click.option("--key-dims", help="Key dims of the error curves, comma-separated (default: about 8 up to H*dh).")
@click.option("--no-curve", is_flag=True, help="Skip the CP error curve (the only slow part: a few ALS runs a layer).")
@click.option("--plot", "plot_dir", type=click.Path(), metavar="DIR",
              help=f"Write PNG figures into DIR (created): {', '.join(FIGURES)}.")
@allow_pickle_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of tables.")
def analyze(model, seq_len, key_dims, no_curve, plot_dir, allow_pickle, as_json):
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
        if key_dims is not None and no_curve:
            from ..errors import UsageError

            raise UsageError("--key-dims sets the key dims of the error curve, which --no-curve skips; drop one")
        dims = None if key_dims is None else _parse_dims(key_dims)
        if plot_dir is not None:
            from ..hub import check_output

            figure_format(Path(plot_dir) / FIGURES[0])
            check_output(plot_dir, sources=[model], kind="contents", option="--plot")
        plots = None if plot_dir is None else Path(plot_dir).expanduser()  # created when the figures are written
        result = run_analyze(model, dims=dims, seq_len=seq_len, curve=not no_curve, allow_pickle=allow_pickle,
                             show_progress=not as_json)
        if plots:
            result["figures"] = [str(p) for p in write_figures(result, plots)]
    if as_json:
        emit_json(result, "analyze", None)
    else:
        render(result)


def _parse_dims(text: str) -> list[int]:
    from ..errors import UsageError

    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--key-dims takes comma-separated integers, e.g. 48,96,192; got {text!r}") from None


def run_analyze(model_name: str, *, dims=None, seq_len=128, curve=True, allow_pickle=False,
                show_progress=True) -> dict:
    """Load MODEL and analyze it: the JSON report."""
    import time

    from ..hub import load_pretrained
    from ..reduction.allocate import candidate_dims
    from ..reduction.analysis import analyze_model
    from ..reduction.surgery import model_shape

    start = time.perf_counter()
    with status(f"loading {model_name}", show_progress):
        model, _, source = load_pretrained(model_name, allow_pickle=allow_pickle, tokenizer=False)
    layers, heads, head_dim = model_shape(model)
    steps = layers * (1 + (len(set(dims or candidate_dims(heads, head_dim, "cp"))) if curve else 0))
    with progress(show_progress) as bar:
        task = bar.add_task("analyzing", total=steps)
        report = analyze_model(model, key_dims=dims, seq_len=seq_len, curve=curve, on_step=lambda: bar.advance(task))
    return {"model": model_name, "source": source.location, **report,
            "seconds": round(time.perf_counter() - start, 3)}


# ---- figures ----------------------------------------------------------------------------------------------------


def _grid(plt, n: int, title: str, sharey: bool = True):
    """A figure with one small panel per layer, 3 or 4 to a row (whichever leaves fewer empty panels)."""
    cols = 3 if n % 3 == 0 and n % 4 and n <= 12 else min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows + 0.6), sharey=sharey,
                             squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    return fig, list(axes.flat[:n])


def _label_edges(axes, xlabel: str, ylabel: str) -> None:
    """Axis labels on the bottom row and left column of a grid only."""
    cols = axes[0].get_subplotspec().get_gridspec().ncols
    for i, ax in enumerate(axes):
        if i + cols >= len(axes):  # the lowest panel of its column
            ax.set_xlabel(xlabel, fontsize=8)
        if i % cols == 0:
            ax.set_ylabel(ylabel, fontsize=8)


def _save(fig, path: Path) -> Path:
    from ..fsio import atomic_file

    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110)
    return path


def write_figures(result: dict, out: Path) -> list[Path]:
    """The PNGs of a report: per-layer head spectra, unfolding spectra, and (with a curve) CP error vs key dim. A
    figure of an earlier run that this one does not draw (cp_error.png, --no-curve) is removed: the folder shows one
    run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = [_head_spectra_figure(plt, result, out / FIGURES[0]), _unfolding_figure(plt, result, out / FIGURES[1])]
    if result["key_dims"]:
        paths.append(_curve_figure(plt, result, out / FIGURES[2]))
    elif (out / FIGURES[2]).is_file():
        (out / FIGURES[2]).unlink()
    plt.close("all")
    return paths


def _normalised(values: list[float]) -> list[float]:
    top = max(values) if values and max(values) > 0 else 1.0
    return [max(v / top, 1e-6) for v in values]  # floored so a log axis shows exact zeros at the bottom


def _head_spectra_figure(plt, result: dict, path: Path) -> Path:
    H, dh = result["heads"], result["head_dim"]
    fig, axes = _grid(plt, len(result["layers"]), f"{result['model']}: singular values of each head's "
                      f"W_q^h^T W_k^h, divided by its largest ({H} heads of {dh}, one line each)")
    colors = plt.cm.viridis([h / max(H - 1, 1) for h in range(H)])
    for ax, layer in zip(axes, result["layers"]):
        for h, s in enumerate(layer["head_spectra"]):
            ax.semilogy(range(1, dh + 1), _normalised(s), color=colors[h], lw=1, alpha=0.85)
        erank = layer["head_effective_rank"]
        ax.set_title(f"layer {layer['index']}: eff. rank {min(erank):.0f}-{max(erank):.0f} of {dh}", fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
    _label_edges(axes, "index", "s / s_max")
    return _save(fig, path)


def _unfolding_figure(plt, result: dict, path: Path) -> Path:
    H, dh, d = result["heads"], result["head_dim"], result["hidden"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    fig.suptitle(f"{result['model']}: singular values of the stacked tensor (H, d, d) unfolded along each mode, "
                 f"divided by the largest", fontsize=11)
    colors = plt.cm.plasma([i / max(len(result["layers"]), 1) for i in range(len(result["layers"]))])
    titles = {"heads": f"heads (H = {H}): how alike the heads are", "query": f"query side (d = {d})",
              "key": f"key side (d = {d})"}
    for ax, mode in zip(axes, ("heads", "query", "key")):
        for color, layer in zip(colors, result["layers"]):
            s = layer["unfolding_spectra"][mode]
            erank = layer["unfolding_effective_rank"][mode]
            ax.semilogy(range(1, len(s) + 1), _normalised(s), color=color, lw=1.2,
                        label=f"layer {layer['index']} (eff. rank {erank:.0f})")
        if mode != "heads":
            ax.axvline(dh, color="0.5", ls=":", lw=1)
            ax.text(dh, 1.0, f" one head ({dh})", fontsize=7, color="0.4", va="top")
        ax.set_title(titles[mode], fontsize=9)
        ax.set_xlabel("index", fontsize=8)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=6, loc="lower left")
        ax.set_ylabel("s / s_max", fontsize=8)
    return _save(fig, path)


def _curve_figure(plt, result: dict, path: Path) -> Path:
    fig, axes = _grid(plt, len(result["layers"]), f"{result['model']}: relative error ||T - T_hat|| / ||T|| of the "
                      f"scores' bilinear part vs key dim (lower is better)")
    for ax, layer in zip(axes, result["layers"]):
        for key, label, style in (("cp_error", "CP (collaborative)", "o-"), ("svd_error", "per-head SVD", "s--"),
                                  ("shared_bound", "lower bound, any shared U, V", ":")):
            curve = {int(k): v for k, v in layer[key].items()}
            ax.plot(list(curve), list(curve.values()), style, ms=3, lw=1.3, label=label)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"layer {layer['index']}", fontsize=9)
        ax.grid(True, alpha=0.3)
    _label_edges(axes, "key dim", "relative error")
    axes[0].legend(fontsize=7)
    return _save(fig, path)


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
