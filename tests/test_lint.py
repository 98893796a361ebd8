"""The repository's own style gates: ruff, snakefmt, snakemake --lint and mypy are clean.

mypy checks the typed core named in pyproject.toml's ``[tool.mypy] files`` (the maths, the task
protocol and its tasks, the training loop); with a cold cache it takes about 25 s of CPU.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "cmd",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["snakefmt", "--check", "workflow", "rules"],
        ["snakemake", "--lint"],
        ["mypy"],
    ],
    ids=["ruff-check", "ruff-format", "snakefmt", "snakemake-lint", "mypy"],
)
def test_clean(cmd):
    out = subprocess.run(
        [str(BIN / cmd[0]), *cmd[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
