"""The training loop on a tiny real SPICE-format store (RDKit conformers, GFN2-xTB labels)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from equipipe.checkpoint import checkpoint_step
from equipipe.data import spice
from equipipe.data.splits import write_split, write_subset
from equipipe.train import TrainConfig, eval_steps, lr_at

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spice")
    spice.build_embedded(root / "raw", {"n_molecules": 6, "conformers": 3, "seed": 3, "workers": 1})
    spice.preprocess(root / "raw", root / "store", {})
    write_split(root / "store", root / "split.parquet", {"train": 0.5, "val": 0.5}, 0)
    write_subset(root / "split.parquet", root / "all.parquet", 1.0, "fraction")
    return {
        "store": root / "store",
        "split": root / "split.parquet",
        "subset": root / "all.parquet",
    }


def spec(**train) -> dict:
    return {
        "experiment": "t", "seed": 0, "task": "forcefield", "model": "escaip", "size": "tiny",
        "task_cfg": {"model": "escaip", "model_overrides": {}},
        "train": {"steps": 24, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 3, "analysis_step": 6, **train},
        "eval": {"every": 8, "early": [1, 2], "k": 3, "examples": 4, "batch_size": 4},
    }  # fmt: skip


def run_cli(s: dict, d: dict, out: Path, **popen) -> subprocess.Popen:
    cmd = [str(BIN / "equipipe"), "train", "--spec", json.dumps(s), "--store", str(d["store"]),
           "--split", str(d["split"]), "--subset", str(d["subset"]), "--out", str(out)]  # fmt: skip
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, **popen)


def table(path: Path) -> pl.DataFrame:
    return (
        pl.read_parquet(path)
        .drop("wall_s")
        .sort(["step", "split", "metric", "field", "t"], nulls_last=True)
    )


def test_eval_schedule_and_lr():
    assert eval_steps(1000, 100, [1, 2, 5, 10, 20, 50, 100, 200]) == [
        0,
        1,
        2,
        5,
        10,
        20,
        50,
    ] + list(range(100, 1001, 100))
    assert eval_steps(30, 100, [1, 2, 5, 10, 20, 50]) == [0, 1, 2, 5, 10, 20, 30]
    cfg = TrainConfig(steps=100, lr=1.0, schedule="cosine", warmup_steps=10, lr_floor=0.5)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(100, cfg) == pytest.approx(0.5)
    assert lr_at(55, cfg) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="allowed"):
        TrainConfig.from_dict({"stepz": 3})


def test_sigterm_checkpoints_and_resume_equals_uninterrupted(tiny_store, tmp_path):
    s = spec(steps=30)
    ref = tmp_path / "ref"
    assert run_cli(s, tiny_store, ref).wait(timeout=600) == 0
    out = tmp_path / "run"
    p = run_cli(s, tiny_store, out, stderr=subprocess.PIPE, text=True)
    ckpt = out / "work" / "ckpt.pt"
    deadline = time.time() + 300
    while time.time() < deadline and (checkpoint_step(ckpt) or 0) < 6:
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "checkpoint at step" in err
    assert (out / "work" / "ckpt.pt").exists() and not (out / "metrics.parquet").exists()
    p = run_cli(s, tiny_store, out, stderr=subprocess.PIPE, text=True)
    err = p.communicate(timeout=600)[1]
    assert p.returncode == 0 and "resumed from step" in err
    assert table(out / "metrics.parquet").equals(table(ref / "metrics.parquet"))
    info = json.loads((out / "run.json").read_text())
    assert info["steps_per_epoch"] == math.ceil(info["n_train"] / 4)
    assert info["primary_field"] == "forces" and info["params"] > 1e5
    assert {"torch", "numpy"} <= set(info["versions"])


def test_outputs_and_metric_table(tiny_store, tmp_path):
    assert run_cli(spec(), tiny_store, tmp_path).wait(timeout=600) == 0
    m = pl.read_parquet(tmp_path / "metrics.parquet")
    assert m.columns == [
        "step",
        "epoch",
        "wall_s",
        "split",
        "metric",
        "field",
        "t",
        "value",
        "n_elements",
        "unit",
        "ell",
        "layer",
    ]
    pct = m.filter((pl.col("metric") == "pct") & (pl.col("field") == "forces"))
    assert pct["step"].to_list() == [0, 1, 2, 8, 16, 24]
    got = set(m.filter(pl.col("step") == 8)["metric"])
    assert {"total", "mean", "equiv", "equiv_unbiased", "mean_unbiased", "k", "pct", "total_se", "equiv_se",
            "grad_norm_equiv", "grad_norm_mean", "grad_ratio", "head_deviation", "force_mae", "energy_mae"} <= got  # fmt: skip
    # T = M + E per element, as logged
    row = {
        r["metric"]: r["value"]
        for r in m.filter((pl.col("step") == 8) & (pl.col("field") == "forces")).iter_rows(
            named=True
        )
    }
    assert row["total"] == pytest.approx(row["mean"] + row["equiv"], rel=1e-9)
    assert set(m.filter(pl.col("split") == "val_ema")["metric"]) >= {"force_mae"}
    for name in ("model.pt", "early.pt", "run.json"):
        assert (tmp_path / name).exists()
    assert not (tmp_path / "work").exists()


def test_nan_loss_stops_with_message_and_checkpoint(tiny_store, tmp_path):
    p = run_cli(
        spec(lr=1e30, grad_clip=None), tiny_store, tmp_path, stderr=subprocess.PIPE, text=True
    )
    err = p.communicate(timeout=600)[1]
    assert p.returncode != 0
    assert "non-finite training loss" in err and "Lower the learning rate" in err
    assert (tmp_path / "work" / "ckpt.pt").exists()


def test_ddp_two_ranks_on_cpu_match_single_process(tiny_store, tmp_path):
    """`equipipe train --gpus 2` runs DDP via torchrun (gloo on CPU): same run, same numbers."""
    s = spec(steps=8, checkpoint_every=100)
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli(s, tiny_store, one).wait(timeout=600) == 0
    cmd = [str(BIN / "equipipe"), "train", "--spec", json.dumps(s), "--store", str(tiny_store["store"]),
           "--split", str(tiny_store["split"]), "--subset", str(tiny_store["subset"]), "--out", str(two),
           "--gpus", "2"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "EQUIPIPE_GPU_SLOTS": "0"})  # fmt: skip
    assert out.returncode == 0, "\n".join(
        l for l in out.stderr.splitlines() if "error" in l.lower()
    )[-3000:]
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    a, b = table(one / "metrics.parquet"), table(two / "metrics.parquet")
    assert a.select("step", "split", "metric").equals(b.select("step", "split", "metric"))
    # same initial weights (rank 0's are broadcast) and rank 0 evaluates: step 0 is identical
    at0 = pl.col("step") == 0
    assert a.filter(at0)["value"].to_list() == pytest.approx(
        b.filter(at0)["value"].to_list(), rel=1e-6, nan_ok=True
    )
    # the first step's loss is the global batch's mean (per-rank means weighted by examples;
    # the force term is a per-atom mean, so not bit-equal to one process on the union batch)
    loss = (pl.col("metric") == "train_loss") & (pl.col("step") == 1)
    assert a.filter(loss)["value"][0] == pytest.approx(b.filter(loss)["value"][0], rel=0.1)
    assert b.filter(pl.col("value").is_nan() & (pl.col("metric") == "pct")).height == 0


@pytest.mark.parametrize("optimizer", ["adamw", "adam"])
def test_adam_eps_zero_leaves_zero_gradient_elements_finite(optimizer):
    """VoxMol's AdamW(eps=0): an element with an exactly zero gradient must not become NaN."""
    import torch

    from equipipe.train import make_optimizer

    p = torch.nn.Parameter(torch.ones(3))
    opt = make_optimizer([p], TrainConfig(optimizer=optimizer, lr=1e-3, eps=0.0, weight_decay=0.0))
    p.grad = torch.tensor([1.0, 0.0, -2.0])
    opt.step()
    assert torch.isfinite(p).all() and p[1] == 1.0
    assert torch.allclose(p[[0, 2]], torch.tensor([0.999, 1.001]))  # eps 0 elsewhere: lr steps


