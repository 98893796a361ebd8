"""File look-ups in the data repositories' APIs (Zenodo, Dataverse): URL, size and checksum."""

from __future__ import annotations

import json
import logging
import re
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPException

from equipipe.data.download.policy import Fatal, Transient, is_html, open_url
from equipipe.data.download.remote import DownloadError, RemoteFile
from equipipe.data.download.transfer import MAX_BACKOFF_S, sleep

log = logging.getLogger(__name__)


def _get_json(url: str, timeout: float, retries: int, backoff: float):
    last: Exception | None = None
    for attempt in range(1, retries + 1):
        try:
            resp = open_url(url, {"Accept": "application/json"}, timeout)
            with resp:
                status = getattr(resp, "status", None) or resp.code
                if status != 200:
                    raise Fatal(f"HTTP {status}")
                if is_html(resp.headers):
                    raise Transient(f"an HTML page ({resp.headers.get('Content-Type')}), not JSON")
                body = resp.read()
            try:
                return json.loads(body)
            except ValueError as e:
                if body.lstrip()[:1] == b"<":  # an HTML error page served with 200: retry
                    raise Transient(f"an HTML page instead of JSON: {body[:80]!r}") from e
                raise Fatal(f"response is not JSON: {body[:200]!r}") from e
        except Fatal as e:
            raise DownloadError(f"metadata request {url} failed: {e}", url=url) from e
        except (Transient, HTTPException, OSError) as e:
            last = e
            if attempt < retries:
                wait = backoff * 2 ** (attempt - 1)
                if getattr(e, "retry_after", None) is not None:  # 429/503 Retry-After
                    wait = max(wait, e.retry_after)
                sleep(min(MAX_BACKOFF_S, wait), None)
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
