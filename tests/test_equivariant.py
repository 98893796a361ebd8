"""The e3nn equivariant force field: size matching, exact equivariance, gradient forces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from equipipe.equivariance import decompose
from equipipe.models.equivariant import build, radius_graph
from equipipe.models.registry import build_model, model_info_rows
from equipipe.so3 import haar_rotations
from equipipe.tasks.forcefield import ForceFieldTask

# Real molecules (RDKit ETKDG + MMFF): phenol, a symmetric ring, and ibuprofen (33 atoms, so
# the 20-neighbour cap truncates).
SMILES = ["c1ccccc1O", "Cc1c(C)c(C)c(C)c(C)c1C", "CC(C)Cc1ccc(cc1)C(C)C(=O)O"]
SMALL = {"mul": 8, "radial_hidden": 16}


@pytest.fixture(scope="module")
def examples() -> list[dict[str, np.ndarray]]:
    from equipipe.data.embedded import embed_conformers

    rng = np.random.default_rng(0)
    out = []
    for i, smi in enumerate(SMILES):
        mol = embed_conformers(smi, 1, seed=i)
        z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
        for _ in range(2):  # labels from a smooth pair potential (an equivariant target)
            pos = mol.GetConformer().GetPositions() + rng.normal(0, 0.05, (len(z), 3))
            x = torch.tensor(pos, requires_grad=True)
            d = torch.pdist(x)
            energy = (torch.exp(-d) - 0.5 * torch.exp(-d / 2)).sum()
            (grad,) = torch.autograd.grad(energy, x)
            out.append({"pos": pos, "z": z, "energy": energy.item(), "forces": -grad.numpy()})
    return out


def as_batch(examples, task, dtype=torch.float64):
    task.fit(examples)
    batch = task.collate(examples)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


def rotate(batch, R):
    out = dict(batch)
    out["pos"] = batch["pos"] @ R.T
    return out


def test_sizes_match_escaip_by_parameter_count():
    escaip = {r["size"]: r["params"] for r in model_info_rows("escaip")}
    equi = {r["size"]: r["params"] for r in model_info_rows("equivariant")}  # meta device
    assert set(equi) == {"tiny", "1M", "4M", "6M"}
    for size, n in equi.items():
        assert abs(n / escaip[size] - 1) < 0.10, (size, n, escaip[size])


@pytest.mark.parametrize("forces", ["direct", "gradient"])
def test_exactly_equivariant_in_float64(examples, forces):
    torch.manual_seed(0)
    model = build("tiny", forces=forces, **SMALL).double().eval()
    batch = as_batch(examples, ForceFieldTask({"model": "equivariant"}))
    R = haar_rotations(1, torch.Generator().manual_seed(3), dtype=torch.float64)[0]
    with torch.no_grad():
        out, out_r = model(batch), model(rotate(batch, R))
    assert out["energy"].shape == (6,) and out["forces"].shape == batch["pos"].shape
    assert not out["forces"].requires_grad  # evaluation under no_grad gives plain tensors
    scale = out["forces"].abs().max()
    assert scale > 1e-4  # not trivially zero
    torch.testing.assert_close(out_r["energy"], out["energy"], rtol=0, atol=1e-12)
    torch.testing.assert_close(out_r["forces"], out["forces"] @ R.T, rtol=0, atol=1e-12 * scale)


def test_decomposition_at_float_precision(examples):
    """decompose() on a real molecule batch: the equivariance error is rounding noise."""
    task = ForceFieldTask({"model": "equivariant", "model_overrides": SMALL})
    torch.manual_seed(0)
    model = task.build_model("tiny").eval()
    batch32 = as_batch(examples, task, torch.float32)
    d32 = decompose(model, task, batch32, 4, torch.Generator().manual_seed(0))
    d64 = decompose(
        model.double(), task, as_batch(examples, task), 4, torch.Generator().manual_seed(0)
    )
    for f in ("forces", "energy"):
        assert d64[f].total > 0 and d32[f].total > 0
        assert d64[f].pct < 1e-10, (f, d64[f].pct)  # float32 rotations bound it (~1e-14)
        assert d32[f].pct < 1e-8, (f, d32[f].pct)
        assert abs(d64[f].total - d64[f].mean - d64[f].equiv) <= 1e-9 * d64[f].total


def test_gradient_forces_are_minus_energy_gradient(examples):
    torch.manual_seed(0)
    model = build("tiny", forces="gradient", **SMALL).double()
    model.set_force_scale(2.5)
    batch = as_batch(examples[:1], ForceFieldTask({"model": "equivariant"}))
    with torch.no_grad():
        forces = model(batch)["forces"]
    h = 1e-5
    for atom, axis in [(0, 0), (3, 2), (7, 1)]:
        plus, minus = dict(batch), dict(batch)
        plus["pos"], minus["pos"] = batch["pos"].clone(), batch["pos"].clone()
        plus["pos"][atom, axis] += h
        minus["pos"][atom, axis] -= h
        with torch.no_grad():
            de = model(plus)["energy"] - model(minus)["energy"]
        fd = -2.5 * float(de.sum()) / (2 * h)
        assert abs(fd - float(forces[atom, axis])) < 1e-6 * max(1.0, abs(fd))
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
def test_trains_through_the_force_field_task(examples, forces):
    task = ForceFieldTask({"model": "equivariant", "model_overrides": {**SMALL, "forces": forces}})
    batch = as_batch(examples, task, torch.float32)
    torch.manual_seed(0)
    model = task.build_model("tiny")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = task.loss(task.predict(model, batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0]


def test_cuequivariance_kernel_runs_on_cpu_exactly_equivariant_and_trains(examples):
    """kernel: cuequivariance (issue 17 item 4) — cuequivariance_torch's PyTorch fallback on
    the CPU: the same parameter count as the e3nn kernel, exact equivariance, and it learns."""
    torch.manual_seed(0)
    e3nn_model = build("tiny", **SMALL)
    model = build("tiny", kernel="cuequivariance", **SMALL)
    assert type(model.blocks[0].tp).__module__.startswith("cuequivariance_torch")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model) == count(e3nn_model)
    model = model.double().eval()
    batch = as_batch(examples, ForceFieldTask({"model": "equivariant"}))
    R = haar_rotations(1, torch.Generator().manual_seed(3), dtype=torch.float64)[0]
    with torch.no_grad():
        out, out_r = model(batch), model(rotate(batch, R))
    scale = out["forces"].abs().max()
    assert scale > 1e-4
    torch.testing.assert_close(out_r["energy"], out["energy"], rtol=0, atol=1e-12)
    torch.testing.assert_close(out_r["forces"], out["forces"] @ R.T, rtol=0, atol=1e-12 * scale)
    task = ForceFieldTask({"model": "equivariant", "model_overrides": {**SMALL, "kernel": "cuequivariance"}})  # fmt: skip
    batch = as_batch(examples, task, torch.float32)
    torch.manual_seed(0)
    model = task.build_model("tiny")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = task.loss(task.predict(model, batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0]
    with pytest.raises(ValueError, match="allowed: e3nn, cuequivariance"):
        build("tiny", kernel="triton")
