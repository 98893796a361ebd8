"""A loopback HTTP server for tests: fixture files, JSON APIs, Range requests, injected faults.

Use the ``http_server`` pytest fixture (registered through ``tests/conftest.py``)::

    def test_x(http_server, tmp_path):
        url = http_server.add("/data/a.bin", b"...", Fault(drop_after=100, times=1))
        fetch(url, tmp_path / "a.bin", ...)
        assert http_server.requests_for("/data/a.bin")[1].headers["Range"] == "bytes=100-"

Faults are consumed in order: ``add(path, body, Fault(status=500, times=2), Fault(drop_after=10,
times=1))`` answers 500 twice, then drops the connection once, then serves normally. A fault
with ``times=None`` applies to every later request.

The server listens on 127.0.0.1 with an OS-chosen port, serves from a daemon thread, and stops
at fixture teardown; every handler has a socket timeout so nothing can hang a test run.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

__all__ = ["Fault", "LoopbackServer", "RequestRecord", "http_server"]


@dataclass
class Fault:
    """One way of misbehaving, for the next ``times`` requests of a path (None: forever).

    - ``status``: answer with this HTTP status (e.g. 500, 503, 404) and a short text body.
    - ``drop_after``: send the headers and this many body bytes, then close the connection.
    - ``truncate_to``: send nothing past this absolute byte offset of the file, while the
      headers (Content-Length / Content-Range) still claim the whole body, then close.
    - ``corrupt``: flip bits in the body (same length, wrong checksum).
    - ``ignore_range``: answer a Range request with 200 and the whole file.
    - ``delay_s``: sleep before answering (for timeout tests).
    - ``headers``: extra response headers of a ``status`` answer (e.g. ``Retry-After``).
    - ``html_page``: answer 200 with an HTML error page (``text/html``), as portals do during
      maintenance or behind a login wall, instead of the file.
    """

    status: int | None = None
    drop_after: int | None = None
    truncate_to: int | None = None
    corrupt: bool = False
    ignore_range: bool = False
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    html_page: bool = False
    times: int | None = 1


HTML_ERROR_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Service unavailable</title></head>\n"
    b"<body><h1>We are down for maintenance</h1><p>Please try again later.</p></body></html>\n"
)


@dataclass
class RequestRecord:
    method: str
    path: str  # as received, with query string
    headers: dict[str, str]
    status: int | None = None  # what the server answered (None if dropped before headers)


@dataclass
class _Resource:
    body: bytes
    content_type: str = "application/octet-stream"
    faults: list[Fault] = field(default_factory=list)
    redirect: str | None = None
    redirect_status: int = 302
    headers: dict[str, str] = field(default_factory=dict)
    hits: int = 0


def _corrupted(body: bytes) -> bytes:
    if not body:
        return b"\x00"
    out = bytearray(body)
    for i in range(0, len(out), max(1, len(out) // 7)):
        out[i] ^= 0xFF
    return bytes(out)


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # seconds; bounds a stuck client connection
    server: _Server

    def log_message(self, format, *args):  # keep pytest output quiet
        pass

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        with self.server.lock:
            self.server.in_flight += 1
            self.server.peak_in_flight = max(self.server.peak_in_flight, self.server.in_flight)
        try:
            self._serve(head=False)
        finally:
            with self.server.lock:
                self.server.in_flight -= 1

    def _record(self) -> RequestRecord:
        rec = RequestRecord(self.command, self.path, {k: v for k, v in self.headers.items()})
        with self.server.lock:
            self.server.log.append(rec)
        return rec

    def _send_simple(
        self, rec: RequestRecord, status: int, body: bytes, ctype="text/plain", headers=None
    ):
        rec.status = status
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.close_connection = True

    def _drop(self):
        self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _serve(self, head: bool):
        rec = self._record()
        res, fault = self.server.lookup(self.path)
        if res is None:
            return self._send_simple(rec, 404, b"not found\n")
        if fault is not None and fault.delay_s:
            threading.Event().wait(fault.delay_s)
        if res.redirect is not None:
            rec.status = res.redirect_status
            self.send_response(res.redirect_status)
            self.send_header("Location", res.redirect)
            self.send_header("Content-Length", "0")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            return
        if fault is not None and fault.status is not None:
            body = f"injected {fault.status}\n".encode()
            return self._send_simple(rec, fault.status, body, headers=fault.headers)
        if fault is not None and fault.html_page:
            return self._send_simple(rec, 200, HTML_ERROR_PAGE, "text/html; charset=utf-8")

        body = _corrupted(res.body) if fault is not None and fault.corrupt else res.body
        total = len(body)
        start, end, status = 0, total - 1, 200
        want = self.headers.get("Range")
        if want and not (fault is not None and fault.ignore_range):
            m = _RANGE.match(want.strip())
            if not m or (not m.group(1) and not m.group(2)):
                return self._send_simple(rec, 400, b"bad range\n")
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), total - 1) if m.group(2) else total - 1
            else:  # suffix range: the last N bytes
                start, end = max(0, total - int(m.group(2))), total - 1
            if start >= total or start > end:
                rec.status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{total}")
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                return
            status = 206

        rec.status = status
        self.send_response(status)
        self.send_header("Content-Type", res.content_type)
        for k, v in res.headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{total}")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if head:
            return
        chunk = body[start : end + 1]
        if fault is not None and fault.truncate_to is not None:
            chunk = chunk[: max(0, fault.truncate_to - start)]
        if fault is not None and fault.drop_after is not None:
            chunk = chunk[: fault.drop_after]
        try:
            self.wfile.write(chunk)
        except OSError:
            return
        if len(chunk) < end - start + 1:
            self._drop()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.resources: dict[str, _Resource] = {}
        self.log: list[RequestRecord] = []
        self.in_flight = 0
        self.peak_in_flight = 0  # most GET requests being answered at once

    def lookup(self, raw_path: str) -> tuple[_Resource | None, Fault | None]:
        """Find the resource for a request path and consume one fault use, atomically."""
        full = urllib.parse.unquote(raw_path)
        bare = urllib.parse.unquote(urllib.parse.urlsplit(raw_path).path)
        with self.lock:
            res = self.resources.get(full) or self.resources.get(bare)
            if res is None:
                return None, None
            res.hits += 1
            for fault in res.faults:
                if fault.times is None:
                    return res, fault
                if fault.times > 0:
                    fault.times -= 1
                    return res, fault
            return res, None


class LoopbackServer:
    """Handle to a running server: register content, read the request log, stop."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None):
        """Plain http; with a server-side ``ssl_context`` it speaks https instead."""
        self._server = _Server()
        host, port = self._server.server_address[:2]
        scheme = "http"
        if ssl_context is not None:
            self._server.socket = ssl_context.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
            scheme = "https"
        self.base_url = f"{scheme}://{host}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="loopback-http",
            daemon=True,
        )
        self._thread.start()

    def url(self, path: str) -> str:
        return self.base_url + (path if path.startswith("/") else "/" + path)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def other_host_url(self, path: str) -> str:
        """``url(path)`` under the host name ``localhost`` instead of ``127.0.0.1``.

        The same server, reached under another host name: what a repository's redirect of
        file content to its storage host looks like on loopback.
        """
        scheme = self.base_url.split("://", 1)[0]
        return f"{scheme}://localhost:{self.port}" + (path if path.startswith("/") else "/" + path)

    def add(
        self,
        path: str,
        body: bytes,
        *faults: Fault,
        content_type: str = "application/octet-stream",
        headers: dict[str, str] | None = None,
    ) -> str:
        """Serve ``body`` at ``path`` (may include a query string); return its URL.

        ``headers`` are sent with every answer (e.g. ``Content-Encoding: gzip`` for a ``.gz``
        served as many file servers do: the body is the gzip file itself).
        """
        if not path.startswith("/"):
            path = "/" + path
        with self._server.lock:
            self._server.resources[urllib.parse.unquote(path)] = _Resource(
                bytes(body), content_type, list(faults), headers=dict(headers or {})
            )
        return self.url(path)

    def add_json(self, path: str, obj, *faults: Fault) -> str:
        """Serve ``obj`` (or a JSON string) as an ``application/json`` API response."""
        text = obj if isinstance(obj, str) else json.dumps(obj)
        return self.add(path, text.encode(), *faults, content_type="application/json")

    def redirect(self, path: str, location: str, status: int = 302) -> str:
        """Answer ``path`` with a redirect to ``location``; return the URL of ``path``."""
        if not path.startswith("/"):
            path = "/" + path
        with self._server.lock:
            self._server.resources[urllib.parse.unquote(path)] = _Resource(
                b"", redirect=location, redirect_status=status
            )
        return self.url(path)

    def set_faults(self, path: str, *faults: Fault) -> None:
        """Replace the pending faults of an already registered path."""
        with self._server.lock:
            self._server.resources[urllib.parse.unquote(path)].faults = list(faults)

    @property
    def requests(self) -> list[RequestRecord]:
        with self._server.lock:
            return list(self._server.log)

    def requests_for(self, path: str) -> list[RequestRecord]:
        """Logged requests whose path (without query string) equals ``path``."""
        want = urllib.parse.unquote(path.split("?")[0])
        return [
            r
            for r in self.requests
            if urllib.parse.unquote(urllib.parse.urlsplit(r.path).path) == want
        ]

    @property
    def peak_in_flight(self) -> int:
        """The largest number of GET requests answered at the same time so far."""
        with self._server.lock:
            return self._server.peak_in_flight

    def clear_log(self) -> None:
        with self._server.lock:
            self._server.log.clear()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> LoopbackServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@pytest.fixture
def http_server():
    """A fresh :class:`LoopbackServer` on 127.0.0.1, stopped after the test."""
    server = LoopbackServer()
    try:
        yield server
    finally:
        server.close()