def test_spectrum_rows_at_their_cadence_through_the_cli(tiny_store, tmp_path):
    """eval.spectrum_every: per-ℓ rows of outputs and probed layers, collected with ell/layer."""
    import equipipe
    from equipipe.collect import read_run
    from equipipe.metrics import METRICS_SCHEMA_VERSION, read_metrics

    s = spec(steps=4)
    s["task_cfg"] = {"model": "equivariant", "model_overrides": {"mul": 4, "radial_hidden": 8}}
    s["model"] = "equivariant"
    s["eval"].update(spectrum_every=2, spectrum_lmax=3)
    assert run_cli(s, tiny_store, tmp_path).wait(timeout=600) == 0
    info = read_run(tmp_path)
    assert info["metrics_schema_version"] == METRICS_SCHEMA_VERSION
    assert info["versions"]["equipipe"] == equipipe.__version__
    m = read_metrics(tmp_path, info)
    power = m.filter(pl.col("metric") == "spectrum_power")
    assert sorted(power["step"].unique()) == [0, 2, 4]  # evaluations 0, 1, 2, 4: every 2nd + last
    assert set(power["ell"]) == {"0", "1", "2", "3"} and set(power["field"]) == {"forces", "energy"}
    share = m.filter(pl.col("metric").is_in(["layer_share", "layer_share_remainder"]))
    assert set(share["layer"]) == {"blocks.0", "blocks.1"}
    for (_, _), g in share.group_by("step", "layer"):
        assert g["value"].sum() == pytest.approx(1.0, abs=1e-9)
    # an exactly equivariant model: its forces' ℓ >= 1 power is rounding noise next to ℓ = 0
    last = power.filter((pl.col("step") == 4) & (pl.col("field") == "forces"))
    vals = dict(zip(last["ell"], last["value"]))
    assert max(abs(vals[e]) for e in ("1", "2", "3")) < 1e-6 * vals["0"]
