"""EScAIP-like model: sizes, neighbour list, invariance of the backbone, the direct force head."""

from __future__ import annotations

import copy
import statistics
import time

import numpy as np
import pytest
import torch

from equipipe.models import escaip
from equipipe.models.registry import SIZES, build_model, model_info_rows, param_count
from equipipe.so3 import haar_rotations, octahedral_rotations

SMALL = dict(hidden=32, n_layers=2, n_heads=4, ffn_mult=2, readout_mult=1, head_mult=1)


def random_batch(n_atoms, seed=0, dtype=torch.float64, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    n_atoms = torch.tensor(n_atoms)
    n = int(n_atoms.sum())
    return {
        "pos": torch.randn(n, 3, generator=g, dtype=dtype) * spread,
        "z": torch.tensor([1, 6, 7, 8])[torch.randint(0, 4, (n,), generator=g)],
        "batch": torch.arange(len(n_atoms)).repeat_interleave(n_atoms),
        "n_atoms": n_atoms,
    }


def rotated(batch, R):
    """Rotate every molecule of the batch by its own R[b] (about the origin)."""
    out = dict(batch)
    out["pos"] = torch.einsum("nij,nj->ni", R[batch["batch"]], batch["pos"])
    return out


def small_model(seed=0, **kw):
    torch.manual_seed(seed)
    return escaip.build("tiny", **{**SMALL, **kw}).double().eval()


# --- sizes and registry ------------------------------------------------------------------


def test_parameter_counts_within_ten_percent():
    rows = {r["size"]: r for r in model_info_rows("escaip")}
    assert all(r["model"] == "escaip" for r in rows.values())
    assert set(rows) == set(SIZES["escaip"]) == set(escaip.SIZES)
    for size in ("1M", "4M", "6M"):
        assert rows[size]["ok"] and rows[size]["label"] == int(size[:-1]) * 10**6, rows[size]
    assert rows["tiny"]["label"] is None and rows["tiny"]["ok"] is None
    assert 0.18e6 <= rows["tiny"]["params"] <= 0.25e6
    cfg = escaip.config_for("6M")
    assert (cfg.hidden, cfg.n_layers, cfg.n_heads, cfg.cutoff, cfg.max_neighbors) == (
        128,
        6,
        8,
        12.0,
        20,
    )
    with torch.device("meta"):
        assert param_count(build_model("escaip", "6M")) == rows["6M"]["params"]
    print({s: r["params"] for s, r in rows.items()})


def test_registry_errors_name_allowed_values():
    with pytest.raises(ValueError, match="allowed: escaip"):
        build_model("nope", "6M")
    with pytest.raises(ValueError, match="'nope' is unknown; allowed: escaip"):
        model_info_rows("nope")
    with pytest.raises(ValueError, match="tiny, 1M, 4M, 6M"):
        build_model("escaip", "7M")
    with pytest.raises(ValueError, match="'hiden'.*allowed:.*hidden"):
        build_model("escaip", "tiny", hiden=3)
    assert build_model("escaip", "tiny", cutoff=5.0).cfg.cutoff == 5.0


# --- neighbour list ----------------------------------------------------------------------


def test_neighbor_list_cutoff_molecule_and_max_neighbors():
    b = random_batch([7, 1, 25, 12], seed=3, spread=2.5)
    cutoff, kmax = 4.0, 6
    idx, mask = escaip.neighbor_list(b["pos"], b["batch"], b["n_atoms"], cutoff, kmax)
    assert idx.shape == mask.shape == (int(b["n_atoms"].sum()), kmax)
    pos, mol = b["pos"].numpy(), b["batch"].numpy()
    for i in range(len(pos)):
        same = np.flatnonzero((mol == mol[i]) & (np.arange(len(pos)) != i))
        d = np.linalg.norm(pos[same] - pos[i], axis=1)
        expected = set(same[d <= cutoff][np.argsort(d[d <= cutoff])][:kmax].tolist())
        got = set(idx[i][mask[i]].tolist())
        assert got == expected, i
        assert (idx[i][~mask[i]] == i).all()  # padding points at the atom itself
    # the single-atom molecule has no neighbours, and the model stays finite on it
    out = small_model()(b)
    assert torch.isfinite(out["forces"]).all() and torch.isfinite(out["energy"]).all()
    assert out["forces"][7].abs().max() == 0  # atom of the 1-atom molecule


def test_neighbor_list_is_rotation_invariant():
    b = random_batch([30, 20], seed=1)
    R = haar_rotations(2, torch.Generator().manual_seed(0), dtype=torch.float64)
    a = escaip.neighbor_list(b["pos"], b["batch"], b["n_atoms"], 5.0, 8)
    c = escaip.neighbor_list(rotated(b, R)["pos"], b["batch"], b["n_atoms"], 5.0, 8)
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])


