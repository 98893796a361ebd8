"""The efficiency gap, measured: when does an equivariant model win per GPU-hour?

Size (~630 lines): one analysis whose rows (c, p, α, c*, the assumption checks, the sweep's
spread) share the same curves and fits; its figure is :mod:`equipipe.figures.efficiency`.

PAPER.md derives (does not compute) the break-even per-step cost ratio

    c* = (1 - p)^(-1/α)

where p = pct of the non-equivariant model (share of its held-out loss from equivariance
error) and α the exponent of loss against compute, L ∝ C^(-α). An equivariant model that
costs c times more per training step wins per GPU-hour only if c < c*, under two assumptions
that are stated next to every number this module produces (:data:`ASSUMPTIONS`).

Input: two matched experiments on the same data — a non-equivariant ``baseline`` (e.g. EScAIP
with rotation augmentation) and an ``equivariant`` one (same steps, or same wall-clock) — as
the collected metrics table (``equipipe.metrics`` columns + ``experiment``, ``seed``) and their
run.json dicts keyed ``"<experiment>/<seed>"``.

What is measured, and how noisy it is:

* c = mean sec_per_step(equivariant) / mean sec_per_step(baseline), from run.json (training
  steps only; evaluation excluded). Noise: standard error by the delta method from the spread
  over seeds; lo/hi = the smallest and largest ratio over all seed pairs. Only meaningful when
  both ran on the same kind of device (a note says when they did not).
* p = the baseline's pct at its final evaluation (primary field), mean over seeds. Noise: the
  standard error over seeds; with one seed, the decomposition's own standard error (from
  ``total_se`` and ``equiv_se``, ignoring their positive correlation, so conservative).
* α = minus the slope of log10(held-out loss) against log10(compute), least squares on the
  later part of the seed-averaged curve (steps >= ``fit_from`` x the last step). Noise: the
  residual standard error of the slope (``se``) and a pairs bootstrap over the fitted points
  (16-84 % interval, ``lo``/``hi``); with several seeds the per-seed range is in the note.
  Points of one curve are autocorrelated, so both understate the run-to-run spread.
* c* = (1 - p)^(-1/α), with a 16-84 % interval from the bootstrap draws of α and normal draws
  of p; ``equivariant_wins_probability`` = the share of draws (c also drawn) with c < c*.
* A check of assumption (a): the steps the equivariant run needs to reach the baseline's final
  twirled loss L_mean (unbiased M), over the baseline's final step (``a_step_ratio``; (a)
  holds at <= 1), and the equivariant loss over the baseline's L_mean at their last common
  step (``a_loss_ratio``).
* Directly measured: the compute the equivariant run needs to reach the baseline's final total
  loss over the baseline's compute (``measured_compute_ratio``) — beside the prediction c / c*.

Compute axis (``clock``): ``"train"`` (default) = step x sec_per_step of that run — training
compute only, as c is; ``"wall"`` = the metrics table's cumulative ``wall_s`` column, which also
counts the K-rotation evaluations (dense early in training), so it bends the power law.
Device-hours = seconds x devices (run.json ``world_size``, default 1) / 3600.

Options come from the spec (top level or ``style``): ``baseline``, ``equivariant`` (experiment
names; default the first two of ``experiments``), ``field`` (default run.json
``primary_field``), ``split`` ("val"), ``metric`` ("total"), ``clock`` ("train"|"wall"),
``fit_from`` (0.1), ``n_boot`` (1000), ``boot_seed`` (0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from equipipe.config import defaults
from equipipe.fits import Z1, power_law_fit

ASSUMPTIONS: tuple[str, str] = (
    "(a) the equivariant model reaches the non-equivariant model's twirled loss L_mean "
    "at the same number of steps",
    "(b) held-out loss falls as a power of compute, L ∝ C^(-α), with α fitted on the "
    "non-equivariant run",
)
DEFAULTS: dict = defaults("analysis", "efficiency")  # the schema's
TABLE_SCHEMA: dict[str, pl.DataType] = {
    "quantity": pl.String,
    "value": pl.Float64,
    "se": pl.Float64,
    "lo": pl.Float64,
    "hi": pl.Float64,
    "n": pl.Int64,
    "unit": pl.String,
    "method": pl.String,
    "note": pl.String,
}


# --------------------------------------------------------------------------- pure pieces


def critical_cost_ratio(p: float, alpha: float) -> float:
    """c* = (1 - p)^(-1/α): the per-step cost ratio below which equivariance pays (NaN if α <= 0)."""
    if not (0 <= p < 1) or not alpha > 0:
        return math.nan
    return (1 - p) ** (-1 / alpha)


def cost_ratio(sec_equivariant, sec_baseline) -> dict:
    """c = mean(eq) / mean(base) with a delta-method SE over seeds and the all-pairs range."""
    e, b = np.asarray(sec_equivariant, float), np.asarray(sec_baseline, float)
    value = float(e.mean() / b.mean())
    rel2 = 0.0
    for s in (e, b):
        rel2 += (s.std(ddof=1) / math.sqrt(s.size) / s.mean()) ** 2 if s.size > 1 else math.nan
    pairs = e[:, None] / b[None, :]
    return {
        "value": value,
        "se": value * math.sqrt(rel2),
        "lo": float(pairs.min()),
        "hi": float(pairs.max()),
        "n": int(pairs.size),
    }


def first_reach(steps, values, target: float) -> float:
    """First step at which a falling curve reaches ``target``, interpolated in log-log between
    evaluations (NaN if it never does)."""
    s, v = np.asarray(steps, float), np.asarray(values, float)
    below = np.flatnonzero(np.isfinite(v) & (v <= target))
    if below.size == 0:
        return math.nan
    i = int(below[0])
    if i == 0 or s[i - 1] <= 0 or v[i - 1] <= 0 or target <= 0:
        return float(s[i])
    f = (math.log(v[i - 1]) - math.log(target)) / (math.log(v[i - 1]) - math.log(v[i]))
    return float(math.exp(math.log(s[i - 1]) + f * (math.log(s[i]) - math.log(s[i - 1]))))


# --------------------------------------------------------------------------- selection


def _options(spec: dict) -> dict:
    opts = {**DEFAULTS}
    for src in (spec, spec.get("style") or {}):
        opts.update({k: v for k, v in src.items() if k in DEFAULTS and v is not None})
    exps = list(spec.get("experiments") or [])
    opts["baseline"] = opts["baseline"] or (exps[0] if exps else None)
    opts["equivariant"] = opts["equivariant"] or (exps[1] if len(exps) > 1 else None)
    if not opts["baseline"] or not opts["equivariant"]:
        raise ValueError(
            "efficiency gap: name the two experiments — spec keys 'baseline' (non-equivariant) "
            "and 'equivariant', or experiments: [baseline, equivariant]"
        )
    if opts["clock"] not in ("train", "wall"):
        raise ValueError(f"efficiency gap: clock {opts['clock']!r}; allowed: train, wall")
    return opts


def _runs_of(runs: dict[str, dict], exp: str) -> dict[int, dict]:
    out = {}
    for key, info in runs.items():
        name, _, seed = key.rpartition("/")
        if info.get("experiment", name) == exp:
            out[int(info.get("seed", seed))] = info
    if not out:
        raise ValueError(f"efficiency gap: no run.json for experiment {exp!r}; have {sorted(runs)}")
    return out


def _rows(metrics: pl.DataFrame, exp: str, metric: str, split: str, fld: str | None):
    df = metrics.filter(
        (pl.col("experiment") == exp) & (pl.col("metric") == metric) & (pl.col("split") == split)
    )
    if fld is not None and df.height and fld in df.get_column("field").to_list():
        df = df.filter(pl.col("field") == fld)
    if "t" in df.columns and df.get_column("t").null_count() < df.height:
        # Several flow times: average them (the curve of the task's mean over t).
        df = df.group_by("seed", "step").agg(
            pl.col("value").mean(), pl.col("wall_s").mean(), pl.col("unit").first()
        )
    return df


@dataclass
class Curve:
    """Seed-averaged held-out curve of one experiment (steps every seed has)."""

    step: np.ndarray
    compute_h: np.ndarray  # device-hours
    value: np.ndarray
    lo: np.ndarray  # min over seeds
    hi: np.ndarray  # max over seeds
    per_seed: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)


def _curve(df: pl.DataFrame, infos: dict[int, dict], clock: str) -> Curve:
    if df.height == 0:
        return Curve(*(np.array([]) for _ in range(5)))
    per_seed = {}
    for (seed,), g in df.group_by("seed"):
        g = g.group_by("step").agg(pl.col("value").mean(), pl.col("wall_s").mean()).sort("step")
        step = g.get_column("step").to_numpy().astype(float)
        info = infos.get(int(seed), {})
        devices = float(info.get("world_size") or 1)
        if clock == "train":
            seconds = step * float(info.get("sec_per_step", math.nan))
        else:
            seconds = g.get_column("wall_s").to_numpy()
        per_seed[int(seed)] = (step, seconds * devices / 3600, g.get_column("value").to_numpy())
    common = set.intersection(*(set(s.tolist()) for s, _, _ in per_seed.values()))
    steps = np.array(sorted(common))
    stack = {k: [] for k in ("c", "v")}
    for s, c, v in per_seed.values():
        idx = np.searchsorted(s, steps)
        stack["c"].append(c[idx])
        stack["v"].append(v[idx])
    c, v = np.array(stack["c"]), np.array(stack["v"])
    return Curve(steps, c.mean(0), v.mean(0), v.min(0), v.max(0), per_seed)


def _final(df: pl.DataFrame) -> dict[int, float]:
    """Value at each seed's last evaluated step."""
    if df.height == 0:
        return {}
    last = df.group_by("seed").agg(pl.col("step").max().alias("last"))
    df = df.join(last, on="seed").filter(pl.col("step") == pl.col("last"))
    agg = df.group_by("seed").agg(pl.col("value").mean())
    return dict(zip(agg.get_column("seed").to_list(), agg.get_column("value").to_list()))


