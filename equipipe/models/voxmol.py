"""VoxMol-shaped 3D U-Net denoiser (compact re-implementation; no noise conditioning).

Shape (VoxMol's GEOM-drugs configuration, read from the public release for facts): an input
3x3x3 convolution to ``base`` channels, four resolution levels with ``base x (1, 2, 4, 16)``
channels, two residual blocks per level on the way down (``n_blocks``) and three on the way
up (each consuming one skip connection), stride-2 3x3x3 convolutions to downsample and
4x4x4 transposed convolutions to upsample, single-head self-attention over voxels after
every block of the two coarsest levels and in the bottleneck (res - attn - res), then
GroupNorm, SiLU and a 3x3x3 convolution back to the element channels. Residual blocks are
pre-activation: GroupNorm, SiLU, conv, GroupNorm, SiLU, dropout, conv, plus a 1x1x1 shortcut
when the width changes.

GroupNorm uses the largest group count <= ``max_groups`` that divides the width, so every
size is valid (VoxMol used 16 groups at base 32).

Sizes by base width: ``111M`` (32), ``28M`` (16), ``7M`` (8); ``tiny`` for CPU runs (base 4,
levels x(1, 2, 4, 4), ~0.26M). Parameter counts are within 10 % of the labels (tests/test_voxmol.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from equipipe.models.registry import sized_config


@dataclass(frozen=True)
class VoxMolConfig:
    in_channels: int = 8  # element channels C H O N F S Cl Br
    base: int = 32
    mults: tuple[int, ...] = (1, 2, 4, 16)  # width of each level relative to ``base``
    attention: tuple[bool, ...] = (False, False, True, True)
    n_blocks: int = 2
    max_groups: int = 16
    dropout: float = 0.1
    heads: int = 1


def group_count(channels: int, max_groups: int) -> int:
    """Largest g <= max_groups dividing ``channels`` (GroupNorm needs channels % g == 0)."""
    return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, max_groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(group_count(c_in, max_groups), c_in)
        self.conv1 = nn.Conv3d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(group_count(c_out, max_groups), c_out)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv3d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.shortcut(x)


class VoxelAttention(nn.Module):
    """Self-attention over all voxels of a (B, C, D, H, W) map, with a residual connection.

    Uses ``scaled_dot_product_attention`` (fused / memory-efficient kernels on GPU: a 16^3
    level has 4096 tokens). VoxMol's block has a GroupNorm it does not apply; this one
    normalises the input, which keeps deep attention stacks stable.
    """

    def __init__(self, channels: int, heads: int, max_groups: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention width {channels} is not divisible by {heads} heads")
        self.heads = heads
        self.norm = nn.GroupNorm(group_count(channels, max_groups), channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        B, C = x.shape[:2]
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, L, C)
        q, k, v = self.qkv(tokens).view(B, -1, 3, self.heads, C // self.heads).unbind(2)
        h = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = self.out(h.transpose(1, 2).reshape(B, -1, C))
        return x + h.transpose(1, 2).reshape(x.shape)


class Stage(nn.Module):
    """One residual block, optionally followed by attention."""

    def __init__(self, c_in: int, c_out: int, attn: bool, cfg: VoxMolConfig):
        super().__init__()
        self.res = ResidualBlock(c_in, c_out, cfg.max_groups, cfg.dropout)
        self.attn = VoxelAttention(c_out, cfg.heads, cfg.max_groups) if attn else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(self.res(x))


class VoxMolUNet(nn.Module):
    """Noisy density grid (B, C, G, G, G) -> denoised grid of the same shape.

    G must be divisible by 2^(levels - 1) (8 for four levels).
    """

    def __init__(self, cfg: VoxMolConfig):
        super().__init__()
        if len(cfg.mults) != len(cfg.attention):
            raise ValueError("VoxMolConfig.mults and .attention need one entry per level")
        self.cfg = cfg
        widths = [cfg.base * m for m in cfg.mults]
        self.stem = nn.Conv3d(cfg.in_channels, cfg.base, 3, padding=1)

        # Encoder: every module's output is kept as a skip connection.
        self.down = nn.ModuleList()
        skips = [cfg.base]
        c = cfg.base
        for level, (w, attn) in enumerate(zip(widths, cfg.attention)):
            for _ in range(cfg.n_blocks):
                self.down.append(Stage(c, w, attn, cfg))
                c = w
                skips.append(c)
            if level < len(widths) - 1:
                self.down.append(nn.Conv3d(c, c, 3, stride=2, padding=1))
                skips.append(c)

        self.middle = nn.Sequential(
            ResidualBlock(c, c, cfg.max_groups, cfg.dropout),
            VoxelAttention(c, cfg.heads, cfg.max_groups),
            ResidualBlock(c, c, cfg.max_groups, cfg.dropout),
        )

        # Decoder: n_blocks + 1 stages per level, each fed [x, skip]; the last stage of a
        # level narrows to the width of the skip it consumed.
        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            for i in range(cfg.n_blocks + 1):
                s = skips.pop()
                c_out = c if i < cfg.n_blocks else s
                self.up.append(Stage(c + s, c_out, cfg.attention[level], cfg))
                c = c_out
            if level > 0:
                self.up.append(nn.ConvTranspose3d(c, c, 4, stride=2, padding=1))
        assert not skips and c == cfg.base
        self.head_norm = nn.GroupNorm(group_count(c, cfg.max_groups), c)
        self.head = nn.Conv3d(c, cfg.in_channels, 3, padding=1)
        # full-resolution maps probed by equipipe.spectrum_probe (coarse levels are off-centre):
        # the stem, the first encoder stage and the last decoder stage
        self.spectrum_layers = ("stem", "down.0", f"up.{len(self.up) - 1}")

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        skips = [x]
        for m in self.down:
            x = m(x)
            skips.append(x)
        x = self.middle(x)
        for m in self.up:
            if isinstance(m, nn.ConvTranspose3d):
                x = m(x)
            else:
                x = m(torch.cat([x, skips.pop()], dim=1))
        return self.head(F.silu(self.head_norm(x)))


# --------------------------------------------------------------------------------------------
# Sizes

SIZE_CONFIGS: dict[str, dict] = {
    "tiny": dict(base=4, mults=(1, 2, 4, 4)),
    "7M": dict(base=8),
    "28M": dict(base=16),
    "111M": dict(base=32),
}
SIZES: tuple[str, ...] = tuple(SIZE_CONFIGS)


def config_for(size: str, **overrides) -> VoxMolConfig:
    """The config of a named size with field overrides (errors name the allowed values)."""
    return sized_config("voxmol", VoxMolConfig(), SIZE_CONFIGS, size, overrides)


def build(size: str, **overrides) -> VoxMolUNet:
    """Registry entry point: ``build("111M")``, ``build("tiny", dropout=0.0)``."""
    return VoxMolUNet(config_for(size, **overrides))
