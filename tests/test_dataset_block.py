"""The wiring contract: every data step receives the dataset's validated config block."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from equipipe.cli import main
from equipipe.data import dataset_block as db
from equipipe.store import Store

FIX = Path(__file__).parent / "fixtures" / "spice"

BLOCK = {
    "source": "maceoff23",
    "download_dir": "/data/maceoff",
    "download": {
        "workers": 1,
        "apollo_base": "http://127.0.0.1:1",
        "expected": {
            "train_large_neut_no_bad_clean.xyz": {"frames": 4},
            "test_large_neut_all.xyz": {"frames": 4},
        },
    },
    "embedded": {"workers": 2, "seed": 3},
    "preprocess": {"workers": 4, "max_bad_fraction": 0.3},
    "split": {"fractions": {"train": 1.0}, "seed": 0},
    "subsets": {"all": {"size": 1.0}},
}


def test_step_block_keeps_what_the_step_reads():
    pre = db.step_block(BLOCK, "preprocess", "spice")
    assert set(pre) == {"source", "download_dir", "download", "embedded", "preprocess"}
    assert set(db.step_block(BLOCK, "download", "spice")) == {"source", "download_dir", "download"}
    # the PDB download filters chains by the preprocess filters before fetching structures
    assert "preprocess" in db.step_block(BLOCK, "download", "pdb")
    assert set(db.step_block(BLOCK, "build_embedded", "geom")) == {
        "source",
        "download_dir",
        "embedded",
    }


def test_options_flatten_in_order_and_flat_dicts_pass_through():
    flat = db.options(BLOCK, "download", "preprocess")
    assert flat["source"] == "maceoff23" and flat["download_dir"] == "/data/maceoff"
    assert (
        flat["workers"] == 4 and "seed" not in flat and "expected" in flat
    )  # the step's own section wins
    assert db.options(BLOCK, "embedded")["workers"] == 2
    assert db.options({"source": "x", "workers": 7}, "preprocess") == {"source": "x", "workers": 7}


def test_preprocess_command_reads_the_source_from_the_block(tmp_path):
    """The defect of issue 19: the source came from the module's default ('embedded')."""
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(FIX / "maceoff_small.xyz", raw / "train_large_neut_no_bad_clean.xyz")
    shutil.copy(FIX / "maceoff_small.xyz", raw / "test_large_neut_all.xyz")
    block = db.step_block(BLOCK, "preprocess", "spice")
    main(["preprocess", "spice", "--raw", str(raw), "--out", str(tmp_path / "store"),
          "--cfg", json.dumps(block)])  # fmt: skip
    store = Store(tmp_path / "store")
    assert sorted(set(store.index["source"])) == ["maceoff23/test", "maceoff23/train"]
