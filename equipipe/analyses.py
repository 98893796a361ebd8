"""Mechanism analyses of a finished run: loss landscape / Hessian conditioning, test-time twirling.

Entry points (called by ``equipipe analyse <kind> --run DIR --out DIR --spec JSON``) read a run
folder (``run.json`` + a checkpoint, through ``equipipe.runs.load_run``) and write an output
folder:

``landscape(run_dir, out_dir, spec)`` ->
    ``landscape_kappa.parquet``   one row per loss (total, mean, equiv): lambda_max,
        lambda_min_pos, kappa, n_null, n_negative, rel_tol, n_eigenvalues, method, value (the
        loss at the checkpoint), param, n_params, field, unit, k, rotations, n_elements,
        checkpoint, step
    ``landscape_spectrum.parquet`` loss, index, eigenvalue (ascending), method
    ``landscape_grid.parquet``    axes (whose eigenvectors span the plane: total|mean|equiv),
        loss, i, j, alpha (offset along the λmin+ eigenvector), beta (along λmax), value
    ``landscape_fit.parquet``     axes, loss, r2, curvature_alpha, curvature_beta,
        curvature_ratio, range (quadratic fit of each surface)
    ``landscape_axes.npz``        <loss>_min, <loss>_max unit eigenvectors (flattened block)
    ``landscape_density.parquet`` (spec ``slq_probes`` > 0) loss (mean, equiv), method (slq,
        exact where the block's spectrum was exact), probe, node, weight: spectral densities
    ``landscape_threshold.parquet`` (with it) loss, method, threshold τ (relative to λmax),
        kappa (λmax / λmin(τ)), count (eigenvalues above τ·λmax), count_se, resolution
        (eigenvalues one quadrature node carries there), resolved, lambda_max,
        fraction_negative, n_params (``equipipe.slq``)
    ``landscape.json``            spec, run facts, grid step, curvature route (quadratic model
        of affine predictions / autograd / lanczos) and its affinity check, surface method per
        plane, centre values, the training evaluation's logged values at that step, seconds
``twirling(run_dir, out_dir, spec)`` ->
    ``twirling.parquet`` one row per (field, t, mode, k): twirled_mse, twirled_mse_se, n_draws,
        predicted (= mean_unbiased + equiv_unbiased / k), predicted_se, mean_unbiased,
        equiv_unbiased, k_decomp, exact_twirl_mse, exact_equiv, exact_predicted (direct force
        head only: the exact K -> infinity twirl and the closed-form equivariance error),
        n_elements, unit
    ``twirling.json``    spec, run facts, seconds

The ``*_from_model`` functions do the work on a model, task and batches (used by the tests).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn

from equipipe import landscape as ls
from equipipe.config import defaults, with_defaults
from equipipe.equivariance import (
    broadcast_mask,
    canonical_predictions,
    decomposition_from_predictions,
    example_rotations,
)
from equipipe.forcehead import HEAD_PARAM, head_equiv_error, with_twirled_head
from equipipe.models import interface
from equipipe.so3 import octahedral_rotations
from equipipe.tasks.base import Batch, Task

LANDSCAPE_DEFAULTS: dict[str, Any] = defaults("analysis", "landscape")  # the schema's

TWIRLING_DEFAULTS: dict[str, Any] = defaults("analysis", "twirling")  # the schema's


def _dtype(name: str) -> torch.dtype:
    allowed = {"float64": torch.float64, "float32": torch.float32}
    if name not in allowed:
        raise ValueError(f"dtype {name!r} is unknown; allowed: {', '.join(allowed)}")
    return allowed[name]


def _load(run_dir: Path, spec: dict):
    from equipipe.runs import load_run  # heavy: data loader, store

    run = load_run(run_dir, spec["checkpoint"], device=spec["device"])
    batches = run.batches(spec["split"], spec["n_examples"], spec["batch_size"])
    return run, batches


def _step_of(info: dict, checkpoint: str) -> int | None:
    """Training step of a checkpoint: early.pt is saved at ``analysis_step`` (or at the end of a
    shorter run), model.pt at the end."""
    train = info.get("train_config") or (info.get("spec", {}).get("train") or {})
    total = info.get("steps") or train.get("steps")
    if checkpoint == "early.pt":
        step = int(train.get("analysis_step", 500))
        return min(step, int(total)) if total else step
    return int(total) if total else None


# --------------------------------------------------------------------------------------------
# Landscape


def landscape_from_model(
    model: nn.Module,
    task: Task,
    batches: list[Batch],
    spec: dict | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Spectra, κ, grids and fits of L_total, L_mean, L_equiv with respect to one block.

    ``generator`` fixes the views and rotations (default: seeded with ``spec["seed"]`` or 0).
    ``rotations: auto`` uses the 24 octahedral rotations exhaustively when the block is the
    direct force head and the octahedral L_equiv equals the closed form (true on an invariant
    backbone: only second moments of R enter, PAPER.md), so L_mean and L_equiv are exact; else
    K Haar rotations per example.
    Returns ``landscape.run_landscape``'s dict with "kappa" rows completed with the block and
    evaluation facts, and "meta".
    """
    spec = with_defaults(spec, LANDSCAPE_DEFAULTS, "landscape")
    seed = spec["seed"] if spec["seed"] is not None else 0
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    gen_state = gen.get_state()
    if spec["rotations"] not in ("auto", "haar", "octahedral"):
        raise ValueError(
            f"rotations {spec['rotations']!r} is unknown; allowed: auto, haar, octahedral"
        )
    k = int(spec["k"] or 10)
    if spec["rotations"] != "octahedral" and k < 2:
        raise ValueError(f"landscape k={k}: the decomposition needs K >= 2 rotations")
    auto_dtype = spec["dtype"] == "auto"
    # auto: the model's own precision for the quadratic route (Jacobian Gram sums are float64),
    # float64 for the autograd route, whose Hessians would otherwise carry float32 noise
    dtype = torch.float32 if auto_dtype else _dtype(spec["dtype"])
    param = spec["param"] or ls.default_block(model)

    def views_with(g: torch.Generator, dt: torch.dtype, rotations: str) -> list[ls.View]:
        group = octahedral_rotations(dt) if rotations == "octahedral" else None
        return ls.make_views(task, batches, k, g, group, dt, spec["labels"])

    def objective_for(dt: torch.dtype, rotations: str) -> ls.BlockObjective:
        g = torch.Generator()
        g.set_state(gen_state)
        obj = ls.BlockObjective(model, task, views_with(g, dt, rotations), param, spec["field"],
                                spec["device_strategy"], dt)  # fmt: skip
        with torch.no_grad():  # one plain forward: fails here if the model cannot run in dt
            task.predict(obj.model, obj.views[0].batch)
        return obj

    rotations = spec["rotations"]
    try:
        obj = objective_for(dtype, "octahedral" if rotations == "auto" else rotations)
    except (RuntimeError, TypeError) as e:
        if dtype == torch.float32:
            raise
        warnings.warn(
            f"landscape: the model does not run in float64 ({e}); using float32", stacklevel=2
        )
        dtype = torch.float32
        obj = objective_for(dtype, "octahedral" if rotations == "auto" else rotations)
    closed_form = None
    if rotations == "auto":
        # checked on the first view (cheap): the octahedral L_equiv equals the closed form iff
        # only second moments of R enter, i.e. the rest of the network is invariant
        first_view = obj.views[:1]
        closed_form = _closed_form_equiv(obj, first_view)
        exact = closed_form is not None and math.isclose(
            obj.values(views=first_view)["equiv"], closed_form,
            rel_tol=1e-6 if dtype == torch.float64 else 1e-3,
        )  # fmt: skip
        rotations = "octahedral" if exact else "haar"
        if not exact:
            obj = objective_for(dtype, "haar")

    def autograd_objective() -> ls.BlockObjective:
        nonlocal dtype
        try:
            other = objective_for(torch.float64, rotations)
        except (RuntimeError, TypeError):
            return obj
        dtype = torch.float64
        return other

    resample = None
    if spec["resample"]:

        def resample(point: int) -> list[ls.View]:
            g = torch.Generator().manual_seed(seed * 1_000_003 + 1 + point)
            return views_with(g, dtype, rotations)

    res = ls.run_landscape(
        obj, n=int(spec["grid"]), step=spec["step"], exact_max=int(spec["exact_max"]),
        lanczos_k=int(spec["lanczos_k"]), rel_tol=float(spec["rel_tol"]), seed=seed,
        resample=resample, planes=spec["planes"],
        autograd_objective=autograd_objective if auto_dtype and dtype != torch.float64 else None,
    )  # fmt: skip
    if int(spec["slq_probes"]) > 0:
        try:  # float64 HVPs where the model runs in it (float32 Hessians carry rounding noise)
            slq_obj = objective_for(torch.float64, rotations)
        except (RuntimeError, TypeError):
            slq_obj = obj
        res["density"], res["threshold"] = hessian_densities(
            slq_obj, int(spec["slq_probes"]), int(spec["slq_steps"]), seed, res["spectrum"]
        )
    facts = {
        "param": obj.param_name, "n_params": obj.n_params, "field": obj.field,
        "unit": task.units.get(obj.field), "k": 24 if rotations == "octahedral" else k,
        "rotations": rotations, "n_elements": obj.n_elements,
        "dtype": str(dtype).replace("torch.", ""),
    }  # fmt: skip
    res["kappa"] = [{**row, **facts} for row in res["kappa"]]
    res["meta"] = {**facts, "grid": int(spec["grid"]), "grid_step": res["step"],
                   "curvature": res["curvature"], "affine_error": res["affine_error"],
                   "surface_method": res["surface_method"], "centre": res["centre"],
                   "n_views": len(obj.views), "resample": bool(spec["resample"]),
                   "closed_form_equiv_first_view": closed_form}  # fmt: skip
    return res


