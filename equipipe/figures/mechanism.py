"""Figure kinds of the mechanism: what drives the equivariance error down during training.

``grad_ratio``: the equivariance share against the gradient-norm ratio ||grad E_unb|| /
||grad M||; ``head_deviation``: the linear force head's distance from an equivariant head,
against step and against the equivariance error. Both annotate Pearson and Spearman
correlations of the logs.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from matplotlib.collections import LineCollection
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from equipipe.collect import pct_scale
from equipipe.figures.data import FigureContext, flow_times, over_seeds, t_filter
from equipipe.figures.registry import register_kind
from equipipe.figures.style import (
    PCT_LABEL,
    STEP_LABEL,
    add_legend,
    add_title,
    clip_to_axes,
    mark_no_data,
    new_figure,
    outer_labels,
    t_label,
)
from equipipe.smoothing import ema

# --------------------------------------------------------------------------- helpers


def _corr_text(x: np.ndarray, y: np.ndarray) -> str:
    """Pearson and Spearman correlations of log10 x and log10 y."""
    from scipy import stats  # 0.7 s to import: only the figures that annotate correlations

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


# --------------------------------------------------------------------------- kinds


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
        if j is not None:  # a fixed drawing order: the same PNG from the same table
            j = j.sort(keys, nulls_last=False)
        if j is None or j.height == 0:
            panels.append((exp, None, None))
            continue
        for t in flow_times(j, ctx):
            panels.append((exp, t, t_filter(j, t)))
    ncols = min(len(panels), int(ctx.opt("ncols", 4)))
    fig, axs = new_figure(ctx, len(panels), ncols=ncols)
    all_steps = np.concatenate(
        [p[2].get_column("step").to_numpy() for p in panels if p[2] is not None] or [np.zeros(1)]
    )
    norm = _step_norm(all_steps.astype(float))
    lc = None
    for ax, (exp, t, j) in zip(axs, panels):
        if j is None:
            mark_no_data(ax, f"no pct / gradient-norm rows for {exp}")
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
        for (_seed,), g in j.group_by("seed", maintain_order=True):
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
            else (f"{ctx.label(exp)}, {t_label(t)}" if len(exps) > 1 else t_label(t))
        )
        ax.set_title(title)
    outer_labels(
        axs, ncols, r"Gradient-norm ratio $\|\nabla E_{unb}\| \,/\, \|\nabla M\|$", PCT_LABEL
    )
    if lc is not None:
        fig.colorbar(lc, ax=axs, label=f"{STEP_LABEL} (EMA trajectory, s = {s:g})", shrink=0.9)
    add_title(fig, ctx, "Equivariance share vs gradient-norm ratio")
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
            mark_no_data(ax1, f"no head_deviation rows for {exp}")
            continue
        color = ctx.color(exp, i)
        agg = over_seeds(hd)
        x = agg.get_column("step").to_numpy()
        y = agg.get_column("mean").to_numpy()
        ysm = ema(x, y, s)
        xx, (yr, ys) = clip_to_axes(x, [y, ysm], ctx, logx=True, logy=False)
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
            .sort("step", "seed")
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
    add_legend(ax1, ctx)
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
        mark_no_data(ax2, "no equivariance-error rows to pair with head deviation")
    unit = ctx.unit(exps[0], "equiv_unbiased") if exps else None
    ax2.set_xlabel(r"Equivariance error $E_{unb}$" + (f" ({unit})" if unit else ""))
    ax2.set_ylabel("Head deviation")
    ax2.set_title("Head deviation vs equivariance error")
    add_title(fig, ctx, "Force-head deviation from an equivariant head")
    return fig
