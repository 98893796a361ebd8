"""Smoothing, dip and collect on small synthetic metric tables."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest

from equipipe.collect import STUDY_REF, collect, load_runs, pct_scale
from equipipe.metrics import METRICS_SCHEMA
from equipipe.smoothing import alphas, dip, ema

# ------------------------------------------------------------------ smoothing


def test_ema_matches_hand_computation():
    steps = [100, 1000, 2000, 4000]
    x = [4.0, 2.0, 1.0, 3.0]
    # s = 1000: spans 1, 1, 2, 4 -> alphas 1, 1, 2/3, 2/5
    y0 = 4.0
    y1 = 1.0 * 2.0 + 0.0 * y0  # alpha 1: raw
    y2 = (2 / 3) * 1.0 + (1 / 3) * y1
    y3 = (2 / 5) * 3.0 + (3 / 5) * y2
    np.testing.assert_allclose(alphas(steps, 1000), [1, 1, 2 / 3, 2 / 5])
    np.testing.assert_allclose(ema(steps, x, 1000), [y0, y1, y2, y3], rtol=1e-12)


def test_ema_first_point_raw_and_s_scale():
    # First point is always kept, even when its span > 1.
    steps = [500, 1000]
    out = ema(steps, [1.0, 0.0], s=100)  # spans 5, 10 -> alpha_1 = 2/11
    np.testing.assert_allclose(out, [1.0, 9 / 11])
    np.testing.assert_allclose(ema(steps, [1.0, 0.0], s=None), [1.0, 0.0])


def test_ema_skips_nan_and_log_mode():
    out = ema([1, 2, 3], [np.nan, 2.0, np.nan], s=1000)
    assert math.isnan(out[0]) and out[1] == 2.0 and out[2] == 2.0
    # log mode with alpha = 1 everywhere reproduces the input
    np.testing.assert_allclose(ema([1, 2], [10.0, 1000.0], s=1000, log=True), [10.0, 1000.0])
    with pytest.raises(ValueError):
        ema([2, 1], [1.0, 1.0])


def test_dip_finds_planted_minimum():
    rng = np.random.default_rng(0)
    steps = np.arange(0, 20000, 20)
    curve = 1.0 + ((steps - 4740) / 3000.0) ** 2  # minimum at 4740 (on the grid: 4740)
    noisy = curve * np.exp(rng.normal(0, 0.02, steps.size))
    step, value = dip(steps, noisy, window=(0, 10000), s=1000)
    assert abs(step - 4740) <= 400
    assert 0.9 < value < 1.1
    # a deeper minimum outside the window is ignored
    late = noisy.copy()
    late[steps > 15000] = 0.01
    assert dip(steps, late, window=(None, 10000), s=1000)[0] == step
    assert dip(steps, late, s=1000)[0] > 15000
    with pytest.raises(ValueError):
        dip(steps, noisy, window=(30000, None))


def test_dip_unsmoothed_ties_earliest():
    assert dip([1, 2, 3, 4], [3.0, 1.0, 1.0, 2.0], s=None) == (2, 1.0)


# ------------------------------------------------------------------ collect

BASE = ["step", "epoch", "wall_s", "split", "metric", "field", "t", "value", "n_elements", "unit"]


def _rows(steps, pct, *, field="forces", split="val", t=None, extra_metric=True):
    rows = []
    for s, p in zip(steps, pct):
        rows.append((s, s / 100, s * 0.1, split, "pct", field, t, p, 300, None))
        if extra_metric:
            rows.append((s, s / 100, s * 0.1, split, "total", field, t, 1.0, 300, "(eV/A)^2"))
            rows.append((s, s / 100, s * 0.1, split, "pct", "energy", t, 0.5, 4, None))
    return rows


def _write_run(root, exp, seed, rows, **info):
    d = root / exp / f"seed{seed}"
    d.mkdir(parents=True)
    df = pl.DataFrame(
        rows,
        schema={k: v for k, v in METRICS_SCHEMA.items() if k in BASE},  # a version-1 table
        orient="row",
    )
    df.write_parquet(d / "metrics.parquet")
    meta = {
        "experiment": exp,
        "seed": seed,
        "task": "forcefield",
        "model": "escaip",
        "size": "tiny",
        "n_train": 640,
        "batch_size": 64,
        "steps_per_epoch": 10,
        "params": 1000,
        "sec_per_step": 0.2,
        "device": "cpu",
        "primary_field": "forces",
        **info,
    }
    (d / "run.json").write_text(json.dumps(meta))
    return d


def test_collect_two_runs(tmp_path):
    steps = [0, 10, 20, 50, 100, 200, 400]
    pct_a = [0.20, 0.10, 0.05, 0.002, 0.004, 0.006, 0.010]  # dip at 50 (0.2 %)
    pct_b = [0.30, 0.10, 0.01, 0.008, 0.001, 0.003, 0.020]  # dip at 100 (0.1 %)
    da = _write_run(tmp_path, "default", 0, _rows(steps, pct_a), study_ref="escaip_default")
    db = _write_run(tmp_path, "default", 1, _rows(steps, pct_b), study_ref="escaip_default")
    out_m = tmp_path / "out" / "metrics_all.parquet"
    out_c = tmp_path / "out" / "paper_comparison.parquet"
    table = collect([da, db], out_m, out_c, s=None)

    m = pl.read_parquet(out_m)
    assert m.columns[:5] == ["experiment", "seed", "task", "model", "size"]
    assert set(BASE) <= set(m.columns)
    assert m.height == 2 * 3 * len(steps)
    assert sorted(m.get_column("seed").unique().to_list()) == [0, 1]
    assert m.schema["t"] == pl.Float64

    c = pl.read_parquet(out_c)
    assert c.equals(table)
    runs = c.filter((pl.col("level") == "run") & (pl.col("split") == "val")).sort("seed")
    assert runs.get_column("field").to_list() == ["forces", "forces"]
    assert runs.get_column("dip_step").to_list() == [50.0, 100.0]
    np.testing.assert_allclose(runs.get_column("min_pct").to_numpy(), [0.2, 0.1])
    np.testing.assert_allclose(runs.get_column("final_pct").to_numpy(), [1.0, 2.0])
    assert runs.get_column("last_step").to_list() == [400, 400]

    exp = c.filter(pl.col("level") == "experiment").row(0, named=True)
    assert exp["n_seeds"] == 2 and exp["seed"] is None
    assert exp["dip_step"] == 75.0 and (exp["dip_step_min"], exp["dip_step_max"]) == (50.0, 100.0)
    assert exp["min_pct"] == pytest.approx(0.15)
    assert (exp["min_pct_min"], exp["min_pct_max"]) == pytest.approx((0.1, 0.2))
    assert exp["final_pct"] == pytest.approx(1.5)
    assert exp["study_label"] == "EScAIP default"
    assert exp["study_dip_step_lo"] == 4740 and exp["study_final_pct_hi"] == 0.05

    # every study row appears: matched ones through experiments, the others as level "study"
    refs = set(c.get_column("study_ref").drop_nulls().to_list())
    assert refs == set(STUDY_REF)
    assert c.filter(pl.col("level") == "study").height == len(STUDY_REF) - 1

    rst = out_c.with_suffix(".rst").read_text()
    assert "EScAIP default" in rst and "(not run)" in rst and "+=" in rst
    assert "75 [50–100]" in rst


def test_collect_per_t_dip_window_and_percent_unit(tmp_path):
    steps = [0, 100, 200, 300, 400]
    rows = []
    for t, scale in ((0.0, 1.0), (0.9, 2.0)):
        pct = [scale * v for v in (10.0, 1.0, 0.5, 0.2, 0.9)]  # already in %
        rows += [(s, 0.0, 0.0, "val", "pct", "x1", t, p, 10, "%") for s, p in zip(steps, pct)]
    d = _write_run(
        tmp_path,
        "prot",
        0,
        rows,
        task="flowmatching",
        model="proteina",
        primary_field="x1",
        study_ref="proteina_60m",
        dip_window=[None, 200],
    )
    c = collect([d], tmp_path / "m.parquet", tmp_path / "c.parquet", s=None)
    r = c.filter(pl.col("level") == "run").sort("t")
    assert r.get_column("t").to_list() == [0.0, 0.9]
    assert r.get_column("dip_step").to_list() == [200.0, 200.0]  # window excludes step 300
    np.testing.assert_allclose(r.get_column("min_pct").to_numpy(), [0.5, 1.0])
    np.testing.assert_allclose(r.get_column("final_pct").to_numpy(), [0.9, 1.8])
    # per-t study value where the study gives one
    assert r.get_column("study_final_pct_lo").to_list() == [0.05, 6.5]


def test_collect_errors(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    with pytest.raises(FileNotFoundError, match="run.json"):
        collect([d], tmp_path / "m.parquet", tmp_path / "c.parquet")
    (d / "run.json").write_text(json.dumps({"experiment": "x"}))
    with pytest.raises(ValueError, match="seed"):
        collect([d], tmp_path / "m.parquet", tmp_path / "c.parquet")
    a = _write_run(tmp_path, "e", 0, _rows([0, 1], [0.1, 0.2]))
    b = _write_run(tmp_path / "other", "e", 0, _rows([0, 1], [0.1, 0.2]))
    with pytest.raises(ValueError, match="e/0"):
        load_runs([a, b])
    _write_run(tmp_path, "r", 0, _rows([0, 1], [0.1, 0.2]), study_ref="nope")
    with pytest.raises(ValueError, match="study_ref"):
        collect([tmp_path / "r" / "seed0"], tmp_path / "m.parquet", tmp_path / "c.parquet")


def test_pct_scale():
    assert pct_scale([None]) == 100.0
    assert pct_scale(["%"]) == 1.0


def test_collect_cli_takes_the_configs_dip_window(tmp_path):
    """``equipipe collect --dip-windows`` with the windows the collect rule derives from
    config/config.yaml (``equipipe.config.dip_windows``): an EScAIP-like curve whose early dip
    (0.1 % at step 20) lies before a lower final value (0.05 %) reports the dip inside the
    window and the final value separately, and prints the window; without the window the dip
    would be the whole-run minimum at the end."""
    import subprocess
    import sys
    from pathlib import Path

    from equipipe.config import dip_windows, load_config

    root = Path(__file__).resolve().parent.parent
    windows = dip_windows(load_config(root / "config" / "config.yaml"))
    assert windows["ff_default"] == [1, 56] and windows["fm_default"] == [1, 30]
    steps = [0, 5, 10, 20, 50, 100, 200, 300, 400, 500]
    pct = [0.2, 0.01, 0.004, 0.001, 0.003, 0.002, 0.0015, 0.001, 0.0007, 0.0005]
    d = _write_run(tmp_path, "ff_default", 0, _rows(steps, pct), study_ref="escaip_default")
    wfile = tmp_path / "windows.json"
    wfile.write_text(json.dumps(windows))
    out_c = tmp_path / "c.parquet"
    cli = [sys.executable, "-m", "equipipe.cli", "collect", "--runs", str(d)]
    cli += ["--out-metrics", str(tmp_path / "m.parquet"), "--out-comparison", str(out_c)]
    subprocess.run([*cli, "--dip-windows", f"@{wfile}"], check=True)
    r = pl.read_parquet(out_c).filter(pl.col("level") == "experiment").row(0, named=True)
    assert (r["dip_window_lo"], r["dip_window_hi"]) == (1.0, 56.0)
    assert r["dip_step"] == 20 and r["min_pct"] == pytest.approx(0.1, rel=0.3)
    assert r["final_pct"] == pytest.approx(0.05)
    rst = out_c.with_suffix(".rst").read_text()
    assert "dip window" in rst and "1–56" in rst
    assert out_c.with_suffix(".html").read_text().count("1–56") >= 1
    # the same runs without a window: the dip is the whole-run minimum, at the last step
    subprocess.run(cli, check=True)
    r = pl.read_parquet(out_c).filter(pl.col("level") == "experiment").row(0, named=True)
    assert r["dip_window_lo"] is None and r["dip_step"] == 500
    assert "whole run" in out_c.with_suffix(".rst").read_text()