# relative thresholds τ of κ(τ) and the eigenvalue counts above τ·λmax
THRESHOLDS: tuple[float, ...] = tuple(10.0 ** (e / 2) for e in range(-20, 1))


def hessian_densities(
    obj: ls.BlockObjective, n_probes: int, n_steps: int, seed: int, spectrum_rows: list[dict]
) -> tuple[list[dict], list[dict]]:
    """SLQ spectral densities of the L_mean and L_equiv Hessians of the block, and κ(τ) and
    the eigenvalue count above τ·λmax for τ in ``THRESHOLDS`` (``equipipe.slq``); the same
    from the exact eigenvalues where the landscape computed them (method "exact").

    Returns (density rows: loss, method, probe, node, weight; threshold rows: loss, method,
    threshold, kappa, count, count_se, resolution, resolved, lambda_max, fraction_negative,
    n_params; ``resolved``: the count above the threshold is known to within max(2, 10 %),
    ``Density.resolution``).
    """
    from equipipe.slq import Density, slq

    hvps = obj.hvps()
    dens: dict[tuple[str, str], Density] = {}
    for i, loss in enumerate(("mean", "equiv")):
        gen = torch.Generator().manual_seed(seed * 7919 + 17 + i)
        dens[(loss, "slq")] = slq(hvps[loss], obj.n_params, n_probes, n_steps, gen)
        exact = [r["eigenvalue"] for r in spectrum_rows if r["loss"] == loss and r["method"] == "exact"]  # fmt: skip
        if len(exact) == obj.n_params:
            dens[(loss, "exact")] = Density.exact(exact)
    obj.reset()
    density_rows, threshold_rows = [], []
    for (loss, method), d in dens.items():
        for p in range(d.n_probes):
            for node, w in zip(d.nodes[p], d.weights[p]):
                if np.isfinite(node):
                    density_rows.append({"loss": loss, "method": method, "probe": p,
                                         "node": float(node), "weight": float(w)})  # fmt: skip
        count, count_se = d.count_above(THRESHOLDS)
        kappa, res = d.kappa(THRESHOLDS), d.resolution(THRESHOLDS)
        for t, k, c, cse, r in zip(THRESHOLDS, kappa, count, count_se, res):
            threshold_rows.append({"loss": loss, "method": method, "threshold": t,
                                   "kappa": float(k), "count": float(c), "count_se": float(cse),
                                   "resolution": float(r), "resolved": bool(r <= max(2.0, 0.1 * c)),
                                   "lambda_max": d.lambda_max,
                                   "fraction_negative": d.fraction_negative(),
                                   "n_params": obj.n_params})  # fmt: skip
    return density_rows, threshold_rows


