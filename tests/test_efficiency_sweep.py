"""The efficiency gap's α without the cosine schedule's bias, and the tuning sweep: its summary
command (``equipipe tuning-summary``) and c* over the sweep's settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from equipipe.efficiency import analyse, lr_window
from equipipe.train import TrainConfig, lr_at

ALPHA, P, A = 0.4, 0.04, 3.0
STEPS = [0, 1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 400, 500]
COSINE = {"steps": 500, "lr": 5e-3, "schedule": "cosine", "warmup_steps": 20, "lr_floor": 0.5}
DECAY_FROM = 160  # the cosine decay's extra drop starts where lr falls below 0.9 x peak


def _loss(steps, alpha=ALPHA, scale=1.0):
    """A power law in steps, steepened by the decay after DECAY_FROM (what a cosine does)."""
    s = np.maximum(np.asarray(steps, float), 0.5)
    extra = np.where(s > DECAY_FROM, (s / DECAY_FROM) ** -0.5, 1.0)
    return scale * A * s**-alpha * extra


def _rows(exp, metric, values, split="val"):
    return [
        {
            "experiment": exp,
            "seed": 0,
            "step": s,
            "epoch": s / 100,
            "wall_s": float(s),
            "split": split,
            "metric": metric,
            "field": "forces",
            "t": None,
            "value": float(v),
            "n_elements": 300,
            "unit": "(eV/A)^2",
        }
        for s, v in zip(STEPS, values)
    ]


def _pair(p=P):
    total_b, total_e = _loss(STEPS), _loss(STEPS, scale=0.9)
    rows = _rows("aug", "total", total_b) + _rows("aug", "mean_unbiased", total_b * (1 - p))
    rows += _rows("aug", "pct", np.full(len(STEPS), p)) + _rows("eq", "total", total_e)
    runs = {
        f"{e}/0": {
            "experiment": e,
            "seed": 0,
            "sec_per_step": sec,
            "model": model,
            "device": "cpu",
            "params": 1000,
            "primary_field": "forces",
            "train_config": COSINE,
            "eval_config": {"split": "test"},
        }
        for e, sec, model in (("aug", 0.3, "escaip"), ("eq", 0.15, "equivariant"))
    }
    return pl.DataFrame(rows), runs


def test_lr_window_is_the_constant_segment_of_the_schedule():
    steps = np.array(STEPS)
    mask = lr_window(steps, COSINE, 0.1)
    cfg = TrainConfig(**COSINE)
    lr = np.array([lr_at(max(s - 1, 0), cfg) for s in STEPS])
    assert steps[mask].tolist() == [30, 50, 75, 100, 150]  # after warm-up, lr >= 0.9 x peak
    assert (lr[mask] >= 0.9 * cfg.lr).all() and lr[steps == 200][0] < 0.9 * cfg.lr
    const = lr_window(steps, {**COSINE, "schedule": "constant"}, 0.1)
    assert steps[const].tolist() == [s for s in STEPS if s > 20]
    assert lr_window(steps, None, 0.1).tolist() == (steps > 0).tolist()


def test_alpha_on_the_constant_segment_is_unbiased_and_the_tail_is_not():
    metrics, runs = _pair()
    r = analyse(metrics, runs, {"baseline": "aug", "equivariant": "eq", "n_boot": 100})
    n = r.numbers
    assert n["alpha"]["value"] == pytest.approx(ALPHA, abs=1e-9)
    assert "constant-learning-rate segment (steps 30-150" in n["alpha"]["method"]
    assert n["alpha_tail"]["value"] > ALPHA + 0.1  # the decay steepens the tail fit
    assert n["c_star"]["value"] == pytest.approx((1 - P) ** (-1 / ALPHA))
    tail = analyse(
        metrics,
        runs,
        {"baseline": "aug", "equivariant": "eq", "alpha_window": "tail", "n_boot": 50},
    )
    assert tail.numbers["alpha"]["value"] == pytest.approx(n["alpha_tail"]["value"])
    assert "alpha_tail" not in tail.numbers


def _write_run(root: Path, exp: str, model: str, lr: float, warmup: int, p: float, scale: float):
    d = root / exp / "seed0"
    d.mkdir(parents=True)
    tc = {**COSINE, "lr": lr, "warmup_steps": warmup}
    info = {
        "experiment": exp,
        "seed": 0,
        "task": "forcefield",
        "model": model,
        "size": "tiny",
        "primary_field": "forces",
        "sec_per_step": 0.2,
        "steps": 500,
        "train_config": tc,
    }
    (d / "run.json").write_text(json.dumps(info))
    total = _loss(STEPS, scale=scale)
    rows = (
        _rows(exp, "total", total, "val")
        + _rows(exp, "pct", np.full(len(STEPS), p), "val")
        + _rows(exp, "equiv_unbiased", total * p, "val")
        + _rows(exp, "mean_unbiased", total * (1 - p), "val")
        + _rows(exp, "total_se", total * 0.01, "val")
        + _rows(exp, "total", total * 9, "train")
    )
    pl.DataFrame(rows).drop("experiment", "seed").write_parquet(d / "metrics.parquet")


def test_tuning_summary_command_and_c_star_over_the_sweep(tmp_path):
    runs = tmp_path / "runs"
    grid = [
        ("escaip", 2e-3, 0.02, 1.3),
        ("escaip", 5e-3, 0.04, 1.0),
        ("escaip", 1e-2, 0.08, 1.1),
        ("equivariant", 5e-3, 1e-12, 1.2),
        ("equivariant", 1e-2, 1e-12, 0.8),
    ]
    for model, lr, p, scale in grid:
        _write_run(runs, f"tune_{model}_lr{lr:g}_wu20", model, lr, 20, p, scale)
    (runs / "tune_unfinished" / "seed0").mkdir(parents=True)  # no run.json: left out
    out = tmp_path / "summary"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [
        sys.executable,
        "-m",
        "equipipe.cli",
        "tuning-summary",
        "--runs",
        str(runs),
        "--out",
        str(out),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert res.returncode == 0, res.stderr
    table = res.stdout.strip().splitlines()
    assert table[0] == "| model | warm-up | lr 0.002 | lr 0.005 | lr 0.01 |"
    assert table[2].startswith("| equivariant | 20 | — |") and table[3].count("**") == 2
    curves = pl.read_csv(out / "sweep_curves.csv")
    finals = pl.read_csv(out / "sweep_final.csv")
    assert curves.get_column("experiment").n_unique() == 5
    assert (curves.get_column("split") == "val").all()  # the held-out rows only, never train
    assert finals.height == 5 and finals.get_column("step").unique().to_list() == [500]
    chosen = finals.filter(pl.col("chosen")).sort("model")
    assert chosen.get_column("lr").to_list() == [1e-2, 5e-3]  # equivariant, escaip: lowest total
    row = finals.filter(pl.col("experiment") == "tune_escaip_lr0.002_wu20").row(0, named=True)
    assert row["total"] == pytest.approx(_loss([500], scale=1.3)[0], rel=1e-5)
    assert row["pct"] == pytest.approx(0.02) and row["mean"] == pytest.approx(row["total"] * 0.98)

    metrics, pair = _pair()
    spec = {
        "baseline": "aug",
        "equivariant": "eq",
        "n_boot": 100,
        "sweep": str(out / "sweep_curves.csv"),
    }
    r = analyse(metrics, pair, spec)
    n = r.numbers
    # each setting's own α (its constant-lr window has 5 evaluations here) is ALPHA
    per = sorted((1 - p) ** (-1 / ALPHA) for _, _, p, _ in grid[:3])
    assert n["c_star_sweep"]["value"] == pytest.approx(per[1])
    assert n["c_star_sweep"]["lo"] <= per[0] and n["c_star_sweep"]["hi"] >= per[2]
    assert n["c_star_sweep"]["n"] == 3 and "3 of 3" in n["c_star_sweep"]["method"]
    assert n["p_sweep"]["lo"] == pytest.approx(0.02) and n["p_sweep"]["hi"] == pytest.approx(0.08)
    assert "chosen lr 0.005" in n["sweep_final_baseline"]["note"]
    assert n["sweep_final_equivariant"]["value"] == pytest.approx(
        _loss([500], scale=0.8)[0], rel=1e-5
    )
    with pytest.raises(ValueError, match="no runs of model"):
        analyse(metrics, {k: {**v, "model": "nequip"} for k, v in pair.items()}, spec)


def test_figure_draws_the_sweep_band(tmp_path):
    from equipipe.figures import make_figure

    runs = tmp_path / "runs"
    for model, lr, p, scale in (
        ("escaip", 2e-3, 0.02, 1.3),
        ("escaip", 5e-3, 0.04, 1.0),
        ("equivariant", 5e-3, 0.0, 1.2),
    ):
        _write_run(runs, f"tune_{model}_lr{lr:g}", model, lr, 20, p, scale)
    from equipipe.tuning import summarise_sweep

    summarise_sweep(runs, tmp_path / "summary")
    metrics, pair = _pair()
    spec = {
        "kind": "efficiency_gap",
        "experiments": ["aug", "eq"],
        "style": {"n_boot": 50, "sweep": str(tmp_path / "summary" / "sweep_curves.csv")},
    }
    fig = make_figure(spec, metrics, pair, tmp_path / "gap")
    assert (tmp_path / "gap.png").stat().st_size > 1000
    axes = [ax for ax in fig.get_axes() if ax.get_title()]
    assert any("Tuning sweep" in ax.get_title() and "val split" in ax.get_title() for ax in axes)
    assert any(ax.get_title().startswith("Loss vs steps (test split)") for ax in axes)
    text = "\n".join(t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")))
    assert "over the tuning sweep: c* =" in text and "constant-learning-rate segment" in text
