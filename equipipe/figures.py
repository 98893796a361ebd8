"""One function per figure KIND, driven by a spec from the config.

Entry point::

    make_figure(spec, metrics, runs, out_prefix, extra=None) -> matplotlib.figure.Figure

* ``spec``: ``{"kind": str, "experiments": [names], "style": {...}, "caption": str}``
  (the caption goes to the report, it is not drawn);
* ``metrics``: the collected table (``results/metrics_all.parquet``; ``equipipe.metrics`` columns plus
  ``experiment, seed, task, model, size``);
* ``runs``: run.json contents keyed ``"<experiment>/<seed>"`` (``equipipe.collect.load_runs``);
* ``out_prefix``: writes ``<out_prefix>.png``, ``.pdf`` and ``.svg``;
* ``extra``: named extra inputs (analysis outputs) for kinds that need them.

Kinds are registered in ``KINDS`` with the ``register_kind(name)`` decorator. A kind function
takes a ``FigureContext`` and returns a ``Figure``; modules listed in ``PLUGIN_MODULES`` are
imported on first use so that other modules (analyses: landscape, twirling, efficiency gap)
can register their own kinds without this module importing them.

Style keys understood by every kind (all optional):
``title, figsize, labels {experiment: legend label}, colors {experiment: colour},
split ("val"), field (default: run.json primary_field), xscale, yscale ("linear"|"log"),
xmin, xmax, ymin, ymax, legend (location string, or false), hlines [{y, label, color}],
annotations (a string, or [{text, x | x_epochs, y, dx, dy}])``.
Kind-specific keys are listed in each kind's docstring.

Figures use matplotlib's object API (``Figure``, no pyplot state); PNG is rendered by Agg.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import polars as pl
from matplotlib.collections import LineCollection
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from scipy import stats

from equipipe import figures_bands as bands
from equipipe.collect import pct_scale
from equipipe.smoothing import dip as find_dip
from equipipe.smoothing import ema

__all__ = [
    "FORMATS",
    "KINDS",
    "PLUGIN_MODULES",
    "FigureContext",
    "build_figure",
    "make_figure",
    "register_kind",
]

FORMATS = ("png", "pdf", "svg")
PLUGIN_MODULES: tuple[str, ...] = (
    "equipipe.figures_analysis",
    "equipipe.efficiency",
    "equipipe.figures_md",
    "equipipe.figures_spectrum",
    "equipipe.figures_decay",
    "equipipe.figures_slq",
)

KindFn = Callable[["FigureContext"], Figure]
KINDS: dict[str, KindFn] = {}

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


def register_kind(name: str) -> Callable[[KindFn], KindFn]:
    """Decorator: register ``fn(ctx: FigureContext) -> Figure`` as figure kind ``name``."""

    def deco(fn: KindFn) -> KindFn:
        if name in KINDS and KINDS[name] is not fn:
            raise ValueError(f"figure kind {name!r} is already registered ({KINDS[name]})")
        KINDS[name] = fn
        return fn

    return deco


def _load_plugins() -> None:
    for mod in PLUGIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # the plugin exists but something it imports does not
                raise


# --------------------------------------------------------------------------- context


@dataclass
class FigureContext:
    """Everything a kind function sees, with helpers to select and aggregate curves."""

    spec: dict
    metrics: pl.DataFrame
    runs: dict[str, dict]
    extra: dict[str, Path] = field(default_factory=dict)

    @property
    def style(self) -> dict:
        return self.spec.get("style") or {}

    def opt(self, key: str, default=None):
        v = self.style.get(key)
        return default if v is None else v

    @property
    def experiments(self) -> list[str]:
        wanted = list(self.spec.get("experiments") or [])
        present = self.metrics.get_column("experiment").unique(maintain_order=True).to_list()
        if not present:
            raise ValueError(f"figure ({self.spec.get('kind')}): the metrics table has no rows")
        if not wanted:
            return present
        missing = [e for e in wanted if e not in present]
        if missing:
            raise ValueError(
                f"figure ({self.spec.get('kind')}): experiment(s) {missing} have no rows in the "
                f"metrics table; present: {present}"
            )
        return wanted

    # ---- run facts
    def run_infos(self, exp: str) -> list[dict]:
        infos = [r for r in self.runs.values() if r.get("experiment") == exp]
        if not infos:
            infos = [r for k, r in self.runs.items() if k.split("/")[0] == exp]
        return sorted(infos, key=lambda r: r.get("seed", 0))

    def run_info(self, exp: str) -> dict:
        infos = self.run_infos(exp)
        return infos[0] if infos else {}

    def steps_per_epoch(self, exp: str) -> float | None:
        info = self.run_info(exp)
        spe = info.get("steps_per_epoch")
        if spe:
            return float(spe)
        n, b = info.get("n_train"), info.get("batch_size")
        return float(math.ceil(n / b)) if n and b else None

    def label(self, exp: str) -> str:
        return str((self.style.get("labels") or {}).get(exp, exp))

    def color(self, exp: str, i: int):
        return (self.style.get("colors") or {}).get(exp, PALETTE[i % len(PALETTE)])

    def primary_field(self, exp: str) -> str | None:
        return self.style.get("field") or self.run_info(exp).get("primary_field")

    # ---- selection
    def rows(
        self,
        exp: str,
        metric: str,
        *,
        split: str | None = None,
        strict_split: bool = False,
        field_name: str | None = None,
    ) -> pl.DataFrame:
        """Rows of one metric for one experiment, one field, one split (with fallbacks).

        Field: the requested one (default: primary field), else field-less rows, else the
        first field. Split: the requested one (default style ``split`` or "val"); if absent
        and not ``strict_split``, the first of val, val_haar, val_octahedral, train, others.
        """
        df = self.metrics.filter((pl.col("experiment") == exp) & (pl.col("metric") == metric))
        if df.height == 0:
            return df
        want = split or self.opt("split", "val")
        if isinstance(want, list):
            want = want[0]
        splits = df.get_column("split").unique().to_list()
        if want not in splits:
            if strict_split:
                return df.clear()
            order = ["val", "val_haar", "val_octahedral", "train"]
            choice = next((s for s in order if s in splits), sorted(splits)[0])
            df = df.filter(pl.col("split") == choice)
        else:
            df = df.filter(pl.col("split") == want)
        f = field_name or self.primary_field(exp)
        fields = df.get_column("field")
        present = sorted({x for x in fields.to_list() if x is not None})
        if f is not None and f in present:
            return df.filter(pl.col("field") == f)
        if fields.null_count() > 0:
            return df.filter(pl.col("field").is_null())
        return df.filter(pl.col("field") == present[0]) if present else df

    def pct_scale(self, df: pl.DataFrame) -> float:
        return (
            pct_scale(df.get_column("unit").unique().to_list()) if "unit" in df.columns else 100.0
        )

    def unit(self, exp: str, metric: str = "total") -> str | None:
        df = self.rows(exp, metric)
        units = [u for u in df.get_column("unit").unique().to_list() if u] if df.height else []
        return units[0] if units else None


# --------------------------------------------------------------------------- helpers


def _ts(df: pl.DataFrame, ctx: FigureContext | None = None) -> list[float | None]:
    """Flow times present in ``df``, sorted (None first); limited to style ``t`` if given."""
    ts = sorted(df.get_column("t").unique().to_list(), key=lambda t: -1.0 if t is None else t)
    want = ctx.style.get("t") if ctx is not None else None
    if want is None:
        return ts
    want = [want] if isinstance(want, int | float) else list(want)
    return [t for t in ts if t is None or any(abs(t - w) < 1e-9 for w in want)]


def _outer_labels(axs: list, ncols: int, xlabel: str | None, ylabel: str | None) -> None:
    """Axis labels on the left column and the bottom panel of each column only."""
    n = len(axs)
    for i, ax in enumerate(axs):
        ax.set_ylabel(ylabel if i % ncols == 0 else "")
        ax.set_xlabel(xlabel if i + ncols >= n else "")


def _row_label(ctx: FigureContext, exp: str, unit: str | None, *, multi: bool) -> str:
    base = "Squared error per element" + (f" ({unit})" if unit else "")
    return f"{ctx.label(exp)}\n{base}" if multi else base


def _room_below(ax, y_low: float, *, frac: float, log: bool) -> None:
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


def _fmt_value(v: float) -> str:
    if not np.isfinite(v):
        return ""
    return f"{v:.0f}" if abs(v) >= 10 else f"{v:#.2g}".rstrip(".")


def _t_filter(df: pl.DataFrame, t: float | None) -> pl.DataFrame:
    return df.filter(pl.col("t").is_null() if t is None else pl.col("t") == t)


def _over_seeds(df: pl.DataFrame) -> pl.DataFrame:
    """Per step: mean, min, max and count of ``value`` over seeds (seed-averaged first)."""
    per_seed = df.group_by("seed", "step").agg(pl.col("value").mean())
    return (
        per_seed.group_by("step")
        .agg(
            pl.col("value").mean().alias("mean"),
            pl.col("value").min().alias("lo"),
            pl.col("value").max().alias("hi"),
            pl.len().alias("n"),
        )
        .sort("step")
    )


def _seed_curves(df: pl.DataFrame) -> list[tuple[int, np.ndarray, np.ndarray]]:
    out = []
    for (seed,), g in df.group_by("seed"):
        g = g.group_by("step").agg(pl.col("value").mean()).sort("step")
        out.append((seed, g.get_column("step").to_numpy(), g.get_column("value").to_numpy()))
    return sorted(out, key=lambda c: c[0])


def _clip(x: np.ndarray, ys: list[np.ndarray], ctx: FigureContext, *, logx: bool, logy: bool):
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


def _axes_grid(fig: Figure, n: int, ncols: int, *, sharey: bool = False, sharex: bool = False):
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    axs = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey, sharex=sharex)
    flat = list(axs.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return flat[:n]


def _new_figure(ctx: FigureContext, n_panels: int = 1, ncols: int | None = None, **kw):
    ncols = ncols or min(n_panels, int(ctx.opt("ncols", 3)))
    nrows = math.ceil(n_panels / max(1, ncols))
    w, h = (4.6, 3.5) if ncols <= 3 else (3.9, 3.1)
    default = (w * ncols + 0.6, h * nrows + 0.5) if n_panels > 1 else (6.4, 4.2)
    fig = Figure(figsize=tuple(ctx.opt("figsize", default)), layout="constrained")
    return fig, _axes_grid(fig, n_panels, ncols, **kw)


def _apply_axes(
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


def _legend(ax, ctx: FigureContext, **kw):
    loc = ctx.style.get("legend", "best")
    if loc is False:
        return
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc=loc, **kw)


def _title(fig: Figure, ctx: FigureContext, default: str):
    title = ctx.style.get("title", default)
    if title:
        fig.suptitle(title, fontsize=12)


def _annotate(ax, ctx: FigureContext, spe: float | None = None):
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


def _no_data(ax, what: str):
    warnings.warn(f"figure: {what}", stacklevel=3)
    ax.text(0.5, 0.5, what, transform=ax.transAxes, ha="center", va="center", color="0.4")


def _fmt_step(step: float) -> str:
    return f"{int(round(step)):,}"


def _epoch_markers(ax, ctx: FigureContext, exps: list[str]):
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


def _corr_text(x: np.ndarray, y: np.ndarray) -> str:
    """Pearson and Spearman correlations of log10 x and log10 y."""
    ok = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
    lx, ly = np.log10(x[ok]), np.log10(y[ok])
    if lx.size < 3 or np.ptp(lx) == 0 or np.ptp(ly) == 0:
        return f"too few points for correlations (n = {lx.size})"
    r = stats.pearsonr(lx, ly).statistic
    rho = stats.spearmanr(lx, ly).statistic
    return f"Pearson r = {r:.2f}\nSpearman ρ = {rho:.2f}\n(of logs, n = {lx.size})"


def _corr_box(ax, text: str, loc: str = "upper left"):
    x, ha = (0.03, "left") if "left" in loc else (0.97, "right")
    y, va = (0.97, "top") if "upper" in loc else (0.03, "bottom")
    ax.text(
        x,
        y,
        text,
        transform=ax.transAxes,
        ha=ha,
        va=va,
        fontsize=9,
        bbox={"boxstyle": "round", "fc": "white", "ec": "0.7", "alpha": 0.9},
    )


def _t_colors(ts: list, cmap: str = "viridis"):
    cm = matplotlib.colormaps[cmap]
    n = len(ts)
    return {t: cm(0.05 + 0.85 * (i / max(1, n - 1))) for i, t in enumerate(ts)}


def _t_label(t) -> str:
    return "all t" if t is None else f"t = {t:g}"


# --------------------------------------------------------------------------- pct curves


def _plot_pct(ctx: FigureContext, ax, *, group: str, mark_dip: bool, logx: bool, logy: bool):
    exps = ctx.experiments
    splits = ctx.opt("split", "val")
    splits = list(splits) if isinstance(splits, list | tuple) else [splits]
    split_labels = {**SPLIT_LABELS, **(ctx.style.get("split_labels") or {})}
    s = ctx.style.get("smooth")  # None: raw curves
    dip_s = ctx.opt("dip_s", s if s else 1000)
    window = ctx.style.get("dip_window")
    if group == "auto":
        group = "seed" if len(exps) == 1 and len(splits) == 1 else "experiment"
    dips = []
    band_drawn = False
    for i, exp in enumerate(exps):
        for j, split in enumerate(splits):
            df = ctx.rows(exp, "pct", split=split, strict_split=len(splits) > 1)
            t_sel = ctx.style.get("t")
            if df.height and t_sel is not None:
                df = _t_filter(df, t_sel)
            elif df.height and df.get_column("t").null_count() < df.height:
                df = df.filter(pl.col("t").is_not_null())
                if df.get_column("t").n_unique() > 1:
                    # several flow times: average them (use style t to pick one)
                    df = df.group_by("seed", "step").agg(
                        pl.col("value").mean(), pl.col("unit").first()
                    )
            if df.height == 0:
                _no_data(ax, f"no pct rows for {exp} / {split}")
                continue
            scale = ctx.pct_scale(df)
            name = (
                ctx.label(exp)
                if len(splits) == 1
                else f"{ctx.label(exp)} · {split_labels.get(split, split)}"
            )
            if len(exps) == 1 and len(splits) > 1:
                name = split_labels.get(split, split)
            ls = LINESTYLES[j % len(LINESTYLES)]
            se_rows = ctx.rows(exp, "pct_se", split=split, strict_split=len(splits) > 1)
            se_tab = bands.pct_se_by_seed(se_rows, t_sel)  # ±1 SE band (figures_bands)
            if group == "seed":
                for k, (seed, x, y) in enumerate(_seed_curves(df)):
                    se = bands.se_at(se_tab, x, seed) * scale
                    lo, hi = bands.band_edges(x, y * scale, se, s)
                    y = ema(x, y * scale, s)
                    x, (y, lo, hi) = _clip(x, [y, lo, hi], ctx, logx=logx, logy=logy)
                    color = PALETTE[k % len(PALETTE)]
                    ax.plot(x, y, color=color, ls=ls, label=f"{name} · seed {seed}")
                    band_drawn |= bands.fill_band(ax, x, y, lo, hi, color, logy=logy)
                agg = _over_seeds(df)
            else:
                agg = _over_seeds(df)
                x = agg.get_column("step").to_numpy()
                se = bands.se_at(se_tab, x) * scale
                slo, shi = bands.band_edges(x, agg.get_column("mean").to_numpy() * scale, se, s)
                y, lo, hi = (
                    ema(x, agg.get_column(c).to_numpy() * scale, s) for c in ("mean", "lo", "hi")
                )
                x, (y, lo, hi, slo, shi) = _clip(
                    x, [y, lo, hi, slo, shi], ctx, logx=logx, logy=logy
                )
                color = ctx.color(exp, i) if len(exps) > 1 or len(splits) == 1 else PALETTE[j]
                nseeds = int(agg.get_column("n").max())
                lab = name + (f" (mean of {nseeds} seeds, range dotted)" if nseeds > 1 else "")
                ax.plot(x, y, color=color, ls=ls, label=lab)
                band_drawn |= bands.fill_band(ax, x, y, slo, shi, color, logy=logy)
                if nseeds > 1:
                    for edge in (lo, hi):
                        ax.plot(x, edge, color=color, ls=":", lw=0.8, alpha=0.7)
            if mark_dip:
                xs = agg.get_column("step").to_numpy()
                ys = agg.get_column("mean").to_numpy() * scale
                try:
                    dstep, dval = find_dip(xs, ys, window=window, s=dip_s)
                except ValueError:
                    continue
                color = ctx.color(exp, i)
                ax.plot(
                    [dstep], [dval], marker="v", ms=7, color=color, mec="white", ls="none", zorder=5
                )
                dips.append((dstep, dval, color))
            # resampling floor (voxel continuous mode) where measured: floor_share is the
            # floor's per-voxel equivariance error over THIS model's total at each evaluation,
            # so it is in the same units as the pct curve (never a pct of another predictor)
            if ctx.opt("floor", True):
                fl = ctx.rows(exp, "floor_share", split=split, strict_split=True)
                if fl.height:
                    fa = _over_seeds(fl)
                    fx, fy = (
                        fa.get_column("step").to_numpy(),
                        fa.get_column("mean").to_numpy() * ctx.pct_scale(fl),
                    )
                    fcol = "0.45" if len(exps) == 1 else ctx.color(exp, i)
                    flab = "resampling floor" + (f" · {ctx.label(exp)}" if len(exps) > 1 else "")
                    if fx.size == 1:
                        ax.axhline(fy[0], color=fcol, ls=(0, (1, 1.5)), lw=1.2, label=flab)
                    else:
                        fx, (fy,) = _clip(fx, [fy], ctx, logx=logx, logy=logy)
                        ax.plot(fx, fy, color=fcol, ls=(0, (1, 1.5)), lw=1.2, label=flab)
    if band_drawn:
        ax.text(0.99, 0.01, bands.BAND_NOTE, transform=ax.transAxes, ha="right", va="bottom",
                fontsize=7.5, color="0.35")  # fmt: skip
    if dips and ctx.style.get("ymin") is None:
        _room_below(ax, min(d[1] for d in dips), frac=0.05 + 0.05 * len(dips), log=logy)
    for k, (dstep, dval, color) in enumerate(dips):
        ax.annotate(
            f"Dip at {_fmt_step(dstep)}",
            xy=(dstep, dval),
            xytext=(0, -12 - 13 * k),
            textcoords="offset points",
            ha="center",
            va="top",
            fontsize=8.5,
            color=color,
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85},
            zorder=6,
        )
    return exps


def _pct_figure(
    ctx: FigureContext, *, group: str, mark_dip: bool, xscale: str, yscale: str, title: str
):
    fig, (ax,) = _new_figure(ctx)
    logx = ctx.opt("xscale", xscale) == "log"
    logy = ctx.opt("yscale", yscale) == "log"
    ax.set_xscale("log" if logx else "linear")
    ax.set_yscale("log" if logy else "linear")
    exps = _plot_pct(ctx, ax, group=group, mark_dip=mark_dip, logx=logx, logy=logy)
    _apply_axes(ax, ctx, xscale=xscale, yscale=yscale, xlabel=STEP_LABEL, ylabel=PCT_LABEL)
    _epoch_markers(ax, ctx, exps)
    _annotate(ax, ctx, ctx.steps_per_epoch(exps[0]) if exps else None)
    _legend(ax, ctx)
    field_name = ctx.primary_field(exps[0]) if exps else None
    _title(fig, ctx, title + (f" ({field_name})" if field_name else ""))
    return fig


@register_kind("pct_vs_step")
def pct_vs_step(ctx: FigureContext) -> Figure:
    """pct (unbiased, %) of the primary field vs step.

    Style: ``group`` ("auto" | "seed" | "experiment"; auto = one line per seed for a single
    experiment, else seed-mean per experiment with the range over seeds shaded), ``split``
    (a split or a list, e.g. [val_octahedral, val_haar] for voxels: one line style each),
    ``t`` (flow time to show; default: mean over t), ``smooth`` (EMA scale s; default raw),
    ``epoch_marker`` (bool), ``epoch_label`` ("One epoch"), ``floor`` (draw metric
    ``floor_share`` where present; default true), ``dip`` (mark dips; default false),
    ``dip_window``, ``dip_s``, ``split_labels``, plus the common keys (xscale/yscale default
    linear).
    """
    return _pct_figure(
        ctx,
        group=ctx.opt("group", "auto"),
        mark_dip=bool(ctx.opt("dip", False)),
        xscale="linear",
        yscale="linear",
        title="Equivariance share of held-out loss",
    )


@register_kind("pct_by")
def pct_by(ctx: FigureContext) -> Figure:
    """pct vs step, one colour per experiment (seed mean, range shaded), "Dip at N" labels.

    Style: ``dip_window`` ([lo, hi] steps for the dip search), ``dip_s`` (EMA scale for the
    dip, default 1000), ``smooth`` (EMA scale for the drawn curves; default raw), ``dip``
    (default true), ``epoch_marker``, plus common keys (xscale/yscale default log).
    """
    return _pct_figure(
        ctx,
        group="experiment",
        mark_dip=bool(ctx.opt("dip", True)),
        xscale="log",
        yscale="log",
        title="Equivariance share of held-out loss",
    )


# --------------------------------------------------------------------------- loss curves


def _se_rows(
    ctx: FigureContext, exp: str, metric: str, split: str | None
) -> tuple[pl.DataFrame, float]:
    """Standard-error rows for a decomposition metric, and the factor to apply to them."""
    if metric == "equiv_unbiased":
        se = ctx.rows(exp, "equiv_unbiased_se", split=split)
        if se.height:
            return se, 1.0
        se = ctx.rows(exp, "equiv_se", split=split)
        k = ctx.rows(exp, "k", split=split)
        kval = float(k.get_column("value").median()) if k.height else None
        return se, (kval / (kval - 1.0) if kval and kval > 1 else 1.0)
    return ctx.rows(exp, f"{metric}_se", split=split), 1.0


def _decomp_lines(
    ctx, ax, exp, *, t=None, split=None, logx=True, logy=True, color_by_t=None, label_suffix=""
):
    """Draw T, M, E_unb of one experiment (optionally one t) on ax; seeds averaged."""
    drawn = False
    for metric in ("total", "mean", "equiv_unbiased"):
        df = ctx.rows(exp, metric, split=split)
        if df.height and t is not None:
            df = _t_filter(df, t)
        elif df.height and 0 < df.get_column("t").null_count() < df.height:
            df = _t_filter(df, None)  # field-level rows beside per-t rows: use those
        if df.height == 0:
            continue
        agg = _over_seeds(df)
        x = agg.get_column("step").to_numpy()
        y = agg.get_column("mean").to_numpy()
        nseeds = int(agg.get_column("n").max())
        se_df, factor = _se_rows(ctx, exp, metric, split)
        if se_df.height and t is not None:
            se_df = _t_filter(se_df, t)
        elif se_df.height and 0 < se_df.get_column("t").null_count() < se_df.height:
            se_df = _t_filter(se_df, None)
        lo = hi = None
        if se_df.height:
            # SE of the seed mean: sqrt(sum se^2) / n
            se = (
                se_df.group_by("seed", "step")
                .agg(pl.col("value").mean())
                .group_by("step")
                .agg(((pl.col("value") ** 2).sum().sqrt() / pl.len()).alias("se"))
            )
            joined = agg.join(se, on="step", how="left").sort("step")
            sev = joined.get_column("se").fill_null(0.0).to_numpy() * factor
            lo, hi = y - 2 * sev, y + 2 * sev
        elif nseeds > 1:
            lo, hi = agg.get_column("lo").to_numpy(), agg.get_column("hi").to_numpy()
        s = ctx.style.get("smooth")
        y = ema(x, y, s)
        ys = [y] if lo is None else [y, ema(x, lo, s), ema(x, hi, s)]
        x, ys = _clip(x, ys, ctx, logx=logx, logy=logy)
        color = METRIC_COLORS[metric] if color_by_t is None else color_by_t
        ls = (
            {"total": "-", "mean": "--", "equiv_unbiased": "-"}[metric]
            if color_by_t is None
            else "-"
        )
        ax.plot(x, ys[0], color=color, ls=ls, label=METRIC_LABELS[metric] + label_suffix)
        if lo is not None:
            lo_, hi_ = ys[1], ys[2]
            if logy:
                lo_ = np.where(lo_ > 0, lo_, ys[0] * 1e-3)
            ax.fill_between(x, lo_, hi_, color=color, alpha=0.18, lw=0)
        drawn = True
    return drawn


def _se_note(ctx: FigureContext, exps: list[str]) -> str:
    has_se = any(ctx.rows(e, "total_se").height for e in exps)
    return "shaded: ±2 standard errors" if has_se else "shaded: range over seeds"


@register_kind("loss_curves")
def loss_curves(ctx: FigureContext) -> Figure:
    """Total T, raw twirled error M and unbiased equivariance error E_unb vs step, per panel
    one experiment (log-log), primary field, ±2 standard errors shaded where ``*_se`` exist.

    Style: ``ncols`` (3), ``sharey`` (true), ``smooth`` (EMA scale; default raw),
    ``t`` (flow time; default: field-level rows, else mean over t), common keys.
    """
    exps = ctx.experiments
    fig, axs = _new_figure(ctx, len(exps), sharey=bool(ctx.opt("sharey", True)))
    logx = ctx.opt("xscale", "log") == "log"
    logy = ctx.opt("yscale", "log") == "log"
    t = ctx.style.get("t")
    for ax, exp in zip(axs, exps):
        ok = _decomp_lines(ctx, ax, exp, t=t, logx=logx, logy=logy)
        if not ok:
            _no_data(ax, f"no decomposition rows for {exp}")
        unit = ctx.unit(exp)
        _apply_axes(
            ax,
            ctx,
            xscale="log",
            yscale="log",
            xlabel=STEP_LABEL,
            ylabel=f"Squared error per element ({unit})" if unit else "Squared error per element",
        )
        ax.set_title(ctx.label(exp))
        _annotate(ax, ctx, ctx.steps_per_epoch(exp))
    _legend(axs[0], ctx, title=_se_note(ctx, exps), title_fontsize=8)
    field_name = ctx.primary_field(exps[0]) if exps else None
    _title(
        fig, ctx, "Loss decomposition on held-out data" + (f" ({field_name})" if field_name else "")
    )
    return fig


# --------------------------------------------------------------------------- per-t kinds


@register_kind("pct_per_t")
def pct_per_t(ctx: FigureContext) -> Figure:
    """Flow matching: pct vs step per flow time t (one colour each), EMA-smoothed (solid) over
    the faint raw curve, log-log, one panel per experiment (seed mean).

    Style: ``s`` (EMA scale, 1000), ``cmap`` ("viridis"), ``shade_after`` (step; shades the
    overfitted region after it), ``shade_label`` ("overfitting"), ``ncols``, ``sharey``
    (true), common keys.
    """
    exps = ctx.experiments
    fig, axs = _new_figure(ctx, len(exps), sharey=bool(ctx.opt("sharey", True)))
    s = ctx.opt("s", 1000)
    logx = ctx.opt("xscale", "log") == "log"
    logy = ctx.opt("yscale", "log") == "log"
    for ax, exp in zip(axs, exps):
        df = ctx.rows(exp, "pct")
        if df.height == 0:
            _no_data(ax, f"no pct rows for {exp}")
            continue
        scale = ctx.pct_scale(df)
        ts = _ts(df, ctx)
        colors = _t_colors(ts, ctx.opt("cmap", "viridis"))
        xmax_seen = 0.0
        for t in ts:
            agg = _over_seeds(_t_filter(df, t))
            x = agg.get_column("step").to_numpy()
            y = agg.get_column("mean").to_numpy() * scale
            ys = ema(x, y, s)
            se_tab = bands.pct_se_by_seed(ctx.rows(exp, "pct_se"), t)  # ±1 SE around raw
            lo, hi = bands.band_edges(x, y, bands.se_at(se_tab, x) * scale, None)
            xx, (yr, ysm, lo, hi) = _clip(x, [y, ys, lo, hi], ctx, logx=logx, logy=logy)
            ax.plot(xx, yr, color=colors[t], alpha=0.25, lw=0.8)
            ax.plot(xx, ysm, color=colors[t], lw=1.6, label=_t_label(t))
            banded = bands.fill_band(ax, xx, yr, lo, hi, colors[t], logy=logy, alpha=0.1)
            if banded and t == ts[-1]:
                ax.text(0.99, 0.01, bands.BAND_NOTE + " (raw curve)", transform=ax.transAxes,
                        ha="right", va="bottom", fontsize=7, color="0.35")  # fmt: skip
            if xx.size:
                xmax_seen = max(xmax_seen, float(xx.max()))
        shade = ctx.style.get("shade_after")
        if shade is not None and xmax_seen > shade:
            ax.axvspan(
                shade,
                xmax_seen,
                color="0.5",
                alpha=0.12,
                lw=0,
                label=f"{ctx.opt('shade_label', 'overfitting')} (> {_fmt_step(shade)} steps)",
            )
        _apply_axes(ax, ctx, xscale="log", yscale="log", xlabel=STEP_LABEL, ylabel=PCT_LABEL)
        ax.set_title(ctx.label(exp))
        _annotate(ax, ctx, ctx.steps_per_epoch(exp))
    _legend(axs[0], ctx, ncols=2, title=f"EMA (s = {s:g}) over raw", title_fontsize=8)
    _title(fig, ctx, "Equivariance share of loss per flow time t")
    return fig


@register_kind("final_pct_per_t")
def final_pct_per_t(ctx: FigureContext) -> Figure:
    """Bar chart of the final pct per flow time t, grouped bars per experiment (seed mean,
    error bar = range over seeds).

    Style: ``last_n`` (average the last n evaluations, 1), ``yscale`` (linear), ``values``
    (print bar values; true), common keys.
    """
    exps = ctx.experiments
    fig, (ax,) = _new_figure(ctx)
    n_last = int(ctx.opt("last_n", 1))
    data: dict[str, dict] = {}
    all_ts: set = set()
    for exp in exps:
        df = ctx.rows(exp, "pct")
        if df.height == 0:
            _no_data(ax, f"no pct rows for {exp}")
            continue
        scale = ctx.pct_scale(df)
        per_t = {}
        for t in _ts(df, ctx):
            finals = []
            for _, _x, y in _seed_curves(_t_filter(df, t)):
                finals.append(float(np.nanmean(y[-n_last:])) * scale)
            per_t[t] = (float(np.mean(finals)), min(finals), max(finals), len(finals))
        data[exp] = per_t
        all_ts |= set(per_t)
    ts = sorted(all_ts, key=lambda t: -1.0 if t is None else t)
    width = 0.8 / max(1, len(data))
    xs = np.arange(len(ts))
    by_t = len(data) == 1  # a single experiment: colour the bars by t as in pct_per_t
    t_colors = _t_colors(ts, ctx.opt("cmap", "viridis"))
    any_multi = False
    for i, (exp, per_t) in enumerate(data.items()):
        vals = np.array([per_t.get(t, (np.nan,) * 4)[0] for t in ts])
        lo = np.array([per_t.get(t, (np.nan,) * 4)[1] for t in ts])
        hi = np.array([per_t.get(t, (np.nan,) * 4)[2] for t in ts])
        pos = xs - 0.4 + width * (i + 0.5)
        multi = any(v[3] > 1 for v in per_t.values())
        any_multi |= multi
        yerr = np.vstack([vals - lo, hi - vals]) if multi else None
        bars = ax.bar(
            pos,
            vals,
            width * 0.92,
            color=[t_colors[t] for t in ts] if by_t else ctx.color(exp, i),
            label=None if by_t else ctx.label(exp),
            yerr=yerr,
            capsize=3 if multi else 0,
            ecolor="0.3",
        )
        if ctx.opt("values", True):
            ax.bar_label(
                bars,
                labels=[_fmt_value(v) for v in vals],
                fontsize=7.5,
                padding=2,
            )
    _apply_axes(
        ax,
        ctx,
        xscale="linear",
        yscale="linear",
        xlabel="Flow time t",
        ylabel="Final " + PCT_LABEL[0].lower() + PCT_LABEL[1:],
    )
    ax.set_xticks(xs, [_t_label(t) for t in ts])  # after the scale: set_xscale resets ticks
    ax.grid(axis="x", visible=False)
    if any_multi:
        ax.text(
            0.01,
            0.99,
            "error bars: range over seeds",
            transform=ax.transAxes,
            ha="left",
            va="top",
            fontsize=8,
            color="0.3",
        )
    if by_t:
        ax.set_title(ctx.label(next(iter(data))))
    else:
        _legend(ax, ctx)
    last = max(_last_steps(ctx, exps), default=None)
    _title(
        fig,
        ctx,
        "Final equivariance share per flow time" + (f" (step {_fmt_step(last)})" if last else ""),
    )
    return fig


def _last_steps(ctx: FigureContext, exps: list[str]) -> list[int]:
    out = []
    for e in exps:
        df = ctx.rows(e, "pct")
        if df.height:
            out.append(int(df.get_column("step").max()))
    return out


@register_kind("loss_curves_per_t")
def loss_curves_per_t(ctx: FigureContext) -> Figure:
    """Total / twirled / equivariance error per flow time t (log-log, seed mean).

    Style: ``layout`` ("by_metric": one row per experiment, one panel per quantity, one
    colour per t; "by_t": one panel per (experiment, t) with the three quantities),
    ``smooth`` (EMA scale; default raw), ``cmap``, ``ncols`` (by_t; 4), common keys.
    """
    exps = ctx.experiments
    layout = ctx.opt("layout", "by_metric")
    logx = ctx.opt("xscale", "log") == "log"
    logy = ctx.opt("yscale", "log") == "log"
    field_name = ctx.primary_field(exps[0]) if exps else None
    if layout == "by_t":
        panels = []
        for exp in exps:
            ts = _ts(ctx.rows(exp, "total"), ctx)
            panels += [(exp, t) for t in ts] or [(exp, None)]
        ncols = min(len(panels), int(ctx.opt("ncols", 4)))
        fig, axs = _new_figure(ctx, len(panels), ncols=ncols, sharey=True)
        for ax, (exp, t) in zip(axs, panels):
            if not _decomp_lines(ctx, ax, exp, t=t, logx=logx, logy=logy):
                _no_data(ax, f"no decomposition rows for {exp}")
            _apply_axes(
                ax,
                ctx,
                xscale="log",
                yscale="log",
                xlabel=STEP_LABEL,
                ylabel=f"Squared error per element ({ctx.unit(exp) or '?'})",
            )
            ax.set_title(f"{ctx.label(exp)}, {_t_label(t)}" if len(exps) > 1 else _t_label(t))
        unit = ctx.unit(exps[0])
        _outer_labels(
            axs, ncols, STEP_LABEL, "Squared error per element" + (f" ({unit})" if unit else "")
        )
        _legend(axs[0], ctx)
    elif layout == "by_metric":
        metrics = ("total", "mean", "equiv_unbiased")
        fig = Figure(
            figsize=tuple(ctx.opt("figsize", (13.5, 3.6 * len(exps) + 0.5))), layout="constrained"
        )
        axs = fig.subplots(len(exps), 3, squeeze=False, sharex=True)
        s = ctx.style.get("smooth")
        for r, exp in enumerate(exps):
            unit = ctx.unit(exp)
            for c, metric in enumerate(metrics):
                ax = axs[r, c]
                df = ctx.rows(exp, metric)
                if df.height == 0:
                    _no_data(ax, f"no {metric} rows for {exp}")
                    continue
                ts = _ts(df, ctx)
                colors = _t_colors(ts, ctx.opt("cmap", "viridis"))
                for t in ts:
                    agg = _over_seeds(_t_filter(df, t))
                    x = agg.get_column("step").to_numpy()
                    y = ema(x, agg.get_column("mean").to_numpy(), s)
                    x, (y,) = _clip(x, [y], ctx, logx=logx, logy=logy)
                    ax.plot(x, y, color=colors[t], label=_t_label(t))
                _apply_axes(
                    ax,
                    ctx,
                    xscale="log",
                    yscale="log",
                    xlabel=STEP_LABEL if r == len(exps) - 1 else None,
                    ylabel=_row_label(ctx, exp, unit, multi=len(exps) > 1) if c == 0 else None,
                )
                if r == 0:
                    ax.set_title(METRIC_LABELS[metric])
        _legend(axs[0, -1], ctx, ncols=2)
    else:
        raise ValueError(
            f"loss_curves_per_t: style layout must be 'by_metric' or 'by_t', got {layout!r}"
        )
    _title(
        fig, ctx, "Loss decomposition per flow time t" + (f" ({field_name})" if field_name else "")
    )
    return fig


# --------------------------------------------------------------------------- gradients, head


def _ratio_rows(ctx: FigureContext, exp: str) -> pl.DataFrame:
    r = ctx.rows(exp, "grad_ratio")
    if r.height:
        return r
    a, b = ctx.rows(exp, "grad_norm_equiv"), ctx.rows(exp, "grad_norm_mean")
    if a.height == 0 or b.height == 0:
        return a.clear()
    keys = ["seed", "step", "t"]
    j = a.join(
        b.select(*keys, pl.col("value").alias("den")), on=keys, how="inner", nulls_equal=True
    )
    return j.with_columns((pl.col("value") / (pl.col("den") + 1e-8)).alias("value")).drop("den")


def _colored_trajectory(ax, x, y, steps, norm, cmap="plasma", lw=2.0):
    pts = np.column_stack([x, y]).reshape(-1, 1, 2)
    segs = np.concatenate([pts[:-1], pts[1:]], axis=1)
    lc = LineCollection(segs, cmap=cmap, norm=norm, linewidths=lw)
    lc.set_array(0.5 * (steps[:-1] + steps[1:]))
    ax.add_collection(lc)
    return lc


def _step_norm(steps: np.ndarray):
    pos = steps[steps > 0]
    if pos.size and pos.max() / pos.min() > 20:
        return LogNorm(vmin=pos.min(), vmax=pos.max())
    return Normalize(
        vmin=float(steps.min()) if steps.size else 0, vmax=float(steps.max()) if steps.size else 1
    )


@register_kind("grad_ratio")
def grad_ratio(ctx: FigureContext) -> Figure:
    """log pct vs log gradient-norm ratio ||grad E_unb|| / ||grad M||: grey scatter of the
    evaluations, EMA trajectory coloured by step, Pearson and Spearman of the logs
    annotated; one panel per experiment and (flow matching) per t.

    Style: ``s`` (EMA scale, 100), ``cmap`` ("plasma"), ``ncols`` (4), ``t`` (a list of flow
    times to show; default all), common keys.
    """
    exps = ctx.experiments
    s = ctx.opt("s", 100)
    panels = []
    for exp in exps:
        pct = ctx.rows(exp, "pct")
        ratio = _ratio_rows(ctx, exp)
        keys = ["seed", "step", "t"]
        j = (
            pct.select(*keys, pl.col("value").alias("pct"), "unit").join(
                ratio.select(*keys, pl.col("value").alias("ratio")),
                on=keys,
                how="inner",
                nulls_equal=True,
            )
            if pct.height and ratio.height
            else None
        )
        if j is None or j.height == 0:
            panels.append((exp, None, None))
            continue
        for t in _ts(j, ctx):
            panels.append((exp, t, _t_filter(j, t)))
    ncols = min(len(panels), int(ctx.opt("ncols", 4)))
    fig, axs = _new_figure(ctx, len(panels), ncols=ncols)
    all_steps = np.concatenate(
        [p[2].get_column("step").to_numpy() for p in panels if p[2] is not None] or [np.zeros(1)]
    )
    norm = _step_norm(all_steps.astype(float))
    lc = None
    for ax, (exp, t, j) in zip(axs, panels):
        if j is None:
            _no_data(ax, f"no pct / gradient-norm rows for {exp}")
            continue
        scale = pct_scale(j.get_column("unit").unique().to_list())
        ax.scatter(
            j.get_column("ratio").to_numpy(),
            j.get_column("pct").to_numpy() * scale,
            s=10,
            color="0.6",
            alpha=0.45,
            lw=0,
            label="evaluations",
        )
        for (_seed,), g in j.group_by("seed"):
            g = g.sort("step")
            st = g.get_column("step").to_numpy().astype(float)
            xs = ema(st, g.get_column("ratio").to_numpy(), s, log=True)
            ys = ema(st, g.get_column("pct").to_numpy() * scale, s, log=True)
            ok = np.isfinite(xs) & np.isfinite(ys)
            if ok.sum() >= 2:
                lc = _colored_trajectory(
                    ax, xs[ok], ys[ok], st[ok], norm, cmap=ctx.opt("cmap", "plasma")
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.autoscale_view()
        _corr_box(
            ax,
            _corr_text(j.get_column("ratio").to_numpy(), j.get_column("pct").to_numpy()),
            loc=ctx.opt("corr_loc", "upper left"),
        )
        title = (
            ctx.label(exp)
            if t is None
            else (f"{ctx.label(exp)}, {_t_label(t)}" if len(exps) > 1 else _t_label(t))
        )
        ax.set_title(title)
    _outer_labels(
        axs, ncols, r"Gradient-norm ratio $\|\nabla E_{unb}\| \,/\, \|\nabla M\|$", PCT_LABEL
    )
    if lc is not None:
        fig.colorbar(lc, ax=axs, label=f"{STEP_LABEL} (EMA trajectory, s = {s:g})", shrink=0.9)
    _title(fig, ctx, "Equivariance share vs gradient-norm ratio")
    return fig


@register_kind("head_deviation")
def head_deviation(ctx: FigureContext) -> Figure:
    """Linear-head deviation ||W - 1 wbar^T||_F^2 / (3H): (left) vs step, raw faint + EMA;
    (right) vs the unbiased equivariance error of the primary field (log-log, coloured by
    step) with Pearson and Spearman of the logs annotated.

    Style: ``s`` (EMA scale, 1000), ``yscale_step`` ("linear"; the left panel's y axis),
    ``cmap`` ("plasma"), ``hlines`` (e.g. the Xavier-init reference), common keys.
    """
    exps = ctx.experiments
    fig = Figure(figsize=tuple(ctx.opt("figsize", (11.5, 4.3))), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    s = ctx.opt("s", 1000)
    all_x, all_y, sc = [], [], None
    pairs = []
    for i, exp in enumerate(exps):
        hd = ctx.rows(exp, "head_deviation")
        if hd.height == 0:
            _no_data(ax1, f"no head_deviation rows for {exp}")
            continue
        color = ctx.color(exp, i)
        agg = _over_seeds(hd)
        x = agg.get_column("step").to_numpy()
        y = agg.get_column("mean").to_numpy()
        ysm = ema(x, y, s)
        xx, (yr, ys) = _clip(x, [y, ysm], ctx, logx=True, logy=False)
        ax1.plot(xx, yr, color=color, alpha=0.3, lw=0.8)
        ax1.plot(xx, ys, color=color, label=f"{ctx.label(exp)} (EMA, s = {s:g})")
        eq = ctx.rows(exp, "equiv_unbiased")
        if eq.height and eq.get_column("t").null_count() < eq.height:
            eq = eq.group_by("seed", "step").agg(pl.col("value").mean())
        keys = ["seed", "step"]
        j = (
            hd.group_by(keys)
            .agg(pl.col("value").mean().alias("hd"))
            .join(eq.group_by(keys).agg(pl.col("value").mean().alias("eq")), on=keys, how="inner")
            .sort("step")
            if eq.height
            else None
        )
        if j is not None and j.height:
            pairs.append((exp, j))
            all_x.append(j.get_column("eq").to_numpy())
            all_y.append(j.get_column("hd").to_numpy())
    ax1.set_xscale("log")
    ax1.set_yscale(ctx.opt("yscale_step", "linear"))
    ax1.set_xlabel(STEP_LABEL)
    ax1.set_ylabel(r"Head deviation $\|W - \mathbf{1}\bar w^\top\|_F^2 / 3H$")
    ax1.set_title("Head deviation during training")
    for h in ctx.style.get("hlines") or []:
        ax1.axhline(h["y"], color=h.get("color", "0.4"), ls=":", lw=1.0, label=h.get("label"))
    _legend(ax1, ctx)
    if pairs:
        steps = np.concatenate([j.get_column("step").to_numpy() for _, j in pairs]).astype(float)
        norm = _step_norm(steps)
        markers = ("o", "s", "^", "D")
        for k, (exp, j) in enumerate(pairs):
            sc = ax2.scatter(
                j.get_column("eq").to_numpy(),
                j.get_column("hd").to_numpy(),
                c=j.get_column("step").to_numpy(),
                cmap=ctx.opt("cmap", "plasma"),
                norm=norm,
                s=14,
                marker=markers[k % 4],
                label=ctx.label(exp) if len(pairs) > 1 else None,
            )
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        _corr_box(ax2, _corr_text(np.concatenate(all_x), np.concatenate(all_y)), loc="upper left")
        fig.colorbar(sc, ax=ax2, label=STEP_LABEL)
        if len(pairs) > 1:
            ax2.legend(loc="lower right")
    else:
        _no_data(ax2, "no equivariance-error rows to pair with head deviation")
    unit = ctx.unit(exps[0], "equiv_unbiased") if exps else None
    ax2.set_xlabel(r"Equivariance error $E_{unb}$" + (f" ({unit})" if unit else ""))
    ax2.set_ylabel("Head deviation")
    ax2.set_title("Head deviation vs equivariance error")
    _title(fig, ctx, "Force-head deviation from an equivariant head")
    return fig


# --------------------------------------------------------------------------- entry point


def build_figure(
    spec: dict,
    metrics: pl.DataFrame,
    runs: dict[str, dict],
    extra: dict[str, Path] | None = None,
) -> Figure:
    """Draw ``spec`` and return the Figure without writing files (under the module's rc)."""
    kind = spec.get("kind")
    if kind not in KINDS:
        _load_plugins()
    if kind not in KINDS:
        raise ValueError(f"unknown figure kind {kind!r}; known kinds: {sorted(KINDS)}")
    ctx = FigureContext(spec=spec, metrics=metrics, runs=runs or {}, extra=dict(extra or {}))
    with matplotlib.rc_context(RC):
        return KINDS[kind](ctx)


def make_figure(
    spec: dict,
    metrics: pl.DataFrame,
    runs: dict[str, dict],
    out_prefix: Path,
    extra: dict[str, Path] | None = None,
) -> Figure:
    """Render ``spec`` to ``<out_prefix>.png/.pdf/.svg``; returns the Figure."""
    fig = build_figure(spec, metrics, runs, extra)
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context(RC):
        for i, fmt in enumerate(FORMATS):
            fig.savefig(out_prefix.with_name(f"{out_prefix.name}.{fmt}"), format=fmt)
            if i == 0:
                # Constrained layout has placed everything; keep those positions for the
                # other formats instead of solving the layout again (the costly part).
                fig.set_layout_engine("none")
    return fig