# --------------------------------------------------------------------------- the tuning sweep


@dataclass
class Setting:
    """One run of the tuning sweep (``sweep_curves.csv``), on the sweep's split."""

    experiment: str
    lr: float
    warmup_steps: int
    step: np.ndarray
    total: np.ndarray
    pct: np.ndarray
    train_config: dict
    chosen: bool = False
    alpha: float = math.nan
    c_star: float = math.nan


def sweep_path(o: dict) -> Path:
    """The tuning sweep's summary file named by option ``sweep`` (relative paths: the working
    directory, else the repository)."""
    from equipipe.tuning import repo_path

    return repo_path(o["sweep"])


def _sweep(o: dict, models: dict[str, str], infos: dict[str, dict]) -> dict[str, list[Setting]]:
    """The sweep's settings of each side's model; α (same window rule as the pair), p and c*
    per baseline setting. The chosen setting of a model has the lowest final total."""
    from equipipe.tuning import read_sweep

    df = read_sweep(sweep_path(o))
    out: dict[str, list[Setting]] = {}
    for k, model in models.items():
        sel = df.filter(pl.col("model") == model)
        if sel.height == 0:
            raise ValueError(
                f"efficiency gap: the sweep {o['sweep']} has no runs of model {model!r} "
                f"(has {sorted(df.get_column('model').unique().to_list())})"
            )
        settings = []
        for (exp,), g in sel.group_by("experiment", maintain_order=True):
            g = g.sort("step")
            r0 = g.row(0, named=True)
            tc = {**(infos[k].get("train_config") or {}),
                  **{c: r0[c] for c in ("lr", "warmup_steps", "schedule", "lr_floor", "steps")}}  # fmt: skip
            st = Setting(str(exp), float(r0["lr"]), int(r0["warmup_steps"]),
                         g.get_column("step").to_numpy().astype(float),
                         g.get_column("total").to_numpy().astype(float),
                         g.get_column("pct").fill_null(np.nan).to_numpy().astype(float), tc)  # fmt: skip
            keep = _window(st.step, tc, o)
            st.alpha = power_law_fit(st.step[keep], st.total[keep], 0)["alpha"]
            settings.append(st)
        best = min(settings, key=lambda x: (x.total[-1], x.lr))
        best.chosen = True
        out[k] = sorted(settings, key=lambda x: (x.lr, x.warmup_steps))
    return out


