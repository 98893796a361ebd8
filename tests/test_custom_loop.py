"""examples/custom_loop.py: equipipe.equivariance inside a plain loop of a foreign model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from equipipe.equivariance import decompose, example_rotations

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_loop.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("custom_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_loop_logs_an_exact_decomposition(example):
    lines: list[str] = []
    history = example.train(steps=20, eval_every=10, k=3, batch_size=16, log=lines.append)
    assert [h["step"] for h in history] == [0, 10, 20]
    assert len(lines) == 3 and all("pct" in line for line in lines)
    for h in history:
        assert h["k"] == 3
        assert h["total"] == pytest.approx(h["mean"] + h["equiv"], rel=1e-9)  # T = M + E
        assert h["pct"] == pytest.approx(h["equiv_unbiased"] / h["total"], rel=1e-9)
        assert 0 < h["pct"] < 1
    assert history[-1]["total"] < history[0]["total"]  # it trains


def test_adapter_group_action(example):
    adapter = example.PointCloudAdapter()
    batch = example.make_data(8, 10, torch.Generator().manual_seed(0))

    class Centred(torch.nn.Module):  # exactly equivariant: its equivariance error is ~0
        def forward(self, x):
            return x - x.mean(dim=1, keepdim=True)

    d = decompose(Centred(), adapter, batch, 4, torch.Generator().manual_seed(1))["vectors"]
    assert d.total > 0 and d.pct < 1e-10
    # decompose() and the by-hand route agree for the same rotations.
    model = example.PointNet()
    auto = decompose(model, adapter, batch, 4, torch.Generator().manual_seed(2))["vectors"]
    R = example_rotations(8, 4, torch.Generator().manual_seed(2))
    hand = example.decompose_by_hand(model, batch, R)
    assert hand.total == pytest.approx(auto.total, rel=1e-5)
    assert hand.equiv == pytest.approx(auto.equiv, rel=1e-5)
    # One batched forward over k copies gives the same numbers as the sequential loop.
    batched = decompose(model, adapter, batch, 4, torch.Generator().manual_seed(2), "batched")
    assert batched["vectors"].equiv == pytest.approx(auto.equiv, rel=1e-4)
