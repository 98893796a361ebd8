"""The MiDi GEOM mirror (``bits.csb.pitt.edu/files/geom_raw/``): an Apache folder of pickles.

No checksum is published; the files are plain ``GET`` with ``Range`` support.
"""

from __future__ import annotations

from pathlib import Path

from tests.httpserver import Fault
from tests.upstreams import Upstream


class MidiMirror(Upstream):
    root = "/files/geom_raw/"
    url = Upstream.endpoint  # the geom source's download.midi_url

    def add(self, files: dict[str, Path], *faults: Fault) -> None:
        for i, (split, path) in enumerate(sorted(files.items())):
            self.server.add(
                f"/files/geom_raw/{split}_data.pickle",
                path.read_bytes(),
                *(faults if i == 0 else ()),
                content_type="application/octet-stream",
            )
