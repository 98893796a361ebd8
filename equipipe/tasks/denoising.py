"""Voxel denoising (VoxMol on GEOM-drugs): density grids rotate as scalar fields.

A batch holds ATOMS, not grids — grids are made on the batch's device inside ``predict`` and
``target`` (``equipipe.voxel.voxelize``), so a rotation acts exactly on the coordinates:

- ``pos`` (N, 3) float32 Å in the grid frame (the store centres each conformer on its
  centroid), ``z`` (N,) int64, ``channel`` (N,) int64 element channel (C H O N F S Cl Br;
  -1 = none), ``batch`` (N,) int64, ``n_atoms`` (B,) int64;
- per example: ``noise_seed`` (B,) int64 — the noise is a pure function of it
  (``equipipe.bandlimit.bandlimited_noise``; ``noise_kind: white``: ``equipipe.voxel.seeded_noise``),
  never a stored grid; ``noise_rot`` (B, 3, 3), the rotation applied to the example so far;
  ``noise_fixed`` (B,) bool — True for evaluation views, whose noise is moved with the example
  (exactly: a voxel permutation for octahedral R, the band-limited field evaluated at R^T x
  otherwise); False in training, where the noise is fresh and stays unrotated (it is
  stationary and isotropic); ``ball_mask`` (B,) bool — the Haar view's metric is masked to
  the inscribed ball.

Noise (docs/voxel_rotations.md, which supersedes DESIGN.md's Haar paragraph): VoxMol's white
noise projected onto the Nyquist ball (``noise_band``), i.e. white noise without the 48 % of
its power that no rotation can move; ``noise_kind: white`` keeps VoxMol's noise.

Evaluation inputs are model-independent and recur at every evaluation (same seeds, rotations
and rotated atoms): their noise fields and clean grids are cached across evaluations, each
cache bounded in bytes (``equipipe.evalcache.BoundedCache``; training inputs are not cached).

Model input = clean grid + ``noise_sigma`` · noise; target = clean grid; loss = MSE. The
decomposed field is ``density`` (B, 8, G, G, G) with per-voxel squared error (dimensionless
density, unit "density^2"); accuracy ``denoise_mse`` is its mean over all voxels.

Evaluation views (``eval_modes``, both by default, each its own labelled decomposition):

- ``{"mode": "octahedral"}``: ``rotation_set`` gives the 24 octahedral rotations (the
  integrator runs them exhaustively). Inputs (coordinates voxelised on the symmetric lattice),
  noise and outputs are exact voxel permutations, so only the model is measured.
- ``{"mode": "haar"}``: ``rotation_set`` gives None (the integrator draws K Haar rotations).
  Clean input = voxelised rotated coordinates (exact); the fixed band-limited noise moved
  exactly (above); outputs canonicalised by B-spline interpolation (``resample_order``);
  metric masked to the inscribed ball (``element_mask``). ``interpolation_floor`` measures the
  same decomposition for an isotropic Gaussian blur of the noisy input — exactly equivariant
  in the continuum, so its value is the resampling error alone (per voxel; the trainer logs
  it as a share of the model's own total, ``floor_share``).

Config keys (``DEFAULTS``): ``model`` / ``model_overrides`` (registry), ``grid_size`` (32),
``grid_spacing`` (0.5 Å; the study: 64 at 0.25), ``atom_radius`` (0.5 Å; keep it >= 2 voxels
so the density is band-limited), ``density_form`` (``voxmol`` | ``gaussian``, see
``equipipe.voxel``), ``noise_sigma`` (0.9), ``noise_kind`` (``band_limited`` | ``white``),
``noise_band`` (1.0), ``resample_order`` (3), ``max_shift``
(0.5 Å, the ``augment`` shift), ``eval_modes`` (["octahedral", "haar"]), ``floor_blur_sigma``
(0.5 Å, the blur of the resampling floor), ``floor_k`` (4).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from equipipe.bandlimit import bandlimited_noise, is_signed_permutation, spline_rotate
from equipipe.config import defaults
from equipipe.evalcache import BoundedCache
from equipipe.so3 import haar_rotations, octahedral_rotations, rotate_grid, rotate_per_example
from equipipe.tasks.base import Batch, EvaluationDefaults, repeat_ragged
from equipipe.voxel import (
    ATOMIC_NUMBERS,
    FORMS,
    ball_mask,
    channel_of,
    gaussian_blur,
    seeded_noise,
    voxelize,
)

if TYPE_CHECKING:
    from equipipe.equivariance import Decomposition

# the schema's; the grid is the GEOM preprocess grid (the workflow passes the dataset's own)
_GRID = defaults("preprocess", "geom")
DEFAULTS: dict[str, Any] = {
    **defaults("task_cfg", "denoising"),
    "grid_size": _GRID["grid_size"],
    "grid_spacing": _GRID["grid_spacing"],
}
EVAL_MODES = ("octahedral", "haar")
NOISE_KINDS = ("band_limited", "white")
N_CHANNELS = len(ATOMIC_NUMBERS)
_PER_EXAMPLE = ("n_atoms", "noise_seed", "noise_rot", "noise_fixed", "ball_mask")
_CACHE_BYTES = 256 << 20  # per evaluation-input cache (noise fields; clean grids)


class DenoisingTask(EvaluationDefaults):  # shared_rotated_predictions: None
    name = "denoising"
    fields = ("density",)
    units = {"density": "density^2"}
    primary_field = "density"

    def __init__(self, cfg: dict[str, Any] | None = None, cache_bytes: int = _CACHE_BYTES):
        """``cache_bytes``: budget of each evaluation-input cache (noise; clean grids)."""
        cfg = {**DEFAULTS, **(cfg or {})}
        modes = list(cfg["eval_modes"])
        bad = [m for m in modes if m not in EVAL_MODES]
        if bad or not modes:
            raise ValueError(f"eval_modes {modes!r} is invalid; allowed values: {list(EVAL_MODES)}")
        if cfg["density_form"] not in FORMS:
            raise ValueError(
                f"density_form {cfg['density_form']!r} is unknown; allowed: {list(FORMS)}"
            )
        G = int(cfg["grid_size"])
        if G < 8 or G % 8:
            raise ValueError(f"grid_size {G} must be a multiple of 8 (three 2x downsamplings)")
        for key in ("grid_spacing", "atom_radius", "noise_sigma"):
            if float(cfg[key]) <= 0:
                raise ValueError(f"{key} must be > 0, got {cfg[key]!r}")
        if cfg["noise_kind"] not in NOISE_KINDS:
            raise ValueError(f"noise_kind {cfg['noise_kind']!r} is unknown; allowed: {NOISE_KINDS}")
        if not 0 < float(cfg["noise_band"]) <= 1:
            raise ValueError(f"noise_band must be in (0, 1], got {cfg['noise_band']!r}")
        if float(cfg["max_shift"]) < 0 or int(cfg["floor_k"]) < 2:
            raise ValueError("max_shift must be >= 0 and floor_k >= 2")
        self.cfg = cfg
        self.grid_size = G
        self.spacing = float(cfg["grid_spacing"])
        self.sigma = float(cfg["noise_sigma"])
        self._warned = False
        # model-independent evaluation inputs, kept across evaluations (the evaluation
        # generator is re-seeded each time: same seeds, rotations and rotated atoms)
        self.noise_cache = BoundedCache(cache_bytes)  # band-limited noise per (seed, R)
        self.grid_cache = BoundedCache(cache_bytes)  # clean grids per exact atom inputs

    # --- model ---------------------------------------------------------------------------

    def build_model(self, size: str) -> nn.Module:
        from equipipe.models.registry import build_model

        return build_model(self.cfg["model"], size, **self.cfg["model_overrides"])

    def voxelize(self, batch: Batch) -> Tensor:
        """Clean density grids (B, 8, G, G, G) of the batch's atoms, on its device.

        Evaluation views (every ``noise_fixed``) recur identically at every evaluation, so
        their grids are cached by the exact atom inputs (positions' bytes, channels, example
        index); a hit returns a copy of the grid ``equipipe.voxel.voxelize`` gave."""
        fixed = batch.get("noise_fixed")
        key = None
        if fixed is not None and fixed.numel() and bool(fixed.all()):
            key = self._grid_key(batch)
            hit = self.grid_cache.get(key)
            if hit is not None:
                return hit.clone()
        grid = voxelize(
            batch["pos"],
            batch["channel"],
            batch["batch"],
            self.num_examples(batch),
            self.grid_size,
            self.spacing,
            radius=float(self.cfg["atom_radius"]),
            n_channels=N_CHANNELS,
            form=self.cfg["density_form"],
        )
        if key is not None and self.grid_cache.put(key, grid, grid.nbytes):
            return grid.clone()  # the cached tensor never leaves
        return grid

    def _grid_key(self, batch: Batch) -> tuple:
        pos = batch["pos"].detach()
        return (
            str(pos.device),
            str(pos.dtype),
            self.num_examples(batch),
            pos.cpu().numpy().tobytes(),
            batch["channel"].detach().cpu().numpy().tobytes(),
            batch["batch"].detach().cpu().numpy().tobytes(),
        )

    def noise(self, batch: Batch) -> Tensor:
        """Unit-variance noise (B, 8, G, G, G) from the per-example seeds (module docstring)."""
        fixed = batch["noise_fixed"]
        dev = batch["pos"].device
        if self.cfg["noise_kind"] == "white":
            rot = None
            if bool(fixed.any()):
                eye = torch.eye(3, dtype=batch["noise_rot"].dtype, device=fixed.device)
                rot = torch.where(fixed[:, None, None], batch["noise_rot"], eye)
            return seeded_noise(batch["noise_seed"], N_CHANNELS, self.grid_size, rot, device=dev)
        seeds = batch["noise_seed"].tolist()
        rots = batch["noise_rot"].detach().to("cpu", torch.float64).numpy()
        moved = fixed.tolist()
        out = [self._band_noise(s, rots[b] if moved[b] else None) for b, s in enumerate(seeds)]
        return torch.stack(out).to(dev)

    def _band_noise(self, seed: int, R: np.ndarray | None) -> Tensor:
        """One example's band-limited noise (C, G, G, G) float32, moved by R (None: fresh
        training noise, not cached). Evaluation noise is cached (same seeds and rotations at
        every evaluation): the unmoved field per seed, which octahedral R permute exactly, and
        the field moved by any other R per (seed, R). May be a view of a cached array: the
        caller copies it (``noise`` stacks)."""
        C, G, band = N_CHANNELS, self.grid_size, float(self.cfg["noise_band"])
        if R is None:
            return torch.from_numpy(bandlimited_noise(seed, C, G, band))
        if is_signed_permutation(R):
            base = self._cached_noise((int(seed), b""), lambda: bandlimited_noise(seed, C, G, band))
            return rotate_grid(torch.from_numpy(base), torch.from_numpy(np.round(R)))
        key = (int(seed), np.round(R, 12).tobytes())
        return torch.from_numpy(
            self._cached_noise(key, lambda: bandlimited_noise(seed, C, G, band, R))
        )

    def _cached_noise(self, key: tuple[int, bytes], make) -> np.ndarray:
        hit = self.noise_cache.get(key)
        if hit is None:
            hit = make()
            self.noise_cache.put(key, hit, hit.nbytes)
        return hit

    def model_input(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(noisy input, clean grid)."""
        clean = self.voxelize(batch)
        return clean + self.sigma * self.noise(batch), clean

    def predict(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        """Denoised grid ``density``; ``clean`` rides along for the loss (dropped by canonicalize)."""
        noisy, clean = self.model_input(batch)
        return {"density": model(noisy), "clean": clean}

    def loss(self, pred: dict[str, Tensor], batch: Batch) -> Tensor:
        clean = pred["clean"] if "clean" in pred else self.voxelize(batch)
        return F.mse_loss(pred["density"].float(), clean)

    def target(self, batch: Batch) -> dict[str, Tensor]:
        return {"density": self.voxelize(batch)}

    # --- group action --------------------------------------------------------------------

    def rotate(self, batch: Batch, R: Tensor) -> Batch:
        """Atoms of example b by R[b] about the grid centre; its noise orientation composed."""
        R = R.to(batch["pos"])
        if R.dim() == 2:
            R = R.expand(self.num_examples(batch), 3, 3)
        out = dict(batch)
        out["pos"] = rotate_per_example(batch["pos"], R, batch["batch"])
        out["noise_rot"] = R.to(batch["noise_rot"]) @ batch["noise_rot"]
        return out

    def canonicalize(self, pred: dict[str, Tensor], R: Tensor) -> dict[str, Tensor]:
        """Grid of example b resampled by R[b]^T: an exact permutation when octahedral, else
        B-spline interpolation of order ``resample_order`` (``equipipe.bandlimit``)."""
        d = pred["density"].float()  # resample in float32 even under bf16 autocast
        R = R.to(device=d.device, dtype=d.dtype)
        if R.dim() == 2:
            R = R.expand(d.shape[0], 3, 3)
        Rt = R.transpose(-1, -2)
        if all(is_signed_permutation(r) for r in Rt.detach().cpu().double().numpy()):
            return {"density": rotate_grid(d, Rt)}
        return {"density": spline_rotate(d, Rt, int(self.cfg["resample_order"]))}

    def repeat(self, batch: Batch, k: int) -> Batch:
        """k copies, copy-major: copy c of example b is example c * B + b."""
        return repeat_ragged(batch, k, self.num_examples(batch))

    def num_examples(self, batch: Batch) -> int:
        return int(batch["n_atoms"].shape[0])

    def rotation_set(self, labels: dict) -> Tensor | None:
        """The finite group a view is evaluated over exhaustively, or None for Haar draws."""
        return octahedral_rotations() if labels.get("mode") == "octahedral" else None

    # --- data ----------------------------------------------------------------------------

    def fit(self, train_examples: list[dict[str, Any]]) -> dict[str, Any]:
        """No normalisation (densities are in [0, 1]); records the training composition."""
        counts = np.zeros(N_CHANNELS, dtype=np.int64)
        for ex in train_examples:
            ch = channel_of(torch.as_tensor(np.asarray(ex["z"]), dtype=torch.int64)).numpy()
            counts += np.bincount(ch[ch >= 0], minlength=N_CHANNELS)
        return {"channel_atoms": counts.tolist()}

    def set_state(self, state: dict[str, Any]) -> None:
        pass

    def collate(self, examples: list[dict[str, Any]]) -> Batch:
        if not examples:
            raise ValueError("collate needs at least one example")
        pos = torch.as_tensor(np.concatenate([np.asarray(e["pos"], np.float32) for e in examples]))
        z = torch.as_tensor(np.concatenate([np.asarray(e["z"]).astype(np.int64) for e in examples]))
        n = torch.tensor([len(e["z"]) for e in examples], dtype=torch.int64)
        channel = channel_of(z)
        if bool((channel < 0).any()) and not self._warned:
            self._warned = True
            warnings.warn(
                f"atoms with elements {sorted(set(z[channel < 0].tolist()))} have no density "
                "channel and are left out of the grids (the GEOM store filters them)",
                stacklevel=2,
            )
        B = len(examples)
        return {
            "pos": pos,
            "z": z,
            "channel": channel,
            "batch": torch.repeat_interleave(torch.arange(B), n),
            "n_atoms": n,
            "noise_seed": torch.zeros(B, dtype=torch.int64),
            "noise_rot": torch.eye(3).repeat(B, 1, 1),
            "noise_fixed": torch.zeros(B, dtype=torch.bool),
            "ball_mask": torch.zeros(B, dtype=torch.bool),
        }

    def _with_noise(self, batch: Batch, seeds: Tensor, fixed: bool, ball: bool) -> Batch:
        B = self.num_examples(batch)
        dev = batch["pos"].device
        out = dict(batch)
        out["noise_seed"] = seeds.to(dev)
        out["noise_rot"] = torch.eye(3, device=dev).repeat(B, 1, 1)
        out["noise_fixed"] = torch.full((B,), fixed, dtype=torch.bool, device=dev)
        out["ball_mask"] = torch.full((B,), ball, dtype=torch.bool, device=dev)
        return out

    def prepare_train(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> Batch:
        """Fresh noise seeds (unrotated noise: it is i.i.d., its orientation is irrelevant)."""
        del model
        seeds = torch.randint(0, 2**62, (self.num_examples(batch),), generator=generator)
        return self._with_noise(batch, seeds, fixed=False, ball=False)

    def eval_views(self, batch: Batch, generator: torch.Generator) -> list[tuple[dict, Batch]]:
        """One view per ``eval_modes`` entry; the noise seeds are drawn once, shared by both."""
        seeds = torch.randint(0, 2**62, (self.num_examples(batch),), generator=generator)
        return [
            ({"mode": m}, self._with_noise(batch, seeds, fixed=True, ball=(m == "haar")))
            for m in self.cfg["eval_modes"]
        ]

    def element_mask(self, batch: Batch) -> dict[str, Tensor] | None:
        """Haar views: voxels inside the inscribed ball; other examples: every voxel."""
        flag = batch.get("ball_mask")
        if flag is None or not bool(flag.any()):
            return None
        G = self.grid_size
        ball = ball_mask(G, device=flag.device)
        mask = ball[None] | ~flag[:, None, None, None]  # (B, G, G, G)
        return {"density": mask[:, None].expand(-1, N_CHANNELS, -1, -1, -1).clone()}

    def accuracy(self, pred: dict[str, Tensor], batch: Batch) -> dict[str, tuple[float, str]]:
        clean = pred["clean"] if "clean" in pred else self.voxelize(batch)
        mse = F.mse_loss(pred["density"].detach().float(), clean.detach())
        return {"denoise_mse": (float(mse), "density^2")}

    def augment(self, batch: Batch, generator: torch.Generator) -> Batch:
        """Shift every example by a random vector, uniform in the ball of radius ``max_shift``."""
        r = float(self.cfg["max_shift"])
        if r <= 0:
            return batch
        B = self.num_examples(batch)
        d = torch.randn(B, 3, generator=generator)
        d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
        shift = d * r * torch.rand(B, 1, generator=generator).pow(1 / 3)
        out = dict(batch)
        out["pos"] = batch["pos"] + shift.to(batch["pos"])[batch["batch"]]
        return out

    # --- the interpolation floor -----------------------------------------------------------

    def blur(self, grid: Tensor) -> Tensor:
        """The reference 'model' of the floor: isotropic Gaussian blur (floor_blur_sigma Å)."""
        return gaussian_blur(grid, float(self.cfg["floor_blur_sigma"]) / self.spacing)

    def interpolation_floor(
        self, batch: Batch, generator: torch.Generator | None, k: int | None = None
    ) -> dict[str, Decomposition]:
        """Haar-mode decomposition of an isotropic blur of the noisy input (the resampling floor).

        The blur commutes with every rotation in the continuum, so whatever equivariance error
        it shows comes from moving the noise and from the spline canonicalisation (with
        band-limited noise and densities: about 1e-3 of its total, docs/voxel_rotations.md).
        Uses ``batch``'s fixed noise (pass the Haar view), K Haar rotations per example drawn
        from ``generator``, and the inscribed-ball mask.

        Returns:
            {"density": Decomposition} (``equipipe.equivariance``).
        """
        from equipipe.equivariance import decomposition_from_predictions

        k = int(k or self.cfg["floor_k"])
        B = self.num_examples(batch)
        batch = dict(batch)
        batch["noise_fixed"] = torch.ones_like(batch["noise_fixed"])
        batch["ball_mask"] = torch.ones_like(batch["ball_mask"])
        R = haar_rotations(k * B, generator).reshape(k, B, 3, 3).to(batch["pos"].device)
        with torch.no_grad():
            zs = []
            for i in range(k):
                noisy, _ = self.model_input(self.rotate(batch, R[i]))
                zs.append(self.canonicalize({"density": self.blur(noisy)}, R[i])["density"])
            y = self.target(batch)["density"]
        mask = (self.element_mask(batch) or {}).get("density")
        z = torch.stack(zs)
        return {"density": decomposition_from_predictions(z, y, mask=mask, n_examples=B)}
