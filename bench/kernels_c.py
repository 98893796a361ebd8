"""The per-step cost ratio c of the efficiency gap with e3nn's and cuequivariance's tensor products.

Times one optimizer step (forward, force loss, backward, AdamW) of the EScAIP-like baseline and
of the equivariant models at one size on one batch of synthetic molecules (bench/gpu_check.py's
``atoms_batch``), then prints c = sec/step(equivariant) / sec/step(escaip) per kernel:

* ``equivariant`` (direct 1o forces) with ``kernel: e3nn`` and ``kernel: cuequivariance``
  (cuequivariance_torch.ChannelWiseTensorProduct; its CUDA kernels need the
  ``cuequivariance-ops-torch-cu12`` package, otherwise the row says "fallback": PyTorch ops);
* ``nequip`` (F = -dE/dx) with e3nn's tensor products (the adapter does not switch NequIP's
  kernels: its own cuequivariance integration goes through NequIP's compile/packaging stack,
  which the adapter does not use).

The GPU machine has no network and only torch: e3nn, nequip (which also imports matplotlib) and
cuequivariance come from wheels (bench/gpu_check.sh: GPU_CHECK_WHEELS); a model whose packages
are missing gets an error row, the others are still timed.

Usage:
  python bench/kernels_c.py [--device cuda] [--size 6M] [--molecules 64] [--atoms 30] [--steps 20]
Last line: ``kernels_c=<json>`` with every row, for the efficiency-gap note.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def cue_status() -> str:
    """'absent', 'fallback' (PyTorch ops) or 'cuda kernels' (cuequivariance-ops-torch present)."""
    try:
        import cuequivariance_torch  # noqa: F401
    except ModuleNotFoundError:
        return "absent"
    try:
        import cuequivariance_ops_torch  # noqa: F401
    except ModuleNotFoundError:
        return "fallback"
    return "cuda kernels"


def build(device, model: str, size: str, overrides: dict):
    from equipipe.tasks.forcefield import ForceFieldTask

    task = ForceFieldTask({"model": model, "model_overrides": overrides})
    task.set_state({"energy_reference": "none", "element_energy": {}, "energy_mean": 0.0,
                    "energy_std": 1.0, "force_std": 1.0, "forces_rms": 1.0,
                    "num_neighbors_mean": 10.0})  # fmt: skip
    return task, task.build_model(size).to(device)


def sec_per_step(torch, device, task, model, batch, warmup: int, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        loss = task.loss(task.predict(model, batch), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--size", default="6M", help="tiny | 1M | 4M | 6M (escaip's sizes)")
    p.add_argument("--molecules", type=int, default=64, help="molecules per batch")
    p.add_argument("--atoms", type=int, default=30, help="atoms per molecule")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args(argv)
    import torch
    from gpu_check import atoms_batch

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    )
    batch = atoms_batch(torch, device, a.molecules, a.atoms)
    cue = cue_status()
    cases = [("escaip", "-", {}), ("equivariant", "e3nn", {"cutoff": 5.0, "avg_neighbors": 10.0})]
    if cue != "absent":
        cases.append(("equivariant", "cuequivariance",
                      {"cutoff": 5.0, "avg_neighbors": 10.0, "kernel": "cuequivariance"}))  # fmt: skip
    cases.append(("nequip", "e3nn", {}))
    rows = []
    for model, kernel, overrides in cases:
        row = {"model": model, "kernel": kernel, "size": a.size, "device": str(device)}
        if kernel == "cuequivariance":
            row["cuequivariance"] = cue
        try:
            task, net = build(device, model, a.size, overrides)
            row["sec_per_step"] = sec_per_step(torch, device, task, net, batch, a.warmup, a.steps)
        except Exception as err:  # noqa: BLE001 - a bench row reports what failed, and goes on
            row["error"] = f"{type(err).__name__}: {err}"[:200]
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = next((r.get("sec_per_step") for r in rows if r["model"] == "escaip"), None)
    print(f"\nc per kernel ({a.size}, {a.molecules} mol x {a.atoms} atoms, {device}; "
          f"cuequivariance: {cue})")  # fmt: skip
    print(f"{'model':12} {'kernel':15} {'s/step':>9} {'c':>7}")
    for r in rows:
        s = r.get("sec_per_step")
        if s and base:
            r["c"] = s / base
        c = f"{r['c']:7.2f}" if "c" in r else "      -"
        print(f"{r['model']:12} {r['kernel']:15} {s if s else float('nan'):9.4f} {c}"
              + (f"  {r['error']}" if "error" in r else ""))  # fmt: skip
    print("kernels_c=" + json.dumps(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