def _sweep_rows(
    sweep: dict[str, list[Setting]], c: dict, fit: dict, models: dict[str, str]
) -> list:
    """c* over the baseline's sweep settings — the spread tuning implies — and the final held-out
    total of both models over their settings.

    c* per setting = (1 - p_s)^(-1/α_s) with p_s the setting's final pct and α_s its own fit in
    the same window as ``alpha`` where that window holds >= 3 evaluations, else the pair's α
    (the sweep evaluates at steps 50, 100, 200, ...: a 500-step cosine run has only 50 and 100
    in its constant-learning-rate segment). lo/hi of ``c_star_sweep`` also take the pair's α
    at its 16-84 % bootstrap ends, so they hold both the tuning and the fit's spread.
    """
    base = sweep["baseline"]
    where = f"tuning sweep ({len(base)} settings of {models['baseline']}, its split)"
    own = sum(np.isfinite(s.alpha) for s in base)
    for s in base:
        s.c_star = critical_cost_ratio(
            float(s.pct[-1]), s.alpha if np.isfinite(s.alpha) else fit["alpha"]
        )
    chosen = next(s for s in base if s.chosen)
    ends = [a for a in (fit["lo"], fit["alpha"], fit["hi"]) if np.isfinite(a)]
    combos = [critical_cost_ratio(float(s.pct[-1]), a) for s in base for a in ends]
    combos = [x for x in combos + [s.c_star for s in base] if np.isfinite(x)]
    cs = np.array([s.c_star for s in base], float)
    cs = cs[np.isfinite(cs)]
    pv = np.array([s.pct[-1] for s in base], float)
    per = "; ".join(
        f"lr {s.lr:g}/wu {s.warmup_steps}: p {s.pct[-1]:.3g}, c* {s.c_star:.4g}" for s in base
    )
    rows = [
        _row("p_sweep", float(np.median(pv)), lo=pv.min(), hi=pv.max(), n=pv.size,
             unit="fraction", method=f"final pct per setting of the {where}; value median, "
             "lo/hi min/max"),
        _row("c_star_sweep", float(np.median(cs)) if cs.size else None,
             lo=min(combos) if combos else None, hi=max(combos) if combos else None,
             n=int(cs.size), unit="ratio",
             method=f"(1 - p_s)^(-1/α) per setting of the {where}: α_s of the setting where its "
             f"window holds >= 3 evaluations ({own} of {len(base)}), else the pair's α; value "
             "median over settings, lo/hi min/max also over the pair's α bootstrap 16-84 %",
             note=f"chosen setting lr {chosen.lr:g}/wu {chosen.warmup_steps}: c* "
             f"{chosen.c_star:.4g}; c = {c['value']:.3g}; per setting: {per}"),
    ]  # fmt: skip
    for k in ("baseline", "equivariant"):
        sts = sweep[k]
        ch = next(s for s in sts if s.chosen)
        rows.append(_row(f"sweep_final_{k}", ch.total[-1],
                         lo=min(s.total[-1] for s in sts), hi=max(s.total[-1] for s in sts),
                         n=len(sts), method="final held-out total of the chosen setting "
                         "(lowest); lo/hi over the sweep's settings",
                         note=f"{models[k]}: chosen lr {ch.lr:g}, warm-up {ch.warmup_steps}"))  # fmt: skip
    return rows


