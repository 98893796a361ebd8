"""The cheaper evaluation path measures what the per-rotation forwards measured (issue 16).

``evaluate_view`` serves the decomposition, the accuracy's plain prediction and the
gradient-norm ratio from one set of forwards; for the EScAIP-like model the K rotated copies
share one invariant trunk pass. The reference ("before") is the old path: K full forwards of
the rotated batches, canonicalised, decomposed; the gradient norms through those forwards.
"""

import math

import numpy as np
import pytest
import torch

from equipipe.data.embedded import embed_conformers, smiles_pool
from equipipe.equivariance import (
    decompose,
    decomposition_from_predictions,
    evaluate_view,
    example_rotations,
    gradient_norms_from,
)
from equipipe.tasks import make_task
from tests.toytask import PairModel, ToyTask, toy_batch


def _molecules(task, n: int):
    examples = []
    for smi in smiles_pool(n, seed=0, max_heavy=12):
        mol = embed_conformers(smi, 1, 0)
        pos = mol.GetConformer(0).GetPositions().astype(np.float32)
        z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
        g = np.random.default_rng(len(z))
        examples.append(
            {"pos": pos, "z": z, "forces": g.normal(size=pos.shape), "energy": g.normal()}
        )
    task.fit(examples)
    return task.collate(examples)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A fixed EScAIP-like checkpoint (tiny) with a non-equivariant head, and a real batch."""
    task = make_task("forcefield", {"model": "escaip"})
    batch = _molecules(task, 6)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save(task.build_model("tiny").state_dict(), path)
    model = task.build_model("tiny")
    model.load_state_dict(torch.load(path, weights_only=True))
    return task, model.eval(), batch


def _reference(model, task, batch, R):
    """The per-rotation path: K full forwards of rotated batches (autograd on)."""
    zs: dict[str, list] = {}
    for k in range(R.shape[0]):
        pred = task.canonicalize(task.predict(model, task.rotate(batch, R[k])), R[k])
        for f, v in pred.items():
            zs.setdefault(f, []).append(v)
    return {f: torch.stack(v) for f, v in zs.items()}


def test_shared_trunk_evaluation_equals_per_rotation_forwards(checkpoint):
    task, model, batch = checkpoint
    k, seed = 10, 5
    res = evaluate_view(model, task, batch, k, torch.Generator().manual_seed(seed), gradients=True)
    R = example_rotations(task.num_examples(batch), k, torch.Generator().manual_seed(seed))
    z = _reference(model, task, batch, R)
    y = task.target(batch)
    ref = {f: decomposition_from_predictions(z[f].detach(), y[f]) for f in task.fields}
    forces, new = ref["forces"], res.decompositions["forces"]
    assert forces.pct > 0.01  # the head is not equivariant: there is something to measure
    # the same rotations: equal up to float rounding of the trunk's rotated inputs
    for name, v in forces.per_element().items():
        assert math.isclose(new.per_element()[name], v, rel_tol=1e-5), name
    assert math.isclose(new.pct, forces.pct, rel_tol=1e-5)
    # the invariant energy: no equivariance error at all (before: float rounding, ~1e-16)
    assert res.decompositions["energy"].equiv == 0.0
    assert ref["energy"].equiv <= 1e-9 * ref["energy"].total
    assert math.isclose(res.decompositions["energy"].total, ref["energy"].total, rel_tol=1e-5)
    # gradient norms through the same forwards
    old = gradient_norms_from(model, z["forces"], y["forces"], None, k)
    for name, v in res.gradient_norms().items():
        assert math.isclose(v, old[name], rel_tol=1e-4), name
    # the accuracy's plain prediction is exactly the model's forward
    plain = task.predict(model, batch)
    for f in task.fields:
        assert torch.equal(res.prediction[f], plain[f])


def test_shared_trunk_difference_is_far_below_the_standard_error(checkpoint):
    """Two batches added: the before/after difference of the per-element means is < 1e-3 SE."""
    task, model, batch = checkpoint
    gen_new, gen_old = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    new = old = None
    for _ in range(2):
        a = evaluate_view(model, task, batch, 10, gen_new).decompositions["forces"]
        R = example_rotations(task.num_examples(batch), 10, gen_old)
        with torch.no_grad():
            z = _reference(model, task, batch, R)["forces"]
        b = decomposition_from_predictions(z, task.target(batch)["forces"])
        new, old = (a, b) if new is None else (new + a, old + b)
    for name in ("total", "equiv_unbiased"):
        diff = abs(new.per_element()[name] - old.per_element()[name])
        assert diff < 1e-3 * old.standard_error(name), name


@pytest.mark.parametrize("strategy", ["sequential", "batched"])
def test_one_pass_view_equals_decompose_and_gradient_norms(strategy):
    """Generic path: the decomposition is exactly decompose()'s; the ratio that of the same K
    forwards; the plain prediction that of the model."""
    task, batch = ToyTask(), toy_batch()
    model = PairModel(equivariant=False)
    res = evaluate_view(
        model, task, batch, 6, torch.Generator().manual_seed(3), strategy, gradients=True
    )
    ref = decompose(model, task, batch, 6, torch.Generator().manual_seed(3), strategy)
    for f, d in ref.items():
        assert res.decompositions[f].per_element() == d.per_element()
    R = example_rotations(6, 6, torch.Generator().manual_seed(3), dtype=torch.float64)
    z = _reference(model, task, batch, R)["v"]
    old = gradient_norms_from(model, z, batch["y"], None, 6)
    new = res.gradient_norms()
    for name, v in old.items():
        assert math.isclose(new[name], v, rel_tol=1e-6), name  # float32 vs float64 draws
    with pytest.raises(RuntimeError, match="gradients=True"):
        res.gradient_norms()
    assert torch.equal(res.prediction["v"], task.predict(model, batch)["v"])


def test_shared_pair_stack_equals_per_rotation_forwards():
    """Flow matching (Proteína-like tiny): the K copies share the invariant pair stack; the
    decomposition and the gradient norms equal those of K full forwards (same rotations)."""
    task = make_task("flowmatching", {"model": "proteina"})
    g = np.random.default_rng(0)
    examples = []
    for n in (30, 45, 38):
        pos = np.cumsum(g.normal(scale=0.22, size=(n, 3)), axis=0).astype(np.float32)
        examples.append({"pos": pos, "residue": np.arange(n), "chain_break": np.zeros(n, bool)})
    task.fit(examples)
    torch.manual_seed(0)
    model = task.build_model("tiny").eval()
    with torch.no_grad():  # a non-equivariant start: the raw-coordinate embedding matters
        model.decoder.linear.weight.normal_(std=0.5)
    view = task.eval_views(task.collate(examples), torch.Generator().manual_seed(0))[3][1]
    res = evaluate_view(model, task, view, 6, torch.Generator().manual_seed(2), gradients=True)
    R = example_rotations(3, 6, torch.Generator().manual_seed(2))
    # x_sc = 0 is self-conditioning off through the explicit (B, L, L, p) pair (the model's
    # path before its bias table): the "before" of the cheaper path
    explicit = {**view, "x_sc": torch.zeros_like(view["x1"])}
    z = _reference(model, task, explicit, R)["x1"]
    y, mask = task.target(view)["x1"], task.element_mask(view)["x1"]
    ref = decomposition_from_predictions(z.detach(), y, mask=mask)
    new = res.decompositions["x1"]
    assert ref.pct > 1e-3
    for name, v in ref.per_element().items():
        assert math.isclose(new.per_element()[name], v, rel_tol=1e-4), name
    old = gradient_norms_from(model, z, y, mask, 6)
    for name, v in res.gradient_norms().items():
        assert math.isclose(v, old[name], rel_tol=1e-3), name
    with torch.inference_mode():  # the plain forward, as the accuracy pass runs it
        assert torch.equal(res.prediction["x1"], task.predict(model, view)["x1"])
    # without gradients (inference mode, the fused attention kernel): the same decomposition
    res = evaluate_view(model, task, view, 6, torch.Generator().manual_seed(2))
    for name, v in ref.per_element().items():
        assert math.isclose(res.decompositions["x1"].per_element()[name], v, rel_tol=1e-4), name
    with torch.inference_mode():
        assert torch.equal(res.prediction["x1"], task.predict(model, view)["x1"])
