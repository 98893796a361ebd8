"""Decay rates of L_equiv and L_mean (equipipe.decay) and the figure kinds of issue 11."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import torch

from equipipe.analyses import landscape_from_model, write_landscape
from equipipe.decay import decay_table
from equipipe.figures import make_figure
from tests.test_collect import _write_run

STEPS = [0, 1, 2, 5, 10, 20, 50, 100, 200, 300, 400, 500]


def _run(tmp_path, exp, seed, a_equiv, a_mean, task="forcefield", t=None, noise=0.0):
    rng = np.random.default_rng(seed)
    rows = []
    for s in STEPS:
        x = max(s, 1)
        for metric, a in (("equiv_unbiased", a_equiv), ("mean_unbiased", a_mean)):
            v = 3.0 * x ** (-a) * float(np.exp(noise * rng.normal()))
            rows.append((s, s / 100, s * 0.1, "val", metric, "forces", t, v, 300, "(eV/A)^2"))
    return _write_run(tmp_path, exp, seed, rows, task=task)


def test_decay_rates_recover_planted_power_laws(tmp_path):
    """Exact power laws are recovered exactly in the window, per seed and for the seed mean;
    the ratio says which loss decays faster; the window leaves out the early transient."""
    runs = [_run(tmp_path, "ff", s, 1.5, 0.5) for s in (0, 1)]
    runs.append(_run(tmp_path, "fm", 0, 0.3, 0.6, task="flowmatching", t=0.9))
    table = decay_table(runs, {"fit_from": 0.1})
    ff = table.filter(pl.col("experiment") == "ff")
    assert set(ff["seed"]) == {"0", "1", "mean"}
    for loss, a in (("equiv", 1.5), ("mean", 0.5)):
        sub = ff.filter(pl.col("loss") == loss)
        np.testing.assert_allclose(sub["alpha"], a, rtol=1e-9)
        assert (sub["step_lo"] == 50).all() and (sub["step_hi"] == 500).all()
        assert (sub["n"] == 6).all()
    np.testing.assert_allclose(ff["ratio"], 3.0)
    fm = table.filter(pl.col("experiment") == "fm")
    assert fm["t"].to_list() == [0.9, 0.9] and fm["ratio"][0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="fit_from"):
        decay_table(runs, {"fit_from": 0.5, "fit_to": 0.2})


def test_decay_analysis_and_figure_through_the_cli(tmp_path):
    """``equipipe analyse decay`` (what the analyse rule runs) and ``equipipe figure`` of kind
    decay_rates; noisy curves give a bootstrap interval around the planted rate."""
    runs = [_run(tmp_path, "ff", s, 1.2, 0.4, noise=0.05) for s in (0, 1)]
    out = tmp_path / "decay"
    cli = [sys.executable, "-m", "equipipe.cli"]
    subprocess.run([*cli, "analyse", "decay", "--run", *map(str, runs), "--out", str(out),
                    "--spec", json.dumps({"fit_from": 0.1})], check=True)  # fmt: skip
    t = pl.read_parquet(out / "decay.parquet").filter(pl.col("seed") == "mean")
    eq = t.filter(pl.col("loss") == "equiv").row(0, named=True)
    assert eq["lo"] < eq["alpha"] < eq["hi"] and abs(eq["alpha"] - 1.2) < 0.1
    assert "bootstrap" in json.loads((out / "decay.json").read_text())["interval"]
    spec = {"name": "d", "kind": "decay_rates", "analyses": ["dr"], "caption": "x"}
    subprocess.run([*cli, "figure", "--spec", json.dumps(spec), "--extra", f"dr={out}",
                    "--out-prefix", str(tmp_path / "fig")], check=True)  # fmt: skip
    assert (tmp_path / "fig.png").stat().st_size > 10_000


def test_landscape_writes_slq_tables_and_the_density_figure_draws_them(tmp_path, escaip_setup):
    """A landscape with ``slq_probes`` writes the SLQ densities and κ(τ) of L_mean and
    L_equiv (and the exact ones on a block small enough for exact eigenvalues); the
    hessian_density kind draws them."""
    task, model, batches = escaip_setup(B=2, n_batches=1, hidden=8)
    spec = {"param": "force_head.ffn.up.weight", "k": 3, "grid": 2, "planes": [],
            "slq_probes": 3, "slq_steps": 12, "seed": 0}  # fmt: skip
    res = landscape_from_model(model, task, batches, spec, torch.Generator().manual_seed(0))
    write_landscape(res, tmp_path / "ls", {"spec": spec})
    thr = pl.read_parquet(tmp_path / "ls" / "landscape_threshold.parquet")
    assert set(thr["loss"]) == {"mean", "equiv"} and set(thr["method"]) == {"slq", "exact"}
    assert (thr["n_params"] == 64).all() and thr["resolved"].any()
    top = thr.filter(pl.col("threshold") == thr["threshold"].max())
    assert (top["count"] == 0).all()
    dens = pl.read_parquet(tmp_path / "ls" / "landscape_density.parquet")
    w = dens.filter(pl.col("method") == "slq").group_by("loss").agg(pl.col("weight").sum())
    np.testing.assert_allclose(w["weight"], 1.0)
    spec = {"name": "h", "kind": "hessian_density", "analyses": ["ls"], "caption": "x"}
    make_figure(spec, pl.DataFrame(), {}, tmp_path / "h", {"ls": tmp_path / "ls"})
    assert (tmp_path / "h.png").stat().st_size > 10_000
