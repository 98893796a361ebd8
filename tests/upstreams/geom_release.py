"""Miniature GEOM-drugs releases in their exact layouts, built offline from real molecules.

- ``rdkit_folder.tar.gz`` (Dataverse file 4327252): ``rdkit_folder/summary_drugs.json``
  (SMILES -> charge, totalconfs, uniqueconfs, temperature, lowestenergy, ensembleenergy,
  pickle_path ``drugs/<smiles>.pickle``) and one pickle per molecule (``smiles``, ``charge``,
  ``totalconfs``, ``uniqueconfs``, ``lowestenergy`` Ha, ``ensembleenergy``, ``conformers``: list of
  {``geom_id``, ``confnum``, ``totalenergy`` Ha, ``relativeenergy`` kcal/mol, ``boltzmannweight``,
  ``degeneracy``, ``rd_mol``}), plus the ``qm9`` half of the release (``summary_qm9.json``,
  ``qm9/<smiles>.pickle``) which the drugs reader must skip.
- MiDi's processed split ``{train,val,test}_data.pickle``: a list of ``(smiles, [RDKit Mol])``.

Molecules: RDKit's NCI list, ETKDGv3 conformers, MMFF94, GFN2-xTB energies (tblite), through
the embedded builder's per-molecule routine (:func:`equipipe.data.geom.build._embedded_molecule`).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import pickle
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass
class GeomRelease:
    archive: Path
    md5: str
    midi: dict[str, Path]  # split -> pickle
    midi_sha256: dict[str, str]
    n_molecules: int
    n_conformers: int
    kept_conformers: int  # conformers kept at conformers_per_molecule=2 (both layouts)


def _molecules(n: int, seed: int) -> list[dict]:
    from equipipe.data.embedded import GEOM_ELEMENTS, item_seed, smiles_pool
    from equipipe.data.geom.build import _embedded_molecule

    out = []
    for j, smi in enumerate(smiles_pool(3 * n, seed, 8, 14, GEOM_ELEMENTS)):
        r = _embedded_molecule(
            {"index": j, "smiles": smi, "n_confs": 3, "embed_seed": item_seed(seed, j, 0),
             "rotation_seed": item_seed(seed, j, 1), "prune_rms": 0.3, "temperature": 298.15}
        )  # fmt: skip
        if "error" in r:
            continue
        rec = pickle.loads(r["pickle"])
        for c in rec["conformers"]:
            c.pop("equipipe_rotation", None)  # not a release field
        rec["conformers"] = rec["conformers"][::-1]  # the release does not sort by energy
        out.append(rec)
        if len(out) == n:
            break
    return out


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_555_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def build(out: Path, n: int = 10, seed: int = 11) -> GeomRelease:
    out.mkdir(parents=True, exist_ok=True)
    mols = _molecules(n + 2, seed)
    drugs, qm9 = mols[:n], mols[n:]
    members: dict[str, bytes] = {}
    for subset, group in (("drugs", drugs), ("qm9", qm9)):
        summary = {}
        for rec in group:
            rel = f"{subset}/{rec['smiles'].replace('/', '_')}.pickle"
            members[f"rdkit_folder/{rel}"] = pickle.dumps(rec, protocol=4)
            summary[rec["smiles"]] = {
                **{k: rec[k] for k in ("charge", "totalconfs", "uniqueconfs", "temperature",
                                       "lowestenergy", "ensembleenergy")},
                "pickle_path": rel,
            }  # fmt: skip
        members[f"rdkit_folder/summary_{subset}.json"] = json.dumps(summary).encode()
    data = _tar(members)
    archive = out / "rdkit_folder.tar.gz"
    archive.write_bytes(data)
    midi, sha = {}, {}
    cut = {"train": drugs[: n - 4], "val": drugs[n - 4 : n - 2], "test": drugs[n - 2 :]}
    for split, group in cut.items():
        body = pickle.dumps(
            [(r["smiles"], [c["rd_mol"] for c in r["conformers"]]) for r in group], protocol=4
        )
        midi[split] = out / f"{split}_data.pickle"
        midi[split].write_bytes(body)
        sha[split] = hashlib.sha256(body).hexdigest()
    return GeomRelease(
        archive,
        hashlib.md5(data).hexdigest(),
        midi,
        sha,
        len(drugs),
        sum(len(r["conformers"]) for r in drugs),
        sum(min(2, len(r["conformers"])) for r in drugs),
    )


@functools.cache
def cached(n: int = 10, seed: int = 11) -> GeomRelease:
    """One build per test process (the files are read-only inputs of every test using them)."""
    return build(Path(tempfile.mkdtemp(prefix="geom_release_")), n, seed)
