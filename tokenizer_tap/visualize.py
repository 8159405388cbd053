"""Overlay images: each region's mask tinted in its own colour, outlined, with a numbered label."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .transforms import mask_bbox

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


def tint(image: np.ndarray, masks: Sequence[np.ndarray], colours: Sequence[tuple[int, int, int]],
         alpha: float = 0.45) -> np.ndarray:
    """Each (H, W) bool mask tinted over the RGB `image` in its colour and outlined; later masks on top.

    Work is confined to each mask's bounding box, so compact regions cost little on large images.
    """
    out = image.astype(np.float32)
    for mask, col in zip(masks, colours):
        box = mask_bbox(mask)
        if box is None:
            continue
        # one pixel of margin, so a pixel on the box's edge still sees its outside neighbour (outline)
        ys = slice(max(box[1] - 1, 0), box[3] + 1)
        xs = slice(max(box[0] - 1, 0), box[2] + 1)
        m, view = mask[ys, xs], out[ys, xs]
        view[m] = view[m] * (1 - alpha) + np.asarray(col, np.float32) * alpha
        view[_edges(m)] = col
    return out.clip(0, 255).astype(np.uint8)


def anchor(mask: np.ndarray) -> tuple[int, int] | None:
    """Where a mask's label goes: its centre of mass (None for an empty mask)."""
    ys, xs = np.nonzero(mask)
    return (int(xs.mean()), int(ys.mean())) if ys.size else None


def annotate(canvas: Image.Image, anchors: Sequence[tuple[int, int] | None], labels: Sequence[str],
             colours: Sequence[tuple[int, int, int]], size: int | None = None) -> Image.Image:
    """Write each label in a box of its colour, centred on its anchor and kept inside the image (in place).

    `size` is the font size in image pixels (default: 1/40 of the shorter side).
    """
    draw = ImageDraw.Draw(canvas)
    size = size or max(12, min(canvas.size) // 40)
    font = ImageFont.load_default(size=size)
    for point, col, text in zip(anchors, colours, labels):
        if point is None or not text:
            continue
        x, y = point
        box = draw.textbbox((x, y), text, font=font)
        x -= (box[2] - box[0]) // 2
        x = max(0, min(x, canvas.width - (box[2] - box[0]) - 4))
        y = max(0, min(y, canvas.height - (box[3] - box[1]) - 4))
        box = draw.textbbox((x + 2, y + 2), text, font=font)
        draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=col)
        draw.text((x + 2, y + 2), text, fill=(0, 0, 0) if sum(col) > 380 else (255, 255, 255), font=font)
    return canvas


def draw_regions(image: np.ndarray, masks: Sequence[np.ndarray], labels: Sequence[str], alpha: float = 0.45,
                 colours: Sequence[tuple[int, int, int]] | None = None) -> Image.Image:
    """Tint each (H, W) bool mask over the RGB `image`, outline it and write its label at its centre."""
    cols = list(colours) if colours is not None else [colour(i) for i in range(len(masks))]
    canvas = Image.fromarray(tint(image, masks, cols, alpha))
    return annotate(canvas, [anchor(m) for m in masks], labels, cols)
