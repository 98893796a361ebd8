"""Which addresses a download may contact, and opening a URL under that policy.

HTTPS with certificate and hostname checks; plain ``http`` only to the loopback interface.
Every connection (the first request and each redirect) resolves its host once, refuses
loopback, private, link-local, shared and reserved addresses before any socket opens, and
connects to the address it checked; ``EQUIPIPE_DOWNLOAD_ALLOW`` lists ``host:port`` exceptions.
:func:`open_url` sorts urllib's failures into :class:`Transient` (retry), :class:`Corrupt`
(retry from scratch) and :class:`Fatal` (give up).
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPException

from equipipe.data.download.remote import DownloadError

USER_AGENT = "equipipe-downloader/1 (+python-urllib)"
_LOOPBACK_NAMES = {"localhost"}


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


class Transient(Exception):
    """Worth another attempt; the partial file (if any) is still valid so far."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class Corrupt(Transient):
    """Worth another attempt from scratch; the partial file is wrong and gets deleted."""


class Fatal(Exception):
    """No point retrying (404, certificate failure, disk error, cancelled)."""


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def is_html(headers) -> bool:
    """True when the response headers announce an HTML page (an error or login page)."""
    ctype = (headers.get("Content-Type") or "") if headers is not None else ""
    return ctype.split(";")[0].strip().lower() in ("text/html", "application/xhtml+xml")


def open_url(url: str, headers: dict[str, str], timeout: float):
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
            raise Transient(detail, retry_after=_retry_after(e.headers)) from e
        raise Fatal(detail) from e
    except urllib.error.URLError as e:
        if isinstance(e.reason, RefusedAddress):
            raise Fatal(str(e.reason)) from e
        if isinstance(e.reason, ssl.SSLCertVerificationError):
            raise Fatal(
                f"TLS certificate check failed ({e.reason.verify_message}); if a proxy or "
                "missing CA store is the cause, point SSL_CERT_FILE at a CA bundle "
                "(e.g. `python -m certifi`)"
            ) from e
        raise Transient(f"connection failed: {e.reason}") from e
    except (HTTPException, OSError) as e:
        raise Transient(f"connection failed: {e!r}") from e
