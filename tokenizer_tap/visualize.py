"""Overlay images: each region's mask tinted in its own colour, outlined, with a numbered label."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Colour-blind-friendly palette (Okabe-Ito, then Tableau), cycled.
PALETTE = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
           (204, 121, 167), (78, 121, 167), (242, 142, 43), (225, 87, 89), (118, 183, 178), (89, 161, 79)]


def colour(i: int) -> tuple[int, int, int]:
    return PALETTE[i % len(PALETTE)]


def _edges(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def draw_regions(image: np.ndarray, masks: Sequence[np.ndarray], labels: Sequence[str], alpha: float = 0.45,
                 colours: Sequence[tuple[int, int, int]] | None = None) -> Image.Image:
    """Tint each (H, W) bool mask over the RGB `image`, outline it and write its label at its centre."""
    out = image.astype(np.float32).copy()
    cols = list(colours) if colours is not None else [colour(i) for i in range(len(masks))]
    for mask, col in zip(masks, cols):
        out[mask] = out[mask] * (1 - alpha) + np.asarray(col, np.float32) * alpha
        out[_edges(mask)] = col
    canvas = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    size = max(12, min(canvas.size) // 40)
    font = ImageFont.load_default(size=size)
    for mask, col, text in zip(masks, cols, labels):
        ys, xs = np.nonzero(mask)
        if not ys.size or not text:
            continue
        x, y = int(xs.mean()), int(ys.mean())  # label at the mask's centre of mass
        box = draw.textbbox((x, y), text, font=font)
        x -= (box[2] - box[0]) // 2
        x = max(0, min(x, canvas.width - (box[2] - box[0]) - 4))
        y = max(0, min(y, canvas.height - (box[3] - box[1]) - 4))
        box = draw.textbbox((x + 2, y + 2), text, font=font)
        draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=col)
        draw.text((x + 2, y + 2), text, fill=(0, 0, 0) if sum(col) > 380 else (255, 255, 255), font=font)
    return canvas
