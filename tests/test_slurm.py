"""Workflows through Snakemake's SLURM executor plugin on a real one-node SLURM cluster.

Marked ``slurm`` (run by ``make test-all`` or ``pytest -m slurm``): the module starts the
cluster with ``tests/slurm_cluster.py`` (installing slurm-wlm and munge with apt-get when
missing, as root only; ``EQUIPIPE_SLURM_INSTALL=0`` forbids that) and skips, saying why, where
it cannot run. Jobs go through ``config/profiles/slurm-test``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import ClusterUnavailable, one_node_cluster

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "config" / "profiles" / "slurm-test"
SNAKEFILE = ROOT / "workflow" / "Snakefile"
TINY = ROOT / "tests" / "fixtures" / "tiny_config.yaml"
VENV_BIN = Path(sys.executable).parent

# a and b are submitted together (SLURM runs them one after the other on the 2-CPU node, no
# Snakemake status-poll wait between them); c is a local rule joining them on the submit host.
TOY = textwrap.dedent(
    """
    rule all:
        input:
            "c.txt",


    rule a:
        output:
            "a.txt",
        resources:
            mem_mb=200,
            runtime=2,
        shell:
            "echo job=$SLURM_JOB_ID cpus=$SLURM_CPUS_PER_TASK > {output}"


    rule b:
        output:
            "b.txt",
        threads: 2
        shell:
            "echo job=$SLURM_JOB_ID cpus=$SLURM_CPUS_PER_TASK > {output}"


    rule c:
        input:
            "a.txt",
            "b.txt",
        output:
            "c.txt",
        localrule: True
        shell:
            "cat {input} > {output}; echo local=${{SLURM_JOB_ID:-none}} >> {output}"
    """
)


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    allow = os.environ.get("EQUIPIPE_SLURM_INSTALL", "1") != "0"
    cluster = one_node_cluster(tmp_path_factory.mktemp("slurmcluster"), allow_install=allow)
    try:
        env = cluster.__enter__()
    except ClusterUnavailable as e:
        pytest.skip(f"no SLURM cluster here: {e}")
    env = {**env, "PATH": f"{VENV_BIN}:{env.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    env.pop("SLURM_JOB_ID", None)
    yield env
    cluster.__exit__(None, None, None)


def snakemake(args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[str, float]:
    """Run snakemake with the slurm-test profile; fail with its log on a non-zero exit."""
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "snakemake", "--profile", str(PROFILE), *args]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    took = time.monotonic() - t0
    log = r.stdout + r.stderr
    logs = sorted((cwd / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert r.returncode == 0, log[-6000:] + "".join(p.read_text()[-1500:] for p in logs[-3:])
    return log, took


def test_toy_workflow_runs_through_slurm(slurm_env, tmp_path):
    (tmp_path / "Snakefile").write_text(TOY)
    log, took = snakemake(["--snakefile", "Snakefile"], tmp_path, slurm_env, timeout=180)
    a = (tmp_path / "a.txt").read_text().split()
    b = (tmp_path / "b.txt").read_text().split()
    c = (tmp_path / "c.txt").read_text().split()
    assert a[0] != "job=" and b[0] != "job=", "rules a and b did not run inside SLURM jobs"
    assert a[0] != b[0], "rules a and b did not get a SLURM job each"
    assert a[1] == "cpus=1" and b[1] == "cpus=2", "threads did not become --cpus-per-task"
    assert c[-1] == "local=none", "the local rule ran inside a SLURM job"
    print(f"toy workflow through SLURM: {took:.1f} s")


def tiny_workdir(tmp_path: Path) -> Path:
    """A work folder holding the integrator's tiny end-to-end config (tests/test_workflow.py)."""
    shutil.copy(TINY, tmp_path / "config.yaml")
    return tmp_path


def workflow_args(wd: Path, *targets: str) -> list[str]:
    return [*targets, "--snakefile", str(SNAKEFILE), "--configfile", str(wd / "config.yaml")]


def test_equipipe_dataset_part_runs_through_slurm(slurm_env, tmp_path):
    """build_embedded_spice -> preprocess -> split -> 2 subsets, each as a SLURM job."""
    wd = tiny_workdir(tmp_path)
    targets = [f"results/data/spice/subsets/{s}.parquet" for s in ("all", "c4")]
    log, took = snakemake(workflow_args(wd, *targets), wd, slurm_env, timeout=600)
    assert all((wd / t).exists() for t in targets)
    submitted = log.count("has been submitted with SLURM jobid")
    assert submitted == 5, log[-4000:]
    print(f"equipipe dataset part through SLURM: {took:.1f} s, {submitted} SLURM jobs")


@pytest.mark.slow
def test_equipipe_tiny_workflow_runs_through_slurm(slurm_env, tmp_path):
    """The whole tiny workflow (data, 3 training runs, collect, figures) through SLURM."""
    wd = tiny_workdir(tmp_path)
    log, took = snakemake(workflow_args(wd), wd, slurm_env, timeout=1200)
    for exp, seeds in (("ff_default", (0, 1)), ("ff_c4", (0,))):
        for seed in seeds:
            info = json.loads((wd / f"results/runs/{exp}/seed{seed}/run.json").read_text())
            assert info["steps"] == 12
    assert (wd / "results/metrics_all.parquet").is_file()
    assert (wd / "results/figures/pct.png").is_file()
    submitted = log.count("has been submitted with SLURM jobid")
    print(f"equipipe tiny workflow through SLURM: {took:.1f} s, {submitted} SLURM jobs")
