"""How figures look: matplotlib rc, palette, labels, and the axes helpers every kind uses.

Common style keys (all optional; the schema's ``figure_style_kinds`` lists which kind reads
which): ``title, figsize, labels {experiment: legend label}, colors {experiment: colour}, split
("val"), field (default: run.json primary_field), xscale, yscale ("linear"|"log"), xmin, xmax,
ymin, ymax, legend (location string, or false), hlines [{y, label, color}], annotations (a
string, or [{text, x | x_epochs, y, dx, dy}])``. Kind-specific keys are in each kind's docstring.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from equipipe.figures.data import FigureContext

RC = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 8.5,
    "legend.frameon": False,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.5,
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "svg.fonttype": "none",
    "pdf.fonttype": 42,
}
PALETTE = matplotlib.colormaps["tab10"].colors
METRIC_COLORS = {"total": "#222222", "mean": "#1f77b4", "equiv_unbiased": "#d62728"}
METRIC_LABELS = {
    "total": "Total T",
    "mean": "Twirled error M",
    "equiv_unbiased": "Equivariance error $E_{unb}$",
}
SPLIT_LABELS = {
    "val": "validation",
    "val_octahedral": "octahedral (exact)",
    "val_haar": "Haar rotations (resampled)",
    "train": "train",
}
PCT_LABEL = "Share of loss from equivariance error (%)"
STEP_LABEL = "Training step"
LINESTYLES = ("-", "--", ":", "-.")


# --------------------------------------------------------------------------- layout


def axes_grid(fig: Figure, n: int, ncols: int, *, sharey: bool = False, sharex: bool = False):
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    axs = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey, sharex=sharex)
    flat = list(axs.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return flat[:n]


def new_figure(ctx: FigureContext, n_panels: int = 1, ncols: int | None = None, **kw):
    ncols = ncols or min(n_panels, int(ctx.opt("ncols", 3)))
    nrows = math.ceil(n_panels / max(1, ncols))
    w, h = (4.6, 3.5) if ncols <= 3 else (3.9, 3.1)
    default = (w * ncols + 0.6, h * nrows + 0.5) if n_panels > 1 else (6.4, 4.2)
    fig = Figure(figsize=tuple(ctx.opt("figsize", default)), layout="constrained")
    return fig, axes_grid(fig, n_panels, ncols, **kw)


def outer_labels(axs: list, ncols: int, xlabel: str | None, ylabel: str | None) -> None:
    """Axis labels on the left column and the bottom panel of each column only."""
    n = len(axs)
    for i, ax in enumerate(axs):
        ax.set_ylabel(ylabel if i % ncols == 0 else "")
        ax.set_xlabel(xlabel if i + ncols >= n else "")


def apply_axes(
    ax, ctx: FigureContext, *, xscale="linear", yscale="linear", xlabel=None, ylabel=None
):
    ax.set_xscale(ctx.opt("xscale", xscale))
    ax.set_yscale(ctx.opt("yscale", yscale))
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    lo, hi = ctx.style.get("xmin"), ctx.style.get("xmax")
    if lo is not None or hi is not None:
        ax.set_xlim(left=lo, right=hi)
    lo, hi = ctx.style.get("ymin"), ctx.style.get("ymax")
    if lo is not None or hi is not None:
        ax.set_ylim(bottom=lo, top=hi)
    for h in ctx.style.get("hlines") or []:
        ax.axhline(
            h["y"], color=h.get("color", "0.4"), ls=h.get("ls", ":"), lw=1.0, label=h.get("label")
        )


def clip_to_axes(
    x: np.ndarray, ys: list[np.ndarray], ctx: FigureContext, *, logx: bool, logy: bool
):
    """Mask points outside [xmin, xmax] and non-positive values on log axes."""
    keep = np.isfinite(x)
    if ctx.style.get("xmin") is not None:
        keep &= x >= ctx.style["xmin"]
    if ctx.style.get("xmax") is not None:
        keep &= x <= ctx.style["xmax"]
    if logx:
        keep &= x > 0
    if logy:
        keep &= ys[0] > 0
    return x[keep], [y[keep] for y in ys]


def room_below(ax, y_low: float, *, frac: float, log: bool) -> None:
    """Lower the y axis so that ``y_low`` sits at least ``frac`` of the height above it."""
    ax.autoscale_view()
    lo, hi = ax.get_ylim()
    f = np.log10 if log else (lambda v: v)
    if log and (y_low <= 0 or hi <= 0):
        return
    a, b = f(y_low), f(hi)
    need = (a - frac * b) / (1 - frac)
    if need < f(lo):
        ax.set_ylim(bottom=10**need if log else need)


# --------------------------------------------------------------------------- text


def add_legend(ax, ctx: FigureContext, **kw):
    loc = ctx.style.get("legend", "best")
    if loc is False:
        return
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc=loc, **kw)


def add_title(fig: Figure, ctx: FigureContext, default: str):
    title = ctx.style.get("title", default)
    if title:
        fig.suptitle(title, fontsize=12)


def add_annotations(ax, ctx: FigureContext, spe: float | None = None):
    notes = ctx.style.get("annotations", ctx.style.get("annotation"))
    if not notes:
        return
    if isinstance(notes, str | dict):
        notes = [notes]
    for n in notes:
        if isinstance(n, str):
            ax.text(
                0.97,
                0.95,
                n,
                transform=ax.transAxes,
                ha="right",
                va="top",
                fontsize=9,
                bbox={"boxstyle": "round", "fc": "white", "ec": "0.7"},
            )
            continue
        x = n.get("x")
        if x is None and n.get("x_epochs") is not None and spe:
            x = n["x_epochs"] * spe
        if x is None or n.get("y") is None:
            ax.text(0.97, 0.95, n["text"], transform=ax.transAxes, ha="right", va="top", fontsize=9)
            continue
        ax.annotate(
            n["text"],
            xy=(x, n["y"]),
            xytext=(n.get("dx", 30), n.get("dy", 30)),
            textcoords="offset points",
            fontsize=9,
            arrowprops={"arrowstyle": "->", "color": "0.3", "lw": 0.8},
        )


def mark_no_data(ax, what: str):
    warnings.warn(f"figure: {what}", stacklevel=3)
    ax.text(0.5, 0.5, what, transform=ax.transAxes, ha="center", va="center", color="0.4")


def mark_epochs(ax, ctx: FigureContext, exps: list[str]):
    if not ctx.opt("epoch_marker", False):
        return
    seen: dict[float, int] = {}
    for i, e in enumerate(exps):
        spe = ctx.steps_per_epoch(e)
        if spe and spe not in seen:
            seen[spe] = i
    label = ctx.opt("epoch_label", "One epoch")
    xmax = ctx.style.get("xmax")
    for spe, i in seen.items():
        if xmax is not None and spe > xmax:
            continue
        color = "0.35" if len(seen) == 1 else ctx.color(exps[i], i)
        ax.axvline(spe, color=color, ls="--", lw=1.0)
        ax.text(
            spe,
            0.98,
            f" {label}" + ("" if len(seen) == 1 else f" ({ctx.label(exps[i])})"),
            transform=ax.get_xaxis_transform(),
            rotation=90,
            ha="right",
            va="top",
            fontsize=8.5,
            color=color,
        )


def fmt_step(step: float) -> str:
    return f"{int(round(step)):,}"


def fmt_value(v: float) -> str:
    if not np.isfinite(v):
        return ""
    return f"{v:.0f}" if abs(v) >= 10 else f"{v:#.2g}".rstrip(".")


def t_colors(ts: list, cmap: str = "viridis"):
    cm = matplotlib.colormaps[cmap]
    n = len(ts)
    return {t: cm(0.05 + 0.85 * (i / max(1, n - 1))) for i, t in enumerate(ts)}


def t_label(t) -> str:
    return "all t" if t is None else f"t = {t:g}"
