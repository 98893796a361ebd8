"""Offline builders of real small molecular data (equipipe.data.embedded)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from rdkit import Chem

from equipipe.data import embedded as E


def test_nci_file_is_found():
    p = E.nci_smiles_path()
    assert p.name == "first_5K.smi" and p.stat().st_size > 100_000


def test_smiles_pool_filters_and_is_deterministic():
    a = E.smiles_pool(40, seed=0)
    assert a == E.smiles_pool(40, seed=0)
    assert E.smiles_pool(60, seed=0)[:40] == a  # prefix-consistent
    assert len(set(a)) == 40
    allowed = set(E.SPICE_ELEMENTS)
    for smi in a:
        mol = Chem.MolFromSmiles(smi)
        assert mol is not None
        assert 8 <= mol.GetNumHeavyAtoms() <= 40
        assert len(Chem.GetMolFrags(mol)) == 1
        assert Chem.GetFormalCharge(mol) == 0
        assert {at.GetSymbol() for at in mol.GetAtoms()} <= allowed
    b = E.smiles_pool(40, seed=1)
    assert len(set(a) & set(b)) <= 5  # nearly disjoint draws


def test_smiles_pool_geom_elements_and_range():
    pool = E.smiles_pool(30, seed=5, min_heavy=10, max_heavy=12, elements=E.GEOM_ELEMENTS)
    for smi in pool:
        mol = Chem.MolFromSmiles(smi)
        assert 10 <= mol.GetNumHeavyAtoms() <= 12
        assert not {at.GetSymbol() for at in mol.GetAtoms()} & {"P", "I"}
    with pytest.raises(ValueError, match="asked for"):
        E.smiles_pool(10**6, seed=0)


def test_embed_conformers():
    mol = E.embed_conformers("CCCCO", 4, seed=3)
    assert mol.GetNumAtoms() == 15  # explicit Hs
    assert 1 <= mol.GetNumConformers() <= 4
    again = E.embed_conformers("CCCCO", 4, seed=3)
    np.testing.assert_array_equal(
        mol.GetConformer(0).GetPositions(), again.GetConformer(0).GetPositions()
    )
    with pytest.raises(ValueError, match="parse"):
        E.embed_conformers("C1CC(", 2, seed=0)


def test_mapped_smiles_orders_atoms_by_map_number():
    mol = E.embed_conformers("OCC(=O)N", 1, seed=0)
    smi = E.mapped_smiles(mol)
    back = Chem.MolFromSmiles(smi, sanitize=False)
    z = {a.GetAtomMapNum(): a.GetAtomicNum() for a in back.GetAtoms()}
    assert [z[i + 1] for i in range(mol.GetNumAtoms())] == [
        a.GetAtomicNum() for a in mol.GetAtoms()
    ]


def test_thermal_perturb():
    x = np.zeros((2000, 3))
    a = E.thermal_perturb(x, np.random.default_rng(0), sigma=0.03)
    b = E.thermal_perturb(x, np.random.default_rng(0), sigma=0.03)
    np.testing.assert_array_equal(a, b)
    assert a.shape == x.shape and abs(a.std() - 0.03) < 0.002


def test_xtb_singlepoint_units_by_finite_difference():
    z = np.array([8, 1, 1])
    x = np.array([[0.0, 0.0, 0.12], [0.0, 0.77, -0.47], [0.0, -0.77, -0.47]])
    e, g = E.xtb_singlepoint(z, x)
    assert -5.2 < e < -4.9 and g.shape == (3, 3)  # GFN2 water ~ -5.07 Ha
    h = 1e-3  # Å
    xp, xm = x.copy(), x.copy()
    xp[1, 1] += h
    xm[1, 1] -= h
    fd = (E.xtb_singlepoint(z, xp)[0] - E.xtb_singlepoint(z, xm)[0]) / (2 * h)  # Ha/Å
    assert fd * E.BOHR_ANGSTROM == pytest.approx(g[1, 1], rel=1e-3, abs=1e-6)  # Ha/bohr


def test_xtb_failure_is_value_error():
    with pytest.raises(ValueError, match="GFN2-xTB"):
        E.xtb_singlepoint(np.array([1, 1]), np.zeros((2, 3)), uhf=0)  # coincident atoms


def test_isolated_atom_energies_cached():
    e = E.isolated_atom_energies(["H", "C", 8])
    assert set(e) == {1, 6, 8}
    assert e[1] == pytest.approx(-0.393483, abs=1e-5)
    assert E.isolated_atom_energies([1])[1] == e[1]


def test_seeded_rotations():
    r = E.seeded_rotations(16, seed=4)
    assert r.shape == (16, 3, 3) and r.dtype == np.float64
    np.testing.assert_allclose(
        r @ r.transpose(0, 2, 1), np.broadcast_to(np.eye(3), r.shape), atol=1e-12
    )
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-12)
    np.testing.assert_array_equal(r, E.seeded_rotations(16, seed=4))
    assert not np.allclose(r, E.seeded_rotations(16, seed=5))


def test_item_seed_streams_differ():
    assert E.item_seed(0, 1, 0) != E.item_seed(0, 1, 1) != E.item_seed(0, 2, 0)
    assert E.item_seed(3, 4, 5) == E.item_seed(3, 4, 5) < 2**31


def test_parallel_map_order_and_single_thread_env(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    items = list(range(-5, 6))
    assert E.parallel_map(abs, items, workers=2, progress=False) == [abs(i) for i in items]
    assert E.parallel_map(abs, items, workers=1, progress=False) == [abs(i) for i in items]
    env = E.parallel_map(os.getenv, ["OMP_NUM_THREADS"] * 2, workers=2, progress=False)
    assert env == ["1", "1"]
    assert os.environ["OMP_NUM_THREADS"] == "7"  # the parent's setting is restored