# --------------------------------------------------------------------------- analysis


@dataclass
class Efficiency:
    """Everything the table and the figure show."""

    opts: dict
    field: str | None
    unit: str | None
    device_unit: str
    curves: dict[str, Curve]  # "baseline", "equivariant", "baseline_mean" (L_mean), ...
    fit: dict
    numbers: dict[str, dict]
    table: pl.DataFrame
    sweep: dict | None = None  # per model ("baseline", "equivariant"): the sweep's settings


def _row(quantity: str, value, *, se=None, lo=None, hi=None, n=None, unit="", method="", note=""):
    """One table row; non-finite numbers become nulls."""

    def num(x):
        return float(x) if x is not None and np.isfinite(x) else None

    return {"quantity": quantity, "value": num(value), "se": num(se), "lo": num(lo),
            "hi": num(hi), "n": n, "unit": unit, "method": method, "note": note}  # fmt: skip


def _mean_se(x) -> tuple[float, float]:
    x = np.asarray(x, float)
    if x.size == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan


def _cost_rows(names: dict[str, str], infos: dict[str, dict[int, dict]]) -> tuple[list, dict]:
    """sec_per_step and params of both experiments, and c."""
    rows, sec = [], {}
    for k, exp in names.items():
        sec[k] = [float(i["sec_per_step"]) for i in infos[k].values() if i.get("sec_per_step")]
        if not sec[k]:
            raise ValueError(f"efficiency gap: run.json of {exp!r} lacks sec_per_step")
        mean, se = _mean_se(sec[k])
        devices = ", ".join(sorted({str(i.get("device")) for i in infos[k].values()}))
        rows.append(_row(f"sec_per_step_{k}", mean, se=se, lo=min(sec[k]), hi=max(sec[k]),
                         n=len(sec[k]), unit="s", note=f"{exp} on {devices}",
                         method="run.json sec_per_step (training steps only), mean over seeds"))  # fmt: skip
        params = [i["params"] for i in infos[k].values() if i.get("params")]
        rows.append(_row(f"params_{k}", params[0] if params else None, n=len(params),
                         method="run.json params", note=exp))  # fmt: skip
    c = cost_ratio(sec["equivariant"], sec["baseline"])
    devices = {str(i.get("device")) for v in infos.values() for i in v.values()}
    note = "per-step cost of the equivariant model"
    if len(devices) > 1:
        note = f"runs on different devices ({sorted(devices)}): " + note
    rows.append(_row("c", c["value"], se=c["se"], lo=c["lo"], hi=c["hi"], n=c["n"], unit="ratio",
                     method="sec_per_step(eq) / sec_per_step(base); SE delta method over "
                     "seeds, lo/hi over seed pairs", note=note))  # fmt: skip
    return rows, c


