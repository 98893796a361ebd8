"""Miniature public repositories on loopback, speaking each upstream's real shape.

Each module registers one repository's routes on a :class:`tests.httpserver.LoopbackServer`
(``zenodo``: the record API with content redirected to another host name; ``apollo``: the
Cambridge Apollo (DSpace) bitstream URLs). Release files in the exact layouts are built
offline from real molecules by ``spice_release`` (cached per test session). Add a repository
as a new module here with a subclass of :class:`Upstream` (its ``root`` route) and methods
that register content (faults from :class:`tests.httpserver.Fault`); nothing else needs to change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.httpserver import LoopbackServer


class Upstream:
    """A miniature repository: its routes live on one loopback server; ``endpoint`` (the URL of
    ``root``) is what the source's download key names (``apollo_base``, ``zenodo_api``, ...)."""

    root = "/"

    def __init__(self, server: LoopbackServer):
        self.server = server

    @property
    def endpoint(self) -> str:
        return self.server.url(self.root)
