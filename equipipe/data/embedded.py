"""Offline builders of real small molecular data (shared by the SPICE and GEOM embedded sets).

Nothing here is a mock: molecules come from the NCI SMILES list shipped inside the RDKit
wheel, conformers from RDKit (ETKDGv3 + MMFF94), labels from GFN2-xTB (``tblite``).

Units: positions in Å at this module's boundary, xTB energies in hartree and gradients in
hartree/bohr (tblite's native units). Conversion constants are the ones DATA.md fixes.

Parallelism: GFN2 single points on ~20-50 atoms take 20-50 ms and threads do not help, so
:func:`parallel_map` runs one *process* per core with ``OMP_NUM_THREADS=1``. Results never
depend on the worker count: every random choice is seeded per item, never per process.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing as mp
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from equipipe.config import defaults

HARTREE_EV = 27.211386
BOHR_ANGSTROM = 0.529177

SPICE_ELEMENTS: tuple[str, ...] = tuple(defaults("embedded", "spice")["elements"])  # the schema's
GEOM_ELEMENTS: tuple[str, ...] = ("H", "C", "N", "O", "F", "S", "Cl", "Br")

# Ground-state (Hund's rule) unpaired electrons of the neutral free atoms we use.
UNPAIRED_ELECTRONS: dict[int, int] = {1: 1, 6: 2, 7: 3, 8: 2, 9: 1, 15: 3, 16: 2, 17: 1, 35: 1}
UNPAIRED_ELECTRONS[53] = 1

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

T = TypeVar("T")
R = TypeVar("R")


# ----------------------------------------------------------------------------- molecules


def nci_smiles_path() -> Path:
    """Path of ``first_5K.smi`` inside the installed RDKit (``RDConfig.RDDataDir/NCI``)."""
    try:
        from rdkit import RDConfig

        candidates = [Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"]
    except ImportError:  # pragma: no cover - rdkit is a hard dependency
        candidates = []
    import rdkit

    candidates.append(Path(rdkit.__file__).parent / "Data" / "NCI" / "first_5K.smi")
    for p in candidates:
        if p.is_file():
            return p
    raise FileNotFoundError(
        "RDKit's NCI/first_5K.smi was not found (looked in "
        + ", ".join(map(str, candidates))
        + "); reinstall the rdkit wheel from PyPI."
    )


@functools.lru_cache(maxsize=8)
def _eligible_smiles(min_heavy: int, max_heavy: int, elements: tuple[str, ...]) -> tuple[str, ...]:
    """Canonical SMILES of every eligible NCI molecule, in file order, de-duplicated."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    allowed = set(elements)
    out: list[str] = []
    seen: set[str] = set()
    try:
        for line in nci_smiles_path().read_text().splitlines():
            parts = line.split()
            if not parts:
                continue
            mol = Chem.MolFromSmiles(parts[0])  # sanitises; None on failure
            if mol is None:
                continue
            if len(Chem.GetMolFrags(mol)) != 1:
                continue
            if Chem.GetFormalCharge(mol) != 0:
                continue
            if any(a.GetNumRadicalElectrons() for a in mol.GetAtoms()):
                continue
            if any(a.GetIsotope() for a in mol.GetAtoms()):
                continue
            if not min_heavy <= mol.GetNumHeavyAtoms() <= max_heavy:
                continue
            if any(a.GetSymbol() not in allowed for a in mol.GetAtoms()):
                continue
            smi = Chem.MolToSmiles(mol)
            if smi not in seen:
                seen.add(smi)
                out.append(smi)
    finally:
        RDLogger.EnableLog("rdApp.*")
    return tuple(out)


def smiles_pool(
    n: int,
    seed: int,
    min_heavy: int = 8,
    max_heavy: int = 40,
    elements: Sequence[str] = SPICE_ELEMENTS,
) -> list[str]:
    """``n`` canonical SMILES drawn from RDKit's NCI ``first_5K.smi``, reproducibly.

    Kept: molecules that sanitise, a single fragment, net charge 0, no radicals or isotopes,
    ``min_heavy <= heavy atoms <= max_heavy``, only ``elements``. The eligible list is shuffled
    by a seeded permutation, so ``smiles_pool(m, s)[:n] == smiles_pool(n, s)`` for m >= n and
    two seeds draw nearly disjoint sets (overlap ~ n²/pool).

    Raises:
        ValueError: fewer than ``n`` molecules are eligible.
    """
    pool = _eligible_smiles(int(min_heavy), int(max_heavy), tuple(elements))
    if n > len(pool):
        raise ValueError(
            f"only {len(pool)} NCI molecules have {min_heavy}-{max_heavy} heavy atoms and "
            f"elements {list(elements)}; asked for {n}"
        )
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5E1EC7])).permutation(
        len(pool)
    )
    return [pool[i] for i in order[:n]]


