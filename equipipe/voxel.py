"""Atoms -> density grids: batched Gaussian splatting in torch (CPU and GPU).

Grid convention (shared with :func:`equipipe.so3.rotate_grid`): a grid of ``G`` voxels per
side with spacing Δ has voxel (i, j, k) centred at ((i - (G-1)/2) Δ, (j - (G-1)/2) Δ,
(k - (G-1)/2) Δ) = (x, y, z) Å, so the grid centre is the origin of the molecule's frame.

Atom density (``form``):

- ``"voxmol"`` (default, VoxMol's voxeliser, i.e. PyUUL's Gaussian occupancy after Li et al.
  2014): one atom at distance d gives v = exp(-d² / (0.93 r)²); atoms of the same channel
  combine as an occupancy union, 1 - Π_i (1 - v_i), so a voxel never exceeds 1.
- ``"gaussian"``: exp(-d² / (2 r²)), summed over the atoms of a channel.

Both are isotropic around each atom, so the voxel grid of rotated coordinates is the rotated
continuous density sampled on the fixed lattice (what the equivariance evaluation relies on).
Each atom is truncated at the distance where its density falls below ``tol`` (a sphere, not a
cube, so truncation stays isotropic) and only the voxels of that local window are touched.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from equipipe.so3 import grid_centres, rotate_grid

# Element channels (VoxMol's GEOM-drugs order) and their atomic numbers.
ELEMENTS: tuple[str, ...] = ("C", "H", "O", "N", "F", "S", "Cl", "Br")
ATOMIC_NUMBERS: tuple[int, ...] = (6, 1, 8, 7, 9, 16, 17, 35)
VOXMOL_SIGMA_FACTOR = 0.93  # PyUUL/VoxMol: exp(-d^2 / (0.93 r)^2)
FORMS = ("voxmol", "gaussian")

_MAX_WINDOW_ENTRIES = 1 << 22  # atoms x window voxels handled per chunk (bounds memory)


def channel_of(z: Tensor, elements_z: tuple[int, ...] = ATOMIC_NUMBERS) -> Tensor:
    """Element channel of each atomic number (``-1`` for elements without a channel).

    Args:
        z: (N,) integer atomic numbers.
        elements_z: atomic numbers of channels 0, 1, ... (default C H O N F S Cl Br).

    Returns:
        (N,) int64 channels on ``z``'s device.
    """
    table = torch.full(
        (max(max(elements_z), int(z.max()) if z.numel() else 0) + 1,), -1, dtype=torch.int64
    )
    table[list(elements_z)] = torch.arange(len(elements_z))
    return table.to(z.device)[z.long()]


def density_width(radius: float, form: str = "voxmol") -> float:
    """The length w with density exp(-d² / w²) for atoms of ``radius`` Å."""
    if form == "voxmol":
        return VOXMOL_SIGMA_FACTOR * radius
    if form == "gaussian":
        return math.sqrt(2.0) * radius
    raise ValueError(f"voxel density form {form!r} is unknown; allowed: {', '.join(FORMS)}")


def cutoff_distance(radius: float, form: str = "voxmol", tol: float = 1e-6) -> float:
    """Distance (Å) beyond which one atom's density is below ``tol`` (where it is truncated)."""
    return density_width(radius, form) * math.sqrt(math.log(1.0 / tol))


def atom_density(d2: Tensor, radius: float, form: str = "voxmol") -> Tensor:
    """Density of one atom at squared distance ``d2`` (Å²), before channel combination."""
    w = density_width(radius, form)
    return torch.exp(-d2 / (w * w))


