"""Figure kinds of learning curves: the equivariance share (pct) and the loss decomposition.

``pct_vs_step``, ``pct_by`` (pct against step), ``pct_per_t``, ``final_pct_per_t`` (flow
matching, per flow time t), ``loss_curves`` and ``loss_curves_per_t`` (total T, twirled error M
and unbiased equivariance error E_unb; both draw their panels with ``decomposition_panels``).
Style keys of each kind are in its docstring; the common ones in ``equipipe.figures.style``.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from equipipe.figures import bands
from equipipe.figures.data import FigureContext, flow_times, over_seeds, seed_curves, t_filter
from equipipe.figures.registry import register_kind
from equipipe.figures.style import (
    LINESTYLES,
    METRIC_COLORS,
    METRIC_LABELS,
    PALETTE,
    PCT_LABEL,
    SPLIT_LABELS,
    STEP_LABEL,
    add_annotations,
    add_legend,
    add_title,
    apply_axes,
    clip_to_axes,
    fmt_step,
    fmt_value,
    mark_epochs,
    mark_no_data,
    new_figure,
    outer_labels,
    room_below,
    t_colors,
    t_label,
)
from equipipe.smoothing import dip as find_dip
from equipipe.smoothing import ema

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
            # several splits: an experiment without one gets a note in the panel, not another split
            missing = "empty" if len(splits) > 1 else "error"
            df = ctx.rows(exp, "pct", split=split, missing=missing)
            t_sel = ctx.style.get("t")
            if df.height and t_sel is not None:
                df = t_filter(df, t_sel)
            elif df.height and df.get_column("t").null_count() < df.height:
                df = df.filter(pl.col("t").is_not_null())
                if df.get_column("t").n_unique() > 1:
                    # several flow times: average them (use style t to pick one)
                    df = df.group_by("seed", "step").agg(
                        pl.col("value").mean(), pl.col("unit").first()
                    )
            if df.height == 0:
                mark_no_data(ax, f"no pct rows for {exp} / {split}")
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
            se_rows = ctx.rows(exp, "pct_se", split=split, missing="empty")
            se_tab = bands.pct_se_by_seed(se_rows, t_sel)  # ±1 SE band (figures.bands)
            if group == "seed":
                for k, (seed, x, y) in enumerate(seed_curves(df)):
                    se = bands.se_at(se_tab, x, seed) * scale
                    lo, hi = bands.band_edges(x, y * scale, se, s)
                    y = ema(x, y * scale, s)
                    x, (y, lo, hi) = clip_to_axes(x, [y, lo, hi], ctx, logx=logx, logy=logy)
                    color = PALETTE[k % len(PALETTE)]
                    ax.plot(x, y, color=color, ls=ls, label=f"{name} · seed {seed}")
                    band_drawn |= bands.fill_band(ax, x, y, lo, hi, color, logy=logy)
                agg = over_seeds(df)
            else:
                agg = over_seeds(df)
                x = agg.get_column("step").to_numpy()
                se = bands.se_at(se_tab, x) * scale
                slo, shi = bands.band_edges(x, agg.get_column("mean").to_numpy() * scale, se, s)
                y, lo, hi = (
                    ema(x, agg.get_column(c).to_numpy() * scale, s) for c in ("mean", "lo", "hi")
                )
                x, (y, lo, hi, slo, shi) = clip_to_axes(
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
                fl = ctx.rows(exp, "floor_share", split=split, missing="empty")
                if fl.height:
                    fa = over_seeds(fl)
                    fx, fy = (
                        fa.get_column("step").to_numpy(),
                        fa.get_column("mean").to_numpy() * ctx.pct_scale(fl),
                    )
                    fcol = "0.45" if len(exps) == 1 else ctx.color(exp, i)
                    flab = "resampling floor" + (f" · {ctx.label(exp)}" if len(exps) > 1 else "")
                    if fx.size == 1:
                        ax.axhline(fy[0], color=fcol, ls=(0, (1, 1.5)), lw=1.2, label=flab)
                    else:
                        fx, (fy,) = clip_to_axes(fx, [fy], ctx, logx=logx, logy=logy)
                        ax.plot(fx, fy, color=fcol, ls=(0, (1, 1.5)), lw=1.2, label=flab)
    if band_drawn:
        ax.text(0.99, 0.01, bands.BAND_NOTE, transform=ax.transAxes, ha="right", va="bottom",
                fontsize=7.5, color="0.35")  # fmt: skip
    if dips and ctx.style.get("ymin") is None:
        room_below(ax, min(d[1] for d in dips), frac=0.05 + 0.05 * len(dips), log=logy)
    for k, (dstep, dval, color) in enumerate(dips):
        ax.annotate(
            f"Dip at {fmt_step(dstep)}",
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
    fig, (ax,) = new_figure(ctx)
    logx = ctx.opt("xscale", xscale) == "log"
    logy = ctx.opt("yscale", yscale) == "log"
    ax.set_xscale("log" if logx else "linear")
    ax.set_yscale("log" if logy else "linear")
    exps = _plot_pct(ctx, ax, group=group, mark_dip=mark_dip, logx=logx, logy=logy)
    apply_axes(ax, ctx, xscale=xscale, yscale=yscale, xlabel=STEP_LABEL, ylabel=PCT_LABEL)
    mark_epochs(ax, ctx, exps)
    add_annotations(ax, ctx, ctx.steps_per_epoch(exps[0]) if exps else None)
    add_legend(ax, ctx)
    field_name = ctx.primary_field(exps[0]) if exps else None
    add_title(fig, ctx, title + (f" ({field_name})" if field_name else ""))
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


# --------------------------------------------------------------------------- loss decomposition


def _se_rows(ctx: FigureContext, exp: str, metric: str) -> tuple[pl.DataFrame, float]:
    """Standard-error rows for a decomposition metric, and the factor to apply to them."""
    if metric == "equiv_unbiased":
        se = ctx.rows(exp, "equiv_unbiased_se", missing="empty")
        if se.height:
            return se, 1.0
        se = ctx.rows(exp, "equiv_se", missing="empty")
        k = ctx.rows(exp, "k", missing="empty")
        kval = float(k.get_column("value").median()) if k.height else None
        return se, (kval / (kval - 1.0) if kval and kval > 1 else 1.0)
    return ctx.rows(exp, f"{metric}_se", missing="empty"), 1.0


def _decomp_lines(ctx, ax, exp, *, t=None, logx=True, logy=True):
    """Draw T, M, E_unb of one experiment (optionally one t) on ax; seeds averaged."""
    drawn = False
    for metric in ("total", "mean", "equiv_unbiased"):
        df = ctx.rows(exp, metric)
        if df.height and t is not None:
            df = t_filter(df, t)
        elif df.height and 0 < df.get_column("t").null_count() < df.height:
            df = t_filter(df, None)  # field-level rows beside per-t rows: use those
        if df.height == 0:
            continue
        agg = over_seeds(df)
        x = agg.get_column("step").to_numpy()
        y = agg.get_column("mean").to_numpy()
        nseeds = int(agg.get_column("n").max())
        se_df, factor = _se_rows(ctx, exp, metric)
        if se_df.height and t is not None:
            se_df = t_filter(se_df, t)
        elif se_df.height and 0 < se_df.get_column("t").null_count() < se_df.height:
            se_df = t_filter(se_df, None)
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
        x, ys = clip_to_axes(x, ys, ctx, logx=logx, logy=logy)
        color = METRIC_COLORS[metric]
        ls = {"total": "-", "mean": "--", "equiv_unbiased": "-"}[metric]
        ax.plot(x, ys[0], color=color, ls=ls, label=METRIC_LABELS[metric])
        if lo is not None:
            lo_, hi_ = ys[1], ys[2]
            if logy:
                lo_ = np.where(lo_ > 0, lo_, ys[0] * 1e-3)
            ax.fill_between(x, lo_, hi_, color=color, alpha=0.18, lw=0)
        drawn = True
    return drawn


def _se_note(ctx: FigureContext, exps: list[str]) -> str:
    has_se = any(ctx.rows(e, "total_se", missing="empty").height for e in exps)
    return "shaded: ±2 standard errors" if has_se else "shaded: range over seeds"


def _error_label(unit: str | None) -> str:
    return "Squared error per element" + (f" ({unit})" if unit else "")


def decomposition_panels(ctx: FigureContext, panels: list, titles: list[str], *, ncols=None,
                         sharey: bool = True):  # fmt: skip
    """One panel per ``(experiment, t)`` of ``panels``: total T, twirled error M and unbiased
    equivariance error E_unb against step (seed mean; ±2 standard errors shaded where ``*_se``
    rows exist, else the range over seeds). Serves ``loss_curves`` (one panel per experiment)
    and ``loss_curves_per_t`` with layout "by_t" (one per experiment and t).

    Returns ``(fig, axes)``, one axes per panel.
    """
    fig, axs = new_figure(ctx, len(panels), ncols=ncols, sharey=sharey)
    logx = ctx.opt("xscale", "log") == "log"
    logy = ctx.opt("yscale", "log") == "log"
    for ax, (exp, t), title in zip(axs, panels, titles):
        if not _decomp_lines(ctx, ax, exp, t=t, logx=logx, logy=logy):
            mark_no_data(ax, f"no decomposition rows for {exp}")
        ylabel = _error_label(ctx.unit(exp))
        apply_axes(ax, ctx, xscale="log", yscale="log", xlabel=STEP_LABEL, ylabel=ylabel)
        ax.set_title(title)
    return fig, axs


@register_kind("loss_curves")
def loss_curves(ctx: FigureContext) -> Figure:
    """Total T, raw twirled error M and unbiased equivariance error E_unb vs step, per panel
    one experiment (log-log), primary field, ±2 standard errors shaded where ``*_se`` exist.

    Style: ``ncols`` (3), ``sharey`` (true), ``smooth`` (EMA scale; default raw),
    ``t`` (flow time; default: field-level rows, else mean over t), common keys.
    """
    exps = ctx.experiments
    t = ctx.style.get("t")
    fig, axs = decomposition_panels(
        ctx,
        [(exp, t) for exp in exps],
        [ctx.label(exp) for exp in exps],
        sharey=bool(ctx.opt("sharey", True)),
    )
    for ax, exp in zip(axs, exps):
        add_annotations(ax, ctx, ctx.steps_per_epoch(exp))
    add_legend(axs[0], ctx, title=_se_note(ctx, exps), title_fontsize=8)
    field_name = ctx.primary_field(exps[0]) if exps else None
    add_title(
        fig, ctx, "Loss decomposition on held-out data" + (f" ({field_name})" if field_name else "")
    )
    return fig


def _row_label(ctx: FigureContext, exp: str, unit: str | None, *, multi: bool) -> str:
    return f"{ctx.label(exp)}\n{_error_label(unit)}" if multi else _error_label(unit)


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
            ts = flow_times(ctx.rows(exp, "total"), ctx)
            panels += [(exp, t) for t in ts] or [(exp, None)]
        ncols = min(len(panels), int(ctx.opt("ncols", 4)))
        titles = [
            f"{ctx.label(exp)}, {t_label(t)}" if len(exps) > 1 else t_label(t) for exp, t in panels
        ]
        fig, axs = decomposition_panels(ctx, panels, titles, ncols=ncols)
        outer_labels(axs, ncols, STEP_LABEL, _error_label(ctx.unit(exps[0])))
        add_legend(axs[0], ctx)
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
                    mark_no_data(ax, f"no {metric} rows for {exp}")
                    continue
                ts = flow_times(df, ctx)
                colors = t_colors(ts, ctx.opt("cmap", "viridis"))
                for t in ts:
                    agg = over_seeds(t_filter(df, t))
                    x = agg.get_column("step").to_numpy()
                    y = ema(x, agg.get_column("mean").to_numpy(), s)
                    x, (y,) = clip_to_axes(x, [y], ctx, logx=logx, logy=logy)
                    ax.plot(x, y, color=colors[t], label=t_label(t))
                apply_axes(
                    ax,
                    ctx,
                    xscale="log",
                    yscale="log",
                    xlabel=STEP_LABEL if r == len(exps) - 1 else None,
                    ylabel=_row_label(ctx, exp, unit, multi=len(exps) > 1) if c == 0 else None,
                )
                if r == 0:
                    ax.set_title(METRIC_LABELS[metric])
        add_legend(axs[0, -1], ctx, ncols=2)
    else:
        raise ValueError(
            f"loss_curves_per_t: style layout must be 'by_metric' or 'by_t', got {layout!r}"
        )
    add_title(
        fig, ctx, "Loss decomposition per flow time t" + (f" ({field_name})" if field_name else "")
    )
    return fig


# --------------------------------------------------------------------------- per flow time


@register_kind("pct_per_t")
def pct_per_t(ctx: FigureContext) -> Figure:
    """Flow matching: pct vs step per flow time t (one colour each), EMA-smoothed (solid) over
    the faint raw curve, log-log, one panel per experiment (seed mean).

    Style: ``s`` (EMA scale, 1000), ``cmap`` ("viridis"), ``shade_after`` (step; shades the
    overfitted region after it), ``shade_label`` ("overfitting"), ``ncols``, ``sharey``
    (true), common keys.
    """
    exps = ctx.experiments
    fig, axs = new_figure(ctx, len(exps), sharey=bool(ctx.opt("sharey", True)))
    s = ctx.opt("s", 1000)
    logx = ctx.opt("xscale", "log") == "log"
    logy = ctx.opt("yscale", "log") == "log"
    for ax, exp in zip(axs, exps):
        df = ctx.rows(exp, "pct")
        if df.height == 0:
            mark_no_data(ax, f"no pct rows for {exp}")
            continue
        scale = ctx.pct_scale(df)
        ts = flow_times(df, ctx)
        colors = t_colors(ts, ctx.opt("cmap", "viridis"))
        xmax_seen = 0.0
        for t in ts:
            agg = over_seeds(t_filter(df, t))
            x = agg.get_column("step").to_numpy()
            y = agg.get_column("mean").to_numpy() * scale
            ys = ema(x, y, s)
            se_rows = ctx.rows(exp, "pct_se", missing="empty")
            se_tab = bands.pct_se_by_seed(se_rows, t)  # ±1 SE around raw
            lo, hi = bands.band_edges(x, y, bands.se_at(se_tab, x) * scale, None)
            xx, (yr, ysm, lo, hi) = clip_to_axes(x, [y, ys, lo, hi], ctx, logx=logx, logy=logy)
            ax.plot(xx, yr, color=colors[t], alpha=0.25, lw=0.8)
            ax.plot(xx, ysm, color=colors[t], lw=1.6, label=t_label(t))
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
                label=f"{ctx.opt('shade_label', 'overfitting')} (> {fmt_step(shade)} steps)",
            )
        apply_axes(ax, ctx, xscale="log", yscale="log", xlabel=STEP_LABEL, ylabel=PCT_LABEL)
        ax.set_title(ctx.label(exp))
        add_annotations(ax, ctx, ctx.steps_per_epoch(exp))
    add_legend(axs[0], ctx, ncols=2, title=f"EMA (s = {s:g}) over raw", title_fontsize=8)
    add_title(fig, ctx, "Equivariance share of loss per flow time t")
    return fig


@register_kind("final_pct_per_t")
def final_pct_per_t(ctx: FigureContext) -> Figure:
    """Bar chart of the final pct per flow time t, grouped bars per experiment (seed mean,
    error bar = range over seeds).

    Style: ``last_n`` (average the last n evaluations, 1), ``yscale`` (linear), ``values``
    (print bar values; true), common keys.
    """
    exps = ctx.experiments
    fig, (ax,) = new_figure(ctx)
    n_last = int(ctx.opt("last_n", 1))
    data: dict[str, dict] = {}
    all_ts: set = set()
    for exp in exps:
        df = ctx.rows(exp, "pct")
        if df.height == 0:
            mark_no_data(ax, f"no pct rows for {exp}")
            continue
        scale = ctx.pct_scale(df)
        per_t = {}
        for t in flow_times(df, ctx):
            finals = []
            for _, _x, y in seed_curves(t_filter(df, t)):
                finals.append(float(np.nanmean(y[-n_last:])) * scale)
            per_t[t] = (float(np.mean(finals)), min(finals), max(finals), len(finals))
        data[exp] = per_t
        all_ts |= set(per_t)
    ts = sorted(all_ts, key=lambda t: -1.0 if t is None else t)
    width = 0.8 / max(1, len(data))
    xs = np.arange(len(ts))
    by_t = len(data) == 1  # a single experiment: colour the bars by t as in pct_per_t
    bar_colors = t_colors(ts, ctx.opt("cmap", "viridis"))
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
            color=[bar_colors[t] for t in ts] if by_t else ctx.color(exp, i),
            label=None if by_t else ctx.label(exp),
            yerr=yerr,
            capsize=3 if multi else 0,
            ecolor="0.3",
        )
        if ctx.opt("values", True):
            ax.bar_label(
                bars,
                labels=[fmt_value(v) for v in vals],
                fontsize=7.5,
                padding=2,
            )
    apply_axes(
        ax,
        ctx,
        xscale="linear",
        yscale="linear",
        xlabel="Flow time t",
        ylabel="Final " + PCT_LABEL[0].lower() + PCT_LABEL[1:],
    )
    ax.set_xticks(xs, [t_label(t) for t in ts])  # after the scale: set_xscale resets ticks
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
        add_legend(ax, ctx)
    last = max(_last_steps(ctx, exps), default=None)
    add_title(
        fig,
        ctx,
        "Final equivariance share per flow time" + (f" (step {fmt_step(last)})" if last else ""),
    )
    return fig


def _last_steps(ctx: FigureContext, exps: list[str]) -> list[int]:
    out = []
    for e in exps:
        df = ctx.rows(e, "pct")
        if df.height:
            out.append(int(df.get_column("step").max()))
    return out
