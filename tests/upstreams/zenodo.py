"""Zenodo on loopback: ``/api/records/<id>`` and file content redirected to a storage host.

Shape of the current (InvenioRDM) API: ``files`` is a list of ``{id, key, size,
checksum: "md5:<hex>", links: {self: <api>/records/<id>/files/<key>/content}}``; the content
link answers ``302`` to a signed URL on another host (here: ``localhost`` instead of
``127.0.0.1``), which serves the bytes with ``Range`` support.
"""

from __future__ import annotations

import hashlib
import uuid

from tests.httpserver import Fault
from tests.upstreams import Upstream


class Zenodo(Upstream):
    root = "/api"
    api = Upstream.endpoint  # a source's download.zenodo_api

    @staticmethod
    def content_path(record: int, key: str) -> str:
        return f"/api/records/{record}/files/{key}/content"

    @staticmethod
    def storage_path(record: int, key: str) -> str:
        return f"/storage/{record}/{key}"

    def add_record(
        self,
        record: int,
        files: dict[str, bytes],
        *,
        api_faults: tuple[Fault, ...] = (),
        file_faults: dict[str, tuple[Fault, ...]] | None = None,
    ) -> dict:
        """Publish ``files`` (key -> bytes) as record ``record``; return the record JSON."""
        entries = []
        for key, body in files.items():
            content = self.content_path(record, key)
            storage = self.storage_path(record, key)
            self.server.redirect(content, self.server.other_host_url(storage))
            self.server.add(storage, body, *(file_faults or {}).get(key, ()))
            entries.append(
                {
                    "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{record}/{key}")),
                    "key": key,
                    "size": len(body),
                    "checksum": f"md5:{hashlib.md5(body).hexdigest()}",
                    "links": {"self": self.server.url(content)},
                }
            )
        obj = {
            "id": str(record),
            "recid": str(record),
            "doi": f"10.5281/zenodo.{record}",
            "metadata": {"title": f"miniature record {record}", "license": {"id": "cc0-1.0"}},
            "files": entries,
            "links": {"self": self.server.url(f"/api/records/{record}")},
        }
        self.server.add_json(f"/api/records/{record}", obj, *api_faults)
        return obj
