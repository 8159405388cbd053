"""Visual prompts in original image pixels: the one JSON schema and command-line forms every front end parses,
and the conversion to the model's (K, 3) prompt rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import PromptError
from .modeling import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT, NEGATIVE, PAD, POSITIVE

#: A scribble is reduced to this many points, evenly spaced along the stroke (the official app also uses 9).
SCRIBBLE_POINTS = 9

#: The JSON keys of a region prompt: `to_dict`'s full form, and the `point` (+ `negatives`) and `scribble` shorthands.
DICT_KEYS = ("points", "labels", "box", "kind", "point", "negatives", "scribble")
EXAMPLE = ('{"point": [x, y]}, {"box": [x1, y1, x2, y2]}, {"scribble": [[x, y], ...]} or '
           '{"points": [...], "labels": [...]}')


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

    def to_dict(self) -> dict[str, Any]:
        """The JSON form every layer stores and exchanges (history store, HTTP API, LangChain); `from_dict` reads it."""
        return {"points": [list(p) for p in self.points], "labels": list(self.labels),
                "box": None if self.box is None else list(self.box), "kind": self.kind}

    @classmethod
    def from_dict(cls, spec: object) -> Prompt:
        """A prompt from its JSON form: `to_dict`'s keys, or the shorthands `{"point": [x, y]}` (with optional
        `"negatives": [[x, y], ...]`) and `{"scribble": [[x, y], ...]}`, each standing alone (`kind` aside).

        Raises:
            PromptError: naming the mistake (not an object, an unknown key, mixed forms, bad numbers).
        """
        if not isinstance(spec, dict):
            raise PromptError(f"a region prompt is an object such as {EXAMPLE}; got {type(spec).__name__}")
        if unknown := sorted(set(spec) - set(DICT_KEYS)):
            raise PromptError(f"unknown region prompt key(s) {', '.join(map(repr, unknown))}; the keys are "
                              f"{', '.join(DICT_KEYS)}")
        kind = spec.get("kind") or ""
        if not isinstance(kind, str):
            raise PromptError(f"a region prompt's kind must be text, got {kind!r}")
        given = {k for k in spec if k != "kind" and spec[k] is not None}
        if "negatives" in given and "point" not in given:
            raise PromptError("'negatives' goes only with a 'point'")
        for shorthand, allowed in (("point", {"point", "negatives"}), ("scribble", {"scribble"})):
            if shorthand in given and given - allowed:
                raise PromptError(f"a '{shorthand}' region stands alone: drop {', '.join(sorted(given - allowed))}")
        if "point" in given:
            x, y = _numbers(spec["point"], 2, "point")
            return cls.point(x, y, spec.get("negatives") or ())
        if "scribble" in given:
            return cls.scribble(spec["scribble"])
        if not given & {"points", "box"}:
            raise PromptError(f"a region prompt needs a point or a box, such as {EXAMPLE}")
        points = _rows(spec.get("points"), "points")
        labels = spec.get("labels") or ()  # none given: every point is positive (see `rows`)
        box = spec.get("box")
        return cls(points, labels, box, kind=kind or ("box" if box is not None and not points else "point"))

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


def parse_point(text: str) -> tuple[float, float]:
    """'X,Y' (command lines, chat commands) -> (x, y)."""
    return _text_numbers(text, 2, "a point is X,Y")  # type: ignore[return-value]


def parse_box(text: str) -> tuple[float, float, float, float]:
    """'X1,Y1,X2,Y2' -> the box."""
    return _text_numbers(text, 4, "a box is X1,Y1,X2,Y2")  # type: ignore[return-value]


def parse_stroke(text: str) -> list[tuple[float, float]]:
    """'X,Y X,Y ...' (space-separated points) -> the stroke of a scribble."""
    stroke = [parse_point(p) for p in text.split()]
    if not stroke:
        raise PromptError("a scribble is 'X,Y X,Y ...', got nothing")
    return stroke


def _text_numbers(text: str, n: int, form: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        values = ()
    if len(values) != n or not all(np.isfinite(values)):
        raise PromptError(f"{form} ({n} comma-separated numbers), got {text!r}")
    return values
