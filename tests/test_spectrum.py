"""The per-irrep spectrum of the equivariance error (equipipe.spectrum, equipipe.spectrum_probe)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from e3nn import o3
from torch import nn

from equipipe import spectrum as sp
from equipipe.equivariance import decompose, decomposition_from_predictions, example_rotations
from equipipe.so3 import haar_rotations, octahedral_rotations, rotate_grid
from equipipe.spectrum_probe import SpectrumProbe, spectrum_due
from equipipe.tasks import make_task
from equipipe.tasks.flowmatching import FlowMatchingTask
from equipipe.tasks.forcefield import ForceFieldTask


def _wigner(ell: int, R: torch.Tensor) -> torch.Tensor:
    """Real Wigner D-matrices (n, d, d) of rotations R (n, 3, 3) from e3nn, float64."""
    return o3.wigner_D(ell, *o3.matrix_to_angles(R.double())).double()


def test_characters_are_traces_of_e3nn_wigner_matrices():
    R = haar_rotations(64, torch.Generator().manual_seed(0), dtype=torch.float64)
    theta = sp.rotation_angle(R)
    for ell in range(7):
        trace = _wigner(ell, R).diagonal(dim1=-2, dim2=-1).sum(-1)
        closed = torch.sin((2 * ell + 1) * theta / 2) / torch.sin(theta / 2)
        assert torch.allclose(sp.character(ell, theta), trace, atol=1e-5), ell
        assert torch.allclose(sp.character(ell, theta), closed, atol=1e-9), ell
    assert float(sp.character(3, torch.zeros(()))) == 7.0  # no 0/0 at the identity


def test_known_wigner_components_are_recovered_one_by_one():
    """z(g) = Σ_ℓ A_ℓ vec D^ℓ(g): the power in ℓ is ||A_ℓ||^2 / (2ℓ+1) (Schur orthogonality)."""
    gen = torch.Generator().manual_seed(1)
    F, band = 5, 3
    A = {
        ell: torch.randn(F, (2 * ell + 1) ** 2, generator=gen, dtype=torch.float64)
        for ell in range(band + 1)
    }
    A[0] = A[0] * 3.0  # a large twirled part must not leak into ℓ >= 1
    exact = {ell: float(A[ell].pow(2).sum()) / (2 * ell + 1) for ell in A}

    def z_of(R):
        return sum(_wigner(ell, R).reshape(R.shape[0], -1) @ A[ell].T for ell in A)

    K, B = 8, 1500
    R = haar_rotations(K * B, gen, dtype=torch.float64).reshape(K, B, 3, 3)
    s = sp.spectrum(z_of(R.reshape(-1, 3, 3)).reshape(K, B, F), R, lmax=5)
    pe = s.per_element()
    for ell in range(6):
        want = exact.get(ell, 0.0) / F
        se = s.standard_error(str(ell))
        assert abs(pe[str(ell)] - want) < 3 * se, (ell, pe[str(ell)], want, se)
        assert se < 0.1 * max(exact.values()) / F
    assert abs(pe["remainder"]) < 3 * s.standard_error("remainder")
    # the exact icosahedral quadrature recovers a band <= 2 function to rounding
    A.pop(3)
    exact.pop(3)
    I60 = sp.icosahedral_rotations()
    g0 = haar_rotations(4, gen, dtype=torch.float64)
    R = torch.einsum("bij,kjl->kbil", g0, I60)  # a coset g0 I per example
    z = z_of(R.reshape(-1, 3, 3)).reshape(60, 4, F)
    pe = sp.spectrum(z, R, lmax=3, exhaustive=True).per_element()
    for ell in range(4):  # exact while ℓ + band <= 5
        assert pe[str(ell)] * F == pytest.approx(exact.get(ell, 0.0), abs=1e-4), ell


def test_icosahedral_group_and_octahedral_character_table():
    I60 = sp.icosahedral_rotations()
    assert I60.shape == (60, 3, 3) and torch.allclose(I60[0], torch.eye(3, dtype=torch.float64))
    for L in range(1, 6):  # the quadrature is exact up to band 5
        assert _wigner(L, I60).mean(0).abs().max() < 1e-5, L
    assert _wigner(6, I60).mean(0).abs().max() > 0.1
    O = octahedral_rotations(torch.float64)
    assert torch.bincount(sp.octahedral_class(O)).tolist() == list(sp.OCTAHEDRAL_CLASS_SIZES)
    sizes = torch.tensor(sp.OCTAHEDRAL_CLASS_SIZES, dtype=torch.float64)
    for a in sp.OCTAHEDRAL_IRREPS:  # row orthogonality of the character table
        for b in sp.OCTAHEDRAL_IRREPS:
            ca, cb = (
                torch.tensor(sp.OCTAHEDRAL_CHARACTERS[x], dtype=torch.float64) for x in (a, b)
            )
            assert float((sizes * ca * cb).sum()) / 24 == (1.0 if a == b else 0.0)
    assert sp.branching(2) == {"A1": 0, "A2": 0, "E": 1, "T1": 0, "T2": 1}
    assert sp.branching(4) == {"A1": 1, "A2": 0, "E": 1, "T1": 1, "T2": 1}
    for ell in range(8):
        dims = sum(m * sp.OCTAHEDRAL_DIMS[r] for r, m in sp.branching(ell).items())
        assert dims == 2 * ell + 1


def test_octahedral_spectrum_of_grids_is_exact():
    """All 24 voxel permutations: irreps sum to the power, A1 = twirl, the rest = exact E."""
    gen = torch.Generator().manual_seed(2)
    O = octahedral_rotations(torch.float64)
    x = torch.randn(2, 1, 5, 5, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(1, 5, 5, 5, generator=gen, dtype=torch.float64)  # breaks the symmetry
    z = torch.stack([rotate_grid(torch.tanh(rotate_grid(x, R) * w), R.T) for R in O])
    s = sp.spectrum(z, O, exhaustive=True)
    pe = s.per_element()
    assert s.labels == sp.OCTAHEDRAL_IRREPS and all(pe[r] > 0 for r in s.labels)
    assert sum(pe[r] for r in s.labels) == pytest.approx(pe["total"], rel=1e-12)
    d = decomposition_from_predictions(z, torch.zeros_like(z[0]), exhaustive=True).per_element()
    assert pe["A1"] == pytest.approx(d["total"] - d["equiv"], rel=1e-10)
    assert pe["equiv"] == pytest.approx(d["equiv_unbiased"], rel=1e-10)
    # an equivariant map (pointwise) has only A1; vectors g^T v live in T1 only
    zi = torch.stack([rotate_grid(torch.tanh(rotate_grid(x, R)), R.T) for R in O])
    pi = sp.spectrum(zi, O, exhaustive=True).per_element()
    assert max(abs(pi[r]) for r in ("A2", "E", "T1", "T2")) < 1e-12 * pi["A1"]
    v = torch.randn(3, generator=gen, dtype=torch.float64)
    pv = sp.spectrum((O.transpose(1, 2) @ v)[:, None], O, exhaustive=True).per_element()
    assert pv["T1"] == pytest.approx(float(v @ v) / 3) and abs(pv["A1"]) < 1e-12


class LinearFlow(nn.Module):
    """v = M x_t + c: a non-equivariant flow model whose canonicalised output has ℓ <= 2."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.M = nn.Parameter(torch.randn(3, 3, generator=g) * 0.5)

    def forward(self, x_t, t, mask, x_sc=None, chain_break=None):
        del t, x_sc, chain_break  # the flow task's model signature; v depends on x_t only
        return (x_t @ self.M.T) * mask[..., None].to(x_t.dtype)


