"""The e3nn equivariant force field: size matching, exact equivariance, gradient forces, and
its cheaper evaluation (pruned e3nn graphs, the shared rotated pass) measuring the same."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from equipipe.equivariance import (
    canonical_predictions,
    decompose,
    decomposition_from_predictions,
    example_rotations,
)
from equipipe.models.equivariant import Interaction, build, prune_dead_einsums, radius_graph
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


# The embedded experiment's settings (ff_equivariant: size tiny, NequIP's 5 A cutoff).
EXPERIMENT = {"cutoff": 5.0, "avg_neighbors": 10.0}


def _dead_einsums(model) -> int:
    return sum(
        1
        for mod in model.modules()
        for name in getattr(mod, "__codegen__", ())
        for node in getattr(mod, name).graph.nodes
        if node.op == "call_function" and "einsum" in str(node.target) and not node.users
    )


def test_pruned_e3nn_graphs_are_bit_identical_and_stay_pruned():
    """e3nn leaves unused outer-product einsums in its eager fx graphs; the model erases them
    (bit-identical outputs) and copies (the EMA model: deepcopy) keep them erased."""
    model = build("tiny", **EXPERIMENT)
    assert _dead_einsums(model) == 0
    assert _dead_einsums(copy.deepcopy(model)) == 0
    torch.manual_seed(0)
    block = Interaction(model.blocks[1].irreps_out, model.irreps_sh, model.blocks[1].irreps_out,
                        model.cfg)  # fmt: skip
    assert _dead_einsums(block) > 0  # as e3nn builds it
    pruned = copy.deepcopy(block)
    assert prune_dead_einsums(pruned) == _dead_einsums(block)
    n, e = 12, 40
    h = torch.randn(n, block.tp.irreps_in1.dim)
    sh = torch.randn(e, model.irreps_sh.dim)
    radial = torch.randn(e, model.cfg.n_radial)
    src, dst = torch.randint(0, n, (e,)), torch.randint(0, n, (e,))
    with torch.no_grad():
        assert torch.equal(pruned(h, sh, radial, src, dst), block(h, sh, radial, src, dst))


def _rotated_forwards(model, task, batch, R):
    """The ordinary path: one full forward per rotated copy, canonicalised."""
    zs = [task.canonicalize(task.predict(model, task.rotate(batch, r)), r) for r in R]
    return {f: torch.stack([z[f] for z in zs]) for f in task.fields}


def test_shared_rotated_pass_equals_rotated_forwards(ff):
    """float64: the K copies sharing graph and radial weights equal K full forwards to float
    rounding; the plain prediction is the forward bit for bit; hooks see every copy."""
    task = ForceFieldTask({"model": "equivariant", "model_overrides": EXPERIMENT})
    torch.manual_seed(0)
    model = task.build_model("tiny").double().eval()
    batch = ff.batch(task)
    k, B = 4, task.num_examples(batch)
    # float64 rotations: float32 ones are orthogonal to ~1e-7 only, which moves the distances
    R = haar_rotations(k * B, torch.Generator().manual_seed(0), torch.float64).reshape(k, B, 3, 3)
    calls = {"": 0, "blocks.0": 0, "blocks.0.radial": 0, "head": 0}  # "": the model
    hooks = [
        model.get_submodule(name).register_forward_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)
        )
        for name in calls
    ]
    with torch.no_grad():
        z, plain = canonical_predictions(model, task, batch, R, plain=True)
    # no full forward (the shared pass); every copy and the plain one through the hooked
    # modules (a hooked radial MLP runs per copy, so a probe on it sees K + 1 outputs too)
    assert calls == {"": 0, "blocks.0": k + 1, "blocks.0.radial": k + 1, "head": k + 1}
    for h in hooks:
        h.remove()
    with torch.no_grad():
        ref = _rotated_forwards(model, task, batch, R)
        forward = task.predict(model, batch)
        rotated, none = model.forward_rotated(batch, R, plain=False)
        batched, batched_plain = model.forward_rotated(batch, R, batched=True)  # CUDA's way
        raw = model(batch)
    for f in task.fields:
        torch.testing.assert_close(z[f], ref[f], rtol=0, atol=1e-12 * ref[f].abs().max())
        assert torch.equal(plain[f], forward[f])
    assert none is None and rotated["forces"].shape == (k, *batch["pos"].shape)
    for f in task.fields:
        scale = 1e-12 * rotated[f].abs().max()
        torch.testing.assert_close(batched[f], rotated[f], rtol=0, atol=scale)
        torch.testing.assert_close(batched_plain[f], raw[f], rtol=0, atol=scale)
    gradient = build("tiny", forces="gradient", **SMALL)
    assert gradient.forward_rotated is None  # -dE/dx needs the radial part per copy


def test_shared_pass_decomposition_within_standard_error(ff):
    """float32, a fixed model and batch, K = 10: the decomposition through the shared pass
    differs from the K full forwards' far below its standard error, and the equivariance
    error of this exactly equivariant model stays at float precision."""
    task = ForceFieldTask({"model": "equivariant", "model_overrides": EXPERIMENT})
    torch.manual_seed(0)
    model = task.build_model("tiny").eval()
    batch = ff.batch(task, torch.float32)
    k = 10
    new = decompose(model, task, batch, k, torch.Generator().manual_seed(1))
    R = example_rotations(task.num_examples(batch), k, torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = _rotated_forwards(model, task, batch, R)
    y = task.target(batch)
    B = task.num_examples(batch)
    for f, index in (("forces", batch["batch"]), ("energy", None)):
        old = decomposition_from_predictions(z[f], y[f], n_examples=B, index=index)
        diff = abs(new[f].per_element()["total"] - old.per_element()["total"])
        assert diff < 1e-3 * old.standard_error("total"), f
        assert new[f].total > 0 and new[f].pct < 1e-8, (f, new[f].pct)  # float precision
        assert old.pct < 1e-8 and math.isfinite(new[f].pct)
