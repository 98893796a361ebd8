"""One resumable, verified, atomic transfer (:func:`fetch`) and a bounded pool of them (:func:`fetch_many`).

The body streams into ``<dest>.partial``; a later attempt (or run) resumes it with an HTTP
``Range`` request, and a server that ignores ``Range`` restarts the file cleanly. The finished
file is checked (size, then md5 / sha256) before it is renamed into place. ``retries`` attempts
with exponential backoff; a partial judged corrupt is deleted, one that is merely short stays
for the next run. An existing ``dest`` that verifies is returned without any request.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

from tqdm import tqdm

from equipipe.data.download.policy import Corrupt, Fatal, Transient, check_url, is_html, open_url
from equipipe.data.download.remote import DownloadError, RemoteFile
from equipipe.data.download.verify import CHUNK, Expect, hash_file, mismatch, new_hashers

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# one transfer


class _Progress:
    """Per-file tqdm bar plus an optional callback that receives byte deltas (for totals)."""

    def __init__(self, exp: Expect, enabled: bool, on_bytes: Callable[[int], None] | None):
        self.bar = tqdm(
            total=exp.size,
            desc=exp.name,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=not enabled,
        )
        self.on_bytes = on_bytes
        self.n = 0

    def set(self, n: int) -> None:
        if n != self.n:
            if self.on_bytes is not None:
                self.on_bytes(n - self.n)
            self.bar.update(n - self.n)
            self.n = n

    def close(self) -> None:
        self.bar.close()


@dataclass
class _HashState:
    """Digests of the first ``n`` bytes of the partial file, carried across attempts."""

    md5: str | None
    sha256: str | None
    n: int = 0
    hashers: dict | None = None

    def reset(self) -> None:
        self.n, self.hashers = 0, new_hashers(self.md5, self.sha256)

    def catch_up(self, partial: Path, size: int) -> None:
        """Make the digests cover exactly the first ``size`` bytes of ``partial``."""
        if not (self.md5 or self.sha256):
            return
        if self.hashers is None or self.n != size:
            self.reset()
            if size:
                hash_file(partial, self.hashers, limit=size)
            self.n = size

    def update(self, block: bytes) -> None:
        if self.hashers:
            for h in self.hashers.values():
                h.update(block)
        self.n += len(block)


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.I)


def _transfer(
    exp: Expect,
    partial: Path,
    state: _HashState,
    prog: _Progress,
    timeout: float,
    chunk_size: int,
    cancel: threading.Event | None,
) -> None:
    """Bring ``partial`` to the full remote body (resuming if possible) or raise."""
    offset = partial.stat().st_size if partial.exists() else 0
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    resp = open_url(exp.url, headers, timeout)
    with resp:
        status = getattr(resp, "status", None) or resp.code
        if status == 416:
            # The server has nothing past `offset`: either the partial is already whole, or
            # it is longer than the remote file (stale/corrupt).
            m = re.match(r"bytes\s+\*/(\d+)", resp.headers.get("Content-Range", ""))
            if offset and m and int(m.group(1)) == offset:
                return
            raise Corrupt(f"server refused resume at byte {offset} (HTTP 416)")
        length = resp.headers.get("Content-Length")
        length = int(length) if length is not None and length.isdigit() else None
        if status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                raise Corrupt(
                    f"server answered range {resp.headers.get('Content-Range')!r} "
                    f"to a request for bytes {offset}-"
                )
            total = int(m.group(3)) if m.group(3) != "*" else None
            body_len = int(m.group(2)) - offset + 1
            mode = "ab"
        elif status == 200:
            if offset:
                log.info("%s ignored the Range request; restarting %s from 0", exp.url, exp.name)
            offset, total, body_len, mode = 0, length, length, "wb"
        else:
            raise Transient(f"unexpected HTTP status {status}")
        if is_html(resp.headers) and not exp.name.lower().endswith((".html", ".htm")):
            # portals answer maintenance pages and login walls with 200: never land one
            raise Transient(
                f"server answered an HTML page ({resp.headers.get('Content-Type')}) "
                f"instead of {exp.name}"
            )
        if exp.size is not None and total is not None and total != exp.size:
            raise Transient(f"server reports {total} bytes, expected {exp.size}")
        if exp.size is not None and body_len is not None and offset + body_len > exp.size:
            raise Transient(f"server would send {offset + body_len} bytes, expected {exp.size}")

        if mode == "wb":
            state.reset()
        else:
            state.catch_up(partial, offset)
        prog.set(offset)
        received = 0
        try:
            f = open(partial, mode)
        except OSError as e:
            raise Fatal(f"cannot write {partial}: {e}") from e
        with f:
            while True:
                if cancel is not None and cancel.is_set():
                    raise Fatal("cancelled")
                try:
                    block = resp.read(chunk_size)
                except (HTTPException, OSError) as e:  # includes timeouts and resets
                    raise Transient(
                        f"connection lost after {offset + received} bytes: {e!r}"
                    ) from e
                if not block:
                    break
                if exp.size is not None and offset + received + len(block) > exp.size:
                    raise Corrupt(f"server sent more than the expected {exp.size} bytes")
                try:
                    f.write(block)
                except OSError as e:
                    raise Fatal(f"cannot write {partial}: {e}") from e
                state.update(block)
                received += len(block)
                prog.set(offset + received)
            try:
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                raise Fatal(f"cannot write {partial}: {e}") from e
        if body_len is not None and received < body_len:
            raise Transient(
                f"connection closed after {offset + received} of {offset + body_len} bytes"
            )


def _check_space(dest: Path, need: int | None) -> None:
    if not need:
        return
    try:
        free = shutil.disk_usage(dest.parent).free
    except OSError:
        return
    if free < need:
        raise DownloadError(
            f"not enough disk space for {dest.name}: need {need / 1e9:.2f} GB more in "
            f"{dest.parent}, {free / 1e9:.2f} GB free. Free space or point the data directory "
            "elsewhere."
        )


def sleep(seconds: float, cancel: threading.Event | None) -> None:
    """Wait ``seconds``, or less when ``cancel`` is set (the pool stops its workers so)."""
    if seconds <= 0:
        return
    if cancel is not None:
        cancel.wait(seconds)
    else:
        time.sleep(seconds)


# --------------------------------------------------------------------------------------------
# public API


def _progress_enabled(progress: bool) -> bool:
    return bool(progress) and sys.stderr.isatty()


def fetch(
    url_or_remote: str | RemoteFile,
    dest: str | os.PathLike,
    *,
    size: int | None = None,
    md5: str | None = None,
    sha256: str | None = None,
    retries: int = 3,
    timeout: float = 60,
    progress: bool = True,
    backoff: float = 1.0,
    chunk_size: int = CHUNK,
    _on_bytes: Callable[[int], None] | None = None,
    _cancel: threading.Event | None = None,
) -> Path:
    """Download one file to ``dest``, verified, by atomic rename; return ``dest``.

    ``size`` / ``md5`` / ``sha256`` given here override those of a :class:`RemoteFile`.
    ``retries`` is the number of attempts (>= 1); attempt ``k`` waits ``backoff * 2**(k-1)``
    seconds before the next (a server's ``Retry-After`` is honoured up to 60 s).
    ``timeout`` is the socket timeout in seconds. If ``dest`` exists and matches the expected
    size/checksums (or nothing is expected), it is returned without any request; if it exists
    but does not match, it is deleted and downloaded again.

    Raises :class:`DownloadError` (nothing at ``dest``) when the URL is not allowed, on a
    permanent HTTP error (e.g. 404), or after ``retries`` failed attempts.
    """
    remote = url_or_remote if isinstance(url_or_remote, RemoteFile) else RemoteFile(url_or_remote)
    remote = RemoteFile(
        remote.url,
        size=size if size is not None else remote.size,
        md5=md5 if md5 is not None else remote.md5,
        sha256=sha256 if sha256 is not None else remote.sha256,
        name=remote.name,
    )
    if retries < 1:
        raise ValueError(f"retries must be >= 1, got {retries}")
    dest = Path(dest)
    exp = Expect(
        remote.url,
        remote.size,
        remote.md5,
        remote.sha256,
        remote.name or dest.name,
    )
    check_url(remote.url)
    if dest.is_dir():
        raise ValueError(f"dest {dest} is a directory; pass the file path to write")

    if dest.exists():
        problem = mismatch(dest, exp)
        if problem is None:
            if _on_bytes is not None:
                _on_bytes(dest.stat().st_size)
            return dest
        log.warning("%s exists but does not verify (%s); downloading it again", dest, problem)
        dest.unlink()

    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    if partial.is_dir():
        raise ValueError(f"{partial} is a directory; remove it")
    have = partial.stat().st_size if partial.exists() else 0
    if exp.size is not None:
        _check_space(dest, max(0, exp.size - have))

    state = _HashState(exp.md5, exp.sha256)
    prog = _Progress(exp, _progress_enabled(progress), _on_bytes)
    last: Exception | None = None
    try:
        for attempt in range(1, retries + 1):
            try:
                have = partial.stat().st_size if partial.exists() else 0
                if exp.size is not None and have > exp.size:
                    raise Corrupt(f"partial file has {have} bytes, more than {exp.size}")
                if exp.size is None or have < exp.size:
                    _transfer(exp, partial, state, prog, timeout, chunk_size, _cancel)
                have = partial.stat().st_size if partial.exists() else 0
                if not partial.exists():
                    partial.touch()  # an empty body is a valid (empty) file
                if exp.size is not None and have < exp.size:
                    raise Transient(f"expected {exp.size} bytes, got {have} so far")
                state.catch_up(partial, have)
                problem = mismatch(partial, exp, state.hashers)
                if problem is not None:
                    raise Corrupt(problem)
                os.replace(partial, dest)
                _fsync_dir(dest.parent)
                return dest
            except Fatal as e:
                raise DownloadError(f"download of {exp.url} failed: {e}", url=exp.url) from e
            except Transient as e:
                last = e
                if isinstance(e, Corrupt):
                    partial.unlink(missing_ok=True)
                    state.reset()
                    prog.set(0)
                if attempt < retries:
                    delay = min(MAX_BACKOFF_S, backoff * 2 ** (attempt - 1))
                    if e.retry_after is not None:
                        delay = max(delay, min(MAX_BACKOFF_S, e.retry_after))
                    log.warning(
                        "%s: attempt %d/%d failed (%s); retrying in %.1f s",
                        exp.name,
                        attempt,
                        retries,
                        e,
                        delay,
                    )
                    sleep(delay, _cancel)
    finally:
        prog.close()
    kept = ""
    if partial.exists():
        kept = f"; {partial.stat().st_size} bytes kept in {partial} for resuming"
    raise DownloadError(
        f"download of {exp.url} failed after {retries} attempts (expected {exp.describe()}): "
        f"{last}{kept}",
        url=exp.url,
    ) from last


def fetch_many(
    items: Sequence[tuple[RemoteFile | str, str | os.PathLike]],
    concurrency: int = 8,
    **kw,
) -> list[Path]:
    """Fetch several files with a bounded thread pool; return the destinations in order.

    Each item is retried on its own (``retries`` etc. in ``kw`` go to :func:`fetch`). All items
    are attempted; if any failed, one :class:`DownloadError` lists every failure (the files that
    did arrive stay, so a rerun fetches only the rest). One tqdm bar shows the total bytes.
    """
    for key in ("size", "md5", "sha256"):
        if key in kw:
            raise ValueError(f"fetch_many: pass {key} per item in a RemoteFile, not as a keyword")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    items = [(r if isinstance(r, RemoteFile) else RemoteFile(r), Path(d)) for r, d in items]
    dests = [d.resolve() for _, d in items]
    dupes = {str(d) for d in dests if dests.count(d) > 1}
    if dupes:
        raise ValueError(f"fetch_many: several items write to the same path: {sorted(dupes)}")
    for remote, _ in items:
        check_url(remote.url)
    if not items:
        return []

    progress = kw.pop("progress", True)
    sizes = [r.size for r, _ in items]
    total = sum(sizes) if all(s is not None for s in sizes) else None
    bar = tqdm(
        total=total,
        desc=f"downloading {len(items)} files",
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not _progress_enabled(progress),
    )
    lock = threading.Lock()
    cancel = threading.Event()
    done = [0]

    def on_bytes(n: int) -> None:
        with lock:
            bar.update(n)

    def one(remote: RemoteFile, dest: Path) -> Path:
        path = fetch(remote, dest, progress=False, _on_bytes=on_bytes, _cancel=cancel, **kw)
        with lock:
            done[0] += 1
            bar.set_postfix_str(f"{done[0]}/{len(items)} files")
        return path

    failures: list[tuple[RemoteFile, Path, BaseException]] = []
    out: list[Path] = []
    futures = []
    pool = ThreadPoolExecutor(max_workers=min(concurrency, len(items)))
    try:
        futures = [pool.submit(one, r, d) for r, d in items]
        for (remote, dest), fut in zip(items, futures):
            try:
                out.append(fut.result())
            except (DownloadError, OSError, ValueError) as e:  # what fetch raises for a file
                failures.append((remote, dest, e))
    except BaseException:  # KeyboardInterrupt: stop the workers, keep their partials
        cancel.set()
        for fut in futures:
            fut.cancel()
        raise
    finally:
        pool.shutdown(wait=True)
        bar.close()
    if failures:
        lines = "\n".join(f"  {d.name} <- {r.url}: {e}" for r, d, e in failures)
        err = DownloadError(
            f"{len(failures)} of {len(items)} downloads failed:\n{lines}",
            url=failures[0][0].url,
        )
        err.failures = failures
        raise err from failures[0][2]
    return out
