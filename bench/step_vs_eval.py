"""Training step vs evaluation, side by side in one process, per embedded experiment.

For each experiment of a config (default: the embedded ``config/config.yaml``) this builds the
job's Trainer from its run spec on the built data (``results/data``), times ``--steps``
training steps and ``--evals`` evaluations alternately (so load on a shared machine hits both
alike), and prints medians: seconds per step, per evaluation and its parts, and the share of
the job outside training that the experiment's evaluation schedule implies:

    share = (first + (n_evals - 1) * eval) / (steps * step + first + (n_evals - 1) * eval)

with the first evaluation (``first``: step 0, cold caches, the interpolation floor) counted
once and the median of the later ones (``eval``) for the rest (I/O, set-up and start-up
excluded: ``bench/embedded_budget.py`` reads those from finished runs). ``--profile`` adds a
``torch.profiler`` table (CPU self time) of one training step and of one evaluation per
experiment.

    python bench/step_vs_eval.py [--experiments ff_default fm_default] [--steps 10] [--evals 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from equipipe.allocator import keep_freed_memory
from equipipe.config import load_config, run_spec
from equipipe.timing import EVAL_PARTS
from equipipe.train import Trainer, eval_steps


def build(cfg: dict, experiment: str, data: Path, out: Path) -> Trainer:
    spec = json.loads(json.dumps(run_spec(cfg, experiment, 0)))
    ds = spec["dataset"]
    root = data / ds
    return Trainer(
        spec, root / "store", root / "split.parquet",
        root / "subsets" / f"{spec['subset']}.parquet", out,
    )  # fmt: skip


def measure(tr: Trainer, steps: int, evals: int) -> dict:
    """Medians of alternating blocks of training steps and evaluations (seconds)."""
    step_s, eval_s, parts = [], [], {p: [] for p in EVAL_PARTS}
    schedule = eval_steps(tr.tcfg.steps, tr.ecfg.every, tr.ecfg.early)
    tr.model.train()
    tr.train_step()  # warm-up (allocator, first-call overheads)
    t0 = time.perf_counter()
    tr.evaluate()  # the job's first evaluation (step 0: cold caches, the interpolation floor)
    first = time.perf_counter() - t0
    for r in range(evals):
        for _ in range(max(steps // evals, 1)):
            t0 = time.perf_counter()
            tr.model.train()
            tr.train_step()
            step_s.append(time.perf_counter() - t0)
            tr.step += 1
        tr.step = schedule[1 + r % (len(schedule) - 1)]  # an evaluation step (spectrum due)
        before = dict(tr.timer.seconds)
        t0 = time.perf_counter()
        tr.evaluate()
        eval_s.append(time.perf_counter() - t0)
        for p in EVAL_PARTS:
            key = f"eval_{p}"
            parts[p].append(tr.timer.get(key) - before.get(key, 0.0))
    return {
        "step": statistics.median(step_s),
        "eval": statistics.median(eval_s),
        "first": first,
        "parts": {p: statistics.median(v) for p, v in parts.items()},
    }


def profile(tr: Trainer, label: str, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    tr.model.train()
    tr.train_step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        tr.model.train()
        tr.train_step()
    print(f"--- {label}: one training step (CPU self time)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        tr.evaluate()
    print(f"--- {label}: one evaluation (CPU self time)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="config/config.yaml")
    p.add_argument("--data", default="results/data")
    p.add_argument("--experiments", nargs="*")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--evals", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--rows", type=int, default=25)
    a = p.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()  # as the training command (equipipe train) does
    cfg = load_config(Path(a.config))
    names = a.experiments or list(cfg["experiments"])
    print(f"{'experiment':16s} {'s/step':>7s} {'first':>7s} {'s/eval':>7s} {'evals':>5s} "
          f"{'steps':>5s} {'share':>6s}  " + " ".join(f"{q[:8]:>8s}" for q in EVAL_PARTS))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            tr = build(cfg, name, Path(a.data), Path(tmp) / name)
            if a.profile:
                profile(tr, name, a.rows)
                continue
            m = measure(tr, a.steps, a.evals)
            e = tr.ecfg
            n_evals = len(eval_steps(tr.tcfg.steps, e.every, e.early))
            train = tr.tcfg.steps * m["step"]
            outside = m["first"] + (n_evals - 1) * m["eval"]
            share = outside / (train + outside)
            print(f"{name:16s} {m['step']:7.3f} {m['first']:7.2f} {m['eval']:7.2f} {n_evals:5d} "
                  f"{tr.tcfg.steps:5d} {share:6.1%}  " + " ".join(f"{m['parts'][q]:8.2f}" for q in EVAL_PARTS),
                  flush=True)  # fmt: skip
    sys.stdout.flush()


if __name__ == "__main__":
    main()
