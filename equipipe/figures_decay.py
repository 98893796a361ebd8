"""Figure kind ``decay_rates``: power-law decay rates of L_equiv and L_mean (``equipipe.decay``).

One panel per experiment of the analysis: α (L ∝ step^-α) of L_equiv and of L_mean against the
flow time t (flow matching) or per split (a single position otherwise), each seed a small
marker, the seed-mean curve's fit a large marker with its 16-84 % bootstrap interval. Above
the dashed diagonal of the inset ratio, L_equiv decays faster than L_mean: the study's
mechanism predicts α_equiv > α_mean. Style keys: ``analysis``, ``figsize``, ``ncols``,
``title``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from equipipe.figures import FigureContext, register_kind

COLORS = {"equiv": "#d62728", "mean": "#1f77b4"}
LABELS = {"equiv": r"$L_{equiv}$ (equivariance error)", "mean": r"$L_{mean}$ (twirled error)"}


def analysis_folder(ctx: FigureContext, table: str) -> Path:
    """The figure's analysis folder: style ``analysis`` (a name among its inputs), else the
    first input folder holding ``table``."""
    name = ctx.style.get("analysis")
    folders = (
        [Path(ctx.extra[name])] if name in ctx.extra else [Path(p) for p in ctx.extra.values()]
    )
    for folder in folders:
        if (folder / table).is_file():
            return folder
    raise ValueError(
        f"figure ({ctx.spec.get('kind')}): no analysis input holds {table} "
        f"(inputs: {sorted(ctx.extra)}); add the analysis to the figure's 'analyses'"
    )


def panels(ctx: FigureContext, n: int, ncols: int, size=(4.6, 3.6)) -> tuple[Figure, list]:
    """A constrained-layout figure with ``n`` panels in rows of ``ncols``."""
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig = Figure(figsize=tuple(ctx.opt("figsize", (size[0] * ncols + 0.6, size[1] * nrows + 0.8))),
                 layout="constrained")  # fmt: skip
    axs = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axs[n:]:
        ax.set_visible(False)
    return fig, axs[:n]


@register_kind("decay_rates")
def decay_rates(ctx: FigureContext) -> Figure:
    folder = analysis_folder(ctx, "decay.parquet")
    table = pl.read_parquet(Path(folder) / "decay.parquet")
    meta = json.loads((Path(folder) / "decay.json").read_text())
    exps = list(dict.fromkeys(table.get_column("experiment").to_list()))
    fig, axs = panels(ctx, max(1, len(exps)), int(ctx.opt("ncols", 3)))
    if not exps:
        axs[0].text(0.5, 0.5, "no decay rows", ha="center", transform=axs[0].transAxes)
    for ax, exp in zip(axs, exps):
        sub = table.filter(pl.col("experiment") == exp)
        per_t = sub.get_column("t").null_count() < sub.height
        keys = (
            sorted(set(sub.get_column("t").drop_nulls().to_list()))
            if per_t
            else sorted(set(sub.get_column("split").to_list()))
        )
        pos = {k: i for i, k in enumerate(keys)}
        col = "t" if per_t else "split"
        for j, loss in enumerate(("equiv", "mean")):
            off = (j - 0.5) * 0.18
            rows = sub.filter((pl.col("loss") == loss) & pl.col(col).is_not_null())
            seeds = rows.filter(pl.col("seed") != "mean")
            xs = np.array([pos[k] for k in seeds.get_column(col).to_list()], dtype=float)
            ax.plot(xs + off, seeds.get_column("alpha").to_numpy(), "o", ms=3.5, alpha=0.55,
                    color=COLORS[loss], mec="none")  # fmt: skip
            mean = rows.filter(pl.col("seed") == "mean")
            if mean.height == 0:  # one seed: its own fit is the experiment's
                mean = seeds
            xm = np.array([pos[k] for k in mean.get_column(col).to_list()], dtype=float)
            a = mean.get_column("alpha").to_numpy()
            lo = np.nan_to_num(a - mean.get_column("lo").to_numpy())
            hi = np.nan_to_num(mean.get_column("hi").to_numpy() - a)
            ax.errorbar(xm + off, a, yerr=[np.clip(lo, 0, None), np.clip(hi, 0, None)], fmt="D",
                        ms=6, color=COLORS[loss], capsize=3, label=LABELS[loss])  # fmt: skip
        ax.axhline(0.0, color="0.6", lw=0.8)
        ax.set_xticks(range(len(keys)), [f"{k:g}" if per_t else str(k) for k in keys])
        ax.set_xlabel("flow time t" if per_t else "split")
        ax.set_ylabel(r"decay rate $\alpha$ ($L \propto$ step$^{-\alpha}$)")
        task = sub.get_column("task")[0]
        ax.set_title(f"{ctx.label(exp)} ({task})", fontsize=10)
        ratio = sub.filter(pl.col("seed") == "mean") if (sub["seed"] == "mean").any() else sub
        r = ratio.filter(pl.col("loss") == "equiv").get_column("ratio").drop_nans().to_numpy()
        if r.size:
            ax.text(0.02, 0.98, f"α_equiv / α_mean: median {np.median(r):.2g}\n"
                    f"(> 1 in {(r > 1).sum()} of {r.size})", transform=ax.transAxes, va="top",
                    fontsize=8, bbox={"fc": "white", "ec": "0.7", "alpha": 0.9})  # fmt: skip
        ax.legend(fontsize=8, loc="lower right")
    fig.text(0.5, -0.02, f"Fit: {meta['model']}; window: {meta['window']}; interval: "
             f"{meta['interval']}", ha="center", va="top", fontsize=7.5, wrap=True)  # fmt: skip
    fig.suptitle(ctx.opt("title", "Decay rates of the equivariance error and the twirled error"))
    return fig
