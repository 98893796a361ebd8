"""The miniature upstreams speak the real shapes, and the downloader survives what they do."""

from __future__ import annotations

import gzip
import hashlib
import time

from equipipe.data.download import fetch, zenodo_file
from tests.httpserver import Fault
from tests.upstreams.apollo import Apollo
from tests.upstreams.zenodo import Zenodo

BODY = b"0123456789abcdef" * 4096


def test_zenodo_content_redirects_to_another_host_and_verifies(http_server, tmp_path):
    zenodo = Zenodo(http_server)
    record = zenodo.add_record(4242, {"a.hdf5": BODY})
    assert record["files"][0]["checksum"] == f"md5:{hashlib.md5(BODY).hexdigest()}"
    remote = zenodo_file(4242, "a.hdf5", api=zenodo.api)
    assert remote.size == len(BODY) and remote.md5 == hashlib.md5(BODY).hexdigest()
    fetch(remote, tmp_path / "a.hdf5", progress=False)
    assert (tmp_path / "a.hdf5").read_bytes() == BODY
    (hop,) = http_server.requests_for(Zenodo.storage_path(4242, "a.hdf5"))
    assert hop.headers["Host"].startswith("localhost:")


def test_metadata_429_waits_for_retry_after(http_server):
    zenodo = Zenodo(http_server)
    zenodo.add_record(7, {"a": b"x"}, api_faults=(Fault(status=429, headers={"Retry-After": "1"}),))
    t0 = time.perf_counter()
    zenodo_file(7, "a", api=zenodo.api, backoff=0.01)
    # the backoff alone would wait 0.01 s; the server asked for 1 s
    assert time.perf_counter() - t0 >= 1.0
    assert [r.status for r in http_server.requests_for("/api/records/7")] == [429, 200]


def test_html_page_served_with_200_is_never_landed(http_server, tmp_path):
    """No size or checksum is published (MACE-OFF23): only the content type gives it away."""
    apollo = Apollo(http_server)
    url = apollo.add_bitstream("b185", "train.xyz", BODY, Fault(html_page=True))
    fetch(url, tmp_path / "train.xyz", progress=False, backoff=0.01)
    assert (tmp_path / "train.xyz").read_bytes() == BODY
    got = http_server.requests_for(Apollo.content_path("b185"))
    assert [r.status for r in got] == [200, 200]


def test_gzip_served_with_content_encoding_lands_verbatim(http_server, tmp_path):
    """A `.gz` served with `Content-Encoding: gzip`: decoding it would break the checksum."""
    gz = gzip.compress(BODY, mtime=0)
    url = http_server.add(
        "/pub/pdb/derived_data/pdb_seqres.txt.gz",
        gz,
        Fault(drop_after=len(gz) // 2),
        content_type="application/x-gzip",
        headers={"Content-Encoding": "gzip"},
    )
    fetch(url, tmp_path / "pdb_seqres.txt.gz", md5=hashlib.md5(gz).hexdigest(), progress=False)
    assert (tmp_path / "pdb_seqres.txt.gz").read_bytes() == gz
    # the dropped connection was resumed with Range, on the encoded bytes
    reqs = http_server.requests_for("/pub/pdb/derived_data/pdb_seqres.txt.gz")
    assert reqs[-1].headers["Range"] == f"bytes={len(gz) // 2}-"
