"""The downloader against a real loopback HTTP server with injected faults."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import time
from pathlib import Path

import pytest

from equipipe.data.download import (
    DownloadError,
    RemoteFile,
    check_url,
    dataverse_files,
    fetch,
    fetch_many,
    verify_gzip,
    zenodo_file,
)
from tests.httpserver import Fault

FIXTURES = Path(__file__).parent / "fixtures" / "download"
SIZE = 200_000
FAST = {"backoff": 0.0, "chunk_size": 16_384, "timeout": 5, "progress": False}


def _body(seed: int = 0, size: int = SIZE) -> bytes:
    return random.Random(seed).randbytes(size)


def _remote(url: str, body: bytes, name: str | None = None) -> RemoteFile:
    return RemoteFile(
        url,
        size=len(body),
        md5=hashlib.md5(body).hexdigest(),
        sha256=hashlib.sha256(body).hexdigest(),
        name=name,
    )


def _partial(dest: Path) -> Path:
    return dest.with_name(dest.name + ".partial")


def test_plain_fetch_verifies_and_lands(http_server, tmp_path):
    body = _body()
    url = http_server.add("/f.bin", body)
    dest = tmp_path / "sub" / "f.bin"
    assert fetch(_remote(url, body), dest, **FAST) == dest
    assert dest.read_bytes() == body
    assert not _partial(dest).exists()
    (req,) = http_server.requests_for("/f.bin")
    assert "Range" not in req.headers and req.status == 200


def test_dropped_connection_resumes_with_range(http_server, tmp_path):
    body = _body(1)
    url = http_server.add("/f.bin", body, Fault(drop_after=70_000, times=1))
    dest = tmp_path / "f.bin"
    fetch(_remote(url, body), dest, retries=3, **FAST)
    assert dest.read_bytes() == body
    first, second = http_server.requests_for("/f.bin")
    assert "Range" not in first.headers
    assert second.headers["Range"] == "bytes=70000-" and second.status == 206


def test_partial_survives_failed_run_and_next_run_resumes(http_server, tmp_path):
    body = _body(2)
    url = http_server.add("/f.bin", body, Fault(drop_after=50_000, times=2))
    dest = tmp_path / "f.bin"
    with pytest.raises(DownloadError, match="connection closed after"):
        fetch(_remote(url, body), dest, retries=2, **FAST)
    assert not dest.exists()
    # valid so far (a prefix of the real file) and short: kept for the next run
    assert _partial(dest).read_bytes() == body[:100_000]
    http_server.clear_log()
    fetch(_remote(url, body), dest, retries=1, **FAST)
    assert dest.read_bytes() == body and not _partial(dest).exists()
    (req,) = http_server.requests_for("/f.bin")
    assert req.headers["Range"] == "bytes=100000-"


def test_wrong_checksum_retried_then_fails_leaving_nothing(http_server, tmp_path):
    body = _body(3)
    url = http_server.add("/f.bin", body, Fault(corrupt=True, times=None))
    dest = tmp_path / "f.bin"
    with pytest.raises(DownloadError) as err:
        fetch(_remote(url, body), dest, retries=3, **FAST)
    msg = str(err.value)
    assert url in msg and "3 attempts" in msg
    assert f"expected md5 {hashlib.md5(body).hexdigest()}" in msg and "got" in msg
    assert err.value.url == url
    assert len(http_server.requests_for("/f.bin")) == 3
    assert not dest.exists() and not _partial(dest).exists()
    assert list(tmp_path.iterdir()) == []


def test_corrupt_once_then_correct(http_server, tmp_path):
    body = _body(4)
    url = http_server.add("/f.bin", body, Fault(corrupt=True, times=1))
    dest = tmp_path / "f.bin"
    fetch(url, dest, md5=hashlib.md5(body).hexdigest(), **FAST)  # size unknown, md5 known
    assert dest.read_bytes() == body
    assert [r.headers.get("Range") for r in http_server.requests_for("/f.bin")] == [None, None]


@pytest.mark.parametrize("known", ["size+md5", "nothing"])
def test_truncated_body_with_lying_content_length_never_lands(http_server, tmp_path, known):
    body = _body(5)
    url = http_server.add("/f.bin", body, Fault(truncate_to=60_000, times=None))
    dest = tmp_path / "f.bin"
    target = _remote(url, body) if known == "size+md5" else url
    with pytest.raises(DownloadError, match=f"of {SIZE} bytes"):
        fetch(target, dest, retries=3, **FAST)
    assert not dest.exists()
    assert _partial(dest).stat().st_size < SIZE  # only a resumable prefix may remain
    assert _partial(dest).read_bytes() == body[:60_000]


def test_server_ignoring_range_restarts_cleanly(http_server, tmp_path):
    body = _body(6)
    url = http_server.add(
        "/f.bin",
        body,
        Fault(drop_after=80_000, times=1),
        Fault(ignore_range=True, times=None),
    )
    dest = tmp_path / "f.bin"
    fetch(_remote(url, body), dest, **FAST)
    assert dest.read_bytes() == body
    first, second = http_server.requests_for("/f.bin")
    assert second.headers["Range"] == "bytes=80000-" and second.status == 200


def test_server_errors_then_success(http_server, tmp_path):
    body = _body(7)
    url = http_server.add("/f.bin", body, Fault(status=500, times=2))
    dest = tmp_path / "f.bin"
    fetch(_remote(url, body), dest, retries=3, **FAST)
    assert dest.read_bytes() == body
    assert [r.status for r in http_server.requests_for("/f.bin")] == [500, 500, 200]


def test_persistent_500_and_404(http_server, tmp_path):
    url = http_server.add("/f.bin", b"x", Fault(status=503, times=None))
    with pytest.raises(DownloadError, match="HTTP 503"):
        fetch(url, tmp_path / "f.bin", retries=2, **FAST)
    assert len(http_server.requests_for("/f.bin")) == 2
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(http_server.url("/missing"), tmp_path / "m.bin", retries=3, **FAST)
    assert len(http_server.requests_for("/missing")) == 1  # a 404 is not retried
    assert list(tmp_path.iterdir()) == []


def test_slow_server_times_out_then_succeeds(http_server, tmp_path):
    body = _body(8, 10_000)
    url = http_server.add("/f.bin", body, Fault(delay_s=1.0, times=1))
    fetch(_remote(url, body), tmp_path / "f.bin", **{**FAST, "timeout": 0.2})
    assert (tmp_path / "f.bin").read_bytes() == body


def test_idempotent_second_fetch_makes_no_request(http_server, tmp_path):
    body = _body(9)
    url = http_server.add("/f.bin", body)
    dest = tmp_path / "f.bin"
    fetch(_remote(url, body), dest, **FAST)
    mtime = dest.stat().st_mtime_ns
    http_server.clear_log()
    fetch(_remote(url, body), dest, **FAST)
    fetch(url, dest, **FAST)  # nothing expected: an existing file is accepted as is
    assert http_server.requests == []
    assert dest.stat().st_mtime_ns == mtime


def test_existing_wrong_file_is_replaced(http_server, tmp_path):
    body = _body(10)
    url = http_server.add("/f.bin", body)
    dest = tmp_path / "f.bin"
    dest.write_bytes(body[:-1] + b"\x00")  # right size, wrong content
    fetch(_remote(url, body), dest, **FAST)
    assert dest.read_bytes() == body


def test_oversized_partial_is_discarded(http_server, tmp_path):
    body = _body(11, 1000)
    url = http_server.add("/f.bin", body)
    dest = tmp_path / "f.bin"
    _partial(dest).write_bytes(b"y" * 5000)
    fetch(_remote(url, body), dest, **FAST)
    assert dest.read_bytes() == body


def test_complete_partial_of_unknown_size_is_finished_via_416(http_server, tmp_path):
    body = _body(12, 5000)
    url = http_server.add("/f.bin", body)
    dest = tmp_path / "f.bin"
    _partial(dest).write_bytes(body)
    fetch(url, dest, md5=hashlib.md5(body).hexdigest(), **FAST)
    assert dest.read_bytes() == body
    assert [r.status for r in http_server.requests_for("/f.bin")] == [416]


def test_remote_size_differs_from_expected(http_server, tmp_path):
    body = _body(13, 3000)
    url = http_server.add("/f.bin", body)
    with pytest.raises(DownloadError, match="server reports 3000 bytes, expected 2000"):
        fetch(url, tmp_path / "f.bin", size=2000, retries=2, **FAST)
    assert not (tmp_path / "f.bin").exists()


def test_insecure_urls_refused_without_network(http_server, tmp_path):
    for url in ("http://example.com/f.bin", "http://10.0.0.1/f.bin", "ftp://example.com/f"):
        with pytest.raises(DownloadError, match="refusing"):
            fetch(url, tmp_path / "f.bin", **FAST)
    with pytest.raises(DownloadError, match="refusing"):
        fetch_many([("http://example.org/a", tmp_path / "a")], **FAST)
    with pytest.raises(DownloadError, match="refusing"):
        zenodo_file(1, "x", api="http://zenodo.example/api")
    for ok in ("http://localhost:1/x", "http://[::1]:1/x", "http://127.0.0.1:1/x"):
        assert check_url(ok) == ok
    # A redirect is held to the same rule: to plain http elsewhere it is refused ...
    http_server.redirect("/bad", "http://example.com/f.bin")
    with pytest.raises(DownloadError, match="refusing plain-http"):
        fetch(http_server.url("/bad"), tmp_path / "f.bin", **FAST)
    # ... while a loopback redirect (like Zenodo's /content -> storage) is followed.
    body = _body(14, 1000)
    http_server.add("/store/f.bin", body)
    http_server.redirect("/content", http_server.url("/store/f.bin"))
    fetch(_remote(http_server.url("/content"), body), tmp_path / "f.bin", **FAST)
    assert (tmp_path / "f.bin").read_bytes() == body
    assert list(tmp_path.iterdir()) == [tmp_path / "f.bin"]


def _serve_zenodo_fixture(http_server, fixture: str) -> str:
    text = (FIXTURES / fixture).read_text()
    api = http_server.url("/api")
    http_server.add_json("/api/records/10975225", text.replace("https://zenodo.org/api", api))
    return api


@pytest.mark.parametrize(
    "fixture, path",
    [
        ("zenodo_10975225.json", "/api/records/10975225/files/SPICE-2.0.1.hdf5/content"),
        (
            "zenodo_10975225_legacy.json",
            "/api/files/00000000-0000-4000-8000-000000000000/SPICE-2.0.1.hdf5",
        ),
    ],
)
def test_zenodo_file_reads_spice_record(http_server, fixture, path):
    api = _serve_zenodo_fixture(http_server, fixture)
    remote = zenodo_file(10975225, "SPICE-2.0.1.hdf5", api=api)
    assert remote == RemoteFile(
        http_server.url(path),
        size=37_479_271_148,
        md5="bfba2224b6540e1390a579569b475510",
        name="SPICE-2.0.1.hdf5",
    )
    with pytest.raises(DownloadError, match="no file 'SPICE-9.hdf5'.*SPICE-2.0.1.hdf5"):
        zenodo_file(10975225, "SPICE-9.hdf5", api=api)


def test_zenodo_inveniordm_shape_end_to_end(http_server, tmp_path):
    body = _body(15, 20_000)
    api = http_server.url("/api")
    record = {
        "id": 42,
        "files": {
            "enabled": True,
            "entries": {
                "small.bin": {
                    "key": "small.bin",
                    "size": len(body),
                    "checksum": "md5:" + hashlib.md5(body).hexdigest(),
                    "links": {
                        "self": f"{api}/records/42/files/small.bin",
                        "content": f"{api}/records/42/files/small.bin/content",
                    },
                }
            },
        },
    }
    http_server.add_json("/api/records/42", record, Fault(status=502, times=1))
    http_server.add("/api/records/42/files/small.bin/content", body)
    remote = zenodo_file(42, "small.bin", api=api, backoff=0)
    assert remote.url.endswith("/small.bin/content") and remote.size == len(body)
    dest = fetch(remote, tmp_path / "small.bin", **FAST)
    assert dest.read_bytes() == body


def test_dataverse_files_parse_and_fetch_many(http_server, tmp_path):
    api = http_server.url("/api")
    http_server.add_json(
        "/api/datasets/:persistentId/?persistentId=doi:10.5072/FK2/EQUIPIPE",
        (FIXTURES / "dataverse_dataset.json").read_text(),
    )
    files = dataverse_files("10.5072/FK2/EQUIPIPE", api=api)
    raw = FIXTURES / "dataverse_files"
    gz, readme, csv = (
        (raw / n).read_bytes() for n in ("summary_drugs.json.gz", "README.txt", "table.csv")
    )
    assert sorted(files) == [4300001, 4300002, 4300003]
    assert files[4300001] == RemoteFile(
        f"{api}/access/datafile/4300001",
        size=len(gz),
        md5=hashlib.md5(gz).hexdigest(),
        name="summary_drugs.json.gz",
    )
    assert files[4300002].md5 == hashlib.md5(readme).hexdigest()  # legacy bare `md5` field
    tab = files[4300003]  # ingested tabular file: fetch the original upload
    assert tab.url == f"{api}/access/datafile/4300003?format=original"
    assert (tab.size, tab.sha256, tab.name) == (
        len(csv),
        hashlib.sha256(csv).hexdigest(),
        "table.csv",
    )
    assert dataverse_files("doi:10.5072/FK2/EQUIPIPE", api=api) == files
    assert dataverse_files("https://doi.org/10.5072/FK2/EQUIPIPE", api=api) == files

    http_server.add("/api/access/datafile/4300001", gz, Fault(drop_after=100, times=1))
    http_server.add("/api/access/datafile/4300002", readme)
    http_server.add("/api/access/datafile/4300003?format=original", csv)
    items = [(r, tmp_path / r.name) for r in files.values()]
    paths = fetch_many(items, concurrency=3, **FAST)
    assert [p.read_bytes() for p in paths] == [gz, readme, csv]
    assert verify_gzip(paths[0]) == len(gzip.decompress(gz))
    assert json.loads(gzip.decompress(paths[0].read_bytes()))


def test_dataverse_error_status(http_server):
    api = http_server.url("/api")
    http_server.add_json(
        "/api/datasets/:persistentId/?persistentId=doi:10.5072/FK2/NOPE",
        {
            "status": "ERROR",
            "message": "Dataset with Persistent ID doi:10.5072/FK2/NOPE not found.",
        },
    )
    with pytest.raises(DownloadError, match="not found"):
        dataverse_files("10.5072/FK2/NOPE", api=api)


def test_fetch_many_concurrent_with_one_failure(http_server, tmp_path):
    bodies = {f"/m{i}.bin": _body(20 + i, 30_000) for i in range(6)}
    items = []
    for path, body in bodies.items():
        url = http_server.add(path, body, Fault(delay_s=0.2, times=1))
        items.append((_remote(url, body, name=path[1:]), tmp_path / path[1:]))
    bad = http_server.add("/bad.bin", _body(99, 30_000), Fault(corrupt=True, times=None))
    items.insert(2, (RemoteFile(bad, size=30_000, md5="0" * 32), tmp_path / "bad.bin"))
    t0 = time.perf_counter()
    with pytest.raises(DownloadError) as err:
        fetch_many(items, concurrency=4, retries=2, **FAST)
    elapsed = time.perf_counter() - t0
    assert "1 of 7 downloads failed" in str(err.value) and "bad.bin" in str(err.value)
    assert http_server.peak_in_flight >= 2  # the pool really ran downloads side by side
    assert elapsed < 6 * 0.2 + 1.0
    for path, body in bodies.items():  # the good ones all landed; the bad one left nothing
        assert (tmp_path / path[1:]).read_bytes() == body
    assert not (tmp_path / "bad.bin").exists() and not (tmp_path / "bad.bin.partial").exists()
    assert len(err.value.failures) == 1
    # rerun: only the failed item is requested again
    http_server.clear_log()
    http_server.set_faults("/bad.bin")
    ok = [it for it in items if it[1].name != "bad.bin"]
    assert fetch_many(ok, concurrency=4, **FAST) == [d for _, d in ok]
    assert http_server.requests == []


def test_fetch_many_rejects_duplicate_destinations(tmp_path):
    with pytest.raises(ValueError, match="same path"):
        fetch_many([("https://a.org/x", tmp_path / "x"), ("https://b.org/x", tmp_path / "x")])


def test_verify_gzip(tmp_path):
    data = b"".join(b"line %d of some text\n" % i for i in range(5000))
    good = tmp_path / "good.gz"
    good.write_bytes(gzip.compress(data))
    assert verify_gzip(good) == len(data)
    raw = good.read_bytes()
    cases = {
        "truncated.gz": raw[: len(raw) // 2],
        "no_trailer.gz": raw[:-4],
        "flipped.gz": raw[:-12] + bytes([raw[-12] ^ 0xFF]) + raw[-11:],
        "not_gzip.gz": data[:1000],
        "empty_member.gz": raw[:5],
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(DownloadError, match=name):
            verify_gzip(tmp_path / name)


def test_remote_file_validates_checksums():
    with pytest.raises(ValueError, match="md5"):
        RemoteFile("https://x.org/f", md5="abc")
    assert RemoteFile("https://x.org/f", md5="A" * 32).md5 == "a" * 32
    with pytest.raises(ValueError, match="size"):
        RemoteFile("https://x.org/f", size=-1)


def test_no_stray_files_after_success(http_server, tmp_path):
    body = _body(30, 1000)
    url = http_server.add("/f.bin", body)
    fetch(_remote(url, body), tmp_path / "f.bin", **FAST)
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]


@pytest.fixture
def tls_files(tmp_path):
    """A throwaway self-signed certificate for 127.0.0.1 (made with the openssl CLI)."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_https_certificate_is_checked(tls_files, tmp_path, monkeypatch):
    import ssl

    from equipipe.data.download import policy
    from tests.httpserver import LoopbackServer

    cert, key = tls_files
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    body = _body(31, 5000)
    with LoopbackServer(ssl_context=server_ctx) as server:
        url = server.add("/f.bin", body)
        assert url.startswith("https://127.0.0.1:")
        out = tmp_path / "out"
        # untrusted self-signed certificate: refused at once, not retried, nothing written
        with pytest.raises(DownloadError, match="certificate"):
            fetch(_remote(url, body), out / "f.bin", retries=3, **FAST)
        assert server.requests == [] and not (out / "f.bin").exists()
        # the same server is fine once its certificate is trusted
        monkeypatch.setattr(policy, "_SSL_CONTEXT", ssl.create_default_context(cafile=cert))
        fetch(_remote(url, body), out / "f.bin", **FAST)
        assert (out / "f.bin").read_bytes() == body
