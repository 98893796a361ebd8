"""Where downloads live until they are complete, and how they land in the declared output.

Snakemake deletes the declared outputs of a failed job. A download step that wrote its
``.partial`` files (or the PDB structures already fetched) into its ``directory()`` output would
lose them on every failure, and the retry would start from byte 0. So every download goes to an
UNDECLARED cache next to the outputs (as training keeps ``work/``)::

    resources/<dataset>/<source>/          declared output (what the rules see)
    resources/<dataset>/.cache/<source>/   partial and finished files, the hash ledger

and a finished, verified file lands in the declared output by hard link (a symbolic link where
the file system has none); never by copy: SPICE 2.0.1 is 37 GB. :func:`fetch_or_link` does this
for every file of a source (or links the user's verified copy from ``download_dir``), so the
datasets' download steps only say which files they want and what each must match.

This module also holds what a release file must look like (:func:`expected`: the pins of
``SOURCES`` updated by the validated ``download.expected`` block of the config), the hash ledger
(:class:`Ledger`: the sha256 of what landed before; a new download whose hash differs fails
unless ``download.accept_new_sha256``) and the provenance record ``download.json`` written into
the declared output and copied by preprocessing into the store's metadata.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE = ".cache"
PROVENANCE = "download.json"
LEDGER = "ledger.json"
EXPECTED_KEYS = ("size", "md5", "sha256", "frames")
_HEX = {"md5": re.compile(r"^[0-9a-fA-F]{32}$"), "sha256": re.compile(r"^[0-9a-fA-F]{64}$")}


def cache_dir(out_dir: str | os.PathLike) -> Path:
    """The undeclared cache of a declared download output.

    ``resources/<dataset>/<source>`` -> ``resources/<dataset>/.cache/<source>`` (a sibling of
    the output, on the same file system, so that the finished file can be hard-linked).
    """
    out_dir = Path(out_dir)
    return out_dir.parent / CACHE / out_dir.name


# --------------------------------------------------------------------------------------------
# what a file must look like


@dataclass
class Expected:
    """Facts a release file must match (None: unknown) and where each one came from."""

    size: int | None = None
    md5: str | None = None
    sha256: str | None = None
    frames: int | None = None
    origin: dict[str, str] = field(default_factory=dict)


def check_expected_block(block: Any) -> dict[str, dict[str, Any]]:
    """Validate ``download.expected`` (file name -> {size, md5, sha256, frames}); return it.

    Raises ValueError naming the key's path and the allowed keys (the schema says the same at
    plan time; this guards direct calls of the Python API).
    """
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise ValueError(f"download.expected must be a mapping file name -> facts, got {block!r}")
    for name, facts in block.items():
        where = f"download.expected.{name}"
        if not isinstance(facts, dict):
            raise ValueError(f"{where} must be a mapping with keys {list(EXPECTED_KEYS)}")
        for key, value in facts.items():
            if key not in EXPECTED_KEYS:
                raise ValueError(f"{where}.{key} is unknown; allowed keys: {list(EXPECTED_KEYS)}")
            if key in ("size", "frames"):
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"{where}.{key} must be an integer >= 0, got {value!r}")
            elif not isinstance(value, str) or not _HEX[key].match(value):
                n = 32 if key == "md5" else 64
                raise ValueError(f"{where}.{key} must be {n} hex digits, got {value!r}")
    return block


def expected(name: str, pinned: dict[str, Any] | None, cfg: dict[str, Any] | None) -> Expected:
    """``SOURCES`` pins of file ``name`` updated by ``cfg['expected'][name]`` (the config wins)."""
    out = Expected()
    for key in EXPECTED_KEYS:
        value = (pinned or {}).get(key)
        if value is not None:
            setattr(out, key, value.lower() if isinstance(value, str) else value)
            out.origin[key] = "SOURCES"
    block = check_expected_block((cfg or {}).get("expected"))
    for key, value in (block.get(name) or {}).items():
        setattr(out, key, value.lower() if isinstance(value, str) else value)
        out.origin[key] = "download.expected"
    return out


# --------------------------------------------------------------------------------------------
# landing


def land(src: str | os.PathLike, dest: str | os.PathLike) -> str:
    """Put finished file ``src`` (in the cache) at ``dest`` by hard link; return how.

    Falls back to a symbolic link where hard links are impossible (another file system, or one
    without them). Never copies. The link appears atomically (temporary name, then rename).
    """
    src, dest = Path(src), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".landing")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
        how = "hardlink"
    except OSError:
        tmp.symlink_to(src.resolve())
        how = "symlink"
    os.replace(tmp, dest)
    return how


# --------------------------------------------------------------------------------------------
# the hash ledger (undeclared: survives failed jobs and a deleted declared output)


class Ledger:
    """sha256 (and size, mtime) of every file that landed from one cache folder.

    Lets a cached file that has not changed skip re-hashing (37 GB), and lets a later download
    of the same file be compared with what landed before.
    """

    def __init__(self, cache: str | os.PathLike):
        self.path = Path(cache) / LEDGER
        try:
            self.entries: dict[str, dict[str, Any]] = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            self.entries = {}

    def known_sha256(self, path: Path) -> str | None:
        """The recorded sha256 of cached ``path`` if the file is unchanged since, else None."""
        e = self.entries.get(path.name)
        st = path.stat()
        if e and e.get("size") == st.st_size and e.get("mtime_ns") == st.st_mtime_ns:
            return e.get("sha256")
        return None

    def check(self, name: str, sha256: str, accept_new: bool) -> str | None:
        """Compare a newly landed hash with the recorded one; return the previous hash.

        Raises DownloadError naming both hashes when they differ and ``accept_new`` is false.
        """
        from equipipe.data.download import DownloadError

        before = (self.entries.get(name) or {}).get("sha256")
        if before and before != sha256:
            if not accept_new:
                raise DownloadError(
                    f"{name}: this download has sha256 {sha256}, but the copy that landed before "
                    f"had sha256 {before} (recorded in {self.path}). The upstream file changed "
                    "(or the download is damaged). Check it; to accept the new file set "
                    "download.accept_new_sha256: true (or pin it in download.expected)."
                )
            log.warning("%s: sha256 changed from %s to %s (accepted)", name, before, sha256)
        return before

    def record(self, path: Path, sha256: str, **extra: Any) -> None:
        st = path.stat()
        self.entries[path.name] = {
            "sha256": sha256,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **extra,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, self.entries)


# --------------------------------------------------------------------------------------------
# provenance: what landed, written into the declared output, read by preprocessing


def file_record(
    path: Path,
    exp: Expected,
    *,
    url: str | None,
    how: str,
    sha256: str,
    frames: int | None = None,
    previous_sha256: str | None = None,
) -> dict[str, Any]:
    """One file's provenance: what was expected (and from where) and what landed."""
    rec = {
        "url": url,
        "landed_by": how,
        "size": path.stat().st_size,
        "sha256": sha256,
        "expected": {k: v for k, v in asdict(exp).items() if k != "origin" and v is not None},
        "expected_from": dict(exp.origin),
    }
    if frames is not None:
        rec["frames"] = frames
    if previous_sha256 is not None:
        rec["previous_sha256"] = previous_sha256
    return rec


