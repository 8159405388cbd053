"""The convolutional projector that turns TAP's image-feature grid into LLM input embeddings.

As described for TAP-v2-Chat: merge each `merge` x `merge` neighbourhood of patch tokens (a 64x64 grid becomes
32x32 = 1024 visual tokens by default), run three 3x3 residual conv blocks so information crosses the encoder's
16x16 attention windows (whose only other contact is TAP's four bottlenecks), then a 2-layer MLP to the LLM width.
The last conv of every residual block starts at zero, so at initialisation the projector is exactly
`MLP(merge(x))`: training starts from a plain token projection and learns the spatial mixing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ProjectorConfig:
    in_dim: int = 768  # TAP encoder width (tap_vit_b 768, tap_vit_l 1024, tap_vit_h 1280)
    hidden_dim: int = 1024  # width of the conv blocks
    out_dim: int = 2560  # Phi-2 hidden size
    merge: int = 2  # side of the neighbourhood merged into one token
    num_blocks: int = 3
    grid: int = 64  # side of TAP's feature grid (image_size / patch_size)

    def __post_init__(self) -> None:
        if self.grid % self.merge:
            raise ValueError(f"feature grid {self.grid} is not divisible by merge {self.merge}")

    def num_tokens(self) -> int:
        """Visual tokens per image: one per `merge` x `merge` neighbourhood of the feature grid."""
        return (self.grid // self.merge) ** 2


class ResidualBlock(nn.Module):
    """x + conv(GELU(GroupNorm(conv(x)))); the second conv is zero-initialised (identity at init)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm = nn.GroupNorm(1, dim)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, dim, H, W) -> same shape; exactly `x` at initialisation, as the last conv starts at zero."""
        return x + self.conv2(F.gelu(self.norm(self.conv1(x))))


class ConvProjector(nn.Module):
    """(B, in_dim, H, W) feature grid -> (B, (H/merge) * (W/merge), out_dim) tokens, row-major."""

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        self.config = config
        self.merge = nn.Conv2d(config.in_dim * config.merge ** 2, config.hidden_dim, 1)
        self.blocks = nn.Sequential(*(ResidualBlock(config.hidden_dim) for _ in range(config.num_blocks)))
        self.mlp = nn.Sequential(nn.Linear(config.hidden_dim, config.out_dim), nn.GELU(),
                                 nn.Linear(config.out_dim, config.out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, in_dim, grid, grid) features -> (B, num_tokens, out_dim); another grid size raises ValueError."""
        m, g = self.config.merge, self.config.grid
        if tuple(features.shape[-2:]) != (g, g):
            raise ValueError(f"expected a {g}x{g} feature grid, got {tuple(features.shape[-2:])}")
        x = F.pixel_unshuffle(features, m) if m > 1 else features  # 2x2 neighbours -> channels
        x = self.blocks(self.merge(x))
        return self.mlp(x.flatten(2).transpose(1, 2))
