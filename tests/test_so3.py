import math

import numpy as np
import pytest
import torch
from scipy import stats

from equipipe.so3 import (
    grid_centres,
    haar_angle_density,
    haar_rotations,
    octahedral_rotations,
    rotate_grid,
    rotation_angle,
)


def test_haar_rotations_are_proper_and_seeded():
    R = haar_rotations(1000, torch.Generator().manual_seed(1), dtype=torch.float64)
    assert R.shape == (1000, 3, 3)
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(R @ R.transpose(1, 2), eye.expand_as(R), atol=1e-12)
    assert torch.allclose(torch.det(R), torch.ones(1000, dtype=torch.float64), atol=1e-12)
    again = haar_rotations(1000, torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(R, again)
    assert not torch.equal(
        R, haar_rotations(1000, torch.Generator().manual_seed(2), dtype=torch.float64)
    )


def test_haar_angle_distribution_matches_density():
    theta = rotation_angle(
        haar_rotations(20000, torch.Generator().manual_seed(0), dtype=torch.float64)
    ).numpy()
    cdf = lambda t: (t - np.sin(t)) / math.pi  # noqa: E731 - integral of (1 - cos)/pi
    assert stats.kstest(theta, cdf).pvalue > 1e-3
    # the density integrates to one and the histogram follows it
    grid = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
    assert abs(torch.trapezoid(haar_angle_density(grid), grid).item() - 1) < 1e-6
    hist, edges = np.histogram(theta, bins=10, range=(0, math.pi), density=True)
    mids = torch.tensor((edges[1:] + edges[:-1]) / 2)
    assert np.allclose(hist, haar_angle_density(mids).numpy(), atol=0.05)


def test_haar_rotations_are_not_biased_to_axes():
    # mean rotation of a Haar sample is ~0 (E[R] = 0 for the uniform measure)
    R = haar_rotations(20000, torch.Generator().manual_seed(3), dtype=torch.float64)
    assert R.mean(0).abs().max() < 0.03


def test_octahedral_group_closure():
    O = octahedral_rotations(torch.float64)
    assert O.shape == (24, 3, 3)
    assert torch.equal(O[0], torch.eye(3, dtype=torch.float64))
    keys = {tuple(m.flatten().tolist()) for m in O}
    assert len(keys) == 24
    for a in O:
        for b in O:
            assert tuple((a @ b).flatten().tolist()) in keys


def test_rotate_grid_octahedral_is_exact_permutation_and_invertible():
    g = torch.randn(2, 3, 6, 6, 6, dtype=torch.float64)
    for R in octahedral_rotations(torch.float64):
        out = rotate_grid(g, R)
        assert torch.equal(torch.sort(out.flatten()).values, torch.sort(g.flatten()).values)
        assert torch.equal(rotate_grid(out, R.T), g)


def test_rotate_grid_matches_point_rotation_for_smooth_field():
    # a Gaussian blob at c rotates to a blob at R c (trilinear, continuous rotation)
    G, spacing = 24, 0.25
    x = grid_centres((G, G, G), spacing, dtype=torch.float64)
    c = torch.tensor([0.8, -0.3, 0.5], dtype=torch.float64)
    blob = lambda centre: torch.exp(-((x - centre) ** 2).sum(-1) / (2 * 0.8**2))  # noqa: E731
    R = haar_rotations(1, torch.Generator().manual_seed(5), dtype=torch.float64)[0]
    out = rotate_grid(blob(c), R)
    ref = blob(R @ c)
    assert (out - ref).abs().max() < 0.04  # trilinear interpolation error only


def test_rotate_grid_batched_rotations():
    g = torch.randn(4, 2, 5, 5, 5, dtype=torch.float64)
    R = haar_rotations(4, torch.Generator().manual_seed(0), dtype=torch.float64)
    out = rotate_grid(g, R)
    for i in range(4):
        assert torch.allclose(out[i], rotate_grid(g[i : i + 1], R[i])[0], atol=1e-12)
    with pytest.raises(ValueError):
        rotate_grid(g, R[:3])