def embed_conformers(smiles: str, n_confs: int, seed: int, prune_rms: float = 0.5):
    """RDKit molecule with explicit Hs and up to ``n_confs`` MMFF94-optimised conformers.

    ETKDGv3 embedding (single-threaded, ``randomSeed=seed``, heavy-atom RMS pruning at
    ``prune_rms`` Å), then MMFF94 optimisation of every conformer. Rigid molecules may
    return fewer than ``n_confs`` distinct conformers.

    Raises:
        ValueError: unparseable SMILES, embedding failure or missing MMFF parameters.
    """
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"RDKit cannot parse/sanitise SMILES {smiles!r}")
    mol = Chem.AddHs(mol)
    params = AllChem.ETKDGv3()
    params.randomSeed = int(seed) % (2**31 - 1)
    params.pruneRmsThresh = float(prune_rms)
    params.numThreads = 1
    cids = list(AllChem.EmbedMultipleConfs(mol, numConfs=int(n_confs), params=params))
    if not cids:
        params.useRandomCoords = True  # the documented fallback for hard ring systems
        cids = list(AllChem.EmbedMultipleConfs(mol, numConfs=int(n_confs), params=params))
    if not cids:
        raise ValueError(f"ETKDGv3 could not embed {smiles!r}")
    if not AllChem.MMFFHasAllMoleculeParams(mol):
        raise ValueError(f"MMFF94 has no parameters for {smiles!r}")
    AllChem.MMFFOptimizeMoleculeConfs(mol, numThreads=1, maxIters=2000)
    return mol


def mapped_smiles(mol) -> str:
    """Explicit-H SMILES with atom map numbers ``i + 1`` for atom ``i`` (SPICE convention)."""
    from rdkit import Chem

    m = Chem.Mol(mol)
    m.RemoveAllConformers()
    for a in m.GetAtoms():
        a.SetAtomMapNum(a.GetIdx() + 1)
    return Chem.MolToSmiles(m)


def thermal_perturb(positions: np.ndarray, rng: np.random.Generator, sigma: float = 0.03):
    """Isotropic Gaussian displacement of every atom (Å), so forces are not ~0 at MMFF minima.

    Why not MD: RDKit has no integrator, and a Gaussian kick is cheap, exactly reproducible
    and per-conformer seeded. Size: with independent displacements σ per Cartesian
    component a bond length fluctuates with variance 2σ²; equipartition for a stiff stretch
    (k ≈ 30 eV/Å², C-H/C-C) at 500 K (SPICE's MD temperature) gives 2σ² = kT/k, σ ≈ 0.027 Å.
    Softer bends are under-excited, but MMFF minima are not GFN2 minima, which adds force.

    Args:
        positions: (n, 3) Å.  rng: numpy Generator.  sigma: Å per Cartesian component.
    Returns:
        (n, 3) float64 perturbed positions.
    """
    positions = np.asarray(positions, dtype=np.float64)
    return positions + rng.normal(0.0, float(sigma), size=positions.shape)


# ----------------------------------------------------------------------------- GFN2-xTB


def _single_thread_env() -> None:
    for var in _THREAD_VARS:
        os.environ.setdefault(var, "1")


def xtb_singlepoint(
    numbers: np.ndarray, positions_angstrom: np.ndarray, charge: int = 0, uhf: int = 0
) -> tuple[float, np.ndarray]:
    """GFN2-xTB energy and gradient (tblite, verbosity 0).

    Args:
        numbers: (n,) atomic numbers.  positions_angstrom: (n, 3) Å.
        charge: total charge.  uhf: number of unpaired electrons.
    Returns:
        (energy in hartree, gradient (n, 3) in hartree/bohr).
    Raises:
        ValueError: the SCF failed (the tblite message is included).
    """
    _single_thread_env()
    from tblite.interface import Calculator

    numbers = np.ascontiguousarray(numbers, dtype=np.int32)
    pos_bohr = np.ascontiguousarray(positions_angstrom, dtype=np.float64) / BOHR_ANGSTROM
    try:
        calc = Calculator("GFN2-xTB", numbers, pos_bohr, charge=float(charge), uhf=int(uhf))
        calc.set("verbosity", 0)
        res = calc.singlepoint()
        energy = float(res.get("energy"))
        grad = np.array(res.get("gradient"), dtype=np.float64).reshape(len(numbers), 3)
    except Exception as e:  # tblite raises its own error types
        raise ValueError(f"GFN2-xTB single point failed: {e}") from e
    if not np.isfinite(energy) or not np.all(np.isfinite(grad)):
        raise ValueError("GFN2-xTB returned non-finite energy or gradient")
    return energy, grad