def voxelize(
    pos: Tensor,
    channel: Tensor,
    batch: Tensor,
    n_examples: int,
    grid_size: int,
    spacing: float,
    radius: float = 0.5,
    n_channels: int = 8,
    form: str = "voxmol",
    tol: float = 1e-6,
) -> Tensor:
    """Splat atoms onto per-example, per-element density grids.

    Args:
        pos: (N, 3) positions in Å in the grid frame (origin = grid centre).
        channel: (N,) int64 element channel in [0, n_channels); negative entries are skipped.
        batch: (N,) int64 example index in [0, n_examples).
        n_examples: B.
        grid_size: G voxels per side.
        spacing: Δ in Å.
        radius: atomic radius r in Å (VoxMol: 0.5).
        n_channels: C.
        form: ``"voxmol"`` or ``"gaussian"`` (module docstring).
        tol: per-atom truncation level (density below it is dropped).

    Returns:
        (B, C, G, G, G) tensor in ``pos``'s dtype and on its device. Atoms outside the grid
        contribute only the part of their density that falls on it.
    """
    if form not in FORMS:
        raise ValueError(f"voxel density form {form!r} is unknown; allowed: {', '.join(FORMS)}")
    G = int(grid_size)
    device, dtype = pos.device, pos.dtype
    n_vox = G * G * G
    out = torch.zeros(n_examples * n_channels * n_vox, dtype=dtype, device=device)
    keep = (channel >= 0) & (channel < n_channels)
    if not bool(keep.all()):
        pos, channel, batch = pos[keep], channel[keep], batch[keep]
    if pos.shape[0] == 0:
        return out.reshape(n_examples, n_channels, G, G, G)

    w2 = density_width(radius, form) ** 2
    cut = cutoff_distance(radius, form, tol)
    half = int(math.ceil(cut / spacing))
    # 1-D voxel-centre coordinates of this grid, in the convention of so3.grid_centres.
    axis = grid_centres((G, 1, 1), spacing, dtype=dtype, device=device)[:, 0, 0, 0]
    r = torch.arange(-half, half + 1, device=device)
    window = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)  # (W, 3)
    # The nearest voxel centre is within Δ√3/2 of the atom: farther offsets never reach d <= cut.
    reach = cut + spacing * math.sqrt(3) / 2 + 1e-6
    window = window[(window.to(dtype) * spacing).pow(2).sum(-1) <= reach * reach]

    nearest = torch.round(pos / spacing + (G - 1) / 2).long()  # (N, 3) nearest voxel index
    base = (batch.long() * n_channels + channel.long()) * n_vox  # (N,) flat offset of the grid
    chunk = max(1, _MAX_WINDOW_ENTRIES // window.shape[0])
    for a in range(0, pos.shape[0], chunk):
        idx = nearest[a : a + chunk, None, :] + window[None]  # (n, W, 3)
        inside = ((idx >= 0) & (idx < G)).all(-1)
        idx_c = idx.clamp(0, G - 1)
        centre = axis[idx_c]  # (n, W, 3)
        d2 = (centre - pos[a : a + chunk, None, :]).pow(2).sum(-1)
        sel = inside & (d2 <= cut * cut)
        flat = base[a : a + chunk, None] + (idx_c[..., 0] * G + idx_c[..., 1]) * G + idx_c[..., 2]
        v = torch.exp(-d2[sel] / w2)
        if form == "voxmol":
            v = torch.log1p(-v)  # union of occupancies: 1 - prod(1 - v) = 1 - exp(sum log(1-v))
        out.index_add_(0, flat[sel], v)
    if form == "voxmol":
        out = -torch.expm1(out)
    return out.reshape(n_examples, n_channels, G, G, G)


def inscribed_ball_radius(grid_size: int, spacing: float) -> float:
    """Radius (Å) of the largest ball of voxel centres inside the grid: (G - 1)/2 · Δ.

    Any point within it stays inside the sampled cube under every rotation about the centre,
    which is why the Haar-mode metric is masked to it.
    """
    return (int(grid_size) - 1) / 2 * float(spacing)


def ball_mask(grid_size: int, device=None) -> Tensor:
    """(G, G, G) bool: voxel centres within :func:`inscribed_ball_radius` (in voxels: the ball
    does not depend on the spacing)."""
    c = grid_centres((grid_size,) * 3, 1.0, dtype=torch.float64, device=device)
    return c.pow(2).sum(-1) <= ((grid_size - 1) / 2) ** 2 + 1e-9


def gaussian_blur(grid: Tensor, sigma_voxels: float, truncate: float = 3.0) -> Tensor:
    """Isotropic Gaussian blur of (..., D, H, W) grids with zero padding (separable).

    The kernel is the same symmetric, normalised 1-D filter along every axis (applied as a
    banded matrix product per axis), so the operator commutes with the octahedral voxel
    permutations and, in the continuum, with every rotation.
    """
    if sigma_voxels <= 0:
        return grid
    half = max(1, int(math.ceil(truncate * sigma_voxels)))
    x = torch.arange(-half, half + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma_voxels) ** 2)
    k = k / k.sum()

    def band(n: int) -> Tensor:
        i = torch.arange(n)
        off = i[None, :] - i[:, None]  # M[i, j] = k[j - i], zero outside the kernel
        M = torch.where(off.abs() <= half, k[(off + half).clamp(0, 2 * half)], 0.0)
        return M.to(dtype=grid.dtype, device=grid.device)

    D, H, W = grid.shape[-3:]
    out = torch.einsum("...dhw,ed->...ehw", grid, band(D))
    out = torch.einsum("...dhw,eh->...dew", out, band(H))
    return torch.einsum("...dhw,ew->...dhe", out, band(W))