def _final_pct(sel, base: str, fld: str | None) -> dict:
    """p with its SE: over seeds, or with one seed from the decomposition's own SEs."""
    final = _final(sel(base, "pct"))
    pv = np.array(list(final.values()), float)
    p, se = _mean_se(pv)
    method = "mean and SE over seeds"
    if pv.size == 1:
        seed = next(iter(final))
        f = {k: _final(sel(base, k)).get(seed) for k in ("equiv_unbiased", "equiv_se", "total", "total_se")}  # fmt: skip
        if all(v is not None and np.isfinite(v) for v in f.values()) and f["equiv_unbiased"] > 0:
            se = p * math.hypot(f["equiv_se"] / f["equiv_unbiased"], f["total_se"] / f["total"])
        method = "one seed: SE from the decomposition's total_se and equiv_se"
    row = _row("p", p, se=se, lo=pv.min(initial=math.inf), hi=pv.max(initial=-math.inf),
               n=int(pv.size), unit="fraction", method=method,
               note=f"pct of {base} ({fld}) at its final evaluation")  # fmt: skip
    return {"value": p, "se": se, "row": row}


def lr_window(step, train_config: dict | None, lr_tol: float) -> np.ndarray:
    """Evaluations inside the run's constant-learning-rate segment: after the warm-up (the
    evaluation at step s follows training steps 0..s-1, so s > warmup_steps) and while the
    learning rate of the last step before it is within ``lr_tol`` of its peak (cosine: the first
    part of the decay; constant schedule: the whole run after the warm-up). No train_config:
    a constant learning rate without warm-up.

    Args:
        step: evaluation steps, shape (n,).
        train_config: run.json ``train_config`` (lr, warmup_steps, schedule, lr_floor, steps).
        lr_tol: allowed relative fall of the learning rate below its peak (0.1: >= 0.9 x peak).

    Returns:
        Boolean mask, shape (n,).
    """
    s = np.asarray(step, float)
    tc = train_config or {}
    if not tc:
        return s > 0
    from equipipe.train import TrainConfig, lr_at

    known = set(TrainConfig.__dataclass_fields__)
    cfg = TrainConfig(**{k: v for k, v in tc.items() if k in known})
    lr = np.array([lr_at(max(int(x) - 1, 0), cfg) for x in s])
    return (s > cfg.warmup_steps) & (lr >= (1 - lr_tol) * cfg.lr)


