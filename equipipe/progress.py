"""Watching a training run: one log line per evaluation, and optional TensorBoard event files.

:func:`progress_line` turns the metric rows of one evaluation step into one readable line
(step, training loss, learning rate, pct of the primary field with its standard error per
evaluation split and flow time, steps per second, ETA), which the training loop logs at INFO::

    step 100/500 loss 0.1234 lr 2.0e-03 pct (forces) 12.3±0.56% 8.12 steps/s ETA 0:00:49

:class:`TensorBoardSink` writes the same metric rows as TensorBoard scalars into the run folder
(next to ``metrics.parquet``), so ``tensorboard --logdir results/runs`` shows live curves. It
imports TensorBoard only when created (``train.tensorboard: true`` or ``equipipe train
--tensorboard``); runs without it never import the package.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

Row = Mapping[str, Any]


def pct_standard_error(equiv: float, total: float, equiv_se: float, total_se: float) -> float:
    """Standard error of pct = equiv / total (a fraction) by the delta method, independent terms.

    ``sqrt((se_e / t)^2 + (e * se_t / t^2)^2)``; NaN when ``total`` is 0 or an SE is NaN.
    """
    if not total:
        return math.nan
    return math.sqrt((equiv_se / total) ** 2 + (equiv * total_se / total**2) ** 2)


def _label(split: str, t: float | None) -> str:
    """``val`` -> "", ``val_haar`` -> "haar", with `` t=0.8`` for a flow time."""
    mode = split.removeprefix("val").lstrip("_")
    parts = ([mode] if mode else []) + ([f"t={t:g}"] if t is not None else [])
    return " ".join(parts)


def pct_parts(rows: Iterable[Row], field: str) -> list[str]:
    """``"12.3±0.56%"`` (with a ``haar``/``t=0.8`` label when there are several) per view of
    ``field``'s decomposition rows of one step, in the order the views were logged."""
    by_view: dict[tuple[str, float | None], dict[str, float]] = {}
    for r in rows:
        if r["field"] == field and str(r["split"]).startswith("val") and r["split"] != "val_ema":
            by_view.setdefault((r["split"], r["t"]), {})[r["metric"]] = float(r["value"])
    parts = []
    for (split, t), m in by_view.items():
        if "pct" not in m:
            continue
        se = pct_standard_error(
            m.get("equiv_unbiased", math.nan),
            m.get("total", math.nan),
            m.get("equiv_se", math.nan),
            m.get("total_se", math.nan),
        )
        se_text = f"{100 * se:.2g}" if math.isfinite(se) else "n/a"  # n/a: one batch
        text = f"{100 * m['pct']:.3g}±{se_text}%"
        label = _label(split, t)
        parts.append(f"{label} {text}" if label and len(by_view) > 1 else text)
    return parts


def progress_line(
    step: int, total_steps: int, rows: Iterable[Row], field: str, steps_per_s: float | None
) -> str:
    """One line for the evaluation at ``step`` from that step's metric rows (see module doc).

    ``steps_per_s``: training steps per wall second (evaluations included) so far in this
    process; None before the first step (no rate, no ETA).
    """
    rows = list(rows)
    values = {r["metric"]: float(r["value"]) for r in rows if r["split"] == "train"}
    out = [f"step {step}/{total_steps}"]
    if "train_loss" in values:
        out.append(f"loss {values['train_loss']:.4g}")
    if "lr" in values:
        out.append(f"lr {values['lr']:.1e}")
    pcts = pct_parts(rows, field)
    if pcts:
        out.append(f"pct ({field}) " + " ".join(pcts))
    if steps_per_s and steps_per_s > 0:
        eta = datetime.timedelta(seconds=round((total_steps - step) / steps_per_s))
        out.append(f"{steps_per_s:.3g} steps/s ETA {eta}")
    return " ".join(out)


def scalar_tag(row: Row) -> str:
    """``split/metric[/field][/layer][/l=ell][/t=t]``, e.g. ``val/pct/forces``."""
    parts = [str(row["split"]), str(row["metric"])]
    for key, fmt in (("field", "{}"), ("layer", "{}"), ("ell", "l={}"), ("t", "t={:g}")):
        if row.get(key) is not None:
            parts.append(fmt.format(row[key]))
    return "/".join(parts)


class TensorBoardSink:
    """Metric rows as TensorBoard scalars in ``logdir`` (the run folder).

    ``purge_step``: the step this process starts from; TensorBoard drops events at or after it
    that an earlier (killed, resumed) process wrote, so a resumed run shows one curve.
    """

    def __init__(self, logdir: Path, purge_step: int, flush_secs: int = 30) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # TensorBoard is optional
            raise ImportError(
                "train.tensorboard (or equipipe train --tensorboard) needs the tensorboard "
                "package: pip install tensorboard==2.21.0"
            ) from e
        self.writer = SummaryWriter(str(logdir), purge_step=purge_step, flush_secs=flush_secs)

    def write(self, rows: Iterable[Row]) -> None:
        for r in rows:
            self.writer.add_scalar(scalar_tag(r), float(r["value"]), int(r["step"]))

    def close(self) -> None:
        self.writer.close()
