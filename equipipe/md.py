"""Rotated-start molecular dynamics: what a model's equivariance error does to a simulation.

NVE velocity-Verlet runs (``ase.md.verlet.VelocityVerlet``) with the ASE calculator of
``equipipe.calculator``, from Maxwell-Boltzmann velocities at ``temperature_K`` with zero net
momentum and zero angular momentum (ASE's ``thermalize_momenta``, ``Stationary`` and
``ZeroRotation``, temperature preserved). Each held-out molecule (centred at its centre of mass) is started as is, (x0, v0),
and rotated by Haar rotations R_r (``equipipe.so3.haar_rotations``, seeded), (R x0, R v0).

Measured per trajectory pair, molecule m and rotation r:

    d(t) = sqrt( mean_i | R_r^T x_{m,r,i}(t) - x_{m,i}(t) |^2 )      (Å; RMSD over atoms)

which is 0 for all t for an exactly equivariant force field and exact arithmetic. Per
trajectory: energy drift (least-squares slope of the total energy per atom, eV/atom/ps),
angular-momentum drift |L(T) - L(0)| / T (amu Å^2/fs per ps, about the centre of mass) and
blow-ups (a non-finite value, an atom farther than ``blowup_distance`` Å from every other atom,
or two atoms closer than ``collapse_distance`` Å): the trajectory stops there, its time is
recorded, and it is counted.

All replicas of one (model, variant) run in ONE ``ase.Atoms`` with a per-atom ``molecule``
array: the calculator evaluates them as separate examples of one batch (no interaction), so
one model call advances every trajectory; velocity Verlet on the union is velocity Verlet on
each molecule.

Variants, per checkpoint of the model under test (escaip):
``raw`` (direct forces), ``twirl_exact`` (the exact head twirl: exactly equivariant, the
floor of the same model), ``conservative`` (F = -dE/dx, unrotated starts only: drift);
per run of the equivariant (e3nn) experiment: ``e3nn_float32``, ``e3nn_float64`` (floors).
The drift split, on the ``raw`` rows: ``drift_symmetry`` = raw - twirl_exact (what breaking
the symmetry adds), ``drift_nonconservative`` = twirl_exact - conservative (what direct,
non-gradient forces add), both of the mean |energy drift|.

Entry point ``md(run_dirs, out_dir, spec)`` writes:
    ``md.parquet``         one row per (experiment, seed, checkpoint, variant): step, pct (the
        run's logged forces pct at that step), description, n_traj, n_pairs, n_blowups,
        d_<t>fs (mean over pairs) and d_<t>fs_max for every t in ``times_fs``, energy_drift
        (mean |slope|, eV/atom/ps), angmom_drift, drift_symmetry, drift_nonconservative,
        seconds
    ``md_curves.ipc``      (Arrow IPC) experiment, seed, checkpoint, step, variant, time_fs,
        d_mean, d_max, n_pairs: the curves d(t)
    ``md_trajectories.ipc`` per trajectory: molecule, rotation, blowup, blowup_fs,
        energy_drift, angmom_drift
    ``md.json``            spec, molecules, rotations, seconds
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from ase import Atoms, units
from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta
from ase.md.verlet import VelocityVerlet

from equipipe.calculator import EquipipeCalculator, load_checkpoint
from equipipe.config import defaults, with_defaults
from equipipe.so3 import haar_rotations

MD_DEFAULTS: dict[str, Any] = defaults("analysis", "md")  # the schema's ("analysis:md")


def resolve_spec(spec: dict | None) -> dict[str, Any]:
    out = with_defaults(spec, MD_DEFAULTS, "md")
    if out["dtype"] not in ("float32", "float64"):
        raise ValueError(f"md dtype {out['dtype']!r} is unknown; allowed: float32, float64")
    n_steps = out["length_fs"] / out["timestep_fs"]
    if n_steps < 1 or abs(n_steps - round(n_steps)) > 1e-9:
        raise ValueError("md length_fs must be a positive multiple of timestep_fs")
    if any(t > out["length_fs"] + 1e-9 for t in out["times_fs"]):
        raise ValueError(f"md times_fs {out['times_fs']} exceed length_fs {out['length_fs']}")
    return out


# --------------------------------------------------------------------------------------------
# Starting points


def start_molecule(
    pos: np.ndarray, z: np.ndarray, temperature_K: float, rng: np.random.Generator
) -> Atoms:
    """Atoms centred at the centre of mass with Maxwell-Boltzmann velocities at ``temperature_K``,
    zero net momentum and zero angular momentum (temperature preserved)."""
    atoms = Atoms(numbers=np.asarray(z), positions=np.asarray(pos, dtype=np.float64))
    atoms.positions -= atoms.get_center_of_mass()
    thermalize_momenta(atoms, temperature_K, rng=rng)  # Maxwell-Boltzmann momenta
    Stationary(atoms)
    ZeroRotation(atoms)
    return atoms


def replicas(starts: list[Atoms], rotations: np.ndarray) -> tuple[Atoms, list[tuple[int, int]]]:
    """One Atoms holding, for every start m and every r, the start rotated by rotations[r].

    ``rotations`` (R, 3, 3) float64 (put the identity first for the reference trajectory).
    Returns the union (per-atom array ``molecule`` = replica index) and [(m, r)] per replica.
    """
    parts, labels = [], []
    for m, a in enumerate(starts):
        for r, rot in enumerate(rotations):
            b = a.copy()
            b.positions = a.positions @ rot.T
            b.set_velocities(a.get_velocities() @ rot.T)
            parts.append(b)
            labels.append((m, r))
    union = parts[0].copy()
    for b in parts[1:]:
        union += b
    union.arrays["molecule"] = np.repeat(np.arange(len(parts)), [len(b) for b in parts])
    return union, labels


# --------------------------------------------------------------------------------------------
# Integration


def _blown(pos: np.ndarray, finite: bool, far: float, near: float) -> bool:
    if not finite or not np.isfinite(pos).all():
        return True
    if len(pos) < 2:
        return False
    d = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)
    np.fill_diagonal(d, np.inf)
    nearest = d.min(1)
    return bool(nearest.max() > far or nearest.min() < near)


def integrate(
    atoms: Atoms,
    calc: EquipipeCalculator,
    timestep_fs: float,
    n_steps: int,
    blowup_distance: float = 3.0,
    collapse_distance: float = 0.5,
) -> dict[str, np.ndarray]:
    """NVE velocity Verlet on ``atoms`` (replicas numbered by ``atoms.arrays["molecule"]``).

    Returns per replica p (P replicas of n_p atoms) and recorded step s = 0..n_steps:
    ``pos`` list of (S, n_p, 3) arrays (NaN after a blow-up), ``etot`` (P, S) total energy per
    atom (eV), ``angmom`` (P, S, 3) angular momentum about the replica's centre of mass
    (amu Å^2/fs), ``blowup_step`` (P,) first blown step (-1: none), ``time_fs`` (S,).
    """
    mol = np.asarray(atoms.arrays["molecule"])
    n_rep = int(mol.max()) + 1
    sizes = np.bincount(mol)
    S = n_steps + 1
    pos_out = [np.full((S, int(n), 3), np.nan) for n in sizes]
    etot = np.full((n_rep, S), np.nan)
    angmom = np.full((n_rep, S, 3), np.nan)
    blowup = np.full(n_rep, -1, dtype=np.int64)
    alive = list(range(n_rep))  # replicas still in the system, in order
    work = atoms.copy()
    work.calc = calc
    dyn = VelocityVerlet(work, timestep=timestep_fs * units.fs)

    def record(s: int) -> list[int]:
        pos = work.get_positions()
        vel = work.get_velocities()  # ASE units: 0.5 m v^2 is in eV
        work.get_potential_energy()  # cached: the step's force call computed it
        e_pot = work.calc.results["molecule_energies"]
        m_work = np.asarray(work.arrays["molecule"])
        masses = work.get_masses()
        blown = []
        for j, p in enumerate(alive):
            sel = m_work == j
            x, v, ms = pos[sel], vel[sel], masses[sel]
            ke = 0.5 * float((ms[:, None] * v**2).sum())  # eV
            ok = bool(np.isfinite(e_pot[j]) and np.isfinite(v).all())
            if _blown(x, ok, blowup_distance, collapse_distance):
                blowup[p] = s
                blown.append(j)
                continue
            pos_out[p][s] = x
            etot[p, s] = (float(e_pot[j]) + ke) / len(x)
            com, vcom = ms @ x / ms.sum(), ms @ v / ms.sum()
            lx = (ms[:, None] * np.cross(x - com, v - vcom)).sum(0)
            angmom[p, s] = lx * units.fs  # amu Å^2/fs
        return blown

    def drop(blown: list[int]) -> None:
        nonlocal work, dyn
        keep_rep = [j for j in range(len(alive)) if j not in blown]
        for j in sorted(blown, reverse=True):
            alive.pop(j)
        if not alive:
            return
        m_work = np.asarray(work.arrays["molecule"])
        mask = np.isin(m_work, keep_rep)
        new = work[mask]
        new.arrays["molecule"] = np.searchsorted(np.array(keep_rep), m_work[mask])
        new.calc = calc
        work = new
        dyn = VelocityVerlet(work, timestep=timestep_fs * units.fs)

    blown = record(0)
    if blown:
        drop(blown)
    for s in range(1, S):
        if not alive:
            break
        try:
            dyn.run(1)
            blown = record(s)
        except (RuntimeError, ValueError, FloatingPointError):
            blown = list(range(len(alive)))
            blowup[alive] = s
        if blown:
            drop(blown)
    return {"pos": pos_out, "etot": etot, "angmom": angmom, "blowup_step": blowup,
            "time_fs": np.arange(S) * timestep_fs}  # fmt: skip


def deviations(traj: dict, labels: list[tuple[int, int]], rotations: np.ndarray) -> np.ndarray:
    """d(t) (pairs, S) for every replica with r >= 1 against its molecule's r = 0 replica."""
    ref = {m: p for p, (m, r) in enumerate(labels) if r == 0}
    out = []
    for p, (m, r) in enumerate(labels):
        if r == 0:
            continue
        back = traj["pos"][p] @ rotations[r]  # rows: R^T x
        diff = back - traj["pos"][ref[m]]
        out.append(np.sqrt((diff**2).sum(-1).mean(-1)))
    return np.array(out).reshape(len(out), len(traj["time_fs"]))


