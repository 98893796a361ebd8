"""One GPU check for a lent machine: training throughput, FLOP/s and evaluation overhead.

Run it with ``bench/gpu_check.sh`` (sets PYTHONPATH to the source tree). The lent machine has
Python 3.12 and its own torch, no network, and none of polars, rdkit, snakemake, gemmi or
tblite (DESIGN.md), so this script imports only torch, numpy, e3nn (optional) and the
equipipe modules that need nothing else — and it makes those packages unimportable for
itself before the first equipipe import, so a CPU run here fails the same way the GPU run
would. ``--quick`` on the CPU is the smoke test (tests/test_gpu_check.py): tiny sizes, bf16
autocast on the CPU too (so dtype mismatches show up), torch.compile with the ``eager``
backend (dynamo's graph capture without code generation).

Rows, at the study's per-GPU batch sizes on synthetic batches (full mode):
- imports: the equipipe modules the GPU training needs import without the absent packages;
- bf16 matmul: the peak the FLOP/s are compared with (a large bf16 GEMM, same run);
- per model (EScAIP 6M: 64 molecules x 40 atoms, 20 neighbours; e3nn equivariant 6M on the
  same batch; Proteina 60M: 4 chains x 256 residues; VoxMol 111M: 16 grids of 64^3, 8 if 16
  do not fit): the training step ``equipipe.train`` runs, imported from
  ``equipipe.train_step`` (rotation augmentation, the task's augment, prepare_train, bf16
  autocast, loss, backward, grad clip, the optimiser step, the EMA update), with each model's
  recipe from config/paper.yaml (optimiser, clip, EMA, augment_prob), eager and with
  torch.compile: ms per step, steps/s, peak memory, FLOPs per step counted with
  FlopCounterMode over the timed steps, achieved TFLOP/s and the share of the measured peak;
- eval overhead: ``equivariance.decompose`` (forward-only, K rotations, the strategy "auto"
  picks: batched on CUDA) against K plain validation forwards on the same batch, K = 10
  (force field, flow matching) / 4 (voxels, Haar view); DESIGN.md asks <= 0.6 on a GPU.

Every check runs in try/except (its error goes into its row), under a per-check alarm and a
total budget (``--budget-s``), compiled rows last; the one table is printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.abc
import math
import os
import platform
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Not installed on the lent GPU machine (DESIGN.md), plus other heavy packages the GPU path
# must not need.
ABSENT = (
    "polars",
    "rdkit",
    "snakemake",
    "gemmi",
    "tblite",
    "h5py",
    "matplotlib",
    "MDAnalysis",
    "Bio",
)

MODULES = (
    "equipipe.so3",
    "equipipe.equivariance",
    "equipipe.voxel",
    "equipipe.distributed",
    "equipipe.gpulease",
    "equipipe.train_step",
    "equipipe.models.registry",
    "equipipe.models.escaip",
    "equipipe.models.proteina",
    "equipipe.models.voxmol",
    "equipipe.tasks.forcefield",
    "equipipe.tasks.flowmatching",
    "equipipe.tasks.denoising",
)


class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # noqa: ARG002
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(
                f"No module named {name!r} (absent on the GPU machine)", name=name
            )
        return None


# Sizes: the study's per-GPU batches (full) and tiny ones for a CPU smoke run (--quick).
FULL = {
    "escaip": dict(size="6M", molecules=64, atoms=40, k=10, eval_molecules=64),
    "equivariant": dict(size="6M", molecules=64, atoms=40),
    "proteina": dict(size="60M", chains=4, residues=256, k=10),
    "voxmol": dict(
        size="111M", grids=16, fallback_grids=8, grid=64, spacing=0.25, atoms=44, k=4, eval_grids=4
    ),
    "matmul": 8192,
    "warmup": 3,
    "steps": 10,
    "budget_s": 230.0,
    "check_cap_s": 100.0,
}
QUICK = {
    "escaip": dict(size="tiny", molecules=3, atoms=10, k=4, eval_molecules=2),
    "equivariant": dict(size="tiny", molecules=2, atoms=8),
    "proteina": dict(size="tiny", chains=2, residues=12, k=4),
    # 24^3, not 16^3: the tiny U-Net's middle level would be 2^3 voxels, where torch's CPU bf16
    # Conv3d weight gradient is at times non-finite (a torch kernel fault; 3^3 and up are fine)
    "voxmol": dict(
        size="tiny", grids=1, fallback_grids=1, grid=24, spacing=0.5, atoms=8, k=2, eval_grids=1
    ),
    "matmul": 256,
    "warmup": 1,
    "steps": 2,
    "budget_s": 100.0,
    "check_cap_s": 60.0,
}


@dataclass
class Row:
    check: str
    workload: str = ""
    batch: str = ""
    ms: float | None = None
    steps_s: float | None = None
    peak_gib: float | None = None
    gflop: float | None = None
    tflops: float | None = None
    pct_peak: float | None = None
    note: str = ""


@dataclass
class Ctx:
    torch: Any
    device: Any
    sizes: dict
    peak_tflops: float | None = None
    t0: float = field(default_factory=time.monotonic)
    budget_s: float = 230.0
    cap_s: float = 100.0
    rows: list[Row] = field(default_factory=list)
    compile_backend: str = "inductor"
    autocast: bool = False  # bf16 autocast: on CUDA as in training; on the CPU with --quick
    flops: dict = field(default_factory=dict)  # eager FLOPs per step, reused by compiled rows
    voxmol_grids: int | None = None  # set when 16 grids did not fit

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def remaining(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()


class CheckTimeout(Exception):
    pass


@contextlib.contextmanager
def alarm(seconds: float):
    def handler(signum, frame):  # noqa: ARG001
        raise CheckTimeout(f"timed out after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(max(1, int(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_check(ctx: Ctx, row: Row, fn: Callable[[Row], None], min_s: float = 5.0) -> None:
    """Run one check into ``row``: its error (or timeout, or the budget) goes into the note."""
    left = ctx.remaining()
    print(
        f"[gpu_check] {row.check} {row.workload} ({left:.0f} s left)", file=sys.stderr, flush=True
    )
    if left < min_s:
        row.note = f"skipped: time budget ({ctx.budget_s:.0f} s) spent"
        ctx.rows.append(row)
        return
    t = time.monotonic()
    try:
        with alarm(min(ctx.cap_s, left)):
            fn(row)
    except Exception as e:  # noqa: BLE001 - every failure becomes its row's note
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:160]
        row.note = (row.note + "; " if row.note else "") + "ERROR " + msg
        if not isinstance(e, CheckTimeout | ModuleNotFoundError):
            traceback.print_exc(file=sys.stderr)
    finally:
        free(ctx)
    print(
        f"[gpu_check]   done in {time.monotonic() - t:.1f} s: {row.note}",
        file=sys.stderr,
        flush=True,
    )
    ctx.rows.append(row)


def free(ctx: Ctx) -> None:
    gc.collect()
    if ctx.cuda:
        ctx.torch.cuda.empty_cache()
        ctx.torch.cuda.reset_peak_memory_stats()


# --- checks ---------------------------------------------------------------------------------


def check_imports(row: Row) -> None:
    bad = []
    for m in MODULES:
        try:
            importlib.import_module(m)
        except Exception as e:  # noqa: BLE001
            bad.append(f"{m} ({type(e).__name__}: {e})")
    try:
        import e3nn  # noqa: F401

        importlib.import_module("equipipe.models.equivariant")
        e3 = "e3nn ok"
    except ModuleNotFoundError as e:
        e3 = f"e3nn missing ({e.name})"
    except Exception as e:  # noqa: BLE001
        bad.append(f"equipipe.models.equivariant ({type(e).__name__}: {e})")
        e3 = "e3nn present"
    row.note = f"{len(MODULES) - len(bad)}/{len(MODULES)} modules ok, {e3}"
    if bad:
        raise ImportError("; ".join(bad))


def check_matmul(ctx: Ctx, row: Row) -> None:
    torch = ctx.torch
    n = ctx.sizes["matmul"]
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    a = torch.randn(n, n, device=ctx.device, dtype=dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype)
    iters = 30 if ctx.cuda else 3
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(3):
        ctx.sync()
        t = time.perf_counter()
        for _ in range(iters):
            a @ b
        ctx.sync()
        best = min(best, (time.perf_counter() - t) / iters)
    ctx.peak_tflops = 2 * n**3 / best / 1e12
    row.batch = f"{n}x{n}x{n} {str(dtype).replace('torch.', '')}"
    row.ms = best * 1e3
    row.tflops = ctx.peak_tflops
    row.pct_peak = 100.0
    row.note = "peak for the % column" + ("" if ctx.cuda else " (CPU float32)")


@dataclass
class Workload:
    name: str
    batch_desc: str
    task: Any
    model: Any
    batch: dict  # training batch on the device, before augment/prepare_train
    recipe: Any  # equipipe.train_step.TrainConfig: optimiser, clip, EMA, augment_prob
    eval_view: dict | None = None
    k: int = 0
    rotations: Any = None


def recipe(model_name: str) -> Any:
    """The training recipe of config/paper.yaml's task for ``model_name`` (what the step needs)."""
    from equipipe.train_step import TrainConfig

    if model_name == "proteina":
        return TrainConfig(optimizer="adam", lr=1e-4, grad_clip=1.0, ema=0.999, augment_prob=1.0)
    if model_name == "voxmol":
        return TrainConfig(lr=2e-5, betas=(0.99, 0.999), eps=0.0, weight_decay=0.01, ema=0.999,
                           augment_prob=1.0)  # fmt: skip
    return TrainConfig(lr=1e-5, weight_decay=0.01, grad_clip=10.0, ema=0.999, augment_prob=0.0)


