"""Session fixtures of the miniature releases (built once per test session, offline)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.upstreams import geom_release, wwpdb
from tests.upstreams.spice_release import build_releases


@pytest.fixture(scope="session")
def spice_releases(tmp_path_factory) -> tuple[Path, dict]:
    """Miniature SPICE releases (root folder, source -> file -> download.expected pin)."""
    root = tmp_path_factory.mktemp("spice_releases")
    return root, build_releases(root)


@pytest.fixture(scope="session")
def pdb_release() -> wwpdb.WwpdbRelease:
    """The miniature wwPDB release (structures, metadata, chains)."""
    return wwpdb.build()


@pytest.fixture(scope="session")
def geom_rel() -> geom_release.GeomRelease:
    """The miniature GEOM release (built once per test process)."""
    return geom_release.cached()
