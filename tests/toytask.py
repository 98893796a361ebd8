"""A small point-cloud Task for testing the generic evaluator (not a mock: real models)."""

from __future__ import annotations

import torch
from torch import nn

from equipipe.so3 import inverse, rotate_vectors
from equipipe.tasks.base import EvaluationDefaults, repeat_padded


class PairModel(nn.Module):
    """out_i = sum_j phi(|x_i - x_j|) (x_i - x_j) [+ A x_i]: equivariant iff A is a multiple of I... or absent."""

    def __init__(self, equivariant: bool = True, seed: int = 0, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(8, generator=g, dtype=dtype))
        self.A = (
            None if equivariant else nn.Parameter(0.3 * torch.randn(3, 3, generator=g, dtype=dtype))
        )

    def forward(self, batch):
        x = batch["x"]  # (B, P, 3)
        d = x[:, :, None] - x[:, None]  # (B, P, P, 3)
        r = d.norm(dim=-1, keepdim=True)
        phi = torch.tanh(r * self.w[:4].sum()) * self.w[4:].mean()
        out = (phi * d).sum(2)
        if self.A is not None:
            out = out + x @ self.A.T
        return {"v": out, "s": (r.squeeze(-1) ** 2).mean((1, 2))}


class ToyTask(EvaluationDefaults):
    name = "toy"
    fields = ("v", "s")
    units = {"v": "a.u.^2", "s": "a.u.^2"}
    primary_field = "v"

    def build_model(self, size):
        return PairModel(equivariant=(size == "equivariant"))

    def predict(self, model, batch):
        return model(batch)

    def loss(self, pred, batch):
        return (pred["v"] - batch["y"]).pow(2).mean()

    def target(self, batch):
        return {"v": batch["y"], "s": batch["ys"]}

    def rotate(self, batch, R):
        return {**batch, "x": rotate_vectors(batch["x"], R), "y": rotate_vectors(batch["y"], R)}

    def canonicalize(self, pred, R):
        return {"v": rotate_vectors(pred["v"], inverse(R)), "s": pred["s"]}

    def repeat(self, batch, k):
        return repeat_padded(batch, k)

    def num_examples(self, batch):
        return batch["x"].shape[0]

    def eval_views(self, batch, generator):
        del generator
        return [({}, batch)]

    def element_mask(self, batch):
        del batch
        return None


def toy_batch(B=6, P=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, P, 3, generator=g, dtype=dtype)
    y = torch.randn(B, P, 3, generator=g, dtype=dtype)
    return {"x": x, "y": y, "ys": torch.randn(B, generator=g, dtype=dtype)}


__all__ = ["PairModel", "ToyTask", "toy_batch", "rotate_vectors"]
