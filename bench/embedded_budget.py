"""Per training job of a finished run folder: training vs evaluation seconds and their shares.

Reads ``<results>/runs/*/seed*/run.json`` (written by ``equipipe train``: ``train_seconds``,
``eval_seconds`` with its parts, ``io_seconds``, ``setup_seconds``, ``startup_seconds``,
``wall_seconds``). The job's wall time is Snakemake's benchmark (``benchmarks/train/<exp>/
seed<s>.tsv``, column ``s``) when present, else run.json's ``wall_seconds``. ``outside`` is the
share of the job's wall time spent outside training steps (the issue's target: <= 35 %).

    python bench/embedded_budget.py [--results results] [--benchmarks benchmarks]

Last line: ``max_outside_share=<x> job_seconds=<sum> train_seconds=<sum>``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from equipipe.timing import EVAL_PARTS


def job_rows(results: Path, benchmarks: Path | None) -> list[dict]:
    """One dict per run.json: seconds by part, the job's wall time and the share outside training."""
    rows = []
    for info_path in sorted(results.glob("runs/*/seed*/run.json")):
        info = json.loads(info_path.read_text())
        exp, seed = info_path.parent.parent.name, info_path.parent.name
        if "eval_seconds" not in info:
            print(f"{info_path}: no eval_seconds (written before timing was recorded)",
                  file=sys.stderr)  # fmt: skip
            continue
        wall, source = float(info["wall_seconds"]), "run.json"
        bench = benchmarks / "train" / exp / f"{seed}.tsv" if benchmarks else None
        if bench is not None and bench.exists():
            with bench.open() as f:
                wall, source = float(next(csv.DictReader(f, delimiter="\t"))["s"]), "benchmark"
        ev = info["eval_seconds"]
        train = float(info["train_seconds"])
        rows.append({
            "job": f"{exp}/{seed}", "wall": wall, "wall_from": source, "train": train,
            "eval": float(ev["total"]), "parts": {p: float(ev.get(p, 0.0)) for p in EVAL_PARTS},
            "evaluations": info.get("evaluations"), "io": float(info["io_seconds"]),
            "setup": float(info["setup_seconds"]), "startup": float(info["startup_seconds"]),
            "outside": 1.0 - train / wall if wall > 0 else float("nan"),
        })  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    """Plain-text table: seconds, then each part's share of the job's wall time."""
    parts = [p[:8] for p in EVAL_PARTS]
    head = (f"{'job':24s} {'wall s':>7s} {'train s':>7s} {'eval s':>7s} {'n':>3s} {'outside':>7s} "
            f"| {'train':>6s} {'eval':>6s} " + " ".join(f"{p:>8s}" for p in parts)
            + f" {'io':>6s} {'setup':>6s} {'startup':>7s} {'other':>6s}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        w = r["wall"] or float("nan")
        other = w - r["train"] - r["eval"] - r["io"] - r["setup"] - r["startup"]
        lines.append(
            f"{r['job']:24s} {r['wall']:7.1f} {r['train']:7.1f} {r['eval']:7.1f} "
            f"{r['evaluations'] or 0:3d} {r['outside']:7.1%} | {r['train'] / w:6.1%} "
            f"{r['eval'] / w:6.1%} " + " ".join(f"{r['parts'][p] / w:8.1%}" for p in EVAL_PARTS)
            + f" {r['io'] / w:6.1%} {r['setup'] / w:6.1%} {r['startup'] / w:7.1%} {other / w:6.1%}"
        )  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default="results", type=Path)
    p.add_argument("--benchmarks", default="benchmarks", type=Path)
    a = p.parse_args()
    rows = job_rows(a.results, a.benchmarks)
    if not rows:
        raise SystemExit(f"no run.json with timing under {a.results}/runs")
    print(table(rows))
    print(
        f"max_outside_share={max(r['outside'] for r in rows):.3f} "
        f"job_seconds={sum(r['wall'] for r in rows):.1f} "
        f"train_seconds={sum(r['train'] for r in rows):.1f}"
    )


if __name__ == "__main__":
    main()