def write_provenance(out_dir: str | os.PathLike, source: str, files: dict[str, dict]) -> Path:
    """Write ``<out_dir>/download.json`` ({source, files: {name: record}}) atomically."""
    return write_json(Path(out_dir) / PROVENANCE, {"source": source, "files": files})


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically (temporary name, rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def read_provenance(raw_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``download.json`` of a raw folder, or None (embedded builds have none)."""
    path = Path(raw_dir) / PROVENANCE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------
# the files of a source: each linked from download_dir or downloaded, verified, recorded, landed


@dataclass
class SourceFile:
    """One file of a source: its name in the output, what it must match, where it comes from.

    ``url`` may be a callable ``(expected) -> url``, asked only when no local copy landed (a
    repository API look-up, which may also fill in ``expected`` facts it publishes).
    """

    name: str
    expected: Expected
    url: str | Callable[[Expected], str]


def fetch_or_link(
    out_dir: str | os.PathLike,
    source: str,
    files: Iterable[SourceFile],
    cfg: dict[str, Any] | None = None,
    *,
    count_frames: Callable[[Path], int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Land every file of ``source`` in ``out_dir``; write and return its provenance records.

    A file is linked from ``cfg['download_dir']`` when a copy there verifies against its
    expected facts (nothing is contacted; never copied). Otherwise its URL is resolved and it
    is downloaded into the undeclared cache (the transfer resumes from the cache's
    ``.partial``, which survives failed jobs; a cached file that already verifies is landed
    without any request) and hard-linked into ``out_dir``. Either way ``count_frames(path) ->
    int`` (extended XYZ) is compared with the expected frames, a mismatch deleting the cached
    file and raising :class:`~equipipe.data.download.DownloadError`, as does a sha256 that
    differs from the one that landed before (unless ``cfg['accept_new_sha256']``). The records
    ({name: :func:`file_record`}) are written to ``out_dir/download.json``.
    """
    from equipipe.data.download import RemoteFile, fetch, use_local_copy

    cfg = cfg or {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    local = Path(cfg["download_dir"]).expanduser() if cfg.get("download_dir") else None
    landed: dict[str, dict[str, Any]] = {}
    for f in files:
        exp, name = f.expected, f.name
        if local is not None and use_local_copy(
            local / name, out_dir / name, size=exp.size, md5=exp.md5, sha256=exp.sha256
        ):
            url, path = f"file://{local / name}", local / name
        else:
            url = f.url(exp) if callable(f.url) else f.url  # a look-up may fill in exp
            remote = RemoteFile(url, size=exp.size, md5=exp.md5, sha256=exp.sha256, name=name)
            path = fetch(remote, cache_dir(out_dir) / name)
        landed[name] = _verify_and_land(path, out_dir, name, exp, cfg, url, count_frames)
    write_provenance(out_dir, source, landed)
    return landed


def _verify_and_land(
    path: Path, out_dir: Path, name: str, exp: Expected, cfg, url: str, count_frames
) -> dict[str, Any]:
    from equipipe.data.download import DownloadError, file_digest

    cfg = cfg or {}
    ledger = Ledger(cache_dir(out_dir))
    known = ledger.entries.get(name) if ledger.known_sha256(path) else None
    sha = known["sha256"] if known else (exp.sha256 or file_digest(path, "sha256"))
    frames = known.get("frames") if known else None
    cached = path.parent == cache_dir(out_dir)
    if count_frames is not None and frames is None:
        try:
            frames = count_frames(path)
        except Exception as e:  # a frame cut short, garbage, ...
            if cached:
                path.unlink(missing_ok=True)  # a wrong file must not be landed by the next run
            raise DownloadError(
                f"{name} is not a complete extended-XYZ file ({e}); it was discarded - run the "
                "download again",
                url=url,
            ) from e
    # (a format without a counter here, HDF5, has its conformers counted by preprocessing)
    if exp.frames is not None and frames is not None and frames != exp.frames:
        if cached:
            path.unlink(missing_ok=True)  # a wrong file must not be landed by the next run
        raise DownloadError(
            f"{name}: {frames} frames, expected {exp.frames} "
            f"(from {exp.origin.get('frames')}): the download is truncated or not this release; "
            "it was discarded - run the download again, or correct download.expected."
            f"{name}.frames if the release really changed",
            url=url,
        )
    previous = ledger.check(name, sha, bool(cfg.get("accept_new_sha256")))
    ledger.record(path, sha, url=url, **({"frames": frames} if frames is not None else {}))
    how = land(path, out_dir / name) if cached else "symlink (download_dir)"
    return file_record(
        out_dir / name,
        exp,
        url=url,
        how=how,
        sha256=sha,
        frames=frames,
        previous_sha256=previous if previous != sha else None,
    )
