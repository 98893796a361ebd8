"""A run killed at any instant of checkpointing resumes to the uninterrupted run, bit for bit.

The kills come from the test-only crash hook ``EQUIPIPE_CRASH_AT=<point>@<step>``
(``equipipe.checkpoint``), which ends the process with ``os._exit`` at an exact point between
"metric rows logged" and "checkpoint in place" - no timing involved. Every task runs on a tiny
real store: SPICE-format conformers (GFN2-xTB labels) for the force field and the voxel
denoiser, chains of the PDB fixture files for flow matching.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch

from equipipe.checkpoint import CRASH_ENV, CRASH_EXIT, CRASH_POINTS, checkpoint_step, crash_point
from equipipe.data import pdb, spice
from equipipe.data.splits import write_split, write_subset

BIN = Path(sys.executable).parent
PDB_FIX = Path(__file__).parent / "fixtures" / "pdb" / "structures"


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("resume")
    spice.build_embedded(root / "raw", {"n_molecules": 4, "conformers": 2, "seed": 3, "workers": 1})
    spice.preprocess(root / "raw", root / "store", {})
    write_split(root / "store", root / "split.parquet", {"train": 0.5, "val": 0.5}, 0)
    write_subset(root / "split.parquet", root / "all.parquet", 1.0, "fraction")
    mol = {"store": root / "store", "split": root / "split.parquet", "subset": root / "all.parquet"}
    # three real chains (58-100 residues); the release's own split keeps one for validation
    chains = {"5pti_A": "5pti", "1bd2_B": "1bd2", "3pwp_B": "3pwp"}
    manifest = [
        {"id": cid, "pdb_id": code, "chain": cid[-1], "sequence": "A" * 60, "length": 60,
         "file": str(PDB_FIX / f"{code}.cif.gz"), "resolution": None, "method": None,
         "origin": "test", "error": None}
        for cid, code in chains.items()
    ]  # fmt: skip
    schema = {c: pl.String for c in pdb.MANIFEST_COLUMNS} | {
        "length": pl.Int64,
        "resolution": pl.Float64,
    }
    (root / "pdbraw").mkdir()
    pl.DataFrame(manifest, schema=schema).write_parquet(root / "pdbraw" / pdb.MANIFEST)
    pdb.preprocess(root / "pdbraw", root / "pdbstore", {"cluster_method": "builtin"})
    predefined = {"column": "id", "values": {"5pti_A": "train", "1bd2_B": "train", "3pwp_B": "val"}}
    write_split(root / "pdbstore", root / "pdbsplit.parquet", {"train": 1.0}, 0, predefined)
    write_subset(root / "pdbsplit.parquet", root / "pdball.parquet", 1.0, "fraction")
    chain = {
        "store": root / "pdbstore",
        "split": root / "pdbsplit.parquet",
        "subset": root / "pdball.parquet",
    }
    return {"forcefield": mol, "denoising": mol, "flowmatching": chain}


TRAIN = {"steps": 6, "batch_size": 2, "checkpoint_every": 2, "analysis_step": 4}
EVAL = {"every": 4, "early": [1], "k": 2, "examples": 2, "batch_size": 2}
SPECS = {
    "forcefield": {"model": "escaip", "task_cfg": {"model": "escaip"}, "train": {"ema": 0.9}},
    # VoxMol's dropout (0.1) draws from torch's global generator: it must be checkpointed
    "denoising": {
        "model": "voxmol",
        "task_cfg": {"grid_size": 16, "eval_modes": ["haar"]},
        "train": {"augment_prob": 1.0},
        "eval": {"grad_norm_batches": 0},
    },
    "flowmatching": {
        "model": "proteina",
        "task_cfg": {"eval_t": [0.5], "self_cond_prob": 0.5},
        "train": {"augment_prob": 1.0, "sample_per_cluster": True},
    },
}


def spec(task: str) -> dict:
    s = SPECS[task]
    return {
        "experiment": f"resume_{task}", "seed": 0, "task": task, "model": s["model"],
        "size": "tiny", "task_cfg": s["task_cfg"], "train": {**TRAIN, **s.get("train", {})},
        "eval": {**EVAL, **s.get("eval", {})},
    }  # fmt: skip


def train(task: str, data: dict[str, Path], out: Path, crash: str | None = None):
    cmd = [str(BIN / "equipipe"), "train", "--spec", json.dumps(spec(task)),
           "--store", str(data["store"]), "--split", str(data["split"]),
           "--subset", str(data["subset"]), "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(CRASH_ENV, None)
    if crash:
        env[CRASH_ENV] = crash
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def assert_same_run(out: Path, ref: Path) -> None:
    """Metric tables equal (wall clock aside) and every weight bitwise equal."""
    keys = ["step", "split", "metric", "field", "t"]

    def table(p: Path) -> pl.DataFrame:
        return pl.read_parquet(p / "metrics.parquet").drop("wall_s").sort(keys, nulls_last=True)

    a, b = table(out), table(ref)
    assert a.height == b.height, "metric rows lost or duplicated"
    assert a.equals(b)
    for name in ("model.pt", "early.pt", "model_ema.pt"):
        got = torch.load(out / name, weights_only=True)
        want = torch.load(ref / name, weights_only=True)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), name


def reference(task: str, data: dict[str, Path], out: Path) -> Path:
    """The uninterrupted run, in this process (same code, same single CPU thread)."""
    from equipipe.train import train as train_in_process

    train_in_process(spec(task), data["store"], data["split"], data["subset"], out)
    return out


def test_kill_at_every_point_between_metrics_and_checkpoint_resumes_bitwise(stores, tmp_path):
    """The voxel denoiser: its dropout draws from torch's global generator between checkpoints."""
    task, data = "denoising", stores["denoising"]
    ref, out = reference(task, data, tmp_path / "ref"), tmp_path / "run"
    ckpt, tmp = out / "work" / "ckpt.pt", out / "work" / "ckpt.pt.tmp"
    # one kill per point; the same step is checkpointed again after each kill, so a resume
    # that kept rows beyond its checkpoint would duplicate them
    plan = [  # (point, step, step of the checkpoint left in place, step the run resumed from)
        ("before_write", 2, 1, None),  # step 1 is an evaluation step: checkpointed too
        ("mid_write", 4, 2, 1),
        ("before_rename", 4, 2, 2),
        ("after_rename", 4, 4, 2),
    ]
    assert [p for p, *_ in plan] == list(CRASH_POINTS)
    for point, step, left, resumed in plan:
        p = train(task, data, out, crash=f"{point}@{step}")
        assert p.returncode == CRASH_EXIT, (point, p.stderr[-2000:])
        assert not (out / "metrics.parquet").exists()
        assert (
            (f"resumed from step {resumed}" in p.stderr) if resumed else "resumed" not in p.stderr
        )
        assert checkpoint_step(ckpt) == left  # whole, and the previous one until the rename
        if point == "mid_write":  # the half-written temporary file is never read
            with pytest.raises(Exception):  # noqa: B017 - torch raises several kinds
                torch.load(tmp, weights_only=True)
    p = train(task, data, out)
    assert p.returncode == 0 and "resumed from step 4" in p.stderr, p.stderr[-2000:]
    assert_same_run(out, ref)
    assert not (out / "work").exists()


