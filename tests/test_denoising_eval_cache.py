"""The denoising evaluation's caches and cheaper arithmetic measure what the uncached path did
(issue 16).

The reference is the previous path written out from the primitives: per rotation, voxelise the
rotated atoms, draw each example's band-limited noise from its seed and move it, forward,
rotate back (exact permutation, or scipy's ``map_coordinates`` with its own spline prefilter)
and decompose with ``decomposition_terms`` in float64. The task's evaluation must give the same
decomposition with its caches cold, warm, and switched off.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from equipipe.bandlimit import bandlimited_noise
from equipipe.equivariance import decomposition_terms, evaluate_view, example_rotations
from equipipe.evalcache import BoundedCache
from equipipe.so3 import grid_centres, rotate_grid
from equipipe.tasks.denoising import N_CHANNELS, DenoisingTask
from equipipe.voxel import voxelize
from tests.test_denoising import CFG, Blur, _examples

G = CFG["grid_size"]


@pytest.fixture(scope="module")
def examples():
    return _examples()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DenoisingTask(CFG).build_model("tiny").eval()


def _clean(task: DenoisingTask, b: dict) -> torch.Tensor:
    return voxelize(
        b["pos"], b["channel"], b["batch"], task.num_examples(b), G, task.spacing,
        radius=float(task.cfg["atom_radius"]), n_channels=N_CHANNELS,
        form=task.cfg["density_form"],
    )  # fmt: skip


def _rotate_back(grid: torch.Tensor, R: torch.Tensor, order: int) -> torch.Tensor:
    """out(x) = grid(R x) (C, G, G, G): permutation or scipy's prefiltered spline."""
    if torch.allclose(R, R.round(), atol=1e-6):
        return rotate_grid(grid, R.T)
    x = grid_centres((G, G, G), 1.0, dtype=torch.float64).reshape(-1, 3).numpy()
    src = (x @ R.double().numpy().T + (G - 1) / 2).T
    g = grid.double().numpy()
    out = [ndimage.map_coordinates(c, src, order=order, mode="nearest") for c in g]
    return torch.from_numpy(np.stack(out).reshape(grid.shape)).float()


def _reference(task: DenoisingTask, model, view: dict, R: torch.Tensor):
    """(total, mean, equiv) sums and per-example (total, equiv) sums of the uncached path."""
    B, band = task.num_examples(view), float(task.cfg["noise_band"])
    zs = []
    for k in range(R.shape[0]):
        rb = task.rotate(view, R[k])
        noise = torch.stack([
            torch.from_numpy(bandlimited_noise(int(s), N_CHANNELS, G, band, r.double().numpy()))
            for s, r in zip(rb["noise_seed"], rb["noise_rot"])
        ])  # fmt: skip
        with torch.no_grad():
            out = model(_clean(task, rb) + task.sigma * noise)
        order = int(task.cfg["resample_order"])
        zs.append(torch.stack([_rotate_back(out[b], R[k, b], order) for b in range(B)]))
    z, y = torch.stack(zs).double(), _clean(task, view).double()
    mask = task.element_mask(view)
    mask = None if mask is None else mask["density"]
    t, m, e, n = decomposition_terms(z, y, mask)
    units = [
        decomposition_terms(z[:, b], y[b], None if mask is None else mask[b]) for b in range(B)
    ]
    return (float(t), float(m), float(e), n), [(float(u[0]), float(u[2])) for u in units]


def _evaluate(task, model, view, rotations, seed=4):
    """The task's evaluation of one view (what ``Trainer.evaluate`` calls)."""
    res = evaluate_view(
        model, task, view, 4, torch.Generator().manual_seed(seed), "sequential", rotations,
        plain=False,
    )  # fmt: skip
    return res.decompositions["density"]


@pytest.mark.parametrize("mode", ["octahedral", "haar"])
def test_evaluation_is_the_uncached_path_cold_warm_and_without_cache(examples, model, mode):
    task = DenoisingTask(CFG)
    batch = task.collate(examples)
    views = dict((lab["mode"], v) for lab, v in task.eval_views(batch, torch.Generator()))
    view, rotations = views[mode], task.rotation_set({"mode": mode})
    R = example_rotations(3, 4, torch.Generator().manual_seed(4), rotations)
    (t, m, e, n), units = _reference(task, model, view, R)

    cold = _evaluate(task, model, view, rotations)
    hits = (task.noise_cache.hits, task.grid_cache.hits)
    warm = _evaluate(task, model, view, rotations)
    assert task.noise_cache.hits > hits[0] and task.grid_cache.hits > hits[1]  # served warm
    off = DenoisingTask(CFG, cache_bytes=0)
    uncached = _evaluate(off, model, view, rotations)
    assert len(off.noise_cache) == len(off.grid_cache) == 0

    assert cold.n_elements == n and cold.n_units == 3
    for d in (cold, warm, uncached):
        assert math.isclose(d.total, t, rel_tol=1e-6)
        assert math.isclose(d.mean, m, rel_tol=1e-6)
        assert math.isclose(d.equiv, e, rel_tol=1e-6)
        tu = np.array([u[0] for u in units])
        eu = np.array([u[1] for u in units]) * (1.0 if d.exhaustive else 4 / 3)
        np.testing.assert_allclose(d.moments["pct"], [eu @ eu, eu @ tu, tu @ tu], rtol=1e-6)
        # the cached inputs are the computed ones, bit for bit
        assert (d.total, d.mean, d.equiv, d.moments) == (
            cold.total, cold.mean, cold.equiv, cold.moments
        )  # fmt: skip
    assert cold.equiv > 1e-3 * cold.total  # an untrained U-Net: there is something to measure


def test_evaluation_input_caches_stay_within_their_byte_budget(examples):
    grids = 3 * N_CHANNELS * G**3 * 4  # bytes of one batch's clean grids (float32)
    task = DenoisingTask(CFG, cache_bytes=3 * grids)
    free = DenoisingTask(CFG)
    batch = task.collate(examples)
    blur = Blur(task)
    for labels, view in task.eval_views(batch, torch.Generator()):
        rot = task.rotation_set(labels)
        for _ in range(2):
            got = _evaluate(task, blur, view, rot)
        ref = _evaluate(free, blur, view, rot)
        assert (got.total, got.mean, got.equiv) == (ref.total, ref.mean, ref.equiv)
    for cache, unbounded in (
        (task.grid_cache, free.grid_cache),
        (task.noise_cache, free.noise_cache),
    ):
        assert 0 < cache.nbytes <= cache.max_bytes == 3 * grids
        assert len(cache) < len(unbounded)  # the evaluation's inputs exceed the budget
    assert len(task.grid_cache) == 2  # first come, first kept: nothing evicted
    # training inputs (fresh seeds, not fixed) never enter the caches
    before = (len(free.grid_cache), len(free.noise_cache), free.grid_cache.nbytes)
    tb = free.prepare_train(None, batch, torch.Generator().manual_seed(1))
    free.predict(blur, tb)
    assert (len(free.grid_cache), len(free.noise_cache), free.grid_cache.nbytes) == before


def test_bounded_cache_keeps_the_first_entries_and_counts_keys():
    c = BoundedCache(100)
    assert c.put("a", 1, 60) and not c.put("b", 2, 60) and c.put((1, b"xyz"), 3, 30)
    assert c.nbytes == 93 and len(c) == 2 and c.get("b") is None and c.get("a") == 1
    assert (c.hits, c.misses) == (1, 1)
    assert not BoundedCache(0).put("a", 1, 1)
