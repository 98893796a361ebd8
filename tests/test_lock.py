"""The locked environment agrees with pyproject.toml, the Makefile and the conda env files."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from equipipe.lockfile import read_lock

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "lock" / "requirements.txt"
NODEPS = ROOT / "lock" / "nodeps.txt"


def direct_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def test_every_direct_dependency_is_locked_at_its_pin():
    lock = read_lock(LOCK)
    problems = []
    for req in direct_requirements():
        name = canonicalize_name(req.name)
        if name not in lock:
            problems.append(f"{req} is not in {LOCK.name}")
            continue
        version = Version(lock[name].version)
        pins = [s.version for s in req.specifier if s.operator == "=="]
        if pins and Version(pins[0]).public != version.public:
            problems.append(f"{req}: lock has {version}")
        elif not req.specifier.contains(version.public, prereleases=True):
            problems.append(f"{req}: lock has {version}, outside the range")
    assert not problems, "run `make lock`:\n" + "\n".join(problems)


def test_every_locked_package_is_pinned_with_hashes_and_torch_is_the_cpu_build():
    for path in (LOCK, NODEPS):
        lock = read_lock(path)
        assert lock, path
        unhashed = [e.name for e in lock.values() if not e.hashes]
        assert not unhashed, f"{path.name}: no hash for {unhashed}"
    lock = read_lock(LOCK)
    assert Version(lock["torch"].version).local == "cpu"
    cuda = [n for n in lock if n.startswith("nvidia-") or n in ("triton", "cuda-toolkit")]
    assert not cuda, f"the lock pulls CUDA packages: {cuda}"
    constraint = (ROOT / "lock" / "constraints.txt").read_text()
    assert f"torch=={lock['torch'].version}" in constraint


def test_nodeps_lock_matches_its_input_and_the_makefile_installs_both_locks():
    wanted = [
        Requirement(line.split("#")[0].strip())
        for line in (ROOT / "lock" / "nodeps.in").read_text().splitlines()
        if line.split("#")[0].strip()
    ]
    lock = read_lock(NODEPS)
    assert {canonicalize_name(r.name) for r in wanted} == set(lock)
    for r in wanted:
        assert r.specifier.contains(lock[canonicalize_name(r.name)].version)
    make = (ROOT / "Makefile").read_text()
    recipe = make.split("$(VENV)/.installed:")[1].split("\n\n")[0]
    assert "--require-hashes $(PIP_TORCH) -r $(LOCK)" in recipe
    assert "--require-hashes --no-deps -r $(LOCK_NODEPS)" in recipe
    assert "LOCK := lock/requirements.txt" in make and "LOCK_NODEPS := lock/nodeps.txt" in make
    uv = re.search(r"^UV_VERSION := (\S+)$", make, re.M).group(1)
    assert read_lock(LOCK)["uv"].version == uv


def test_conda_env_files_name_the_locked_versions():
    lock = read_lock(LOCK)
    envs = sorted((ROOT / "envs").glob("*.yaml"))
    assert envs
    for path in envs:
        deps = yaml.safe_load(path.read_text())["dependencies"]
        pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
        pins = [Requirement(p) for p in pip if not p.startswith(("-", "."))]
        assert any(canonicalize_name(r.name) == "torch" for r in pins), path
        for r in pins:
            name = canonicalize_name(r.name)
            assert name in lock, f"{path.name}: {r} is not in the lock"
            assert str(r.specifier) == f"=={lock[name].version}", (
                f"{path.name}: {r} but the lock has {lock[name].version}"
            )