def _window(step, train_config, o: dict, last: float | None = None) -> np.ndarray:
    """The α fit window of option ``alpha_window``: ``constant_lr`` (default; the schedule's
    near-constant segment, then steps >= fit_from x its end) or ``tail`` (steps >= fit_from x
    the run's last step — on a cosine run this takes in the decay, which steepens the curve)."""
    s = np.asarray(step, float)
    keep = s > 0
    if o["alpha_window"] == "constant_lr":
        keep &= lr_window(s, train_config, o["lr_tol"])
    end = s[keep].max(initial=0.0) if last is None else last
    return keep & (s >= o["fit_from"] * end)


def _window_text(o: dict, steps: np.ndarray) -> str:
    span = f"steps {steps.min():.0f}-{steps.max():.0f}" if steps.size else "no steps"
    if o["alpha_window"] == "constant_lr":
        return (f"constant-learning-rate segment ({span}: after the warm-up, lr >= "
                f"{1 - o['lr_tol']:g} x peak; the cosine decay excluded)")  # fmt: skip
    return f"last part of the run ({span}: steps >= {o['fit_from']:g} x last; includes the decay)"


def _alpha_fit(cv: Curve, tc: dict | None, o: dict, n_boot: int, seed: int) -> dict:
    """Power law on the fit window (:func:`_window`) of the seed-mean curve."""
    keep = _window(cv.step, tc, o)
    fit = power_law_fit(cv.compute_h[keep], cv.value[keep], n_boot, seed)
    fit["range"] = (cv.compute_h[keep].min(), cv.compute_h[keep].max()) if keep.any() else None
    fit["window"] = _window_text(o, cv.step[keep])
    per_seed = []
    for step, compute, value in cv.per_seed.values():
        k = _window(step, tc, o, cv.step[keep].max(initial=0.0) if keep.any() else None)
        per_seed.append(power_law_fit(compute[k], value[k], 0)["alpha"])
    fit["per_seed"] = per_seed
    return fit


def _c_star_rows(c: dict, p: dict, fit: dict, n_boot: int, seed: int) -> list:
    """c* with a 16-84 % interval and P(c < c*) from draws of α (bootstrap), p and c (normal)."""
    c_star = critical_cost_ratio(p["value"], fit["alpha"])
    rng = np.random.default_rng(seed + 1)
    a = fit["boot"] if fit["boot"].size else np.full(max(n_boot, 1), fit["alpha"])
    p_draws = p["value"] + np.nan_to_num(p["se"]) * rng.standard_normal(a.size)
    p_draws = np.clip(p_draws, 0.0, 1 - 1e-12)
    c_draws = c["value"] + np.nan_to_num(c["se"]) * rng.standard_normal(a.size)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        cs = np.where(a > 0, (1 - p_draws) ** (-1 / np.where(a > 0, a, 1.0)), np.nan)
    ok = np.isfinite(cs)
    lo, hi = np.percentile(cs[ok], Z1) if ok.any() else (None, None)
    wins = float(np.mean(c_draws[ok] < cs[ok])) if ok.any() else None
    given = "assuming " + "; ".join(ASSUMPTIONS)
    return [
        _row("c_star", c_star, lo=lo, hi=hi, n=int(ok.sum()), unit="ratio",
             method="(1 - p)^(-1/α); lo/hi 16-84 % over bootstrap α and normal p draws",
             note="equivariant wins per device-hour iff c < c*, " + given),
        _row("equivariant_wins_probability", wins, n=int(ok.sum()), unit="fraction",
             method="share of draws (c, α, p) with c < c*", note=given),
        _row("predicted_compute_ratio", c["value"] / c_star if np.isfinite(c_star) else None,
             unit="ratio", method="c / c*", note="compute the equivariant model needs for the "
             "baseline's final loss, relative to the baseline's, " + given),
    ]  # fmt: skip


