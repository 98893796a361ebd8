"""``equipipe archive``: one .tar.gz that reruns the study elsewhere.

``snakemake --archive`` needs conda (it packs every conda environment's packages, downloaded),
so this bundle is built on ``git archive`` instead. It holds, under ``equipipe/``:

* the code and everything tracked by git (workflow, rules, config, ``lock/``, tests) at the
  current tree: ``git stash create`` captures uncommitted changes to tracked files, so the
  archive is what ran (``ARCHIVE.json`` records the commit, whether the tree was dirty and the
  tree archived; untracked files are not included and are listed there);
* ``config/archived.yaml``: the configuration that produced the results (``results/
  config_used.yaml``, validated, defaults filled);
* ``archived-results/``: ``provenance.json`` and ``paper_comparison.parquet`` where present
  (what a rerun is compared against with ``equipipe diff-reports``);
* ``RERUN.md``: how to rebuild the environment from the lock and rerun.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["DEFAULT_INCLUDE", "PREFIX", "write_archive"]

PREFIX = "equipipe"
DEFAULT_INCLUDE = (
    "results/config_used.yaml",
    "results/provenance.json",
    "results/paper_comparison.parquet",
)

RERUN = """\
# Rerunning this archive

Made by `equipipe archive` from commit {commit}{dirty} on {date}.

1. Environment (Linux x86_64, CPython 3.11): `make venv` installs `lock/requirements.txt`
   (every package pinned with hashes; torch is the CPU build 2.13.0+cpu, from `/opt/wheels` when
   that folder holds it, else from PyTorch's CPU wheel index) and `lock/nodeps.txt`, then this
   code (`pip install --no-deps -e .`). `lock/requirements.txt` has sha256 {lock_sha256}.
2. Check the plan without running anything:
   `snakemake -n --configfile config/archived.yaml`
3. Rerun: `snakemake --cores 2 --configfile config/archived.yaml` (the default configuration is
   `make run`), then `snakemake --configfile config/archived.yaml --report results/report.zip`.
4. Compare with the archived numbers:
   `equipipe diff-reports results archived-results` (this archive's `results/` is unpacked as
   `archived-results/`, so a rerun does not overwrite it), and with the study:
   `equipipe diff-reports results study`.

`ARCHIVE.json` records the commit, whether the tree had uncommitted changes and which untracked
files were left out; `archived-results/provenance.json` the machine, versions, seeds and data
checksums of the original run.
"""


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if out.returncode != 0:
        raise ValueError(f"git {' '.join(args)} failed in {repo}: {out.stderr.strip()}")
    return out.stdout.strip()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(f"{PREFIX}/{name}")
    info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
    tar.addfile(info, io.BytesIO(data))


def write_archive(out: Path, repo: Path, include: Sequence[Path] = ()) -> Path:
    """Write the archive to ``out`` (.tar.gz) from the git repository ``repo``; return ``out``.

    ``include``: result files to add (default ``DEFAULT_INCLUDE`` where present, relative to the
    current folder); ``results/config_used.yaml`` becomes ``config/archived.yaml``, the others go
    to ``archived-results/``. Raises ValueError when ``repo`` is not a git repository or the lock
    is not tracked.
    """
    repo, out = Path(repo).resolve(), Path(out)
    head = _git(repo, "rev-parse", "HEAD")
    stash = _git(repo, "stash", "create")  # a commit of the dirty tracked tree, or ""
    tree = stash or head
    tracked = _git(repo, "ls-tree", "-r", "--name-only", tree).splitlines()
    if "lock/requirements.txt" not in tracked:
        raise ValueError(f"lock/requirements.txt is not tracked in {repo}: run `make lock`, commit")
    untracked = _git(repo, "ls-files", "--others", "--exclude-standard").splitlines()
    files = [Path(f) for f in include] or [Path(f) for f in DEFAULT_INCLUDE if Path(f).is_file()]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"archive: {', '.join(missing)} not found")
    now = time.time()
    lock_bytes = subprocess.run(
        ["git", "show", f"{tree}:lock/requirements.txt"], cwd=repo, capture_output=True, check=True
    ).stdout
    meta = {
        "commit": head,
        "dirty": bool(stash),
        "tree": tree,
        "untracked_left_out": untracked,
        "lock_sha256": hashlib.sha256(lock_bytes).hexdigest(),
        "results": [f.name for f in files],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
    }
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "code.tar"
        _git(repo, "archive", "--format=tar", f"--prefix={PREFIX}/", "-o", str(raw), tree)
        with tarfile.open(raw, "a") as tar:
            _add_bytes(tar, "ARCHIVE.json", json.dumps(meta, indent=1).encode(), now)
            text = RERUN.format(
                commit=head,
                dirty=" (with uncommitted changes)" if stash else "",
                date=meta["created"],
                lock_sha256=meta["lock_sha256"],
            )
            _add_bytes(tar, "RERUN.md", text.encode(), now)
            for f in files:
                name = (
                    "config/archived.yaml"
                    if f.name == "config_used.yaml"
                    else f"archived-results/{f.name}"
                )
                _add_bytes(tar, name, f.read_bytes(), f.stat().st_mtime)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(raw, "rb") as src, gzip.GzipFile(out, "wb", mtime=int(now)) as dst:
            while block := src.read(1 << 20):
                dst.write(block)
    return out
