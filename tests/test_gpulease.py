"""GPU leasing with lock files (equipipe.gpulease), with fake slots (EQUIPIPE_GPU_SLOTS)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from equipipe import gpulease

ROOT = Path(__file__).resolve().parent.parent
HOLD_S = 0.5
# A waiting job polls every 50 ms; allow for process scheduling on a loaded 2-core machine.
TOL_S = 0.35

JOB = """
import json, os, sys, time
from pathlib import Path
from equipipe.gpulease import lease_gpu
hold = float(sys.argv[2])
t_request = time.monotonic()
with lease_gpu("auto", Path(sys.argv[1])) as leased:
    t_start = time.monotonic()
    print("held", os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
    time.sleep(hold)
    t_end = time.monotonic()  # still inside the lease
t_released = time.monotonic()
print(json.dumps({"pid": os.getpid(), "leased": leased,
                  "request": t_request, "start": t_start, "end": t_end,
                  "released": t_released}), flush=True)
"""


def job_env(slots: int) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "LOCAL_RANK")
    }
    env.update(EQUIPIPE_GPU_SLOTS=str(slots), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


def start_job(lock_dir: Path, slots: int, hold: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", JOB, str(lock_dir), str(hold)],
        env=job_env(slots), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_eight_jobs_two_slots_no_overlap_no_idle_wait(tmp_path):
    slots, n_jobs = 2, 8
    procs = [start_job(tmp_path, slots, HOLD_S) for _ in range(n_jobs)]
    recs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        lines = out.strip().splitlines()
        rec = json.loads(lines[-1])
        rec["cvd"] = lines[0].split()[1]
        recs.append(rec)
    # Every job got one slot and CUDA_VISIBLE_DEVICES names exactly it.
    for r in recs:
        assert len(r["leased"]) == 1 and r["cvd"] == r["leased"][0] in {"0", "1"}
    # Never two jobs on one slot at overlapping times ([start, end] lies inside the lock).
    for slot in ("0", "1"):
        spans = sorted((r["start"], r["end"]) for r in recs if r["leased"] == [slot])
        for (_, e1), (s2, _) in zip(spans, spans[1:]):
            assert s2 > e1, f"slot {slot} held twice at once: {spans}"
    # No job waits while a slot is free: on a 5 ms grid, whenever some job is waiting, every
    # slot is held (within TOL_S of a holder's start/release).
    t0 = min(r["request"] for r in recs)
    t1 = max(r["released"] for r in recs)
    idle_wait, t = 0.0, t0
    worst = 0.0
    while t < t1:
        waiting = any(r["request"] < t < r["start"] for r in recs)
        busy = {r["leased"][0] for r in recs if r["start"] <= t <= r["released"]}
        if waiting and len(busy) < slots:
            idle_wait += 0.005
            worst = max(worst, idle_wait)
        else:
            idle_wait = 0.0
        t += 0.005
    assert worst < TOL_S, f"a job waited {worst:.3f} s while a slot was free"
    # 8 jobs of 0.5 s on 2 slots take at least 4 rounds.
    assert t1 - min(r["start"] for r in recs) >= 4 * HOLD_S - 0.01
    print(f"longest wait while a slot was free: {worst * 1000:.0f} ms")


def test_sigkilled_holder_releases_its_slot(tmp_path):
    holder = start_job(tmp_path, 1, 60)
    assert holder.stdout.readline().startswith("held")
    waiter = start_job(tmp_path, 1, 0.0)
    time.sleep(0.5)
    assert waiter.poll() is None, "the waiter got the slot while it was held"
    os.kill(holder.pid, signal.SIGKILL)
    t_kill = time.monotonic()
    holder.wait(10)
    out, err = waiter.communicate(timeout=20)
    assert waiter.returncode == 0, err
    rec = json.loads(out.strip().splitlines()[-1])
    assert rec["leased"] == ["0"]
    assert rec["start"] - t_kill < 2.0


def test_multi_gpu_lease_is_all_or_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("EQUIPIPE_GPU_SLOTS", "3")
    for var in ("SLURM_JOB_ID", "LOCAL_RANK", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    with gpulease.lease_gpu("auto", tmp_path, count=2) as leased:
        assert leased == ["0", "1"] and os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
        # One GPU is left: a 1-GPU lease gets it, a second 2-GPU lease must not take it.
        with gpulease.gpu_slots(tmp_path, ["0", "1", "2"], 1) as one:
            assert one == ["2"]
        again = gpulease._try_lock(tmp_path / "gpu2.lock")  # released again
        assert again is not None
        again.close()
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    with pytest.raises(ValueError, match="asks for 4 GPU"):
        with gpulease.lease_gpu("auto", tmp_path, count=4):
            pass


def test_user_visible_devices_are_the_candidates(tmp_path, monkeypatch):
    monkeypatch.delenv("EQUIPIPE_GPU_SLOTS", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with gpulease.lease_gpu("auto", tmp_path) as leased:
        assert leased == ["2"] and os.environ["CUDA_VISIBLE_DEVICES"] == "2"
        assert (tmp_path / "gpu2.lock").read_text().strip() == str(os.getpid())
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"


@pytest.mark.parametrize("var", ["SLURM_JOB_ID", "LOCAL_RANK"])
def test_no_lease_under_slurm_or_torchrun_worker(tmp_path, monkeypatch, var):
    monkeypatch.setenv("EQUIPIPE_GPU_SLOTS", "1")
    monkeypatch.setenv(var, "0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    with gpulease.lease_gpu("auto", tmp_path) as leased:
        assert leased is None and os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    assert not list(tmp_path.iterdir())


def test_no_lease_for_cpu_or_without_lock_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EQUIPIPE_GPU_SLOTS", "1")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with gpulease.lease_gpu("cpu", tmp_path) as a, gpulease.lease_gpu("auto", None) as b:
        assert a is None and b is None


def test_lease_survives_exec(tmp_path):
    """A job that leases and then execs (as into torchrun) keeps the lock until it exits."""
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from equipipe.gpulease import lease_gpu\n"
        "with lease_gpu('auto', Path(sys.argv[1])):\n"
        "    os.execv('/bin/sh', ['sh', '-c', 'echo exec; sleep 30'])\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=job_env(1),
                         stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        assert p.stdout.readline().strip() == "exec"
        assert gpulease._try_lock(tmp_path / "gpu0.lock") is None, "lease lost across exec"
    finally:
        # the whole group: `sleep` inherits the lock descriptor and would outlive a killed `sh`
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)
    # `sleep` (not our child) may still be exiting under load: the kernel frees its lock then
    deadline = time.monotonic() + 10
    while (f := gpulease._try_lock(tmp_path / "gpu0.lock")) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f is not None
    f.close()
