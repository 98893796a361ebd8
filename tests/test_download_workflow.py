"""Downloads survive failed Snakemake jobs: real runs in a temp dir against a loopback server.

Snakemake deletes the declared output of a failed job. The download steps keep partial and
finished files in an undeclared cache, so Snakemake's own retry of the job resumes the cut
file with a Range request and fetches no finished structure twice.
"""

from __future__ import annotations

import polars as pl
import yaml

from tests.httpserver import Fault
from tests.test_pdb import _serve
from tests.test_workflow import TINY, snakemake


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