def drifts(traj: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per replica: energy drift (slope, eV/atom/ps) and |L(T) - L(0)| / T (amu Å^2/fs / ps),
    over the recorded steps before any blow-up (NaN with fewer than 2 of them)."""
    t_ps = traj["time_fs"] / 1000.0
    e_slope, l_rate = [], []
    for e, L in zip(traj["etot"], traj["angmom"]):
        ok = np.isfinite(e)
        if ok.sum() < 2:
            e_slope.append(math.nan)
            l_rate.append(math.nan)
            continue
        t = t_ps[ok]
        e_slope.append(float(np.polyfit(t, e[ok], 1)[0]))
        last = np.flatnonzero(ok)[-1]
        l_rate.append(float(np.linalg.norm(L[last] - L[0]) / t_ps[last]))
    return np.array(e_slope), np.array(l_rate)


def simulate(
    calc: EquipipeCalculator, starts: list[Atoms], rotations: np.ndarray, spec: dict
) -> dict[str, Any]:
    """Integrate every start under every rotation; d(t), drifts and blow-ups."""
    union, labels = replicas(starts, rotations)
    n_steps = round(spec["length_fs"] / spec["timestep_fs"])
    traj = integrate(union, calc, spec["timestep_fs"], n_steps, spec["blowup_distance"],
                     spec["collapse_distance"])  # fmt: skip
    e_drift, l_drift = drifts(traj)
    d = deviations(traj, labels, rotations) if len(rotations) > 1 else None
    return {"labels": labels, "traj": traj, "d": d, "energy_drift": e_drift,
            "angmom_drift": l_drift}  # fmt: skip


def summary(res: dict[str, Any], spec: dict) -> dict[str, Any]:
    """The md.parquet columns of one simulate() result."""
    t = res["traj"]["time_fs"]
    row: dict[str, Any] = {
        "n_traj": len(res["labels"]),
        "n_pairs": 0 if res["d"] is None else int(res["d"].shape[0]),
        "n_blowups": int((res["traj"]["blowup_step"] >= 0).sum()),
    }
    for tf in spec["times_fs"]:
        s = int(np.argmin(np.abs(t - tf)))
        vals = res["d"][:, s] if res["d"] is not None else np.array([])
        finite = vals[np.isfinite(vals)]
        row[f"d_{tf:g}fs"] = float(finite.mean()) if finite.size else None
        row[f"d_{tf:g}fs_max"] = float(finite.max()) if finite.size else None
    e = np.abs(res["energy_drift"])
    e = e[np.isfinite(e)]
    ang = res["angmom_drift"][np.isfinite(res["angmom_drift"])]
    row["energy_drift"] = float(e.mean()) if e.size else None
    row["angmom_drift"] = float(ang.mean()) if ang.size else None
    return row


# --------------------------------------------------------------------------------------------
# Runs, checkpoints and the analysis entry point


def held_out_molecules(
    info: dict, split: str, n: int, max_atoms: int | None = None
) -> list[dict[str, np.ndarray]]:
    """First conformer of each of the first ``n`` distinct molecules of ``split`` (rank order),
    among those with at most ``max_atoms`` atoms when given."""
    from equipipe.store import Store

    store = Store(info["data"]["store"])
    held = pl.read_parquet(info["data"]["split"]).filter(pl.col("split") == split).sort("rank")
    if held.height == 0:
        raise ValueError(f"md: split {info['data']['split']} has no {split!r} examples")
    rows = store.rows(held["id"].to_list())
    keys = store.index["key"].cast(str).to_numpy()[rows]
    picked, seen = [], set()
    for row, key in zip(rows, keys):
        if key in seen:
            continue
        ex = store.get(int(row))
        if max_atoms is not None and len(ex["z"]) > max_atoms:
            continue
        seen.add(key)
        picked.append(ex)
        if len(picked) == n:
            break
    if len(picked) < n:
        raise ValueError(
            f"md: split {split!r} has {len(picked)} molecules with at most {max_atoms} atoms, "
            f"{n} asked for (molecules, max_atoms)"
        )
    return picked


def checkpoint_step(info: dict, checkpoint: str) -> int | None:
    """Training step of a checkpoint file (run.json ``checkpoints``, else early/model)."""
    named = info.get("checkpoints") or {}
    if checkpoint in named:
        return int(named[checkpoint])
    total = info.get("steps")
    if checkpoint == "early.pt":
        step = int((info.get("train_config") or {}).get("analysis_step", 500))
        return min(step, int(total)) if total else step
    if checkpoint in ("model.pt", "model_ema.pt"):
        return int(total) if total is not None else None
    return None


def pct_at(
    run_dir: Path, step: int | None, field: str = "forces"
) -> tuple[float | None, int | None]:
    """The run's logged validation pct of ``field`` at ``step`` (nearest logged step)."""
    path = Path(run_dir) / "metrics.parquet"
    if step is None or not path.is_file():
        return None, None
    df = pl.read_parquet(path).filter(
        (pl.col("metric") == "pct") & (pl.col("split") == "val") & (pl.col("field") == field)
        & pl.col("t").is_null()
    )  # fmt: skip
    if df.height == 0:
        return None, None
    i = int((df["step"] - step).abs().arg_min())
    return float(df["value"][i]), int(df["step"][i])


def _runs_by_experiment(run_dirs: list[Path]) -> dict[str, list[tuple[Path, dict]]]:
    out: dict[str, list[tuple[Path, dict]]] = {}
    for d in run_dirs:
        info = json.loads((Path(d) / "run.json").read_text())
        out.setdefault(info["experiment"], []).append((Path(d), info))
    for v in out.values():
        v.sort(key=lambda p: int(p[1]["seed"]))
    return out


def md(run_dirs: list[str | Path], out_dir: str | Path, spec: dict | None = None) -> pl.DataFrame:
    """The md analysis of the given runs (the model experiment's checkpoints and the e3nn floors)."""
    t_all = time.perf_counter()
    spec = resolve_spec(spec)
    torch.set_num_threads(1)
    by_exp = _runs_by_experiment([Path(d) for d in run_dirs])
    model_exp = spec["model"] or next(
        (e for e, runs in by_exp.items() if runs[0][1].get("model") != "equivariant"), None
    )
    if model_exp not in by_exp:
        raise ValueError(
            f"md: model experiment {model_exp!r} is not among the runs {sorted(by_exp)}"
        )
    if spec["equivariant"] is not None and spec["equivariant"] not in by_exp:
        raise ValueError(
            f"md: equivariant experiment {spec['equivariant']!r} is not among the runs {sorted(by_exp)}"
        )
    first_info = by_exp[model_exp][0][1]
    mols = held_out_molecules(first_info, spec["split"], int(spec["molecules"]), spec["max_atoms"])
    starts = [
        start_molecule(m["pos"], m["z"], spec["temperature_K"],
                       np.random.default_rng([int(spec["velocity_seed"]), i]))
        for i, m in enumerate(mols)
    ]  # fmt: skip
    rots = haar_rotations(int(spec["rotations"]), torch.Generator().manual_seed(
        int(spec["rotation_seed"])), torch.float64).numpy()  # fmt: skip
    rotations = np.concatenate([np.eye(3)[None], rots])
    rows, curves, trajs = [], [], []

    def add(exp, seed, ckpt, step, pct, pct_step, variant, calc, rot):
        t0 = time.perf_counter()
        res = simulate(calc, starts, rot, spec)
        row = {"experiment": exp, "seed": seed, "checkpoint": ckpt, "step": step, "pct": pct,
               "pct_step": pct_step, "variant": variant, "description": calc.describe(),
               **summary(res, spec), "seconds": time.perf_counter() - t0}  # fmt: skip
        rows.append(row)
        base = {"experiment": exp, "seed": seed, "checkpoint": ckpt, "step": step,
                "variant": variant}  # fmt: skip
        if res["d"] is not None:
            d = res["d"]
            with np.errstate(all="ignore"):
                for s, tf in enumerate(res["traj"]["time_fs"]):
                    col = d[:, s][np.isfinite(d[:, s])]
                    curves.append({**base, "time_fs": float(tf),
                                   "d_mean": float(col.mean()) if col.size else None,
                                   "d_max": float(col.max()) if col.size else None,
                                   "n_pairs": int(col.size)})  # fmt: skip
        for p, (m, r) in enumerate(res["labels"]):
            b = int(res["traj"]["blowup_step"][p])
            trajs.append({**base, "molecule": m, "rotation": r, "blowup": b >= 0,
                          "blowup_fs": b * spec["timestep_fs"] if b >= 0 else None,
                          "energy_drift": float(res["energy_drift"][p]),
                          "angmom_drift": float(res["angmom_drift"][p])})  # fmt: skip
        return row

    for run_dir, info in by_exp[model_exp]:
        seed = int(info["seed"])
        for ckpt in spec["checkpoints"]:
            model, task, _ = load_checkpoint(run_dir, ckpt, spec["device"])
            step = checkpoint_step(info, ckpt)
            pct, pct_step = pct_at(run_dir, step)
            opts = {"device": spec["device"], "dtype": spec["dtype"]}
            raw = add(model_exp, seed, ckpt, step, pct, pct_step, "raw",
                      EquipipeCalculator(model, task, **opts), rotations)  # fmt: skip
            tw = cons = None
            if spec["twirl_exact"]:
                tw = add(model_exp, seed, ckpt, step, pct, pct_step, "twirl_exact",
                         EquipipeCalculator(model, task, twirl="exact", **opts), rotations)  # fmt: skip
            if spec["conservative"]:
                cons = add(model_exp, seed, ckpt, step, pct, pct_step, "conservative",
                           EquipipeCalculator(model, task, forces="conservative", **opts),
                           rotations[:1])  # fmt: skip
            if (
                tw is not None
                and raw["energy_drift"] is not None
                and tw["energy_drift"] is not None
            ):
                raw["drift_symmetry"] = raw["energy_drift"] - tw["energy_drift"]
                if cons is not None and cons["energy_drift"] is not None:
                    raw["drift_nonconservative"] = tw["energy_drift"] - cons["energy_drift"]
    if spec["equivariant"] is not None:
        for run_dir, info in by_exp[spec["equivariant"]]:
            step = checkpoint_step(info, "model.pt")
            pct, pct_step = pct_at(run_dir, step)
            for dtype in ("float32", "float64"):
                model, task, _ = load_checkpoint(run_dir, "model.pt", spec["device"])
                calc = EquipipeCalculator(model, task, device=spec["device"], dtype=dtype)
                add(spec["equivariant"], int(info["seed"]), "model.pt", step, pct, pct_step,
                    f"e3nn_{dtype}", calc, rotations)  # fmt: skip

    d_cols = {f"d_{t:g}fs{s}": pl.Float64 for t in spec["times_fs"] for s in ("", "_max")}
    schema = {"experiment": pl.String, "seed": pl.Int64, "checkpoint": pl.String,
              "step": pl.Int64, "pct": pl.Float64, "pct_step": pl.Int64, "variant": pl.String,
              "description": pl.String, "n_traj": pl.Int64, "n_pairs": pl.Int64,
              "n_blowups": pl.Int64, **d_cols, "energy_drift": pl.Float64,
              "angmom_drift": pl.Float64, "drift_symmetry": pl.Float64,
              "drift_nonconservative": pl.Float64, "seconds": pl.Float64}  # fmt: skip
    table = pl.DataFrame([{k: r.get(k) for k in schema} for r in rows], schema=schema)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.write_parquet(out / "md.parquet")
    curve_schema = {"experiment": pl.String, "seed": pl.Int64, "checkpoint": pl.String,
                    "step": pl.Int64, "variant": pl.String, "time_fs": pl.Float64,
                    "d_mean": pl.Float64, "d_max": pl.Float64, "n_pairs": pl.Int64}  # fmt: skip
    pl.DataFrame(curves, schema=curve_schema).write_ipc(out / "md_curves.ipc")
    traj_schema = {"experiment": pl.String, "seed": pl.Int64, "checkpoint": pl.String,
                   "step": pl.Int64, "variant": pl.String, "molecule": pl.Int64,
                   "rotation": pl.Int64, "blowup": pl.Boolean, "blowup_fs": pl.Float64,
                   "energy_drift": pl.Float64, "angmom_drift": pl.Float64}  # fmt: skip
    pl.DataFrame(trajs, schema=traj_schema).write_ipc(out / "md_trajectories.ipc")
    meta = {"spec": spec, "model_experiment": model_exp,
            "molecules": [{"n_atoms": len(a), "formula": a.get_chemical_formula()} for a in starts],
            "rotations": rots.tolist(), "seconds": time.perf_counter() - t_all}  # fmt: skip
    (out / "md.json").write_text(json.dumps(meta, indent=1, default=str))
    return table
