"""GEOM-drugs for voxel denoising: download, embedded GFN2 build, one reader, preprocessing.

Sources (``SOURCES``):

- ``geom-rdkit`` (alias ``remote``): ``rdkit_folder.tar.gz`` from Harvard Dataverse (doi
  10.7910/DVN/JNGTDF, file id 4327252): ``summary_drugs.json`` + one RDKit pickle per
  molecule. Size and md5 come from the Dataverse API; the download lands only if they match
  and records them beside the archive (``rdkit_folder.tar.gz.source.json``).
- ``midi``: MiDi's processed split ``{train,val,test}_data.pickle`` (list of
  ``(smiles, [RDKit Mol])``, 80/10/10 by molecule, seed 0) from the mirror in DATA.md. No
  checksum is published for these files, so they are refused unless the user pins one
  (``midi_sha256``) or opts in with ``allow_unverified_pickles: true`` (and even then they go
  through the restricted unpickler).
- ``embedded``: :func:`build_embedded` writes a real small set in the ``rdkit_folder`` layout,
  packed as ``rdkit_folder.tar.gz``, with a sha256 manifest the reader verifies per member.

Security (DESIGN.md): a pickle is unpickled only after its bytes match a published or pinned
checksum — the whole archive's md5 against the Dataverse value, each embedded member's sha256
against the manifest, each MiDi file against ``midi_sha256`` — or after an explicit opt-in.
Every pickle is loaded with :mod:`equipipe.data.safe_pickle` (RDKit molecules and plain data
only) in either case, so a verified archive with something unexpected is quarantined, not run,
and inside sandboxed child processes (:mod:`equipipe.data.pickle_sandbox`, ``workers`` of them,
memory-limited) that hand back plain arrays: an RDKit molecule rebuilt from a corrupted binary
that crashes its child becomes a quarantined record with the reason, never a dead job.

The archive is read member by member from the gzip stream (``tarfile`` ``r|gz``): the ~300k
pickles are never unpacked to disk.

Store (``preprocess``): per atom ``pos`` (float32 Å, centred on the conformer's centroid) and
``z`` (int8); per example ``energy`` (GFN2-xTB total energy, hartree; NaN for ``midi``) and
``boltzmann_weight`` (NaN for ``midi``). Index: ``id`` = ``<smiles-hash>/<geom_id>`` (or the
conformer's position in the molecule's list where there is no geom_id), ``key`` = SMILES
(molecule-level splits), ``n_atoms``, plus ``smiles_hash, conformer, geom_id, max_radius,
source`` and, for ``midi``, ``midi_split``.

Filters (quarantined with reasons, never dropped silently): elements outside ``elements``;
the max-radius rule — after centring on the centroid every atom must lie within the grid's
inscribed ball radius (G-1)/2·Δ minus ``radius_margin`` Å, so it stays inside the ball under
ANY rotation plus the ≤0.5 Å training shift (a radius rule, not an atom count); missing or
unreadable molecules; non-finite coordinates.

Config keys (``DEFAULTS``):

- ``source``: ``embedded`` | ``geom-rdkit`` (alias ``remote``) | ``midi``.
- ``download_dir``: a folder already holding the source file(s); linked if they verify.
- ``dataverse_api``, ``midi_url``: endpoints (overridable for mirrors and tests).
- ``rdkit_folder_md5``: pin the archive's md5 (else the value the API gave at download).
- ``midi_sha256``: ``{train|val|test: sha256}`` pins for the MiDi pickles.
- ``expected``: ``{file name: {size, md5, sha256}}`` release pins (``download.expected``):
  ``rdkit_folder.tar.gz`` md5 = ``rdkit_folder_md5``, ``<split>_data.pickle`` sha256 =
  ``midi_sha256[split]``. With the files in ``download_dir`` and their checksums pinned, the
  download step verifies and links them and contacts nothing (not even the Dataverse API).
- ``allow_unverified_pickles`` (false): opt in to unverified pickles (restricted loader).
- ``conformers_per_molecule`` (5), ``conformer_order`` (``first`` | ``lowest_energy``).
- ``elements`` (C H O N F S Cl Br).
- ``grid_size`` (32), ``grid_spacing`` (0.5 Å), ``radius_margin`` (1.0 Å = the 0.5 Å
  training shift + one atomic radius): the radius rule; use the task's grid (the paper: 64
  at 0.25 Å — the same 16 Å box). With these, 84 % of the embedded conformers pass (68 % at
  a 1.5 Å margin).
- ``max_molecules`` (None): read only the first N molecules (quick looks at the remote set).
- ``max_bad_fraction`` (0.5): fail above this quarantined fraction (the radius rule alone
  removes a share of large molecules; the quarantine table says how many).
- Embedded build: ``n_molecules`` (60), ``conformers`` (5, before RMS pruning), ``seed`` (1;
  SPICE's embedded build uses 0 over the same pool), ``min_heavy`` (8), ``max_heavy`` (24),
  ``prune_rms`` (0.5 Å), ``temperature`` (298.15 K), ``workers`` (2; also the number of
  sandboxed unpickling processes of ``preprocess``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import math
import os
import pickle
import shutil
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from equipipe.config import dataset_defaults
from equipipe.data.dataset_block import options
from equipipe.data.download import file_digest
from equipipe.data.landing import read_provenance
from equipipe.errors import ActionableError

log = logging.getLogger(__name__)

GEOM_DOI = "10.7910/DVN/JNGTDF"
RDKIT_FOLDER_ID = 4327252
ARCHIVE = "rdkit_folder.tar.gz"
ARCHIVE_SOURCE_JSON = ARCHIVE + ".source.json"  # what the API published, written at download
MANIFEST = "rdkit_folder.manifest.json"  # embedded build: sha256 of every member
MIDI_URL = "https://bits.csb.pitt.edu/files/geom_raw/"
MIDI_SPLITS = ("train", "val", "test")
HARTREE_KCAL = 627.509474  # kcal/mol per hartree
KB_KCAL = 0.0019872043  # Boltzmann constant, kcal/(mol K)
ELEMENTS: tuple[str, ...] = tuple(dataset_defaults("geom")["elements"])  # the schema's
EMBEDDED_FORMAT = "equipipe GEOM-format embedded GFN2-xTB set (RDKit NCI first_5K molecules)"

SOURCES: dict[str, dict[str, Any]] = {
    "geom-rdkit": {
        "kind": "dataverse",
        "doi": GEOM_DOI,
        "file_id": RDKIT_FOLDER_ID,
        "files": {ARCHIVE: {}},  # size and md5 from the Dataverse API at download time
        "format": "rdkit_folder",
    },
    "midi": {
        "kind": "url",
        "base": MIDI_URL,
        "files": {f"{s}_data.pickle": {"split": s} for s in MIDI_SPLITS},
        "checksum": None,  # none published: pin with midi_sha256 or opt in explicitly
        "format": "midi_pickles",
    },
    "embedded": {
        "kind": "embedded",
        "files": {ARCHIVE: {}, MANIFEST: {}},
        "format": "rdkit_folder",
    },
}

DEFAULTS: dict[str, Any] = {"source": "embedded", **dataset_defaults("geom")}  # the schema's

CONFORMER_ORDERS = ("first", "lowest_energy")


class UntrustedPickleError(ActionableError):
    """A pickle without a matching published/pinned checksum, and no explicit opt-in."""


class CorruptFileError(ActionableError):
    """A raw file is truncated or does not match its checksum: never preprocessed."""

    advice = "delete the file and download (or build) it again"


SOURCE_ALIASES = {"remote": "geom-rdkit"}


def _config(cfg: dict | None) -> dict[str, Any]:
    cfg = {**DEFAULTS, **(cfg or {})}
    cfg["source"] = SOURCE_ALIASES.get(cfg["source"], cfg["source"])
    if cfg["source"] not in SOURCES:
        raise ValueError(
            f"geom config key 'source' is {cfg['source']!r}; allowed values: {sorted(SOURCES)}"
        )
    if cfg["conformer_order"] not in CONFORMER_ORDERS:
        raise ValueError(
            f"geom config key 'conformer_order' is {cfg['conformer_order']!r}; allowed values: "
            f"{list(CONFORMER_ORDERS)}"
        )
    if int(cfg["conformers_per_molecule"]) < 1:
        raise ValueError("geom config key 'conformers_per_molecule' must be >= 1")
    if (
        float(cfg["radius_margin"]) < 0
        or float(cfg["grid_spacing"]) <= 0
        or int(cfg["grid_size"]) < 2
    ):
        raise ValueError("geom config keys grid_size >= 2, grid_spacing > 0, radius_margin >= 0")
    unknown = sorted(set(cfg["midi_sha256"] or {}) - set(MIDI_SPLITS))
    if unknown:
        raise ValueError(
            f"geom config key 'midi_sha256' has {unknown}; allowed keys: {list(MIDI_SPLITS)}"
        )
    _fold_expected(cfg)
    return cfg


PIN_KEYS = ("size", "md5", "sha256")
MIDI_FILES = {f"{s}_data.pickle": s for s in MIDI_SPLITS}


def _fold_expected(cfg: dict) -> None:
    """``download.expected`` ({file name: {size, md5, sha256}}) -> the trust pins, checked.

    ``rdkit_folder.tar.gz``'s md5 pins the archive (as ``rdkit_folder_md5``); a MiDi file's
    sha256 pins it (as ``midi_sha256[split]``); a pin given both ways must agree.
    """
    expected = cfg.get("expected") or {}
    allowed = [ARCHIVE, *MIDI_FILES]
    unknown = sorted(set(expected) - set(allowed))
    if unknown:
        raise ValueError(f"geom download.expected names {unknown}; allowed: {allowed}")
    for name, pin in expected.items():
        bad = sorted(set(pin or {}) - set(PIN_KEYS))
        if bad:
            raise ValueError(
                f"geom download.expected.{name} has unknown key(s) {bad}; allowed: {PIN_KEYS}"
            )
    md5 = (expected.get(ARCHIVE) or {}).get("md5")
    if md5:
        old = cfg.get("rdkit_folder_md5")
        if old and old.lower() != md5.lower():
            raise ValueError(
                f"geom: rdkit_folder_md5 {old} and download.expected.{ARCHIVE}.md5 {md5} differ"
            )
        cfg["rdkit_folder_md5"] = md5.lower()
    sha = dict(cfg.get("midi_sha256") or {})
    for name, split in MIDI_FILES.items():
        want = (expected.get(name) or {}).get("sha256")
        if want:
            if sha.get(split) and sha[split].lower() != want.lower():
                raise ValueError(
                    f"geom: midi_sha256.{split} and download.expected.{name}.sha256 differ"
                )
            sha[split] = want.lower()
    cfg["midi_sha256"] = sha


def _size_pin(cfg: dict, name: str) -> int | None:
    size = ((cfg.get("expected") or {}).get(name) or {}).get("size")
    return int(size) if size is not None else None


def max_radius_allowed(cfg: dict) -> float:
    """Largest centroid distance (Å) an atom may have: (G-1)/2·Δ - radius_margin."""
    return (int(cfg["grid_size"]) - 1) / 2 * float(cfg["grid_spacing"]) - float(
        cfg["radius_margin"]
    )


def smiles_hash(smiles: str) -> str:
    """16 hex digits identifying a SMILES string (first part of every example id)."""
    return hashlib.sha1(smiles.encode()).hexdigest()[:16]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- download


def download(source: str, out_dir: Path, cfg: dict | None = None) -> None:
    """Fetch ``source`` into ``out_dir`` (``embedded`` builds it instead).

    ``geom-rdkit``: size and md5 of ``rdkit_folder.tar.gz`` from the Dataverse API (a pinned
    ``rdkit_folder_md5`` must agree), a resumable verified download, then
    ``rdkit_folder.tar.gz.source.json`` recording what was verified. ``midi``: the three
    pickles (verified against ``midi_sha256`` where pinned).
    """
    from equipipe.data import landing
    from equipipe.data.download import DownloadError, dataverse_files

    cfg = _config({**options(cfg, "download"), "source": source})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = cfg["source"]
    spec = SOURCES[source]
    if spec["kind"] == "embedded":
        build_embedded(out_dir, cfg)
        return
    local = Path(cfg["download_dir"]) if cfg["download_dir"] else None
    landed = {}
    if spec["kind"] == "dataverse":
        pinned = cfg.get("rdkit_folder_md5")
        local_file = local.expanduser() / ARCHIVE if local is not None else None
        # A local copy with a pinned md5 needs no network (cluster nodes have none): verify,
        # link, record; the Dataverse API is not asked.
        exp = landing.Expected(md5=pinned.lower() if pinned else None, size=_size_pin(cfg, ARCHIVE))
        exp.origin = {k: "download.expected" if cfg.get("expected") else "rdkit_folder_md5"
                      for k in ("md5", "size") if getattr(exp, k) is not None}  # fmt: skip
        rec = (
            pinned
            and local_file is not None
            and landing.land_local_copy(local_file, out_dir, ARCHIVE, exp, cfg)
        )
        if rec:
            local = local_file
            landed[ARCHIVE] = rec
            landing.write_provenance(out_dir, source, landed)
            record = {
                "doi": spec["doi"],
                "file_id": spec["file_id"],
                "url": None,
                "local_copy": str(local),
                "size": local.stat().st_size,
                "md5": pinned.lower(),
                "checksum_source": "config pin (local copy verified; nothing contacted)",
                "pinned_by": "download.expected" if cfg.get("expected") else "rdkit_folder_md5",
            }
            _write_json(out_dir / ARCHIVE_SOURCE_JSON, record)
            log.info("geom: %s verified against the pinned md5 and linked (no network)", local)
            return
        files = dataverse_files(spec["doi"], api=cfg["dataverse_api"])
        if spec["file_id"] not in files:
            raise DownloadError(
                f"Dataverse dataset doi:{spec['doi']} has no file id {spec['file_id']} "
                f"({ARCHIVE}); it lists {sorted(files)[:10]}"
            )
        remote = files[spec["file_id"]]
        pinned = cfg.get("rdkit_folder_md5")
        if pinned and remote.md5 and remote.md5 != pinned.lower():
            raise DownloadError(
                f"Dataverse lists md5 {remote.md5} for {ARCHIVE}, the config pins {pinned}: "
                "the dataset changed or the pin is wrong; check and update rdkit_folder_md5",
                url=remote.url,
            )
        md5 = remote.md5 or (pinned.lower() if pinned else None)
        if md5 is None:
            log.warning(
                "Dataverse published no md5 for %s: preprocessing will refuse it unless "
                "rdkit_folder_md5 is pinned",
                ARCHIVE,
            )
        exp = landing.Expected(size=remote.size, md5=md5)
        exp.origin = {"size": "Dataverse API"} if remote.size is not None else {}
        if md5:
            exp.origin["md5"] = "Dataverse API" if remote.md5 else "rdkit_folder_md5"
        exp = _with_config_pins(exp, ARCHIVE, cfg)
        rec = local and landing.land_local_copy(local / ARCHIVE, out_dir, ARCHIVE, exp, cfg)
        landed[ARCHIVE] = rec or landing.fetch_and_land(remote.url, out_dir, ARCHIVE, exp, cfg)
        record = {
            "doi": spec["doi"],
            "file_id": spec["file_id"],
            "url": remote.url,
            "size": remote.size,
            "md5": md5,
            "checksum_source": "Dataverse API" if remote.md5 else ("config pin" if md5 else None),
        }
        _write_json(out_dir / ARCHIVE_SOURCE_JSON, record)
        landing.write_provenance(out_dir, source, landed)
        return
    pins = cfg["midi_sha256"] or {}
    for name, facts in spec["files"].items():
        sha = pins.get(facts["split"])
        exp = landing.Expected(sha256=sha, origin={"sha256": "midi_sha256"} if sha else {})
        exp = _with_config_pins(exp, name, cfg)
        rec = local and landing.land_local_copy(local / name, out_dir, name, exp, cfg)
        url = cfg["midi_url"].rstrip("/") + "/" + name
        landed[name] = rec or landing.fetch_and_land(url, out_dir, name, exp, cfg)
    landing.write_provenance(out_dir, source, landed)


def _with_config_pins(exp, name: str, cfg: dict):
    """``exp`` updated by ``download.expected.<name>`` (the config's pins win)."""
    from equipipe.data.landing import expected

    over = expected(name, None, cfg)
    for key, origin in over.origin.items():
        setattr(exp, key, getattr(over, key))
        exp.origin[key] = origin
    return exp


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- embedded build


def _boltzmann(energies_ha: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Relative energies (kcal/mol) and Boltzmann weights at ``temperature`` K."""
    rel = (energies_ha - energies_ha.min()) * HARTREE_KCAL
    w = np.exp(-rel / (KB_KCAL * temperature))
    return rel, w / w.sum()


def _embedded_molecule(task: dict) -> dict:
    """One molecule in the GEOM pickle layout (runs in a worker); {'error': ...} on failure."""
    from rdkit import Chem
    from rdkit.Geometry import Point3D

    from equipipe.data.embedded import embed_conformers, seeded_rotations, xtb_singlepoint

    smiles = task["smiles"]
    try:
        mol = embed_conformers(smiles, task["n_confs"], task["embed_seed"], task["prune_rms"])
    except (ValueError, RuntimeError) as e:
        return {"smiles": smiles, "error": str(e)}
    numbers = np.array([a.GetAtomicNum() for a in mol.GetAtoms()])
    confs, failed = [], []
    rots = seeded_rotations(mol.GetNumConformers(), task["rotation_seed"])
    for j, conf in enumerate(mol.GetConformers()):
        x = conf.GetPositions()
        x = (x - x.mean(0)) @ rots[j].T  # its own Haar rotation about the centroid
        one = Chem.Mol(mol, confId=conf.GetId())
        c = one.GetConformer()
        for i, p in enumerate(x):
            c.SetAtomPosition(i, Point3D(*map(float, p)))
        # label the stored geometry itself (float64 as RDKit keeps it)
        try:
            energy, _ = xtb_singlepoint(numbers, one.GetConformer().GetPositions())
        except ValueError as e:
            failed.append(f"conformer {j}: {e}")
            continue
        confs.append({"rd_mol": one, "totalenergy": energy, "rotation": rots[j].tolist(), "j": j})
    if not confs:
        return {"smiles": smiles, "error": "; ".join(failed) or "no conformers"}
    e = np.array([c["totalenergy"] for c in confs])
    rel, w = _boltzmann(e, task["temperature"])
    conformers = [
        {
            "geom_id": task["index"] * 1000 + c["j"],
            "confnum": c["j"],
            "totalenergy": float(c["totalenergy"]),
            "relativeenergy": float(r),
            "boltzmannweight": float(b),
            "degeneracy": 1,
            "rd_mol": c["rd_mol"],
            "equipipe_rotation": c["rotation"],  # Haar rotation applied (x -> R x)
        }
        for c, r, b in zip(confs, rel, w)
    ]
    record = {
        "smiles": smiles,
        "charge": int(Chem.GetFormalCharge(mol)),
        "totalconfs": len(conformers),
        "uniqueconfs": len(conformers),
        "temperature": float(task["temperature"]),
        "lowestenergy": float(e.min()),
        "ensembleenergy": float((w * rel).sum()),  # Boltzmann-mean relative energy, kcal/mol
        "conformers": conformers,
    }
    return {
        "smiles": smiles,
        "pickle": pickle.dumps(record, protocol=4),
        "summary": {
            k: record[k]
            for k in (
                "charge",
                "totalconfs",
                "uniqueconfs",
                "temperature",
                "lowestenergy",
                "ensembleenergy",
            )
        },
        "failed": failed,
    }


def build_embedded(out_dir: Path, cfg: dict | None = None) -> None:
    """Write ``out_dir/rdkit_folder.tar.gz`` (GEOM layout) and its sha256 manifest.

    ``n_molecules`` molecules from :func:`equipipe.data.embedded.smiles_pool` (GEOM elements,
    seed ``seed`` — not SPICE's), ETKDGv3 with 0.5 Å RMS pruning -> MMFF94 -> each conformer
    centred and rotated by its own seeded Haar rotation (stored as ``equipipe_rotation``) ->
    GFN2-xTB single-point energy (hartree) -> relative energies (kcal/mol) and Boltzmann
    weights at ``temperature``. Molecules that fail are replaced by the next ones of the seeded
    draw. The archive (``rdkit_folder/summary_drugs.json``, ``rdkit_folder/drugs/<hash>.pickle``)
    is byte-reproducible; ``rdkit_folder.manifest.json`` pins the sha256 of every member and
    of the archive, and records the build time.
    """
    from equipipe.data.embedded import GEOM_ELEMENTS, draw_until, item_seed, smiles_pool

    cfg = _config(options(cfg, "embedded"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n, seed = int(cfg["n_molecules"]), int(cfg["seed"])
    if n < 1 or int(cfg["conformers"]) < 1:
        raise ValueError(
            f"geom: n_molecules ({n}) and conformers ({cfg['conformers']}) must be >= 1"
        )
    t0 = time.perf_counter()
    pairs, bad = draw_until(
        n,
        lambda m: smiles_pool(m, seed, cfg["min_heavy"], cfg["max_heavy"], GEOM_ELEMENTS),
        lambda j, smi: {
            "index": j,
            "smiles": smi,
            "n_confs": int(cfg["conformers"]),
            "embed_seed": item_seed(seed, j, 0),
            "rotation_seed": item_seed(seed, j, 1),
            "prune_rms": float(cfg["prune_rms"]),
            "temperature": float(cfg["temperature"]),
        },
        _embedded_molecule,
        lambda r: "error" not in r,
        int(cfg["workers"]),
        "GEOM embedded",
    )
    failed = [f"{r['smiles']}: {r['error']}" for _, r in bad]
    for line in failed:
        log.warning("embedded GEOM: skipped %s", line)
    good = [r for _, r in pairs]
    failed += [f"{r['smiles']}: {f}" for r in good for f in r["failed"]]

    members: dict[str, bytes] = {}
    summary: dict[str, dict] = {}
    for r in good:
        rel = f"drugs/{smiles_hash(r['smiles'])}.pickle"
        members[f"rdkit_folder/{rel}"] = r["pickle"]
        summary[r["smiles"]] = {**r["summary"], "pickle_path": rel}
    members["rdkit_folder/summary_drugs.json"] = json.dumps(
        summary, indent=1, sort_keys=True
    ).encode()

    tmp = out_dir / (ARCHIVE + ".partial")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(members):
                info = tarfile.TarInfo(name)
                info.size = len(members[name])
                info.mtime = 0
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(members[name]))
    import importlib.metadata

    import rdkit

    manifest = {
        "format": EMBEDDED_FORMAT,
        "archive": ARCHIVE,
        "archive_sha256": file_digest(tmp, "sha256"),
        "members": {name: _sha256(data) for name, data in sorted(members.items())},
        "n_molecules": len(good),
        "n_conformers": sum(v["totalconfs"] for v in summary.values()),
        "seed": seed,
        "config": {
            k: cfg[k]
            for k in (
                "n_molecules",
                "conformers",
                "min_heavy",
                "max_heavy",
                "prune_rms",
                "temperature",
            )
        },
        "method": "RDKit ETKDGv3 (prune RMS) -> MMFF94 -> per-conformer seeded Haar rotation -> "
        "GFN2-xTB single point (tblite); Boltzmann weights from relative GFN2 energies",
        "rotation_seeds": "equipipe.data.embedded.seeded_rotations(n_conformers, item_seed(seed, k, 1)) "
        "for the k-th molecule of the draw (geom_id // 1000); applied x -> R x about the centroid",
        "rdkit_version": rdkit.__version__,
        "tblite_version": importlib.metadata.version("tblite"),
        "failed": failed,
        "build_seconds": round(time.perf_counter() - t0, 2),
        "workers": int(cfg["workers"]),
    }
    os.replace(tmp, out_dir / ARCHIVE)
    _write_json(out_dir / MANIFEST, manifest)
    log.info(
        "embedded GEOM: %d molecules, %d conformers in %.1f s (%d failures) -> %s",
        manifest["n_molecules"],
        manifest["n_conformers"],
        manifest["build_seconds"],
        len(failed),
        out_dir,
    )


# ----------------------------------------------------------------------------- trust


def member_verifier(raw_dir: Path, cfg: dict) -> tuple[str, Callable[[str, bytes], None] | None]:
    """How the pickles of ``raw_dir/rdkit_folder.tar.gz`` are trusted, checked BEFORE reading.

    Returns (description, per-member check or None). Order: an embedded manifest (per-member
    sha256); else the archive's md5 against ``rdkit_folder_md5`` (pinned) or the API's value
    recorded at download; else refused, unless ``allow_unverified_pickles``.

    Raises:
        CorruptFileError: the archive does not match its published/pinned checksum.
        UntrustedPickleError: nothing to verify against and no opt-in.
    """
    raw_dir = Path(raw_dir)
    archive = raw_dir / ARCHIVE
    manifest_path = raw_dir / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        pinned = manifest.get("members") or {}
        if (
            manifest.get("archive_sha256")
            and file_digest(archive, "sha256") != manifest["archive_sha256"]
        ):
            raise CorruptFileError(
                f"{archive} does not match the sha256 pinned in {manifest_path}: rebuild it "
                "(build_embedded) - it is never unpickled"
            )

        def check(name: str, data: bytes) -> None:
            if pinned.get(name) != _sha256(data):
                raise UntrustedPickleError(
                    f"{archive}:{name} is not pinned in {manifest_path} (or its sha256 differs)"
                )

        return f"embedded manifest {manifest_path.name} (per-member sha256)", check
    md5 = cfg.get("rdkit_folder_md5")
    origin = "config pin rdkit_folder_md5"
    source_json = raw_dir / ARCHIVE_SOURCE_JSON
    if not md5 and source_json.is_file():
        md5 = json.loads(source_json.read_text()).get("md5")
        origin = f"md5 published by the Dataverse API (recorded in {source_json.name})"
    if md5:
        actual = file_digest(archive, "md5")
        if actual != str(md5).lower():
            raise CorruptFileError(
                f"{archive} has md5 {actual}, the {origin} is {md5}: truncated or tampered - "
                "delete it and download it again (it is never unpickled)"
            )
        return f"archive md5 matches the {origin}", None
    if cfg["allow_unverified_pickles"]:
        log.warning(
            "%s: no published or pinned checksum; unpickling it anyway (opt-in, "
            "restricted unpickler)",
            archive,
        )
        return "UNVERIFIED (allow_unverified_pickles: true; restricted unpickler)", None
    raise UntrustedPickleError(
        f"{archive} has no published or pinned checksum to verify (no {MANIFEST}, no "
        f"{ARCHIVE_SOURCE_JSON}, no rdkit_folder_md5): refusing to unpickle it. Download it "
        "with the 'geom-rdkit' source, pin rdkit_folder_md5, or set allow_unverified_pickles: true"
    )


def _verify_midi_file(path: Path, split: str, cfg: dict) -> str:
    pin = (cfg["midi_sha256"] or {}).get(split)
    if pin:
        actual = file_digest(path, "sha256")
        if actual != str(pin).lower():
            raise CorruptFileError(
                f"{path} has sha256 {actual}, midi_sha256[{split!r}] pins {pin}: delete it and "
                "download it again (it is never unpickled)"
            )
        return "sha256 matches the config pin"
    if cfg["allow_unverified_pickles"]:
        log.warning(
            "%s: no published checksum; unpickling it with the restricted unpickler "
            "(allow_unverified_pickles: true)",
            path,
        )
        return "UNVERIFIED (allow_unverified_pickles: true; restricted unpickler)"
    raise UntrustedPickleError(
        f"{path}: the MiDi mirror publishes no checksum, so this pickle cannot be verified and is "
        "refused. Pin its sha256 in midi_sha256, or opt in with allow_unverified_pickles: true "
        "(it is then read with the restricted unpickler: RDKit molecules and plain data only)"
    )


# ----------------------------------------------------------------------------- reading


def iter_rdkit_folder(
    archive: Path,
    check: Callable[[str, bytes], None] | None = None,
    subset: str = "drugs",
    max_molecules: int | None = None,
    workers: int = 1,
) -> Iterator[tuple[str, dict | Exception]]:
    """Stream ``(member name, molecule dict | error)`` from an ``rdkit_folder.tar.gz``.

    Members are read in archive order from the gzip stream (nothing is unpacked); only
    ``*/<subset>/*.pickle`` members are unpickled, each after ``check(name, bytes)`` (raises on
    an unverified member), through the restricted unpickler, in ``workers`` sandboxed child
    processes (:mod:`equipipe.data.pickle_sandbox`): RDKit molecules come back as plain arrays
    (``{"__rdkit_mol__": True, "z", "pos", "n_conformers"}``). A member that fails to load,
    or crashes its child, is yielded as its exception (the caller quarantines it); an
    unverified member raises.
    """
    from equipipe.data.pickle_sandbox import Sandbox

    def members() -> Iterator[tuple[str, bytes]]:
        n = 0
        with tarfile.open(archive, mode="r|gz") as tar:
            for info in tar:
                if not info.isfile() or not info.name.endswith(".pickle"):
                    continue
                if f"/{subset}/" not in f"/{info.name}":
                    continue
                f = tar.extractfile(info)
                data = f.read() if f is not None else b""
                if check is not None:
                    check(info.name, data)
                yield info.name, data
                n += 1
                if max_molecules is not None and n >= max_molecules:
                    return

    try:
        with Sandbox(workers) as box:
            for name, obj in box.map(members()):
                if not isinstance(obj, dict | Exception):
                    obj = ValueError(f"pickle holds a {type(obj).__name__}, expected a dict")
                yield name, obj
    except (tarfile.ReadError, EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        raise CorruptFileError(
            f"{archive} is truncated or corrupt ({type(e).__name__}: {e}); "
            "delete it and download (or build) it again"
        ) from e


def _select_conformers(conformers: list, n: int, order: str) -> list[tuple[int, dict]]:
    """(position in the molecule's list, conformer) of the ``n`` conformers to keep."""
    items = list(enumerate(conformers))
    if order == "lowest_energy":

        def energy(item):
            e = item[1].get("totalenergy") if isinstance(item[1], dict) else None
            return float(e) if e is not None and math.isfinite(float(e)) else math.inf

        items.sort(key=energy)  # stable: ties keep the file order
    return items[:n]


def conformer_record(
    mol, vocabulary: set[int], limit: float
) -> tuple[dict[str, np.ndarray] | None, str | None, float]:
    """Arrays (pos centred, z) of an RDKit conformer, or a quarantine reason.

    Returns (arrays or None, reason or None, max centroid distance in Å).
    """
    from rdkit import Chem

    if isinstance(mol, Chem.Mol):  # trusted data only; untrusted pickles come back as arrays
        from equipipe.data.pickle_sandbox import plain

        mol = plain(mol)
    if not (isinstance(mol, dict) and mol.get("__rdkit_mol__")):
        return None, f"no RDKit molecule (got {type(mol).__name__})", math.nan
    if not mol["n_conformers"] or mol["pos"] is None:
        return None, "RDKit molecule has no conformer", math.nan
    z = np.asarray(mol["z"], dtype=np.int64).reshape(-1)
    if z.size == 0:
        return None, "molecule has no atoms", math.nan
    table = Chem.GetPeriodicTable()
    bad = sorted({int(x) for x in z} - vocabulary)
    if bad:
        names = ", ".join(table.GetElementSymbol(b) if 0 < b < 119 else str(b) for b in bad)
        return None, f"element {names} outside the vocabulary", math.nan
    pos = np.asarray(mol["pos"], dtype=np.float64)
    if pos.shape != (len(z), 3) or not np.all(np.isfinite(pos)):
        return None, "non-finite or malformed coordinates", math.nan
    pos = pos - pos.mean(0)
    r = float(np.sqrt((pos**2).sum(1)).max())
    if r > limit:
        return None, f"max radius {r:.2f} A > {limit:.2f} A (inscribed ball minus margin)", r
    return {"pos": pos.astype(np.float32), "z": z.astype(np.int8)}, None, r


def _records_rdkit_folder(raw_dir: Path, cfg: dict, source: str) -> Iterator[dict]:
    archive = raw_dir / ARCHIVE
    if not archive.is_file():
        raise FileNotFoundError(
            f"geom source {source!r}: {archive} not found; run the download (or build_embedded) "
            "step first"
        )
    how, check = member_verifier(raw_dir, cfg)
    log.info("geom: %s: %s", archive, how)
    workers = int(cfg["workers"])
    for name, obj in iter_rdkit_folder(archive, check, "drugs", cfg["max_molecules"], workers):
        if isinstance(obj, Exception):
            stem = Path(name).stem
            yield {
                "error": f"unreadable pickle: {type(obj).__name__}: {obj}",
                "key": stem,
                "id": f"{smiles_hash(stem)}/*",
                "member": name,
            }
            continue
        smiles = obj.get("smiles")
        confs = obj.get("conformers")
        if not isinstance(smiles, str) or not isinstance(confs, list):
            yield {
                "error": "pickle lacks 'smiles' or 'conformers'",
                "key": str(smiles or name),
                "id": f"{smiles_hash(str(smiles or name))}/*",
                "member": name,
            }
            continue
        yield {"smiles": smiles, "conformers": confs, "member": name}


def _records_midi(raw_dir: Path, cfg: dict) -> Iterator[dict]:
    from equipipe.data.pickle_sandbox import DEFAULT_MEMORY_BYTES, Sandbox

    paths = {split: raw_dir / f"{split}_data.pickle" for split in MIDI_SPLITS}
    for path in paths.values():
        if not path.is_file():
            raise FileNotFoundError(f"geom source 'midi': {path} not found; run the download first")
    # one sandboxed child for the three files, its memory limit sized to the largest
    memory = max(DEFAULT_MEMORY_BYTES, *(30 * p.stat().st_size for p in paths.values()))
    with Sandbox(1, memory_bytes=memory, timeout_s=3600) as box:
        yield from _records_midi_files(paths, cfg, box)


def _records_midi_files(paths: dict[str, Path], cfg: dict, box) -> Iterator[dict]:
    for split, path in paths.items():
        how = _verify_midi_file(path, split, cfg)
        log.info("geom: %s: %s", path, how)
        [(_, data)] = list(box.map([(path.name, path.read_bytes())]))
        if isinstance(data, pickle.UnpicklingError):
            raise data  # refused by the allow-list: a hostile file fails the job
        if isinstance(data, Exception):
            yield {"error": str(data), "key": f"{split}:*", "id": f"{split}/*", "midi_split": split}
            continue
        if not isinstance(data, list):
            raise CorruptFileError(f"{path} holds a {type(data).__name__}, expected a list")
        for i, item in enumerate(data):
            if cfg["max_molecules"] is not None and i >= int(cfg["max_molecules"]):
                break
            if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str)):
                yield {
                    "error": "entry is not (smiles, [Mol])",
                    "key": f"{split}:{i}",
                    "id": f"{split}-{i}/*",
                    "midi_split": split,
                }
                continue
            smiles, mols = item
            confs = [{"rd_mol": m} for m in (mols if isinstance(mols, list | tuple) else [mols])]
            yield {"smiles": smiles, "conformers": confs, "midi_split": split, "member": path.name}


def preprocess(raw_dir: Path, store_dir: Path, cfg: dict | None = None) -> None:
    """Raw GEOM (``geom-rdkit``/``embedded`` archive or ``midi`` pickles) -> store; see module doc.

    Keeps ``conformers_per_molecule`` conformers per molecule (``conformer_order``), centres
    each on its centroid, and quarantines (with a reason) elements outside ``elements``,
    conformers breaking the max-radius rule and unreadable records. Fails with no store if
    the quarantined fraction exceeds ``max_bad_fraction``, and before reading anything if a
    pickle cannot be verified (unless ``allow_unverified_pickles``).
    """
    from rdkit import Chem, RDLogger
    from tqdm.auto import tqdm

    from equipipe.store import StoreWriter, TooManyBadRecords

    # the download section carries the trust options (allow_unverified_pickles, midi_sha256)
    cfg = _config(options(cfg, "download", "preprocess"))
    source = cfg["source"]
    raw_dir, store_dir = Path(raw_dir), Path(store_dir)
    if source == "midi" and cfg["conformer_order"] == "lowest_energy":
        raise ValueError(
            "geom: conformer_order 'lowest_energy' needs energies; the midi source "
            "has none - use 'first'"
        )
    table = Chem.GetPeriodicTable()
    vocab = {table.GetAtomicNumber(str(s)) for s in cfg["elements"]}
    limit = max_radius_allowed(cfg)
    if limit <= 0:
        raise ValueError(
            f"geom: grid {cfg['grid_size']} x {cfg['grid_spacing']} A minus "
            f"radius_margin {cfg['radius_margin']} A leaves no room for atoms"
        )
    n_keep = int(cfg["conformers_per_molecule"])
    attrs = {
        "dataset": "geom",
        "source": source,
        "units": {"pos": "angstrom", "energy": "hartree", "boltzmann_weight": "1"},
        "elements": list(cfg["elements"]),
        "grid_size": int(cfg["grid_size"]),
        "grid_spacing": float(cfg["grid_spacing"]),
        "radius_margin": float(cfg["radius_margin"]),
        "max_radius": limit,
        "conformers_per_molecule": n_keep,
        "conformer_order": cfg["conformer_order"],
        "centring": "centroid of all atoms (incl. H)",
    }
    attrs["download"] = read_provenance(raw_dir)
    if (raw_dir / MANIFEST).is_file():
        m = json.loads((raw_dir / MANIFEST).read_text())
        attrs["raw_format"] = m.get("format")
        attrs["raw_build_seconds"] = m.get("build_seconds")
    records = (
        _records_midi(raw_dir, cfg)
        if source == "midi"
        else _records_rdkit_folder(raw_dir, cfg, source)
    )
    writer = StoreWriter(
        store_dir,
        per_atom=["pos", "z"],
        per_example=["energy", "boltzmann_weight"],
        max_bad_fraction=float(cfg["max_bad_fraction"]),
        attrs=attrs,
    )
    seen: set[str] = set()
    RDLogger.DisableLog("rdApp.*")
    try:
        with writer:
            for rec in tqdm(records, desc=f"preprocess geom/{source}", unit="mol"):
                extra = {"source": source}
                if "midi_split" in rec:
                    extra["midi_split"] = rec["midi_split"]
                if "error" in rec:
                    writer.quarantine(rec["id"], rec["error"], key=rec["key"], **extra)
                    continue
                smiles, h = rec["smiles"], smiles_hash(rec["smiles"])
                for j, conf in _select_conformers(
                    rec["conformers"], n_keep, cfg["conformer_order"]
                ):
                    if not isinstance(conf, dict) or conf.get("__rdkit_mol__"):
                        conf = {"rd_mol": conf}  # a bare molecule (arrays from the sandbox)
                    gid = conf.get("geom_id")
                    suffix = str(int(gid)) if isinstance(gid, int | np.integer) else f"c{j}"
                    rid = f"{h}/{suffix}"
                    if rid in seen:
                        writer.quarantine(
                            rid + f"#dup{j}", "duplicate example id", key=smiles, **extra
                        )
                        continue
                    seen.add(rid)
                    arrays, reason, radius = conformer_record(conf.get("rd_mol"), vocab, limit)
                    if reason:
                        writer.quarantine(rid, reason, key=smiles, **extra)
                        continue
                    energy = _float(conf.get("totalenergy"))
                    weight = _float(conf.get("boltzmannweight"))
                    arrays["energy"] = np.float64(energy)
                    arrays["boltzmann_weight"] = np.float64(weight)
                    writer.add(
                        rid,
                        smiles,
                        arrays,
                        smiles_hash=h,
                        conformer=j,
                        geom_id=int(gid) if isinstance(gid, int | np.integer) else -1,
                        max_radius=radius,
                        **extra,
                    )
    except TooManyBadRecords:
        raise
    except BaseException:
        shutil.rmtree(writer.tmp, ignore_errors=True)
        raise
    finally:
        RDLogger.EnableLog("rdApp.*")


def _float(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan
