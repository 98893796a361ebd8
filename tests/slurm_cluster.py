"""Start and stop a real one-node SLURM cluster for the tests (see ../shared/SLURM-TEST.md).

``one_node_cluster(folder)`` is a context manager that yields the environment (``SLURM_CONF``)
under which ``sbatch``/``squeue``/``sinfo`` and Snakemake's SLURM executor reach the cluster.
It uses Debian's ``slurm-wlm`` and ``munge``; when they are missing it installs them with
apt-get, but only as root and only when allowed (``allow_install=True``, which the slurm-marked
tests pass unless ``EQUIPIPE_SLURM_INSTALL=0``). Everything the cluster writes (spool, state,
logs, pid files) lives in ``folder``; the daemons run in the foreground as children of this
process, on free ports, and are stopped by process id when the block ends. A munged that is
already running is reused and left alone. The config must ALSO be at ``/etc/slurm/slurm.conf``:
inside a job the SLURM executor's job step drops every ``SLURM_*`` variable but a few (so
``SLURM_CONF`` too) before its nested ``srun``, which then finds no configuration. A file that
was there is kept aside and put back afterwards, and a lock file serialises test sessions on
one machine. ``python tests/slurm_cluster.py`` starts a
cluster, prints ``sinfo`` and stops it (a quick manual check).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("slurmctld", "slurmd", "munged")
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
LOCK = Path("/run/lock/equipipe-slurm-test.lock")


class ClusterUnavailable(RuntimeError):
    """The cluster cannot run here; the message says exactly why (tests skip with it)."""


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def missing_programs() -> list[str]:
    return [d for d in (*DAEMONS, "sbatch", "squeue", "sinfo", "munge", "unmunge") if not _which(d)]


def ensure_installed(allow_install: bool) -> None:
    """Install slurm-wlm and munge with apt-get when missing (root and allowed only)."""
    if not missing_programs():
        return
    if not allow_install:
        raise ClusterUnavailable(
            f"SLURM/munge programs missing ({', '.join(missing_programs())}) and installing is "
            "disabled (EQUIPIPE_SLURM_INSTALL=0)"
        )
    if os.geteuid() != 0:
        raise ClusterUnavailable(
            f"SLURM/munge programs missing ({', '.join(missing_programs())}); installing them "
            f"needs root: apt-get install -y {' '.join(PACKAGES)}"
        )
    if not _which("apt-get"):
        raise ClusterUnavailable("SLURM/munge missing and apt-get is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(cmd)} failed: {r.stderr.strip()[-500:]}")
    if missing_programs():
        raise ClusterUnavailable(f"still missing after apt-get: {', '.join(missing_programs())}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(int(line.split()[1]) / 1024 * 0.8)
    return 4000


def _munge_works() -> bool:
    try:
        enc = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if enc.returncode != 0:
            return False
        dec = subprocess.run(["unmunge"], input=enc.stdout, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return b"STATUS:" in dec.stdout and b"Success" in dec.stdout


def _wait(
    what: str, ok, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.2)
    tail = log.read_text()[-1500:] if log is not None and log.exists() else ""
    status = (
        f" (exited with {proc.returncode})" if proc is not None and proc.poll() is not None else ""
    )
    raise ClusterUnavailable(f"{what} did not come up within {timeout:.0f} s{status}\n{tail}")


def write_conf(folder: Path, node: str) -> Path:
    """A minimal slurm.conf (SLURM-TEST.md) with every path inside ``folder`` and free ports."""
    for sub in ("state", "spool", "log", "run"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count() or 1
    conf = folder / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=equipipetest",
                f"SlurmctldHost={node}(127.0.0.1)",
                f"SlurmctldPort={_free_port()}",
                f"SlurmdPort={_free_port()}",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "SlurmUser=root",
                "SlurmdUser=root",
                f"StateSaveLocation={folder / 'state'}",
                f"SlurmdSpoolDir={folder / 'spool'}",
                f"SlurmctldLogFile={folder / 'log' / 'slurmctld.log'}",
                f"SlurmdLogFile={folder / 'log' / 'slurmd.log'}",
                f"SlurmctldPidFile={folder / 'run' / 'slurmctld.pid'}",
                f"SlurmdPidFile={folder / 'run' / 'slurmd.pid'}",
                "AccountingStorageType=accounting_storage/none",
                "JobAcctGatherType=jobacct_gather/none",
                "ReturnToService=2",
                "MinJobAge=300",
                "SchedulerParameters=sched_interval=1",
                f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={_mem_mb()} State=UNKNOWN",
                "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    return conf


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _start_munged(folder: Path) -> subprocess.Popen:
    MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
    shutil.chown(MUNGE_SOCKET.parent, "munge", "munge")
    MUNGE_SOCKET.parent.chmod(0o755)
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, timeout=30)
    shutil.chown(key, "munge", "munge")
    key.chmod(0o600)
    log = folder / "log" / "munged.log"
    log.touch()
    shutil.chown(log, "munge", "munge")
    proc = subprocess.Popen(
        [_which("munged"), "--foreground", f"--log-file={log}", "--force"],
        user="munge",
        group="munge",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    _wait("munged", _munge_works, 20, proc, log)
    return proc


def _node_idle(env: dict[str, str]) -> bool:
    try:
        r = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0 and r.stdout.strip().startswith("idle")


@contextlib.contextmanager
def _system_conf(conf: Path, folder: Path, lock_timeout: float) -> Iterator[None]:
    """Hold the machine-wide lock and put ``conf`` at /etc/slurm/slurm.conf for the block."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "a") as lock:
        deadline = time.monotonic() + lock_timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ClusterUnavailable(
                        f"another test session holds {LOCK} (its cluster is running)"
                    ) from None
                time.sleep(1)
        saved = folder / "slurm.conf.saved"
        had = SYSTEM_CONF.exists()
        SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
        if had:
            shutil.copy2(SYSTEM_CONF, saved)
        shutil.copyfile(conf, SYSTEM_CONF)
        try:
            yield
        finally:
            if had:
                shutil.copy2(saved, SYSTEM_CONF)
            else:
                SYSTEM_CONF.unlink(missing_ok=True)


