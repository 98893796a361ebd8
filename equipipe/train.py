"""One training loop for every task, with equivariance evaluation during training.

Size (~620 lines): the Trainer (data, evaluation and its logging, checkpoint and resume, DDP);
the training step itself is :mod:`equipipe.train_step`.

The run writes its declared outputs (metrics.parquet, run.json, model.pt, early.pt) only at
the end. The checkpoint ``work/ckpt.pt`` (model, optimiser, EMA, the metric rows logged so far
and every random state, written as one atomic unit by :mod:`equipipe.checkpoint`) lives in the
UNDECLARED ``work/`` folder of the run directory, because Snakemake deletes declared outputs of
failed jobs: a rerun after SIGKILL, SIGTERM or a crash at any instant finds ``work/`` and
continues where the last checkpoint left off, with the same data order, dropout draws and
evaluation rotations, so its metric table and weights equal an uninterrupted run's bit for bit
(wall-clock columns aside).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import platform
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from itertools import takewhile
from pathlib import Path
from typing import Any, cast

import polars as pl
import torch
from torch import nn

from equipipe import __version__
from equipipe import distributed as ddp
from equipipe.checkpoint import atomic_save, rng_state, set_rng_state
from equipipe.equivariance import Decomposition, evaluate_view, head_deviation, no_grad
from equipipe.loader import RunData
from equipipe.metrics import METRICS_SCHEMA as METRIC_SCHEMA
from equipipe.metrics import METRICS_SCHEMA_VERSION
from equipipe.models import interface
from equipipe.models.registry import param_count
from equipipe.progress import TensorBoardSink, progress_line
from equipipe.spectrum_probe import SpectrumProbe, probe_layers, spectrum_due
from equipipe.tasks import make_task
from equipipe.tasks.base import Batch, Task, to_device
from equipipe.timing import EVAL_PARTS, Timer
from equipipe.train_step import (
    EMA,
    NonFiniteLoss,
    TrainConfig,
    check_keys,
    lr_at,
    make_optimizer,
    train_step,
)

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Evaluation settings (the ``eval`` block)."""

    every: int = 100
    early: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000])
    k: int = 10
    examples: int = 64
    batch_size: int = 16
    split: str = "val"
    grad_norm_batches: int = 1
    device_strategy: str = "auto"
    seed: int = 12345
    spectrum_every: int = 0  # per-irrep spectrum at every n-th evaluation (0: off)
    spectrum_lmax: int = 4
    spectrum_layers: list[str] | None = None  # None: the model's spectrum_layers

    def __post_init__(self) -> None:
        if self.spectrum_every > 0 and self.k < 3:
            raise ValueError(f"eval.spectrum_every needs eval.k >= 3 rotations, got k={self.k}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalConfig:
        check_keys(cls, d, "eval")
        return cls(**d)


def eval_steps(total: int, every: int, early: list[int]) -> list[int]:
    """Step 0, the log-spaced early steps below ``every``, then every ``every``, and the end."""
    steps = {0, total} | {s for s in early if s < min(every, total)}
    steps |= set(range(every, total + 1, every))
    return sorted(steps)


def choose_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Stop(Exception):
    """Raised inside the loop when SIGTERM/SIGUSR1 asked the run to checkpoint and stop."""


class Trainer:
    def __init__(
        self,
        spec: dict[str, Any],
        store_dir: Path,
        split_file: Path,
        subset_file: Path,
        out_dir: Path,
    ):
        t_init = time.perf_counter()
        self.spec = spec
        self.timer = Timer()  # seconds outside training steps, by part (run.json)
        self.paths = {"store": str(store_dir), "split": str(split_file), "subset": str(subset_file)}
        self.out = Path(out_dir)
        self.work = self.out / "work"
        self.tcfg = TrainConfig.from_dict(spec.get("train", {}))
        self.ecfg = EvalConfig.from_dict(spec.get("eval", {}))
        self.seed = int(spec.get("seed", 0))
        torch.set_num_threads(self.tcfg.threads)
        torch.manual_seed(self.seed)
        # DDP under torchrun (jobs with gpu > 1): batch_size is the GLOBAL batch; each rank
        # takes a contiguous shard of it, and only rank 0 evaluates and writes.
        self.rank, self.world, local_rank = ddp.init_from_env()
        self.device = (
            ddp.device_for(local_rank) if self.world > 1 else choose_device(self.tcfg.device)
        )
        self.task: Task = make_task(spec["task"], spec.get("task_cfg", {}))
        self.data = RunData.open(
            store_dir, split_file, subset_file, self.tcfg.batch_size, self.seed,
            self.ecfg.split, self.ecfg.examples, self.tcfg.sample_per_cluster,
        )  # fmt: skip
        self.task_state = self.task.fit(self.data.train_sample(20000))
        self.model = self.task.build_model(spec["size"]).to(self.device)
        self.params = param_count(self.model)
        self.opt = make_optimizer(self.model.parameters(), self.tcfg)
        self.ema = EMA(self.model, self.tcfg.ema, self.tcfg.ema_warmup) if self.tcfg.ema else None
        self.val = [
            to_device(b, self.device)
            for b in self.data.val_batches(self.task, self.ecfg.batch_size)
        ]
        self.rows: list[dict[str, Any]] = []
        # (split, t, field) -> the step-0 resampling floor per element (log_interpolation_floor)
        self.floors: dict[tuple[str, float | None, str], float] = {}
        self.step = 0
        self.train_seconds = 0.0
        self.wall0 = time.perf_counter()
        self.wall_offset = 0.0
        self._stop_signal: int | None = None
        self._tensorboard: TensorBoardSink | None = None
        wrapped = ddp.wrap(self.model)
        # torch.compile returns an OptimizedModule (an nn.Module) typed as a plain callable
        self.forward_model: nn.Module = (
            cast(nn.Module, torch.compile(wrapped)) if self.tcfg.compile else wrapped
        )
        self.timer.add("setup", time.perf_counter() - t_init)  # data, normalisation, model

    # --- checkpointing --------------------------------------------------------------

    def spec_hash(self) -> str:
        """Hash of the spec, less ``train.tensorboard`` (watching a run changes no number)."""
        train = {k: v for k, v in self.spec.get("train", {}).items() if k != "tensorboard"}
        spec = {**self.spec, "train": train} if "train" in self.spec else self.spec
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def save_checkpoint(self) -> None:
        """Model, optimiser, EMA, metric rows and random states as ONE atomically replaced file.

        The rows logged so far travel inside the checkpoint, so a resume continues with exactly
        the rows of the checkpoint's step: a kill at any instant neither duplicates rows nor
        leaves a half-written table (see :mod:`equipipe.checkpoint`).
        """
        if not ddp.is_main():
            return
        with self.timer("io"):
            self._save_checkpoint()

    def _save_checkpoint(self) -> None:
        state = {
            "spec_hash": self.spec_hash(),
            "step": self.step,
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "ema": self.ema.model.state_dict() if self.ema else None,
            "ema_updates": self.ema.updates if self.ema else 0,
            "train_seconds": self.train_seconds,
            "wall": self.wall_offset + time.perf_counter() - self.wall0,
            "timing": self.timer.seconds,
            "rng": rng_state(self.device),
            "metrics": pl.DataFrame(self.rows, schema=METRIC_SCHEMA).to_dict(as_series=False),
        }
        atomic_save(state, self.work / "ckpt.pt", self.step)

    def try_resume(self) -> bool:
        ckpt = self.work / "ckpt.pt"
        if not ckpt.exists():
            return False
        state = torch.load(ckpt, map_location=self.device, weights_only=True)
        if state["spec_hash"] != self.spec_hash() or "metrics" not in state:
            log.warning(
                "%s belongs to another configuration (or an older equipipe); starting afresh", ckpt
            )
            shutil.rmtree(self.work)
            return False
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        if self.ema and state["ema"] is not None:
            self.ema.model.load_state_dict(state["ema"])
            self.ema.updates = state["ema_updates"]
        self.step = int(state["step"])
        self.train_seconds = float(state["train_seconds"])
        self.wall_offset = float(state["wall"])
        for name, v in (state.get("timing") or {}).items():  # earlier processes' seconds
            self.timer.add(name, float(v))
        self.rows = pl.DataFrame(state["metrics"], schema=METRIC_SCHEMA).to_dicts()
        self.floors = {
            (r["split"], r["t"], r["field"]): r["value"]
            for r in self.rows
            if r["metric"] == "floor_equiv"
        }
        set_rng_state(state["rng"], self.device)
        log.info("resumed from step %d (%s)", self.step, ckpt)
        return True

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self._stop_signal = signum

    # --- evaluation -----------------------------------------------------------------

    def _row(self, split: str, metric: str, value: float, field: str | None = None,
             t: float | None = None, n: int | None = None, unit: str | None = None,
             ell: str | None = None, layer: str | None = None) -> None:  # fmt: skip
        self.rows.append({
            "step": self.step, "epoch": self.step / self.data.steps_per_epoch,
            "wall_s": self.wall_offset + time.perf_counter() - self.wall0, "split": split,
            "metric": metric, "field": field, "t": t, "value": float(value), "n_elements": n,
            "unit": unit, "ell": ell, "layer": layer,
        })  # fmt: skip

    def _log_decomposition(self, split: str, f: str, t: float | None, d: Decomposition) -> None:
        unit = self.task.units.get(f)
        for name, v in d.per_element().items():
            self._row(split, name, v, f, t, d.n_elements, unit)
        self._row(split, "k", d.k, f, t, d.n_elements)
        self._row(split, "pct", d.pct, f, t, d.n_elements, "fraction")
        self._row(split, "total_se", d.standard_error("total"), f, t, d.n_elements, unit)
        self._row(split, "equiv_se", d.standard_error("equiv_unbiased"), f, t, d.n_elements, unit)
        self._row(split, "pct_se", d.standard_error("pct"), f, t, d.n_elements, "fraction")

    @staticmethod
    def _split_and_t(labels: dict, base: str = "val") -> tuple[str, float | None]:
        split = base + (f"_{labels['mode']}" if "mode" in labels else "")
        t = labels.get("t")
        return split, (float(t) if t is not None else None)

    def evaluate(self) -> None:
        """One evaluation of the live weights on the fixed held-out batches (timed by part)."""
        t0 = time.perf_counter()
        self._evaluate()
        self.timer.add("eval", time.perf_counter() - t0)
        self.timer.add("evaluations", 1)

    def _evaluate(self) -> None:
        model = self.model
        timer = self.timer
        was_training = model.training
        model.eval()
        gen = torch.Generator().manual_seed(self.ecfg.seed)
        spec = self._spectrum_probe()
        decs: dict[tuple[str, float | None, str], Decomposition] = {}
        acc: dict[tuple[str, float | None, str], list[tuple[float, int, str]]] = {}
        ema_acc: dict[tuple[str, float | None, str], list[tuple[float, int, str]]] = {}
        grad_rows: dict[tuple[str, float | None, str], list[float]] = {}
        for bi, batch in enumerate(self.val):
            # the unrotated prediction is the same in every view of a (batch, t) (e.g. the voxel
            # task's octahedral and Haar modes): compute its accuracy once, log it per split
            seen: dict[float | None, dict[str, tuple[float, str]]] = {}
            for labels, view in self.task.eval_views(batch, gen):
                split, t = self._split_and_t(labels)
                rotations = self.task.rotation_set(labels)
                grads = bi < self.ecfg.grad_norm_batches and rotations is None
                # the plain forward rides along unless hooks are recording hidden layers
                plain = t not in seen and not (spec and spec.layers)
                with (
                    timer("eval_decomposition"),
                    spec.recording(model) if spec else contextlib.nullcontext(),
                ):
                    record = spec.record if spec else None  # z and R, for the spectrum
                    res = evaluate_view(model, self.task, view, self.ecfg.k, gen,
                                        self.ecfg.device_strategy, rotations, record,
                                        gradients=grads, plain=plain)  # fmt: skip
                if spec:
                    with timer("eval_spectrum"):
                        spec.observe(split, t, view, rotations is not None)
                for f, d in res.decompositions.items():
                    key = (split, t, f)
                    decs[key] = decs[key] + d if key in decs else d
                B = self.task.num_examples(view)
                if t not in seen:
                    with timer("eval_accuracy"), no_grad(model):
                        pred = res.prediction or self.task.predict(model, view)
                        seen[t] = self.task.accuracy(pred, view)
                        if self.ema:
                            ema_pred = self.task.predict(self.ema.model, view)
                            for name, (v, unit) in self.task.accuracy(ema_pred, view).items():
                                ema_acc.setdefault(("val_ema", t, name), []).append((v, B, unit))
                for name, (v, unit) in seen[t].items():
                    acc.setdefault((split, t, name), []).append((v, B, unit))
                if grads:
                    with timer("eval_gradient_norms"):
                        norms = res.gradient_norms()
                    for name, v in norms.items():
                        grad_rows.setdefault((split, t, name), []).append(v)
        with timer("eval_spectrum"):
            spec_rows = spec.rows(self.task.units) if spec else []
        if self.step == 0:
            with timer("eval_floor"):
                self.log_interpolation_floor()
        t_log = time.perf_counter()
        for (split, t, f), d in decs.items():
            self._log_decomposition(split, f, t, d)
            floor = self.floors.get((split, t, f))
            if floor is not None:  # the resampling floor as a share of this model's own total
                total = d.per_element()["total"]
                share = floor / total if total > 0 else math.nan
                self._row(split, "floor_share", share, f, t, d.n_elements, "fraction")
        for row in spec_rows:
            self._row(**row)
        for table in (acc, ema_acc):
            for (split, t, name), vals in table.items():
                n = sum(b for _, b, _ in vals)
                self._row(split, name, sum(v * b for v, b, _ in vals) / n, None, t, n, vals[0][2])
        for (split, t, name), ratios in grad_rows.items():
            self._row(split, name, sum(ratios) / len(ratios), self.task.primary_field, t)
        head = interface.direct_force_head(model)
        if head is not None:
            self._row("val", "head_deviation", head_deviation(head.weight))
        timer.add("eval_logging", time.perf_counter() - t_log)
        model.train(was_training)

    def _spectrum_probe(self) -> SpectrumProbe | None:
        """A probe when this evaluation's step is due for the per-irrep spectrum (else None)."""
        e = self.ecfg
        if not spectrum_due(
            self.step, eval_steps(self.tcfg.steps, e.every, e.early), e.spectrum_every
        ):
            return None
        return SpectrumProbe(
            self.task, e.spectrum_lmax, probe_layers(self.model, e.spectrum_layers)
        )

    def log_interpolation_floor(self) -> None:
        """Resampling floor of continuous-rotation grid evaluation, measured once (model-free).

        An isotropic blur is exactly equivariant in the continuum, so the equivariance error the
        same Haar evaluation reports for it is resampling error. Logged in absolute units
        (``floor_equiv``, per voxel, like the model's ``equiv_unbiased``) and kept in
        ``self.floors``, from which every evaluation logs ``floor_share`` = floor_equiv / the
        model's own total (the same denominator as the model's pct).
        """
        gen = torch.Generator().manual_seed(self.ecfg.seed)
        floors: dict[tuple[str, float | None, str], Decomposition] = {}
        for batch in self.val:
            for labels, view in self.task.eval_views(batch, gen):
                if self.task.rotation_set(labels) is not None:
                    continue  # exhaustive over a finite group: nothing resampled
                split, t = self._split_and_t(labels)
                for f, d in self.task.interpolation_floor(view, gen, self.ecfg.k).items():
                    key = (split, t, f)
                    floors[key] = floors[key] + d if key in floors else d
        for (split, t, f), d in floors.items():
            per_element, unit = d.per_element(), self.task.units.get(f)
            self.floors[(split, t, f)] = per_element["equiv_unbiased"]
            for metric, term in (("floor_equiv", "equiv_unbiased"), ("floor_total", "total")):
                self._row(split, metric, per_element[term], f, t, d.n_elements, unit)

    # --- training -------------------------------------------------------------------

    def train_step(self) -> float:
        """One optimiser step (:func:`equipipe.train_step.train_step`) on this step's batches."""
        cfg = self.tcfg

        def micro_batch(micro: int) -> tuple[Batch, float]:
            examples = self.data.train_examples(self.step * cfg.accumulate + micro)
            local = ddp.shard(examples, self.rank, self.world)
            weight = ddp.local_weight(len(local), len(examples), self.world)
            if len(local) == 0:  # batch smaller than the world: join the all-reduce at weight 0
                local, weight = examples[:1], 0.0
            return to_device(self.task.collate(list(local)), self.device), weight

        try:
            return train_step(self.model, self.task, self.opt, self.ema, cfg, self.step,
                              self.seed, micro_batch, forward_model=self.forward_model,
                              rank=self.rank)  # fmt: skip
        except NonFiniteLoss:
            self.save_checkpoint()
            raise FloatingPointError(
                f"non-finite training loss at step {self.step}; checkpoint saved in "
                f"{self.work}. Lower the learning rate or enable grad_clip, then rerun."
            ) from None

    def run(self) -> None:
        self.try_resume()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        cfg = self.tcfg
        evals = set(eval_steps(cfg.steps, self.ecfg.every, self.ecfg.early))
        early_path = self.work / "early.pt"
        try:
            self._start_watching()
            if self.step == 0 and not self.rows and ddp.is_main():
                self.evaluate()
                self._report_evaluation()
            ddp.barrier()
            while self.step < cfg.steps:
                agreed = ddp.agree_max(self._stop_signal or 0)  # all ranks stop at the same step
                if agreed:
                    self._stop_signal = agreed
                    raise Stop
                t0 = time.perf_counter()
                self.model.train()
                loss = self.train_step()
                self.train_seconds += time.perf_counter() - t0
                self.step += 1
                if self.step % 10 == 0 or self.step in evals:
                    self._row("train", "train_loss", loss)
                    self._row("train", "lr", lr_at(self.step - 1, cfg))
                if self.step == cfg.analysis_step and ddp.is_main():
                    with self.timer("io"):
                        atomic_save(self.model.state_dict(), early_path)
                if self.step in cfg.keep_steps and ddp.is_main():  # to checkpoints/ at the end
                    with self.timer("io"):
                        atomic_save(
                            self.model.state_dict(), self.work / f"checkpoints/step{self.step}.pt"
                        )
                if self.step in evals:
                    if ddp.is_main():
                        self.evaluate()
                        self._report_evaluation()
                    ddp.barrier()
                self._write_tensorboard()
                if self.step % cfg.checkpoint_every == 0 or self.step in evals:
                    self.save_checkpoint()
        except Stop:
            self.save_checkpoint()
            log.warning("signal %s: checkpoint at step %d in %s; rerun (snakemake "
                        "--rerun-incomplete) to continue", self._stop_signal, self.step, self.work)  # fmt: skip
            raise SystemExit(128 + int(self._stop_signal or 0)) from None
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if self._tensorboard is not None:
                self._tensorboard.close()
        self.finish(early_path)

    # --- watching the run: one log line per evaluation, TensorBoard --------------------

    def _start_watching(self) -> None:
        """The clock of the steps/s and ETA, and TensorBoard's writer when it is on."""
        self._watch_t0, self._watch_step0 = time.perf_counter(), self.step
        self._rows_written = len(self.rows)  # rows of earlier processes are in their files
        if self.tcfg.tensorboard and ddp.is_main():
            self._tensorboard = TensorBoardSink(self.out, purge_step=self.step)

    def _report_evaluation(self) -> None:
        """One INFO line for this evaluation (``equipipe.progress.progress_line``)."""
        done = self.step - self._watch_step0
        elapsed = time.perf_counter() - self._watch_t0
        rate = done / elapsed if done > 0 and elapsed > 0 else None
        rows = list(takewhile(lambda r: r["step"] == self.step, reversed(self.rows)))[::-1]
        log.info(progress_line(self.step, self.tcfg.steps, rows, self.task.primary_field, rate))
        self._write_tensorboard()

    def _write_tensorboard(self) -> None:
        """The metric rows logged since the last call, as TensorBoard scalars (when on)."""
        if self._tensorboard is None or len(self.rows) == self._rows_written:
            return
        with self.timer("io"):
            self._tensorboard.write(self.rows[self._rows_written :])
        self._rows_written = len(self.rows)

    def finish(self, early_path: Path) -> None:
        if not ddp.is_main():
            return
        t0 = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        if not early_path.exists():
            torch.save(self.model.state_dict(), early_path)
        metrics = pl.DataFrame(self.rows, schema=METRIC_SCHEMA)
        metrics.write_parquet(self.out / "metrics.parquet")
        torch.save(self.model.state_dict(), self.out / "model.pt")
        shutil.copyfile(early_path, self.out / "early.pt")
        if self.ema:
            torch.save(self.ema.model.state_dict(), self.out / "model_ema.pt")
        kept = sorted(s for s in set(self.tcfg.keep_steps) if s <= self.tcfg.steps)
        shutil.rmtree(self.out / "checkpoints", ignore_errors=True)
        (self.out / "checkpoints").mkdir()
        for s in kept:
            shutil.copyfile(
                self.work / f"checkpoints/step{s}.pt", self.out / f"checkpoints/step{s}.pt"
            )
        self.timer.add("io", time.perf_counter() - t0)  # run.json's own write is not counted
        info = run_info(self)
        info["checkpoints"] = {f"checkpoints/step{s}.pt": s for s in kept}
        (self.out / "run.json").write_text(json.dumps(info, indent=1, default=str))
        shutil.rmtree(self.work, ignore_errors=True)


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def timing_info(tr: Trainer) -> dict[str, Any]:
    """Where the job's wall time went, next to ``train_seconds`` (seconds; resumes summed).

    ``eval_seconds``: the evaluations' total and its parts (``equipipe.timing.EVAL_PARTS``);
    ``io_seconds``: checkpoints, early.pt and the final outputs; ``setup_seconds``: opening the
    data, fitting the normalisation, building the model; ``startup_seconds``: interpreter start
    and imports (when the CLI measured them); ``wall_seconds``: the loop from the Trainer's
    set-up to now; ``outside_train_fraction``: 1 - train_seconds / (wall + startup).
    """
    t = tr.timer
    wall = tr.wall_offset + time.perf_counter() - tr.wall0 + t.get("setup")
    job = wall + t.get("startup")
    parts = {p: t.get(f"eval_{p}") for p in EVAL_PARTS}
    return {
        "eval_seconds": {"total": t.get("eval"), **parts},
        "evaluations": int(t.get("evaluations")),
        "io_seconds": t.get("io"),
        "setup_seconds": t.get("setup"),
        "startup_seconds": t.get("startup"),
        "wall_seconds": job,
        "outside_train_fraction": 1.0 - tr.train_seconds / job if job > 0 else None,
    }


def run_info(tr: Trainer) -> dict[str, Any]:
    import numpy

    versions = {
        "equipipe": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
    }
    for mod in ("e3nn", "polars", "rdkit", "snakemake"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages
            pass
    spec = tr.spec
    return {
        "experiment": spec.get("experiment"),
        "seed": tr.seed,
        "task": spec["task"],
        "model": spec.get("model"),
        "size": spec["size"],
        "study_ref": spec.get("study_ref"),
        "primary_field": tr.task.primary_field,
        "fields": list(tr.task.fields),
        "units": tr.task.units,
        "n_train": tr.data.n_train,
        "n_eval": int(len(tr.data.val_rows)),
        "batch_size": tr.tcfg.batch_size,  # global batch (all ranks together)
        "world_size": tr.world,
        "steps": tr.tcfg.steps,
        "steps_per_epoch": tr.data.steps_per_epoch,
        "params": tr.params,
        "sec_per_step": tr.train_seconds / max(tr.tcfg.steps, 1),
        "train_seconds": tr.train_seconds,
        **timing_info(tr),
        "device": str(tr.device)
        + (
            f" ({torch.cuda.get_device_name(tr.device)})"
            if tr.device.type == "cuda"
            else f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        ),
        "git_commit": _git_commit(),
        "metrics_schema_version": METRICS_SCHEMA_VERSION,
        "versions": versions,
        "task_state": tr.task_state,
        "spec": spec,
        "data": tr.paths,
        "train_config": asdict(tr.tcfg),
        "eval_config": asdict(tr.ecfg),
    }


def train(
    spec: dict[str, Any],
    store_dir: Path,
    split_file: Path,
    subset_file: Path,
    out_dir: Path,
    startup_seconds: float | None = None,
) -> None:
    """Train one run (resuming from ``out_dir/work`` when a checkpoint is there).

    ``startup_seconds``: what the process spent before (interpreter start, imports; the CLI
    passes ``equipipe.timing.process_seconds()``), recorded in run.json's ``timing``.
    """
    tr = Trainer(spec, Path(store_dir), Path(split_file), Path(subset_file), Path(out_dir))
    if startup_seconds is not None:
        tr.timer.add("startup", startup_seconds)
    tr.run()