def _assumption_rows(curves: dict[str, Curve], metric: str, mean_name: str, device_unit: str,
                     clock: str) -> list:  # fmt: skip
    """Check of assumption (a), and the compute ratio measured directly. A target never reached
    within the run gives a lower bound (``lo``) from the run's length instead of a value."""
    cb, ce, cm = curves["baseline"], curves["equivariant"], curves["baseline_mean"]
    never = "; never reached in this run (lo = lower bound)"
    reach = first_reach(ce.step, ce.value, cm.value[-1]) if cm.value.size else math.nan
    common = np.intersect1d(ce.step, cm.step)
    s_last = common.max() if common.size else math.nan
    ratio = ce.value[ce.step == s_last][0] / cm.value[cm.step == s_last][0] if common.size else None
    reach_c = first_reach(ce.compute_h, ce.value, cb.value[-1])
    return [
        _row("a_step_ratio", reach / cb.step[-1], unit="ratio",
             lo=None if np.isfinite(reach) else ce.step[-1] / cb.step[-1],
             method=f"first step where the equivariant {metric} <= the baseline's final "
             f"{mean_name} (log-log interpolation) / the baseline's last step",
             note="assumption (a) holds at <= 1" + ("" if np.isfinite(reach) else never)),
        _row("a_loss_ratio", ratio, unit="ratio",
             method=f"equivariant {metric} / baseline {mean_name} at their last common step "
             f"({s_last:.0f})", note="assumption (a) holds at <= 1"),
        _row("measured_compute_ratio", reach_c / cb.compute_h[-1], unit="ratio",
             lo=None if np.isfinite(reach_c) else ce.compute_h[-1] / cb.compute_h[-1],
             method=f"equivariant {device_unit} to reach the baseline's final {metric} / the "
             f"baseline's {device_unit} ({clock} clock)",
             note="< 1: the equivariant model won per device-hour in these runs"
             + ("" if np.isfinite(reach_c) else never)),
    ]  # fmt: skip


