"""The paper's grid in miniature per PDB/GEOM source (``make test-all``).

``tests/test_paper_miniature.py`` runs the grid with pdb ``remote`` and geom ``geom-rdkit``
from their miniature upstreams (``make test``). Here the same grid runs with the other local and
remote paths: every local copy at once (pdb ``mirror`` + metadata in ``download_dir``, geom
``rdkit_folder.tar.gz`` in ``download_dir`` pinned by md5, SPICE ``maceoff23`` in
``download_dir``) with no server at all, and geom ``midi`` with MiDi's own split.
"""

from __future__ import annotations

import pytest
import yaml

from tests import paper_miniature as pm
from tests.httpserver import LoopbackServer
from tests.test_paper_miniature import check_grid
from tests.test_workflow import snakemake
from tests.upstreams import wwpdb
from tests.upstreams.midi_mirror import MidiMirror

NOWHERE = "http://127.0.0.1:9"  # discard port: nothing listens, any request fails at once
SPLIT = {"fractions": {"train": 0.6, "val": 0.4}, "seed": 0}
MIDI_SPLIT = {
    "fractions": {"train": 1.0},
    "seed": 0,
    "predefined": {"column": "midi_split", "values": {"train": "train", "val": "val", "test": "test"}},
}  # fmt: skip


def _grid(spice_releases, datasets: dict) -> dict:
    root, pins = spice_releases
    n_train = pins["maceoff23"]["train_large_neut_no_bad_clean.xyz"]["frames"]
    spice = {"download": {"apollo_base": NOWHERE, "expected": pins["maceoff23"]}}
    mini = pm.miniature(
        pm.load_paper(), {"spice": spice, **datasets}, {"spice": (951_005, n_train)}
    )
    mini["datasets"]["spice"]["download_dir"] = str(root / "maceoff23")  # the local copy
    return mini


def _run_grid(wd, mini: dict) -> None:
    """The grid's DAG in ``wd`` to report.zip, then the checks of the miniature grid."""
    wd.mkdir()
    (wd / "config.yaml").write_text(yaml.safe_dump(mini, sort_keys=False))
    snakemake(wd, "--cores", "2")
    snakemake(wd, "--report", "results/report.zip")
    check_grid(wd, mini)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the whole grid: ~3.5 CPU-minutes, more on a loaded machine
def test_paper_grid_in_miniature_from_local_copies_with_no_server(
    spice_releases, pdb_release, geom_rel, tmp_path
):
    geom = geom_rel
    mirror = wwpdb.write_mirror(pdb_release, tmp_path / "pdb_mirror")
    meta = wwpdb.write_metadata(pdb_release, tmp_path / "pdb_meta")
    mini = _grid(
        spice_releases,
        {
            "pdb": {"download": {"base_url": NOWHERE, "mirror": str(mirror)}, "split": SPLIT},
            "geom": {
                "download": {
                    "dataverse_api": NOWHERE + "/api",
                    "expected": {"rdkit_folder.tar.gz": {"md5": geom.md5}},
                },
                "split": SPLIT,
            },
        },
    )
    mini["datasets"]["pdb"]["download_dir"] = str(meta)
    mini["datasets"]["geom"]["download_dir"] = str(geom.archive.parent)
    _run_grid(tmp_path / "wd", mini)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_paper_grid_in_miniature_with_midi(spice_releases, pdb_release, geom_rel, tmp_path):
    geom = geom_rel
    with LoopbackServer() as server:
        up = wwpdb.Wwpdb(server, pdb_release)
        up.publish()
        midi = MidiMirror(server)
        midi.add(geom.midi)
        pins = {f"{s}_data.pickle": {"sha256": h} for s, h in geom.midi_sha256.items()}
        mini = _grid(
            spice_releases,
            {
                "pdb": {"download": {"base_url": up.base_url, "backoff": 0.1}, "split": SPLIT},
                "geom": {"download": {"midi_url": midi.url, "expected": pins}, "split": MIDI_SPLIT},
            },
        )
        mini["datasets"]["geom"]["source"] = "midi"  # the grid per source
        _run_grid(tmp_path / "wd", mini)
