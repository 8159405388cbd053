"""Visual prompts in original image pixels, and their conversion to the model's (K, 3) prompt rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import PromptError
from .modeling import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT, NEGATIVE, PAD, POSITIVE

#: A scribble is reduced to this many points, evenly spaced along the stroke (as the official app does).
SCRIBBLE_POINTS = 9


@dataclass(frozen=True)
class Prompt:
    """One region request: points (label 1 positive, 0 negative), an optional box (x1, y1, x2, y2), or both.

    Coordinates are original-image pixels: x to the right, y down, (0, 0) the top-left corner.
    """

    points: tuple[tuple[float, float], ...] = ()
    labels: tuple[int, ...] = ()
    box: tuple[float, float, float, float] | None = None
    kind: str = field(default="", compare=False)

    @classmethod
    def point(cls, x: float, y: float, negatives: Sequence[tuple[float, float]] = ()) -> Prompt:
        pts = ((x, y), *map(tuple, negatives))
        return cls(pts, (POSITIVE,) + (NEGATIVE,) * len(negatives), kind="point")

    @classmethod
    def from_box(cls, x1: float, y1: float, x2: float, y2: float) -> Prompt:
        return cls(box=(x1, y1, x2, y2), kind="box")

    @classmethod
    def scribble(cls, stroke: Sequence[tuple[float, float]]) -> Prompt:
        """A drawn stroke (ordered points); long strokes are sampled to `SCRIBBLE_POINTS` evenly spaced points."""
        stroke = [tuple(p) for p in stroke]
        if len(stroke) > SCRIBBLE_POINTS:
            idx = np.linspace(0, len(stroke), SCRIBBLE_POINTS + 2)[1:-1].astype(int)
            stroke = [stroke[i] for i in idx]
        return cls(tuple(stroke), (POSITIVE,) * len(stroke), kind="scribble")

    def rows(self, width: int, height: int) -> np.ndarray:
        """Validated (K, 3) float32 rows (x, y, label): box corners first, then points, then a pad row if no box.

        Raises:
            PromptError: nothing to segment, a point outside the image, or a degenerate box.
        """
        if not self.points and self.box is None:
            raise PromptError("a region needs at least one point or a box")
        labels = self.labels or (POSITIVE,) * len(self.points)
        if len(labels) != len(self.points):
            raise PromptError(f"{len(self.points)} points but {len(labels)} labels")
        rows: list[tuple[float, float, float]] = []
        if self.box is not None:
            x1, y1, x2, y2 = _finite(self.box, "box")
            x1, x2 = sorted((x1, x2))
            y1, y2 = sorted((y1, y2))
            if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
                raise PromptError(f"box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside the {width}x{height} image")
            x1, x2 = max(x1, 0.0), min(x2, float(width))
            y1, y2 = max(y1, 0.0), min(y2, float(height))
            if x2 - x1 < 1 or y2 - y1 < 1:
                raise PromptError(f"box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) is empty: drag a larger box")
            rows += [(x1, y1, BOX_TOP_LEFT), (x2, y2, BOX_BOTTOM_RIGHT)]
        for (x, y), label in zip(self.points, labels):
            x, y = _finite((x, y), "point")
            if label not in (POSITIVE, NEGATIVE):
                raise PromptError(f"point label must be 1 (positive) or 0 (negative), got {label}")
            if not (0 <= x <= width and 0 <= y <= height):
                raise PromptError(f"point ({x:g}, {y:g}) is outside the {width}x{height} image")
            rows.append((x, y, label))
        if self.box is None:
            rows.append((0.0, 0.0, PAD))
        return np.asarray(rows, dtype=np.float32)


def _finite(values: Sequence[float], what: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise PromptError(f"{what} coordinates must be numbers, got {values!r}") from None
    if not all(np.isfinite(out)):
        raise PromptError(f"{what} coordinates must be finite, got {values!r}")
    return out
