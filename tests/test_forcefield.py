"""Force-field task: normalisation, group action, physical units, loss, a short training run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from equipipe.so3 import haar_rotations, octahedral_rotations
from equipipe.tasks import Task, make_task
from equipipe.tasks.forcefield import ForceFieldTask

SMALL = {
    "hidden": 32,
    "n_layers": 2,
    "n_heads": 4,
    "ffn_mult": 2,
    "readout_mult": 1,
    "head_mult": 1,
}
SMILES = ["CCO", "c1ccccc1O", "CC(=O)O", "CN", "O=C=O", "CC(C)CN", "OCC(O)CO", "C1CCNCC1"]
ELEMENT_ENERGY = {1: -13.6, 6: -1029.5, 7: -1484.0, 8: -2041.3}  # eV, synthetic


def pair_energy_and_forces(pos: np.ndarray) -> tuple[float, np.ndarray]:
    """A smooth synthetic potential: sum over pairs of exp(-d) - 0.5 exp(-d/2)."""
    x = torch.tensor(pos, dtype=torch.float64, requires_grad=True)
    d = torch.pdist(x)
    energy = (torch.exp(-d) - 0.5 * torch.exp(-d / 2)).sum()
    (grad,) = torch.autograd.grad(energy, x)
    return float(energy.detach()), (-grad).numpy()


@pytest.fixture(scope="module")
def examples() -> list[dict[str, np.ndarray]]:
    """Real RDKit-embedded molecules (with H), a few jittered conformers each, synthetic labels."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    rng = np.random.default_rng(0)
    out = []
    for smi in SMILES:
        mol = Chem.AddHs(Chem.MolFromSmiles(smi))
        assert AllChem.EmbedMolecule(mol, randomSeed=1) == 0
        base = mol.GetConformer().GetPositions()
        z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
        for _ in range(3):
            pos = base + rng.normal(scale=0.05, size=base.shape)
            e, f = pair_energy_and_forces(pos)
            e += sum(ELEMENT_ENERGY[int(a)] for a in z)
            out.append(
                {
                    "pos": pos.astype(np.float32),
                    "z": z,
                    "forces": f.astype(np.float32),
                    "energy": np.array(e),
                }
            )
    return out


@pytest.fixture()
def task(examples) -> ForceFieldTask:
    t = make_task("forcefield", {"model_overrides": SMALL})
    t.fit(examples)
    return t


def double(batch):
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def equivariant_model(task, seed=0):
    torch.manual_seed(seed)
    model = task.build_model("tiny").double().eval()
    with torch.no_grad():
        w = model.force_head.linear.weight
        w.copy_(w.mean(0, keepdim=True).expand_as(w))
    return model


# --- registry and config -------------------------------------------------------------------


def test_make_task_and_protocol():
    t = make_task("forcefield", {})
    assert isinstance(t, Task)
    assert t.fields == ("forces", "energy") and t.primary_field == "forces"
    assert t.units == {"forces": "(eV/A)^2", "energy": "eV^2"}
    with pytest.raises(ValueError, match="allowed: forcefield"):
        make_task("nope", {})
    with pytest.raises(ValueError, match="energy_reference.*allowed: linear, none"):
        make_task("forcefield", {"energy_reference": "atomic"})
    with pytest.raises(RuntimeError, match="fit"):
        t.collate([])


# --- normalisation -------------------------------------------------------------------------


def test_linear_reference_recovers_element_energies():
    rng = np.random.default_rng(1)
    truth = {1: -13.6, 6: -1029.5, 8: -2041.3, 17: -12577.0}
    exs = []
    for _ in range(60):
        counts = rng.integers(1, 8, size=4)
        z = np.repeat(list(truth), counts)
        e = sum(truth[int(a)] for a in z) + rng.normal(scale=0.01)
        exs.append(
            {
                "pos": np.zeros((len(z), 3)),
                "z": z,
                "forces": np.ones((len(z), 3)),
                "energy": np.array(e),
            }
        )
    state = ForceFieldTask({}).fit(exs)
    for z, e in truth.items():
        assert abs(state["element_energy"][str(z)] - e) < 0.01
    assert abs(state["energy_mean"]) < 0.01 and state["energy_std"] < 0.02
    assert state["force_std"] == pytest.approx(1.0)
    none = ForceFieldTask({"energy_reference": "none"}).fit(exs)
    assert none["element_energy"] == {}
    assert none["energy_mean"] == pytest.approx(np.mean([float(ex["energy"]) for ex in exs]))


def test_state_roundtrip_collate_and_physical_targets(task, examples):
    state = json.loads(json.dumps(task.fit(examples)))
    other = ForceFieldTask({})
    other.set_state(state)
    b1, b2 = task.collate(examples[:5]), other.collate(examples[:5])
    assert all(torch.equal(b1[k], b2[k]) for k in b1)
    assert b1["pos"].dtype == torch.float32 and b1["z"].dtype == torch.int64
    assert b1["n_atoms"].tolist() == [len(ex["z"]) for ex in examples[:5]]
    y = task.target(b1)
    forces = np.concatenate([ex["forces"] for ex in examples[:5]])
    assert np.allclose(y["forces"].numpy(), forces, atol=1e-5)
    table = state["element_energy"]
    referenced = [
        float(ex["energy"]) - sum(table[str(int(a))] for a in ex["z"]) for ex in examples[:5]
    ]
    assert np.allclose(y["energy"].numpy(), referenced, atol=1e-4)
    whole = task.collate(examples)
    assert (
        abs(float(whole["energy"].mean())) < 1e-5
        and abs(float(whole["energy"].std(unbiased=False)) - 1) < 1e-4
    )
    assert abs(float(whole["forces"].pow(2).mean().sqrt()) - 1) < 1e-4


