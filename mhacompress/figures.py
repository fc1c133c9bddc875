"""Figures, written atomically: the checks that a figure can be written (refused before any work, not after it),
and the `analyze` figures. matplotlib (the ``plot`` extra) is imported only when a figure is drawn."""

from __future__ import annotations

from pathlib import Path

ANALYSIS_FIGURES = ("head_spectra.png", "unfolding_spectra.png", "cp_error.png")


def figure_format(path, option: str = "--plot") -> str:
    """The format of a figure written at ``path`` (its suffix; png without one), after refusing in one line, before
    any work, what would fail only once the work is done: matplotlib missing, or a format it cannot write."""
    import os

    from .errors import UsageError, given, imported, named

    shown = named(option)  # the option, or in a Python call its argument
    if not isinstance(path, (str, os.PathLike)):  # bytes were named "b'x.png'" and refused as a format
        raise UsageError(f"{shown} must be a path (a str or Path); got {type(path).__name__}, e.g. "
                         f"{given(option, 'out.png')}")
    # matplotlib first: what the figure code imports (a broken install is named too, not a traceback)
    imported("matplotlib", f"{shown} needs matplotlib, which is not installed: pip install 'mhacompress[plot]', or "
                           f"drop {shown}", "pip install 'mhacompress[plot]'")
    from matplotlib.backend_bases import FigureCanvasBase
    fmt = os.path.splitext(str(path))[1][1:].lower() or "png"
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        raise UsageError(f"{shown} {path}: matplotlib cannot write .{fmt} figures; name it .png (or one of "
                         f"{', '.join(sorted(supported))})")
    return fmt


# ---- the analysis figures ---------------------------------------------------------------------------------------


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


def analysis_figures(result: dict, out: Path) -> list[Path]:
    """The PNGs of a report: per-layer head spectra, unfolding spectra, and (with a curve) CP error vs key dim. A
    figure of an earlier run that this one does not draw (cp_error.png, --no-curve) is removed: the folder shows one
    run. All are written to temporary files first and put in place together, so that a run stopped midway changes
    nothing (and leaves no folder it made)."""
    import contextlib

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .fsio import deferred_signals, replace, temp_file

    spectra, unfolding, curve = (out / name for name in ANALYSIS_FIGURES)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.ExitStack() as temps:
            drawn = [(_head_spectra_figure(plt, result), spectra), (_unfolding_figure(plt, result), unfolding)]
            if result["key_dims"]:
                drawn.append((_curve_figure(plt, result), curve))
            written = []
            for fig, path in drawn:
                tmp = temps.enter_context(temp_file(path, path.suffix))
                fig.tight_layout()
                fig.savefig(tmp, dpi=110)
                written.append((tmp, path))
            with deferred_signals():
                for tmp, path in written:
                    replace(tmp, path)
                if not result["key_dims"] and curve.is_file():
                    curve.unlink()
    except BaseException:
        if made:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty
        raise
    finally:
        plt.close("all")
    return [path for _, path in drawn]


def _normalised(values: list[float]) -> list[float]:
    top = max(values) if values and max(values) > 0 else 1.0
    return [max(v / top, 1e-6) for v in values]  # floored so a log axis shows exact zeros at the bottom


def _head_spectra_figure(plt, result: dict):
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
    return fig


def _unfolding_figure(plt, result: dict):
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
    return fig


def _curve_figure(plt, result: dict):
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
    return fig