@contextlib.contextmanager
def one_node_cluster(
    folder: Path, allow_install: bool = True, timeout: float = 60.0, lock_timeout: float = 600.0
) -> Iterator[dict[str, str]]:
    """Run slurmctld + slurmd (+ munged if none is running) for the block; yield the env."""
    ensure_installed(allow_install)
    if os.geteuid() != 0:
        raise ClusterUnavailable("starting slurmctld/slurmd with SlurmUser=root needs root")
    folder = Path(folder).resolve()
    node = socket.gethostname().split(".")[0] or "localhost"
    conf = write_conf(folder, node)
    env = {**os.environ, "SLURM_CONF": str(SYSTEM_CONF)}
    with _system_conf(conf, folder, lock_timeout), _daemons(folder, conf, node, env, timeout):
        yield env


@contextlib.contextmanager
def _daemons(
    folder: Path, conf: Path, node: str, env: dict[str, str], timeout: float
) -> Iterator[None]:
    started: list[subprocess.Popen] = []
    try:
        if not _munge_works():
            started.append(_start_munged(folder))
        ctld_log = folder / "log" / "slurmctld.log"
        ctld = subprocess.Popen(
            [_which("slurmctld"), "-D", "-i", "-f", str(conf)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        started.append(ctld)

        def ping() -> bool:
            r = subprocess.run(
                ["scontrol", "ping"], env=env, capture_output=True, text=True, timeout=10
            )
            return "UP" in r.stdout

        _wait("slurmctld", ping, timeout, ctld, ctld_log)
        slurmd = subprocess.Popen(
            [_which("slurmd"), "-D", "-N", node, "-f", str(conf)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        started.append(slurmd)
        _wait(
            "slurmd (node idle in sinfo)",
            lambda: _node_idle(env),
            timeout,
            slurmd,
            folder / "log" / "slurmd.log",
        )
        yield
    finally:
        # Cancel anything still queued, then stop the daemons we started, newest first.
        if started and started[-1].poll() is None:
            subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True, timeout=20)
        for proc in reversed(started):
            _stop(proc)


if __name__ == "__main__":
    import sys
    import tempfile

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="equipipe-slurm-") as tmp:
        try:
            with one_node_cluster(Path(tmp)) as env:
                print(
                    f"cluster up in {time.monotonic() - t0:.1f} s, SLURM_CONF={env['SLURM_CONF']}"
                )
                subprocess.run(["sinfo"], env=env, check=False)
        except ClusterUnavailable as e:
            sys.exit(f"unavailable: {e}")
    print(f"stopped; {time.monotonic() - t0:.1f} s in all")