def test_predict_is_physical_and_loss_formula(task, examples):
    b = task.collate(examples[:6])

    def oracle(batch):  # outputs exactly the normalised targets
        return {"energy": batch["energy"].clone(), "forces": batch["forces"].clone()}

    pred = task.predict(oracle, b)
    y = task.target(b)
    assert torch.allclose(pred["forces"], y["forces"]) and torch.allclose(
        pred["energy"], y["energy"]
    )
    assert float(task.loss(pred, b)) < 1e-4
    acc = task.accuracy(pred, b)
    assert set(acc) == {"energy_mae", "energy_rmse", "force_mae", "force_rmse"}
    assert (
        acc["force_mae"][1] == "eV/A"
        and acc["energy_mae"][1] == "eV"
        and acc["force_mae"][0] < 1e-5
    )

    s = task.state
    shifted = {
        **pred,
        "energy": pred["energy"] + 0.5,
        "forces": pred["forces"] + torch.tensor([0.3, 0.0, 0.4]),
    }
    expected = 4 * 0.5 / s["energy_std"] + 100 * 0.5 / s["force_std"]
    assert float(task.loss(shifted, b)) == pytest.approx(expected, rel=1e-4)
    acc = task.accuracy(shifted, b)
    assert acc["energy_mae"][0] == pytest.approx(0.5, rel=1e-4)
    assert acc["force_mae"][0] == pytest.approx(0.7 / 3, rel=1e-4)
    assert acc["force_rmse"][0] == pytest.approx(np.sqrt(0.25 / 3), rel=1e-4)


# --- group action --------------------------------------------------------------------------


def test_repeat_is_copy_major(task, examples):
    b = task.collate(examples[:4])
    big = task.repeat(b, 3)
    n, m = b["pos"].shape[0], b["n_atoms"].shape[0]
    assert task.num_examples(big) == 3 * m and big["pos"].shape == (3 * n, 3)
    assert torch.equal(big["batch"].reshape(3, n), b["batch"][None] + torch.arange(3)[:, None] * m)
    assert torch.equal(big["forces"].reshape(3, n, 3)[2], b["forces"])
    assert torch.equal(big["energy"].reshape(3, m)[1], b["energy"])


def test_rotate_canonicalize_roundtrip(task, examples):
    b = double(task.collate(examples[:5]))
    k, m = 4, 5
    R = haar_rotations(k * m, torch.Generator().manual_seed(0), dtype=torch.float64)
    # targets: rotating then canonicalising gives the original
    rb = task.rotate(task.repeat(b, k), R)
    y_rot = task.target(rb)
    back = task.canonicalize({**y_rot, "batch": rb["batch"]}, R)
    assert set(back) == {"forces", "energy"}
    y = task.target(b)
    assert torch.allclose(
        back["forces"].reshape(k, -1, 3), y["forces"].expand(k, -1, 3), atol=1e-10
    )
    # an exactly equivariant model: canonicalised predictions of rotated copies = plain predictions
    model = equivariant_model(task)
    with torch.no_grad():
        z = task.canonicalize(task.predict(model, rb), R)
        p = task.predict(model, b)
    assert torch.allclose(
        z["forces"].reshape(k, -1, 3), p["forces"].expand(k, -1, 3), atol=1e-8, rtol=1e-7
    )
    assert torch.allclose(z["energy"].reshape(k, -1), p["energy"].expand(k, -1), atol=1e-8)
    # rotation only moves positions and forces
    assert torch.equal(rb["z"], task.repeat(b, k)["z"]) and torch.equal(
        rb["energy"], task.repeat(b, k)["energy"]
    )


def test_octahedral_equivariance_error_matches_closed_form_in_physical_units(task, examples):
    """Through the task's own repeat/rotate/canonicalize: E over the 24 octahedral rotations
    equals force_std^2 * (m_i^2 / 3) ||sum_j dc_ij rhat_ij^T||^2 (PAPER.md), in (eV/A)^2."""
    torch.manual_seed(3)
    model = task.build_model("tiny").double().eval()
    b = double(task.collate(examples[:3]))
    G = octahedral_rotations(dtype=torch.float64)
    m = task.num_examples(b)
    R = G.repeat_interleave(m, dim=0)  # copy-major: copy c uses G[c] for every example
    with torch.no_grad():
        big = task.rotate(task.repeat(b, 24), R)
        z = task.canonicalize(task.predict(model, big), R)["forces"].reshape(24, -1, 3)
        feats = model.force_head_features(b)
    equiv = (z - z.mean(0)).pow(2).sum((0, 2)) / 24  # per atom, summed over components
    w = feats["weight"]
    dc = feats["h"] @ (w - w.mean(0)).T
    outer = torch.zeros(b["pos"].shape[0], 3, 3, dtype=torch.float64)
    outer.index_add_(0, feats["edge_atom"], dc[:, :, None] * feats["rhat"][:, None, :])
    closed = task.state["force_std"] ** 2 * feats["m"] ** 2 / 3 * outer.pow(2).sum((1, 2))
    assert torch.allclose(equiv, closed, rtol=1e-7, atol=1e-14)
    assert float(equiv.sum()) > 0


# --- training -----------------------------------------------------------------------------


def test_loss_decreases_with_adam(task, examples):
    torch.manual_seed(0)
    model = task.build_model("tiny")
    b = task.collate(examples)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = task.loss(task.predict(model, task.prepare_train(model, b, None)), b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    assert task.eval_views(b, torch.Generator()) == [({}, b)] and task.element_mask(b) is None
    assert task.augment(b, torch.Generator()) is b
