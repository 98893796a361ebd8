"""The NequIP adapter (equipipe/models/nequip_adapter.py): the `nequip` package's model behind
the force-field task — parameter counts matched to escaip, exact equivariance in float64,
forces = -dE/dx, NequIP's normalisation from the training split, and training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from equipipe.equivariance import decompose
from equipipe.models.registry import build_model, model_info_rows
from equipipe.tasks.forcefield import ForceFieldTask
from tests.test_equivariant import _dead_einsums

SMALL = {"num_features": 8, "radial_mlp_width": 16}
SMALL64 = {**SMALL, "model_dtype": "float64"}


def test_sizes_match_escaip_by_parameter_count():
    escaip = {r["size"]: r["params"] for r in model_info_rows("escaip")}
    nequip = {r["size"]: r["params"] for r in model_info_rows("nequip")}
    assert set(nequip) == {"tiny", "1M", "4M", "6M"}
    for size, n in nequip.items():
        assert abs(n / escaip[size] - 1) < 0.10, (size, n, escaip[size])


def test_normalisation_from_the_training_split(molecules):
    examples = molecules
    task = ForceFieldTask({"model": "nequip", "model_overrides": SMALL64})
    state = task.fit(examples)
    stats = state["model_stats"]
    assert stats["elements"] == [1, 6, 7, 8, 9, 15, 16, 17, 35, 53]  # vocabulary kept
    forces = np.concatenate([ex["forces"].reshape(-1) for ex in examples])
    assert stats["force_rms"] == pytest.approx(float(np.sqrt(np.mean(forces**2))))
    # mean neighbours within r_max = 5 Å, counted directly
    n_edges = sum(
        int(((d := np.linalg.norm(ex["pos"][:, None] - ex["pos"][None], axis=-1)) <= 5.0).sum())
        - len(d)
        for ex in examples
    )
    assert stats["avg_num_neighbors"] == pytest.approx(
        n_edges / sum(len(ex["z"]) for ex in examples)
    )
    model = task.build_model("tiny")
    assert model.cfg.force_rms == stats["force_rms"]
    assert model.cfg.energy_std == state["energy_std"] and model.cfg.force_std == state["force_std"]
    # the rebuilt model of a reloaded run (set_state, then build) has the same statistics
    task2 = ForceFieldTask({"model": "nequip", "model_overrides": SMALL64})
    task2.set_state(state)
    assert task2.build_model("tiny").cfg == model.cfg
    # global state untouched: float32 default dtype
    assert torch.get_default_dtype() == torch.float32


def test_exactly_equivariant_in_float64(ff):
    task = ForceFieldTask({"model": "nequip", "model_overrides": SMALL64})
    batch = ff.batch(task)
    torch.manual_seed(0)
    model = task.build_model("tiny").eval()
    out = ff.assert_equivariant(model, batch)
    assert out["forces"].dtype == torch.float64
    d = decompose(model, task, batch, 4, torch.Generator().manual_seed(0))
    for f in ("forces", "energy"):
        assert d[f].total > 0 and d[f].pct < 1e-10, (f, d[f].pct)


def test_forces_are_minus_energy_gradient(ff):
    task = ForceFieldTask({"model": "nequip", "model_overrides": SMALL64})
    batch = ff.batch(task, examples=ff.examples[:1])
    torch.manual_seed(0)
    model = task.build_model("tiny")
    s = task.state  # normalised units: F_norm = -(energy_std / force_std) dE_norm/dx
    ff.assert_forces_are_minus_energy_gradient(model, batch, s["energy_std"] / s["force_std"])
    out = model(batch)  # training: the force loss reaches the network's weights
    assert out["forces"].requires_grad
    out["forces"].pow(2).sum().backward()
    assert sum(p.grad.abs().sum() for p in model.parameters() if p.grad is not None) > 0


def test_trains_through_the_force_field_task(ff):
    ff.assert_trains(ForceFieldTask({"model": "nequip", "model_overrides": SMALL}))


def test_errors_name_the_allowed_values():
    with pytest.raises(ValueError, match="num_features"):
        build_model("nequip", "tiny", mul=8)
    with pytest.raises(ValueError, match="allowed"):
        build_model("nequip", "2M")
    model = build_model("nequip", "tiny", **SMALL64)
    batch = {
        "pos": torch.zeros(2, 3, dtype=torch.float64),
        "z": torch.tensor([1, 2]),  # helium: not a training element
        "batch": torch.zeros(2, dtype=torch.long),
        "n_atoms": torch.tensor([2]),
    }
    with pytest.raises(ValueError, match=r"elements \[2\]"):
        model(batch)


@pytest.mark.slow  # 33 s to 3 min wall, by machine load (data embedding + training)
def test_trains_in_the_embedded_pipeline(tmp_path):
    """A real Snakemake run of the tiny workflow config with the nequip model: embedded SPICE
    data, the training rule, its metrics (held-out force error and equivariance share)."""
    import polars as pl
    import yaml

    from .test_workflow import TINY, snakemake

    cfg = yaml.safe_load(TINY.read_text())
    ff = cfg["tasks"]["forcefield"]
    ff.update(model="nequip", train={**ff["train"], "steps": 6})
    ff["task_cfg"] = {**ff["task_cfg"], "model_overrides": SMALL}
    cfg["experiments"] = {"ff_nequip": {"task": "forcefield", "subset": "all", "seeds": [0]}}
    cfg["figures"] = {
        "pct": {"kind": "pct_vs_step", "experiments": ["ff_nequip"], "caption": "nequip"}
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "results" / "runs" / "ff_nequip" / "seed0"
    snakemake(tmp_path, "--cores", "2", str(run.relative_to(tmp_path) / "metrics.parquet"))
    info = __import__("json").loads((run / "run.json").read_text())
    assert info["task_state"]["model_stats"]["avg_num_neighbors"] > 1
    m = pl.read_parquet(run / "metrics.parquet")
    final = m.filter(pl.col("step") == m["step"].max())
    assert final.height > 0 and final["value"].is_finite().all()


def test_tuning_config_plans_the_same_sweep_for_every_model(tmp_path):
    """config/tuning.yaml over config/config.yaml plans one training job per (model, learning
    rate, warm-up): >= 4 learning rates and the same grid for each model of the gap."""
    import subprocess
    import sys
    from collections import defaultdict
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parent.parent
    sweep = yaml.safe_load((root / "config" / "tuning.yaml").read_text())["experiments"]
    grids = defaultdict(set)
    for exp in sweep.values():
        grids[exp.get("model", "escaip")].add((exp["train"]["lr"], exp["train"]["warmup_steps"]))
    assert set(grids) == {"escaip", "equivariant", "nequip"}
    assert len({g for g in map(frozenset, grids.values())}) == 1  # the same budget
    assert len({lr for lr, _ in grids["nequip"]}) >= 4
    bin_dir = Path(sys.executable).parent
    out = subprocess.run(
        [str(bin_dir / "snakemake"), "-n", "-s", str(root / "workflow" / "Snakefile"),
         "--directory", str(tmp_path), "--configfile", str(root / "config" / "config.yaml"),
         str(root / "config" / "tuning.yaml")],
        capture_output=True, text=True, env={**__import__("os").environ, "PATH": f"{bin_dir}:"
         + __import__("os").environ["PATH"]}, check=True,
    )  # fmt: skip
    text = out.stdout + out.stderr
    for name in sweep:
        assert f"results/runs/{name}/seed0/metrics.parquet" in text, name


def test_built_model_has_no_dead_einsums_and_the_same_outputs(ff):
    """``build`` erases e3nn's unused outer-product einsums from NequIP's tensor products: the
    same energies and forces, bit for bit, as the model as NequIP builds it."""
    from equipipe.models import nequip_adapter as na

    task = ForceFieldTask({"model": "nequip", "model_overrides": SMALL})
    batch = ff.batch(task)
    torch.manual_seed(0)
    pruned = na.build("tiny", **SMALL)
    torch.manual_seed(0)
    as_built = na.NequIPForceField(pruned.cfg)  # the same init, not pruned
    assert _dead_einsums(as_built) > 0 and _dead_einsums(pruned) == 0
    out_p, out_b = pruned(batch), as_built(batch)
    for f in ("energy", "forces"):
        assert torch.equal(out_p[f], out_b[f]), f
