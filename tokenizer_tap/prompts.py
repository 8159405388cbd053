"""Visual prompts in original image pixels, and their conversion to the model's (K, 3) prompt rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import PromptError
from .modeling import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT, NEGATIVE, PAD, POSITIVE

#: A scribble is reduced to this many points, evenly spaced along the stroke (the official app also uses 9).
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

    def __post_init__(self) -> None:
        """Normalise lists, numpy arrays and numpy scalars to plain tuples; malformed input is a PromptError."""
        points = tuple(_numbers(p, 2, "point") for p in _rows(self.points, "points"))
        labels = tuple(_label(v) for v in _rows(self.labels, "labels"))
        object.__setattr__(self, "points", points)
        object.__setattr__(self, "labels", labels)
        if self.box is not None:
            object.__setattr__(self, "box", _numbers(self.box, 4, "box"))

    @classmethod
    def point(cls, x: float, y: float, negatives: Sequence[tuple[float, float]] = ()) -> Prompt:
        negatives = _rows(negatives, "negatives")
        return cls(((x, y), *negatives), (POSITIVE,) + (NEGATIVE,) * len(negatives), kind="point")

    @classmethod
    def from_box(cls, x1: float, y1: float, x2: float, y2: float) -> Prompt:
        return cls(box=(x1, y1, x2, y2), kind="box")

    @classmethod
    def scribble(cls, stroke: Sequence[tuple[float, float]]) -> Prompt:
        """A drawn stroke: its points in drawing order, reduced to `SCRIBBLE_POINTS` at evenly spaced indices.

        The official app instead samples the drawn pixels in row-major scan order; following the stroke keeps the
        samples spread along what the user drew.
        """
        stroke = list(_rows(stroke, "stroke"))
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
            x1, y1, x2, y2 = self.box
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
            if label not in (POSITIVE, NEGATIVE):
                raise PromptError(f"point label must be 1 (positive) or 0 (negative), got {label}")
            if not (0 <= x <= width and 0 <= y <= height):
                raise PromptError(f"point ({x:g}, {y:g}) is outside the {width}x{height} image")
            rows.append((x, y, label))
        if self.box is None:
            rows.append((0.0, 0.0, PAD))
        return np.asarray(rows, dtype=np.float32)


def _rows(values: object, what: str) -> tuple:
    if values is None:
        return ()
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise PromptError(f"{what} must be a sequence, got {type(values).__name__}")
    return tuple(values)


def _numbers(values: object, n: int, what: str) -> tuple[float, ...]:
    """Exactly `n` finite numbers as floats."""
    try:
        out = tuple(float(v) for v in values)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise PromptError(f"{what} must be {n} numbers, got {values!r}") from None
    if len(out) != n:
        raise PromptError(f"{what} must be {n} numbers, got {len(out)}: {values!r}")
    if not all(np.isfinite(out)):
        raise PromptError(f"{what} coordinates must be finite, got {values!r}")
    return out


def _label(value: object) -> int:
    try:
        label = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise PromptError(f"point label must be 1 (positive) or 0 (negative), got {value!r}") from None
    if label != value:
        raise PromptError(f"point label must be 1 (positive) or 0 (negative), got {value!r}")
    return label
