"""The dense-prompt pass: a grid of point prompts over the whole image, decoded once and kept per image.

`segment_everything` and `find` read the same pass, so after one of them the other - and every later `find` query
on that image - costs no decoder work for the grid: only ranking, merging duplicates, and the kept regions' masks
and captions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .prompts import Prompt
from .transforms import ResizeInfo


def grid_prompts(width: int, height: int, points_per_side: int) -> list[Prompt]:
    """An n x n grid of point prompts at the cell centres, row by row, in original pixels."""
    centres = (np.arange(points_per_side) + 0.5) / points_per_side
    return [Prompt.point(float(x * width), float(y * height)) for y in centres for x in centres]


@dataclass
class DenseGrid:
    """The decoder's routed outputs for every grid prompt (`TapPredictor.decode_rows`), with what every query of
    the pass reads again: binary masks at the decoder's resolution, cropped to the image (to rank and merge), the
    share of the image each covers, and the concept probabilities (None without a vocabulary)."""

    prompts: list[Prompt]
    out: dict[str, torch.Tensor]
    low: torch.Tensor  # (N, h * w) bool
    area: torch.Tensor  # (N,) float32
    probs: torch.Tensor | None  # (N, K) float32

    @classmethod
    def build(cls, prompts: list[Prompt], out: dict[str, torch.Tensor], probs: torch.Tensor | None,
              info: ResizeInfo) -> DenseGrid:
        """Crop the low-res masks to the image area (the padding holds nothing) and binarise them."""
        logits = out["mask_logits"]
        rh, rw = info.resized_hw
        lh = max(1, round(rh * logits.shape[-2] / info.size))
        lw = max(1, round(rw * logits.shape[-1] / info.size))
        low = (logits[:, :lh, :lw] > 0).flatten(1)
        return cls(prompts, out, low, low.float().mean(1), probs)

    @property
    def nbytes(self) -> int:
        """Memory held, for the cache's bound (the mask logits dominate: 64 MiB for 256 prompts at 256x256)."""
        tensors = [*self.out.values(), self.low, self.area] + ([self.probs] if self.probs is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


def dedupe(low: torch.Tensor, order: Sequence[int], overlap: float, limit: int, *, smaller: bool = False) -> list[int]:
    """Greedy non-maximum suppression of (N, P) binary masks: walk `order` (best first) and keep a mask unless it
    overlaps one already kept by more than `overlap`, until `limit` are kept.

    Overlap is IoU, or with `smaller` the intersection over the smaller mask: then a fragment of a kept instance
    (one grid point's view of a car's window, classified car) merges into it as well.
    """
    kept = torch.empty((min(limit, len(order)), low.shape[1]), device=low.device)  # filled in order; read as views
    sizes = torch.empty(kept.shape[0], device=low.device)
    keep: list[int] = []
    for i in order:
        n = len(keep)
        if n >= limit:
            break
        mask = low[i].float()
        size = mask.sum()
        if n:
            inter = kept[:n] @ mask
            denom = torch.minimum(sizes[:n], size) if smaller else sizes[:n] + size - inter
            if bool((inter / denom.clamp(min=1) > overlap).any()):
                continue
        kept[n], sizes[n] = mask, size
        keep.append(i)
    return keep
