"""Flow matching on C-alpha chains (Proteína-style), in nm.

Batch (padded, B chains x L residues): ``x1`` (B, L, 3) data coordinates (centred, zero at
padding), ``mask`` (B, L) bool, ``residue`` (B, L) int64, ``chain_break`` (B, L) bool; after
``prepare_train`` / ``eval_views`` also ``t`` (B,) and ``x0`` (B, L, 3) noise, and when
self-conditioning is on ``x_sc`` (B, L, 3) (absent = off: the model then sees zeros).

Flow: x_t = (1 - t) x0 + t x1 (t = 1 is data), x0 ~ N(0, noise_std^2) per residue, centred
over the chain. The network predicts the velocity v; the x1 estimate is derived,
x1_hat = x_t + (1 - t) v. Training time t ~ 0.98 Beta(1.9, 1) + 0.02 U(0, 1) (a mixture);
self-conditioning with probability 0.5 per batch (an extra forward without gradient, its x1_hat
fed back as ``x_sc``). Loss per chain ||x1 - x1_hat||^2 / (3 n) / ((1 - t)^2 + 1e-5), averaged
over the batch; it is evaluated in the equivalent velocity form
(1 - t)^2 / ((1 - t)^2 + eps) * ||(x1 - x0) - v||^2 / (3 n), which avoids the cancellation of
x1 - x_t near t = 1.

Group action: ``rotate`` turns ``x1``, ``x0`` and ``x_sc`` of example b by R[b] about the
origin (the chains are centred), so x_t turns with them; ``canonicalize`` applies R[b]^T to
the predicted x1. The decomposed field is ``x1`` (x1_hat in nm; squared error in nm^2;
padding excluded by ``element_mask``). ``eval_views`` gives one view per flow time in
``eval_t`` with the noise x0 drawn per example from the generator before any rotation and
self-conditioning off. ``accuracy`` reports ``x1_rmsd`` in nm: the plain RMSD between
x1_hat and x1 after centring both over the chain, WITHOUT Kabsch superposition (the model is
asked for coordinates in the data's frame; a rotation error counts as error).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from equipipe.config import defaults
from equipipe.models import interface
from equipipe.models.registry import build_model
from equipipe.so3 import inverse, rotate_vectors
from equipipe.tasks.base import Batch, EvaluationDefaults, repeat_padded

DEFAULTS: dict[str, Any] = defaults("task_cfg", "flowmatching")  # the schema's

_VECTORS = ("x1", "x0", "x_sc")


class FlowMatchingTask(EvaluationDefaults):
    name = "flowmatching"
    fields = ("x1",)
    units = {"x1": "nm^2"}
    primary_field = "x1"

    def __init__(self, cfg: dict[str, Any] | None = None):
        cfg = {**DEFAULTS, **(cfg or {})}
        ts = [float(t) for t in cfg["eval_t"]]
        if not ts or any(not 0.0 <= t < 1.0 for t in ts):
            raise ValueError(
                f"eval_t must be a non-empty list of flow times in [0, 1), got {cfg['eval_t']}"
            )
        for key in ("self_cond_prob", "t_uniform_frac"):
            if not 0.0 <= float(cfg[key]) <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {cfg[key]}")
        for key in ("t_beta_a", "noise_std", "loss_eps"):
            if float(cfg[key]) <= 0:
                raise ValueError(f"{key} must be > 0, got {cfg[key]}")
        cfg["eval_t"] = ts
        self.cfg = cfg
        self.state: dict[str, Any] = {}

    # --- model ---------------------------------------------------------------------------

    def build_model(self, size: str) -> nn.Module:
        return build_model(self.cfg["model"], size, **self.cfg["model_overrides"])

    @staticmethod
    def interpolate(batch: Batch) -> Tensor:
        """x_t = (1 - t) x0 + t x1, (B, L, 3)."""
        t = batch["t"].to(batch["x1"].dtype)[:, None, None]
        return (1 - t) * batch["x0"] + t * batch["x1"]

    def predict(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        """One forward pass: ``v`` (velocity) and ``x1`` = x_t + (1 - t) v, nm, zero at padding."""
        x_t = self.interpolate(batch)
        mask = batch["mask"]
        v = model(
            x_t, batch["t"], mask, x_sc=batch.get("x_sc"), chain_break=batch.get("chain_break")
        )
        return self._prediction(x_t, batch["t"], mask, v)

    @staticmethod
    def _prediction(x_t: Tensor, t: Tensor, mask: Tensor, v: Tensor) -> dict[str, Tensor]:
        """``v`` (velocity) and ``x1`` = x_t + (1 - t) v from the model's output v (B, L, 3)."""
        v = v.to(x_t.dtype) * mask[..., None]
        one_minus_t = (1 - t.to(x_t.dtype))[:, None, None]
        return {"x1": (x_t + one_minus_t * v) * mask[..., None], "v": v}

    def loss(self, pred: dict[str, Tensor], batch: Batch) -> Tensor:
        """Mean over chains of ||x1 - x1_hat||^2 / (3 n) / ((1 - t)^2 + eps) (velocity form)."""
        mask = batch["mask"][..., None].to(batch["x1"].dtype)
        n = batch["mask"].sum(1).clamp(min=1).to(batch["x1"].dtype)
        one_minus_t = 1 - batch["t"].to(batch["x1"].dtype)
        if "v" in pred:
            # x1 - x1_hat = (1 - t) (x1 - x0 - v): weight (1-t)^2 / ((1-t)^2 + eps) on the velocity error.
            sq = ((pred["v"].float() - (batch["x1"] - batch["x0"])) ** 2 * mask).sum((1, 2))
            per_chain = sq / (3 * n) * one_minus_t**2 / (one_minus_t**2 + self.cfg["loss_eps"])
        else:
            sq = ((pred["x1"].float() - batch["x1"]) ** 2 * mask).sum((1, 2))
            per_chain = sq / (3 * n) / (one_minus_t**2 + self.cfg["loss_eps"])
        return per_chain.mean()

    def target(self, batch: Batch) -> dict[str, Tensor]:
        return {"x1": batch["x1"]}

    # --- group action --------------------------------------------------------------------

    def rotate(self, batch: Batch, R: Tensor) -> Batch:
        """x1, x0 and x_sc of example b by R[b] (rows: x R^T); x_t follows through x1 and x0."""
        out = dict(batch)
        for key in _VECTORS:
            if key in batch:
                out[key] = rotate_vectors(batch[key], R)
        return out

    def canonicalize(self, pred: dict[str, Tensor], R: Tensor) -> dict[str, Tensor]:
        """x1_hat of example b by R[b]^T; returns the decomposed field only."""
        return {"x1": rotate_vectors(pred["x1"], inverse(R))}

    def shared_rotated_predictions(
        self, model: nn.Module, batch: Batch, R: Tensor, plain: bool = True
    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None] | None:
        """Canonicalised x1 of K rotated copies sharing the model's invariant pair stack.

        For a model with ``forward_rotated`` (Proteína-like without pair updates), when
        self-conditioning is off (evaluation views): field -> (K, B, L, 3) stack of
        g_k^-1 f(g_k x), and (``plain``) ``predict(model, batch)`` from the same pair biases,
        without autograd (it serves the accuracy; equal to ``predict`` under inference mode). None otherwise.
        R: (K, B, 3, 3). Rotation commutes with the interpolation: R x_t = (1-t) R x0 + t R x1.
        """
        forward_rotated = interface.forward_rotated(model)
        pair_updates = int(getattr(getattr(model, "cfg", None), "tri_every", 0) or 0)
        if forward_rotated is None or "x_sc" in batch or pair_updates:
            return None
        K, (B, L) = R.shape[0], batch["mask"].shape
        x_t = self.interpolate(batch)
        Rx, mask = R.to(x_t), batch["mask"]
        out = forward_rotated(x_t, batch["t"], mask, Rx, batch.get("chain_break"), plain=plain)
        v, v_plain = out if plain else (out, None)
        v = v.to(x_t.dtype).reshape(K, B, L, 3) * mask[..., None]
        x_rot = rotate_vectors(x_t, Rx)  # (K, B, L, 3)
        one_minus_t = (1 - batch["t"].to(x_t.dtype))[:, None, None]
        x1 = (x_rot + one_minus_t * v) * mask[..., None]
        z = {"x1": rotate_vectors(x1, inverse(Rx))}
        if v_plain is None:
            return z, None
        with torch.inference_mode():  # ``predict``'s arithmetic on the shared pass's velocity
            return z, self._prediction(x_t.detach(), batch["t"], mask, v_plain)

    def repeat(self, batch: Batch, k: int) -> Batch:
        """k copies, copy-major: copy c of example b is example c * B + b."""
        return repeat_padded(batch, k)

    def num_examples(self, batch: Batch) -> int:
        return int(batch["x1"].shape[0])

    # --- data ----------------------------------------------------------------------------

    def collate(self, examples: list[dict[str, Any]]) -> Batch:
        """Store examples (pos nm, residue, chain_break) -> padded CPU batch, chains re-centred."""
        if not examples:
            raise ValueError("collate needs at least one example")
        lengths = [len(ex["pos"]) for ex in examples]
        B, L = len(examples), max(lengths)
        x1 = np.zeros((B, L, 3), dtype=np.float32)
        mask = np.zeros((B, L), dtype=bool)
        residue = np.zeros((B, L), dtype=np.int64)
        chain_break = np.zeros((B, L), dtype=bool)
        for b, ex in enumerate(examples):
            n = lengths[b]
            pos = np.asarray(ex["pos"], dtype=np.float64).reshape(n, 3)
            x1[b, :n] = pos - pos.mean(axis=0)
            mask[b, :n] = True
            residue[b, :n] = np.asarray(ex["residue"], dtype=np.int64)
            chain_break[b, :n] = np.asarray(ex["chain_break"], dtype=bool)
        return {
            "x1": torch.from_numpy(x1),
            "mask": torch.from_numpy(mask),
            "residue": torch.from_numpy(residue),
            "chain_break": torch.from_numpy(chain_break),
        }

    def fit(self, train_examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Nothing is normalised (coordinates stay in nm); records the training-split size."""
        lengths = [len(ex["pos"]) for ex in train_examples]
        self.state = {
            "n_train": len(lengths),
            "mean_length": float(np.mean(lengths)) if lengths else 0.0,
        }
        return dict(self.state)

    def set_state(self, state: dict[str, Any]) -> None:
        self.state = dict(state)

    # --- training-loop hooks -------------------------------------------------------------

    def _noise(self, mask: Tensor, generator: torch.Generator) -> Tensor:
        """Centred Gaussian x0 for a whole batch (one draw), zero at padding; on mask's device."""
        B, L = mask.shape
        x0 = torch.randn(B, L, 3, generator=generator) * float(self.cfg["noise_std"])
        return _centre(x0.to(mask.device), mask)

    def sample_t(self, n: int, generator: torch.Generator) -> Tensor:
        """t ~ (1 - w) Beta(a, 1) + w U(0, 1); Beta(a, 1) by inversion, u^(1/a). (n,) on CPU."""
        beta = torch.rand(n, generator=generator, dtype=torch.float64) ** (
            1.0 / float(self.cfg["t_beta_a"])
        )
        uniform = torch.rand(n, generator=generator, dtype=torch.float64)
        pick_uniform = torch.rand(n, generator=generator) < float(self.cfg["t_uniform_frac"])
        return torch.where(pick_uniform, uniform, beta).float()

    def prepare_train(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> Batch:
        """Draw t and x0; with probability ``self_cond_prob`` run a detached forward for x_sc."""
        mask = batch["mask"]
        out = dict(batch)
        out["t"] = self.sample_t(mask.shape[0], generator).to(mask.device)
        out["x0"] = self._noise(mask, generator).to(batch["x1"].dtype)
        out.pop("x_sc", None)
        if float(torch.rand((), generator=generator)) < float(self.cfg["self_cond_prob"]):
            with torch.no_grad():
                out["x_sc"] = self.predict(model, out)["x1"].detach().to(batch["x1"].dtype)
        return out

    def eval_views(self, batch: Batch, generator: torch.Generator) -> list[tuple[dict, Batch]]:
        """One view per t in ``eval_t``: x0 drawn per example (its own length) before rotation,
        shared by all t; self-conditioning off (no ``x_sc``)."""
        mask = batch["mask"]
        B, L = mask.shape
        lengths = mask.sum(1).tolist()
        x0 = torch.zeros(B, L, 3)
        for b, n in enumerate(lengths):
            x0[b, : int(n)] = torch.randn(int(n), 3, generator=generator) * float(
                self.cfg["noise_std"]
            )
        x0 = _centre(x0.to(mask.device), mask).to(batch["x1"].dtype)
        base = {k: v for k, v in batch.items() if k != "x_sc"}
        views = []
        for t in self.cfg["eval_t"]:
            tt = torch.full((B,), t, dtype=torch.float32, device=mask.device)
            views.append(({"t": t}, {**base, "x0": x0, "t": tt}))
        return views

    def element_mask(self, batch: Batch) -> dict[str, Tensor] | None:
        return {"x1": batch["mask"][..., None].expand(batch["x1"].shape)}

    def augment(self, batch: Batch, generator: torch.Generator) -> Batch:
        del generator
        return batch

    def accuracy(self, pred: dict[str, Tensor], batch: Batch) -> dict[str, tuple[float, str]]:
        """x1 RMSD (nm) per chain after centring both, no Kabsch superposition; mean over chains."""
        mask = batch["mask"]
        xh = _centre(pred["x1"].detach().double(), mask)
        x1 = _centre(batch["x1"].double(), mask)
        n = mask.sum(1).clamp(min=1).double()
        msd = ((xh - x1) ** 2).sum(-1).mul(mask).sum(1) / n
        rmsd = msd.sqrt().mean().item()
        return {"x1_rmsd": (rmsd if math.isfinite(rmsd) else float("nan"), "nm")}


def _centre(x: Tensor, mask: Tensor) -> Tensor:
    """Subtract each chain's mean over its real residues; zero at padding. x (B, L, 3)."""
    m = mask[..., None].to(x.dtype)
    mean = (x * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)
    return (x - mean) * m
