"""Force-field task: energies (invariant) and forces (vectors) of molecules, SPICE-style.

Units. Store examples hold physical units (``pos`` Angstrom, ``forces`` eV/A, ``energy`` eV).
``collate`` normalises the targets with the state fitted on the TRAINING split:

    energy_norm = (E - E_ref(composition) - energy_mean) / energy_std
    forces_norm = F / force_std

where E_ref is the per-element linear reference (``energy_reference: linear``, least squares on
the training split) or 0 (``none``), and ``force_std`` is the root-mean-square force component
(the spread about zero: forces are not shifted). The model works in normalised units; the
training ``loss`` is ``energy_weight * MAE(energy) + force_weight * L2MAE(forces)`` on them.

``predict`` and ``target`` return PHYSICAL units, so decompositions and accuracies are in
eV/A (forces) and eV (energy): ``energy`` there is the reference-subtracted energy
E - E_ref(composition). E_ref is a constant of the molecule's composition, so it cancels in
every error (y - z); leaving it out keeps float32 from rounding at the ~1e4 eV scale of total
energies. ``predict`` also carries ``batch`` (N,) so ``canonicalize`` can map atoms to examples;
``canonicalize`` returns the two fields only.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from equipipe.config import defaults
from equipipe.models import interface
from equipipe.models.registry import build_model, task_statistics
from equipipe.so3 import inverse, rotate_per_example
from equipipe.tasks.base import Batch, EvaluationDefaults, repeat_ragged

DEFAULTS: dict[str, Any] = defaults("task_cfg", "forcefield")  # the schema's
ENERGY_REFERENCES = ("linear", "none")


class ForceFieldTask(EvaluationDefaults):
    name = "forcefield"
    fields = ("forces", "energy")
    units = {"forces": "(eV/A)^2", "energy": "eV^2"}
    primary_field = "forces"

    def __init__(self, cfg: dict[str, Any] | None = None):
        cfg = {**DEFAULTS, **(cfg or {})}
        if cfg["energy_reference"] not in ENERGY_REFERENCES:
            raise ValueError(
                f"energy_reference {cfg['energy_reference']!r} is unknown; "
                f"allowed: {', '.join(ENERGY_REFERENCES)}"
            )
        self.cfg = cfg
        self.state: dict[str, Any] | None = None
        self._warned_elements: set[int] = set()

    # --- model ---------------------------------------------------------------------------

    def build_model(self, size: str) -> nn.Module:
        """The configured model; models with their own normalisation (``nequip``) get the
        training statistics of ``fit`` (``model_stats``) and the task's target scales."""
        overrides = self.cfg["model_overrides"] or {}
        stats = (self.state or {}).get("model_stats")
        if stats is not None:
            s = self._require_state()
            stats = {**stats, **{k: s[k] for k in ("energy_mean", "energy_std", "force_std")}}
        return build_model(self.cfg["model"], size, stats=stats, **overrides)

    def predict(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        """One forward pass; energy in eV (reference-subtracted), forces in eV/A."""
        out = model(batch)
        s = self._require_state()
        return {
            "energy": out["energy"] * s["energy_std"] + s["energy_mean"],
            "forces": out["forces"] * s["force_std"],
            "batch": batch["batch"],
        }

    def loss(self, pred: dict[str, Tensor], batch: Batch) -> Tensor:
        """energy_weight * MAE + force_weight * L2MAE (mean per-atom error norm), normalised."""
        s = self._require_state()
        energy = (pred["energy"] - s["energy_mean"]) / s["energy_std"]
        forces = pred["forces"] / s["force_std"]
        mae = (energy - batch["energy"]).abs().mean()
        l2mae = torch.linalg.vector_norm(forces - batch["forces"], dim=-1).mean()
        return self.cfg["energy_weight"] * mae + self.cfg["force_weight"] * l2mae

    def target(self, batch: Batch) -> dict[str, Tensor]:
        """Targets in physical units, same layout as ``predict``."""
        s = self._require_state()
        return {
            "forces": batch["forces"] * s["force_std"],
            "energy": batch["energy"] * s["energy_std"] + s["energy_mean"],
        }

    # --- group action --------------------------------------------------------------------

    def rotate(self, batch: Batch, R: Tensor) -> Batch:
        """Positions and forces of example b by R[b] (about the origin; the model only sees
        relative vectors). Energies are invariant."""
        out = dict(batch)
        out["pos"] = rotate_per_example(batch["pos"], R, batch["batch"])
        if "forces" in batch:
            out["forces"] = rotate_per_example(batch["forces"], R, batch["batch"])
        return out

    def canonicalize(self, pred: dict[str, Tensor], R: Tensor) -> dict[str, Tensor]:
        """Forces by R[b]^T, energy unchanged; returns the fields only.

        ``pred["batch"]`` (from ``predict``) says which example each atom belongs to; it is not
        passed on, so the result holds exactly ``fields`` (stackable, averageable).
        """
        return {
            "forces": rotate_per_example(pred["forces"], inverse(R), pred["batch"]),
            "energy": pred["energy"],
        }

    def shared_rotated_predictions(
        self, model: nn.Module, batch: Batch, R: Tensor, plain: bool = True
    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None] | None:
        """Canonicalised predictions of K rotated copies sharing one pass, when the model can.

        For a model with ``forward_rotated(batch, R, plain)`` (work shared across the copies:
        the EScAIP-like model's invariant trunk, the e3nn model's graph and radial weights;
        ``equipipe.equivariance.canonical_predictions`` calls this): field -> (K, *shape) stack
        of g_k^-1 f(g_k x), and (``plain``) the prediction ``predict(model, batch)`` from the
        same pass. None otherwise. R: (K, B, 3, 3).
        """
        forward_rotated = interface.forward_rotated(model)
        if forward_rotated is None:
            return None
        rotated, unrotated = forward_rotated(batch, R, plain=plain)
        s = self._require_state()
        forces = rotate_per_example(rotated["forces"] * s["force_std"], inverse(R), batch["batch"])
        z = {"forces": forces, "energy": rotated["energy"] * s["energy_std"] + s["energy_mean"]}
        if not plain:
            return z, None
        assert unrotated is not None, "forward_rotated(plain=True) returns the plain output"
        pred = {
            "energy": unrotated["energy"] * s["energy_std"] + s["energy_mean"],
            "forces": unrotated["forces"] * s["force_std"],
            "batch": batch["batch"],
        }
        return z, pred

    def repeat(self, batch: Batch, k: int) -> Batch:
        """k copies, copy-major: copy c of example b is example c * B + b."""
        return repeat_ragged(batch, k, self.num_examples(batch))

    def num_examples(self, batch: Batch) -> int:
        return int(batch["n_atoms"].shape[0])

    # --- data ----------------------------------------------------------------------------

    def fit(self, train_examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Energy reference, energy mean/std and force std from the training split only."""
        if not train_examples:
            raise ValueError("fit needs at least one training example")
        energies = np.array([float(ex["energy"]) for ex in train_examples], dtype=np.float64)
        element_energy: dict[str, float] = {}
        if self.cfg["energy_reference"] == "linear":
            elements = sorted({int(z) for ex in train_examples for z in np.asarray(ex["z"])})
            column = {z: i for i, z in enumerate(elements)}
            counts = np.zeros((len(train_examples), len(elements)))
            for row, ex in enumerate(train_examples):
                for z, c in zip(*np.unique(np.asarray(ex["z"]), return_counts=True)):
                    counts[row, column[int(z)]] = c
            # Minimum-norm least squares: conformers of few compositions leave it underdetermined.
            coef = np.linalg.lstsq(counts, energies, rcond=None)[0]
            element_energy = {str(z): float(coef[column[z]]) for z in elements}
        self.state = {
            "energy_reference": self.cfg["energy_reference"],
            "element_energy": element_energy,
        }
        residual = energies - np.array([self._reference(ex["z"]) for ex in train_examples])
        forces = np.concatenate(
            [np.asarray(ex["forces"], np.float64).reshape(-1) for ex in train_examples]
        )
        energy_std = float(residual.std())
        force_std = float(np.sqrt(np.mean(forces**2))) if forces.size else 0.0
        self.state.update(
            energy_mean=float(residual.mean()),
            energy_std=energy_std if energy_std > 1e-12 else 1.0,
            force_std=force_std if force_std > 1e-12 else 1.0,
            n_train=len(train_examples),
        )
        model_stats = task_statistics(
            self.cfg["model"], train_examples, **(self.cfg["model_overrides"] or {})
        )
        if model_stats is not None:
            self.state["model_stats"] = model_stats
        return dict(self.state)

    def set_state(self, state: dict[str, Any]) -> None:
        missing = {
            "energy_reference",
            "element_energy",
            "energy_mean",
            "energy_std",
            "force_std",
        } - set(state)
        if missing:
            raise ValueError(f"force-field state lacks {sorted(missing)}; pass what fit() returned")
        self.state = dict(state)

    def collate(self, examples: list[dict[str, Any]]) -> Batch:
        """Store examples -> CPU batch with normalised targets (needs ``fit`` or ``set_state``)."""
        s = self._require_state()
        n_atoms = [len(ex["z"]) for ex in examples]
        pos = np.concatenate([np.asarray(ex["pos"], np.float32).reshape(-1, 3) for ex in examples])
        z = np.concatenate([np.asarray(ex["z"], np.int64) for ex in examples])
        forces = np.concatenate(
            [np.asarray(ex["forces"], np.float64).reshape(-1, 3) for ex in examples]
        )
        energy = np.array(
            [float(ex["energy"]) - self._reference(ex["z"]) for ex in examples], dtype=np.float64
        )
        return {
            "pos": torch.from_numpy(pos),
            "z": torch.from_numpy(z),
            "batch": torch.arange(len(examples)).repeat_interleave(torch.tensor(n_atoms)),
            "n_atoms": torch.tensor(n_atoms, dtype=torch.int64),
            "energy": torch.from_numpy((energy - s["energy_mean"]) / s["energy_std"]).float(),
            "forces": torch.from_numpy(forces / s["force_std"]).float(),
        }

    # --- training-loop hooks (nothing random in this task) -------------------------------

    def prepare_train(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> Batch:
        del model, generator
        return batch

    def eval_views(self, batch: Batch, generator: torch.Generator) -> list[tuple[dict, Batch]]:
        del generator
        return [({}, batch)]

    def element_mask(self, batch: Batch) -> dict[str, Tensor] | None:
        del batch  # every atom counts
        return None

    def augment(self, batch: Batch, generator: torch.Generator) -> Batch:
        del generator
        return batch

    def accuracy(self, pred: dict[str, Tensor], batch: Batch) -> dict[str, tuple[float, str]]:
        """Energy MAE/RMSE per molecule (eV) and force MAE/RMSE per component (eV/A)."""
        y = self.target(batch)
        de = (pred["energy"].detach() - y["energy"]).double()
        df = (pred["forces"].detach() - y["forces"]).double()
        return {
            "energy_mae": (de.abs().mean().item(), "eV"),
            "energy_rmse": (math.sqrt(de.pow(2).mean().item()), "eV"),
            "force_mae": (df.abs().mean().item(), "eV/A"),
            "force_rmse": (math.sqrt(df.pow(2).mean().item()), "eV/A"),
        }

    # --- helpers -------------------------------------------------------------------------

    def _require_state(self) -> dict[str, Any]:
        if self.state is None:
            raise RuntimeError(
                "the force-field task has no normalisation: call fit() or set_state()"
            )
        return self.state

    def _reference(self, z: Any) -> float:
        """Per-element linear reference energy of a composition (0 for ``none``)."""
        table = self._require_state()["element_energy"]
        if not table:
            return 0.0
        total = 0.0
        for element, count in zip(*np.unique(np.asarray(z), return_counts=True)):
            value = table.get(str(int(element)))
            if value is None:
                if int(element) not in self._warned_elements:
                    self._warned_elements.add(int(element))
                    warnings.warn(
                        f"element Z={int(element)} is absent from the training split; "
                        "its reference energy is taken as 0 eV",
                        stacklevel=3,
                    )
                value = 0.0
            total += count * value
        return total
