"""Band-limited grid fields that rotate (almost) exactly: isotropic noise and spline resampling.

White noise on a voxel grid fills the whole frequency cube; about 48 % of its power lies
outside the inscribed Nyquist ball, so no resampling can rotate it. The denoising task's noise
is therefore *band-limited isotropic* noise (docs/voxel_rotations.md): white noise projected
onto the ball |k| <= ``band`` · k_Nyquist (in the ball it is VoxMol's white noise, unchanged;
the corners of the frequency cube are dropped). The projected field is a real trigonometric polynomial, periodic on the G-cube, so it is defined
at every point of space and a rotation R moves it to n(R^T x):

- octahedral R: an exact voxel permutation (the ball is octahedrally symmetric and the even-grid
  Nyquist planes, which have no mirror partner, are excluded);
- any other R: the polynomial is evaluated at R^T x by zero-padding its spectrum to an
  ``oversample``-times finer periodic grid (exact) and cubic-spline interpolation there (the
  content then lies below half the fine grid's Nyquist frequency, where the spline is
  accurate to about 1e-4 of the power: ``tests/test_bandlimit.py``).

Grids rotated back (the model's outputs) are resampled with a quintic B-spline
(:func:`spline_rotate`), accurate for content below ~0.6 k_Nyquist (densities of atoms wider
than about two voxels, blurred noise); a per-run floor measures what remains.

Grid convention: :func:`equipipe.so3.grid_centres` (voxel i at (i - (G-1)/2)·Δ).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from equipipe.so3 import grid_centres


def _freqs(G: int) -> np.ndarray:
    return np.fft.fftfreq(G, 1.0 / G)  # integer lattice frequencies, in cycles per G voxels


def band_mask(grid_size: int, band: float) -> np.ndarray:
    """(G, G, G//2 + 1) bool: rfft frequencies with |k| <= band · G/2, Nyquist planes excluded.

    Args:
        grid_size: G (even or odd).
        band: radius of the ball as a fraction of the Nyquist frequency, in (0, 1].
    """
    if not 0 < band <= 1:
        raise ValueError(f"band must be in (0, 1], got {band!r}")
    G = int(grid_size)
    k = _freqs(G)
    kl = np.arange(G // 2 + 1, dtype=float)
    k2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + kl[None, None, :] ** 2
    m = k2 <= (band * G / 2) ** 2 + 1e-9
    if G % 2 == 0:  # frequency ±G/2 has no partner: keep the field real and flip-symmetric
        nyq = np.abs(k) == G // 2
        m &= ~nyq[:, None, None] & ~nyq[None, :, None] & (kl != G // 2)[None, None, :]
    return m


def power_inside(grid_size: int, band: float) -> float:
    """Fraction of a white field's power kept by the projection (for the unit-variance scale)."""
    G = int(grid_size)
    m = band_mask(G, band)
    # rfft halves: every column except k_last = 0 (and Nyquist, excluded) stands for two
    weight = np.full(m.shape[-1], 2.0)
    weight[0] = 1.0
    if G % 2 == 0:
        weight[-1] = 1.0
    return float((m * weight).sum() / G**3)


def project(grid: np.ndarray, band: float) -> np.ndarray:
    """Projection of real (..., G, G, G) grids onto the band (unscaled), as rfft spectra."""
    G = grid.shape[-1]
    return np.fft.rfftn(grid, axes=(-3, -2, -1)) * band_mask(G, band)


def evaluate_rotated(spec: np.ndarray, G: int, R: np.ndarray, oversample: int = 2) -> np.ndarray:
    """The periodic band-limited field of rfft spectrum ``spec`` (C, G, G, G//2+1) at R^T x.

    Exact zero-padded synthesis of the cubic B-spline coefficients on an ``oversample``-times
    finer periodic grid, then cubic-spline evaluation with periodic wrap.

    Returns:
        (C, G, G, G) float64.
    """
    s = int(oversample)
    Gf = s * G
    k = _freqs(G).astype(int) % Gf
    half = G // 2 + (G % 2)  # last-axis columns 0 .. ceil(G/2) - 1 (Nyquist column is zero)
    C = spec.shape[0]
    fine = np.zeros((C, Gf, Gf, Gf // 2 + 1), dtype=spec.dtype)
    fine[:, k[:, None, None], k[None, :, None], np.arange(half)[None, None, :]] = spec[..., :half]
    # cubic B-spline coefficients straight from the spectrum (periodic prefilter, exact):
    # divide by the B-spline's transfer function (2 + cos w) / 3 along each axis
    w = 2 * np.pi * np.fft.fftfreq(Gf)
    b = (2 + np.cos(w)) / 3
    fine /= b[:, None, None] * b[None, :, None] * b[None, None, : Gf // 2 + 1]
    coef = np.fft.irfftn(fine, s=(Gf, Gf, Gf), axes=(-3, -2, -1)) * s**3
    x = grid_centres((G, G, G), 1.0, dtype=torch.float64).reshape(-1, 3).numpy()
    src = (x @ R + (G - 1) / 2) * s  # rows: R^T x, in fine index units
    out = np.empty((C, G**3))
    for c in range(C):
        out[c] = ndimage.map_coordinates(coef[c], src.T, order=3, mode="grid-wrap", prefilter=False)
    return out.reshape(C, G, G, G)


def spline_rotate(grid: Tensor, R: Tensor, order: int = 5) -> Tensor:
    """out(x) = grid(R^T x) by B-spline interpolation of order ``order`` (CPU, float64 inside).

    Args:
        grid: (B, C, D, H, W).
        R: (B, 3, 3) per example.
        order: spline order (1 = trilinear, 3 cubic, 5 quintic).

    Returns:
        Tensor like ``grid`` (points outside the grid read the nearest edge value; the
        continuous evaluation only reads the inscribed ball, which rotates into itself).
    """
    if torch.is_grad_enabled() and grid.requires_grad:
        return _SplineRotate.apply(grid, R, order)
    return _spline_rotate(grid, R, order)


class _SplineRotate(torch.autograd.Function):
    """Spline rotation with a gradient (the gradient-norm ratio differentiates the rotated-back
    predictions). Backward applies the rotation by R^T: the adjoint of a rotation is its
    inverse, so on band-limited fields this is the exact adjoint up to the interpolation error
    (tests/test_bandlimit.py measures <A x, y> against <x, A^T y>)."""

    @staticmethod
    def forward(ctx, grid: Tensor, R: Tensor, order: int) -> Tensor:
        ctx.save_for_backward(R)
        ctx.order = order
        return _spline_rotate(grid, R, order)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (R,) = ctx.saved_tensors
        return _spline_rotate(grad, R.transpose(-1, -2), ctx.order), None, None


# scipy's map_coordinates(mode="nearest") pads by 12 edge voxels before its spline prefilter
# (scipy.ndimage._interpolation._prepad_for_spline_filter); _prefilter_matrix reproduces it
_NEAREST_PAD = 12


@functools.lru_cache(maxsize=16)
def _prefilter_matrix(n: int, order: int) -> Tensor:
    """(n + 24, n) float64 (shared: never modify it): scipy's B-spline prefilter of order
    ``order`` along one axis of length n under ``mode="nearest"`` (edge padding by 12, then
    ``spline_filter1d``), as a matrix. The prefilter is linear and separable, so applying this
    matrix along each axis gives scipy's prefiltered array to float rounding, as three small
    matrix products instead of three recursive filters over the padded cube."""
    eye = np.pad(np.eye(n), ((_NEAREST_PAD, _NEAREST_PAD), (0, 0)), mode="edge")
    return torch.from_numpy(
        ndimage.spline_filter1d(eye, order, axis=0, output=np.float64, mode="nearest")
    )


def _prefiltered(g: Tensor, order: int) -> Tensor:
    """B-spline coefficients (B, C, D+24, H+24, W+24) float64 of grids g (B, C, D, H, W)."""
    D, H, W = g.shape[-3:]
    Ad, Ah, Aw = (_prefilter_matrix(n, order) for n in (D, H, W))
    f = g @ Aw.T  # (B, C, D, H, W')
    f = (f.transpose(-1, -2) @ Ah.T).transpose(-1, -2)  # (B, C, D, H', W')
    f = (f.permute(0, 1, 3, 4, 2) @ Ad.T).permute(0, 1, 4, 2, 3)  # (B, C, D', H', W')
    return f.contiguous()


def _spline_rotate(grid: Tensor, R: Tensor, order: int) -> Tensor:
    """scipy ``map_coordinates(mode="nearest")`` per example and channel; the prefilter is
    done by ``_prefiltered`` for all of them at once (same values to float rounding)."""
    B, C, D, H, W = grid.shape
    g = grid.detach().to("cpu", torch.float64)
    pad = _NEAREST_PAD if order > 1 else 0
    coef = (_prefiltered(g, order) if order > 1 else g.contiguous()).numpy()
    Rn = R.detach().to("cpu", torch.float64).numpy()
    x = grid_centres((D, H, W), 1.0, dtype=torch.float64).reshape(-1, 3).numpy()
    centre = np.array([(D - 1) / 2, (H - 1) / 2, (W - 1) / 2]) + pad
    out = np.empty((B, C, D * H * W))
    for b in range(B):
        src = (x @ Rn[b] + centre).T
        for c in range(C):
            ndimage.map_coordinates(
                coef[b, c], src, output=out[b, c], order=order, mode="nearest", prefilter=False
            )
    return torch.from_numpy(out.reshape(grid.shape)).to(device=grid.device, dtype=grid.dtype)


def is_signed_permutation(R: np.ndarray, atol: float = 1e-6) -> bool:
    """True when R (3, 3) has entries 0/±1 only (an octahedral rotation: a voxel permutation)."""
    Rr = np.round(R)
    return bool(np.allclose(R, Rr, atol=atol) and (np.abs(Rr).sum(0) == 1).all())


def bandlimited_noise(
    seed: int,
    n_channels: int,
    grid_size: int,
    band: float,
    rotation: np.ndarray | None = None,
    oversample: int = 2,
) -> np.ndarray:
    """Isotropic band-limited noise of one example, moved by ``rotation``.

    The field is the projection of the first C·G³ standard normal draws of
    ``torch.Generator("cpu").manual_seed(seed)`` (the white cube) onto the ball
    |k| <= band · k_Nyquist, NOT rescaled: inside the ball it is exactly VoxMol's white noise
    (same power spectral density), and only the part no rotation can move is dropped, so the
    variance per voxel is :func:`power_inside` (π/6 ≈ 0.52 at band 1).

    Args:
        seed: the example's seed.
        n_channels: C.
        grid_size: G.
        band: ball radius as a fraction of the Nyquist frequency.
        rotation: optional (3, 3); the result is n(R^T x) (exact voxel permutation for
            octahedral R, :func:`evaluate_rotated` otherwise).
        oversample: fine-grid factor of :func:`evaluate_rotated`.

    Returns:
        (C, G, G, G) float32 numpy array.
    """
    C, G = int(n_channels), int(grid_size)
    gen = torch.Generator().manual_seed(int(seed) % (1 << 63))
    white = torch.randn(C, G, G, G, generator=gen, dtype=torch.float64).numpy()
    spec = project(white, band)
    if rotation is None:
        return np.fft.irfftn(spec, s=(G, G, G), axes=(-3, -2, -1)).astype(np.float32)
    R = np.asarray(rotation, dtype=np.float64)
    if is_signed_permutation(R):
        from equipipe.so3 import rotate_grid

        field = torch.from_numpy(np.fft.irfftn(spec, s=(G, G, G), axes=(-3, -2, -1)))
        return rotate_grid(field, torch.from_numpy(np.round(R))).numpy().astype(np.float32)
    return evaluate_rotated(spec, G, R, oversample).astype(np.float32)
