"""The one downloader for every remote source: resumable, verified, atomic.

Every file that a pipeline rule downloads goes through :func:`fetch` (or :func:`fetch_many`):

- HTTPS with certificate and hostname checks; plain ``http`` only to the loopback interface
  (127.0.0.1, localhost, ::1), which the tests use. Redirects are held to the same rule.
- Every connection (the first request and each redirect) resolves its host first and refuses
  loopback, private, link-local, shared and reserved addresses before any socket opens (a
  redirect from the upstream to ``169.254.169.254`` or ``localhost`` goes nowhere); the socket
  then connects to the checked address itself (no second resolution). Exceptions are explicit:
  ``EQUIPIPE_DOWNLOAD_ALLOW`` lists ``host:port`` pairs that may be contacted anyway (the tests'
  loopback servers register themselves there; a mirror on a private network goes there too).
- The body streams into ``<dest>.partial``; a later attempt (or a later run) resumes it with an
  HTTP ``Range`` request. A server that ignores ``Range`` (answers 200) restarts the file cleanly.
- The finished file is checked for size, then md5 / sha256, and only then renamed into place
  (atomic on one file system). A truncated or corrupt file therefore never appears at ``dest``.
- ``retries`` attempts with exponential backoff; after the last one :class:`DownloadError` names
  the URL and what was expected and received. A partial judged corrupt is deleted; a partial
  that is merely short (the connection dropped) stays so that the next run resumes it.
- An existing ``dest`` that verifies is left alone without any network request (idempotent).

Only the standard library speaks HTTP (``urllib``); ``tqdm`` draws the progress bars.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

from tqdm import tqdm

from equipipe.errors import ActionableError

__all__ = [
    "DownloadError",
    "RemoteFile",
    "check_url",
    "dataverse_files",
    "fetch",
    "fetch_many",
    "verify_gzip",
    "zenodo_file",
]

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes per read; large enough for throughput, small enough for live progress
MAX_BACKOFF_S = 60.0
USER_AGENT = "equipipe-downloader/1 (+python-urllib)"
_LOOPBACK_NAMES = {"localhost"}
_HEX = re.compile(r"^[0-9a-f]+$")


class DownloadError(ActionableError):
    """A download (or the metadata look-up before it) failed for good.

    ``url`` is the address concerned; nothing is left at the destination path.
    """

    advice = "check the address and the network connection, then rerun the job"

    def __init__(self, message: str, *, url: str | None = None):
        super().__init__(message)
        self.url = url


@dataclass(frozen=True)
class RemoteFile:
    """A remote file and what it must look like once downloaded.

    ``size`` in bytes; ``md5`` / ``sha256`` as lower-case hex digests; ``name`` a display name
    (the repository's file name), also used as the progress bar label.
    """

    url: str
    size: int | None = None
    md5: str | None = None
    sha256: str | None = None
    name: str | None = None

    def __post_init__(self):
        if self.size is not None and (not isinstance(self.size, int) or self.size < 0):
            raise ValueError(f"RemoteFile.size must be a non-negative int, got {self.size!r}")
        for algo, length in (("md5", 32), ("sha256", 64)):
            value = getattr(self, algo)
            if value is None:
                continue
            norm = value.strip().lower()
            if len(norm) != length or not _HEX.match(norm):
                raise ValueError(f"RemoteFile.{algo} must be {length} hex digits, got {value!r}")
            object.__setattr__(self, algo, norm)


# --------------------------------------------------------------------------------------------
# URL policy and the HTTP opener


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str) -> str:
    """Return ``url`` if policy allows it, else raise :class:`DownloadError` saying why.

    Allowed: ``https://`` anywhere; ``http://`` only to 127.0.0.1 / localhost / ::1.
    """
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "https" and parts.hostname:
        return url
    if scheme == "http" and _is_loopback(parts.hostname):
        return url
    if scheme == "http":
        raise DownloadError(
            f"refusing plain-http URL {url}: only https is allowed for remote hosts "
            "(plain http is accepted for 127.0.0.1/localhost/::1 only). Use the https:// address.",
            url=url,
        )
    raise DownloadError(f"refusing URL {url!r}: scheme must be https (got {scheme!r})", url=url)


ALLOW_ENV = "EQUIPIPE_DOWNLOAD_ALLOW"


class RefusedAddress(OSError):
    """A host resolved to an address downloads may not contact; no socket was opened."""


def _allowed_pairs() -> set[tuple[str, int]]:
    out = set()
    for item in os.environ.get(ALLOW_ENV, "").replace(" ", "").split(","):
        host, _, port = item.rpartition(":")
        if host and port.isdigit():
            out.add((host.strip("[]").lower(), int(port)))
    return out


def address_refusal(ip: str, port: int, host: str | None = None) -> str | None:
    """Why ``ip`` (resolved from ``host``) may not be contacted on ``port``; None if it may.

    Refused unless listed in ``EQUIPIPE_DOWNLOAD_ALLOW``: loopback, private (RFC 1918, ULA),
    link-local (169.254/16 and fe80::/10, cloud metadata services), shared (100.64/10),
    multicast, unspecified and reserved ranges - anything that is not a global unicast address.
    """
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_global and not addr.is_multicast:
        return None
    allowed = _allowed_pairs()
    names = {str(addr), ip.split("%", 1)[0].lower(), (host or "").lower()}
    if any((name, port) in allowed for name in names):
        return None
    kind = next(
        k
        for k, yes in (
            ("loopback", addr.is_loopback),
            ("link-local", addr.is_link_local),
            ("private", addr.is_private),
            ("multicast", addr.is_multicast),
            ("non-global", True),
        )
        if yes
    )
    return (
        f"refusing to connect to {host or ip} ({addr}, a {kind} address, port {port}): downloads "
        f"only reach public hosts. If this host is a mirror you trust, add '{host or ip}:{port}' "
        f"to the {ALLOW_ENV} environment variable"
    )


def _checked_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None):
    """``socket.create_connection`` that resolves once, checks, and connects to what it checked."""
    host, port = address
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    ok, refusals = [], []
    for info in infos:
        why = address_refusal(info[4][0], port, host)
        (refusals if why else ok).append(why or info)
    if not ok:
        raise RefusedAddress(refusals[0] if refusals else f"{host} did not resolve")
    last: OSError | None = None
    for family, type_, proto, _, sockaddr in ok:
        sock = socket.socket(family, type_, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            last = e
    raise last  # type: ignore[misc]


class _CheckedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._create_connection = _checked_connection


class _CheckedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._create_connection = _checked_connection

    def connect(self):
        if self._tunnel_host:  # through a user-configured proxy: check the target too
            for info in socket.getaddrinfo(self._tunnel_host, self._tunnel_port or 443):
                why = address_refusal(info[4][0], self._tunnel_port or 443, self._tunnel_host)
                if why:
                    raise RefusedAddress(why)
            self._create_connection = socket.create_connection  # the proxy itself
        super().connect()


class _CheckedHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_CheckedHTTPConnection, req)


class _CheckedHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_CheckedHTTPSConnection, req, context=self._context)


class _PolicyRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to URLs that :func:`check_url` accepts."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        newurl = urllib.parse.urljoin(req.full_url, newurl)
        check_url(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_SSL_CONTEXT: ssl.SSLContext | None = None
_SSL_LOCK = threading.Lock()


def _ssl_context() -> ssl.SSLContext:
    # create_default_context checks certificates and host names and honours SSL_CERT_FILE.
    global _SSL_CONTEXT
    with _SSL_LOCK:
        if _SSL_CONTEXT is None:
            _SSL_CONTEXT = ssl.create_default_context()
        return _SSL_CONTEXT


def _opener(url: str) -> urllib.request.OpenerDirector:
    handlers: list = [
        _PolicyRedirectHandler(),
        _CheckedHTTPHandler(),
        _CheckedHTTPSHandler(context=_ssl_context()),
    ]
    if _is_loopback(urllib.parse.urlsplit(url).hostname):
        handlers.append(urllib.request.ProxyHandler({}))  # never send loopback via a proxy
    return urllib.request.build_opener(*handlers)


# --------------------------------------------------------------------------------------------
# failure classes used inside the retry loop


class _Transient(Exception):
    """Worth another attempt; the partial file (if any) is still valid so far."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Corrupt(_Transient):
    """Worth another attempt from scratch; the partial file is wrong and gets deleted."""


class _Fatal(Exception):
    """No point retrying (404, certificate failure, disk error, cancelled)."""


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _is_html(headers) -> bool:
    ctype = (headers.get("Content-Type") or "") if headers is not None else ""
    return ctype.split(";")[0].strip().lower() in ("text/html", "application/xhtml+xml")


def _open(url: str, headers: dict[str, str], timeout: float):
    """Open ``url``; translate urllib's errors into retryable / fatal ones."""
    check_url(url)
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **headers})
    try:
        return _opener(url).open(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416:
            return e  # the caller decides what an unsatisfiable range means
        detail = f"HTTP {e.code} {e.reason}"
        e.close()
        if e.code >= 500 or e.code in (408, 425, 429):
            raise _Transient(detail, retry_after=_retry_after(e.headers)) from e
        raise _Fatal(detail) from e
    except urllib.error.URLError as e:
        if isinstance(e.reason, RefusedAddress):
            raise _Fatal(str(e.reason)) from e
        if isinstance(e.reason, ssl.SSLCertVerificationError):
            raise _Fatal(
                f"TLS certificate check failed ({e.reason.verify_message}); if a proxy or "
                "missing CA store is the cause, point SSL_CERT_FILE at a CA bundle "
                "(e.g. `python -m certifi`)"
            ) from e
        raise _Transient(f"connection failed: {e.reason}") from e
    except (HTTPException, OSError) as e:
        raise _Transient(f"connection failed: {e!r}") from e


# --------------------------------------------------------------------------------------------
# verification helpers


def _hashers(md5: str | None, sha256: str | None) -> dict:
    out = {}
    if md5:
        out["md5"] = hashlib.md5(usedforsecurity=False)
    if sha256:
        out["sha256"] = hashlib.sha256()
    return out


def _hash_file(path: Path, hashers: dict, limit: int | None = None) -> None:
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
class _Expect:
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


def _mismatch(path: Path, exp: _Expect, hashers: dict | None = None) -> str | None:
    """None if ``path`` matches ``exp``; else a message saying what was expected and found.

    ``hashers`` may carry digests already fed with the whole file (saves a second read).
    """
    got = path.stat().st_size
    if exp.size is not None and got != exp.size:
        return f"expected {exp.size} bytes, got {got}"
    if hashers is None:
        hashers = _hashers(exp.md5, exp.sha256)
        _hash_file(path, hashers)
    for algo in ("md5", "sha256"):
        want = getattr(exp, algo)
        if want and hashers[algo].hexdigest() != want:
            return f"expected {algo} {want}, got {hashers[algo].hexdigest()}"
    return None


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

    def __init__(self, exp: _Expect, enabled: bool, on_bytes: Callable[[int], None] | None):
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
        self.n, self.hashers = 0, _hashers(self.md5, self.sha256)

    def catch_up(self, partial: Path, size: int) -> None:
        """Make the digests cover exactly the first ``size`` bytes of ``partial``."""
        if not (self.md5 or self.sha256):
            return
        if self.hashers is None or self.n != size:
            self.reset()
            if size:
                _hash_file(partial, self.hashers, limit=size)
            self.n = size

    def update(self, block: bytes) -> None:
        if self.hashers:
            for h in self.hashers.values():
                h.update(block)
        self.n += len(block)


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.I)