def atoms_batch(torch, device, molecules: int, atoms: int, seed: int = 0) -> dict:
    """Synthetic molecules: ``atoms`` atoms each in a ~3 Å blob (all within the 12 Å cutoff)."""
    g = torch.Generator().manual_seed(seed)
    n = molecules * atoms
    z = torch.tensor([1, 6, 7, 8, 1, 6, 1, 16])[torch.randint(0, 8, (n,), generator=g)]
    return {
        "pos": (torch.randn(n, 3, generator=g) * 2.5).to(device),
        "z": z.to(device),
        "batch": torch.arange(molecules).repeat_interleave(atoms).to(device),
        "n_atoms": torch.full((molecules,), atoms, dtype=torch.int64).to(device),
        "energy": torch.randn(molecules, generator=g).to(device),
        "forces": torch.randn(n, 3, generator=g).to(device),
    }


def forcefield_workload(ctx: Ctx, model_name: str) -> Workload:
    torch = ctx.torch
    from equipipe.tasks.forcefield import ForceFieldTask

    s = ctx.sizes[model_name]
    task = ForceFieldTask({"model": model_name})
    task.set_state({"energy_reference": "none", "element_energy": {}, "energy_mean": 0.0,
                    "energy_std": 1.0, "force_std": 1.0})  # fmt: skip
    model = task.build_model(s["size"]).to(ctx.device)
    batch = atoms_batch(torch, ctx.device, s["molecules"], s["atoms"])
    desc = f"{s['molecules']} mol x {s['atoms']} atoms"
    w = Workload(f"{model_name} {s['size']}", desc, task, model, batch, recipe(model_name))
    if "k" in s:
        w.eval_view = atoms_batch(torch, ctx.device, s["eval_molecules"], s["atoms"], seed=1)
        w.k = s["k"]
    return w


