"""Fetching a SPICE source into the download step's output (the embedded source is built instead)."""

from __future__ import annotations

import functools
from pathlib import Path

from equipipe.data import landing
from equipipe.data.dataset_block import options
from equipipe.data.download import DownloadError, zenodo_file
from equipipe.data.spice.build import build_embedded
from equipipe.data.spice.config import PIN_KEYS, SOURCES, pins, resolve_config
from equipipe.data.spice.read import count_extxyz_frames


def download(source: str, out_dir: Path, cfg: dict | None = None) -> None:
    """Fetch ``source``'s file(s) into ``out_dir`` with :func:`equipipe.data.landing.fetch_or_link`.

    Zenodo sources: size and md5 from the record's API (the md5 must equal the pinned one),
    then a resumable, verified download. ``maceoff23``: the two extended-XYZ bitstreams, their
    frames counted. ``embedded`` builds the file instead (:func:`build_embedded`). With
    ``cfg['download_dir']`` set, a file there that verifies is linked and nothing is downloaded.
    """
    cfg = resolve_config({**options(cfg, "download"), "source": source})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = SOURCES[source]
    if spec["kind"] == "embedded":
        build_embedded(out_dir, cfg)
        return
    files = []
    for name, facts in pins(source, cfg).items():
        exp = landing.Expected(
            **{k: facts[k].lower() if isinstance(facts[k], str) else facts[k] for k in PIN_KEYS},
            origin={k: facts["pinned_by"] for k in PIN_KEYS if facts[k] is not None},
        )
        if spec["kind"] == "zenodo":
            url = functools.partial(_zenodo_url, spec["record"], name, facts["pinned_by"], cfg)
        else:
            url = f"{cfg['apollo_base'].rstrip('/')}/{spec['files'][name]['bitstream']}/download"
        files.append(landing.SourceFile(name, exp, url))
    counter = count_extxyz_frames if spec["format"] == "extxyz" else None
    landing.fetch_or_link(out_dir, source, files, cfg, count_frames=counter)


def _zenodo_url(record: int, name: str, pinned_by: str, cfg: dict, exp: landing.Expected) -> str:
    """URL of ``name`` in Zenodo ``record``; its md5 and size must match the pins (``exp``).

    Facts the pins leave open are taken from the API (recorded as such in ``exp.origin``).
    """
    remote = zenodo_file(record, name, api=cfg["zenodo_api"])
    if exp.md5 and remote.md5 and remote.md5 != exp.md5:
        raise DownloadError(
            f"Zenodo record {record} lists md5 {remote.md5} for {name}, but "
            f"{pinned_by} pins {exp.md5}: the record changed; check it and "
            "update the pin (download.expected, or SOURCES in equipipe/data/spice/config.py)",
            url=remote.url,
        )
    if exp.size and remote.size and remote.size != exp.size:
        raise DownloadError(
            f"Zenodo lists {remote.size} bytes for {name}, {pinned_by} pins {exp.size}",
            url=remote.url,
        )
    for key in ("md5", "size"):
        if getattr(exp, key) is None and getattr(remote, key) is not None:
            setattr(exp, key, getattr(remote, key))
            exp.origin[key] = "Zenodo API"
    return remote.url
