"""The e3nn equivariant force field: size matching, exact equivariance, gradient forces."""

from __future__ import annotations

import pytest
import torch

from equipipe.equivariance import decompose
from equipipe.models.equivariant import build, radius_graph
from equipipe.models.registry import build_model, model_info_rows, param_count
from equipipe.so3 import haar_rotations
from equipipe.tasks.forcefield import ForceFieldTask

SMALL = {"mul": 8, "radial_hidden": 16}


def test_sizes_match_escaip_by_parameter_count():
    escaip = {r["size"]: r["params"] for r in model_info_rows("escaip")}
    equi = {r["size"]: r["params"] for r in model_info_rows("equivariant")}  # meta device
    assert set(equi) == {"tiny", "1M", "4M", "6M"}
    for size, n in equi.items():
        assert abs(n / escaip[size] - 1) < 0.10, (size, n, escaip[size])


@pytest.mark.parametrize("forces", ["direct", "gradient"])
def test_exactly_equivariant_in_float64(ff, forces):
    torch.manual_seed(0)
    model = build("tiny", forces=forces, **SMALL).double().eval()
    ff.assert_equivariant(model, ff.batch(ForceFieldTask({"model": "equivariant"})))


def test_decomposition_at_float_precision(ff):
    """decompose() on a real molecule batch: the equivariance error is rounding noise."""
    task = ForceFieldTask({"model": "equivariant", "model_overrides": SMALL})
    torch.manual_seed(0)
    model = task.build_model("tiny").eval()
    batch32 = ff.batch(task, torch.float32)
    d32 = decompose(model, task, batch32, 4, torch.Generator().manual_seed(0))
    d64 = decompose(model.double(), task, ff.batch(task), 4, torch.Generator().manual_seed(0))
    for f in ("forces", "energy"):
        assert d64[f].total > 0 and d32[f].total > 0
        assert d64[f].pct < 1e-10, (f, d64[f].pct)  # float32 rotations bound it (~1e-14)
        assert d32[f].pct < 1e-8, (f, d32[f].pct)
        assert abs(d64[f].total - d64[f].mean - d64[f].equiv) <= 1e-9 * d64[f].total


def test_gradient_forces_are_minus_energy_gradient(ff):
    torch.manual_seed(0)
    model = build("tiny", forces="gradient", **SMALL).double()
    model.set_force_scale(2.5)
    batch = ff.batch(ForceFieldTask({"model": "equivariant"}), examples=ff.examples[:1])
    ff.assert_forces_are_minus_energy_gradient(model, batch, scale=2.5)
    # Training: the force loss reaches every parameter, the learned scale included.
    out = model(batch)
    assert out["forces"].requires_grad
    out["forces"].pow(2).sum().backward()
    assert model.force_scale.grad is not None and model.force_scale.grad.abs() > 0
    assert all(p.grad is not None for p in model.blocks.parameters())


def test_registry_and_errors():
    model = build_model("equivariant", "tiny", mul=8)
    assert model.cfg.mul == 8 and model.cfg.lmax == 1
    with pytest.raises(ValueError, match="allowed"):
        build_model("equivariant", "tiny", hidden=3)
    with pytest.raises(ValueError, match="allowed"):
        build("tiny", forces="magic")


def test_radius_graph_keeps_ties_and_is_rotation_stable():
    # Molecule 0: an octahedron around a centre (6 neighbours at exactly 1 A, then 1.41 A).
    # Molecule 1: two atoms 5 A apart, beyond a 4 A cutoff.
    octa = torch.tensor(
        [[0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]],
        dtype=torch.float64,
    )
    pos = torch.cat([octa, torch.tensor([[10.0, 0, 0], [15.0, 0, 0]], dtype=torch.float64)])
    batch = torch.tensor([0] * 7 + [1, 1])
    n_atoms = torch.tensor([7, 2])
    src, dst = radius_graph(pos, batch, n_atoms, cutoff=4.0, max_neighbors=4)
    assert int((dst == 0).sum()) == 6  # all six tied nearest neighbours kept
    assert not bool(((src >= 7) | (dst >= 7)).any())  # nothing across or beyond the cutoff
    assert bool((batch[src] == batch[dst]).all())
    edges = set(zip(src.tolist(), dst.tolist()))
    for seed in range(5):
        R = haar_rotations(1, torch.Generator().manual_seed(seed), dtype=torch.float64)[0]
        s2, d2 = radius_graph(pos @ R.T, batch, n_atoms, cutoff=4.0, max_neighbors=4)
        assert set(zip(s2.tolist(), d2.tolist())) == edges


@pytest.mark.parametrize("forces", ["direct", "gradient"])
def test_trains_through_the_force_field_task(ff, forces):
    ff.assert_trains(
        ForceFieldTask({"model": "equivariant", "model_overrides": {**SMALL, "forces": forces}})
    )


def test_cuequivariance_kernel_runs_on_cpu_exactly_equivariant_and_trains(ff):
    """kernel: cuequivariance (issue 17 item 4) — cuequivariance_torch's PyTorch fallback on
    the CPU: the same parameter count as the e3nn kernel, exact equivariance, and it learns."""
    torch.manual_seed(0)
    e3nn_model = build("tiny", **SMALL)
    model = build("tiny", kernel="cuequivariance", **SMALL)
    assert type(model.blocks[0].tp).__module__.startswith("cuequivariance_torch")
    assert param_count(model) == param_count(e3nn_model)
    model = model.double().eval()
    ff.assert_equivariant(model, ff.batch(ForceFieldTask({"model": "equivariant"})))
    overrides = {**SMALL, "kernel": "cuequivariance"}
    ff.assert_trains(ForceFieldTask({"model": "equivariant", "model_overrides": overrides}))
    with pytest.raises(ValueError, match="allowed: e3nn, cuequivariance"):
        build("tiny", kernel="triton")
