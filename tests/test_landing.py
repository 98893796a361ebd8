"""Release pins through ``download.expected``, frame counts, the sha256 ledger, the cache."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import yaml

from equipipe.config import validate_schema
from equipipe.data import landing, spice
from equipipe.data.download import DownloadError
from equipipe.provenance import dataset_info
from equipipe.store import Store
from tests.httpserver import Fault

ROOT = Path(__file__).resolve().parent.parent
XYZ = ROOT / "tests" / "fixtures" / "spice" / "maceoff_small.xyz"
TRAIN, TEST = spice.SOURCES["maceoff23"]["files"]


def _frames(text: str) -> list[str]:
    """Split an extended-XYZ text into its frames (each with its trailing newline)."""
    lines, out, i = text.splitlines(keepends=True), [], 0
    while i < len(lines):
        n = int(lines[i].split()[0])
        out.append("".join(lines[i : i + n + 2]))
        i += n + 2
    return out


def _serve_maceoff(server, bodies: dict[str, bytes], *faults: Fault) -> dict:
    for name, body in bodies.items():
        bitstream = spice.SOURCES["maceoff23"]["files"][name]["bitstream"]
        server.add(f"/bitstreams/{bitstream}/download", body, *faults)
    return {"apollo_base": server.url("/bitstreams")}


def test_expected_block_is_validated_by_schema_and_api():
    cfg = yaml.safe_load((ROOT / "tests" / "fixtures" / "tiny_config.yaml").read_text())
    good = copy.deepcopy(cfg)
    good["datasets"]["spice"]["download"] = {
        "expected": {TRAIN: {"frames": 4, "sha256": "a" * 64, "size": 10, "md5": "B" * 32}},
        "accept_new_sha256": False,
    }
    validate_schema(good)
    for bad, where in (
        ({"expected": {TRAIN: {"frame": 4}}}, "frame"),
        ({"expected": {TRAIN: {"md5": "xyz"}}}, "md5"),
        ({"expected": {TRAIN: {"size": -1}}}, "size"),
        ({"accept_new_sha256": "yes"}, "accept_new_sha256"),
    ):
        cfg["datasets"]["spice"]["download"] = bad
        with pytest.raises(Exception, match=where):
            validate_schema(copy.deepcopy(cfg))
        if "expected" in bad:
            with pytest.raises(ValueError, match=f"download.expected.{TRAIN}.{where}"):
                landing.expected(TRAIN, {}, bad)


def test_maceoff_cut_at_a_frame_boundary_without_length_is_refused(http_server, tmp_path):
    text = XYZ.read_text()
    frames = _frames(text)
    short = "".join(frames[:-1]).encode()  # the last frame missing: every frame is whole
    # No Content-Length and the body ends early: the transfer itself cannot tell.
    cfg = _serve_maceoff(http_server, {TRAIN: short, TEST: text.encode()}, Fault(no_length=True))
    cfg["expected"] = {TRAIN: {"frames": len(frames)}, TEST: {"frames": len(frames)}}
    out = tmp_path / "maceoff23"
    with pytest.raises(DownloadError, match=f"{len(frames) - 1} frames, expected {len(frames)}"):
        spice.download("maceoff23", out, cfg)
    assert not (out / TRAIN).exists()
    assert not (landing.cache_dir(out) / TRAIN).exists()  # discarded, never landed later


def test_maceoff_cut_mid_frame_without_length_is_refused_and_discarded(http_server, tmp_path):
    text = XYZ.read_bytes()
    cut = len(text) - 40  # inside the last frame
    cfg = _serve_maceoff(
        http_server, {TRAIN: text, TEST: text}, Fault(no_length=True, truncate_to=cut)
    )
    out = tmp_path / "maceoff23"
    with pytest.raises(DownloadError, match="not a complete extended-XYZ file"):
        spice.download("maceoff23", out, {**cfg, "expected": {TRAIN: {"frames": 4}}})
    assert not (out / TRAIN).exists() and not (landing.cache_dir(out) / TRAIN).exists()
    spice.download("maceoff23", out, {**cfg, "expected": {n: {"frames": 4} for n in (TRAIN, TEST)}})
    assert (out / TRAIN).read_bytes() == text  # the next run fetched it whole


def test_maceoff_frames_pinned_in_sources_refuse_a_short_file(http_server, tmp_path):
    # No override: the release's own frame counts (SOURCES) apply.
    cfg = _serve_maceoff(http_server, {TRAIN: XYZ.read_bytes(), TEST: XYZ.read_bytes()})
    with pytest.raises(DownloadError, match="expected 951005 \\(from SOURCES\\)"):
        spice.download("maceoff23", tmp_path / "maceoff23", cfg)


def test_changed_upstream_hash_fails_naming_both_unless_accepted(http_server, tmp_path):
    text = XYZ.read_text()
    n = len(_frames(text))
    cfg = _serve_maceoff(http_server, {TRAIN: text.encode(), TEST: text.encode()})
    cfg["expected"] = {TRAIN: {"frames": n}, TEST: {"frames": n}}
    out = tmp_path / "maceoff23"
    spice.download("maceoff23", out, cfg)
    first = hashlib.sha256(text.encode()).hexdigest()
    prov = json.loads((out / landing.PROVENANCE).read_text())
    assert prov["files"][TRAIN]["sha256"] == first and prov["files"][TRAIN]["frames"] == n
    assert prov["files"][TRAIN]["expected_from"] == {"frames": "download.expected"}
    # The preprocessed store carries the same record.
    pre = {"source": "maceoff23", "max_bad_fraction": 0.5, "expected": cfg["expected"]}
    spice.preprocess(out, tmp_path / "store", pre)
    assert Store(tmp_path / "store").meta["download"] == prov
    info = dataset_info("spice", "maceoff23", tmp_path / "store", out)  # the run's provenance
    assert info["store"]["download"] == prov and not info["gaps"]

    # Upstream now serves other bytes (same frame count); the cached copy is gone.
    changed = text.replace("-0.", "-1.", 1).encode()
    _serve_maceoff(http_server, {TRAIN: changed})
    (landing.cache_dir(out) / TRAIN).unlink()
    again = out
    for p in out.iterdir():  # what Snakemake does to the output of a job that reruns
        p.unlink()
    new = hashlib.sha256(changed).hexdigest()
    with pytest.raises(DownloadError, match=f"(?s){new}.*{first}"):
        spice.download("maceoff23", again, cfg)
    assert not (again / TRAIN).exists()
    spice.download("maceoff23", again, {**cfg, "accept_new_sha256": True})
    rec = json.loads((again / landing.PROVENANCE).read_text())["files"][TRAIN]
    assert rec["sha256"] == new and rec["previous_sha256"] == first
    assert (again / TRAIN).read_bytes() == changed


def test_finished_file_lands_by_hard_link_and_is_not_fetched_again(http_server, tmp_path):
    cfg = _serve_maceoff(http_server, {TRAIN: XYZ.read_bytes(), TEST: XYZ.read_bytes()})
    cfg["expected"] = {TRAIN: {"frames": 4}, TEST: {"frames": 4}}
    out = tmp_path / "maceoff23"
    spice.download("maceoff23", out, cfg)
    cached = landing.cache_dir(out) / TRAIN
    assert (out / TRAIN).stat().st_ino == cached.stat().st_ino  # a link, not a copy
    http_server.clear_log()
    for p in out.iterdir():  # what Snakemake does to the output of a job that reruns
        p.unlink()
    spice.download("maceoff23", out, cfg)
    assert http_server.requests == [] and (out / TRAIN).read_bytes() == XYZ.read_bytes()


def test_extxyz_header_announcing_millions_of_atoms_is_refused_at_once(tmp_path):
    bad = tmp_path / "bad.xyz"
    bad.write_text("50000000\nProperties=species:S:1:pos:R:3\nH 0 0 0\n")
    # a reader that trusted the count would first build a 50-million-entry list of lines
    with pytest.raises(spice.CorruptFileError, match="50000000 atoms but only"):
        list(spice.read_records(bad))
    with pytest.raises(spice.CorruptFileError, match="50000000 atoms but only"):
        spice.count_extxyz_frames(bad)
