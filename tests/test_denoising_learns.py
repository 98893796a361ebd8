"""The embedded voxel slice learns: denoising error well below the identity predictor's and
an exact (octahedral) equivariance share that falls, with the embedded recipe (cheap version:
the task and model of config/config.yaml on a 16^3 grid, a few molecules, in process)."""

from __future__ import annotations

from pathlib import Path

import torch

from equipipe.config import load_config, run_spec
from equipipe.equivariance import decompose
from equipipe.so3 import haar_rotations
from equipipe.tasks.denoising import DenoisingTask
from tests.test_denoising import _examples

ROOT = Path(__file__).resolve().parents[1]


def test_embedded_recipe_learns_to_denoise_and_its_octahedral_pct_falls():
    spec = run_spec(load_config(ROOT / "config" / "config.yaml"), "dn_default", 0)
    cfg = {**spec["task_cfg"], "grid_size": 16, "eval_modes": ["octahedral"]}
    task = DenoisingTask(cfg)
    torch.manual_seed(0)
    model = task.build_model(spec["size"])
    tr = spec["train"]
    opt = torch.optim.AdamW(model.parameters(), lr=tr["lr"], betas=tuple(tr.get("betas", (0.9, 0.999))),
                            weight_decay=tr.get("weight_decay", 0.0))  # fmt: skip
    examples = _examples()
    val = task.collate(examples[:2])
    labels, view = task.eval_views(val, torch.Generator().manual_seed(1))[0]

    def measure():
        model.eval()
        d = decompose(model, task, view, 24, None, rotations=task.rotation_set(labels))["density"]
        model.train()
        return d

    start = measure()
    gen = torch.Generator().manual_seed(2)
    for _ in range(60):
        batch = task.collate(examples)
        batch = task.rotate(batch, haar_rotations(3, gen))  # the recipe's augmentation
        batch = task.prepare_train(model, task.augment(batch, gen), gen)
        loss = task.loss(task.predict(model, batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = measure()
    noisy, clean = task.model_input(view)
    identity = float((noisy - clean).pow(2).mean())
    zero = float(clean.pow(2).mean())  # the error of predicting nothing
    total = end.per_element()["total"]
    print(
        f"pct {start.pct:.3f} -> {end.pct:.3f}; total {total:.2e}, identity {identity:.2e}, zero {zero:.2e}"
    )
    assert total <= 0.5 * identity
    assert total < zero  # it denoises: better than predicting an empty grid
    assert end.pct <= start.pct / 3, (start.pct, end.pct)
