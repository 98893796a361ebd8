"""Band-limited noise and spline resampling (equipipe.bandlimit): the continuous voxel mode."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from equipipe.bandlimit import (
    band_mask,
    bandlimited_noise,
    evaluate_rotated,
    power_inside,
    project,
    spline_rotate,
)
from equipipe.so3 import grid_centres, haar_rotations, octahedral_rotations, rotate_grid
from equipipe.voxel import ball_mask


def test_white_noise_power_outside_the_nyquist_ball():
    # the reason white grid noise cannot be rotated: about half its power is in the corners
    assert 1 - power_inside(64, 1.0) == pytest.approx(1 - math.pi / 6, abs=0.01)
    m = band_mask(16, 0.5)
    assert m.shape == (16, 16, 9) and not m[8].any() and not m[..., 8].any()


def test_noise_is_white_noise_inside_the_ball_and_nothing_outside():
    n = bandlimited_noise(7, 8, 32, 1.0)
    assert n.shape == (8, 32, 32, 32) and n.dtype == np.float32
    assert n.var() == pytest.approx(power_inside(32, 1.0), rel=0.02)  # pi/6 of white noise's
    white = torch.randn(
        8, 32, 32, 32, generator=torch.Generator().manual_seed(7), dtype=torch.float64
    )
    inside = np.fft.irfftn(project(white.numpy(), 1.0), s=(32,) * 3, axes=(-3, -2, -1))
    assert np.abs(n - inside).max() < 1e-5
    spec = np.fft.rfftn(n.astype(np.float64), axes=(-3, -2, -1))
    outside = np.abs(spec[:, ~band_mask(32, 1.0)]) ** 2
    assert outside.sum() < 1e-8 * (np.abs(spec) ** 2).sum()
    assert np.array_equal(n, bandlimited_noise(7, 8, 32, 1.0))  # a pure function of the seed


def test_octahedral_rotation_of_the_noise_is_an_exact_permutation():
    n = torch.from_numpy(bandlimited_noise(3, 2, 16, 1.0))
    for R in octahedral_rotations()[1:24:5]:
        moved = bandlimited_noise(3, 2, 16, 1.0, R.numpy())
        assert np.abs(moved - rotate_grid(n, R).numpy()).max() < 1e-5


def test_rotated_noise_is_the_band_limited_field_at_rotated_points():
    # exact reference: the trigonometric polynomial summed directly at R^T x
    G, band = 12, 1.0
    white = np.random.default_rng(0).standard_normal((1, G, G, G))
    spec = project(white, band)
    full = np.fft.fftn(np.fft.irfftn(spec, s=(G,) * 3, axes=(-3, -2, -1))[0])
    k = np.fft.fftfreq(G, 1.0 / G)
    K = np.stack(np.meshgrid(k, k, k, indexing="ij"), -1).reshape(-1, 3)
    c = full.reshape(-1)
    keep = np.abs(c) > 1e-9
    R = haar_rotations(1, torch.Generator().manual_seed(4), dtype=torch.float64)[0].numpy()
    x = grid_centres((G,) * 3, 1.0, dtype=torch.float64).reshape(-1, 3).numpy()
    q = x @ R + (G - 1) / 2  # R^T x in index units
    exact = (np.exp(2j * np.pi * q @ K[keep].T / G) @ c[keep]).real / G**3
    got = evaluate_rotated(spec, G, R, oversample=2)[0].reshape(-1)
    rel = np.mean((got - exact) ** 2) / np.mean(exact**2)
    assert rel < 2e-4


def test_spline_rotate_is_exact_for_octahedral_and_round_trips_smooth_fields():
    G = 16
    x = grid_centres((G,) * 3, 1.0, dtype=torch.float64)
    f = torch.exp(-((x - torch.tensor([1.0, -0.5, 2.0])).pow(2).sum(-1)) / 8.0)[None, None]
    R = octahedral_rotations()[7].double()
    assert (spline_rotate(f, R[None]) - rotate_grid(f, R)).abs().max() < 1e-9
    H = haar_rotations(1, torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = torch.exp(-((x @ H[0] - torch.tensor([1.0, -0.5, 2.0])).pow(2).sum(-1)) / 8.0)
    m = ball_mask(G)  # what the continuous evaluation reads
    for order, tol in ((3, 2e-4), (5, 5e-5)):
        got = spline_rotate(f, H, order=order)[0, 0]
        assert (got - exact)[m].pow(2).mean() < tol * exact[m].pow(2).mean()


def test_spline_rotate_has_the_inverse_rotation_as_its_gradient():
    """The gradient-norm ratio differentiates rotated-back voxel predictions (the Haar view of
    the paper's voxmol runs): autograd flows, and its backward (rotation by R^T) is the adjoint
    of the forward on smooth fields: <A x, y> = <x, A^T y> up to the interpolation error."""
    G = 16
    c = grid_centres((G,) * 3, 1.0, dtype=torch.float64)

    def bump(centre, width):
        return torch.exp(-((c - torch.tensor(centre)).pow(2).sum(-1)) / width)[None, None]

    x = bump([1.0, -0.5, 2.0], 8.0).requires_grad_(True)
    y = bump([-1.5, 1.0, 0.5], 6.0)
    R = haar_rotations(1, torch.Generator().manual_seed(3), dtype=torch.float64)
    out = spline_rotate(x, R, order=3)
    assert out.requires_grad
    (out * y).sum().backward()  # x.grad = A^T y
    lhs = float((out * y).sum())  # <A x, y>
    rhs = float((x.detach() * x.grad).sum())  # <x, A^T y>
    assert rhs == pytest.approx(lhs, rel=1e-3)
    with torch.no_grad():  # the forward value does not depend on the gradient path
        assert torch.equal(spline_rotate(x, R, order=3), out.detach())