def _closed_form_equiv(obj: ls.BlockObjective, views: list[ls.View]) -> float | None:
    """The direct head's exact per-element L_equiv over ``views`` (no mask), or None."""
    if (
        obj.param_name != HEAD_PARAM
        or obj.field != "forces"
        or not interface.direct_force_head(obj.model) is not None
    ):
        return None
    total, n = 0.0, 0
    for v in views:
        err = head_equiv_error(obj.model, v.batch, obj.task)
        total += float(err.sum())
        n += 3 * err.numel()
    return total / n


def write_landscape(res: dict[str, Any], out_dir: Path, extra_meta: dict | None = None) -> None:
    """Write ``landscape_from_model``'s result as the files listed in the module docstring."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kappa_schema = {
        "loss": pl.String, "lambda_max": pl.Float64, "lambda_min_pos": pl.Float64,
        "kappa": pl.Float64, "n_null": pl.Int64, "n_negative": pl.Int64, "rel_tol": pl.Float64,
        "n_eigenvalues": pl.Int64, "method": pl.String, "value": pl.Float64, "param": pl.String,
        "n_params": pl.Int64, "field": pl.String, "unit": pl.String, "k": pl.Int64,
        "rotations": pl.String, "n_elements": pl.Int64, "dtype": pl.String,
        "checkpoint": pl.String, "step": pl.Int64,
    }  # fmt: skip
    meta = {**res.get("meta", {}), **(extra_meta or {})}
    rows = [
        {**r, "checkpoint": meta.get("checkpoint"), "step": meta.get("step")} for r in res["kappa"]
    ]
    pl.DataFrame(rows, schema=kappa_schema).write_parquet(out_dir / "landscape_kappa.parquet")
    pl.DataFrame(res["spectrum"], schema={"loss": pl.String, "index": pl.Int64,
                 "eigenvalue": pl.Float64, "method": pl.String}).write_parquet(
        out_dir / "landscape_spectrum.parquet")  # fmt: skip
    grid_schema = {"axes": pl.String, "loss": pl.String, "i": pl.Int64, "j": pl.Int64,
                   "alpha": pl.Float64, "beta": pl.Float64, "value": pl.Float64}  # fmt: skip
    pl.DataFrame(res["grid"], schema=grid_schema).write_parquet(out_dir / "landscape_grid.parquet")
    fit_schema = {"axes": pl.String, "loss": pl.String, "r2": pl.Float64,
                  "curvature_alpha": pl.Float64, "curvature_beta": pl.Float64,
                  "curvature_ratio": pl.Float64, "range": pl.Float64}  # fmt: skip
    pl.DataFrame(res["fit"], schema=fit_schema).write_parquet(out_dir / "landscape_fit.parquet")
    arrays = {f"{name}_{which}": vec for name, (u, v) in res["axes"].items()
              for which, vec in (("min", u), ("max", v))}  # fmt: skip
    np.savez(out_dir / "landscape_axes.npz", **arrays)
    if "density" in res:  # SLQ (spec slq_probes > 0)
        pl.DataFrame(res["density"], schema={"loss": pl.String, "method": pl.String,
                     "probe": pl.Int64, "node": pl.Float64, "weight": pl.Float64}).write_parquet(
            out_dir / "landscape_density.parquet")  # fmt: skip
        pl.DataFrame(res["threshold"], schema={"loss": pl.String, "method": pl.String,
                     "threshold": pl.Float64, "kappa": pl.Float64, "count": pl.Float64,
                     "count_se": pl.Float64, "resolution": pl.Float64, "resolved": pl.Boolean,
                     "lambda_max": pl.Float64,
                     "fraction_negative": pl.Float64, "n_params": pl.Int64}).write_parquet(
            out_dir / "landscape_threshold.parquet")  # fmt: skip
    (out_dir / "landscape.json").write_text(json.dumps(meta, indent=1, default=str))


def _logged_values(run_dir: Path, step: int | None, field: str) -> dict[str, float]:
    """The training evaluation's per-element T, M_unb, E_unb at ``step`` (if logged)."""
    path = Path(run_dir) / "metrics.parquet"
    if step is None or not path.exists():
        return {}
    df = pl.read_parquet(path).filter(
        (pl.col("step") == step) & (pl.col("split") == "val") & (pl.col("field") == field)
        & pl.col("t").is_null()
    )  # fmt: skip
    names = {"total": "total", "mean_unbiased": "mean", "equiv_unbiased": "equiv"}
    out = {}
    for metric, loss in names.items():
        v = df.filter(pl.col("metric") == metric).get_column("value")
        if len(v):
            out[loss] = float(v[0])
    return out