def proteina_workload(ctx: Ctx) -> Workload:
    torch = ctx.torch
    from equipipe.tasks.flowmatching import FlowMatchingTask

    s = ctx.sizes["proteina"]
    task = FlowMatchingTask({"model": "proteina"})
    model = task.build_model(s["size"]).to(ctx.device)
    B, L = s["chains"], s["residues"]
    g = torch.Generator().manual_seed(0)
    steps = torch.randn(B, L, 3, generator=g)
    x1 = (steps / steps.norm(dim=-1, keepdim=True) * 0.38).cumsum(1)  # C-alpha walk, 0.38 nm
    x1 = x1 - x1.mean(1, keepdim=True)
    batch = {
        "x1": x1.to(ctx.device),
        "mask": torch.ones(B, L, dtype=torch.bool, device=ctx.device),
        "residue": torch.arange(L).expand(B, L).contiguous().to(ctx.device),
        "chain_break": torch.zeros(B, L, dtype=torch.bool, device=ctx.device),
    }
    desc = f"{B} chains x {L} res"
    w = Workload(f"proteina {s['size']}", desc, task, model, batch, recipe("proteina"))
    views = task.eval_views(batch, torch.Generator().manual_seed(1))
    w.eval_view = dict(views[len(views) // 2][1])  # one flow time (t = 0.8)
    w.k = s["k"]
    return w


def voxmol_workload(ctx: Ctx, grids: int) -> Workload:
    torch = ctx.torch
    from equipipe.tasks.denoising import DenoisingTask

    s = ctx.sizes["voxmol"]
    task = DenoisingTask({"model": "voxmol", "grid_size": s["grid"], "grid_spacing": s["spacing"]})
    model = task.build_model(s["size"]).to(ctx.device)

    def molecules(n: int, seed: int) -> dict:
        b = atoms_batch(torch, torch.device("cpu"), n, s["atoms"], seed)
        b["pos"] = b["pos"] * (s["grid"] * s["spacing"] / 8 / 2.5)  # std 1/8 of the box
        examples = [
            {"pos": b["pos"][b["batch"] == i].numpy(), "z": b["z"][b["batch"] == i].numpy()}
            for i in range(n)
        ]
        return {k: v.to(ctx.device) for k, v in task.collate(examples).items()}

    desc = f"{grids} grids {s['grid']}^3"
    w = Workload(f"voxmol {s['size']}", desc, task, model, molecules(grids, 0), recipe("voxmol"))
    views = task.eval_views(molecules(s["eval_grids"], 1), torch.Generator().manual_seed(1))
    w.eval_view = next(v for labels, v in views if labels.get("mode") == "haar")
    w.k = s["k"]
    return w


def make_step(ctx: Ctx, w: Workload, fwd_model, opt, ema) -> Callable[[int], None]:
    """``step(i)``: training step ``i`` (seed 0) of ``equipipe.train_step`` on ``w.batch``.

    Every micro-batch of the recipe's ``accumulate`` is ``w.batch``; ``ema`` is the
    ``equipipe.train_step.EMA`` of ``w.model`` (or None).
    """
    from equipipe.train_step import train_step

    def step(i: int) -> None:
        train_step(w.model, w.task, opt, ema, w.recipe, i, 0, lambda _micro: (w.batch, 1.0),
                   forward_model=fwd_model, autocast=ctx.autocast)  # fmt: skip

    return step


def time_steps(ctx: Ctx, step: Callable[[int], None], warmup: int, n: int) -> tuple[float, float]:
    """(seconds of the warm-up, mean seconds per step over the steps seeded 0..n-1).

    ``warmup < 0``: the warm-up is one pass over the same n seeds, so a compiled model has
    met every input variant of the timed steps (e.g. self-conditioning on and off) before.
    """
    seeds = list(range(n)) if warmup < 0 else [1000 + i for i in range(warmup)]
    ctx.sync()
    t = time.perf_counter()
    for i in seeds:
        step(i)
    ctx.sync()
    warm = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(n):
        step(i)
    ctx.sync()
    return warm, (time.perf_counter() - t) / n


def fill_throughput(ctx: Ctx, row: Row, per_step_s: float, flops: float | None) -> None:
    row.ms = per_step_s * 1e3
    row.steps_s = 1.0 / per_step_s
    if ctx.cuda:
        row.peak_gib = ctx.torch.cuda.max_memory_allocated() / 2**30
    if flops:
        row.gflop = flops / 1e9
        row.tflops = flops / per_step_s / 1e12
        if ctx.peak_tflops:
            row.pct_peak = 100 * row.tflops / ctx.peak_tflops


def check_train(ctx: Ctx, row: Row, build: Callable[[], Workload], compiled: bool) -> None:
    torch = ctx.torch
    from torch.utils.flop_counter import FlopCounterMode

    from equipipe.train_step import EMA, make_optimizer

    w = build()
    row.workload, row.batch = w.name, w.batch_desc
    n_params = sum(p.numel() for p in w.model.parameters())
    w.model.train()
    opt = make_optimizer(w.model.parameters(), w.recipe)
    ema = EMA(w.model, w.recipe.ema, w.recipe.ema_warmup) if w.recipe.ema else None
    fwd = w.model
    if compiled:
        torch._dynamo.reset()
        fwd = torch.compile(w.model, backend=ctx.compile_backend)
    step = make_step(ctx, w, fwd, opt, ema)
    warmup = -1 if compiled else ctx.sizes["warmup"]
    n = ctx.sizes["steps"]
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    warm_s, per_step = time_steps(ctx, step, warmup, n)
    flops = None
    if not compiled:  # the same seeds as the timed steps, counted eagerly
        with FlopCounterMode(display=False) as counter:
            for i in range(n):
                step(i)
        flops = counter.get_total_flops() / n
    else:
        flops = ctx.flops.get(w.name)
    fill_throughput(ctx, row, per_step, flops)
    if not compiled:
        ctx.flops[w.name] = flops
    note = f"{n_params / 1e6:.2f}M params"
    if compiled:
        note += f", compile + {n} warm-up steps {warm_s:.1f} s ({ctx.compile_backend})"
    row.note = (row.note + "; " if row.note else "") + note


def check_eval(ctx: Ctx, row: Row, build: Callable[[], Workload]) -> None:
    torch = ctx.torch
    from equipipe.equivariance import decompose

    w = build()
    row.workload = w.name
    view, k = w.eval_view, w.k
    B = w.task.num_examples(view)
    row.batch = f"{B} ex, K={k}"
    w.model.eval()

    def plain() -> None:
        with torch.no_grad():
            for _ in range(k):
                w.task.predict(w.model, view)

    def decomposition() -> None:
        decompose(w.model, w.task, view, k, torch.Generator().manual_seed(0), "auto", w.rotations)

    reps = 3 if ctx.cuda else 1
    times = {}
    for name, fn in (("plain", plain), ("dec", decomposition)):
        fn()  # warm-up
        best = math.inf
        for _ in range(reps):
            ctx.sync()
            t = time.perf_counter()
            fn()
            ctx.sync()
            best = min(best, time.perf_counter() - t)
        times[name] = best
    row.ms = times["dec"] * 1e3
    if ctx.cuda:
        row.peak_gib = torch.cuda.max_memory_allocated() / 2**30
    ratio = times["dec"] / times["plain"]
    strategy = "batched" if ctx.cuda else "sequential"  # what device_strategy="auto" picks
    bound = 0.6 if ctx.cuda else 1.15
    row.note = (
        f"ratio {ratio:.2f} = decompose {times['dec'] * 1e3:.1f} ms / {k} x plain forward "
        f"{times['plain'] * 1e3:.1f} ms ({strategy}; DESIGN bound {bound})"
    )


def check_voxmol_train(ctx: Ctx, row: Row, compiled: bool) -> None:
    s = ctx.sizes["voxmol"]
    grids = ctx.voxmol_grids or s["grids"]
    try:
        check_train(ctx, row, lambda: voxmol_workload(ctx, grids), compiled)
        return
    except ctx.torch.cuda.OutOfMemoryError:
        if grids == s["fallback_grids"]:
            raise
    free(ctx)  # outside the except block: its traceback no longer holds the tensors
    ctx.voxmol_grids = s["fallback_grids"]
    row.note = f"{grids} grids: out of memory, {s['fallback_grids']} instead"
    check_train(ctx, row, lambda: voxmol_workload(ctx, s["fallback_grids"]), compiled)


# --- the table ------------------------------------------------------------------------------

COLUMNS = (
    ("check", "check", "{}"),
    ("workload", "workload", "{}"),
    ("batch", "batch", "{}"),
    ("ms", "ms", "{:.1f}"),
    ("steps_s", "steps/s", "{:.2f}"),
    ("peak_gib", "peak GiB", "{:.2f}"),
    ("gflop", "GFLOP/step", "{:.1f}"),
    ("tflops", "TFLOP/s", "{:.2f}"),
    ("pct_peak", "% peak", "{:.1f}"),
    ("note", "note", "{}"),
)


def table(rows: list[Row]) -> str:
    cells = [[title for _, title, _ in COLUMNS]]
    for r in rows:
        cells.append(
            [
                fmt.format(v) if (v := getattr(r, key)) not in (None, "") else "-"
                for key, _, fmt in COLUMNS
            ]
        )
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS) - 1)]
    lines = []
    for i, c in enumerate(cells):
        lines.append("  ".join(x.ljust(wd) for x, wd in zip(c[:-1], widths)) + "  " + c[-1])
        if i == 0:
            lines.append("-" * min(len(lines[0]) + 40, 200))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes and few steps (a CPU smoke run)"
    )
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--budget-s", type=float, default=None, help="total seconds for all checks")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend (default inductor; eager with --quick: dynamo's graph "
        "capture without code generation, which takes minutes on 2 CPU cores; aot_eager "
        "also traces the backward)",
    )
    p.add_argument(
        "--only", default="", help="comma-separated subset: escaip,equivariant,proteina,voxmol"
    )
    p.add_argument("--allow-absent", action="store_true",
                   help="do not block polars/rdkit/... (they are absent on the GPU machine)")  # fmt: skip
    a = p.parse_args(argv)
    if not a.allow_absent:
        sys.meta_path.insert(0, _Absent())

    import torch

    sizes = QUICK if a.quick else FULL
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))  # fmt: skip
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    ctx = Ctx(torch, device, sizes, budget_s=a.budget_s or sizes["budget_s"], cap_s=sizes["check_cap_s"],
              compile_backend=a.compile_backend or ("eager" if a.quick else "inductor"),
              autocast=device.type == "cuda" or a.quick)  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    else:
        name = platform.processor() or platform.machine() or "cpu"
    print(f"[gpu_check] python {platform.python_version()}, torch {torch.__version__}, device {device} "
          f"({name}), mode {'quick' if a.quick else 'full'}, budget {ctx.budget_s:.0f} s",
          file=sys.stderr, flush=True)  # fmt: skip

    def on_term(signum, frame):  # noqa: ARG001 - the hard timeout: print what was measured
        print(f"\nequipipe gpu_check: stopped by signal {signum}; rows so far:")
        print(table(ctx.rows), flush=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    only = set(filter(None, a.only.split(",")))
    want = lambda m: not only or m in only  # noqa: E731

    run_check(ctx, Row("imports"), check_imports, min_s=0)
    run_check(ctx, Row("matmul peak"), lambda r: check_matmul(ctx, r), min_s=0)
    try:
        import e3nn  # noqa: F401

        has_e3nn = True
    except ModuleNotFoundError:
        has_e3nn = False

    builders = {
        "escaip": lambda: forcefield_workload(ctx, "escaip"),
        "proteina": lambda: proteina_workload(ctx),
    }
    for m in ("escaip", "equivariant", "proteina", "voxmol"):
        if not want(m):
            continue
        if m == "equivariant" and not has_e3nn:
            ctx.rows.append(Row("train eager", "equivariant", note="skipped: e3nn not installed"))
            continue
        if m == "equivariant":
            run_check(
                ctx,
                Row("train eager"),
                lambda r: check_train(
                    ctx, r, lambda: forcefield_workload(ctx, "equivariant"), False
                ),
            )
        elif m == "voxmol":
            run_check(ctx, Row("train eager"), lambda r: check_voxmol_train(ctx, r, False))
        else:
            run_check(
                ctx, Row("train eager"), lambda r, m=m: check_train(ctx, r, builders[m], False)
            )
    for m in ("escaip", "proteina", "voxmol"):
        if not want(m):
            continue
        if m == "voxmol":
            n_eval = ctx.sizes["voxmol"]["eval_grids"]
            build = lambda n=n_eval: voxmol_workload(ctx, n)  # noqa: E731
        else:
            build = builders[m]
        run_check(ctx, Row("eval overhead"), lambda r, b=build: check_eval(ctx, r, b))
    if not a.no_compile:
        for m in ("escaip", "proteina", "voxmol"):
            if not want(m):
                continue
            if m == "voxmol":
                run_check(
                    ctx, Row("train compiled"), lambda r: check_voxmol_train(ctx, r, True), min_s=20
                )
            else:
                run_check(
                    ctx,
                    Row("train compiled"),
                    lambda r, m=m: check_train(ctx, r, builders[m], True),
                    min_s=20,
                )

    total = time.monotonic() - ctx.t0
    print(f"\nequipipe gpu_check: torch {torch.__version__}, {device} ({name}), "
          f"{'quick' if a.quick else 'full'} mode, {total:.0f} s")  # fmt: skip
    print(table(ctx.rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
