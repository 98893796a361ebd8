"""ASE calculator (equipipe.calculator) and rotated-start molecular dynamics (equipipe.md)."""

import json

import numpy as np
import pytest
import torch
from ase import Atoms
from rdkit import Chem
from rdkit.Chem import AllChem
from torch import nn

from equipipe import md
from equipipe.calculator import EquipipeCalculator
from equipipe.models.equivariant import build as build_e3nn
from equipipe.models.escaip import build as build_escaip
from equipipe.so3 import haar_rotations
from equipipe.tasks.forcefield import ForceFieldTask

STATE = {"energy_reference": "none", "element_energy": {}, "energy_mean": 0.3,
         "energy_std": 0.2, "force_std": 0.5}  # fmt: skip


def ethanol() -> tuple[np.ndarray, np.ndarray]:
    """A real molecule: RDKit embedding, MMFF-relaxed (positions Å, atomic numbers)."""
    m = Chem.AddHs(Chem.MolFromSmiles("CCO"))
    AllChem.EmbedMolecule(m, randomSeed=0)
    AllChem.MMFFOptimizeMolecule(m)
    return m.GetConformer().GetPositions(), np.array([a.GetAtomicNum() for a in m.GetAtoms()])


def task() -> ForceFieldTask:
    t = ForceFieldTask({"energy_reference": "none"})
    t.set_state(dict(STATE))
    return t


class Bonded(nn.Module):
    """A model plus harmonic springs on the bonds and angles (pairs within 2.6 Å) of a reference geometry (an invariant energy,
    equivariant forces: it keeps an untrained network's molecule together), plus an optional
    NON-equivariant force term ``eps * u`` (the same direction u for every atom, every frame).

    Outputs in the task's normalised units, like the wrapped model.
    """

    def __init__(self, base: nn.Module, ref: np.ndarray, k: float = 40.0, eps: float = 0.0):
        super().__init__()
        self.base, self.k, self.eps = base, k, eps
        ref = torch.as_tensor(ref, dtype=torch.float64)
        d = torch.cdist(ref, ref)
        i, j = torch.nonzero(torch.triu(d < 2.6, diagonal=1), as_tuple=True)
        self.register_buffer("pairs", torch.stack([i, j]))
        self.register_buffer("r0", d[i, j])
        self.register_buffer("u", torch.tensor([0.48, -0.6, 0.64], dtype=torch.float64))
        self.n_ref = ref.shape[0]

    def forward(self, batch):
        out = self.base(batch)
        pos = batch["pos"]
        n_mol = batch["n_atoms"].shape[0]
        offs = (torch.arange(n_mol, device=pos.device) * self.n_ref)[:, None]
        i, j = (self.pairs[0][None] + offs).reshape(-1), (self.pairs[1][None] + offs).reshape(-1)
        with torch.enable_grad():
            x = pos if pos.requires_grad else pos.detach().requires_grad_(True)
            vec = x[j] - x[i]
            r = vec.norm(dim=-1)
            e_pair = 0.5 * self.k * (r - self.r0.to(r.dtype).repeat(n_mol)) ** 2
            e = torch.zeros(n_mol, dtype=pos.dtype, device=pos.device)
            e = e.index_add(0, batch["batch"][i], e_pair)
            (g,) = torch.autograd.grad(e.sum(), x, create_graph=pos.requires_grad)
        s = STATE
        forces = out["forces"] - g / s["force_std"] + self.eps * self.u.to(pos.dtype)
        return {"energy": out["energy"] + e / s["energy_std"], "forces": forces}


def start(rotations: int, seed: int = 0):
    pos, z = ethanol()
    starts = [md.start_molecule(pos, z, 300.0, np.random.default_rng(seed))]
    rots = haar_rotations(rotations, torch.Generator().manual_seed(seed), torch.float64).numpy()
    return starts, np.concatenate([np.eye(3)[None], rots]), pos


