"""GEOM preprocessing throughput (molecules/s) on a GEOM-layout archive of real RDKit molecules.

Measures what the sandboxed unpickling (equipipe.data.pickle_sandbox) costs or gains against
the same preprocessing in one process. The archive (``--molecules`` molecules of the embedded
SMILES pool, ``--conformers`` ETKDG conformers each, pickled in the rdkit_folder layout) is
built once into ``--cache``.

    python bench/geom_preprocess_throughput.py [--molecules 300] [--replicas 4] [--workers 1 2]
Last line: geom_preprocess_mol_per_s=<best over workers>
"""

from __future__ import annotations

import argparse
import io
import pickle
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from equipipe.data import geom
from equipipe.data.embedded import embed_conformers, smiles_pool


def build(path: Path, n: int, conformers: int, replicas: int) -> None:
    """``n`` molecules, each stored ``replicas`` times under distinct keys (SMILES + '.[He]'s:
    same work per copy; the suffix only changes the key)."""
    from rdkit import Chem

    with tarfile.open(path, "w:gz") as tar:
        for i, smi in enumerate(smiles_pool(n, seed=0, max_heavy=24)):
            mol = embed_conformers(smi, conformers, i)
            confs = []
            for j in range(mol.GetNumConformers()):
                one = Chem.Mol(mol, confId=mol.GetConformer(j).GetId())
                one.RemoveAllConformers()
                one.AddConformer(mol.GetConformer(j), assignId=True)
                confs.append({"geom_id": j, "totalenergy": -1.0 - j, "boltzmannweight": 0.2,
                              "rd_mol": one})  # fmt: skip
            for r in range(replicas):
                key = smi + ".[He]" * r
                data = pickle.dumps({"smiles": key, "conformers": confs}, protocol=4)
                info = tarfile.TarInfo(f"rdkit_folder/drugs/{geom.smiles_hash(key)}.pickle")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--molecules", type=int, default=300)
    ap.add_argument("--conformers", type=int, default=5)
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "equipipe-geom-bench"))
    a = ap.parse_args()
    raw = Path(a.cache) / f"m{a.molecules}c{a.conformers}r{a.replicas}"
    if not (raw / geom.ARCHIVE).is_file():
        raw.mkdir(parents=True, exist_ok=True)
        build(raw / geom.ARCHIVE, a.molecules, a.conformers, a.replicas)
    n = a.molecules * a.replicas
    best = 0.0
    for workers in a.workers:
        times = []
        for _ in range(a.repeats):
            out = Path(tempfile.mkdtemp()) / "store"
            cfg = {"source": "geom-rdkit", "allow_unverified_pickles": True, "workers": workers}
            t0 = time.perf_counter()
            geom.preprocess(raw, out, cfg)
            times.append(time.perf_counter() - t0)
            shutil.rmtree(out.parent)
        rate = n / min(times)
        best = max(best, rate)
        print(f"workers={workers}: best {min(times):.2f} s, {rate:.1f} molecules/s")
    print(f"geom_preprocess_mol_per_s={best:.1f}")


if __name__ == "__main__":
    main()
