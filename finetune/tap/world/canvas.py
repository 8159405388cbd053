"""The canvas of the synthetic world: an image and its label map drawn with the same calls, so every mask is exact.

Also the small vocabulary every drawing uses: the named palette (a colour name covers a range of RGB, as in photos),
the pieces-to-object grouping (`Thing`, `whole`) and two geometry helpers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (205, 40, 40), "orange": (240, 135, 30), "yellow": (245, 205, 45), "green": (55, 150, 60),
    "blue": (45, 95, 205), "purple": (130, 60, 170), "pink": (240, 135, 180), "brown": (115, 72, 38),
    "white": (242, 242, 236), "grey": (135, 135, 135), "black": (30, 30, 30),
}
BRIGHT = ("red", "orange", "yellow", "green", "blue", "purple", "pink")


class Canvas:
    """The image and its label map, drawn with the same calls: label i marks the pixels piece i shows."""

    def __init__(self, background: np.ndarray) -> None:
        self.image = Image.fromarray(background)
        self.labels = Image.new("L", self.image.size, 0)  # piece 0: the background (the sky)
        self._draw, self._ldraw = ImageDraw.Draw(self.image), ImageDraw.Draw(self.labels)
        self.ops: list[tuple[str, Any, int]] = [("background", None, 0)]

    @staticmethod
    def _paint(draw: ImageDraw.ImageDraw, op: str, xy: Any, value: Any, outline: int) -> None:
        if outline:
            getattr(draw, op)(xy, outline=value, width=outline)
        elif op == "line":
            draw.line(xy, fill=value, width=2)
        else:
            getattr(draw, op)(xy, fill=value)

    def add(self, op: str, xy: Any, rgb: tuple[int, int, int], outline: int = 0) -> int:
        """Draw one piece (`op` is an ImageDraw method; `outline` > 0 draws only an outline that wide)."""
        index = len(self.ops)
        if index > 255:
            raise RuntimeError("too many pieces in one scene")  # scenes stay below ~130, and ids below 1000
        self._paint(self._draw, op, xy, rgb, outline)
        self._paint(self._ldraw, op, xy, index, outline)
        self.ops.append((op, xy, outline))
        return index

    def alone(self, pieces: Sequence[int]) -> np.ndarray:
        """The pixels of `pieces` as if nothing else were drawn (what an object would cover unoccluded)."""
        layer = Image.new("L", self.image.size, 0)
        draw = ImageDraw.Draw(layer)
        for p in pieces:
            op, xy, outline = self.ops[p]
            if op == "background":
                return np.ones(self.image.size[::-1], bool)
            self._paint(draw, op, xy, 1, outline)
        return np.asarray(layer, bool)


@dataclass
class Thing:
    """One drawn object, part or stuff region: its pieces, and what its annotation says."""

    concept: str
    colour: str | None
    pieces: list[int]
    kind: str  # "stuff" | "object" | "part"
    parent: Thing | None = None


def rgb(colour: str, rng: np.random.Generator, shade: float = 1.0) -> tuple[int, int, int]:
    """The palette colour, shaded and jittered a little per instance (a name covers a range, as in photos)."""
    base = np.array(PALETTE[colour], float) * shade + rng.uniform(-12, 12) + rng.uniform(-6, 6, 3)
    r, g, b = np.clip(base, 0, 255).round().astype(int).tolist()
    return r, g, b


def pick(rng: np.random.Generator, options: Sequence[str], avoid: Sequence[str | None] = ()) -> str:
    """A random choice that avoids the given colours where it can (a red car on red grass would not show)."""
    allowed = [o for o in options if o not in avoid] or list(options)
    return allowed[int(rng.integers(len(allowed)))]


def ellipse(cx: float, cy: float, rx: float, ry: float) -> list[float]:
    """The xyxy box ImageDraw wants for an ellipse of centre (cx, cy) and radii rx, ry."""
    return [cx - rx, cy - ry, cx + rx, cy + ry]


def rotated(points: list[tuple[float, float]], cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    """`points` turned by `angle` radians about (cx, cy), so shapes are not all axis-aligned."""
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def whole(concept: str, colour: str | None, parts: list[Thing], own: Sequence[int] = (),
          kind: str = "object") -> list[Thing]:
    """An object made of `parts` and of pieces `own` that are no part of their own, followed by those parts."""
    obj = Thing(concept, colour, list(own) + [p for t in parts for p in t.pieces], kind)
    for t in parts:
        t.parent = obj
    return [obj, *parts]
