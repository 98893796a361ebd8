"""Harvard Dataverse on loopback: the dataset API and file access, as GEOM is published.

- ``GET /api/datasets/:persistentId/?persistentId=doi:10.7910/DVN/JNGTDF``: ``{"status": "OK",
  "data": {..., "latestVersion": {"files": [{"label", "dataFile": {"id", "filename",
  "filesize", "md5", "checksum": {"type": "MD5", "value"}}}]}}}``.
- ``GET /api/access/datafile/<id>``: ``303 See Other`` to the storage host (here the same
  server under the host name ``localhost``), which serves the bytes with ``Range`` support.
"""

from __future__ import annotations

import hashlib

from tests.httpserver import Fault, LoopbackServer
from tests.upstreams import Upstream

DOI = "10.7910/DVN/JNGTDF"


class Dataverse(Upstream):
    root = "/api"
    api = Upstream.endpoint  # the geom source's download.dataverse_api

    def __init__(self, server: LoopbackServer):
        super().__init__(server)
        self.files: list[dict] = []

    def add_file(self, file_id: int, name: str, body: bytes, *faults: Fault) -> None:
        """Publish ``body`` as datafile ``file_id``; content faults apply on the storage host."""
        md5 = hashlib.md5(body).hexdigest()
        self.files.append(
            {
                "label": name,
                "restricted": False,
                "version": 1,
                "datasetVersionId": 1,
                "dataFile": {
                    "id": file_id,
                    "persistentId": "",
                    "filename": name,
                    "contentType": "application/gzip",
                    "filesize": len(body),
                    "storageIdentifier": f"s3://dvn-cloud:{md5[:12]}",
                    "rootDataFileId": -1,
                    "md5": md5,
                    "checksum": {"type": "MD5", "value": md5},
                    "creationDate": "2020-06-01",
                },
            }
        )
        storage = f"/dvn-cloud/{DOI}/{md5[:12]}"
        self.server.add(storage, body, *faults, content_type="application/gzip")
        self.server.redirect(
            f"/api/access/datafile/{file_id}", self.server.other_host_url(storage), 303
        )

    def publish(self, *faults: Fault) -> None:
        """Serve the dataset API answer listing the files added so far."""
        answer = {
            "status": "OK",
            "data": {
                "id": 4327233,
                "identifier": "DVN/JNGTDF",
                "persistentUrl": f"https://doi.org/{DOI}",
                "protocol": "doi",
                "authority": "10.7910",
                "publisher": "Harvard Dataverse",
                "latestVersion": {
                    "id": 1,
                    "versionState": "RELEASED",
                    "versionNumber": 4,
                    "files": self.files,
                },
            },
        }
        self.server.add_json("/api/datasets/:persistentId/", answer, *faults)
