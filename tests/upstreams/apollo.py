"""Cambridge Apollo (DSpace 7) on loopback: ``/bitstreams/<uuid>/download``.

The user-facing download route answers ``302`` to the REST content endpoint
``/server/api/core/bitstreams/<uuid>/content``, which serves the bytes (``Range`` supported)
with a ``Content-Disposition`` naming the file. No checksum is published.
"""

from __future__ import annotations

from tests.httpserver import Fault
from tests.upstreams import Upstream


class Apollo(Upstream):
    root = "/bitstreams"
    base = Upstream.endpoint  # the source's download.apollo_base

    @staticmethod
    def content_path(bitstream: str) -> str:
        return f"/server/api/core/bitstreams/{bitstream}/content"

    def add_bitstream(self, bitstream: str, name: str, body: bytes, *faults: Fault) -> str:
        """Publish ``body`` as ``bitstream``; return the download URL."""
        content = self.content_path(bitstream)
        self.server.add(
            content,
            body,
            *faults,
            content_type="chemical/x-xyz",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )
        return self.server.redirect(f"/bitstreams/{bitstream}/download", self.server.url(content))
