"""Resize, pad and coordinate maths between original pixels and the model's square input frame, and mask boxes.

Reproduces the official preprocessing exactly (PIL antialiased bilinear resize of uint8, integer pad colour at the
bottom-right) because the features, and so every downstream number, depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# The official pad fills a uint8 canvas with the float BGR mean, which truncates it.
PAD_BGR = (103, 116, 123)


@dataclass(frozen=True)
class ResizeInfo:
    """How an (H, W) image maps into the padded `size` x `size` input."""

    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    scale: float  # the Python float used for the output size
    size: int

    @classmethod
    def for_image(cls, height: int, width: int, size: int = 1024) -> ResizeInfo:
        # Official rule: scale the short side to `size` unless that makes the long side exceed it.
        scale = size / min(height, width)
        if round(scale * max(height, width)) > size:
            scale = size / max(height, width)
        # int(x + 0.5) rounding as upstream; clamp to 1 px so extreme aspect ratios do not vanish.
        resized = (max(1, min(size, int(height * scale + 0.5))), max(1, min(size, int(width * scale + 0.5))))
        return cls((height, width), resized, scale, size)

    @property
    def scale32(self) -> np.float32:
        """Scale as float32: prompt coordinates are multiplied by this, in float32, as upstream."""
        return np.float32(self.scale)


def resize_and_pad(image: np.ndarray, info: ResizeInfo) -> np.ndarray:
    """(H, W, 3) uint8 BGR -> (size, size, 3) uint8: PIL bilinear resize, pad bottom-right with `PAD_BGR`."""
    h, w = info.resized_hw
    if (h, w) != tuple(image.shape[:2]):
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    canvas = np.empty((info.size, info.size, 3), dtype=np.uint8)
    canvas[:] = PAD_BGR
    canvas[:h, :w] = image
    return canvas


def preprocess(rgb: np.ndarray, size: int = 1024) -> tuple[np.ndarray, ResizeInfo]:
    """(H, W, 3) uint8 RGB -> the model's (size, size, 3) uint8 BGR input and how it maps to the original.

    The one place where images become encoder inputs (predictor, fine-tuning, parity, benchmarks): the model was
    trained on BGR, resized with PIL's antialiased bilinear filter and padded bottom-right."""
    info = ResizeInfo.for_image(*rgb.shape[:2], size=size)
    return resize_and_pad(np.ascontiguousarray(rgb[..., ::-1]), info), info


def upscale_masks(logits: torch.Tensor, info: ResizeInfo) -> torch.Tensor:
    """(N, h, w) low-res mask logits -> (N, H, W) boolean masks at the original size.

    Two bilinear stages as upstream: to the padded input size, crop the resized region, then to (H, W).
    Processed in chunks to bound memory for large images and many prompts.
    """
    chunk = max(1, min(8, 50_000_000 // (info.original_hw[0] * info.original_hw[1])))
    out = torch.empty((logits.shape[0], *info.original_hw), dtype=torch.bool, device=logits.device)
    rh, rw = info.resized_hw
    for i in range(0, logits.shape[0], chunk):
        x = F.interpolate(logits[i:i + chunk, None], (info.size, info.size), mode="bilinear", align_corners=False)
        x = x[..., :rh, :rw]
        x = F.interpolate(x, info.original_hw, mode="bilinear", align_corners=False)
        out[i:i + chunk] = x[:, 0] > 0
    return out


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight (x1, y1, x2, y2) box of a boolean mask, exclusive end; None when the mask is empty.

    The one definition every layer uses (regions, overlays, grounding lines, the app's region list)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
