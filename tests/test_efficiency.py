"""Efficiency gap: c, p, α, c*, the assumption-(a) check, on curves with known answers."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from equipipe import efficiency
from equipipe.efficiency import (
    critical_cost_ratio,
    efficiency_table,
    first_reach,
)
from equipipe.fits import power_law_fit

ALPHA, P, A = 0.3, 0.05, 2.0
STEPS = [0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]
SEC = {"base": [0.10, 0.11], "equi": [0.30, 0.32]}  # c = 0.31 / 0.105


def _metric_rows(exp, seed, metric, values, unit=None):
    return [
        {
            "experiment": exp,
            "seed": seed,
            "step": s,
            "epoch": s / 100,
            "wall_s": 1.3 * s + 5.0,
            "split": "val",
            "metric": metric,
            "field": "forces",
            "t": None,
            "value": float(v),
            "n_elements": 300,
            "unit": unit,
        }  # fmt: skip
        for s, v in zip(STEPS, values)
    ]


def _matched(equivariant_lag: float = 1.0):
    """Baseline: twirled loss A s^-α, total = twirled / (1 - P); equivariant: twirled loss of
    the baseline at ``equivariant_lag`` x the steps (1: assumption (a) holds exactly)."""
    s = np.maximum(np.array(STEPS, float), 0.5)
    rows, runs = [], {}
    for seed in (0, 1):
        wiggle = 1 + 0.01 * seed
        mean = A * s**-ALPHA * wiggle
        total = mean / (1 - P)
        rows += _metric_rows("base", seed, "total", total, "(eV/A)^2")
        rows += _metric_rows("base", seed, "mean_unbiased", mean, "(eV/A)^2")
        rows += _metric_rows("base", seed, "pct", np.full(len(STEPS), P), "fraction")
        rows += _metric_rows("equi", seed, "total", A * (s / equivariant_lag) ** -ALPHA * wiggle)
        rows += _metric_rows("equi", seed, "pct", np.full(len(STEPS), 1e-15), "fraction")
        for exp in ("base", "equi"):
            runs[f"{exp}/{seed}"] = {
                "experiment": exp, "seed": seed, "sec_per_step": SEC[exp][seed],
                "device": "cpu (x86_64, 1 threads)", "params": 200_000,
                "steps_per_epoch": 100, "primary_field": "forces",
            }  # fmt: skip
    return pl.DataFrame(rows), runs


def test_pure_pieces():
    assert critical_cost_ratio(0.02, 0.1) == pytest.approx(1.224, abs=1e-3)  # PAPER.md example
    assert critical_cost_ratio(0.02, 0.3) == pytest.approx(1.070, abs=1e-3)
    assert math.isnan(critical_cost_ratio(0.02, -0.1))
    c = np.geomspace(1, 1000, 12)
    rng = np.random.default_rng(0)
    fit = power_law_fit(c, 3 * c**-0.25 * np.exp(0.01 * rng.standard_normal(12)), n_boot=200)
    assert fit["alpha"] == pytest.approx(0.25, abs=0.01)
    assert 0 < fit["se"] < 0.01 and fit["lo"] < fit["alpha"] < fit["hi"]
    assert first_reach([1, 10, 100], [1.0, 0.1, 0.01], 0.1) == pytest.approx(10)
    assert first_reach([1, 10, 100], [1.0, 0.1, 0.01], 0.0316227766) == pytest.approx(31.62, 1e-3)
    assert math.isnan(first_reach([1, 10], [1.0, 0.5], 0.1))


def test_table_recovers_known_answers():
    metrics, runs = _matched()
    table = efficiency_table(metrics, runs, {"experiments": ["base", "equi"], "n_boot": 200})
    assert set(table.columns) == set(efficiency.TABLE_SCHEMA)
    v = {r["quantity"]: r for r in table.to_dicts()}
    c = np.mean(SEC["equi"]) / np.mean(SEC["base"])
    assert v["c"]["value"] == pytest.approx(c)
    assert v["c"]["lo"] == pytest.approx(0.30 / 0.11) and v["c"]["hi"] == pytest.approx(0.32 / 0.10)
    assert v["c"]["se"] > 0
    assert v["p"]["value"] == pytest.approx(P) and v["p"]["n"] == 2
    assert v["alpha"]["value"] == pytest.approx(ALPHA, abs=1e-6)
    assert v["alpha_equivariant"]["value"] == pytest.approx(ALPHA, abs=1e-6)
    c_star = (1 - P) ** (-1 / ALPHA)
    assert v["c_star"]["value"] == pytest.approx(c_star)
    assert "(a)" in v["c_star"]["note"] and "(b)" in v["c_star"]["note"]
    assert v["equivariant_wins_probability"]["value"] == 0.0  # c ≈ 2.95 >> c* ≈ 1.19
    assert v["a_step_ratio"]["value"] == pytest.approx(1.0, abs=1e-6)
    assert v["a_loss_ratio"]["value"] == pytest.approx(1.0, abs=1e-9)
    # A power law makes the direct measurement equal the prediction c / c*.
    assert v["measured_compute_ratio"]["value"] == pytest.approx(c / c_star, rel=0.02)
    assert v["predicted_compute_ratio"]["value"] == pytest.approx(c / c_star)


def test_assumption_a_violated_and_wall_clock():
    spec = {"baseline": "base", "equivariant": "equi", "style": {"clock": "wall", "n_boot": 50}}
    metrics, runs = _matched(equivariant_lag=0.5)  # reaches each loss in half the steps
    v = {r["quantity"]: r for r in efficiency_table(metrics, runs, spec).to_dicts()}
    assert v["a_step_ratio"]["value"] == pytest.approx(0.5, rel=1e-6)
    assert v["a_loss_ratio"]["value"] < 1
    metrics, runs = _matched(equivariant_lag=2.0)  # needs twice the steps: never within the run
    v = {r["quantity"]: r for r in efficiency_table(metrics, runs, spec).to_dicts()}
    assert v["a_step_ratio"]["value"] is None and "never reached" in v["a_step_ratio"]["note"]
    assert v["a_loss_ratio"]["value"] == pytest.approx(2**ALPHA, rel=1e-6)
    # Wall clock counts evaluation time too (here 1.3 s/step + 5 s): α is no longer exact.
    assert v["alpha"]["value"] == pytest.approx(ALPHA, rel=0.1)
    with pytest.raises(ValueError, match="baseline"):
        efficiency_table(metrics, runs, {"experiments": ["base"]})
    with pytest.raises(ValueError, match="no rows"):
        efficiency_table(metrics, runs, {"baseline": "base", "equivariant": "nope"})


def test_figure_kind_renders(tmp_path):
    from equipipe.figures import KINDS, make_figure

    assert "efficiency_gap" in KINDS
    metrics, runs = _matched()
    spec = {"kind": "efficiency_gap", "experiments": ["base", "equi"],
            "style": {"n_boot": 50, "labels": {"base": "EScAIP + aug", "equi": "e3nn"}}}  # fmt: skip
    fig = make_figure(spec, metrics, runs, tmp_path / "gap")
    for fmt in ("png", "pdf", "svg"):
        assert (tmp_path / f"gap.{fmt}").stat().st_size > 1000
    text = "\n".join(t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")))
    assert "c* = (1 - p)^(-1/α)" in text and "Assumptions" in text


def test_write_table_from_run_directories(tmp_path):
    import json

    from equipipe.efficiency import write_efficiency_table

    metrics, runs = _matched()
    dirs = []
    for key, info in runs.items():
        exp, seed = key.split("/")
        d = tmp_path / "runs" / exp / f"seed{seed}"
        d.mkdir(parents=True)
        info = {**info, "task": "forcefield", "model": exp, "size": "tiny"}
        (d / "run.json").write_text(json.dumps(info))
        rows = metrics.filter((pl.col("experiment") == exp) & (pl.col("seed") == int(seed)))
        rows.drop("experiment", "seed").write_parquet(d / "metrics.parquet")
        dirs.append(d)
    out = tmp_path / "analysis" / "efficiency.parquet"
    table = write_efficiency_table(dirs, out, {"baseline": "base", "equivariant": "equi"})
    assert out.is_file() and out.with_suffix(".csv").is_file()
    c_star = table.filter(pl.col("quantity") == "c_star").get_column("value")[0]
    assert c_star == pytest.approx((1 - P) ** (-1 / ALPHA))


def test_one_seed_uses_the_decomposition_standard_error():
    metrics, runs = _matched()
    metrics = metrics.filter(pl.col("seed") == 0)
    runs = {k: v for k, v in runs.items() if k.endswith("/0")}
    extra = []
    for name, value in (("equiv_unbiased", 0.01), ("equiv_se", 0.001), ("total_se", 0.002)):
        extra += _metric_rows("base", 0, name, np.full(len(STEPS), value))
    metrics = pl.concat([metrics, pl.DataFrame(extra)])
    v = {r["quantity"]: r for r in efficiency_table(metrics, runs, {"experiments": ["base", "equi"], "n_boot": 50}).to_dicts()}  # fmt: skip
    total = A * 2000.0**-ALPHA / (1 - P)
    assert v["p"]["n"] == 1 and "decomposition" in v["p"]["method"]
    assert v["p"]["se"] == pytest.approx(P * math.hypot(0.1, 0.002 / total))
    assert v["c"]["se"] is None and v["c"]["value"] == pytest.approx(3.0)
