"""Measure how much of your model's loss comes from imperfect rotational equivariance.

The model here was NOT built by equipipe: a small PointNet-style network that predicts one
3D vector per point of a point cloud, trained in a plain PyTorch loop. To measure its
equivariance error, ``equipipe.equivariance`` needs only how a rotation acts on the inputs and
on the outputs — the adapter class below (about 30 lines). Every ``eval_every`` steps the loop
calls ``decompose``, which splits the held-out squared error into

    total T = twirled-prediction error M + equivariance error E      (exactly, per batch)

and reports pct = E_unbiased / T, the share of the loss caused by imperfect equivariance.

Run:  python examples/custom_loop.py --steps 400 --eval-every 50 [--augment]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from equipipe.equivariance import decompose, decomposition_from_predictions
from equipipe.so3 import haar_rotations
from equipipe.tasks.base import EvaluationDefaults

# ----------------------------------------------------------------------------- your code


def make_data(n: int, points: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random clouds x (n, P, 3); target per point y_i = sin(|u_i|) u_i with u_i = x_i - mean(x),
    a rotation-equivariant vector field (any equivariant target works)."""
    x = torch.randn(n, points, 3, generator=generator)
    u = x - x.mean(dim=1, keepdim=True)
    return {"x": x, "y": torch.sin(u.norm(dim=-1, keepdim=True)) * u}


class PointNet(nn.Module):
    """Per-point MLP on raw coordinates + mean-pooled global feature -> a vector per point.
    Raw coordinates in, raw vectors out: not equivariant by construction."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.local = nn.Sequential(nn.Linear(3, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, P, 3) -> (B, P, 3)
        h = self.local(x)
        g = h.mean(dim=1, keepdim=True).expand_as(h)
        return self.head(torch.cat([h, g], dim=-1))


# ----------------------------------------------------------------------------- the adapter


class PointCloudAdapter(EvaluationDefaults):
    """What ``equipipe.equivariance`` needs: the group action on inputs and outputs (the
    defaults say: K Haar rotations per example, one forward pass each).

    Batches are dicts of tensors; R is (B, 3, 3), one rotation per example. Points are rows,
    so rotating by R is ``v @ R^T`` and undoing it is ``v @ R``.
    """

    fields = ("vectors",)  # the outputs to decompose (squared error, per element)
    primary_field = "vectors"

    def predict(self, model, batch):
        return {"vectors": model(batch["x"])}

    def target(self, batch):
        return {"vectors": batch["y"]}

    def rotate(self, batch, R):  # inputs AND targets: x -> R x, y -> R y
        return {key: value @ R.transpose(1, 2) for key, value in batch.items()}

    def canonicalize(self, pred, R):  # outputs back to the original frame: v -> R^T v
        return {key: value @ R for key, value in pred.items()}

    def repeat(self, batch, k):  # k copies, copy-major (for one batched forward on a GPU)
        return {key: torch.cat([value] * k) for key, value in batch.items()}

    def num_examples(self, batch):
        return batch["x"].shape[0]

    def element_mask(self, batch):  # None: every element counts (else per-field bool masks)
        del batch
        return None


# ----------------------------------------------------------------------------- the loop


def train(
    steps: int = 400,
    eval_every: int = 50,
    k: int = 4,
    batch_size: int = 32,
    points: int = 16,
    augment: bool = False,
    seed: int = 0,
    log=print,
) -> list[dict]:
    """Plain training loop; returns one dict per evaluation (step, T, M, E, pct, ...)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    train_set, val = make_data(2048, points, gen), make_data(128, points, gen)
    model, adapter = PointNet(), PointCloudAdapter()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            model.eval()
            # The same seed at every evaluation: the same K rotations per example, so the
            # curve is not jittered by new draws.
            d = decompose(model, adapter, val, k, torch.Generator().manual_seed(1234))["vectors"]
            row = {"step": step, **d.per_element(), "k": d.k, "pct": d.pct}
            history.append(row)
            log(f"step {step:5d}  T {row['total']:.4f}  M {row['mean']:.4f}  "
                f"E_unb {row['equiv_unbiased']:.2e}  pct {100 * d.pct:.2f} %")  # fmt: skip
            model.train()
        if step == steps:
            break
        idx = torch.randint(0, 2048, (batch_size,), generator=gen)
        batch = {key: value[idx] for key, value in train_set.items()}
        if augment:  # random rotation of every training example
            batch = adapter.rotate(batch, haar_rotations(batch_size, gen))
        loss = (model(batch["x"]) - batch["y"]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return history


def decompose_by_hand(model, batch, R):
    """The same numbers from your own rotations: R (K, B, 3, 3) -> Decomposition.

    ``decomposition_from_predictions`` takes K canonicalised predictions z (K, *shape) and the
    target y (*shape); use it when you already rotate inputs yourself.
    """
    with torch.no_grad():
        z = torch.stack([model(batch["x"] @ r.transpose(1, 2)) @ r for r in R])
    return decomposition_from_predictions(z, batch["y"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--k", type=int, default=4, help="rotations per example (>= 2)")
    parser.add_argument("--augment", action="store_true", help="rotate training examples")
    a = parser.parse_args()
    train(a.steps, a.eval_every, a.k, augment=a.augment)