# --- invariance and the force head -------------------------------------------------------


def test_backbone_features_are_invariant():
    model = small_model()
    b = random_batch([12, 9, 15], seed=2)
    R = haar_rotations(3, torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        f0, f1 = model.force_head_features(b), model.force_head_features(rotated(b, R))
    for key in ("h", "m"):
        assert torch.allclose(f0[key], f1[key], atol=1e-10, rtol=1e-9), key
    assert torch.equal(f0["edge_atom"], f1["edge_atom"])
    # rhat rotates with the molecule of atom i
    rot = torch.einsum("eij,ej->ei", R[b["batch"][f0["edge_atom"]]], f0["rhat"])
    assert torch.allclose(rot, f1["rhat"], atol=1e-12)


def test_force_head_features_reproduce_forces():
    model = small_model()
    b = random_batch([10, 14], seed=4)
    with torch.no_grad():
        feats = model.force_head_features(b)
        out = model(b)
    c = feats["h"] @ feats["weight"].T  # (E, 3)
    summed = torch.zeros_like(out["forces"]).index_add_(0, feats["edge_atom"], c * feats["rhat"])
    assert torch.allclose(feats["m"][:, None] * summed, out["forces"], atol=1e-12)
    assert torch.allclose(feats["forces"], out["forces"], atol=1e-12)


def relative_equivariance_error(model, b, R):
    with torch.no_grad():
        out0, out1 = model(b), model(rotated(b, R))
    expected = torch.einsum("nij,nj->ni", R[b["batch"]], out0["forces"])
    force_err = (out1["forces"] - expected).norm() / expected.norm()
    energy_err = (out1["energy"] - out0["energy"]).abs().max() / out0["energy"].abs().max()
    return float(force_err), float(energy_err)


def test_equal_head_rows_make_the_model_exactly_equivariant():
    model = small_model()
    with torch.no_grad():
        w = model.force_head.linear.weight
        w.copy_(w.mean(0, keepdim=True).expand_as(w))
    b = random_batch([11, 16], seed=5)
    R = haar_rotations(2, torch.Generator().manual_seed(2), dtype=torch.float64)
    force_err, energy_err = relative_equivariance_error(model, b, R)
    assert force_err < 1e-6 and energy_err < 1e-6


def test_random_head_is_not_equivariant_but_energy_is_invariant():
    model = small_model()
    b = random_batch([11, 16], seed=5)
    R = haar_rotations(2, torch.Generator().manual_seed(2), dtype=torch.float64)
    force_err, energy_err = relative_equivariance_error(model, b, R)
    assert force_err > 1e-2
    assert energy_err < 1e-9


def test_closed_form_twirl_and_equivariance_error_match_octahedral_average():
    """PAPER.md: the exact twirl replaces W by its row mean; L_equiv,i = m_i^2/3 ||sum dc rhat^T||^2."""
    model = small_model(seed=7)
    b = random_batch([9, 13], seed=6)
    G = octahedral_rotations(dtype=torch.float64)  # second moments of Haar, exactly
    with torch.no_grad():
        feats = model.force_head_features(b)
        z = []
        for R in G:
            Rb = R.expand(2, 3, 3)
            f = model(rotated(b, Rb))["forces"]
            z.append(torch.einsum("nji,nj->ni", Rb[b["batch"]], f))  # canonicalise: R^T f
        z = torch.stack(z)  # (24, N, 3)
    w = feats["weight"]
    wbar = w.mean(0)
    n = b["pos"].shape[0]
    ei = feats["edge_atom"]
    twirled = feats["m"][:, None] * torch.zeros(n, 3, dtype=w.dtype).index_add_(
        0, ei, (feats["h"] @ wbar)[:, None] * feats["rhat"]
    )
    assert torch.allclose(z.mean(0), twirled, atol=1e-10)
    dc = feats["h"] @ (w - wbar).T  # (E, 3)
    outer = torch.zeros(n, 3, 3, dtype=w.dtype).index_add_(
        0, ei, dc[:, :, None] * feats["rhat"][:, None, :]
    )
    closed = feats["m"] ** 2 / 3 * outer.pow(2).sum((1, 2))
    empirical = (z - z.mean(0)).pow(2).sum(-1).mean(0)
    assert torch.allclose(empirical, closed, rtol=1e-8, atol=1e-14)


def head_deviation(w):
    return float((w - w.mean(0, keepdim=True)).pow(2).sum() / w.numel())


def test_xavier_head_deviation_at_init():
    torch.manual_seed(0)
    devs = [head_deviation(escaip.ForceHead(128, 1).linear.weight.detach()) for _ in range(200)]
    assert abs(statistics.mean(devs) - 0.0102) < 0.0004  # 2/3 * 2/(128+3) = 0.01018
    head = build_model("escaip", "6M").force_head.linear
    assert head.bias is None and tuple(head.weight.shape) == (3, 128)
    assert 0.007 < head_deviation(head.weight.detach()) < 0.014  # PyTorch default gives ~0.0017


# --- speed (the CPU budget model of DESIGN.md) -------------------------------------------


def test_tiny_training_step_time():
    """Prints wall and process-CPU ms per step (CPU time is robust to a busy shared machine)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_model("escaip", "tiny")
        b = random_batch([30] * 16, seed=0, dtype=torch.float32, spread=2.5)
        ef, ff = torch.randn(16), torch.randn(480, 3)
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        wall, cpu = [], []
        for _ in range(7):
            t0, c0 = time.perf_counter(), time.process_time()
            out = model(b)
            loss = (
                4 * (out["energy"] - ef).abs().mean()
                + 100 * (out["forces"] - ff).norm(dim=-1).mean()
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    finally:
        torch.set_num_threads(threads)
    ms_wall, ms_cpu = (1000 * statistics.median(t[2:]) for t in (wall, cpu))
    print(
        f"escaip tiny (16 mol x 30 atoms x 20 neighbours, 1 thread): "
        f"{ms_wall:.0f} ms wall, {ms_cpu:.0f} ms CPU per training step"
    )
    assert model.cfg.max_neighbors == 20
    assert ms_cpu < 2000  # generous: the machine is shared; DESIGN.md budgets ~260 ms


# --- the named forms: upstream vs the CPU-scale form ----------------------------------------


def test_upstream_form_has_the_sign_symmetry_and_small_uniform_embeddings():
    batch = random_batch([5, 4], seed=3)
    up = small_model(seed=1, form="upstream")
    assert up.cfg.get("magnitude") == "linear" and up.cfg.get("embed_init") == "uniform"
    emb = up.embed_centre.weight
    assert emb.abs().max() <= 1e-3 and emb.abs().max() > 0.9e-3  # uniform in ±0.001
    cpu = small_model(seed=1)  # the default: the CPU-scale form
    assert cpu.cfg.form == "cpu" and cpu.cfg.get("magnitude") == "softplus"
    assert 0.08 < float(cpu.embed_centre.weight.std()) < 0.12  # N(0, 0.1²)

    def flipped(model):
        """(m, W) -> (-m, -W): negate m's last linear layer and the head weight W."""
        out = copy.deepcopy(model)
        with torch.no_grad():
            last = out.force_head.magnitude[-1]
            last.weight.neg_()
            last.bias.neg_()
            out.force_head.linear.weight.neg_()
        return out

    for model, symmetric in ((up, True), (cpu, False)):
        with torch.no_grad():
            f0 = model(batch)["forces"]
            m0 = model.force_head_features(batch)["m"]
            f1 = flipped(model)(batch)["forces"]
            m1 = flipped(model).force_head_features(batch)["m"]
        if symmetric:  # m changes sign, the forces do not
            assert torch.allclose(m1, -m0, atol=0, rtol=1e-12)
            assert torch.allclose(f1, f0, atol=1e-12, rtol=1e-10)
        else:  # softplus m >= 0 cannot change sign: the flip changes the model
            assert (m0 > 0).all() and (m1 > 0).all()
            assert (f1 - f0).abs().max() > 1e-3
    # a field set explicitly overrides the form's
    mixed = escaip.config_for("tiny", form="upstream", magnitude="softplus")
    assert mixed.get("magnitude") == "softplus" and mixed.get("embed_std") == 1e-3
    with pytest.raises(ValueError, match="allowed: upstream, cpu"):
        escaip.config_for("tiny", form="paper")