def analyse(metrics: pl.DataFrame, runs: dict[str, dict], spec: dict) -> Efficiency:
    """Compute the curves and every number of the efficiency gap (see the module docstring)."""
    o = _options(spec)
    names = {"baseline": o["baseline"], "equivariant": o["equivariant"]}
    present = set(metrics.get_column("experiment").unique().to_list()) if metrics.height else set()
    for exp in names.values():
        if exp not in present:
            raise ValueError(
                f"efficiency gap: experiment {exp!r} has no rows in the metrics; present: "
                f"{sorted(present)}"
            )
    infos = {k: _runs_of(runs, exp) for k, exp in names.items()}
    base = names["baseline"]
    fld = o["field"] or next(iter(infos["baseline"].values())).get("primary_field")
    metric, clock, n_boot, seed = o["metric"], o["clock"], int(o["n_boot"]), int(o["boot_seed"])

    def sel(exp, name):
        return _rows(metrics, exp, name, o["split"], fld)

    loss = {k: sel(exp, metric) for k, exp in names.items()}
    for k, df in loss.items():
        if df.height == 0:
            raise ValueError(
                f"efficiency gap: no {metric!r} rows on split {o['split']!r} for {names[k]!r}"
            )
    units = [u for u in loss["baseline"].get_column("unit").unique().to_list() if u]
    unit = units[0] if units else None
    mean_name = "mean_unbiased" if sel(base, "mean_unbiased").height else "mean"
    curves = {k: _curve(loss[k], infos[k], clock) for k in names}
    curves["baseline_mean"] = _curve(sel(base, mean_name), infos["baseline"], clock)
    devices = {str(i.get("device")) for v in infos.values() for i in v.values()}
    device_unit = "GPU-hours" if any("cuda" in d for d in devices) else "device-hours"

    rows, c = _cost_rows(names, infos)
    p = _final_pct(sel, base, fld)
    rows.append(p["row"])
    tcs = {k: next(iter(infos[k].values())).get("train_config") for k in names}
    fits = {k: _alpha_fit(curves[k], tcs[k], o, n_boot, seed) for k in names}
    if o["alpha_window"] == "constant_lr":  # the biased fit, for comparison
        fits["tail"] = _alpha_fit(curves["baseline"], tcs["baseline"],
                                  {**o, "alpha_window": "tail"}, n_boot, seed)  # fmt: skip
    for k, name in (("baseline", "alpha"), ("equivariant", "alpha_equivariant"),
                    ("tail", "alpha_tail")):  # fmt: skip
        if k not in fits:
            continue
        f = fits[k]
        spread = f["per_seed"]
        note = names.get(k, base) + (
            f"; per-seed α {min(spread):.3g}..{max(spread):.3g}" if len(spread) > 1 else ""
        )
        if k == "tail":
            note += "; not used for c*: the cosine decay inside the window steepens the curve"
        rows.append(_row(name, f["alpha"], se=f["se"], lo=f["lo"], hi=f["hi"], n=f["n"],
                         method=f"log-log least squares of {metric} vs compute ({clock} clock) "
                         f"on the {f['window']}; SE from residuals, lo/hi 16-84 % "
                         f"pairs bootstrap ({n_boot})", note=note))  # fmt: skip
    rows += _c_star_rows(c, p, fits["baseline"], n_boot, seed)
    sweep = None
    if o["sweep"]:
        models = {k: next(iter(infos[k].values())).get("model") for k in names}
        sweep = _sweep(o, models, {k: next(iter(infos[k].values())) for k in names})
        rows += _sweep_rows(sweep, c, fits["baseline"], models)
    rows += _assumption_rows(curves, metric, mean_name, device_unit, clock)
    for name, key in (("final_loss_baseline", "baseline"),
                      ("final_twirled_loss_baseline", "baseline_mean"),
                      ("final_loss_equivariant", "equivariant")):  # fmt: skip
        cv = curves[key]
        if cv.step.size == 0:
            continue
        what = mean_name if key == "baseline_mean" else metric
        rows.append(_row(name, cv.value[-1], lo=cv.lo[-1], hi=cv.hi[-1], n=len(cv.per_seed),
                         unit=unit or "", note=names[key.split("_")[0]],
                         method=f"{what} at step {cv.step[-1]:.0f}, mean (min/max) over seeds"))  # fmt: skip
    numbers = {r["quantity"]: r for r in rows}
    table = pl.DataFrame(rows, schema=TABLE_SCHEMA)
    return Efficiency(o, fld, unit, device_unit, curves, fits, numbers, table, sweep)


def efficiency_table(metrics: pl.DataFrame, runs: dict[str, dict], spec: dict) -> pl.DataFrame:
    """One row per quantity: ``quantity, value, se, lo, hi, n, unit, method, note``.

    Quantities: sec_per_step_{baseline,equivariant}, params_*, c, p, alpha, alpha_equivariant,
    c_star, equivariant_wins_probability, predicted_compute_ratio, a_step_ratio,
    a_loss_ratio, measured_compute_ratio, final_loss_baseline, final_twirled_loss_baseline,
    final_loss_equivariant. Both assumptions are written in the notes of the c* rows.
    """
    return analyse(metrics, runs, spec).table


def write_efficiency_table(run_dirs, out: Path, spec: dict) -> pl.DataFrame:
    """Read finished run directories, write :func:`efficiency_table` to ``out`` (.parquet; a .csv
    beside it for the report) and return it."""
    from equipipe.collect import load_runs
    from equipipe.metrics import read_metrics

    dirs = [Path(d) for d in run_dirs]
    runs = load_runs(dirs)
    metrics = pl.concat(
        [read_metrics(d, info) for d, info in zip(dirs, runs.values())], how="diagonal_relaxed"
    )
    table = efficiency_table(metrics, runs, spec)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.write_parquet(out)
    table.write_csv(out.with_suffix(".csv"))
    return table
