"""Sparse prompt encoder: points and box corners become random-Fourier-feature tokens plus a label embedding.

There is no dense (mask) prompt path: the decoder attends to the raw neck features.
"""

from __future__ import annotations

import torch
from torch import nn

# Labels of a prompt row (x, y, label).
NEGATIVE, POSITIVE, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT, PAD = 0, 1, 2, 3, 4
NUM_LABELS = 5
# The official code uses this truncated literal rather than math.pi; kept for bit-exactness.
_PI = 3.1415926


class PromptEncoder(nn.Module):
    """(N, K, 3) prompt rows in the padded input frame -> (N, K, dim) tokens; also the dense image PE."""

    def __init__(self, dim: int, image_size: int) -> None:
        super().__init__()
        self.image_size = image_size
        # Gaussian at init, but what is used is whatever the checkpoint holds.
        self.register_buffer("coord_matrix", torch.randn(2, dim // 2))
        self.point_embed = nn.Embedding(NUM_LABELS, dim)

    def encode_coords(self, coords: torch.Tensor) -> torch.Tensor:
        """Fourier features of (..., 2) coordinates normalised to [0, 1]; computed in float32."""
        rad = (coords.float() * (4 * _PI) - 2 * _PI) @ self.coord_matrix.float()
        return torch.cat([rad.sin(), rad.cos()], dim=-1)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """`points` (N, K, 3): x, y in pixels of the 1024-square input frame, then the label."""
        coords = ((points[..., :2].float() + 0.5) / self.image_size).clamp(0, 1)
        labels = points[..., 2].long()
        pe = self.encode_coords(coords).to(self.point_embed.weight.dtype)
        return pe * (labels != PAD).unsqueeze(-1).to(pe.dtype) + self.point_embed(labels)

    def image_pe(self, grid: int) -> torch.Tensor:
        """(grid², dim) positional encoding of the feature-grid cell centres, row-major (cheap: not cached)."""
        centres = (torch.arange(grid, dtype=torch.float32, device=self.coord_matrix.device) + 0.5) / grid
        ys, xs = torch.meshgrid(centres, centres, indexing="ij")
        return self.encode_coords(torch.stack([xs, ys], dim=-1)).flatten(0, 1).to(self.point_embed.weight.dtype)