_ATOM_ENERGY_CACHE: dict[int, float] = {}


def isolated_atom_energies(elements: Iterable[str | int]) -> dict[int, float]:
    """GFN2-xTB energies (hartree) of neutral free atoms, keyed by atomic number; cached.

    Open-shell atoms use ``uhf`` = their Hund's-rule unpaired electrons (H 1, C 2, N 3, O 2,
    F 1, P 3, S 2, Cl 1, Br 1, I 1). GFN2 has no spin-polarisation term, so these differ
    by a few mHa from low-spin values; formation energies only shift by a per-element
    constant either way.
    """
    from rdkit import Chem

    table = Chem.GetPeriodicTable()
    out: dict[int, float] = {}
    for el in elements:
        z = int(el) if isinstance(el, int | np.integer) else table.GetAtomicNumber(str(el))
        if z not in _ATOM_ENERGY_CACHE:
            uhf = UNPAIRED_ELECTRONS.get(z)
            if uhf is None:
                raise ValueError(f"no ground-state spin known for element Z={z}")
            e, _ = xtb_singlepoint(np.array([z]), np.zeros((1, 3)), charge=0, uhf=uhf)
            _ATOM_ENERGY_CACHE[z] = e
        out[z] = _ATOM_ENERGY_CACHE[z]
    return out


# ----------------------------------------------------------------------------- rotations


def seeded_rotations(n: int, seed: int) -> np.ndarray:
    """(n, 3, 3) float64 Haar-random rotations from ``torch.Generator().manual_seed(seed)``."""
    import torch

    from equipipe.so3 import haar_rotations

    g = torch.Generator().manual_seed(int(seed))
    return haar_rotations(int(n), g, dtype=torch.float64).numpy()


def item_seed(seed: int, index: int, stream: int = 0) -> int:
    """A 31-bit seed for item ``index`` of a build seeded ``seed`` (independent streams)."""
    ss = np.random.SeedSequence([int(seed), int(index), int(stream)])
    return int(ss.generate_state(1, dtype=np.uint32)[0] >> 1)


# ----------------------------------------------------------------------------- parallel


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def parallel_map(
    fn: Callable[[T], R],
    items: Sequence[T],
    workers: int,
    desc: str | None = None,
    progress: bool = True,
) -> list[R]:
    """``[fn(x) for x in items]`` over ``workers`` processes (one per core), in input order.

    Processes are *spawned* with ``OMP_NUM_THREADS=1`` (and BLAS equivalents) in their
    environment, so native libraries start single-threaded. ``fn`` must be a picklable
    top-level function, and the calling program's ``__main__`` must be import-safe (spawn
    re-imports it; console scripts and ``python -m`` are). ``workers <= 1`` runs in this
    process. A tqdm bar shows progress.
    """
    from tqdm.auto import tqdm

    items = list(items)
    workers = max(1, min(int(workers), len(items) or 1))
    bar: Any = tqdm(total=len(items), desc=desc, disable=not progress, leave=False)
    try:
        if workers == 1:
            out = []
            for x in items:
                out.append(fn(x))
                bar.update()
            return out
        ctx = mp.get_context("spawn")
        with _env({k: "1" for k in _THREAD_VARS}), ctx.Pool(workers) as pool:
            out = []
            for r in pool.imap(fn, items, chunksize=1):
                out.append(r)
                bar.update()
            return out
    finally:
        bar.close()


def draw_until(
    n: int,
    smiles: Callable[[int], list[str]],
    make_task: Callable[[int, str], dict],
    fn: Callable[[dict], Any],
    is_ok: Callable[[Any], bool],
    workers: int,
    desc: str,
) -> tuple[list[tuple[dict, Any]], list[tuple[dict, Any]]]:
    """Build molecules in seeded pool order until ``n`` succeed; a failure draws the next one.

    ``smiles(m)`` gives the first m SMILES of the pool, ``make_task(j, smiles)`` the task of pool
    index j, ``fn`` runs one task in a worker process. Indices are consumed in order a batch at a
    time, so the result does not depend on the worker count.

    Returns:
        (successes, failures) as lists of (task, result).
    """
    good: list[tuple[dict, Any]] = []
    bad: list[tuple[dict, Any]] = []
    k = 0
    while len(good) < n:
        need = n - len(good)
        pool = smiles(k + need)
        tasks = [make_task(j, pool[j]) for j in range(k, k + need)]
        k += need
        for task, result in zip(tasks, parallel_map(fn, tasks, workers, desc=desc)):
            (good if is_ok(result) else bad).append((task, result))
    return good, bad
