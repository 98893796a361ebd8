"""Voxeliser against a direct per-voxel reference; grid rotations, seeded noise, blur."""

from __future__ import annotations

import pytest
import torch

from equipipe.so3 import grid_centres, haar_rotations, octahedral_rotations, rotate_grid
from equipipe.voxel import (
    ATOMIC_NUMBERS,
    ball_mask,
    channel_of,
    cutoff_distance,
    density_width,
    gaussian_blur,
    inscribed_ball_radius,
    seeded_noise,
    voxelize,
)


def reference_voxels(pos, channel, batch, B, G, spacing, radius, C, form):
    """Every voxel against every atom, float64, no truncation."""
    centres = grid_centres((G, G, G), spacing, dtype=torch.float64)
    out = torch.zeros(B, C, G, G, G, dtype=torch.float64)
    w2 = density_width(radius, form) ** 2
    for p, c, b in zip(pos.double(), channel.tolist(), batch.tolist()):
        if c < 0:
            continue
        v = torch.exp(-(centres - p).pow(2).sum(-1) / w2)
        if form == "voxmol":
            out[b, c] = 1 - (1 - out[b, c]) * (1 - v)
        else:
            out[b, c] += v
    return out


@pytest.mark.parametrize("form", ["voxmol", "gaussian"])
@pytest.mark.parametrize("G,spacing", [(16, 0.5), (17, 0.25)])
def test_voxelize_matches_direct_reference(form, G, spacing):
    g = torch.Generator().manual_seed(0)
    n = 40
    half = (G - 1) / 2 * spacing
    pos = (torch.rand(n, 3, generator=g) * 2 - 1) * (half + 1.0)  # some atoms beyond the edge
    channel = torch.randint(-1, 8, (n,), generator=g)  # -1: no channel, skipped
    batch = torch.randint(0, 3, (n,), generator=g)
    got = voxelize(pos, channel, batch, 3, G, spacing, radius=0.5, form=form)
    ref = reference_voxels(pos, channel, batch, 3, G, spacing, 0.5, 8, form)
    assert got.shape == (3, 8, G, G, G) and got.dtype == torch.float32
    assert (got.double() - ref).abs().max() <= 1e-5


def test_voxelize_peak_and_convention():
    """One atom on a voxel centre gives 1 there; voxel (i,j,k) sits at grid_centres[i,j,k]."""
    G, d = 9, 0.5
    centres = grid_centres((G, G, G), d)
    pos = centres[6, 2, 4][None]
    v = voxelize(pos, torch.tensor([3]), torch.tensor([0]), 1, G, d)
    assert v[0, 3, 6, 2, 4] == pytest.approx(1.0)
    assert v.flatten().argmax() == ((3 * G + 6) * G + 2) * G + 4
    assert cutoff_distance(0.5) == pytest.approx(0.93 * 0.5 * (13.8155) ** 0.5, rel=1e-4)


def test_channel_of_elements():
    z = torch.tensor([6, 1, 8, 7, 9, 16, 17, 35, 15, 53])
    assert channel_of(z).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, -1, -1]
    assert len(ATOMIC_NUMBERS) == 8


def test_octahedral_rotations_are_exact_permutations_and_invert():
    g = torch.Generator().manual_seed(1)
    grid = torch.rand(2, 3, 8, 8, 8, generator=g)
    for R in octahedral_rotations():
        out = rotate_grid(grid, R)
        assert torch.equal(out.flatten(2).sort(-1).values, grid.flatten(2).sort(-1).values)
        assert torch.equal(rotate_grid(out, R.T), grid)


def test_voxelize_commutes_with_octahedral_rotations():
    g = torch.Generator().manual_seed(2)
    pos = torch.randn(12, 3, generator=g) * 2
    ch = torch.randint(0, 8, (12,), generator=g)
    b = torch.zeros(12, dtype=torch.long)
    base = voxelize(pos, ch, b, 1, 16, 0.5)
    for R in octahedral_rotations():
        rotated = voxelize(pos @ R.T, ch, b, 1, 16, 0.5)
        assert (rotated - rotate_grid(base, R)).abs().max() < 1e-6


def test_seeded_noise_moves_with_the_example():
    seeds = torch.tensor([3, 11, 12])
    base = seeded_noise(seeds, 8, 16)
    assert torch.equal(base, seeded_noise(seeds, 8, 16))  # a pure function of the seed
    assert not torch.equal(base[0], base[1])
    oct_r = octahedral_rotations()[torch.tensor([0, 5, 17])]
    assert torch.equal(
        seeded_noise(seeds, 8, 16, oct_r), rotate_grid(base, oct_r)
    )  # exact permutation
    H = haar_rotations(3, torch.Generator().manual_seed(0))
    moved = seeded_noise(seeds, 8, 16, H)
    assert (moved != 0).all()  # no empty corners: the lattice extends beyond the cube
    assert moved.std().item() == pytest.approx(1.0, abs=0.03)
    nearest = rotate_grid(base, H, mode="nearest")
    m = ball_mask(16)
    assert torch.equal(moved[..., m], nearest[..., m])  # = nearest-neighbour resampling


def test_gaussian_blur_commutes_with_octahedral_permutations_and_keeps_mass():
    g = torch.Generator().manual_seed(4)
    x = torch.zeros(2, 1, 16, 16, 16)
    x[..., 4:12, 4:12, 4:12] = torch.rand(2, 1, 8, 8, 8, generator=g)
    y = gaussian_blur(x, 1.0)
    assert y.sum().item() == pytest.approx(x.sum().item(), rel=1e-5)
    for R in octahedral_rotations():
        assert (gaussian_blur(rotate_grid(x, R), 1.0) - rotate_grid(y, R)).abs().max() < 1e-6


def test_inscribed_ball():
    assert inscribed_ball_radius(32, 0.5) == pytest.approx(7.75)
    m = ball_mask(32)
    assert m[1, 15, 15] and m[30, 16, 16] and not m[0, 15, 15] and not m[0, 0, 0]
    # rotated about the centre, every in-ball voxel centre still lands inside the cube
    c = grid_centres((32, 32, 32), 1.0)[m]
    for R in haar_rotations(8, torch.Generator().manual_seed(0)):
        assert (c @ R).abs().max() <= 15.5 + 1e-4
