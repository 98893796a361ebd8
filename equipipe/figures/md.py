"""Figure kind ``md_deviation``: the study's metric against what it does to a simulation.

Reads an ``md`` analysis folder (``equipipe.md``: ``md.parquet``, ``md_curves.ipc``). Left:
rotated-start deviation d(t) at ``time_fs`` (default 50) of the raw model against the pct of
held-out force error due to equivariance error logged at that checkpoint's step, one point per
(checkpoint, seed), log-log; the floors are horizontal lines: the same model's exact head twirl
(float32, mean over its checkpoints and seeds) and the e3nn model in float32 and float64.
Right: the curves d(t) (mean over molecules and rotations) per checkpoint and floor.
Blown-up trajectories are counted in the legend and left out of the means.

Style keys: ``analysis`` (which input folder), ``time_fs`` (50), ``xscale``/``yscale`` ("log").
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from equipipe.figures.data import FigureContext
from equipipe.figures.registry import register_kind
from equipipe.figures.style import PALETTE

FLOORS = {
    "twirl_exact": ("exact head twirl (float32)", "0.35", "--"),
    "e3nn_float32": ("e3nn, float32", PALETTE[2], ":"),
    "e3nn_float64": ("e3nn, float64", PALETTE[4], "-."),
}


def _positive(v) -> float | None:
    if v is None or not math.isfinite(v) or v <= 0:
        return None
    return float(v)


@register_kind("md_deviation")
def md_deviation(ctx: FigureContext) -> Figure:
    folder = ctx.analysis_dir("md.parquet")
    table = pl.read_parquet(folder / "md.parquet")
    curves_path = folder / "md_curves.ipc"
    curves = pl.read_ipc(curves_path) if curves_path.is_file() else pl.DataFrame()
    tf = float(ctx.opt("time_fs", 50))
    col = f"d_{tf:g}fs"
    if col not in table.columns:
        have = sorted(c[2:-2] for c in table.columns if c.startswith("d_") and c.endswith("fs"))
        raise ValueError(f"figure md_deviation: no d at {tf:g} fs; the analysis has {have} fs")
    fig = Figure(figsize=tuple(ctx.opt("figsize", (11.5, 4.4))), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    raw = table.filter(pl.col("variant") == "raw").sort("seed", "step")
    steps = sorted({s for s in raw["step"].to_list() if s is not None})
    colour = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(steps)}
    markers = ("o", "s", "^", "D", "v")
    missing = []
    for r in raw.iter_rows(named=True):
        x, y = _positive(r["pct"]), _positive(r[col])
        if x is None or y is None:
            missing.append(
                f"step {r['step']} seed {r['seed']} ({r['n_blowups']}/{r['n_traj']} blown up)"
            )
            continue
        ax.scatter(100 * x, y, color=colour.get(r["step"], "k"),
                   marker=markers[int(r["seed"]) % len(markers)], s=36, zorder=3,
                   label=f"step {r['step']} ({r['checkpoint']}), seed {r['seed']}"
                   + (f", {r['n_blowups']} blow-ups" if r["n_blowups"] else ""))  # fmt: skip
    for variant, (label, c, ls) in FLOORS.items():
        vals = [v for v in table.filter(pl.col("variant") == variant)[col].to_list()
                if _positive(v) is not None]  # fmt: skip
        if vals:
            ax.axhline(float(np.mean(vals)), color=c, ls=ls, lw=1.2, label=f"floor: {label}")
    ax.set_xscale(ctx.opt("xscale", "log"))
    ax.set_yscale(ctx.opt("yscale", "log"))
    ax.set_xlabel("Share of held-out force error from equivariance error at the checkpoint (%)")
    ax.set_ylabel(f"Rotated-start deviation d({tf:g} fs) (Å)")
    ax.set_title(f"d({tf:g} fs) against pct")
    if missing:
        ax.text(0.01, 0.01, f"no d({tf:g} fs) (every pair blew up before): " + "; ".join(missing),
                transform=ax.transAxes, fontsize=6.5, va="bottom", wrap=True)  # fmt: skip
    if ctx.style.get("legend", "lower right") is not False:
        ax.legend(loc=ctx.style.get("legend", "lower right"), fontsize=7, scatterpoints=1)
    if curves.height:
        labelled: set[str] = set()  # one legend entry per floor
        for (_exp, seed, _ckpt, step, variant), g in curves.sort("time_fs").group_by(
            ["experiment", "seed", "checkpoint", "step", "variant"], maintain_order=True
        ):
            if variant not in ("raw", *FLOORS):
                continue
            t, d = g["time_fs"].to_numpy(), g["d_mean"].to_numpy().astype(float)
            keep = np.isfinite(d) & (d > 0)
            if variant == "raw":
                ax2.plot(t[keep], d[keep], color=colour.get(step, "k"), lw=1.2,
                         label=f"step {step}, seed {seed}")  # fmt: skip
            else:
                label, c, ls = FLOORS[variant]
                labelled_now = variant in labelled
                labelled.add(variant)
                ax2.plot(
                    t[keep],
                    d[keep],
                    color=c,
                    ls=ls,
                    lw=1.0,
                    label=None if labelled_now else f"floor: {label}",
                )
        ax2.set_yscale("log")
        ax2.set_xlabel("Time (fs)")
        ax2.set_ylabel("d(t) (Å), mean over molecules and rotations")
        ax2.set_title("Rotated-start deviation against time")
        ax2.legend(fontsize=6.5, ncol=2)
    title = ctx.style.get("title", "What the remaining equivariance error does to NVE dynamics")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig
