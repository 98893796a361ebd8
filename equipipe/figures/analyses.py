"""Figure kinds drawn from analysis outputs: landscape, twirling, decay rates, Hessian densities.

A kind gets a ``FigureContext`` whose ``extra`` maps analysis names to their output folders
(``results/analysis/<name>``); ``FigureContext.analysis_dir`` picks the one drawn.

``landscape`` (style keys: ``analysis``, ``panels`` ["study"] or ["study", "own"],
``shared_z`` (true), ``cmap``, ``elev``, ``azim``): 3D surfaces of L_mean and L_equiv on the
plane of L_equiv's (λmin+, λmax) Hessian eigenvectors (the study's view), and with "own" each
loss on its own eigenvectors; z is the change from the loss at the checkpoint; κ = λmax/λmin+,
the quadratic-fit R^2 and the fitted curvature ratio annotated. A note states the derived fact
(PAPER.md): with an invariant backbone and the direct head, L_mean depends on the row mean of W
only and L_equiv on the deviation only, so L_mean is flat along L_equiv's eigenvectors.

``twirling`` (style keys: ``analysis``, ``field``, ``ts`` (subset of flow times), ``ncols``,
``xscale`` ("log"), ``yscale``): held-out squared error of the K-twirled model (points with
standard errors) against the prediction L_mean + L_equiv / K (line and band) and, for the direct
force head, the exact prediction from the closed form and the exact K -> infinity twirl.

``decay_rates`` (from a ``decay`` analysis, ``equipipe.decay``; style keys: ``analysis``,
``figsize``, ``labels``, ``ncols``, ``title``): one panel per experiment of the analysis: α
(L ∝ step^-α) of L_equiv and of L_mean against the flow time t (flow matching) or per split (a
single position otherwise), each seed a small marker, the seed-mean curve's fit a large marker
with its 16-84 % bootstrap interval; the inset gives α_equiv / α_mean (the study's mechanism
predicts α_equiv > α_mean).

``hessian_density`` (from a landscape analysis with spec ``slq_probes`` > 0, ``equipipe.slq``:
``landscape_density.parquet``, ``landscape_threshold.parquet``; style keys: ``analysis``,
``figsize``, ``title``): three panels: (1) the spectral densities of the L_mean and L_equiv
Hessians (stochastic Lanczos quadrature, smoothed with a Gaussian; dashed: the exact eigenvalues
where the block's Hessian was computed in full), on a symmetric-log eigenvalue axis in units of
each loss's λmax; (2) κ(τ) = λmax / λmin(τ) against the relative threshold τ, with the line
κ = 1/τ that a spectrum dense down to zero follows (where a curve lies on it, κ is set by the
cut-off, not by the loss; hollow markers: thresholds where SLQ does not resolve the count);
(3) the number of eigenvalues above τ·λmax (± 1 SE over probes).

``kappa_table_rst(dirs, out=None)`` writes the κ tables of landscape analyses as an rst table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import numpy as np
import polars as pl
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from equipipe.figures.data import FigureContext
from equipipe.figures.registry import register_kind
from equipipe.figures.style import PALETTE, axes_grid
from equipipe.slq import Density

LOSS_COLORS = {"equiv": "#d62728", "mean": "#1f77b4"}
DECAY_LABELS = {"equiv": r"$L_{equiv}$ (equivariance error)", "mean": r"$L_{mean}$ (twirled error)"}
SLQ_LABELS = {"mean": r"$L_{mean}$", "equiv": r"$L_{equiv}$"}
LOSS_LABELS = {"mean": r"$L_{mean}$ (twirled)", "equiv": r"$L_{equiv}$", "total": r"$L_{total}$"}
COMPLEMENTARY_NOTE = (
    "Direct head on an invariant backbone: L_mean depends only on the row mean of W, L_equiv only "
    "on the deviation W - 1 w\u0304\u1d40,\nso their Hessians act on complementary subspaces and "
    "L_mean is flat along every eigenvector of L_equiv's Hessian."
)


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


# --------------------------------------------------------------------------------------------
# Landscape


def _surface(grid: pl.DataFrame, axes: str, loss: str):
    g = grid.filter((pl.col("axes") == axes) & (pl.col("loss") == loss)).sort("i", "j")
    if g.height == 0:
        return None
    n_i, n_j = int(g["i"].max()) + 1, int(g["j"].max()) + 1
    a = g["alpha"].to_numpy().reshape(n_i, n_j)
    b = g["beta"].to_numpy().reshape(n_i, n_j)
    z = g["value"].to_numpy().reshape(n_i, n_j)
    # change from the checkpoint: the grid point nearest the origin (exactly 0 for odd n)
    centre = np.unravel_index(np.argmin(a**2 + b**2), a.shape)
    return a, b, z - z[centre]


@register_kind("landscape")
def landscape_figure(ctx: FigureContext) -> Figure:
    """Loss surfaces around a checkpoint on Hessian-eigenvector planes (see module docstring)."""
    d = ctx.analysis_dir("landscape_grid.parquet")
    grid = pl.read_parquet(d / "landscape_grid.parquet")
    kappa = {
        r["loss"]: r for r in pl.read_parquet(d / "landscape_kappa.parquet").iter_rows(named=True)
    }
    fits = {
        (r["axes"], r["loss"]): r
        for r in pl.read_parquet(d / "landscape_fit.parquet").iter_rows(named=True)
    }
    meta = _read_json(d / "landscape.json")
    panels = [("equiv", "mean"), ("equiv", "equiv")]
    if "own" in (ctx.style.get("panels") or ["study"]):
        panels += [("mean", "mean"), ("total", "total")]
    panels = [p for p in panels if grid.filter(pl.col("axes") == p[0]).height]
    ncols = 2
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = Figure(figsize=tuple(ctx.opt("figsize", (10.5, 4.6 * nrows + 0.9))), layout="constrained")
    surfaces = {p: _surface(grid, *p) for p in panels}
    study = [s for (ax_name, _), s in surfaces.items() if ax_name == "equiv" and s is not None]
    zlim = None
    if ctx.opt("shared_z", True) and study:
        lo = min(float(s[2].min()) for s in study)
        hi = max(float(s[2].max()) for s in study)
        zlim = (lo, hi if hi > lo else lo + 1.0)
    unit = next(iter(kappa.values()), {}).get("unit")
    cmap = matplotlib.colormaps[ctx.opt("cmap", "viridis")]
    for idx, (axes_name, loss) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, idx + 1, projection="3d")
        s = surfaces[(axes_name, loss)]
        if s is None:
            ax.text2D(0.5, 0.5, f"no grid for {loss}", transform=ax.transAxes, ha="center")
            continue
        a, b, z = s
        # colours on the panel's z-range (shared in the study's view, so a flat L_mean stays
        # one colour instead of stretching float noise over the whole colour map)
        lo, hi = zlim if (zlim is not None and axes_name == "equiv") else (z.min(), z.max())
        norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1.0)
        ax.plot_surface(a, b, z, facecolors=cmap(norm(z)), linewidth=0, antialiased=True,
                        shade=False, rstride=1, cstride=1)  # fmt: skip
        if zlim is not None and axes_name == "equiv":
            ax.set_zlim(*zlim)
        ax.set_box_aspect(None, zoom=0.82)
        ax.view_init(elev=float(ctx.opt("elev", 28)), azim=float(ctx.opt("azim", -55)))
        ax.set_xlabel(r"$\alpha$ ($\lambda_{min+}$ dir.)", fontsize=8)
        ax.set_ylabel(r"$\beta$ ($\lambda_{max}$ dir.)", fontsize=8)
        ax.set_zlabel(r"$\Delta$ loss" + (f" ({unit})" if unit else ""), fontsize=8)
        ax.tick_params(labelsize=7)
        owner = "L_equiv" if axes_name == "equiv" else f"L_{axes_name}"
        ax.set_title(f"{LOSS_LABELS[loss]} on {owner}'s eigenvectors", fontsize=10)
        k = kappa.get(loss, {})
        fit = fits.get((axes_name, loss), {})
        r2 = fit.get("r2")
        shape = (
            f"quadratic fit R² = {_fmt(r2)}, curvature ratio {_fmt(fit.get('curvature_ratio'))}"
            if r2 is not None and math.isfinite(r2)
            else "no resolvable curvature"
        )
        text = (
            f"κ({loss}) = {_fmt(k.get('kappa'))}  (λmax {_fmt(k.get('lambda_max'))}, "
            f"λmin+ {_fmt(k.get('lambda_min_pos'))})\n{shape}, range {_fmt(fit.get('range'))}"
        )
        ax.text2D(0.0, 1.0, text, transform=ax.transAxes, fontsize=7.5, va="top")
    step = meta.get("step")
    where = f"{meta.get('experiment') or ''} checkpoint {meta.get('checkpoint', '')}" + (
        f" (step {step})" if step is not None else ""
    )
    title = ctx.style.get(
        "title", f"Loss landscape of {meta.get('param', 'the output head')} — {where.strip()}"
    )
    if title:
        fig.suptitle(title, fontsize=11)
    note = (
        COMPLEMENTARY_NOTE
        if str(meta.get("param", "")).startswith("force_head")
        else (
            "L_mean on L_equiv's eigenvectors: curvature of the prediction part along the directions "
            "that change equivariance most and least."
        )
    )
    rot = meta.get("rotations")
    if rot == "haar" and note == COMPLEMENTARY_NOTE:
        note += (
            f" Here with K = {meta.get('k')} Haar rotations per example, L_mean keeps a finite-K "
            "sampling curvature there (exactly flat with the octahedral rotations)."
        )
    if rot:
        note += f"\nRotations: {rot} (K = {meta.get('k')}); grid step {meta.get('grid_step')}."
    fig.supxlabel(note, fontsize=7.5, color="0.25")
    return fig


# --------------------------------------------------------------------------------------------
# Twirling


@register_kind("twirling")
def twirling_figure(ctx: FigureContext) -> Figure:
    """Measured error of the K-twirled model vs L_mean + L_equiv / K (see module docstring)."""
    d = ctx.analysis_dir("twirling.parquet")
    df = pl.read_parquet(d / "twirling.parquet")
    meta = _read_json(d / "twirling.json")
    fields = df["field"].unique(maintain_order=True).to_list()
    field = ctx.style.get("field") or meta.get("primary_field")
    if field not in fields:  # no primary field recorded: the field with most equivariance error
        share = df.group_by("field").agg(
            (pl.col("equiv_unbiased") / pl.col("mean_unbiased").abs()).max()
        )
        field = share.sort("equiv_unbiased", descending=True, nulls_last=True)["field"][0]
    df = df.filter(pl.col("field") == field)
    ts = df["t"].unique(maintain_order=True).to_list()
    if ctx.style.get("ts") is not None:
        ts = [t for t in ts if t is not None and any(math.isclose(t, w) for w in ctx.style["ts"])]
    n = max(1, len(ts))
    ncols = max(1, min(n, int(ctx.opt("ncols", 4))))
    nrows = math.ceil(n / ncols)
    default = (4.4 * ncols + 0.6, 3.5 * nrows + 0.8) if n > 1 else (6.4, 4.4)
    fig = Figure(figsize=tuple(ctx.opt("figsize", default)), layout="constrained")
    axs = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axs[n:]:
        ax.set_visible(False)
    unit = df["unit"].drop_nulls().first() if df.height else None
    for ax, t in zip(axs, ts or [None]):
        g = df.filter(pl.col("t").is_null() if t is None else pl.col("t") == t).sort("k")
        k = g["k"].to_numpy().astype(float)
        meas, se = g["twirled_mse"].to_numpy(), g["twirled_mse_se"].fill_nan(0.0).to_numpy()
        pred = g["predicted"].to_numpy()
        pse = g["predicted_se"].fill_nan(0.0).to_numpy()
        ax.fill_between(k, pred - 2 * pse, pred + 2 * pse, color=PALETTE[0], alpha=0.2, lw=0)
        ax.plot(k, pred, color=PALETTE[0], label=r"prediction $L_{mean} + L_{equiv}/K$")
        ax.errorbar(k, meas, yerr=2 * se, fmt="o", ms=3.5, color=PALETTE[3], capsize=2,
                    label="measured (±2 SE)")  # fmt: skip
        if g["exact_predicted"].null_count() < g.height:
            ax.plot(k, g["exact_predicted"].to_numpy(), color="0.2", ls="--", lw=1.2,
                    label="exact (closed form)")  # fmt: skip
            ax.axhline(float(g["exact_twirl_mse"][0]), color="0.2", ls=":", lw=1.0,
                       label=r"exact twirl ($K\to\infty$)")  # fmt: skip
        ax.set_xscale(
            ctx.opt("xscale", "log"), **({"base": 2} if ctx.opt("xscale", "log") == "log" else {})
        )
        ax.set_yscale(ctx.opt("yscale", "linear"))
        ax.set_xlabel("Rotations averaged K")
        ax.set_ylabel("Held-out squared error" + (f" ({unit})" if unit else ""))
        if t is not None:
            ax.set_title(f"t = {t:g}")
        if ax is axs[0] and ctx.style.get("legend", "best") is not False:
            ax.legend(loc=ctx.style.get("legend", "best"))
    title = ctx.style.get(
        "title", f"Test-time twirling: {field} ({meta.get('experiment') or 'run'}, "
        f"{meta.get('checkpoint', 'model.pt')})",
    )  # fmt: skip
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


# --------------------------------------------------------------------------------------------
# Decay rates


def _panels(ctx: FigureContext, n: int, ncols: int, size=(4.6, 3.6)) -> tuple[Figure, list]:
    """A constrained-layout figure with ``n`` panels of ``size`` inches in rows of ``ncols``."""
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    default = (size[0] * ncols + 0.6, size[1] * nrows + 0.8)
    fig = Figure(figsize=tuple(ctx.opt("figsize", default)), layout="constrained")
    return fig, axes_grid(fig, n, ncols)


@register_kind("decay_rates")
def decay_rates(ctx: FigureContext) -> Figure:
    folder = ctx.analysis_dir("decay.parquet")
    table = pl.read_parquet(Path(folder) / "decay.parquet")
    meta = json.loads((Path(folder) / "decay.json").read_text())
    exps = list(dict.fromkeys(table.get_column("experiment").to_list()))
    fig, axs = _panels(ctx, max(1, len(exps)), int(ctx.opt("ncols", 3)))
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
                    color=LOSS_COLORS[loss], mec="none")  # fmt: skip
            mean = rows.filter(pl.col("seed") == "mean")
            if mean.height == 0:  # one seed: its own fit is the experiment's
                mean = seeds
            xm = np.array([pos[k] for k in mean.get_column(col).to_list()], dtype=float)
            a = mean.get_column("alpha").to_numpy()
            lo = np.nan_to_num(a - mean.get_column("lo").to_numpy())
            hi = np.nan_to_num(mean.get_column("hi").to_numpy() - a)
            ax.errorbar(xm + off, a, yerr=[np.clip(lo, 0, None), np.clip(hi, 0, None)], fmt="D",
                        ms=6, color=LOSS_COLORS[loss], capsize=3, label=DECAY_LABELS[loss])  # fmt: skip
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


# --------------------------------------------------------------------------------------------
# Hessian spectral densities (SLQ)


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
    folder = ctx.analysis_dir("landscape_threshold.parquet")
    dens = pl.read_parquet(folder / "landscape_density.parquet")
    thr = pl.read_parquet(folder / "landscape_threshold.parquet")
    meta = json.loads((folder / "landscape.json").read_text())
    fig, (ax_d, ax_k, ax_c) = _panels(ctx, 3, 3, size=(4.4, 3.6))
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
            label = f"{SLQ_LABELS[loss]} ({'SLQ' if method == 'slq' else 'exact'})"
            ax_d.plot(grid, du.smoothed(grid, 0.08), ls=ls, color=LOSS_COLORS[loss], label=label)
            t = thr.filter((pl.col("loss") == loss) & (pl.col("method") == method)).sort(
                "threshold"
            )
            ax_k.plot(t["threshold"], t["kappa"], ls=ls, color=LOSS_COLORS[loss], label=label)
            if method == "slq":  # filled: resolved; hollow: the count there is not resolved
                res = t["resolved"].to_numpy()
                for sel, face in ((res, LOSS_COLORS[loss]), (~res, "white")):
                    ax_k.plot(t["threshold"].to_numpy()[sel], t["kappa"].to_numpy()[sel], "o",
                              ms=3.5, mfc=face, mec=LOSS_COLORS[loss])  # fmt: skip
            c, se = t["count"].to_numpy(), t["count_se"].fill_nan(0.0).to_numpy()
            ax_c.plot(t["threshold"], c, ls=ls, color=LOSS_COLORS[loss], label=label)
            if method == "slq":
                ax_c.fill_between(t["threshold"], np.clip(c - se, 0.5, None), c + se,
                                  color=LOSS_COLORS[loss], alpha=0.2, lw=0)  # fmt: skip
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


# --------------------------------------------------------------------------------------------
# κ table for the report


def kappa_table_rst(dirs: dict[str, Path] | list[Path], out: Path | None = None) -> str:
    """The κ tables of landscape analyses as one rst simple table (written to ``out`` if given).

    Args:
        dirs: analysis name -> folder (or a list of folders, named by their folder name).
    """
    if not isinstance(dirs, dict):
        dirs = {Path(p).name: Path(p) for p in dirs}
    header = ["analysis", "loss", "block", "rotations", "λmax", "λmin+", "κ", "null", "neg.",
              "method", "R² (own axes)"]  # fmt: skip
    rows = []
    for name, d in dirs.items():
        d = Path(d)
        kappa = pl.read_parquet(d / "landscape_kappa.parquet")
        fit_path = d / "landscape_fit.parquet"
        fits = pl.read_parquet(fit_path) if fit_path.is_file() else None
        for r in kappa.iter_rows(named=True):
            r2 = None
            if fits is not None:
                f = fits.filter((pl.col("axes") == r["loss"]) & (pl.col("loss") == r["loss"]))
                r2 = f["r2"][0] if f.height else None
            rows.append([name, r["loss"], f"{r['param']} ({r['n_params']})",
                         f"{r['rotations']} K={r['k']}", _fmt(r["lambda_max"]),
                         _fmt(r["lambda_min_pos"]), _fmt(r["kappa"]), str(r["n_null"]),
                         str(r["n_negative"]), r["method"], _fmt(r2)])  # fmt: skip
    widths = [
        max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
        for i, h in enumerate(header)
    ]
    rule = "  ".join("=" * w for w in widths)

    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    text = "\n".join([rule, line(header), rule, *(line(r) for r in rows), rule, ""])
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    return text
