"""Checking a file against what it must be: size and digests, gzip integrity, a user's local copy."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from equipipe.data.download.remote import DownloadError

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes per read; large enough for throughput, small enough for live progress


def new_hashers(md5: str | None, sha256: str | None) -> dict:
    """Fresh hashlib objects for the digests that are expected ({"md5": ..., "sha256": ...})."""
    out = {}
    if md5:
        out["md5"] = hashlib.md5(usedforsecurity=False)
    if sha256:
        out["sha256"] = hashlib.sha256()
    return out


def hash_file(path: Path, hashers: dict, limit: int | None = None) -> None:
    """Feed the first ``limit`` bytes of ``path`` (all of it with None) to ``hashers``."""
    with open(path, "rb") as f:
        left = limit
        while left is None or left > 0:
            block = f.read(8 * CHUNK if left is None else min(8 * CHUNK, left))
            if not block:
                break
            for h in hashers.values():
                h.update(block)
            if left is not None:
                left -= len(block)


@dataclass
class Expect:
    """What one transfer must produce (:class:`RemoteFile` resolved for one destination)."""

    url: str
    size: int | None
    md5: str | None
    sha256: str | None
    name: str

    def describe(self) -> str:
        parts = [f"{self.size} bytes" if self.size is not None else "unknown size"]
        if self.md5:
            parts.append(f"md5 {self.md5}")
        if self.sha256:
            parts.append(f"sha256 {self.sha256}")
        return ", ".join(parts)


def mismatch(path: Path, exp: Expect, hashers: dict | None = None) -> str | None:
    """None if ``path`` matches ``exp``; else a message saying what was expected and found.

    ``hashers`` may carry digests already fed with the whole file (saves a second read).
    """
    got = path.stat().st_size
    if exp.size is not None and got != exp.size:
        return f"expected {exp.size} bytes, got {got}"
    if hashers is None:
        hashers = new_hashers(exp.md5, exp.sha256)
        hash_file(path, hashers)
    for algo in ("md5", "sha256"):
        want = getattr(exp, algo)
        if want and hashers[algo].hexdigest() != want:
            return f"expected {algo} {want}, got {hashers[algo].hexdigest()}"
    return None


def verify_gzip(path: str | os.PathLike) -> int:
    """Read a gzip file to the end; return its uncompressed size.

    Raises :class:`DownloadError` if the file is truncated or corrupt (bad header, CRC or
    length mismatch, trailing garbage), naming the file.
    """
    path = Path(path)
    n = 0
    try:
        with gzip.open(path, "rb") as f:
            while block := f.read(8 * CHUNK):
                n += len(block)
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        raise DownloadError(
            f"{path} is not a complete gzip file ({type(e).__name__}: {e}); delete it and "
            "download it again"
        ) from e
    return n


def file_digest(path: Path, algo: str) -> str:
    """Hex digest (``md5`` or ``sha256``) of a file, read in blocks."""
    h = hashlib.md5(usedforsecurity=False) if algo == "md5" else hashlib.new(algo)
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    return h.hexdigest()


def use_local_copy(
    src: Path,
    dest: Path,
    *,
    size: int | None = None,
    md5: str | None = None,
    sha256: str | None = None,
) -> bool:
    """Symlink an existing file (a user's download folder) to ``dest`` if it verifies.

    Checks size, md5 and sha256 where given; returns False (and logs why) when the file is
    missing or does not match, so the caller downloads instead. The link lands atomically.
    """
    src, dest = Path(src), Path(dest)
    if not src.is_file():
        log.warning("%s is missing; downloading instead", src)
        return False
    if size is not None and src.stat().st_size != size:
        log.warning("%s has %d bytes, expected %d; downloading", src, src.stat().st_size, size)
        return False
    for algo, want in (("md5", md5), ("sha256", sha256)):
        if want and file_digest(src, algo) != want.lower():
            log.warning("%s does not match %s %s; downloading", src, algo, want)
            return False
    if dest.exists() and dest.resolve() == src.resolve():
        return True
    tmp = dest.with_name(dest.name + ".link")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(src.resolve())
    os.replace(tmp, dest)
    return True
