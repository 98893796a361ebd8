"""Forward-only decomposition time vs K plain validation forwards, side by side in one run.

Target (DESIGN.md): ratio <= 1.15 on CPU, <= 0.6 on a GPU (batched K copies). Uses real
molecules (RDKit conformers of the embedded SMILES pool) with the escaip model.

    python bench/eval_overhead.py [--size tiny] [--k 10] [--molecules 16] [--repeats 5]
Last line: eval_overhead_ratio=<x>
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from equipipe.data.embedded import embed_conformers, smiles_pool
from equipipe.equivariance import decompose
from equipipe.tasks import make_task


def real_batch(task, n_molecules: int, seed: int = 0):
    examples = []
    for smi in smiles_pool(n_molecules, seed=seed, max_heavy=20):
        mol = embed_conformers(smi, 1, seed)
        pos = mol.GetConformer(0).GetPositions().astype(np.float32)
        z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
        examples.append(
            {"pos": pos, "z": z, "forces": np.zeros_like(pos), "energy": np.float64(0.0)}
        )
    task.fit(examples)
    return task.collate(examples)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--molecules", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    torch.set_num_threads(1 if a.device == "cpu" else torch.get_num_threads())
    task = make_task("forcefield", {"model": "escaip"})
    batch = {k: v.to(a.device) for k, v in real_batch(task, a.molecules).items()}
    model = task.build_model(a.size).to(a.device).eval()
    gen = torch.Generator()
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)

    def plain():
        with torch.no_grad():
            for _ in range(a.k):
                task.predict(model, batch)
        sync()

    def decomposition():
        gen.manual_seed(0)
        decompose(model, task, batch, a.k, gen, device_strategy="auto")
        sync()

    t_plain = timed(plain, a.repeats)
    t_dec = timed(decomposition, a.repeats)
    print(f"device={a.device} model=escaip/{a.size} molecules={a.molecules} K={a.k}")
    print(f"K plain forwards: {t_plain * 1e3:.1f} ms   decomposition: {t_dec * 1e3:.1f} ms")
    print(f"eval_overhead_ratio={t_dec / t_plain:.3f}")


if __name__ == "__main__":
    main()