def _transfer(
    exp: _Expect,
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
    resp = _open(exp.url, headers, timeout)
    with resp:
        status = getattr(resp, "status", None) or resp.code
        if status == 416:
            # The server has nothing past `offset`: either the partial is already whole, or
            # it is longer than the remote file (stale/corrupt).
            m = re.match(r"bytes\s+\*/(\d+)", resp.headers.get("Content-Range", ""))
            if offset and m and int(m.group(1)) == offset:
                return
            raise _Corrupt(f"server refused resume at byte {offset} (HTTP 416)")
        length = resp.headers.get("Content-Length")
        length = int(length) if length is not None and length.isdigit() else None
        if status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                raise _Corrupt(
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
            raise _Transient(f"unexpected HTTP status {status}")
        if _is_html(resp.headers) and not exp.name.lower().endswith((".html", ".htm")):
            # portals answer maintenance pages and login walls with 200: never land one
            raise _Transient(
                f"server answered an HTML page ({resp.headers.get('Content-Type')}) "
                f"instead of {exp.name}"
            )
        if exp.size is not None and total is not None and total != exp.size:
            raise _Transient(f"server reports {total} bytes, expected {exp.size}")
        if exp.size is not None and body_len is not None and offset + body_len > exp.size:
            raise _Transient(f"server would send {offset + body_len} bytes, expected {exp.size}")

        if mode == "wb":
            state.reset()
        else:
            state.catch_up(partial, offset)
        prog.set(offset)
        received = 0
        try:
            f = open(partial, mode)
        except OSError as e:
            raise _Fatal(f"cannot write {partial}: {e}") from e
        with f:
            while True:
                if cancel is not None and cancel.is_set():
                    raise _Fatal("cancelled")
                try:
                    block = resp.read(chunk_size)
                except (HTTPException, OSError) as e:  # includes timeouts and resets
                    raise _Transient(
                        f"connection lost after {offset + received} bytes: {e!r}"
                    ) from e
                if not block:
                    break
                if exp.size is not None and offset + received + len(block) > exp.size:
                    raise _Corrupt(f"server sent more than the expected {exp.size} bytes")
                try:
                    f.write(block)
                except OSError as e:
                    raise _Fatal(f"cannot write {partial}: {e}") from e
                state.update(block)
                received += len(block)
                prog.set(offset + received)
            try:
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                raise _Fatal(f"cannot write {partial}: {e}") from e
        if body_len is not None and received < body_len:
            raise _Transient(
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


def _sleep(seconds: float, cancel: threading.Event | None) -> None:
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
    exp = _Expect(
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
        problem = _mismatch(dest, exp)
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
                    raise _Corrupt(f"partial file has {have} bytes, more than {exp.size}")
                if exp.size is None or have < exp.size:
                    _transfer(exp, partial, state, prog, timeout, chunk_size, _cancel)
                have = partial.stat().st_size if partial.exists() else 0
                if not partial.exists():
                    partial.touch()  # an empty body is a valid (empty) file
                if exp.size is not None and have < exp.size:
                    raise _Transient(f"expected {exp.size} bytes, got {have} so far")
                state.catch_up(partial, have)
                problem = _mismatch(partial, exp, state.hashers)
                if problem is not None:
                    raise _Corrupt(problem)
                os.replace(partial, dest)
                _fsync_dir(dest.parent)
                return dest
            except _Fatal as e:
                raise DownloadError(f"download of {exp.url} failed: {e}", url=exp.url) from e
            except _Transient as e:
                last = e
                if isinstance(e, _Corrupt):
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
                    _sleep(delay, _cancel)
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


def _get_json(url: str, timeout: float, retries: int, backoff: float):
    last: Exception | None = None
    for attempt in range(1, retries + 1):
        try:
            resp = _open(url, {"Accept": "application/json"}, timeout)
            with resp:
                status = getattr(resp, "status", None) or resp.code
                if status != 200:
                    raise _Fatal(f"HTTP {status}")
                if _is_html(resp.headers):
                    raise _Transient(f"an HTML page ({resp.headers.get('Content-Type')}), not JSON")
                body = resp.read()
            try:
                return json.loads(body)
            except ValueError as e:
                if body.lstrip()[:1] == b"<":  # an HTML error page served with 200: retry
                    raise _Transient(f"an HTML page instead of JSON: {body[:80]!r}") from e
                raise _Fatal(f"response is not JSON: {body[:200]!r}") from e
        except _Fatal as e:
            raise DownloadError(f"metadata request {url} failed: {e}", url=url) from e
        except (_Transient, HTTPException, OSError) as e:
            last = e
            if attempt < retries:
                wait = backoff * 2 ** (attempt - 1)
                if getattr(e, "retry_after", None) is not None:  # 429/503 Retry-After
                    wait = max(wait, e.retry_after)
                _sleep(min(MAX_BACKOFF_S, wait), None)
    raise DownloadError(
        f"metadata request {url} failed after {retries} attempts: {last}", url=url
    ) from last


def _parse_checksum(value: str | None) -> tuple[str | None, str | None]:
    """'md5:<hex>' / 'sha256:<hex>' / bare hex -> (md5, sha256)."""
    if not value:
        return None, None
    algo, _, digest = value.strip().lower().rpartition(":")
    if not algo:
        algo = {32: "md5", 64: "sha256"}.get(len(digest), "")
    algo = algo.replace("-", "")
    if algo == "md5":
        return digest, None
    if algo == "sha256":
        return None, digest
    log.warning("unsupported checksum %r; the file will be checked by size only", value)
    return None, None


def zenodo_file(
    record_id: int | str,
    filename: str,
    api: str = "https://zenodo.org/api",
    *,
    timeout: float = 60,
    retries: int = 3,
    backoff: float = 1.0,
) -> RemoteFile:
    """Look up ``filename`` in Zenodo record ``record_id``: its URL, size and md5.

    Reads ``<api>/records/<record_id>``. Handles the current shape (``files`` a list of
    ``{key, size, checksum: "md5:…", links: {self}}``), the InvenioRDM shape
    (``files: {entries: {key: {…, links: {content}}}}``) and the legacy deposition shape
    (``filename``, ``filesize``, bare md5, ``links.download``).
    """
    url = f"{api.rstrip('/')}/records/{record_id}"
    record = _get_json(url, timeout, retries, backoff)
    files = record.get("files") if isinstance(record, dict) else None
    if isinstance(files, dict):
        files = list((files.get("entries") or {}).values())
    if not isinstance(files, list):
        raise DownloadError(f"Zenodo record {record_id}: no file list in {url}", url=url)
    names = []
    for entry in files:
        key = entry.get("key") or entry.get("filename")
        names.append(key)
        if key != filename:
            continue
        size = entry.get("size", entry.get("filesize"))
        md5, sha256 = _parse_checksum(entry.get("checksum"))
        links = entry.get("links") or {}
        link = links.get("content") or links.get("download") or links.get("self")
        if not link:
            raise DownloadError(
                f"Zenodo record {record_id}: file {filename} has no download link", url=url
            )
        return RemoteFile(
            urllib.parse.urljoin(url, link),
            size=int(size) if size is not None else None,
            md5=md5,
            sha256=sha256,
            name=filename,
        )
    raise DownloadError(
        f"Zenodo record {record_id} has no file {filename!r}; it has: {', '.join(map(str, names))}",
        url=url,
    )


def _normalise_pid(doi: str) -> str:
    pid = doi.strip()
    for prefix in ("https://doi.org/", "http://doi.org/", "https://dx.doi.org/"):
        if pid.lower().startswith(prefix):
            pid = pid[len(prefix) :]
    if not re.match(r"^(doi|hdl|perma):", pid, re.I):
        pid = f"doi:{pid}"
    return pid


def dataverse_files(
    doi: str,
    api: str = "https://dataverse.harvard.edu/api",
    *,
    timeout: float = 60,
    retries: int = 3,
    backoff: float = 1.0,
) -> dict[int, RemoteFile]:
    """All files of the latest version of a Dataverse dataset, keyed by datafile id.

    Reads ``<api>/datasets/:persistentId/?persistentId=doi:…``; each file downloads from
    ``<api>/access/datafile/<id>``. Ingested tabular files are fetched in their original
    format (``?format=original``) with the original size, which is what the md5 describes.
    """
    api = api.rstrip("/")
    pid = _normalise_pid(doi)
    url = f"{api}/datasets/:persistentId/?persistentId={urllib.parse.quote(pid, safe=':/')}"
    payload = _get_json(url, timeout, retries, backoff)
    if not isinstance(payload, dict) or payload.get("status", "OK") != "OK":
        message = payload.get("message") if isinstance(payload, dict) else payload
        raise DownloadError(f"Dataverse {url} answered an error: {message}", url=url)
    try:
        entries = payload["data"]["latestVersion"]["files"]
    except (KeyError, TypeError) as e:
        raise DownloadError(f"Dataverse {url}: no data.latestVersion.files", url=url) from e
    out: dict[int, RemoteFile] = {}
    for entry in entries:
        df = entry.get("dataFile") or {}
        if "id" not in df:
            continue
        fid = int(df["id"])
        checksum = df.get("checksum") or {}
        if checksum.get("value"):
            md5, sha256 = _parse_checksum(f"{checksum.get('type', '')}:{checksum['value']}")
        else:
            md5, sha256 = _parse_checksum(df.get("md5"))
        name = df.get("filename") or entry.get("label") or str(fid)
        size = df.get("filesize")
        file_url = f"{api}/access/datafile/{fid}"
        if df.get("originalFileFormat") and df.get("originalFileSize") is not None:
            file_url += "?format=original"
            size = df["originalFileSize"]
            name = df.get("originalFileName") or name
        out[fid] = RemoteFile(
            file_url,
            size=int(size) if size is not None else None,
            md5=md5,
            sha256=sha256,
            name=name,
        )
    return out


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