def landscape(run_dir: str | Path, out_dir: str | Path, spec: dict | None = None) -> dict[str, Any]:
    """Landscape analysis of one run's checkpoint (default ``early.pt``); writes ``out_dir``."""
    t0 = time.perf_counter()
    spec = with_defaults(spec, LANDSCAPE_DEFAULTS, "landscape")
    run, batches = _load(Path(run_dir), spec)
    eval_cfg = run.info.get("eval_config", {})
    if spec["k"] is None:
        spec["k"] = int(eval_cfg.get("k", 10))
    gen = (
        torch.Generator().manual_seed(spec["seed"])
        if spec["seed"] is not None
        else run.eval_generator()
    )
    res = landscape_from_model(run.model, run.task, batches, spec, gen)
    step = _step_of(run.info, spec["checkpoint"])
    # The training evaluation's values at that step (Haar, K per example): equal to "centre" when
    # the landscape also used Haar rotations from the run's evaluation generator.
    logged = _logged_values(Path(run_dir), step, res["meta"]["field"]) if not spec["labels"] else {}
    meta = {"checkpoint": spec["checkpoint"], "step": step, "spec": spec, "run": str(run_dir),
            "experiment": run.info.get("experiment"), "seed": run.info.get("seed"),
            "task": run.task.name, "logged_at_step": logged,
            "seconds": time.perf_counter() - t0}  # fmt: skip
    write_landscape(res, Path(out_dir), meta)
    return res


