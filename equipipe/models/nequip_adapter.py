"""NequIP (the ``nequip`` package, e3nn-based) behind the force-field task's model contract.

The field's own equivariant potential as the efficiency-gap baseline (issue 17), next to the
home-made direct-force e3nn model ``equivariant`` (the like-for-like variant: same readout
convention as the EScAIP-like model, forces read out directly). Built with
:func:`nequip.model.NequIPGNNModel` (NequIP's interaction blocks, Bessel radial basis with its
polynomial cutoff, gate nonlinearities, per-type scale/shift of the atomic energies) at
parameter counts matched to ``escaip``'s sizes (within 10 %, tests/test_nequip_adapter.py).

What the adapter CONVERTS
-------------------------
* Batch -> ``AtomicDataDict``: ``pos`` as is; ``z`` -> ``atom_types`` through the element list
  of the training split joined with the SPICE vocabulary (``type_names`` are element symbols;
  an element outside both raises); ``batch`` as is; ``n_atoms`` -> ``num_atoms``; ``edge_index`` (centre, neighbour)
  from :func:`equipipe.models.equivariant.radius_graph` with no neighbour cap (NequIP's graph is
  every pair within ``r_max`` of one molecule; molecules are not periodic, so no cell/shifts).
* NequIP's recommended normalisation, from the TRAINING split (the task's ``fit`` computes it,
  :func:`task_statistics`; it travels in the run's ``task_state``, so a reloaded run rebuilds
  the same model): ``per_type_energy_scales`` = the RMS force component (NequIP's
  ``forces_rms``), ``avg_num_neighbors`` = mean neighbour count within ``r_max``
  (``num_neighbors_mean``). The per-species energy SHIFT is the task's per-element linear
  reference E_ref (least squares on the training split — NequIP's ``per_type_energy_shifts``):
  the task subtracts it exactly in float64 before the network sees the targets (it is a
  constant of the composition and cancels in forces), so NequIP's own shifts are 0 here,
  which keeps float32 from rounding ~1e4 eV totals.
* Units: NequIP predicts the residual energy E - E_ref in eV and F = -dE/dx in eV/A; the
  adapter returns the task's normalised units, (E - energy_mean) / energy_std and F / force_std.
* Forces are -∇E, computed here with :func:`torch.autograd.grad` (``create_graph`` only when
  gradients are enabled, i.e. in training), NequIP's own derivative wrapper switched off
  (``do_derivatives=False``) so the graph is kept exactly when training needs it. A training
  step therefore includes a double backward: the per-step cost ratio c of this model against
  the direct-force EScAIP-like model includes that backward pass (use ``equivariant``,
  direct forces, for the price of equivariance alone).

What it does NOT convert
------------------------
* NequIP's training stack (Lightning module, Hydra configs, its loss/metrics, EMA,
  ``torch.compile``/AOT packaging, cuEquivariance/OpenEquivariance kernels): the pipeline's own
  loop, loss (energy MAE + force L2MAE in normalised units) and optimiser train it.
* Stresses/virials, periodic cells, per-edge-type cutoffs, ZBL pair potentials, charge/spin
  embeddings: molecules only.
* Checkpoints of the ``nequip`` CLI (``.ckpt``/``.nequip.zip``) are not read or written.

MACE's package (``mace-torch``) pins e3nn 0.4.4 and cannot share this environment (e3nn 0.6.0);
it is not offered.

``nequip`` sets process-wide state once (``set_global_state``: default dtype float64, a global
seed 123 for torch/numpy/random); the adapter restores the default dtype and every RNG state
afterwards, so the pipeline's seeding and float32 defaults are untouched.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from equipipe.models.equivariant import prune_dead_einsums, radius_graph
from equipipe.models.registry import sized_config

Batch = dict[str, Tensor]

_SYMBOLS = (
    "X H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As "
    "Se Br Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe"
).split()


@dataclass
class NequIPConfig:
    """Hyper-parameters passed to :func:`nequip.model.NequIPGNNModel` (its names in comments)."""

    num_layers: int = 4
    l_max: int = 2
    num_features: int = 32  # multiplicity of every irrep (num_features)
    parity: bool = False  # NequIP's preset default
    radial_mlp_depth: int = 1
    radial_mlp_width: int = 128
    num_bessels: int = 8
    polynomial_cutoff_p: int = 6
    r_max: float = 5.0  # Å, NequIP's usual cutoff for molecules
    model_dtype: str = "float32"
    # Defaults when no training statistics are given (parameter counting, tests); the task's
    # fit supplies the real ones (see task_statistics).
    elements: tuple[int, ...] = (1, 6, 7, 8, 9, 15, 16, 17, 35, 53)
    avg_num_neighbors: float = 10.0
    force_rms: float = 1.0  # eV/Å
    energy_mean: float = 0.0  # eV, the task's normalisation (residual energy)
    energy_std: float = 1.0  # eV
    force_std: float = 1.0  # eV/Å


# Matched to escaip's counts (tiny 0.20M, 1M 1.07M, 4M 4.20M, 6M 5.94M), within 10 %.
SIZES: dict[str, NequIPConfig] = {  # counted with the 10 default elements (the self-connection
    # weights grow with the number of element types, ~4 % per element at size 1M)
    "tiny": NequIPConfig(num_layers=2, l_max=1, num_features=56, radial_mlp_width=64),  # 0.22M
    "1M": NequIPConfig(num_layers=4, l_max=2, num_features=42),  # 1.06M
    "4M": NequIPConfig(num_layers=4, l_max=2, num_features=70),  # 4.28M
    "6M": NequIPConfig(num_layers=6, l_max=2, num_features=62),  # ~5.8M
}

# Fields a config may override (model_overrides); the statistics come from the task.
STAT_FIELDS = (
    "elements",
    "avg_num_neighbors",
    "force_rms",
    "energy_mean",
    "energy_std",
    "force_std",
)
_GLOBAL_STATE_DONE = False


def build(size: str, stats: dict[str, Any] | None = None, **overrides) -> NequIPForceField:
    """The adapter at a named size; ``stats`` from :func:`task_statistics` + the task state."""
    cfg = sized_config("nequip", NequIPConfig(), SIZES, size, overrides, fixed=STAT_FIELDS)
    if stats:
        cfg = replace(cfg, **{k: v for k, v in stats.items() if k in STAT_FIELDS})
        cfg.elements = tuple(int(z) for z in cfg.elements)
    if torch.get_default_device().type == "meta":
        with torch.device("cpu"):  # e3nn computes constants with real tensors while it builds
            return NequIPForceField(cfg).to("meta")
    model = NequIPForceField(cfg)
    # NequIP's e3nn tensor products carry the same dead outer-product einsums as ours (eager fx
    # graphs since torch 2.10): erased, outputs bit-identical (equipipe.models.equivariant)
    prune_dead_einsums(model)
    return model


def task_statistics(examples: list[dict[str, Any]], r_max: float | None = None) -> dict[str, Any]:
    """NequIP's training statistics of store examples: elements (present or in the vocabulary),
    mean neighbours within ``r_max`` (Å; default the config's), RMS force component (eV/Å)."""
    r_max = NequIPConfig.r_max if r_max is None else float(r_max)
    # The vocabulary's elements always get a type: a small subset may lack an element (Cl, Br)
    # that held-out molecules carry; its per-type scale is then untrained, as in escaip.
    seen = {int(z) for ex in examples for z in np.asarray(ex["z"])}
    elements = sorted(seen | set(NequIPConfig.elements))
    n_edges = n_nodes = 0
    sq = count = 0.0
    for ex in examples:
        pos = np.asarray(ex["pos"], np.float64).reshape(-1, 3)
        d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
        n_edges += int(((d <= r_max) & (d > 0)).sum())
        n_nodes += len(pos)
        f = np.asarray(ex["forces"], np.float64)
        sq += float((f**2).sum())
        count += f.size
    return {
        "elements": elements,
        "avg_num_neighbors": n_edges / max(n_nodes, 1),
        "force_rms": math.sqrt(sq / count) if count else 1.0,
    }


def _init_nequip_global_state() -> None:
    """Call nequip's one-off ``set_global_state`` and undo its process-wide side effects."""
    global _GLOBAL_STATE_DONE
    if _GLOBAL_STATE_DONE:
        return
    from nequip.utils.global_state import set_global_state

    dtype = torch.get_default_dtype()
    torch_rng, np_rng, py_rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        set_global_state()
    finally:
        torch.set_default_dtype(dtype)
        torch.set_rng_state(torch_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)
    _GLOBAL_STATE_DONE = True


class NequIPForceField(nn.Module):
    """``forward(batch) -> {"energy": (B,), "forces": (N, 3)}`` in the task's normalised units."""

    # Forces are -dE/dx, taken inside forward: evaluation must run under no_grad, not inference mode.
    autograd_in_forward = True

    def __init__(self, cfg: NequIPConfig) -> None:
        super().__init__()
        import warnings

        from nequip.model import NequIPGNNModel

        _init_nequip_global_state()
        self.cfg = cfg
        for z in cfg.elements:
            if not 0 < z < len(_SYMBOLS):
                raise ValueError(f"element Z={z} has no symbol in the nequip adapter")
        lookup = torch.full((119,), -1, dtype=torch.long)
        lookup[list(cfg.elements)] = torch.arange(len(cfg.elements))
        self.register_buffer("type_of_z", lookup, persistent=False)
        # The builder's seed: drawn from the caller's torch RNG, so the run's seed fixes the init.
        seed = int(torch.randint(0, 2**31 - 1, (1,), device="cpu"))
        names = [_SYMBOLS[z] for z in cfg.elements]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nequip's advice warnings about unset shifts
            self.net = NequIPGNNModel(
                seed=seed,
                model_dtype=cfg.model_dtype,
                r_max=cfg.r_max,
                type_names=names,
                num_layers=cfg.num_layers,
                l_max=cfg.l_max,
                parity=cfg.parity,
                num_features=cfg.num_features,
                radial_mlp_depth=cfg.radial_mlp_depth,
                radial_mlp_width=cfg.radial_mlp_width,
                num_bessels=cfg.num_bessels,
                polynomial_cutoff_p=cfg.polynomial_cutoff_p,
                avg_num_neighbors=float(cfg.avg_num_neighbors),
                per_type_energy_scales={name: float(cfg.force_rms) for name in names},
                per_type_energy_shifts={name: 0.0 for name in names},
                do_derivatives=False,
            )
        self.dtype = getattr(torch, cfg.model_dtype)

    def energy(self, pos: Tensor, z: Tensor, batch: Tensor, n_atoms: Tensor) -> Tensor:
        """(B,) residual energy E - E_ref in eV, as NequIP predicts it."""
        types = self.type_of_z[z]
        if bool((types < 0).any()):
            missing = sorted({int(v) for v in z[types < 0]})
            raise ValueError(f"elements {missing} are not types of the nequip model")
        src, dst = radius_graph(pos, batch, n_atoms, self.cfg.r_max, 1 << 30)
        data = {
            "pos": pos,
            "atom_types": types,
            "edge_index": torch.stack([dst, src]),
            "batch": batch,
            "num_atoms": n_atoms,
        }
        return self.net(data)["total_energy"].reshape(-1)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        keep_graph = torch.is_grad_enabled()  # training / gradient norms need d(forces)/dθ
        dtype_in = batch["pos"].dtype
        with torch.enable_grad():
            pos = batch["pos"].to(self.dtype)
            if not pos.requires_grad:
                pos = pos.detach().requires_grad_(True)
            energy = self.energy(pos, batch["z"], batch["batch"], batch["n_atoms"])
            (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=keep_graph)
        c = self.cfg
        energy = (energy - c.energy_mean) / c.energy_std
        forces = -grad / c.force_std
        if not keep_graph:
            energy, forces = energy.detach(), forces.detach()
        return {"energy": energy.to(dtype_in), "forces": forces.to(dtype_in)}
