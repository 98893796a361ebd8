"""A trained equipipe force field as an ASE calculator (energy in eV, forces in eV/Å).

``EquipipeCalculator(model, task, ...)`` wraps a model and its force-field task (the task holds
the target normalisation fitted on the training split: the model works in normalised units,
the calculator returns physical ones); ``EquipipeCalculator.from_run(run_dir, checkpoint)``
rebuilds both from a run folder (``run.json`` + a weight file, ``torch.load(weights_only=True)``).

Options (each result states which one it used, ``describe()``):

``forces``
    ``"direct"``: the model's own force output (escaip's direct head: not a gradient, not
    exactly equivariant); ``"conservative"``: F = -dE/dx by autograd through the energy output
    (escaip and the e3nn model alike), so direct and conservative forces can be compared on one
    backbone.
``twirl``
    ``None``: the raw model. ``"exact"``: escaip's direct head with its (3, H) weight replaced
    by the row mean (``equipipe.forcehead``): the exact SO(3) twirl, exactly equivariant (the
    energy is invariant, so conservative forces do not change). ``"fixed"``: mean over K Haar
    rotations drawn once (seeded) for the calculator's life, F = (1/K) sum_k R_k^T F(R_k x),
    E = (1/K) sum_k E(R_k x) -- a fixed frame set, NOT exactly equivariant. ``"redraw"``: K new
    Haar rotations at every call -- stochastic forces, which heat an NVE system.
``device``, ``dtype``
    where and in which precision the model runs (``"float32"`` | ``"float64"``); positions are
    cast to ``dtype`` before the model sees them, results come back as float64 numpy arrays.

Several molecules in one ``ase.Atoms``: put a per-atom integer array ``"molecule"`` (atoms of a
molecule contiguous, molecules numbered 0, 1, ... in order). The model sees them as separate
examples of one batch (no interaction); ``results["molecule_energies"]`` holds each molecule's
energy (eV). Energies include the task's per-element reference energy, so they are total
energies in eV (a constant per composition: forces do not depend on it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from torch import nn

from equipipe.models import interface
from equipipe.so3 import haar_rotations

TWIRLS = (None, "exact", "fixed", "redraw")
FORCE_MODES = ("direct", "conservative")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def load_checkpoint(
    run_dir: str | Path, checkpoint: str = "model.pt", device: str = "cpu"
) -> tuple[nn.Module, Any, dict]:
    """(model, task, run.json) of a force-field run with the weights of ``checkpoint``.

    ``checkpoint`` is a path inside the run folder: ``model.pt``, ``early.pt``,
    ``checkpoints/step100.pt``. Reads nothing but ``run.json`` and that file (no data store).
    """
    from equipipe.tasks import make_task  # lazy: the task modules import the models

    run_dir = Path(run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    spec = info["spec"]
    if spec["task"] != "forcefield":
        raise ValueError(f"{run_dir}: task {spec['task']!r} is not a force field")
    path = run_dir / checkpoint
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint in {run_dir}")
    task = make_task(spec["task"], spec.get("task_cfg", {}))
    task.set_state(info["task_state"])
    model = task.build_model(spec["size"])
    model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    return model.to(device).eval(), task, info


class EquipipeCalculator(Calculator):
    """ASE calculator of an equipipe force field (see the module docstring for the options)."""

    implemented_properties = ["energy", "forces"]

    def __init__(
        self,
        model: nn.Module,
        task,
        *,
        forces: str = "direct",
        twirl: str | None = None,
        k: int = 8,
        seed: int = 0,
        device: str = "cpu",
        dtype: str = "float32",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if forces not in FORCE_MODES:
            raise ValueError(f"forces={forces!r} is unknown; allowed: {', '.join(FORCE_MODES)}")
        if twirl not in TWIRLS:
            raise ValueError(f"twirl={twirl!r} is unknown; allowed: None, exact, fixed, redraw")
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is unknown; allowed: {', '.join(DTYPES)}")
        if twirl in ("fixed", "redraw") and int(k) < 1:
            raise ValueError(f"twirl {twirl!r} needs k >= 1 rotations, got {k}")
        self.device, self.dtype = torch.device(device), DTYPES[dtype]
        self.forces_mode, self.twirl, self.k, self.seed = forces, twirl, int(k), int(seed)
        model = model.to(self.device, self.dtype).eval()
        if twirl == "exact":
            from equipipe.forcehead import HEAD_PARAM, with_twirled_head

            if interface.direct_force_head(model) is None:
                raise ValueError(
                    f"twirl='exact' needs escaip's direct force head ({HEAD_PARAM}); "
                    f"{type(model).__name__} has none: use twirl='fixed' or 'redraw'"
                )
            model = with_twirled_head(model).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model, self.task = model, task
        self._gen = torch.Generator().manual_seed(self.seed)
        self._fixed = haar_rotations(self.k, self._gen, torch.float64) if twirl == "fixed" else None
        self.n_calls = 0

    @classmethod
    def from_run(
        cls, run_dir: str | Path, checkpoint: str = "model.pt", device: str = "cpu", **kwargs
    ) -> EquipipeCalculator:
        """The calculator of a run folder's checkpoint (``run.json`` + weights)."""
        model, task, info = load_checkpoint(run_dir, checkpoint, device)
        calc = cls(model, task, device=device, **kwargs)
        calc.run_info = {"run": str(run_dir), "checkpoint": checkpoint,
                         "experiment": info.get("experiment"), "seed": info.get("seed"),
                         "model": info.get("model")}  # fmt: skip
        return calc

    def describe(self) -> str:
        """Which forces this calculator returns, e.g. ``direct, fixed twirl K=8, float32``."""
        twirl = {None: "raw", "exact": "exact head twirl", "fixed": f"fixed twirl K={self.k}",
                 "redraw": f"redrawn twirl K={self.k}"}[self.twirl]  # fmt: skip
        return f"{self.forces_mode}, {twirl}, {str(self.dtype).replace('torch.', '')}"

    # --- evaluation ---------------------------------------------------------------------

    def _rotations(self) -> torch.Tensor | None:
        if self.twirl == "fixed":
            return self._fixed
        if self.twirl == "redraw":
            return haar_rotations(self.k, self._gen, torch.float64)
        return None

    def evaluate(self, pos: np.ndarray, z: np.ndarray, molecule: np.ndarray):
        """Per-molecule energies (M,) in eV and forces (N, 3) in eV/Å as float64 numpy arrays."""
        s = self.task._require_state()
        dev, dt = self.device, self.dtype
        mol = torch.as_tensor(molecule, dtype=torch.int64, device=dev)
        n_atoms = torch.bincount(mol)
        n_mol = int(n_atoms.shape[0])
        x = torch.as_tensor(pos, dtype=dt, device=dev)
        zt = torch.as_tensor(z, dtype=torch.int64, device=dev)
        R = self._rotations()
        k = 1 if R is None else int(R.shape[0])
        conservative = self.forces_mode == "conservative"
        with torch.set_grad_enabled(conservative):
            if conservative:
                x = x.detach().requires_grad_(True)
            if R is None:
                xs = x
            else:
                Rt = R.to(dev, dt)
                xs = torch.einsum("kij,nj->kni", Rt, x).reshape(-1, 3)  # copy-major R_k x
            batch = {
                "pos": xs,
                "z": zt.repeat(k),
                "batch": (mol[None, :] + n_mol * torch.arange(k, device=dev)[:, None]).reshape(-1),
                "n_atoms": n_atoms.repeat(k),
            }
            out = self.model(batch)
            energy = (out["energy"].reshape(k, n_mol).mean(0)) * s["energy_std"]  # (M,)
            if conservative:
                (grad,) = torch.autograd.grad(energy.sum(), x)
                forces = -grad
            else:
                f = out["forces"].reshape(k, -1, 3)
                if R is not None:  # canonicalise: R_k^T F_k (rows: F_k @ R_k), then average
                    f = torch.einsum("kji,knj->kni", Rt, f)
                forces = f.mean(0) * s["force_std"]
        ref = np.array(
            [self.task._reference(z[molecule == m]) for m in range(n_mol)], dtype=np.float64
        )
        e = energy.detach().double().cpu().numpy() + s["energy_mean"] + ref
        self.n_calls += 1
        return e, forces.detach().double().cpu().numpy()

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        molecule = atoms.arrays.get("molecule")
        if molecule is None:
            molecule = np.zeros(len(atoms), dtype=np.int64)
        molecule = np.asarray(molecule, dtype=np.int64)
        if len(molecule) and (np.any(np.diff(molecule) < 0) or molecule[0] != 0
                              or np.any(np.diff(molecule) > 1)):  # fmt: skip
            raise ValueError(
                "atoms.arrays['molecule'] must number molecules 0, 1, ... with each "
                "molecule's atoms contiguous"
            )
        e, f = self.evaluate(atoms.get_positions(), atoms.get_atomic_numbers(), molecule)
        self.results = {"energy": float(e.sum()), "forces": f, "molecule_energies": e}
