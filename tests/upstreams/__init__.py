"""Miniature public repositories on loopback, speaking each upstream's real shape.

Each module registers one repository's routes on a :class:`tests.httpserver.LoopbackServer`
(``zenodo``: the record API with content redirected to another host name; ``apollo``: the
Cambridge Apollo (DSpace) bitstream URLs). Release files in the exact layouts are built
offline from real molecules by ``spice_release`` (cached per test session). Add a repository
as a new module here with a class taking the server in its constructor and methods that
register content (faults from :class:`tests.httpserver.Fault`); nothing else needs to change.
"""
