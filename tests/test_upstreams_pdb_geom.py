"""Download steps of PDB and GEOM against the miniature upstreams (fast, no Snakemake).

Each test pins one defect the miniature upstreams exposed (the Snakemake-level runs are in
``tests/test_sources_pdb_geom.py``).
"""

from __future__ import annotations

import json
import socket

import polars as pl
import pytest

from equipipe.data import geom, pdb
from equipipe.data.download import DownloadError
from tests.httpserver import Fault
from tests.upstreams import wwpdb
from tests.upstreams.dataverse import Dataverse
from tests.upstreams.midi_mirror import MidiMirror

FAST = {"retries": 3, "backoff": 0.05, "timeout": 10, "min_length": 50, "max_length": 300}


def _nowhere() -> str:
    """A loopback URL where nothing listens (connection refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _protein_chains(pdb_release, lo=50, hi=300) -> set[str]:
    return {k for k, seq in pdb_release.chains.items() if lo < len(seq) < hi}


# --------------------------------------------------------------------------------------- PDB


@pytest.mark.parametrize("name", ["resolu.idx", "pdb_entry_type.txt", "pdb_seqres.txt.gz"])
def test_metadata_html_page_is_fetched_again_not_read_as_empty(
    http_server, tmp_path, pdb_release, name
):
    """Before: an HTML page served with 200 for resolu.idx gave an empty manifest, silently;
    for pdb_seqres.txt.gz it stayed at its destination and failed every later run."""
    up = wwpdb.Wwpdb(http_server, pdb_release)
    up.publish({name: (Fault(html_page=True),)})
    pdb.download("remote", tmp_path, {"base_url": up.base_url, **FAST})
    manifest = pl.read_parquet(tmp_path / pdb.MANIFEST)
    assert set(manifest["id"]) == _protein_chains(pdb_release)
    assert [r.status for r in http_server.requests_for(wwpdb.Wwpdb.META[name])] == [200, 200]


def test_metadata_that_never_parses_fails_naming_the_file(http_server, tmp_path, pdb_release):
    """An error text served as text/plain with 200 (not recognisable as HTML) is refused too."""
    up = wwpdb.Wwpdb(http_server, pdb_release)
    up.publish()
    page = b"Service temporarily unavailable. Please retry later.\n"
    http_server.add(wwpdb.Wwpdb.META["resolu.idx"], page, content_type="text/plain")
    with pytest.raises(DownloadError, match="holds no resolu.idx records"):
        pdb.download("remote", tmp_path, {"base_url": up.base_url, **FAST})
    assert not (tmp_path / "metadata" / "resolu.idx").exists()  # never left in place
    assert len(http_server.requests_for(wwpdb.Wwpdb.META["resolu.idx"])) == FAST["retries"]


def test_structure_served_as_html_page_is_fetched_again(http_server, tmp_path, pdb_release):
    """Before: the job failed (one of four structures 'failed', above max_failed_downloads)."""
    up = wwpdb.Wwpdb(http_server, pdb_release)
    up.publish({"1bd2": (Fault(html_page=True),), "3pwp": (Fault(status=429, headers={"Retry-After": "0"}),)})  # fmt: skip
    pdb.download("remote", tmp_path, {"base_url": up.base_url, **FAST})
    manifest = pl.read_parquet(tmp_path / pdb.MANIFEST)
    assert manifest["error"].is_null().all()
    assert len(http_server.requests_for("/download/1bd2.cif.gz")) == 2
    assert [r.status for r in http_server.requests_for("/download/3pwp.cif.gz")] == [429, 200]
    # the .gz metadata came with Content-Encoding: gzip and still verifies as the file itself
    (seqres,) = http_server.requests_for(wwpdb.Wwpdb.META["pdb_seqres.txt.gz"])
    assert seqres.status == 200


def test_local_metadata_and_mirror_need_no_server(tmp_path, pdb_release):
    """Before: the metadata was always fetched, so a mirror could not be used offline."""
    meta = wwpdb.write_metadata(pdb_release, tmp_path / "meta")
    mirror = wwpdb.write_mirror(pdb_release, tmp_path / "mirror")
    out = tmp_path / "raw"
    cfg = {"base_url": _nowhere(), "mirror": str(mirror), "download_dir": str(meta), **FAST}
    pdb.download("remote", out, cfg)
    manifest = pl.read_parquet(out / pdb.MANIFEST)
    assert set(manifest["id"]) == _protein_chains(pdb_release) and manifest["error"].is_null().all()
    assert (out / "metadata" / "resolu.idx").resolve() == (meta / "resolu.idx").resolve()
    # a pin that the local copy does not match fails, naming the file
    pin = {"resolu.idx": {"sha256": "0" * 64}}
    with pytest.raises(DownloadError, match="download.expected.resolu.idx"):
        pdb.download("remote", tmp_path / "raw2", {**cfg, "expected": pin})


# -------------------------------------------------------------------------------------- GEOM


def test_geom_local_copy_with_pinned_md5_needs_no_server(tmp_path, geom_rel):
    """Before: the Dataverse API was asked first, so the step failed offline."""
    out = tmp_path / "raw"
    block = {
        "source": "geom-rdkit",
        "download_dir": str(geom_rel.archive.parent),
        "download": {
            "dataverse_api": _nowhere() + "/api",
            "expected": {
                "rdkit_folder.tar.gz": {
                    "md5": geom_rel.md5,
                    "size": geom_rel.archive.stat().st_size,
                }
            },
        },  # fmt: skip
        "preprocess": {"conformers_per_molecule": 2},
    }
    geom.download("geom-rdkit", out, block)
    assert (out / geom.ARCHIVE).resolve() == geom_rel.archive.resolve()
    geom.preprocess(out, tmp_path / "store", block)  # trusted through the same pin
    from equipipe.store import Store

    store = Store(tmp_path / "store")
    assert len(store) + store.quarantine.height == geom_rel.kept_conformers


def test_geom_pins_conflict_and_unknown_names_are_refused():
    with pytest.raises(ValueError, match="differ"):
        geom.resolve_config(
            {"rdkit_folder_md5": "a" * 32, "expected": {geom.ARCHIVE: {"md5": "b" * 32}}}
        )
    with pytest.raises(ValueError, match="allowed"):
        geom.resolve_config({"expected": {"rdkit_folder.tgz": {"md5": "a" * 32}}})


def test_dataverse_html_page_and_429_are_retried_content_redirected(
    http_server, tmp_path, geom_rel
):
    """Before: an HTML page served with 200 by the dataset API failed the step at once."""
    body = geom_rel.archive.read_bytes()
    dv = Dataverse(http_server)
    dv.add_file(4327252, geom.ARCHIVE, body, Fault(drop_after=len(body) // 3))
    dv.publish(Fault(html_page=True), Fault(status=429, headers={"Retry-After": "0"}))
    geom.download("geom-rdkit", tmp_path, {"dataverse_api": dv.api})
    api = http_server.requests_for("/api/datasets/:persistentId/")
    assert [r.status for r in api] == [200, 429, 200]
    content = [r for r in http_server.requests if r.path.startswith("/dvn-cloud/")]
    assert {r.headers["Host"].split(":")[0] for r in content} == {"localhost"}
    assert [r.headers.get("Range") for r in content] == [None, f"bytes={len(body) // 3}-"]
    record = json.loads((tmp_path / geom.ARCHIVE_SOURCE_JSON).read_text())
    assert record["md5"] == geom_rel.md5 and record["checksum_source"] == "Dataverse API"


def test_midi_pins_through_expected_refuse_a_different_file(http_server, tmp_path, geom_rel):
    mirror = MidiMirror(http_server)
    mirror.add(geom_rel.midi)
    expected = {f"{s}_data.pickle": {"sha256": h} for s, h in geom_rel.midi_sha256.items()}
    geom.download("midi", tmp_path / "ok", {"midi_url": mirror.url, "expected": expected})
    assert all((tmp_path / "ok" / f"{s}_data.pickle").is_file() for s in geom.MIDI_SPLITS)
    wrong = {**expected, "val_data.pickle": {"sha256": geom_rel.midi_sha256["train"]}}
    with pytest.raises(DownloadError):
        geom.download("midi", tmp_path / "bad", {"midi_url": mirror.url, "expected": wrong})
