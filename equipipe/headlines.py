"""Headline numbers of every run and experiment, with their standard errors.

``results/headlines.csv`` (a report item, so a report zip carries it) has one row per run
(``level="run"``) and per experiment (``level="experiment"``, over its seeds) for every split
and flow time ``t`` of the primary field's pct (the rows of ``results/paper_comparison``):

* ``dip_step``, ``dip_pct``: argmin and minimum of the smoothed pct in the dip window, exactly
  as ``equipipe.collect`` computes them; ``dip_pct_se``: the standard error of the raw pct at
  the dip step;
* ``final_step``, ``final_pct``, ``final_pct_se``: the last evaluation's pct (percent);
* ``final_error``, ``final_error_se``: the primary field's total squared error (``total``,
  per element, in ``error_unit``) at the last evaluation and its standard error.

The pct standard error is the logged ``pct_se`` (over examples, linearised ratio estimator).
For tables without it, it propagates the standard errors of its numerator and denominator
(``equiv_se``, ``total_se``) to first order, ignoring their covariance:
``se(E/T) = sqrt((se_E / T)^2 + (E se_T / T^2)^2)``. With one evaluation unit the
standard errors are NaN. An experiment's value is the mean over seeds; its standard error is
``sqrt(sum se_i^2) / n``, or the seeds' spread ``std / sqrt(n)`` when that is larger.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from equipipe.collect import _run_rows, read_run
from equipipe.metrics import read_metrics
from equipipe.smoothing import DEFAULT_S

__all__ = ["HEADLINE_SCHEMA", "QUANTITIES", "headline_table", "write_headlines"]

QUANTITIES = ("dip_pct", "final_pct", "final_error")

HEADLINE_SCHEMA: dict[str, pl.DataType] = {
    "level": pl.String,
    "experiment": pl.String,
    "seed": pl.Int64,
    "n_seeds": pl.Int64,
    "study_ref": pl.String,
    "split": pl.String,
    "field": pl.String,
    "t": pl.Float64,
    "dip_step": pl.Float64,
    "dip_pct": pl.Float64,
    "dip_pct_se": pl.Float64,
    "final_step": pl.Int64,
    "final_pct": pl.Float64,
    "final_pct_se": pl.Float64,
    "final_error": pl.Float64,
    "final_error_se": pl.Float64,
    "error_unit": pl.String,
}


def _at(df: pl.DataFrame, step, metric: str) -> float:
    if step is None:
        return math.nan
    v = df.filter((pl.col("step") == int(step)) & (pl.col("metric") == metric))["value"]
    return float(v.mean()) if len(v) else math.nan


def _pct_se(df: pl.DataFrame, step) -> float:
    """Standard error of pct (in percent) at ``step``: the logged ``pct_se`` (over examples,
    with the covariance of E and T), else from equiv_unbiased / total and their SEs."""
    logged = _at(df, step, "pct_se")
    if not math.isnan(logged):
        return 100.0 * logged
    e, t = _at(df, step, "equiv_unbiased"), _at(df, step, "total")
    se_e, se_t = _at(df, step, "equiv_se"), _at(df, step, "total_se")
    if not t:
        return math.nan
    return 100.0 * math.sqrt((se_e / t) ** 2 + (e * se_t / t**2) ** 2)


def _run_headlines(run_dir: Path, dip_windows: dict | None = None) -> list[dict]:
    info = read_run(run_dir)
    df = read_metrics(run_dir, info)
    rows = []
    for r in _run_rows(df, info, None, DEFAULT_S, 1, dip_windows):
        cond = (pl.col("split") == r["split"]) & (
            pl.col("t").is_null() if r["t"] is None else pl.col("t") == r["t"]
        )
        cond = cond & (
            pl.col("field").is_null() if r["field"] is None else pl.col("field") == r["field"]
        )
        sub = df.filter(cond)
        unit = sub.filter(pl.col("metric") == "total")["unit"]
        rows.append(
            {
                "level": "run",
                "experiment": str(info["experiment"]),
                "seed": int(info["seed"]),
                "n_seeds": 1,
                "study_ref": info.get("study_ref"),
                "split": r["split"],
                "field": r["field"],
                "t": r["t"],
                "dip_step": None if r["dip_step"] is None else float(r["dip_step"]),
                "dip_pct": r["min_pct"],
                "dip_pct_se": _pct_se(sub, r["dip_step"]),
                "final_step": r["last_step"],
                "final_pct": r["final_pct"],
                "final_pct_se": _pct_se(sub, r["last_step"]),
                "final_error": _at(sub, r["last_step"], "total"),
                "final_error_se": _at(sub, r["last_step"], "total_se"),
                "error_unit": unit[0] if len(unit) else None,
            }
        )
    return rows


def _combine(values: list[float], ses: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    n = len(vals)
    mean = sum(vals) / n
    se = math.sqrt(sum(s * s for s in ses)) / len(ses) if ses else math.nan
    if n > 1:
        spread = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1) / n)
        se = spread if math.isnan(se) else max(se, spread)
    return mean, se


def headline_table(run_dirs: Sequence[Path], dip_windows: dict | None = None) -> pl.DataFrame:
    """Run-level and experiment-level headline rows (``HEADLINE_SCHEMA``); ``dip_windows`` as
    for ``equipipe.collect.collect`` (experiment -> [lo, hi] steps)."""
    runs = [r for d in run_dirs for r in _run_headlines(Path(d), dip_windows)]
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["experiment"], r["split"], r["field"], r["t"]), []).append(r)
    exps = []
    for (exp, split, field, t), rs in groups.items():
        row = {
            "level": "experiment",
            "experiment": exp,
            "seed": None,
            "n_seeds": len(rs),
            "study_ref": rs[0]["study_ref"],
            "split": split,
            "field": field,
            "t": t,
            "error_unit": rs[0]["error_unit"],
        }
        steps = [r["dip_step"] for r in rs if r["dip_step"] is not None]
        row["dip_step"] = sum(steps) / len(steps) if steps else None
        row["final_step"] = max(r["final_step"] for r in rs)
        for q in QUANTITIES:
            row[q], row[f"{q}_se"] = _combine([r[q] for r in rs], [r[f"{q}_se"] for r in rs])
        exps.append(row)
    rows = sorted(exps, key=_order) + sorted(runs, key=_order)
    return pl.DataFrame(rows, schema=HEADLINE_SCHEMA, orient="row")


def _order(r: dict) -> tuple:
    return (r["experiment"], r["split"] or "", r["field"] or "", r["t"] or -1.0, r["seed"] or -1)


def write_headlines(
    run_dirs: Sequence[Path], out: Path, dip_windows: dict | None = None
) -> pl.DataFrame:
    """Write ``headlines.csv`` (``out``) and return the table."""
    table = headline_table(run_dirs, dip_windows)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    table.write_csv(out, float_precision=None)
    return table