def test_e3nn_float64_rotated_start_stays_below_1e8_angstrom_over_100_fs():
    starts, rots, ref = start(1)
    torch.manual_seed(0)
    model = Bonded(build_e3nn("tiny"), ref)
    calc = EquipipeCalculator(model, task(), dtype="float64")
    spec = md.resolve_spec({"length_fs": 100, "times_fs": [10, 50, 100]})
    res = md.simulate(calc, starts, rots, spec)
    assert res["traj"]["blowup_step"].max() == -1
    d = res["d"]
    assert d.shape == (1, 201) and np.isfinite(d).all()
    assert d.max() < 1e-8, d.max()
    # the molecule really moved (so the bound is not trivially met)
    moved = np.abs(res["traj"]["pos"][0][-1] - res["traj"]["pos"][0][0]).max()
    assert moved > 0.05


def test_injected_non_equivariant_term_deviates_and_faster_as_it_grows():
    starts, rots, ref = start(1)
    spec = md.resolve_spec({"length_fs": 25, "times_fs": [10, 25]})
    d25 = []
    for eps in (0.0, 1e-3, 1e-2, 1e-1):
        torch.manual_seed(0)
        calc = EquipipeCalculator(Bonded(build_e3nn("tiny"), ref, eps=eps), task(), dtype="float64")
        res = md.simulate(calc, starts, rots, spec)
        assert res["traj"]["blowup_step"].max() == -1
        d25.append(md.summary(res, spec)["d_25fs"])
    assert d25[0] < 1e-10
    assert d25[1] > 1e3 * d25[0] and d25[1] > 1e-6
    assert d25[1] < d25[2] < d25[3]
    # a constant push eps*u moves the centre of mass ~ eps t^2: d scales about linearly in eps
    assert 3 < d25[2] / d25[1] < 30 and 3 < d25[3] / d25[2] < 30


def test_conservative_forces_are_minus_the_energy_gradient_and_conserve_energy():
    starts, rots, ref = start(0)
    torch.manual_seed(0)
    base = build_escaip("tiny", hidden=16, n_heads=2, n_rbf=16, n_layers=1, max_neighbors=8)
    calc = EquipipeCalculator(Bonded(base, ref), task(), forces="conservative", dtype="float64")
    atoms = starts[0].copy()
    atoms.calc = calc
    f = atoms.get_forces()
    h = 1e-5
    for a, c in ((0, 0), (3, 1), (8, 2)):
        e = []
        for sign in (1, -1):
            b = atoms.copy()
            b.calc = calc
            b.positions[a, c] += sign * h
            e.append(b.get_potential_energy())
        assert f[a, c] == pytest.approx(-(e[0] - e[1]) / (2 * h), rel=1e-5, abs=1e-7)
    spec = md.resolve_spec({"length_fs": 50})
    cons = md.simulate(calc, starts, rots, spec)
    direct = md.simulate(EquipipeCalculator(Bonded(base, ref), task(), dtype="float64"),
                         starts, rots, spec)  # fmt: skip
    drift_c, drift_d = abs(cons["energy_drift"][0]), abs(direct["energy_drift"][0])
    assert drift_c < 1e-3, drift_c  # eV/atom/ps, velocity Verlet at 0.5 fs
    assert drift_c < 0.01 * drift_d, (drift_c, drift_d)  # direct forces are not a gradient