# --------------------------------------------------------------------------------------------
# Per-example seeded noise, movable like a scalar field


def is_signed_permutation(R: Tensor, atol: float = 1e-6) -> bool:
    """True when R (3, 3) is octahedral (entries 0/±1): a grid rotation is a voxel permutation."""
    Rr = R.round()
    return bool(torch.allclose(R, Rr, atol=atol) and (Rr.abs().sum(0) == 1).all())


def shell_padding(grid_size: int) -> int:
    """Voxels added on each side so a rotated G-cube always samples inside: ceil((√3-1)/2 G)+1."""
    return int(math.ceil((math.sqrt(3) - 1) / 2 * grid_size)) + 1


def seeded_noise(
    seed: Tensor | list[int],
    n_channels: int,
    grid_size: int,
    rotation: Tensor | None = None,
    device=None,
) -> Tensor:
    """Standard normal noise per example, a pure function of its seed, moved by ``rotation``.

    Example b's noise field lives on the integer voxel lattice around the grid: the G-cube is
    the first ``C·G³`` draws of ``torch.Generator(device).manual_seed(seed[b])`` and, only
    where a rotation needs it, a shell of ``shell_padding(G)`` voxels around it comes from the
    same stream next. A rotation R moves the field like a scalar grid by NEAREST-neighbour
    resampling, out(x) = noise(nearest lattice point to R^T x) (DESIGN.md: keeps the variance;
    trilinear would keep ~30 % of it): an exact voxel permutation for octahedral R (incl. the
    identity), and for any other R still exactly N(0, 1) at every voxel, including the corners
    that come from outside the original cube.

    Args:
        seed: (B,) integer seeds.
        n_channels: C.
        grid_size: G.
        rotation: optional (B, 3, 3), per example.
        device: where to draw (default: ``seed``'s device, else CPU). The same seed gives the
            same field on the same device type.

    Returns:
        (B, C, G, G, G) float32.
    """
    if device is None:
        device = seed.device if isinstance(seed, Tensor) else torch.device("cpu")
    device = torch.device(device)
    seeds = seed.tolist() if isinstance(seed, Tensor) else [int(s) for s in seed]
    C, G = int(n_channels), int(grid_size)
    out = torch.empty(len(seeds), C, G, G, G, device=device)
    rots = None if rotation is None else rotation.detach().to("cpu", torch.float64)
    for b, s in enumerate(seeds):
        gen = torch.Generator(device=device).manual_seed(int(s) % (1 << 63))
        cube = torch.randn(C, G, G, G, generator=gen, device=device)
        if rots is None:
            out[b] = cube
            continue
        R = rots[b]
        if is_signed_permutation(R):
            out[b] = rotate_grid(cube, R.round().to(torch.float32))
            continue
        p = shell_padding(G)
        Ge = G + 2 * p
        field = torch.randn(C, Ge, Ge, Ge, generator=gen, device=device)
        field[:, p : p + G, p : p + G, p : p + G] = cube
        q = grid_centres((G, G, G), 1.0, dtype=torch.float64).reshape(-1, 3)
        src = torch.round(q @ R + (Ge - 1) / 2).long().clamp(0, Ge - 1)  # rows: R^T x
        flat = ((src[:, 0] * Ge + src[:, 1]) * Ge + src[:, 2]).to(device)
        out[b] = field.reshape(C, -1)[:, flat].reshape(C, G, G, G)
    return out
