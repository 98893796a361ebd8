"""Figure kinds of the per-irrep spectrum (``equipipe.spectrum``): which ℓ carries the error.

``spectrum_by_ell`` (style keys: ``field``, ``split``, ``t`` (flow times to show; default all),
``xscale`` ("log"), ``ymin``, ``ncols``): per experiment (and flow time) the equivariance error's
power in each irrep against step, STACKED on a log axis: ℓ = 1..ℓmax in colour, the remainder
above ℓmax in grey (octahedral evaluation: A2, E, T1, T2), seed-averaged. The Monte-Carlo
estimates are unbiased but noisy (cross-talk between ℓ with K rotations per example): a band is
drawn only where it is resolved (more than 2 standard errors above zero); the rest of E_unb
(unresolved bands and the remainder above ℓmax) is the grey band, so the stack sums to E_unb,
drawn as the black line from the decomposition of the same evaluations. The octahedral
projections are exact and drawn as they are. A note names the resolved ℓ carrying most of the
error at the first and the last evaluation.

``layer_spectrum`` (style keys: ``t`` (one flow time, for tables logged per t; the probe pools
flow times, t null), ``split`` (default val; a layer probed in other splits only is an error
naming them), ``vmin`` (1e-4)): one heatmap per probed layer: evaluation step (columns) by ℓ
(rows, "rem" = above ℓmax), colour = share of the layer output's power, log colour scale; cells
whose share is below 3 standard errors (not resolved from zero) are marked ×. An experiment
without probed layers gets a note instead of zeros: the EScAIP-like backbone sees only
invariant geometry, so its layers are ℓ = 0 by construction.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import polars as pl
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from equipipe.figures.data import FigureContext, Missing, flow_times
from equipipe.figures.registry import register_kind
from equipipe.figures.style import (
    add_legend,
    add_title,
    apply_axes,
    mark_no_data,
    new_figure,
    t_label,
)

INVARIANT_BY_CONSTRUCTION = {
    "escaip": (
        "EScAIP-like backbone: it sees only distances, angles and atom types,\n"
        "so every hidden layer is invariant by construction (all power in ℓ = 0).\n"
        "No layer is probed; only the direct force head breaks equivariance."
    ),
}
OCT_ERROR = ("A2", "E", "T1", "T2")


def _ell_key(label: str) -> tuple[int, str]:
    return (int(label), "") if label.isdigit() else (99, label)


def _seed_mean(df: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    """Mean over seeds of ``value`` per ``by`` (+ step), sorted by step."""
    return (
        df.group_by("seed", *by, "step")
        .agg(pl.col("value").mean())
        .group_by(*by, "step")
        .agg(pl.col("value").mean())
        .sort("step")
    )


def _field_rows(
    ctx: FigureContext, exp: str, metric: str, missing: Missing = "error"
) -> pl.DataFrame:
    df = ctx.rows(exp, metric, missing=missing)
    return df if "ell" in df.columns else df.clear()


def _series(steps: np.ndarray, df: pl.DataFrame) -> np.ndarray:
    """``value`` of a one-curve frame at ``steps`` (linear interpolation)."""
    return np.interp(steps, df.get_column("step").to_numpy(), df.get_column("value").to_numpy())


def _dominant(parts: dict[str, np.ndarray], i: int) -> str:
    vals = {k: v[i] for k, v in parts.items() if np.isfinite(v[i])}
    return max(vals, key=vals.get) if vals else "?"


@register_kind("spectrum_by_ell")
def spectrum_by_ell(ctx: FigureContext) -> Figure:
    """Stacked per-irrep power of the equivariance error against step, per experiment and t."""
    panels = []
    for exp in ctx.experiments:
        power = _field_rows(ctx, exp, "spectrum_power")
        for t in flow_times(power, ctx) if power.height else [None]:
            panels.append((exp, t))
    fig, axs = new_figure(ctx, len(panels))
    logx = ctx.opt("xscale", "log") == "log"
    for ax, (exp, t) in zip(axs, panels):
        power = _field_rows(ctx, exp, "spectrum_power")
        title = ctx.label(exp) + (f", {t_label(t)}" if t is not None else "")
        ax.set_title(title)
        if power.height == 0:
            mark_no_data(ax, f"{exp}: no spectrum rows (eval.spectrum_every is 0)")
            continue
        sel = power.filter(pl.col("t").is_null() if t is None else pl.col("t") == t)
        rem = _field_rows(ctx, exp, "spectrum_remainder", missing="empty")
        rem = rem.filter(pl.col("t").is_null() if t is None else pl.col("t") == t)
        equiv = ctx.rows(exp, "equiv_unbiased", split=sel.get_column("split")[0])
        equiv = equiv.filter(pl.col("t").is_null() if t is None else pl.col("t") == t)
        labels = sorted(sel.get_column("ell").unique().to_list(), key=_ell_key)
        octa = set(labels) >= set(OCT_ERROR)
        error_labels = [lab for lab in labels if (lab in OCT_ERROR if octa else lab != "0")]
        mean = _seed_mean(sel, ["ell"])
        se_rows = _field_rows(ctx, exp, "spectrum_power_se", missing="empty")
        se_rows = se_rows.filter(pl.col("t").is_null() if t is None else pl.col("t") == t)
        n_seeds = max(sel.get_column("seed").n_unique(), 1)
        se_mean = _seed_mean(se_rows, ["ell"]) if se_rows.height else None
        steps = np.array(sorted(mean.get_column("step").unique().to_list()), dtype=float)

        parts: dict[str, np.ndarray] = {}
        total = np.zeros_like(steps)
        for lab in error_labels:
            v = _series(steps, mean.filter(pl.col("ell") == lab))
            total += v
            if not octa and se_mean is not None:  # Monte Carlo: keep bands resolved from zero
                se = _series(steps, se_mean.filter(pl.col("ell") == lab)) / np.sqrt(n_seeds)
                v = np.where(v > 2 * se, v, 0.0)
            parts[f"ℓ = {lab}" if lab.isdigit() else lab] = v
        if rem.height:
            total += _series(steps, _seed_mean(rem, []))
        rest = np.clip(total - sum(parts.values()), 0, None) if parts else total
        keep = steps > 0 if logx else np.ones_like(steps, dtype=bool)
        x = steps[keep]
        cmap = matplotlib.colormaps["viridis"]
        n = max(len(parts), 1)
        base = np.zeros_like(x)
        for i, (name, v) in enumerate(parts.items()):
            top = base + np.clip(v[keep], 0, None)
            color = cmap(0.1 + 0.8 * i / max(n - 1, 1))
            ax.fill_between(x, base, top, color=color, alpha=0.9, lw=0, label=name)
            base = top
        if not octa:
            top = base + rest[keep]
            ax.fill_between(x, base, top, color="0.78", alpha=0.9, lw=0,
                            label="unresolved (< 2 SE) and above ℓmax")  # fmt: skip
            base = top
        if equiv.height:
            e = _seed_mean(equiv, [])
            ex, ev = e.get_column("step").to_numpy(), e.get_column("value").to_numpy()
            ok = ex > 0 if logx else np.ones_like(ex, dtype=bool)
            ax.plot(ex[ok], ev[ok], color="black", lw=1.2, label="$E_{unb}$ (decomposition)")
        unit = sel.get_column("unit").drop_nulls()
        ylabel = "Equivariance error per element" + (f" ({unit[0]})" if len(unit) else "")
        apply_axes(ax, ctx, xscale="log", yscale="log", xlabel="Training step", ylabel=ylabel)
        top_vals = base[base > 0]
        if top_vals.size and ctx.style.get("ymin") is None:
            ax.set_ylim(bottom=max(top_vals.min() * 0.3, top_vals.max() * 1e-5))
        if len(steps) and parts and any(v.max() > 0 for v in parts.values()):
            first, last = _dominant(parts, 0), _dominant(parts, len(steps) - 1)
            ax.set_title(f"{title}\nlargest resolved: {first} at step {int(steps[0])}, "
                         f"{last} at step {int(steps[-1])}", fontsize=9)  # fmt: skip
        add_legend(ax, ctx, fontsize=7.5, ncols=2)
    add_title(fig, ctx, "Equivariance error by irreducible representation")
    return fig


@register_kind("layer_spectrum")
def layer_spectrum(ctx: FigureContext) -> Figure:
    """Heatmaps of each probed layer's share of feature power per ℓ against step."""
    panels: list[tuple[str, str | None]] = []
    for exp in ctx.experiments:
        df = ctx.metrics.filter((pl.col("experiment") == exp) & (pl.col("metric") == "layer_share"))
        layers = df.get_column("layer").unique(maintain_order=True).to_list() if df.height else []
        panels += [(exp, layer) for layer in layers] or [(exp, None)]
    fig, axs = new_figure(ctx, len(panels), ncols=int(ctx.opt("ncols", 2)))
    vmin = float(ctx.opt("vmin", 1e-4))
    norm = LogNorm(vmin=vmin, vmax=1.0)
    image = None
    for ax, (exp, layer) in zip(axs, panels):
        ax.grid(False)
        if layer is None:
            model = str(ctx.run_info(exp).get("model", ""))
            note = INVARIANT_BY_CONSTRUCTION.get(model, f"{exp}: no probed layers")
            ax.set_axis_off()
            ax.text(0.5, 0.5, f"{ctx.label(exp)}\n\n{note}", ha="center", va="center",
                    fontsize=9, transform=ax.transAxes, wrap=True)  # fmt: skip
            continue
        df = ctx.metrics.filter(
            (pl.col("experiment") == exp) & (pl.col("layer") == layer)
            & pl.col("metric").is_in(["layer_share", "layer_share_remainder"])
        )  # fmt: skip
        df = ctx.in_split(df, exp, f"layer {layer!r}")
        split = df.get_column("split")[0]
        ts = flow_times(df)  # [None]: the probe pools flow times (too noisy per t)
        want = ctx.style.get("t") if any(x is not None for x in ts) else None
        t = want if want is not None else (ts[len(ts) // 2] if ts else None)
        df = df.filter(pl.col("t").is_null() if t is None else (pl.col("t") - t).abs() < 1e-9)
        df = df.with_columns(pl.col("ell").fill_null("rem"))
        mean = _seed_mean(df, ["ell"])
        steps = sorted(mean.get_column("step").unique().to_list())
        labels = sorted(mean.get_column("ell").unique().to_list(), key=_ell_key)
        grid = np.full((len(labels), len(steps)), np.nan)
        for ell, step, v in mean.select("ell", "step", "value").iter_rows():
            grid[labels.index(ell), steps.index(step)] = v
        image = ax.imshow(np.clip(grid, vmin, 1.0), aspect="auto", origin="lower", norm=norm,
                          cmap="magma", interpolation="nearest")  # fmt: skip
        se = ctx.metrics.filter(
            (pl.col("experiment") == exp) & (pl.col("layer") == layer)
            & pl.col("metric").is_in(["layer_share_se", "layer_share_remainder_se"])
            & (pl.col("split") == split)
        ).with_columns(pl.col("ell").fill_null("rem"))  # fmt: skip
        se = se.filter(pl.col("t").is_null() if t is None else (pl.col("t") - t).abs() < 1e-9)
        unresolved = 0
        for ell, step, v in _seed_mean(se, ["ell"]).select("ell", "step", "value").iter_rows():
            if ell not in labels or step not in steps:
                continue
            i, j = labels.index(ell), steps.index(step)
            if np.isfinite(v) and grid[i, j] < 3 * v:  # not resolved from zero: marked
                ax.plot(j, i, marker="x", color="0.6", ms=4, mew=0.8)
                unresolved += 1
        if unresolved:
            ax.text(1.0, -0.16, "×: share < 3 SE", transform=ax.transAxes, ha="right",
                    va="top", fontsize=7, color="0.4")  # fmt: skip
        ax.set_yticks(range(len(labels)), [f"ℓ={x}" if x.isdigit() else "> ℓmax" for x in labels])
        every = max(1, len(steps) // 8)
        ax.set_xticks(range(0, len(steps), every), [str(s) for s in steps[::every]], fontsize=7.5)
        ax.set_xlabel("Evaluation step")
        ax.set_title(f"{ctx.label(exp)}: {layer}" + (f" ({t_label(t)})" if t is not None else ""))
        ax.set_ylabel("")
    if image is not None:
        fig.colorbar(image, ax=axs, shrink=0.8, label="Share of the layer's feature power")
    add_title(fig, ctx, "Angular content of hidden features per layer")
    return fig
