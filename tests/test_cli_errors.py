"""Errors a person can act on reach them as one line naming the file and what to do."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from equipipe.errors import DEBUG_ENV

BIN = Path(sys.executable).parent


def equipipe(*args: str, debug: bool = False, cwd: Path | None = None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(DEBUG_ENV, None)
    if debug:
        env[DEBUG_ENV] = "1"
    return subprocess.run(
        [str(BIN / "equipipe"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def error_line(p: subprocess.CompletedProcess, command: str) -> str:
    """The one error line; no traceback anywhere."""
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if "error" in ln.lower()]
    assert len(lines) == 1, p.stderr[-3000:]
    assert lines[0].startswith(f"equipipe {command}: error: ")
    return lines[0]


@pytest.fixture()
def corrupt_hdf5(tmp_path) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir()
    # the first 4 kB of a real HDF5 file would do as well; any non-HDF5 bytes are "corrupt"
    (raw / "SPICE-embedded-GFN2.hdf5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 8)
    return raw


def test_corrupt_file_is_one_line_naming_file_and_fix(corrupt_hdf5, tmp_path):
    p = equipipe("preprocess", "spice", "--raw", str(corrupt_hdf5), "--out", str(tmp_path / "s"),
                 "--cfg", json.dumps({"source": "embedded"}))  # fmt: skip
    line = error_line(p, "preprocess")
    assert (
        str(corrupt_hdf5 / "SPICE-embedded-GFN2.hdf5") in line
        and "download (or build) it again" in line
    )
    # the traceback on request: --debug or EQUIPIPE_DEBUG=1
    p = equipipe("--debug", "preprocess", "spice", "--raw", str(corrupt_hdf5), "--out",
                 str(tmp_path / "s"), "--cfg", json.dumps({"source": "embedded"}))  # fmt: skip
    assert p.returncode != 0 and "Traceback" in p.stderr and "CorruptFileError" in p.stderr


def test_untrusted_pickle_is_one_line_naming_archive_and_fix(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    with tarfile.open(raw / "rdkit_folder.tar.gz", "w:gz") as tar:
        body = b"{}"
        info = tarfile.TarInfo("rdkit_folder/summary_drugs.json")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    p = equipipe("preprocess", "geom", "--raw", str(raw), "--out", str(tmp_path / "s"))
    line = error_line(p, "preprocess")
    assert str(raw / "rdkit_folder.tar.gz") in line
    assert "pin rdkit_folder_md5" in line and "allow_unverified_pickles" in line
    p = equipipe("preprocess", "geom", "--raw", str(raw), "--out", str(tmp_path / "s"), debug=True)
    assert "Traceback" in p.stderr and "UntrustedPickleError" in p.stderr


def test_download_error_is_one_line_naming_address_and_fix(http_server, tmp_path):
    api = http_server.url("/api")  # the record is not there: HTTP 404
    p = equipipe("download", "spice", "--source", "spice-2.0.1", "--out", str(tmp_path / "d"),
                 "--cfg", json.dumps({"zenodo_api": api}))  # fmt: skip
    line = error_line(p, "download")
    assert api in line and "rerun the job" in line


@pytest.mark.parametrize("text", ["1e-3", "5e-4", "1.0e3"])
def test_number_yaml_reads_as_text_gets_the_spelling_that_works(tmp_path, text):
    root = Path(__file__).resolve().parent
    cfg = (root / "fixtures" / "tiny_config.yaml").read_text().replace("lr: 1.0e-3", f"lr: {text}")
    (tmp_path / "config.yaml").write_text(cfg)
    p = equipipe("validate-config", str(tmp_path / "config.yaml"))
    line = error_line(p, "validate-config")
    assert "tasks.forcefield.train.lr" in line and f"YAML reads {text} as text: write " in line
    spelled = line.split(": write ")[1].rstrip(")")
    assert yaml.safe_load(f"lr: {spelled}")["lr"] == float(text)  # the advice works
