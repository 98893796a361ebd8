"""bench/gpu_check.py runs on the CPU in --quick mode (so it will not crash on a lent GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"


def test_absent_packages_are_blocked():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    with pytest.raises(ModuleNotFoundError, match="absent on the GPU machine"):
        gpu_check._Absent().find_spec("polars.io")
    assert gpu_check._Absent().find_spec("numpy") is None


def test_quick_cpu_run_prints_one_clean_table():
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu"],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "equipipe gpu_check" in out, out
    table = out[out.index("equipipe gpu_check") :]
    assert "ERROR" not in table and "skipped: time" not in table, table + r.stderr[-3000:]
    for check in ("imports", "matmul peak", "train eager", "eval overhead", "train compiled"):
        assert check in table, table
    for model in ("escaip tiny", "proteina tiny", "voxmol tiny"):
        assert table.count(model) == 3, table  # eager, eval overhead, compiled
    assert "13/13 modules ok" in table


@pytest.mark.slow  # ~45 s: four models built and timed in a subprocess
def test_kernels_c_measures_c_with_both_kernels_on_the_cpu():
    """bench/kernels_c.py (run by gpu_check.sh): c per tensor-product kernel; on the CPU the
    cuequivariance row runs its PyTorch fallback and says so."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    cmd = [sys.executable, str(ROOT / "bench" / "kernels_c.py"), "--device", "cpu", "--size", "tiny",
           "--molecules", "2", "--atoms", "8", "--warmup", "1", "--steps", "1"]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    rows = json.loads(r.stdout.strip().splitlines()[-1].removeprefix("kernels_c="))
    got = {(row["model"], row["kernel"]): row for row in rows}
    assert set(got) == {("escaip", "-"), ("equivariant", "e3nn"),
                        ("equivariant", "cuequivariance"), ("nequip", "e3nn")}  # fmt: skip
    assert all(row.get("sec_per_step", 0) > 0 and "error" not in row for row in rows), rows
    assert got[("equivariant", "cuequivariance")]["cuequivariance"] == "fallback"
    assert got[("escaip", "-")]["c"] == 1.0
