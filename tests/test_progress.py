"""Logs a person can read: the level, one line per evaluation, TensorBoard event files."""

from __future__ import annotations

import logging
import math
import subprocess
import sys

import polars as pl
import pytest
from tensorboard.backend.event_processing import event_accumulator

from equipipe.logs import LEVEL_ENV, configure_logging
from equipipe.progress import pct_standard_error, progress_line
from equipipe.train import eval_steps
from tests.test_train import BIN, spec, tiny_store  # noqa: F401 - the session fixture


@pytest.fixture
def equipipe_logger():
    """The ``equipipe`` logger's handlers and level, restored after the test."""
    logger = logging.getLogger("equipipe")
    handlers, level = list(logger.handlers), logger.level
    yield logger
    logger.handlers[:] = handlers
    logger.setLevel(level)


def test_level_from_flag_else_environment_else_info(monkeypatch, equipipe_logger):
    monkeypatch.delenv(LEVEL_ENV, raising=False)
    assert configure_logging().level == logging.INFO
    monkeypatch.setenv(LEVEL_ENV, "warning")
    assert configure_logging().level == logging.WARNING
    assert configure_logging("DEBUG").level == logging.DEBUG  # the flag wins
    assert len(equipipe_logger.handlers) == 1  # reconfiguring replaces its handler
    monkeypatch.setenv(LEVEL_ENV, "LOUD")
    with pytest.raises(SystemExit, match="EQUIPIPE_LOG_LEVEL='LOUD'; allowed: DEBUG, INFO"):
        configure_logging()


def row(metric, value, split="val", field="forces", t=None, step=100):
    return {"step": step, "split": split, "metric": metric, "value": value, "field": field, "t": t}


def test_progress_line_names_step_loss_pct_with_se_rate_and_eta():
    rows = [row("train_loss", 0.12345, "train", None), row("lr", 2e-3, "train", None)]
    for split in ("val_octahedral", "val_haar"):
        rows += [row("total", 2.0, split), row("equiv_unbiased", 0.5, split),
                 row("pct", 0.25, split), row("total_se", 0.1, split), row("equiv_se", 0.02, split)]  # fmt: skip
    # delta method: sqrt((0.02/2)^2 + (0.5*0.1/4)^2) = 0.0160
    assert pct_standard_error(0.5, 2.0, 0.02, 0.1) == pytest.approx(0.016008, rel=1e-4)
    line = progress_line(100, 500, rows, "forces", 8.0)
    assert line == (
        "step 100/500 loss 0.1235 lr 2.0e-03 pct (forces) octahedral 25±1.6% haar 25±1.6% "
        "8 steps/s ETA 0:00:50"
    )
    assert progress_line(0, 500, rows[2:7], "forces", None) == "step 0/500 pct (forces) 25±1.6%"
    one_batch = [row("pct", 0.25), row("total", 2.0), row("total_se", math.nan)]
    assert progress_line(0, 9, one_batch, "forces", None).endswith("25±n/a%")


def test_train_tensorboard_flag_writes_events_tensorboard_reads(tiny_store, tmp_path):  # noqa: F811
    """``equipipe --log-level INFO train --tensorboard``: event files next to metrics.parquet
    with the metric table's values, and one log line per evaluation on stderr."""
    import json
    import os

    s = spec(steps=4)
    s["eval"]["batch_size"] = 2  # two batches: pct has a standard error
    out = tmp_path / "run"
    cmd = [str(BIN / "equipipe"), "--log-level", "info", "train", "--tensorboard", "--spec",
           json.dumps(s), "--store", str(tiny_store["store"]), "--split", str(tiny_store["split"]),
           "--subset", str(tiny_store["subset"]), "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    evals = eval_steps(4, 8, [1, 2])
    lines = [ln for ln in p.stderr.splitlines() if "INFO equipipe.train: step " in ln]
    assert [int(ln.split(" step ")[1].split("/")[0]) for ln in lines] == evals, p.stderr
    assert all("±" in ln and "n/a" not in ln for ln in lines), lines

    assert list(out.glob("events.out.tfevents.*")), sorted(p.name for p in out.iterdir())
    acc = event_accumulator.EventAccumulator(str(out), size_guidance={"scalars": 0})
    acc.Reload()
    metrics = pl.read_parquet(out / "metrics.parquet")
    pct = metrics.filter(
        (pl.col("metric") == "pct") & (pl.col("split") == "val") & (pl.col("field") == "forces")
    ).sort("step")
    events = acc.Scalars("val/pct/forces")
    assert [e.step for e in events] == evals == pct["step"].to_list()
    assert [e.value for e in events] == pytest.approx(pct["value"].to_list(), rel=1e-6)
    loss = metrics.filter(pl.col("metric") == "train_loss").sort("step")
    assert [e.step for e in acc.Scalars("train/train_loss")] == loss["step"].to_list()
    info = json.loads((out / "run.json").read_text())
    assert info["train_config"]["tensorboard"] is True


def test_switching_tensorboard_on_keeps_the_checkpoint_identity():
    """train.tensorboard changes no number: a run interrupted without it resumes with it."""
    from types import SimpleNamespace

    from equipipe.train import Trainer

    base = spec()
    on = {**base, "train": {**base["train"], "tensorboard": True}}
    other = {**base, "train": {**base["train"], "lr": 2e-3}}
    h = lambda s: Trainer.spec_hash(SimpleNamespace(spec=s))  # type: ignore[arg-type]  # noqa: E731
    assert h(on) == h(base) != h(other)


def test_tensorboard_is_imported_only_when_on():
    code = "import sys, equipipe.train, equipipe.cli; print('tensorboard' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]