@pytest.mark.parametrize("task", ["forcefield", "flowmatching"])
def test_resume_is_bitwise_for_every_task(stores, tmp_path, task):
    ref, out = reference(task, stores[task], tmp_path / "ref"), tmp_path / "run"
    p = train(task, stores[task], out, crash="after_rename@4")
    assert p.returncode == CRASH_EXIT and checkpoint_step(out / "work" / "ckpt.pt") == 4
    p = train(task, stores[task], out)
    assert p.returncode == 0 and "resumed from step 4" in p.stderr, p.stderr[-2000:]
    assert_same_run(out, ref)


def test_crash_hook_names_only_known_points(monkeypatch):
    monkeypatch.setenv(CRASH_ENV, "mid_write@4")
    assert crash_point("mid_write", 4) and not crash_point("mid_write", 2)
    assert not crash_point("before_rename", 4)
    monkeypatch.setenv(CRASH_ENV, "middle@2")
    with pytest.raises(ValueError, match="unknown point.*mid_write"):
        crash_point("mid_write", 2)


def test_every_global_random_state_survives_the_checkpoint_file(tmp_path):
    import random

    import numpy as np

    from equipipe.checkpoint import atomic_save, rng_state, set_rng_state

    cpu = torch.device("cpu")
    np.random.seed(1), random.seed(2), torch.manual_seed(3)
    atomic_save({"rng": rng_state(cpu)}, tmp_path / "ckpt.pt")
    first = (np.random.rand(3).tolist(), random.random(), torch.rand(3).tolist())
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["rng"]
    set_rng_state(state, cpu)
    assert (np.random.rand(3).tolist(), random.random(), torch.rand(3).tolist()) == first
    assert not (tmp_path / "ckpt.pt.tmp").exists()
