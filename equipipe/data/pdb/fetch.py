"""The remote PDB source: fetch and filter the wwPDB metadata FIRST, then the selected mmCIF files.

The selected entries' structures come from RCSB (``/download/{id}.cif.gz``) in ONE
:func:`equipipe.data.download.fetch_many` call with bounded concurrency (retries, HTTP Range
resume, gzip integrity), into the undeclared cache, then hard-linked into the output. With
``mirror`` set, a local rsync tree of ``structures/divided/mmCIF`` (``<mirror>/mmCIF/<id[1:3]>/<id>.cif.gz``
or ``<mirror>/<id[1:3]>/<id>.cif.gz``) is read in place and nothing is downloaded. With
``download_dir`` holding the three metadata files they are checked (and matched against
``download.expected`` pins where given) and linked, not fetched: ``download_dir`` plus
``mirror`` runs with no network at all. A metadata file that does not parse as its wwPDB
format (an error page served with status 200) is deleted and fetched again, never read as
"no entries"; a structure that is not a complete gzip is fetched again (``retries`` rounds).
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from pathlib import Path
from typing import Any

from equipipe.data.dataset_block import options
from equipipe.data.pdb.build import build_embedded
from equipipe.data.pdb.config import SOURCES, resolve_config
from equipipe.data.pdb.manifest import write_manifest
from equipipe.data.pdb.metadata import parse_entry_type, parse_resolu, parse_seqres, select_chains

log = logging.getLogger(__name__)


def _remote_url(cfg: dict[str, Any], url: str) -> str:
    base = cfg.get("base_url")
    if not base:
        return url
    parts = urllib.parse.urlsplit(url)
    return base.rstrip("/") + parts.path


def structure_url(pdb_id: str, cfg: dict[str, Any] | None = None) -> str:
    """RCSB URL of entry ``pdb_id``'s gzip'd mmCIF (under ``base_url`` when set)."""
    return _remote_url(
        resolve_config(cfg), SOURCES["remote"]["structure"].format(id=pdb_id.lower())
    )


def divided_path(root: Path, pdb_id: str) -> Path:
    """``root/<id[1:3]>/<id>.cif.gz``: the wwPDB divided layout."""
    pdb_id = pdb_id.lower()
    return root / pdb_id[1:3] / f"{pdb_id}.cif.gz"


def _mirror_root(mirror: str | os.PathLike) -> Path:
    root = Path(mirror).expanduser()
    if not root.is_dir():
        raise ValueError(
            f"pdb config: mirror={str(mirror)!r} is not a directory; give the local rsync copy of "
            "structures/divided/mmCIF (or its parent), or set mirror: null to download"
        )
    return root / "mmCIF" if (root / "mmCIF").is_dir() else root


METADATA_FILES = {
    "seqres": "pdb_seqres.txt.gz",
    "resolu": "resolu.idx",
    "entry_type": "pdb_entry_type.txt",
}


def _check_metadata(name: str, path: Path) -> None:
    """Refuse a metadata file that is not what wwPDB publishes (e.g. an HTML error page)."""
    from equipipe.data.download import DownloadError, verify_gzip

    if name == "seqres":
        verify_gzip(path)
        n = next(iter(parse_seqres(path)), None) is not None
    elif name == "resolu":
        n = bool(parse_resolu(path))
    else:
        n = bool(parse_entry_type(path))
    if not n:
        head = Path(path).read_bytes()[:80]
        raise DownloadError(
            f"{path} holds no {METADATA_FILES[name]} records (starts with {head!r}); an HTML "
            "error page or an empty file was served: delete it and download it again"
        )


def _metadata(cfg: dict[str, Any], meta: Path, kw: dict[str, Any]) -> dict[str, Path]:
    """The three wwPDB metadata files in ``meta``.

    With ``download_dir`` holding them (a local copy: a cluster node without internet), they
    are checked and linked and nothing is contacted; else each is fetched from wwPDB. A file
    that does not parse (an HTML page served with status 200) is deleted and fetched again.
    """
    from equipipe.data.download import DownloadError, fetch, use_local_copy

    paths: dict[str, Path] = {}
    local = Path(cfg["download_dir"]).expanduser() if cfg.get("download_dir") else None
    meta.mkdir(parents=True, exist_ok=True)
    expected = cfg.get("expected") or {}
    unknown = sorted(set(expected) - set(METADATA_FILES.values()))
    if unknown:
        raise ValueError(
            f"pdb download.expected names {unknown}; allowed: {sorted(METADATA_FILES.values())}"
        )
    for name, filename in METADATA_FILES.items():
        dest = meta / filename
        pin = {k: v for k, v in (expected.get(filename) or {}).items() if v is not None}
        if local is not None and (local / filename).is_file():
            _check_metadata(name, local / filename)
            if not use_local_copy(local / filename, dest, **pin):
                raise DownloadError(
                    f"{local / filename} does not match download.expected.{filename} {pin}: "
                    "replace the local copy or update the pin"
                )
            log.info("pdb: %s from the local copy %s (no network)", filename, local)
            paths[name] = dest
            continue
        url = _remote_url(cfg, SOURCES["remote"][name])
        for attempt in range(1, int(kw["retries"]) + 1):
            fetch(url, dest, **pin, **kw)
            try:
                _check_metadata(name, dest)
                break
            except DownloadError:
                dest.unlink(missing_ok=True)
                if attempt == int(kw["retries"]):
                    raise
                log.warning("pdb: %s was not a %s file; fetching it again", url, filename)
        paths[name] = dest
    return paths


def download(source: str, out_dir: Path, cfg: dict[str, Any]) -> None:
    """Fetch the metadata, filter, then fetch the selected structures (or use the mirror).

    ``source="embedded"`` builds the embedded set instead (no network).
    """
    import polars as pl

    from equipipe.data import landing
    from equipipe.data.download import DownloadError, fetch_many, verify_gzip

    cfg = options(cfg, "preprocess", "download")  # the metadata filters are preprocess keys
    if source == "embedded":
        return build_embedded(out_dir, cfg)
    if source != "remote":
        raise ValueError(f"pdb source {source!r} is unknown; allowed: {tuple(SOURCES)}")
    cfg = resolve_config(cfg)
    out_dir = Path(out_dir)
    # Everything is fetched into the undeclared cache (it survives a failed job, which
    # Snakemake answers by deleting out_dir) and hard-linked into out_dir at the end.
    cache = landing.cache_dir(out_dir)
    kw = {
        "retries": int(cfg["retries"]),
        "timeout": float(cfg["timeout"]),
        "backoff": float(cfg["backoff"]),
    }
    paths = _metadata(cfg, cache / "metadata", kw)
    chains = select_chains(paths["seqres"], paths["resolu"], paths["entry_type"], cfg)
    entries = sorted(chains["pdb_id"].unique().to_list())
    if cfg["limit"] is not None:
        entries = entries[: int(cfg["limit"])]
        chains = chains.filter(pl.col("pdb_id").is_in(entries))
    log.info("pdb: %d chains in %d entries pass the metadata filters", chains.height, len(entries))

    errors: dict[str, str] = {}
    if cfg["mirror"]:
        root = _mirror_root(cfg["mirror"])
        files = {e: divided_path(root, e).resolve() for e in entries}
        for e, f in files.items():
            if not f.is_file():
                errors[e] = f"not in mirror: {f}"
        file_col = {e: str(f) for e, f in files.items()}
    else:
        cached = {e: divided_path(cache / "mmCIF", e) for e in entries}
        todo = list(entries)  # finished ones in the cache: no request, gzip checked again
        # A server may answer 200 with an HTML error page instead of the file (no size or
        # checksum is published for a structure): what is not a complete gzip is deleted and
        # fetched again, up to `retries` rounds, before it counts as failed.
        rounds = int(cfg["retries"])
        for k in range(rounds):
            failed: dict[str, str] = {}
            items = [(structure_url(e, cfg), cached[e]) for e in todo]
            try:
                fetch_many(items, concurrency=int(cfg["concurrency"]), **kw)
            except DownloadError as err:
                failures = getattr(err, "failures", None)
                if failures is None:
                    raise
                by_dest = {Path(d).resolve(): e for e, d in cached.items()}
                for _remote, dest, exc in failures:
                    failed[by_dest[Path(dest).resolve()]] = f"download failed: {exc}"
            for e in todo:  # gzip integrity of every cached structure (a few ms each)
                if e in failed:
                    continue
                try:
                    verify_gzip(cached[e])
                except DownloadError as exc:
                    cached[e].unlink(missing_ok=True)
                    failed[e] = f"corrupt gzip: {exc}"
            todo = [e for e, m in failed.items() if m.startswith("corrupt gzip")]
            errors.update({e: m for e, m in failed.items() if e not in todo or k == rounds - 1})
            if not todo:
                break
            log.warning("pdb: %d structures were not gzip files; fetching them again", len(todo))
        allowed = float(cfg["max_failed_downloads"]) * max(len(entries), 1)
        if len(errors) > allowed:
            sample = "\n".join(f"  {e}: {m}" for e, m in sorted(errors.items())[:10])
            raise DownloadError(
                f"{len(errors)} of {len(entries)} PDB structures failed to download (more than "
                f"max_failed_downloads={cfg['max_failed_downloads']}):\n{sample}\n"
                f"Rerun to resume (finished and partial files are kept in {cache}), or raise "
                "max_failed_downloads."
            )
        for e in entries:
            if e not in errors:
                landing.land(cached[e], divided_path(out_dir / "mmCIF", e))
        file_col = {
            e: str(divided_path(out_dir / "mmCIF", e).relative_to(out_dir)) for e in entries
        }
    for p in paths.values():
        landing.land(p, out_dir / "metadata" / p.name)
    manifest = chains.with_columns(
        pl.col("pdb_id").replace_strict(file_col, return_dtype=pl.String).alias("file"),
        pl.lit("remote").alias("origin"),
        pl.col("pdb_id")
        .replace_strict(errors, default=None, return_dtype=pl.String)
        .alias("error"),
    )
    write_manifest(manifest, out_dir)
