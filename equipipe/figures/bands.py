"""Standard-error bands of the pct curves.

Every evaluation logs ``pct_se`` beside ``pct`` (``equipipe.equivariance.Decomposition``): the
standard error of pct = Σ E_unb / Σ T over the held-out examples, from the linearised ratio
estimator (the covariance of numerator and denominator kept), as a fraction. The pct figures
draw pct ± 1 SE as a band around each curve:

* one curve per seed: that seed's SE at each evaluation;
* a seed mean: the SE of the mean, sqrt(Σ_seeds se²) / n_seeds;
* a curve averaged over flow times t (several t in one (seed, step)): sqrt(Σ_t se²) / n_t,
  which treats the times as independent (they share examples, so it is a lower bound).

Tables written before ``pct_se`` existed have no band.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from equipipe.smoothing import ema

__all__ = ["BAND_NOTE", "band_edges", "fill_band", "pct_se_by_seed", "se_at", "se_of_mean"]

BAND_NOTE = "band: ±1 standard error over held-out examples"


def pct_se_by_seed(rows: pl.DataFrame, t: float | None = None) -> pl.DataFrame:
    """(seed, step, se) from ``pct_se`` rows, with the flow times the pct curve uses.

    Args:
        rows: metric rows of ``pct_se`` (columns seed, step, t, value), one experiment,
            field and split.
        t: the flow time the curve shows, or None: the field-level rows if any, else the
            mean over every t present (as the pct curves choose).

    Returns:
        DataFrame seed (i64), step (i64), se (f64, fraction); empty without rows.
    """
    if rows.height == 0:
        return pl.DataFrame(schema={"seed": pl.Int64, "step": pl.Int64, "se": pl.Float64})
    if t is not None:
        rows = rows.filter(pl.col("t") == t)
    elif rows.get_column("t").null_count() < rows.height:
        rows = rows.filter(pl.col("t").is_not_null())
    return (
        rows.group_by("seed", "step")
        .agg(((pl.col("value") ** 2).sum().sqrt() / pl.len()).alias("se"))
        .sort("seed", "step")
    )


def se_at(table: pl.DataFrame, steps: np.ndarray, seed: int | None = None) -> np.ndarray:
    """The SE at each of ``steps`` (NaN where none was logged); ``seed`` None: every seed's
    rows combined as the SE of the seed mean (``se_of_mean``)."""
    tab = se_of_mean(table) if seed is None else table.filter(pl.col("seed") == seed)
    lookup = dict(zip(tab.get_column("step").to_list(), tab.get_column("se").to_list()))
    return np.array([lookup.get(int(s), np.nan) for s in steps], dtype=float)


def se_of_mean(table: pl.DataFrame) -> pl.DataFrame:
    """(step, se) of the mean over seeds: sqrt(Σ se²) / n_seeds."""
    return table.group_by("step").agg(((pl.col("se") ** 2).sum().sqrt() / pl.len()).alias("se"))


def band_edges(
    x: np.ndarray, y: np.ndarray, se: np.ndarray, s: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper edges y ∓ se, EMA-smoothed with the curve's scale ``s`` (None: raw)."""
    return ema(x, y - se, s), ema(x, y + se, s)


def fill_band(ax, x, y, lo, hi, color, *, logy: bool, alpha: float = 0.2) -> bool:
    """Shade [lo, hi] around y where the SE is known; on a log axis an edge at or below zero
    (SE at least the pct: unresolved) is drawn down to y / 100. Returns whether anything was
    drawn."""
    ok = np.isfinite(lo) & np.isfinite(hi)
    if not ok.any():
        return False
    lo = np.where(ok, lo, y)
    hi = np.where(ok, hi, y)
    if logy:
        lo = np.where(lo > 0, lo, y / 100.0)
    ax.fill_between(x, lo, hi, where=ok, color=color, alpha=alpha, lw=0)
    return True
