"""VoxMol 3D U-Net: sizes, shapes, GroupNorm validity, registry."""

from __future__ import annotations

import pytest
import torch

from equipipe.models import voxmol
from equipipe.models.registry import build_model, param_count


@pytest.mark.parametrize("size", ["7M", "28M", "111M"])
def test_parameter_counts_within_ten_percent(size):
    with torch.device("meta"):
        model = voxmol.build(size)
    label = float(size[:-1]) * 1e6
    assert abs(param_count(model) - label) <= 0.1 * label


def test_tiny_is_cpu_sized_and_keeps_the_shape():
    torch.manual_seed(0)
    model = build_model("voxmol", "tiny", dropout=0.0)
    assert 0.1e6 <= param_count(model) <= 0.3e6
    x = torch.randn(2, 8, 16, 16, 16)
    y = model(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_structure_levels_and_attention():
    cfg = voxmol.config_for("111M")
    assert [cfg.base * m for m in cfg.mults] == [32, 64, 128, 512]
    with torch.device("meta"):
        model = voxmol.VoxMolUNet(cfg)
    attn = [m for m in model.modules() if isinstance(m, voxmol.VoxelAttention)]
    # 2 down + 3 up stages at each of the two coarsest levels, plus the bottleneck
    assert len(attn) == 2 * (2 + 3) + 1
    for m in model.modules():
        if isinstance(m, torch.nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0


def test_group_count_and_errors():
    assert voxmol.group_count(8, 16) == 8 and voxmol.group_count(512, 16) == 16
    assert voxmol.group_count(12, 16) == 12 and voxmol.group_count(24, 16) == 12
    with pytest.raises(ValueError, match="allowed"):
        voxmol.build("3M")
    with pytest.raises(ValueError, match="override"):
        voxmol.build("tiny", width=3)
