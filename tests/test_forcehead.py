"""Closed form of the direct force head's equivariance error and its exact twirl (PAPER.md)."""

import math

import pytest
import torch

from equipipe.equivariance import canonical_predictions, decompose, example_rotations
from equipipe.forcehead import (
    HEAD_PARAM,
    exact_head_equiv_error,
    exact_twirl,
    force_scale,
    head_equiv_error,
    head_forces,
    twirled_head_weight,
)
from equipipe.models.escaip import build
from equipipe.so3 import octahedral_rotations
from equipipe.tasks.forcefield import ForceFieldTask

F64 = torch.float64
FORCE_STD = 1.7


def make_task():
    task = ForceFieldTask({"energy_reference": "none"})
    task.set_state({"energy_reference": "none", "element_energy": {}, "energy_mean": 0.3,
                    "energy_std": 2.0, "force_std": FORCE_STD})  # fmt: skip
    return task


def make_model(seed=0):
    torch.manual_seed(seed)
    model = build("tiny", hidden=16, n_heads=2, n_rbf=8, max_neighbors=6, cutoff=5.0, n_layers=1)
    return model.to(F64).eval()


def make_batch(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(4, 8, (B,), generator=g)
    N = int(n.sum())
    return {
        "pos": 1.5 * torch.randn(N, 3, generator=g, dtype=F64),
        "z": torch.randint(1, 9, (N,), generator=g),
        "batch": torch.arange(B).repeat_interleave(n),
        "n_atoms": n,
        "energy": torch.randn(B, generator=g, dtype=F64),
        "forces": torch.randn(N, 3, generator=g, dtype=F64),
    }


@pytest.fixture(scope="module")
def setup():
    return make_task(), make_model(), make_batch()


def per_atom_equiv(z):
    """Plug-in equivariance error per atom from canonical forces z (K, N, 3)."""
    return (z - z.mean(0, keepdim=True)).pow(2).sum(-1).mean(0)


def test_features_reproduce_the_model_forces_and_the_task_scale(setup):
    task, model, batch = setup
    f = model.force_head_features(batch)
    n = batch["pos"].shape[0]
    mine = head_forces(f["weight"], f["h"], f["rhat"], f["m"], f["edge_atom"], n)
    torch.testing.assert_close(mine, model(batch)["forces"], rtol=1e-10, atol=1e-12)
    assert math.isclose(force_scale(model, task, batch), FORCE_STD, rel_tol=1e-10)


def test_closed_form_equals_exhaustive_octahedral_decomposition(setup):
    task, model, batch = setup
    closed = head_equiv_error(model, batch, task)  # (N,), task units
    G = octahedral_rotations(F64)
    R = example_rotations(task.num_examples(batch), 24, None, G, dtype=F64)
    with torch.no_grad():
        z = canonical_predictions(model, task, batch, R)["forces"]
    torch.testing.assert_close(closed, per_atom_equiv(z), rtol=1e-6, atol=1e-12)
    dec = decompose(model, task, batch, 24, None, rotations=G)
    assert dec["forces"].exhaustive
    assert math.isclose(float(closed.sum()), dec["forces"].equiv_unbiased, rel_tol=1e-6)
    assert dec["energy"].equiv < 1e-20  # invariant backbone: the energy is exactly invariant
    # model units: the task's forces are force_std x the model's, the error force_std^2 x
    f = model.force_head_features(batch)
    raw = exact_head_equiv_error(
        f["weight"], f["h"], f["rhat"], f["m"], f["edge_atom"], len(closed)
    )
    torch.testing.assert_close(closed, raw * FORCE_STD**2)


def test_closed_form_matches_haar_monte_carlo_within_three_standard_errors(setup):
    """Per example: disjoint pairs of Haar rotations give iid unbiased estimates ||z1-z2||^2/2."""
    task, model, batch = setup
    closed = head_equiv_error(model, batch, task)
    B, K = task.num_examples(batch), 256
    R = example_rotations(B, K, torch.Generator().manual_seed(7), dtype=F64)
    with torch.no_grad():
        z = canonical_predictions(model, task, batch, R, "batched")["forces"]  # (K, N, 3)
    pairs = (z[0::2] - z[1::2]).pow(2).sum(-1) / 2  # (K/2, N)
    per_ex = torch.zeros(K // 2, B, dtype=F64).index_add_(1, batch["batch"], pairs)
    exact_ex = torch.zeros(B, dtype=F64).index_add_(0, batch["batch"], closed)
    est, se = per_ex.mean(0), per_ex.std(0) / math.sqrt(K // 2)
    assert torch.all((est - exact_ex).abs() < 3 * se), (est, exact_ex, se)
    total = per_ex.sum(1)
    assert abs(float(total.mean() - exact_ex.sum())) < 3 * float(total.std() / math.sqrt(K // 2))


def test_equal_rows_give_zero(setup):
    task, model, batch = setup
    eq = make_model()
    with torch.no_grad():
        w = dict(eq.named_parameters())[HEAD_PARAM]
        w.copy_(twirled_head_weight(w))
    assert float(head_equiv_error(eq, batch, task).abs().max()) == 0.0
    dec = decompose(eq, task, batch, 6, torch.Generator().manual_seed(0))
    assert dec["forces"].equiv < 1e-12 * dec["forces"].total  # float64 precision
    # the closed form only sees dW: adding one vector to every row changes nothing
    f = model.force_head_features(batch)
    n = batch["pos"].shape[0]
    shifted = f["weight"] + torch.randn(1, f["weight"].shape[1], dtype=F64)
    a = exact_head_equiv_error(f["weight"], f["h"], f["rhat"], f["m"], f["edge_atom"], n)
    b = exact_head_equiv_error(shifted, f["h"], f["rhat"], f["m"], f["edge_atom"], n)
    torch.testing.assert_close(a, b)


def test_exact_twirl_is_the_group_average_and_leaves_the_model_alone(setup):
    task, model, batch = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tw = exact_twirl(model, batch, task)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    R = example_rotations(task.num_examples(batch), 24, None, octahedral_rotations(F64), dtype=F64)
    with torch.no_grad():
        z = canonical_predictions(model, task, batch, R)
    torch.testing.assert_close(tw["forces"], z["forces"].mean(0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(tw["energy"], task.predict(model, batch)["energy"])
    W = torch.randn(3, 5)
    Wb = twirled_head_weight(W)
    assert Wb.shape == (3, 5) and torch.allclose(Wb, W.mean(0).expand(3, 5))
    with pytest.raises(ValueError, match=r"\(3, H\)"):
        twirled_head_weight(torch.randn(4, 5))
