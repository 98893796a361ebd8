"""Provenance of a store with quarantined records, and the noise logic of diff-reports.

The whole chain (real workflow runs, the report zip, the archive) is in tests/test_workflow.py.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from equipipe.diffreports import diff_study, diff_tables
from equipipe.headlines import HEADLINE_SCHEMA
from equipipe.lockfile import read_lock
from equipipe.provenance import dataset_info
from equipipe.store import StoreWriter


def test_dataset_provenance_counts_quarantine_reasons_and_hashes_raw_files(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "SPICE-embedded-GFN2.hdf5").write_bytes(b"\x89HDF" + bytes(range(256)))
    with StoreWriter(tmp_path / "store", per_atom=["pos"], attrs={"source": "embedded"}) as w:
        for i in range(3):
            w.add(f"m{i}", f"k{i}", {"pos": np.zeros((2, 3), np.float32)})
        w.quarantine("bad0", "non-finite forces")
        w.quarantine("bad1", "element Xe not in elements")
        w.quarantine("bad2", "non-finite forces")
    d = dataset_info("spice", "embedded", tmp_path / "store", raw)
    assert d["quarantine"] == {
        "n": 3,
        "by_reason": [
            {"reason": "non-finite forces", "n": 2},
            {"reason": "element Xe not in elements", "n": 1},
        ],
    }
    assert d["store"]["n"] == 3 and d["store"]["n_quarantined"] == 3
    (f,) = d["raw"]["files"]
    assert f["name"] == "SPICE-embedded-GFN2.hdf5" and f["size"] == 260
    assert d["source_facts"]["kind"] == "embedded"
    assert any("no file sizes / checksums" in g for g in d["gaps"])
    unknown = dataset_info("spice", "nosuch", tmp_path / "store", raw)
    assert unknown["source_facts"] is None and any("nosuch" in g for g in unknown["gaps"])


def _headlines(rows: list[dict]) -> pl.DataFrame:
    full = [
        {
            **dict.fromkeys(HEADLINE_SCHEMA),
            "level": "experiment",
            "split": "val",
            "field": "forces",
            "n_seeds": 1,
            **r,
        }
        for r in rows
    ]
    return pl.DataFrame(full, schema=HEADLINE_SCHEMA, orient="row")


def test_diff_flags_beyond_noise_missing_rows_and_differences_without_se():
    row = dict(dip_step=100.0, dip_pct=1.0, dip_pct_se=0.1, final_pct=2.0, final_pct_se=0.1,
               final_error=3.0, final_error_se=0.3)  # fmt: skip
    a = _headlines([{"experiment": "e1", **row}, {"experiment": "only_a", **row}])
    b = _headlines(
        [
            # dip 1 sigma of the difference away, final pct 5 sigma, final error equal
            {"experiment": "e1", **row, "dip_pct": 1.0 + math.sqrt(0.02),
             "final_pct": 2.0 + 5 * math.sqrt(0.02), "dip_step": 300.0},
        ]
    )  # fmt: skip
    t = {(r["experiment"], r["quantity"]): r for r in diff_tables(a, b).iter_rows(named=True)}
    assert t[("e1", "dip_pct")]["z"] == pytest.approx(1.0) and not t[("e1", "dip_pct")]["flag"]
    assert t[("e1", "final_pct")]["z"] == pytest.approx(5.0) and t[("e1", "final_pct")]["flag"]
    assert t[("e1", "final_error")]["z"] == 0 and not t[("e1", "final_error")]["flag"]
    assert t[("e1", "dip_step")]["diff"] == 200 and not t[("e1", "dip_step")]["flag"]
    assert t[("only_a", "row")]["flag"] and t[("only_a", "row")]["note"] == "only in A"
    # one evaluation batch: no standard error, so any difference is flagged
    nose = {**row, "final_error_se": math.nan}
    t = diff_tables(
        _headlines([{"experiment": "e", **nose}]),
        _headlines([{"experiment": "e", **nose, "final_error": 3.001}]),
    )
    r = t.filter(pl.col("quantity") == "final_error").row(0, named=True)
    assert r["flag"] and math.isinf(r["z"]) and r["note"] == "differs; no standard error"


def test_diff_against_the_study_measures_the_distance_to_its_range():
    a = _headlines(
        [
            {"experiment": "p", "study_ref": "proteina_60m", "t": 0.9, "dip_step": 5000.0,
             "dip_pct": 0.4, "dip_pct_se": 0.05, "final_pct": 6.0, "final_pct_se": 0.1},
        ]
    )  # fmt: skip
    t = {r["quantity"]: r for r in diff_study(a).iter_rows(named=True)}
    assert t["dip_step"]["diff"] == 0 and t["dip_pct"]["diff"] == 0 and not t["dip_pct"]["flag"]
    # final pct at t = 0.9: the study's 6.5 %, 0.5 % = 5 SE below it
    assert t["final_pct"]["b"] == 6.5 and t["final_pct"]["z"] == pytest.approx(-5.0)
    assert t["final_pct"]["flag"]


def test_read_lock_rejects_a_loose_requirement(tmp_path):
    p = tmp_path / "req.txt"
    p.write_text("numpy==2.4.6 \\\n    --hash=sha256:" + "a" * 64 + "\n")
    assert read_lock(p)["numpy"].hashes == ["sha256:" + "a" * 64]
    p.write_text("numpy>=2\n")
    with pytest.raises(ValueError, match="not an exact pin"):
        read_lock(p)
