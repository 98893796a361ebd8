"""How long planning the paper grid takes (DESIGN.md: `snakemake -n` of config/paper.yaml < 5 s).

Prints wall and CPU seconds of the dry run (CPU time is the machine-independent part: wall
time on a shared machine includes waiting for a core). Last line: plan_seconds=<wall>.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def plan(configfile: str = "config/paper.yaml") -> tuple[float, float, str]:
    """(wall seconds, CPU seconds, output) of one offline dry run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(
        [str(Path(sys.executable).parent / "snakemake"), "-n", "--quiet", "rules", "--configfile", configfile],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, out.stdout + out.stderr


if __name__ == "__main__":
    wall, cpu, text = plan(sys.argv[1] if len(sys.argv) > 1 else "config/paper.yaml")
    jobs = [line for line in text.splitlines() if line.startswith(("train ", "total "))]
    print("\n".join(jobs[:2]))
    print(f"dry-run wall {wall:.2f} s, CPU {cpu:.2f} s (target < 5 s)")
    print(f"plan_seconds={wall:.2f}")
