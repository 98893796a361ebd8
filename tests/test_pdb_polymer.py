"""A PDB chain is its polymer: ligands sharing the author chain never enter, whatever their names.

The entries are real (5PTI, 1BD2 chain B from ``tests/fixtures/pdb``), edited as text the way
deposited files look: ligands are HETATM rows of a non-polymer entity (``label_seq_id`` ".")
under the same author chain. Two ligands carry backbone-like atom names: the methionine moiety of
S-adenosylmethionine (SAM: atoms N, CA, C, O, CB, CG, SD, CE) and a free glutamate (a standard
residue name). Their coordinates are the chain's own MET 52 / GLU 7 atoms moved 9 Å away.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from equipipe.data import pdb
from equipipe.store import Store

FIX = Path(__file__).parent / "fixtures" / "pdb"


def _rows(text: str, chain: str, comp: str, num: int) -> list[list[str]]:
    """The atom_site rows (split) of one residue."""
    out = []
    for line in text.splitlines():
        f = line.split()
        if (
            f
            and f[0] in ("ATOM", "HETATM")
            and f[5] == comp
            and f[-5] == str(num)
            and f[-3] == chain
        ):
            out.append(f)
    assert out, (comp, num)
    return out


def _ligand(rows: list[list[str]], comp: str, asym: str, entity: str, num: int, first_id: int):
    """Rows of a residue rewritten as a non-polymer ligand: HETATM, own entity, no label_seq_id."""
    out = []
    for k, f in enumerate(rows):
        if f[4] not in (".", "A"):  # keep one conformer of the ligand
            continue
        g = list(f)
        # group, id, alt, label comp/asym/entity/seq, x, occupancy, auth seq/comp
        g[0], g[1], g[4], g[5], g[6], g[7], g[8] = (
            "HETATM",
            str(first_id + k),
            ".",
            comp,
            asym,
            entity,
            ".",
        )
        g[10] = f"{float(f[10]) + 9.0:.3f}"  # 9 Å away: it would be a break if it were selected
        g[13] = "1.00"
        g[-5], g[-4] = str(num), comp
        out.append(" ".join(g))
    return out


def _edit(text: str, chain: str, after_num: int, middle: list[str], end: list[str]) -> str:
    """Insert ``middle`` after residue ``after_num`` of ``chain`` and ``end`` after its last row."""
    lines = text.splitlines()
    idx = [i for i, ln in enumerate(lines) if ln.startswith("ATOM") and ln.split()[-3] == chain]
    mid = max(i for i in idx if int(lines[i].split()[-5]) == after_num)
    last = max(idx)
    lines = lines[: mid + 1] + middle + lines[mid + 1 : last + 1] + end + lines[last + 1 :]
    return "\n".join(lines) + "\n"


def _with_entities(text: str, rows: list[str]) -> str:
    """Add rows to the ``_entity`` loop (after its last row)."""
    lines = text.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith("_entity.details"))
    while lines[i + 1][:1].isdigit():
        i += 1
    return "\n".join(lines[: i + 1] + rows + lines[i + 1 :]) + "\n"


def _write(path: Path, text: str) -> Path:
    path.write_bytes(gzip.compress(text.encode(), mtime=0))
    return path


@pytest.fixture(scope="module")
def edited(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("polymer")
    pti = gzip.decompress((FIX / "structures" / "5pti.cif.gz").read_bytes()).decode()
    sam = _ligand(_rows(pti, "A", "MET", 52), "SAM", "E", "5", 201, 5001)
    glu = _ligand(_rows(pti, "A", "GLU", 7), "GLU", "F", "6", 202, 5101)
    text = _edit(pti, "A", 30, sam, glu)  # SAM in the middle of the chain's rows, GLU at its end
    text = _with_entities(
        text,
        [
            "5 non-polymer syn S-ADENOSYLMETHIONINE 398.437 1 ? ? ? ?",
            "6 non-polymer syn 'GLUTAMIC ACID' 147.129 1 ? ? ? ?",
        ],
    )
    b2m = gzip.decompress((FIX / "structures" / "1bd2.cif.gz").read_bytes()).decode()
    # 1BD2 as fixtured has no _entity category: label_seq_id alone tells the polymer
    sam_b = _ligand(_rows(b2m, "B", "MET", 99), "SAM", "H", "7", 301, 9001)
    glu_b = _ligand(_rows(b2m, "B", "GLU", 16), "GLU", "I", "8", 302, 9101)
    return {
        "5pti": _write(tmp / "5pti_lig.cif.gz", text),
        "1bd2": _write(tmp / "1bd2_lig.cif.gz", _edit(b2m, "B", 50, glu_b, sam_b)),
    }


ORIGINAL = {"5pti": ("5pti.cif.gz", "A"), "1bd2": ("1bd2.cif.gz", "B")}


@pytest.mark.parametrize("entry", sorted(ORIGINAL))
@pytest.mark.parametrize("backend", pdb.BACKENDS)
def test_ligands_with_backbone_names_never_enter_the_chain(edited, entry, backend):
    name, chain = ORIGINAL[entry]
    text = gzip.decompress(edited[entry].read_bytes()).decode()
    assert " SAM " in text and "HETATM 5101" in text or "HETATM 9101" in text  # edits present
    got = pdb.read_ca_chains(edited[entry], [chain], backend)[chain]
    assert isinstance(got, pdb.CAChain), got  # before: quarantined "non-standard residue SAM"
    want = pdb.read_ca_chains(FIX / "structures" / name, [chain], backend)[chain]
    assert got.sequence == want.sequence  # no residue added (the free GLU)
    np.testing.assert_array_equal(got.pos, want.pos)
    np.testing.assert_array_equal(got.chain_break, want.chain_break)  # no break created
    assert not got.chain_break.any()


@pytest.mark.parametrize("entry", sorted(ORIGINAL))
def test_both_backends_give_identical_chains_with_ligands(edited, entry):
    a = pdb.read_ca_chains(edited[entry], backend="gemmi")
    b = pdb.read_ca_chains(edited[entry], backend="biopython")
    assert a.keys() == b.keys()
    for k in a:
        assert isinstance(a[k], pdb.CAChain) and isinstance(b[k], pdb.CAChain)
        assert a[k].sequence == b[k].sequence
        np.testing.assert_array_equal(a[k].pos, b[k].pos)
        np.testing.assert_array_equal(a[k].chain_break, b[k].chain_break)


@pytest.mark.parametrize("backend", pdb.BACKENDS)
def test_modified_polymer_residue_still_quarantines(backend):
    """MSE inside the polymer (label_seq_id set, polymer entity) keeps the documented rule."""
    got = pdb.read_ca_chains(FIX / "bad" / "mse.cif.gz", ["A"], backend)["A"]
    assert got == "non-standard residue MSE"


def test_preprocess_keeps_the_chain_and_counts_only_polymer_residues(edited, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = [
        {"id": "5pti_A", "pdb_id": "5pti", "chain": "A", "sequence": "", "length": 0,
         "file": str(edited["5pti"]), "resolution": 1.0, "method": "diffraction",
         "origin": "edit", "error": None},
    ]  # fmt: skip
    schema = {c: pl.String for c in pdb.MANIFEST_COLUMNS} | {
        "length": pl.Int64,
        "resolution": pl.Float64,
    }
    pl.DataFrame(rows, schema=schema).write_parquet(raw / pdb.MANIFEST)
    pdb.preprocess(raw, tmp_path / "store", {"min_length": 10, "cluster_method": "builtin"})
    store = Store(tmp_path / "store")
    assert len(store) == 1 and store.quarantine.height == 0
    assert int(store.index["n_atoms"][0]) == 58


@pytest.mark.parametrize("entry", ["3PWP", "5PTI", "1BD2"])
def test_backends_agree_on_every_chain_of_full_real_entries(entry):
    """Whole deposited entries (3PWP: glycerol and sulfate under polymer chains; 5PTI: phosphate,
    an unknown atom and D2O under chain A): both backends give the same chains."""
    from tests.upstreams.wwpdb import _source_dir

    path = _source_dir() / f"{entry}.cif.gz"
    a = pdb.read_ca_chains(path, backend="gemmi")
    b = pdb.read_ca_chains(path, backend="biopython")
    assert a.keys() == b.keys() and len(a) >= 1
    for k in a:
        assert type(a[k]) is type(b[k]), (k, a[k], b[k])
        if isinstance(a[k], pdb.CAChain):
            assert a[k].sequence == b[k].sequence
            np.testing.assert_array_equal(a[k].pos, b[k].pos)
            np.testing.assert_array_equal(a[k].chain_break, b[k].chain_break)
        else:
            assert a[k] == b[k]