# --------------------------------------------------------------------------------------------
# Twirling


def _label_key(labels: dict) -> tuple:
    return tuple(sorted((str(k), v) for k, v in labels.items()))


def _masked_sum(sq: Tensor, mask: Tensor | None) -> float:
    m = broadcast_mask(mask, sq)
    return float(sq.sum() if m is None else (sq * m.to(sq.dtype)).sum())


def twirling_from_model(
    model: nn.Module,
    task: Task,
    batches: list[Batch],
    spec: dict | None = None,
    generator: torch.Generator | None = None,
) -> pl.DataFrame:
    """Held-out squared error of the K-twirled model vs the prediction L_mean + L_equiv / K.

    Per repeat r, each example gets Kmax = max(ks) Haar rotations; for every K the twirl is the
    mean of each disjoint block of K of them (floor(Kmax / K) twirls), all averaged into
    ``twirled_mse`` with a standard error over (repeat, block). L_mean and L_equiv (unbiased)
    come from an INDEPENDENT decomposition with ``k_decomp`` rotations per repeat (reusing the
    same rotations would make the endpoints K = 1 and K = Kmax equal the prediction by algebra).
    Views carrying a finite rotation set (``task.rotation_set``) are skipped. ``generator``
    fixes the views (flow time, noise); default seeded with ``spec["seed"]``.
    """
    spec = with_defaults(spec, TWIRLING_DEFAULTS, "twirling")
    ks = sorted({int(k) for k in spec["ks"]})
    if not ks or ks[0] < 1:
        raise ValueError(f"twirling ks must be positive integers, got {spec['ks']}")
    k_max = ks[-1]
    k_dec = int(spec["k_decomp"] or max(k_max, 2))
    if k_dec < 2:
        raise ValueError("twirling k_decomp must be >= 2")
    repeats = int(spec["repeats"])
    seed = int(spec["seed"])
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    exact = bool(spec["exact"]) and interface.direct_force_head(model) is not None
    dtype = next(model.parameters()).dtype
    twin = with_twirled_head(model).eval() if exact else None  # the exact K -> infinity twirl

    views = []
    for batch in batches:
        for lab, view in task.eval_views(batch, gen):
            if task.rotation_set(lab) is not None:
                continue
            if ls._label_match(lab, spec["labels"]):
                views.append((dict(lab), view))
    if not views:
        raise ValueError(
            "twirling: no evaluation view to twirl (all views carry a finite rotation set?)"
        )

    # sums over views, keyed by (label key, field)
    twirl_sums: dict[tuple, np.ndarray] = {}  # -> (repeats, n_k, max blocks) sums, NaN unused
    decs: dict[tuple, list] = {}
    exact_mean: dict[tuple, float] = {}
    exact_equiv: dict[tuple, float] = {}
    n_elements: dict[tuple, int] = {}
    labels_of: dict[tuple, dict] = {}
    for vi, (lab, view) in enumerate(views):
        lk = _label_key(lab)
        y_all = task.target(view)
        masks = task.element_mask(view) or {}
        B = task.num_examples(view)
        for r in range(repeats):
            g_meas = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * vi + 2 * r)
            g_dec = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * vi + 2 * r + 1)
            with torch.no_grad():
                z = canonical_predictions(model, task, view, example_rotations(B, k_max, g_meas, dtype=dtype),
                                          spec["device_strategy"])  # fmt: skip
                zd = canonical_predictions(model, task, view, example_rotations(B, k_dec, g_dec, dtype=dtype),
                                           spec["device_strategy"])  # fmt: skip
            for f in task.fields:
                if f not in z:
                    continue
                key = (lk, f)
                labels_of[lk] = lab
                y = y_all[f].double()
                mask = masks.get(f)
                d = decomposition_from_predictions(zd[f], y_all[f], mask=mask)
                per_r = decs.setdefault(key, [None] * repeats)
                per_r[r] = d if per_r[r] is None else per_r[r] + d
                if r == 0:
                    n_elements[key] = n_elements.get(key, 0) + d.n_elements
                arr = twirl_sums.setdefault(key, np.zeros((repeats, len(ks), k_max)))
                zf = z[f].double()
                for ki, K in enumerate(ks):
                    for b in range(k_max // K):
                        tw = zf[b * K : (b + 1) * K].mean(0)
                        arr[r, ki, b] += _masked_sum((y - tw).pow(2), mask)
        if twin is not None:
            with torch.no_grad():
                tw = task.predict(twin, view)
            f = "forces"
            key = (lk, f)
            exact_mean[key] = exact_mean.get(key, 0.0) + _masked_sum(
                (y_all[f].double() - tw[f].double()).pow(2), masks.get(f)
            )
            exact_equiv[key] = exact_equiv.get(key, 0.0) + float(
                head_equiv_error(model, view, task).double().sum()
            )

    model.train(was_training)
    rows = []
    for key, arr in twirl_sums.items():
        lk, f = key
        lab = labels_of[lk]
        n = n_elements[key]
        dec_vals = [d.per_element() for d in decs[key]]
        mean_r = np.array([v["mean_unbiased"] for v in dec_vals])
        equiv_r = np.array([v["equiv_unbiased"] for v in dec_vals])
        for ki, K in enumerate(ks):
            vals = arr[:, ki, : k_max // K].reshape(-1) / n
            pred_r = mean_r + equiv_r / K
            row = {
                "field": f, "t": float(lab["t"]) if lab.get("t") is not None else None,
                "mode": str(lab["mode"]) if "mode" in lab else None, "k": K,
                "twirled_mse": float(vals.mean()), "twirled_mse_se": _se(vals), "n_draws": int(vals.size),
                "predicted": float(pred_r.mean()), "predicted_se": _se(pred_r),
                "mean_unbiased": float(mean_r.mean()), "equiv_unbiased": float(equiv_r.mean()),
                "k_decomp": k_dec, "exact_twirl_mse": None, "exact_equiv": None, "exact_predicted": None,
                "n_elements": n, "unit": task.units.get(f),
            }  # fmt: skip
            if key in exact_mean:
                em, ee = exact_mean[key] / n, exact_equiv[key] / n
                row.update(exact_twirl_mse=em, exact_equiv=ee, exact_predicted=em + ee / K)
            rows.append(row)
    schema = {
        "field": pl.String, "t": pl.Float64, "mode": pl.String, "k": pl.Int64,
        "twirled_mse": pl.Float64, "twirled_mse_se": pl.Float64, "n_draws": pl.Int64,
        "predicted": pl.Float64, "predicted_se": pl.Float64, "mean_unbiased": pl.Float64,
        "equiv_unbiased": pl.Float64, "k_decomp": pl.Int64, "exact_twirl_mse": pl.Float64,
        "exact_equiv": pl.Float64, "exact_predicted": pl.Float64, "n_elements": pl.Int64,
        "unit": pl.String,
    }  # fmt: skip
    return pl.DataFrame(rows, schema=schema).sort("field", "t", "mode", "k", nulls_last=True)


def _se(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / math.sqrt(x.size)) if x.size >= 2 else math.nan


def twirling(run_dir: str | Path, out_dir: str | Path, spec: dict | None = None) -> pl.DataFrame:
    """Twirling analysis of one run's checkpoint (default ``model.pt``); writes ``out_dir``."""
    t0 = time.perf_counter()
    spec = with_defaults(spec, TWIRLING_DEFAULTS, "twirling")
    run, batches = _load(Path(run_dir), spec)
    table = twirling_from_model(run.model, run.task, batches, spec, run.eval_generator())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.write_parquet(out_dir / "twirling.parquet")
    meta = {"checkpoint": spec["checkpoint"], "step": _step_of(run.info, spec["checkpoint"]),
            "spec": spec, "run": str(run_dir), "experiment": run.info.get("experiment"),
            "seed": run.info.get("seed"), "task": run.task.name,
            "primary_field": run.task.primary_field,
            "seconds": time.perf_counter() - t0}  # fmt: skip
    (out_dir / "twirling.json").write_text(json.dumps(meta, indent=1, default=str))
    return table