def _chains(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for length in rng.integers(8, 16, n):
        steps = rng.normal(size=(length, 3))
        steps *= 0.38 / np.linalg.norm(steps, axis=1, keepdims=True)
        out.append({"pos": np.cumsum(steps, 0).astype(np.float32),
                    "residue": np.zeros(length, np.int8), "chain_break": np.zeros(length, bool)})  # fmt: skip
    return out


def test_band_limited_sum_matches_decompose_equiv_unbiased():
    """Band <= ℓmax: Σ_ℓ>=1 P_ℓ equals decompose's E_unb on the same rotations (remainder ~ 0)."""
    task = FlowMatchingTask({"eval_t": [0.5]})
    ex = _chains(48)
    task.fit(ex)
    batch = task.collate(ex)
    (_, view), = task.eval_views(batch, torch.Generator().manual_seed(0))  # fmt: skip
    model = LinearFlow().double()
    view = {k: v.double() if v.is_floating_point() else v for k, v in view.items()}
    probe = SpectrumProbe(task, lmax=2, layers=[])
    with probe.recording(model):
        d = decompose(model, task, view, 10, torch.Generator().manual_seed(1), record=probe.record)
    probe.observe("val", 0.5, view, exhaustive=False)
    s = probe.outputs[("val", 0.5, "x1")]
    pe = s.per_element()
    e_unb = d["x1"].per_element()["equiv_unbiased"]
    assert pe["equiv"] == pytest.approx(e_unb, rel=1e-9)  # same rotations, same elements
    assert s.n_elements == d["x1"].n_elements
    per_ell = pe["1"] + pe["2"]
    assert abs(per_ell - e_unb) < 3 * s.standard_error("remainder")
    assert pe["1"] > 3 * s.standard_error("1") and pe["2"] > 3 * s.standard_error("2")
    rows = probe.rows(task.units)
    assert {r["ell"] for r in rows if r["metric"] == "spectrum_power"} == {"0", "1", "2"}


@pytest.fixture(scope="module")
def molecules():
    from equipipe.data.embedded import embed_conformers

    out = []
    for i, smi in enumerate(["c1ccccc1O", "CC(C)Cc1ccc(cc1)C(C)C(=O)O"]):
        mol = embed_conformers(smi, 1, seed=i)
        z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
        pos = mol.GetConformer().GetPositions()
        out.append({"pos": pos, "z": z, "energy": -1.0 * len(z), "forces": np.zeros_like(pos)})
    return out


def _ff_batch(task, examples):
    task.fit(examples)
    batch = task.collate(examples)
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def test_invariant_model_has_no_ell_above_zero_in_outputs_or_layers(molecules):
    """EScAIP-like backbone and energy: invariant by construction, so ℓ >= 1 is zero exactly."""
    task = ForceFieldTask({"model": "escaip"})
    torch.manual_seed(0)
    model = task.build_model("tiny").double().eval()
    batch = _ff_batch(task, molecules)
    layers = ["blocks.0", "blocks.1", "ffn_in"]
    probe = SpectrumProbe(task, lmax=3, layers=layers)
    with probe.recording(model):
        decompose(model, task, batch, 5, torch.Generator().manual_seed(0), record=probe.record)
    probe.observe("val", None, batch, exhaustive=False)
    energy = probe.outputs[("val", None, "energy")].per_element()
    assert energy["0"] > 0 and max(abs(energy[str(ell)]) for ell in (1, 2, 3)) < 1e-12 * energy["0"]
    assert abs(energy["remainder"]) < 1e-12 * energy["0"]
    forces = probe.outputs[("val", None, "forces")].per_element()
    assert forces["equiv"] > 0  # the direct force head is not equivariant
    for name in layers:
        sh = probe.hidden[("val", None, name)].shares()
        assert sh["0"] == pytest.approx(1.0, abs=1e-10), name
        assert max(abs(sh[k]) for k in ("1", "2", "3", "remainder")) < 1e-10, (name, sh)
    # Derived: the direct head's canonicalised forces are Σ_j m c_ij ⊙ ... = g^T diag(c) g r̂,
    # so its equivariance error is pure ℓ = 2 (the traceless part of diag(c)); the exact
    # icosahedral quadrature (band 2, ℓ <= 3) shows it
    ico = SpectrumProbe(task, lmax=3, layers=[])
    with ico.recording(model):
        d = decompose(model, task, batch, 60, None, rotations=sp.icosahedral_rotations(),
                      record=ico.record)  # fmt: skip
    ico.observe("val", None, batch, exhaustive=True)
    f = ico.outputs[("val", None, "forces")].per_element()
    assert f["2"] == pytest.approx(d["forces"].per_element()["equiv"], rel=1e-5)
    assert max(abs(f["1"]), abs(f["3"])) < 1e-6 * f["2"]


def test_e3nn_hidden_channels_land_exactly_in_their_ell(molecules):
    """e3nn features: the ℓ = 1 channels are all ℓ = 1, the ℓ = 2 channels all ℓ = 2."""
    task = ForceFieldTask(
        {"model": "equivariant", "model_overrides": {"mul": 4, "radial_hidden": 8}}
    )
    torch.manual_seed(0)
    model = task.build_model("tiny").double().eval()
    batch = _ff_batch(task, molecules)
    I60 = sp.icosahedral_rotations()
    probe = SpectrumProbe(task, lmax=4, layers=list(model.spectrum_layers))
    with probe.recording(model):
        decompose(model, task, batch, 60, None, rotations=I60, record=probe.record)
    feats = {n: torch.cat(v).reshape(60, -1, *v[0].shape[1:]) for n, v in probe._features.items()}
    R = example_rotations(2, 60, None, I60, torch.float64)
    for name, h in feats.items():
        irreps = dict(model.named_modules())[name].irreps_out
        for (_mul, ir), sl in zip(irreps, irreps.slices()):
            s = sp.spectrum(h[..., sl], R, lmax=4, index=batch["batch"], exhaustive=True)
            share = s.shares()
            assert share[str(ir.l)] == pytest.approx(1.0, abs=1e-6), (name, ir, share)
            for ell in range(0, 6 - ir.l):  # the 60-point quadrature is exact there
                if ell != ir.l and ell <= 4:
                    assert abs(share[str(ell)]) < 1e-6, (name, ir, ell, share)
    # the model's outputs are equivariant: every ℓ >= 1 of the canonicalised forces is ~0
    probe.observe("val", None, batch, exhaustive=True)
    f = probe.outputs[("val", None, "forces")].per_element()
    assert max(abs(f[str(ell)]) for ell in range(1, 5)) < 1e-6 * f["0"]  # float32 rotations


def test_voxel_outputs_and_full_resolution_maps_through_the_octahedral_irreps():
    """U-Net on real molecules: A2+E+T1+T2 = decompose's exact E; coarse maps are refused."""
    from tests.test_denoising import CFG, _examples

    task = make_task("denoising", CFG)
    torch.manual_seed(0)
    model = task.build_model("tiny").eval()
    batch = task.collate(_examples(("CC(=O)Nc1ccccc1", "OCC(Cl)CBr")))
    views = task.eval_views(batch, torch.Generator().manual_seed(0))
    probe = SpectrumProbe(task, lmax=2, layers=list(model.spectrum_layers))
    for labels, view in views:
        R = task.rotation_set(labels)
        with probe.recording(model):
            d = decompose(model, task, view, 4, torch.Generator().manual_seed(1), rotations=R,
                          record=probe.record)  # fmt: skip
        probe.observe(labels["mode"], None, view, exhaustive=R is not None)
        if R is not None:
            oct_d = d["density"].per_element()
    out = probe.outputs[("octahedral", None, "density")]
    pe = out.per_element()
    assert out.labels == sp.OCTAHEDRAL_IRREPS
    assert sum(pe[r] for r in out.labels) == pytest.approx(pe["total"], rel=1e-9)
    assert pe["equiv"] == pytest.approx(oct_d["equiv_unbiased"], rel=1e-6)
    assert all(pe[r] > 0 for r in ("A2", "E", "T1", "T2"))
    for name in model.spectrum_layers:  # canonicalised maps: exact irreps, shares sum to 1
        sh = probe.hidden[("octahedral", None, name)].shares()
        assert sum(sh[r] for r in sp.OCTAHEDRAL_IRREPS) == pytest.approx(1.0, abs=1e-9)
        assert min(sh[r] for r in sp.OCTAHEDRAL_IRREPS) > 0 and abs(sh["remainder"]) < 1e-9
        assert ("haar", None, name) in probe.hidden
    coarse = SpectrumProbe(task, lmax=2, layers=["down.2"])  # after the first stride-2 conv
    labels, view = views[1]
    with coarse.recording(model):
        decompose(model, task, view, 3, None, record=coarse.record)
    with pytest.raises(ValueError, match="full-resolution"):
        coarse.observe("haar", None, view, exhaustive=False)


def test_spectrum_cadence():
    steps = [0, 1, 2, 5, 10, 20, 30]
    assert [s for s in steps if spectrum_due(s, steps, 2)] == [0, 2, 10, 30]
    assert [s for s in steps if spectrum_due(s, steps, 1)] == steps
    assert not any(spectrum_due(s, steps, 0) for s in steps)
    assert math.isnan(
        sp.Spectrum(("0",), torch.ones(1, 1), torch.ones(1), torch.ones(1)).standard_error("0")
    )
