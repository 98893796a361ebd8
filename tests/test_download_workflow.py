"""Downloads survive failed Snakemake jobs: real runs in a temp dir against a loopback server.

Snakemake deletes the declared output of a failed job. The download steps keep partial and
finished files in an undeclared cache, so Snakemake's own retry of the job resumes the cut
file with a Range request and fetches no finished structure twice.
"""

from __future__ import annotations

import hashlib
import json

import polars as pl
import yaml

from equipipe.data import spice
from tests.httpserver import Fault
from tests.test_pdb import _serve
from tests.test_workflow import ROOT, TINY, snakemake


def _structure_requests(server) -> dict[str, list[str | None]]:
    out: dict[str, list[str | None]] = {}
    for r in server.requests:
        if r.path.startswith("/download/"):
            out.setdefault(r.path.rsplit("/", 1)[-1], []).append(r.headers.get("Range"))
    return out


def test_pdb_download_job_killed_mid_file_resumes_on_snakemake_retry(http_server, tmp_path):
    # The connection drops after 5000 bytes of 5pti, once. One attempt per file inside the job
    # and no failure allowed: the job fails, Snakemake deletes resources/pdb/remote and runs
    # the job again (rule download_pdb has `retries: 2`).
    bodies = _serve(http_server, **{"5pti": (Fault(drop_after=5000, times=1),)})
    cfg = yaml.safe_load(TINY.read_text())
    cfg["datasets"]["pdb"] = {
        "source": "remote",
        "download": {
            "base_url": http_server.base_url,
            "retries": 1,
            "backoff": 0,
            "concurrency": 2,
            "max_failed_downloads": 0,
        },
        "subsets": {"all": {"size": 1.0, "unit": "fraction"}},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = snakemake(tmp_path, "--cores", "1", "resources/pdb/remote")
    log = out.stdout + out.stderr
    assert "Error in rule download_pdb" in log  # the first attempt really failed

    reqs = _structure_requests(http_server)
    # The cut file: from byte 0 once, then resumed where it stopped; no restart from 0.
    assert reqs["5pti.cif.gz"] == [None, "bytes=5000-"]
    # Every finished structure was fetched exactly once, across both attempts.
    assert reqs["1bd2.cif.gz"] == [None] and reqs["3pwp.cif.gz"] == [None]
    raw = tmp_path / "resources" / "pdb" / "remote"
    for pid in ("1bd2", "3pwp", "5pti"):
        landed = raw / "mmCIF" / pid[1:3] / f"{pid}.cif.gz"
        assert landed.read_bytes() == bodies[pid]
        cached = tmp_path / "resources" / "pdb" / ".cache" / "remote" / "mmCIF" / pid[1:3]
        assert landed.stat().st_ino == (cached / f"{pid}.cif.gz").stat().st_ino  # linked
    manifest = pl.read_parquet(raw / "manifest.parquet")
    assert manifest["error"].null_count() == manifest.height == 3


def test_spice_download_job_failed_mid_file_resumes_with_range_on_rerun(http_server, tmp_path):
    # MACE-OFF23 through the workflow, with the miniature's frame counts set in the config's
    # download.expected block. The connection drops after 300 bytes on each of the job's three
    # attempts; the job fails; Snakemake's retry continues from byte 900, not from 0.
    xyz = (ROOT / "tests" / "fixtures" / "spice" / "maceoff_small.xyz").read_bytes()
    files = spice.SOURCES["maceoff23"]["files"]
    train, test = list(files)
    for name in files:
        faults = (Fault(drop_after=300, times=3),) if name == train else ()
        http_server.add(f"/bitstreams/{files[name]['bitstream']}/download", xyz, *faults)
    cfg = yaml.safe_load(TINY.read_text())
    cfg["datasets"]["spice"]["source"] = "maceoff23"
    cfg["datasets"]["spice"]["download"] = {
        "apollo_base": http_server.url("/bitstreams"),
        "expected": {train: {"frames": 4}, test: {"frames": 4}},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = snakemake(tmp_path, "--cores", "1", "resources/spice/maceoff23")
    assert "Error in rule download_spice" in out.stdout + out.stderr
    path = f"/bitstreams/{files[train]['bitstream']}/download"
    ranges = [r.headers.get("Range") for r in http_server.requests_for(path)]
    assert ranges == [None, "bytes=300-", "bytes=600-", "bytes=900-"]
    raw = tmp_path / "resources" / "spice" / "maceoff23"
    assert (raw / train).read_bytes() == xyz
    landed = json.loads((raw / "download.json").read_text())["files"][train]
    assert landed["frames"] == 4 and landed["expected_from"] == {"frames": "download.expected"}
    assert landed["sha256"] == hashlib.sha256(xyz).hexdigest()
