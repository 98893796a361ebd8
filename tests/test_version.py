"""One version string: ``equipipe.__version__``, read by pyproject, printed by the CLI, recorded."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from equipipe import __version__
from equipipe.provenance import environment_info

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_reads_the_package_version():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "equipipe.__version__"}
    assert importlib.metadata.version("equipipe") == __version__  # the installed metadata


def test_cli_version_and_provenance_record_it():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "equipipe.cli", "--version"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"equipipe {__version__}"
    assert environment_info(None)["equipipe"] == __version__
