"""wwPDB and RCSB on loopback, serving real mmCIF entries and metadata built from them.

Release (built offline by :func:`build` from the full entries shipped in ``mdanalysistests``:
1BD2, 3KPR, 3PWP, 5PTI):

- ``/pub/pdb/derived_data/pdb_seqres.txt.gz``: ``>1bd2_A mol:protein length:275  NAME`` + the
  entity's one-letter SEQRES, one record per polymer strand;
- ``/pub/pdb/derived_data/index/resolu.idx``: the header, then ``IDCODE ; RESOLUTION`` lines;
- ``/pub/pdb/derived_data/pdb_entry_type.txt``: ``<id> <prot|nuc|prot-nuc> <method>``;
- RCSB ``/download/<id>.cif.gz`` and the wwPDB divided tree
  ``/pub/pdb/data/structures/divided/mmCIF/<id[1:3]>/<id>.cif.gz`` (what an rsync mirror holds).

Entries every filter must drop are listed too (NMR, 6.5 Å, nucleic acid): placeholders that are
never fetched. The files server answers ``.gz`` files with ``Content-Encoding: gzip`` (the body
is the gzip file itself), as files.wwpdb.org does.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from tests.httpserver import Fault, LoopbackServer

ENTRIES = ("1bd2", "3kpr", "3pwp", "5pti")
DROPPED = {  # id -> (type, method, resolution, mol, sequence)
    "2nmr": ("prot", "NMR", None, "protein", "ACDEFGHIKLMNPQRSTVWY" * 4),
    "2low": ("prot", "diffraction", 6.5, "protein", "ACDEFGHIKLMNPQRSTVWY" * 4),
    "2dna": ("nuc", "diffraction", 2.0, "na", "ACGT" * 20),
}


@dataclass
class WwpdbRelease:
    metadata: dict[str, bytes]  # file name -> bytes
    structures: dict[str, bytes]  # id -> gzip'd mmCIF
    chains: dict[str, str]  # "<id>_<chain>" -> SEQRES sequence (protein chains)


def _source_dir() -> Path:
    spec = importlib.util.find_spec("MDAnalysisTests")
    return Path(spec.submodule_search_locations[0]) / "data" / "mmcif"


def build() -> WwpdbRelease:
    import gemmi

    seqres, resolu, types, structures, chains = [], [], [], {}, {}
    for pid in ENTRIES:
        raw = (_source_dir() / f"{pid.upper()}.cif.gz").read_bytes()
        structures[pid] = gzip.compress(gzip.decompress(raw), mtime=0)
        st = gemmi.read_structure(str(_source_dir() / f"{pid.upper()}.cif.gz"))
        st.setup_entities()
        seen = set()
        for ch in st[0]:
            poly = ch.get_polymer()
            if ch.name in seen or not len(poly):
                continue
            seen.add(ch.name)
            seq = gemmi.one_letter_code(st.get_entity_of(poly).full_sequence)
            seqres.append(f">{pid}_{ch.name} mol:protein length:{len(seq)}  {pid.upper()}\n{seq}\n")
            chains[f"{pid}_{ch.name}"] = seq
        resolu.append(f"{pid.upper()}\t;\t{st.resolution:.2f}\n")
        types.append(f"{pid}\tprot\tdiffraction\n")
    for pid, (kind, method, res, mol, seq) in DROPPED.items():
        seqres.append(f">{pid}_A mol:{mol} length:{len(seq)}  PLACEHOLDER\n{seq}\n")
        resolu.append(f"{pid.upper()}\t;\t{res if res is not None else ''}\n")
        types.append(f"{pid}\t{kind}\t{method}\n")
    header = (
        " PDB Resolution Index\n\n"
        "This file contains the best resolution for each entry.\n\n"
        "IDCODE\t\t&\tRESOLUTION\n------\t\t&\t----------\n"
    )
    return WwpdbRelease(
        {
            "pdb_seqres.txt.gz": gzip.compress("".join(seqres).encode(), mtime=0),
            "resolu.idx": (header + "".join(resolu)).encode(),
            "pdb_entry_type.txt": "".join(types).encode(),
        },
        structures,
        chains,
    )


def write_mirror(release: WwpdbRelease, root: Path) -> Path:
    """An rsync copy of ``structures/divided/mmCIF`` under ``root/mmCIF``; returns ``root``."""
    for pid, body in release.structures.items():
        dest = root / "mmCIF" / pid[1:3] / f"{pid}.cif.gz"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(body)
    return root


def write_metadata(release: WwpdbRelease, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in release.metadata.items():
        (folder / name).write_bytes(body)
    return folder


class Wwpdb:
    """files.wwpdb.org + files.rcsb.org on one loopback server (``download.base_url``)."""

    META = {
        "pdb_seqres.txt.gz": "/pub/pdb/derived_data/pdb_seqres.txt.gz",
        "resolu.idx": "/pub/pdb/derived_data/index/resolu.idx",
        "pdb_entry_type.txt": "/pub/pdb/derived_data/pdb_entry_type.txt",
    }

    def __init__(self, server: LoopbackServer, release: WwpdbRelease):
        self.server, self.release = server, release

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def publish(self, faults: dict[str, tuple[Fault, ...]] | None = None) -> None:
        """Serve metadata and structures; ``faults`` maps a file name or a PDB id to faults."""
        faults = faults or {}
        for name, path in self.META.items():
            gz = name.endswith(".gz")
            self.server.add(
                path,
                self.release.metadata[name],
                *faults.get(name, ()),
                content_type="application/x-gzip" if gz else "text/plain",
                headers={"Content-Encoding": "gzip"} if gz else None,
            )
        for pid, body in self.release.structures.items():
            self.server.add(
                f"/download/{pid}.cif.gz",
                body,
                *faults.get(pid, ()),
                content_type="application/octet-stream",
            )
            self.server.add(
                f"/pub/pdb/data/structures/divided/mmCIF/{pid[1:3]}/{pid}.cif.gz",
                body,
                content_type="application/x-gzip",
                headers={"Content-Encoding": "gzip"},
            )

    def structure_requests(self) -> set[str]:
        return {r.path for r in self.server.requests if r.path.startswith("/download/")}
