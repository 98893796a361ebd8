"""Decay rates of L_equiv and L_mean during training: the direct test of the mechanism.

The study explains the fast drop of pct by L_equiv being an easier, better-conditioned problem
than L_mean. If so, held-out L_equiv (unbiased equivariance error, metric ``equiv_unbiased``)
falls faster than L_mean (unbiased twirled-prediction error, ``mean_unbiased``) during
training. Measured here as power-law decay rates against training step, L ∝ step^(-α), for
each run, split (e.g. the voxel modes) and flow time t, and for each experiment's seed mean.

Fit (``equipipe.fits.power_law_fit``, the one fitting routine of the project, also used for
the efficiency gap's α): least squares of log10 L on log10 step over the evaluations with
``fit_from`` x last step <= step <= ``fit_to`` x last step (step > 0); ``se`` is the residual
standard error of the slope, ``lo``/``hi`` the 16-84 % pairs-bootstrap interval over the fitted
points (``fits.INTERVAL_METHOD``). Points of one training curve are autocorrelated, so both
intervals understate the run-to-run spread (the seed rows show it). ``ratio`` = α_equiv /
α_mean of the same curve (> 1: L_equiv decays faster; NaN unless α_mean > 0).

``decay_table(run_dirs, spec)`` returns one row per (experiment, seed or "mean", split, t,
loss); ``write_decay(run_dirs, out_dir, spec)`` writes ``decay.parquet`` and ``decay.json``
(spec, window, method).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from equipipe.collect import read_run
from equipipe.config import defaults
from equipipe.fits import INTERVAL_METHOD, power_law_fit
from equipipe.metrics import read_metrics

__all__ = ["DECAY_SCHEMA", "LOSSES", "decay_table", "write_decay"]

LOSSES: dict[str, str] = {"equiv": "equiv_unbiased", "mean": "mean_unbiased"}

DECAY_SCHEMA: dict[str, pl.DataType] = {
    "experiment": pl.String,
    "task": pl.String,
    "seed": pl.String,  # a seed, or "mean" (the seed-mean curve)
    "split": pl.String,
    "field": pl.String,
    "t": pl.Float64,
    "loss": pl.String,  # equiv | mean
    "alpha": pl.Float64,
    "se": pl.Float64,
    "lo": pl.Float64,
    "hi": pl.Float64,
    "n": pl.Int64,
    "step_lo": pl.Int64,
    "step_hi": pl.Int64,
    "ratio": pl.Float64,  # alpha_equiv / alpha_mean of the same curve
    "unit": pl.String,
}


def _spec(spec: dict | None) -> dict[str, Any]:
    out = {**defaults("analysis", "decay"), **(spec or {})}
    if not 0 <= out["fit_from"] < out["fit_to"] <= 1:
        raise ValueError(
            f"decay: need 0 <= fit_from < fit_to <= 1, got {out['fit_from']}, {out['fit_to']}"
        )
    return out


def _curves(df: pl.DataFrame, field: str | None) -> pl.DataFrame:
    """Rows of the two losses for the primary field (or field-less rows)."""
    sel = df.filter(pl.col("metric").is_in(list(LOSSES.values())))
    if field is not None and field in set(sel.get_column("field").drop_nulls()):
        sel = sel.filter(pl.col("field") == field)
    return sel.filter(pl.col("split").str.starts_with("val") & ~pl.col("split").str.contains("ema"))


def _fit(steps: np.ndarray, values: np.ndarray, window: tuple[float, float], n_boot: int,
         seed: int) -> dict:  # fmt: skip
    last = float(steps.max()) if steps.size else 0.0
    keep = (steps > 0) & (steps >= window[0] * last) & (steps <= window[1] * last)
    fit = power_law_fit(steps[keep], values[keep], n_boot, seed)
    lo_step = int(steps[keep].min()) if keep.any() else None
    hi_step = int(steps[keep].max()) if keep.any() else None
    return {**{k: fit[k] for k in ("alpha", "se", "lo", "hi", "n")},
            "step_lo": lo_step, "step_hi": hi_step}  # fmt: skip


def decay_table(run_dirs: Sequence[Path], spec: dict | None = None) -> pl.DataFrame:
    """Decay-rate rows (``DECAY_SCHEMA``) of every run and every experiment's seed mean."""
    o = _spec(spec)
    window = (float(o["fit_from"]), float(o["fit_to"]))
    frames = []
    for d in run_dirs:
        info = read_run(Path(d))
        df = _curves(read_metrics(Path(d), info), info.get("primary_field"))
        frames.append(df.with_columns(pl.lit(str(info["task"])).alias("task")))
    if not frames:
        return pl.DataFrame(schema=DECAY_SCHEMA)
    df = pl.concat(frames, how="diagonal_relaxed")
    rows = []
    keys = df.select("experiment", "task", "split", "field", "t").unique()
    for exp, task, split, field, t in keys.sort(pl.all(), nulls_last=False).iter_rows():
        cond = (pl.col("experiment") == exp) & (pl.col("split") == split)
        cond &= pl.col("field").is_null() if field is None else pl.col("field") == field
        cond &= pl.col("t").is_null() if t is None else pl.col("t") == t
        sub = df.filter(cond)
        seeds = sorted(set(sub.get_column("seed").to_list()))
        curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        for loss, metric in LOSSES.items():
            m = sub.filter(pl.col("metric") == metric)
            for s in seeds:
                g = m.filter(pl.col("seed") == s).group_by("step").agg(pl.col("value").mean())
                g = g.sort("step")
                curves.setdefault(str(s), {})[loss] = (g["step"].to_numpy(), g["value"].to_numpy())
            if len(seeds) > 1:
                g = m.group_by("seed", "step").agg(pl.col("value").mean())
                g = g.group_by("step").agg(pl.col("value").mean(), pl.len().alias("k"))
                g = g.filter(pl.col("k") == len(seeds)).sort("step")
                curves.setdefault("mean", {})[loss] = (g["step"].to_numpy(), g["value"].to_numpy())
        unit = sub.get_column("unit").drop_nulls()
        unit = unit[0] if len(unit) else None
        for who, losses in curves.items():
            fits = {loss: _fit(*losses[loss], window, int(o["n_boot"]), int(o["boot_seed"]))
                    for loss in LOSSES if loss in losses}  # fmt: skip
            a_e = fits.get("equiv", {}).get("alpha", math.nan)
            a_m = fits.get("mean", {}).get("alpha", math.nan)
            # only where L_mean decays (alpha_mean > 0): otherwise the ratio has no reading
            ratio = a_e / a_m if a_m > 0 and math.isfinite(a_m) and math.isfinite(a_e) else math.nan
            for loss, f in fits.items():
                rows.append({"experiment": exp, "task": task, "seed": who, "split": split,
                             "field": field, "t": t, "loss": loss, **f, "ratio": ratio,
                             "unit": unit})  # fmt: skip
    order = {"mean": -1}
    rows.sort(key=lambda r: (r["experiment"], r["split"], -1.0 if r["t"] is None else r["t"],
                             order.get(r["seed"], int(r["seed"]) if r["seed"].isdigit() else 0),
                             r["loss"]))  # fmt: skip
    return pl.DataFrame(rows, schema=DECAY_SCHEMA, orient="row")


def write_decay(run_dirs: Sequence[Path], out_dir: Path, spec: dict | None = None) -> pl.DataFrame:
    """Write ``decay.parquet`` (``decay_table``) and ``decay.json`` (window and method)."""
    o = _spec(spec)
    table = decay_table(run_dirs, o)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.write_parquet(out_dir / "decay.parquet")
    meta = {
        "spec": o,
        "window": f"evaluations with {o['fit_from']:g} x last step <= step <= "
        f"{o['fit_to']:g} x last step (step > 0)",
        "model": "L = c step^(-alpha): least squares of log10 L on log10 step",
        "interval": INTERVAL_METHOD,
        "losses": LOSSES,
        "runs": [str(d) for d in run_dirs],
    }
    (out_dir / "decay.json").write_text(json.dumps(meta, indent=1))
    return table
