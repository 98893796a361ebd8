"""equipipe.distributed on the CPU: gloo, two processes, against one process on the union batch."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from equipipe import distributed

STEPS = 2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


def make_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, 5, generator=g), torch.randn(n, 3, generator=g)


def mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).pow(2).sum(1).mean()  # a mean over examples


def train(n_global: int, accumulate: int, rank: int = 0, world: int = 1) -> nn.Module:
    """STEPS AdamW steps; each step's global batch is split into `accumulate` micro-batches."""
    model = make_model()
    ddp = distributed.wrap(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    x, y = make_data(n_global)
    micro = n_global // accumulate
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        for m in range(accumulate):
            xm, ym = x[m * micro : (m + 1) * micro], y[m * micro : (m + 1) * micro]
            xs, ys = distributed.shard(xm, rank, world), distributed.shard(ym, rank, world)
            w = distributed.local_weight(len(xs), len(xm), world)
            with distributed.no_sync(ddp, sync=m == accumulate - 1):
                (mean_loss(ddp, xs, ys) * w / accumulate).backward()
        opt.step()
    return model


CASES = {"even": (8, 1), "uneven": (7, 1), "accumulate": (8, 2)}


def _worker(local_rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    r, w, lr = distributed.init_from_env()
    res = {"init": [r, w, lr], "main": distributed.is_main()}
    for name, (n, acc) in CASES.items():
        model = train(n, acc, r, w)
        if distributed.is_main():
            torch.save(model.state_dict(), Path(out) / f"{name}.pt")
    res["mean_tensor"] = distributed.all_reduce_mean(torch.tensor([float(r), 2.0])).tolist()
    res["mean_float"] = distributed.all_reduce_mean(float(r))
    res["agree"] = distributed.agree_max(15 if r == 1 else 0)
    res["bcast"] = distributed.broadcast_object({"from": r})
    distributed.barrier()
    (Path(out) / f"rank{r}.json").write_text(json.dumps(res))
    distributed.destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_process_is_a_no_op(monkeypatch):
    for var in distributed.LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    assert distributed.init_from_env() == (0, 1, 0)
    model = make_model()
    assert distributed.wrap(model) is model and distributed.unwrap(model) is model
    assert distributed.is_main() and distributed.world() == 1
    x = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_mean(x) is x and distributed.all_reduce_mean(3.0) == 3.0
    assert distributed.agree_max(4) == 4 and distributed.broadcast_object("a") == "a"
    distributed.barrier()
    with distributed.no_sync(model, sync=False):
        pass


def test_shard_keeps_global_order():
    rows = np.arange(10)
    for world in (1, 2, 3, 4, 11):
        parts = [distributed.shard(rows, r, world) for r in range(world)]
        assert np.array_equal(np.concatenate(parts), rows)
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
    assert distributed.shard(list("abcde"), 1, 2) == ["d", "e"]
    assert sum(
        distributed.local_weight(len(distributed.shard(rows, r, 3)), 10, 3) for r in range(3)
    ) == pytest.approx(3)
    with pytest.raises(ValueError):
        distributed.shard(rows, 2, 2)


def test_torchrun_argv():
    argv = distributed.torchrun_argv(4, ["train", "--spec", "{}"])
    assert argv[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    assert argv[5:] == ["-m", "equipipe.cli", "train", "--spec", "{}"]


def test_ddp_step_on_two_gloo_processes_equals_union_batch(tmp_path):
    # Single-process references first: the forked workers then inherit what the first
    # optimiser step imports lazily (seconds on a loaded 2-core machine).
    want = {name: train(n, acc).state_dict() for name, (n, acc) in CASES.items()}
    # fork: the workers inherit the imported torch (a fresh import takes seconds on 2 cores)
    args = (2, _free_port(), str(tmp_path))
    mp.start_processes(_worker, args=args, nprocs=2, join=True, start_method="fork")
    for name in CASES:
        got = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        for k in want[name]:
            torch.testing.assert_close(got[k], want[name][k], rtol=0, atol=1e-5, msg=f"{name}: {k}")
        # and the steps really moved the weights
        assert not torch.allclose(want[name]["0.weight"], make_model().state_dict()["0.weight"])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(ranks):
        assert res["init"] == [r, 2, r] and res["main"] == (r == 0)
        assert res["mean_tensor"] == [0.5, 2.0] and res["mean_float"] == 0.5
        assert res["agree"] == 15 and res["bcast"] == {"from": 0}
