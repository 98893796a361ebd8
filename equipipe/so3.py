"""Rotations and their actions: seeded Haar rotations, the octahedral group, grids.

e3nn's ``o3.rand_matrix`` takes no generator, so seeded rotations live here. Vectors are
column vectors acted on as ``R @ x``; stored as rows, that is ``x @ R.T``.

Grid convention (shared with the voxeliser): a grid shaped (..., D, H, W) with spacing Δ has
voxel (i, j, k) centred at ((i - (D-1)/2) Δ, (j - (H-1)/2) Δ, (k - (W-1)/2) Δ) = (x, y, z),
so rotations about the grid centre are rotations about the origin of that frame.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor


def haar_rotations(
    n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Haar-uniform random rotation matrices, reproducible from ``generator``.

    Normalised Gaussian quaternions are uniform on S^3, whose image in SO(3) is Haar.

    Args:
        n: number of rotations.
        generator: a CPU ``torch.Generator`` (seeded by the caller); None uses the global RNG.
        dtype: floating dtype of the result.

    Returns:
        Tensor (n, 3, 3) of proper rotations (det +1), on the CPU.
    """
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    q = q / q.norm(dim=1, keepdim=True)
    return quaternion_to_matrix(q).to(dtype)


def quaternion_to_matrix(q: Tensor) -> Tensor:
    """Unit quaternions (..., 4) as (w, x, y, z) -> rotation matrices (..., 3, 3)."""
    w, x, y, z = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(*q.shape[:-1], 3, 3)


def rotation_angle(R: Tensor) -> Tensor:
    """Rotation angle θ in [0, π] of matrices R (..., 3, 3) -> (...)."""
    cos = ((R.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1.0, 1.0)
    return torch.arccos(cos)


def octahedral_rotations(dtype: torch.dtype = torch.float32) -> Tensor:
    """The 24 proper rotations of the cube (signed permutation matrices with det +1).

    Returns:
        Tensor (24, 3, 3); the first element is the identity.
    """
    mats = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            M = torch.zeros(3, 3, dtype=torch.float64)
            for row, (col, s) in enumerate(zip(perm, signs)):
                M[row, col] = s
            if torch.det(M) > 0:
                mats.append(M)
    out = torch.stack(mats)
    eye_first = torch.argsort((out - torch.eye(3, dtype=torch.float64)).abs().sum((1, 2)))
    return out[eye_first].to(dtype)


def rotate_vectors(x: Tensor, R: Tensor) -> Tensor:
    """Apply R to row vectors: entries R @ x.

    Args:
        x: (..., 3) row vectors.
        R: (3, 3) for all of them, or batched (*lead, 3, 3) broadcasting with x's leading
            dimensions as in matrix multiplication: x (B, L, 3) with R (B, 3, 3) turns example
            b's L rows by R[b]; x (B, L, 3) with R (K, B, 3, 3) gives K rotated copies.

    Returns:
        Tensor (..., 3) (the broadcast shape), in x's dtype.
    """
    return x @ R.to(x).transpose(-1, -2)


def rotate_per_example(x: Tensor, R: Tensor, index: Tensor) -> Tensor:
    """Rotate rows of a ragged batch, row n by R[index[n]].

    Args:
        x: (*lead, N, 3) rows of B examples concatenated.
        R: (*lead, B, 3, 3) one rotation per example (and per leading entry, e.g. K copies).
        index: (N,) int64 example of each row, in [0, B).

    Returns:
        Tensor (*lead, N, 3), in x's dtype and on its device.
    """
    Ra = R.to(x)[..., index, :, :]
    return torch.einsum("...nij,...nj->...ni", Ra, x)


def inverse(R: Tensor) -> Tensor:
    """Inverse of rotation matrices R (..., 3, 3): the transpose."""
    return R.transpose(-1, -2)


def grid_centres(
    shape: tuple[int, int, int], spacing: float, dtype=torch.float32, device=None
) -> Tensor:
    """Voxel centres (D, H, W, 3) in the grid convention of this module (units of ``spacing``)."""
    axes = [(torch.arange(s, dtype=dtype, device=device) - (s - 1) / 2) * spacing for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def _octahedral_permute(grid: Tensor, R: Tensor) -> Tensor | None:
    """Exact voxel permutation for a signed-permutation R on a cubic grid, else None."""
    Rr = R.round()
    if not torch.allclose(R, Rr, atol=1e-6) or len(set(grid.shape[-3:])) != 1:
        return None
    # out(x) = in(R^T x): output axis a reads input axis p with R[a, p] = ±1.
    nd = grid.dim()
    perm = [int(Rr[a].abs().argmax()) for a in range(3)]
    out = grid.permute(*range(nd - 3), *[nd - 3 + p for p in perm])
    flips = [nd - 3 + a for a in range(3) if Rr[a, perm[a]] < 0]
    return out.flip(flips) if flips else out


def rotate_grid(grid: Tensor, R: Tensor, mode: str = "bilinear") -> Tensor:
    """Rotate a scalar field sampled on a grid about the grid centre: out(x) = grid(R^T x).

    Octahedral R on a cubic grid is an exact voxel permutation; any other R is resampled
    (``mode="bilinear"`` = trilinear, or ``"nearest"``) with zeros outside the grid.

    Args:
        grid: (..., D, H, W) tensor.
        R: (3, 3) for all leading entries, or (B, 3, 3) where grid is (B, ..., D, H, W).
        mode: interpolation for non-octahedral R.

    Returns:
        Tensor of the same shape as ``grid``.
    """
    if R.dim() == 2:
        exact = _octahedral_permute(grid, R)
        if exact is not None:
            return exact
        R = R.expand(grid.shape[0] if grid.dim() > 3 else 1, 3, 3)
        batched = grid if grid.dim() > 3 else grid.unsqueeze(0)
        out = _resample(batched, R, mode)
        return out if grid.dim() > 3 else out.squeeze(0)
    if R.shape[0] != grid.shape[0]:
        raise ValueError(f"R has {R.shape[0]} rotations but grid has leading size {grid.shape[0]}")
    permuted = [_octahedral_permute(g, r) for g, r in zip(grid, R)]
    permutations = [e for e in permuted if e is not None]
    if len(permutations) == len(permuted):
        return torch.stack(permutations)
    return _resample(grid, R, mode)


def _resample(grid: Tensor, R: Tensor, mode: str) -> Tensor:
    """Resample grid (B, ..., D, H, W) at R_b^T x for each batch entry b."""
    B = grid.shape[0]
    D, H, W = grid.shape[-3:]
    flat = grid.reshape(B, -1, D, H, W)
    # Source position in index-space units: p = R^T x, x the voxel centre offsets.
    x = grid_centres((D, H, W), 1.0, dtype=grid.dtype, device=grid.device)  # (D,H,W,3) in voxels
    src = torch.einsum("bji,dhwj->bdhwi", R.to(grid.dtype), x)  # R^T x
    half = torch.tensor(
        [(D - 1) / 2, (H - 1) / 2, (W - 1) / 2], dtype=grid.dtype, device=grid.device
    )
    norm = src / half.clamp(min=1e-12)  # [-1, 1] at the outer voxel centres (align_corners=True)
    # grid_sample's last coordinate indexes W, then H, then D.
    out = F.grid_sample(flat, norm.flip(-1), mode=mode, padding_mode="zeros", align_corners=True)
    return out.reshape(grid.shape)


def haar_angle_density(theta: Tensor) -> Tensor:
    """Density of the rotation angle of a Haar-random rotation: (1 - cos θ) / π on [0, π]."""
    return (1 - torch.cos(theta)) / math.pi
