"""Fetching a GEOM source into the download step's output (the embedded source is built instead).

``geom-rdkit``: size and md5 of ``rdkit_folder.tar.gz`` from the Dataverse API (a pinned
``rdkit_folder_md5`` must agree), a resumable verified download, then
``rdkit_folder.tar.gz.source.json`` recording what was verified (what preprocessing trusts).
With the archive in ``download_dir`` and its md5 pinned, it is verified and linked and nothing
is contacted, not even the API. ``midi``: the three pickles, verified against ``midi_sha256``
where pinned. Every file lands through :func:`equipipe.data.landing.fetch_or_link`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from equipipe.data import landing
from equipipe.data.dataset_block import options
from equipipe.data.download import DownloadError, RemoteFile, dataverse_files
from equipipe.data.geom.build import build_embedded
from equipipe.data.geom.config import (
    ARCHIVE,
    ARCHIVE_SOURCE_JSON,
    SOURCES,
    resolve_config,
    size_pin,
)
from equipipe.data.landing import write_json

log = logging.getLogger(__name__)


def download(source: str, out_dir: Path, cfg: dict | None = None) -> None:
    """Fetch ``source`` into ``out_dir`` (``embedded`` builds it instead); see the module doc."""
    cfg = resolve_config({**options(cfg, "download"), "source": source})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = cfg["source"]
    spec = SOURCES[source]
    if spec["kind"] == "embedded":
        build_embedded(out_dir, cfg)
    elif spec["kind"] == "dataverse":
        _download_archive(source, spec, out_dir, cfg)
    else:
        pins = cfg["midi_sha256"] or {}
        files = []
        for name, facts in spec["files"].items():
            sha = pins.get(facts["split"])
            exp = landing.Expected(sha256=sha, origin={"sha256": "midi_sha256"} if sha else {})
            url = cfg["midi_url"].rstrip("/") + "/" + name
            files.append(landing.SourceFile(name, _with_config_pins(exp, name, cfg), url))
        landing.fetch_or_link(out_dir, source, files, cfg)


def _download_archive(source: str, spec: dict, out_dir: Path, cfg: dict) -> None:
    """``rdkit_folder.tar.gz`` and its ``.source.json``; the API is asked only when needed.

    With ``rdkit_folder_md5`` pinned, a local copy that matches the pin lands without any
    request (cluster nodes have no network); otherwise the Dataverse API gives size and md5.
    """
    pinned = cfg.get("rdkit_folder_md5")
    remote = None if pinned else _dataverse_file(spec, cfg)
    if remote is None:
        exp = landing.Expected(md5=pinned.lower(), size=size_pin(cfg, ARCHIVE))
        pinned_by = "download.expected" if cfg.get("expected") else "rdkit_folder_md5"
        exp.origin = {k: pinned_by for k in ("md5", "size") if getattr(exp, k) is not None}
    else:
        exp = _api_expected(remote, cfg)

    def ask_the_api(exp: landing.Expected) -> str:
        nonlocal remote
        remote = _dataverse_file(spec, cfg)
        api = _api_expected(remote, cfg)
        exp.size, exp.md5, exp.sha256, exp.origin = api.size, api.md5, api.sha256, api.origin
        return remote.url

    url = remote.url if remote is not None else ask_the_api
    landing.fetch_or_link(out_dir, source, [landing.SourceFile(ARCHIVE, exp, url)], cfg)
    if remote is None:  # the pinned local copy verified: nothing was contacted
        local = Path(cfg["download_dir"]).expanduser() / ARCHIVE
        record = {
            "doi": spec["doi"],
            "file_id": spec["file_id"],
            "url": None,
            "local_copy": str(local),
            "size": local.stat().st_size,
            "md5": pinned.lower(),
            "checksum_source": "config pin (local copy verified; nothing contacted)",
            "pinned_by": pinned_by,
        }
        log.info("geom: %s verified against the pinned md5 and linked (no network)", local)
    else:
        md5 = remote.md5 or (pinned.lower() if pinned else None)
        record = {
            "doi": spec["doi"],
            "file_id": spec["file_id"],
            "url": remote.url,
            "size": remote.size,
            "md5": md5,
            "checksum_source": "Dataverse API" if remote.md5 else ("config pin" if md5 else None),
        }
    write_json(out_dir / ARCHIVE_SOURCE_JSON, record)


def _dataverse_file(spec: dict, cfg: dict) -> RemoteFile:
    """The archive as the Dataverse API lists it (DownloadError if the dataset lacks it)."""
    files = dataverse_files(spec["doi"], api=cfg["dataverse_api"])
    if spec["file_id"] not in files:
        raise DownloadError(
            f"Dataverse dataset doi:{spec['doi']} has no file id {spec['file_id']} "
            f"({ARCHIVE}); it lists {sorted(files)[:10]}"
        )
    return files[spec["file_id"]]


def _api_expected(remote: RemoteFile, cfg: dict) -> landing.Expected:
    """What the archive must match: the API's size and md5 (a pinned md5 must agree), then
    the config's ``download.expected`` pins."""
    pinned = cfg.get("rdkit_folder_md5")
    if pinned and remote.md5 and remote.md5 != pinned.lower():
        raise DownloadError(
            f"Dataverse lists md5 {remote.md5} for {ARCHIVE}, the config pins {pinned}: "
            "the dataset changed or the pin is wrong; check and update rdkit_folder_md5",
            url=remote.url,
        )
    md5 = remote.md5 or (pinned.lower() if pinned else None)
    if md5 is None:
        log.warning(
            "Dataverse published no md5 for %s: preprocessing will refuse it unless "
            "rdkit_folder_md5 is pinned",
            ARCHIVE,
        )
    exp = landing.Expected(size=remote.size, md5=md5)
    exp.origin = {"size": "Dataverse API"} if remote.size is not None else {}
    if md5:
        exp.origin["md5"] = "Dataverse API" if remote.md5 else "rdkit_folder_md5"
    return _with_config_pins(exp, ARCHIVE, cfg)


def _with_config_pins(exp: landing.Expected, name: str, cfg: dict[str, Any]) -> landing.Expected:
    """``exp`` updated by ``download.expected.<name>`` (the config's pins win)."""
    over = landing.expected(name, None, cfg)
    for key, origin in over.origin.items():
        setattr(exp, key, getattr(over, key))
        exp.origin[key] = origin
    return exp
