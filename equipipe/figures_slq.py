"""Figure kind ``hessian_density``: spectral densities of the L_mean and L_equiv Hessians and κ
against the eigenvalue threshold (``equipipe.slq``, written by the landscape analysis with
spec ``slq_probes`` > 0: ``landscape_density.parquet``, ``landscape_threshold.parquet``).

Three panels: (1) the densities of both Hessians (stochastic Lanczos quadrature, smoothed with a
Gaussian; dashed: the exact eigenvalues where the block's Hessian was computed in full), on a
symmetric-log eigenvalue axis in units of each loss's λmax; (2) κ(τ) = λmax / λmin(τ) against
the relative threshold τ, with the line κ = 1/τ that a spectrum dense down to zero follows
(where a curve lies on it, κ is set by the cut-off, not by the loss; hollow markers: thresholds
where SLQ does not resolve the count, ``landscape_threshold.resolved``); (3) the number of
eigenvalues above τ·λmax (± 1 SE over probes). Style keys: ``analysis``, ``figsize``,
``title``.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from equipipe.figures import FigureContext, register_kind
from equipipe.figures_decay import analysis_folder, panels
from equipipe.slq import Density

COLORS = {"mean": "#1f77b4", "equiv": "#d62728"}
LABELS = {"mean": r"$L_{mean}$", "equiv": r"$L_{equiv}$"}


def _density(rows: pl.DataFrame) -> Density:
    probes = sorted(set(rows.get_column("probe").to_list()))
    m = max(rows.filter(pl.col("probe") == p).height for p in probes)
    nodes = np.full((len(probes), m), np.nan)
    weights = np.zeros((len(probes), m))
    for i, p in enumerate(probes):
        g = rows.filter(pl.col("probe") == p)
        nodes[i, : g.height] = g.get_column("node").to_numpy()
        weights[i, : g.height] = g.get_column("weight").to_numpy()
    return Density(nodes, weights, 1, rows.get_column("method")[0])


@register_kind("hessian_density")
def hessian_density(ctx: FigureContext) -> Figure:
    folder = analysis_folder(ctx, "landscape_threshold.parquet")
    dens = pl.read_parquet(folder / "landscape_density.parquet")
    thr = pl.read_parquet(folder / "landscape_threshold.parquet")
    meta = json.loads((folder / "landscape.json").read_text())
    fig, (ax_d, ax_k, ax_c) = panels(ctx, 3, 3, size=(4.4, 3.6))
    lin = 1e-4  # symlog: linear within ±1e-4 λmax
    for loss in ("mean", "equiv"):
        for method, ls in (("slq", "-"), ("exact", "--")):
            rows = dens.filter((pl.col("loss") == loss) & (pl.col("method") == method))
            if rows.height == 0:
                continue
            d = _density(rows)
            lmax = d.lambda_max
            # the density of u = symlog(λ / λmax): every node's weight spread over a grid in u
            u = np.sign(d.nodes) * np.log10(1 + np.abs(d.nodes / lmax) / lin)
            du = Density(u, d.weights, 1, method)
            grid = np.linspace(np.nanmin(u) - 0.3, np.nanmax(u) + 0.3, 400)
            label = f"{LABELS[loss]} ({'SLQ' if method == 'slq' else 'exact'})"
            ax_d.plot(grid, du.smoothed(grid, 0.08), ls=ls, color=COLORS[loss], label=label)
            t = thr.filter((pl.col("loss") == loss) & (pl.col("method") == method)).sort(
                "threshold"
            )
            ax_k.plot(t["threshold"], t["kappa"], ls=ls, color=COLORS[loss], label=label)
            if method == "slq":  # filled: resolved; hollow: the count there is not resolved
                res = t["resolved"].to_numpy()
                for sel, face in ((res, COLORS[loss]), (~res, "white")):
                    ax_k.plot(t["threshold"].to_numpy()[sel], t["kappa"].to_numpy()[sel], "o",
                              ms=3.5, mfc=face, mec=COLORS[loss])  # fmt: skip
            c, se = t["count"].to_numpy(), t["count_se"].fill_nan(0.0).to_numpy()
            ax_c.plot(t["threshold"], c, ls=ls, color=COLORS[loss], label=label)
            if method == "slq":
                ax_c.fill_between(t["threshold"], np.clip(c - se, 0.5, None), c + se,
                                  color=COLORS[loss], alpha=0.2, lw=0)  # fmt: skip
    ticks = np.array([-1, -1e-2, 0, 1e-2, 1])
    ax_d.set_xticks(np.sign(ticks) * np.log10(1 + np.abs(ticks) / lin),
                    ["-1", "-1e-2", "0", "1e-2", "1"])  # fmt: skip
    ax_d.set_yscale("log")
    ax_d.set_ylim(bottom=1e-3)
    ax_d.set_xlabel(r"eigenvalue / $\lambda_{max}$ (symmetric log)")
    ax_d.set_ylabel("spectral density (smoothed)")
    ax_d.legend(fontsize=7.5)
    taus = np.sort(thr["threshold"].unique().to_numpy())
    ax_k.plot(taus, 1 / taus, color="0.5", ls=":", label=r"$1/\tau$ (set by the cut-off)")
    ax_k.set_xscale("log")
    ax_k.set_yscale("log")
    ax_k.set_xlabel(r"threshold $\tau$ (relative to $\lambda_{max}$)")
    ax_k.set_ylabel(r"$\kappa(\tau) = \lambda_{max} / \lambda_{min}(\tau)$")
    ax_k.legend(fontsize=7.5)
    ax_c.set_xscale("log")
    ax_c.set_yscale("log")
    ax_c.set_xlabel(r"threshold $\tau$")
    ax_c.set_ylabel(r"eigenvalues above $\tau\,\lambda_{max}$")
    n = int(thr["n_params"][0])
    ax_c.axhline(n, color="0.5", ls=":", lw=0.8)
    spec = meta.get("spec", {})
    fig.suptitle(ctx.opt("title", f"Hessian spectra of {meta.get('param')} ({n} parameters; "
                 f"SLQ {spec.get('slq_probes')} probes x {spec.get('slq_steps')} steps)"),
                 fontsize=11)  # fmt: skip
    return fig