def test_calculator_from_run_rotates_forces_with_rotated_atoms_e3nn(tmp_path):
    torch.manual_seed(0)
    model = build_e3nn("tiny")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    info = {"experiment": "ff_equivariant", "seed": 0, "model": "equivariant", "task_state": STATE,
            "spec": {"task": "forcefield", "size": "tiny",
                     "task_cfg": {"model": "equivariant", "energy_reference": "none"}}}  # fmt: skip
    (tmp_path / "run.json").write_text(json.dumps(info))
    pos, z = ethanol()
    R = haar_rotations(1, torch.Generator().manual_seed(3), torch.float64)[0].numpy()
    for dtype, tol in (("float64", 1e-10), ("float32", 2e-4)):
        calc = EquipipeCalculator.from_run(tmp_path, "model.pt", dtype=dtype)
        a, b = Atoms(z, positions=pos), Atoms(z, positions=pos @ R.T)
        a.calc, b.calc = calc, EquipipeCalculator.from_run(tmp_path, dtype=dtype)
        fa, fb = a.get_forces(), b.get_forces()
        assert np.abs(fa).max() > 1e-3
        np.testing.assert_allclose(fb, fa @ R.T, atol=tol * np.abs(fa).max())
        assert b.get_potential_energy() == pytest.approx(a.get_potential_energy(), rel=tol)
        assert calc.describe() == f"direct, raw, {dtype}"
    with pytest.raises(ValueError, match="twirl='exact' needs escaip"):
        EquipipeCalculator.from_run(tmp_path, twirl="exact")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        EquipipeCalculator.from_run(tmp_path, "checkpoints/step9.pt")


def test_twirl_modes_exact_fixed_redraw_on_escaip():
    pos, z = ethanol()
    torch.manual_seed(0)
    base = build_escaip("tiny", hidden=16, n_heads=2, n_rbf=16, n_layers=1, max_neighbors=8)
    R = haar_rotations(1, torch.Generator().manual_seed(5), torch.float64)[0].numpy()

    def forces(calc, p):
        a = Atoms(z, positions=p)
        a.calc = calc
        return a.get_forces()

    raw = EquipipeCalculator(base, task(), dtype="float64")
    err_raw = np.abs(forces(raw, pos @ R.T) - forces(raw, pos) @ R.T).max()
    exact = EquipipeCalculator(base, task(), twirl="exact", dtype="float64")
    err_exact = np.abs(forces(exact, pos @ R.T) - forces(exact, pos) @ R.T).max()
    assert err_raw > 1e-3 and err_exact < 1e-10
    fixed = EquipipeCalculator(base, task(), twirl="fixed", k=4, seed=1, dtype="float64")
    f1, f2 = forces(fixed, pos), forces(fixed, pos + 1e-12)
    np.testing.assert_allclose(f1, f2, atol=1e-8)  # the same 4 frames at every call
    err_fixed = np.abs(forces(fixed, pos @ R.T) - f1 @ R.T).max()
    assert 0 < err_fixed < err_raw  # closer to equivariant, not exactly
    redraw = EquipipeCalculator(base, task(), twirl="redraw", k=4, seed=1, dtype="float64")
    g1, g2 = forces(redraw, pos), forces(redraw, pos + 1e-12)
    assert np.abs(g1 - g2).max() > 1e-4  # new frames every call: stochastic forces
    assert "fixed twirl K=4" in fixed.describe() and "redrawn twirl K=4" in redraw.describe()


def test_blow_ups_are_counted_and_stop_the_trajectory():
    starts, rots, ref = start(1)
    torch.manual_seed(0)
    calc = EquipipeCalculator(build_escaip("tiny", hidden=16, n_heads=2, n_rbf=16, n_layers=1),
                              task(), dtype="float32")  # fmt: skip
    calc.task.state["force_std"] = 50.0  # untrained, huge forces: atoms fly apart
    spec = md.resolve_spec({"length_fs": 25, "times_fs": [25]})
    res = md.simulate(calc, starts, rots, spec)
    row = md.summary(res, spec)
    assert row["n_blowups"] == row["n_traj"] == 2
    s = res["traj"]["blowup_step"]
    assert (s > 0).all() and np.isnan(res["traj"]["pos"][0][s[0] :]).all()
    assert row["d_25fs"] is None


def test_spec_errors_name_the_key():
    with pytest.raises(ValueError, match="md spec key 'length' is unknown"):
        md.resolve_spec({"length": 5})
    with pytest.raises(ValueError, match="multiple of timestep_fs"):
        md.resolve_spec({"length_fs": 10.25})
