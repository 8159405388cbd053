"""The region grounding line: how a region TAP resolved is written into a user turn.

One line per region, stable because fine-tuning data and benchmarks are rendered with it:

    <region2>: dog (0.91), box [112,340,498,880] on a 0-999 grid, 14% of image, "a brown dog lying on grass"

- `<regionN>`: the region's id, fixed for the whole conversation (numbered from 1 in the order added).
  `<sceneN>` marks scene context instead: TAP's top segment-everything regions, given when a turn has no regions
  (numbered by rank, per turn; the user cannot refer to them).
- concept and its probability (2 decimals) from TAP's concept projector.
- box: the mask's tight box (x1, y1, x2, y2) scaled to a 0-999 grid over width and height, so the line does not
  depend on the image resolution.
- the mask's share of the image, in whole percent ("<1%" below one percent).
- TAP's caption in double quotes (control characters and double quotes removed, at most `MAX_CAPTION` chars).
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

GRID = 1000  # coordinates are written as integers 0..GRID-1
MAX_CAPTION = 120
LINE_RE = re.compile(
    r'^<(?P<kind>region|scene)(?P<number>\d+)>: (?P<concept>.*) \((?P<prob>\d\.\d\d)\), '
    r'box \[(?P<box>\d+,\d+,\d+,\d+)\] '
    r'on a 0-999 grid, (?P<area><1|\d+)% of image, "(?P<caption>[^"]*)"$')


@dataclass(frozen=True)
class GroundedRegion:
    """What the chat model is told about one region."""

    number: int
    concept: str
    prob: float
    box: tuple[int, int, int, int]  # on the 0-999 grid
    area_percent: float
    caption: str
    kind: str = "region"  # "scene": an unprompted segment-everything region given as scene context

    @classmethod
    def from_pixels(cls, number: int, concept: str, prob: float, bbox: tuple[float, float, float, float] | None,
                    area: float, caption: str, width: int, height: int, kind: str = "region") -> GroundedRegion:
        """Build from a TAP region: `bbox` in pixels (exclusive end) and `area` as a fraction of the image."""
        if bbox is None:
            box = (0, 0, 0, 0)
        else:
            x1, y1, x2, y2 = bbox  # exclusive end: the last covered grid cell is just below x2
            gx1, gy1 = _grid(x1, width), _grid(y1, height)
            box = (gx1, gy1, max(gx1, _grid(x2, width, end=True)), max(gy1, _grid(y2, height, end=True)))
        return cls(number, concept, prob, box, 100.0 * area, caption, kind)

    @property
    def tag(self) -> str:
        return f"<{self.kind}{self.number}>"

    def line(self) -> str:
        area = "<1" if self.area_percent < 1 else str(round(self.area_percent))
        return (f"{self.tag}: {_clean(self.concept, 60) or 'object'} ({self.prob:.2f}), "
                f"box [{','.join(map(str, self.box))}] on a 0-999 grid, {area}% of image, "
                f'"{_clean(self.caption, MAX_CAPTION)}"')


def _grid(value: float, size: int, end: bool = False) -> int:
    cell = value * GRID / max(size, 1)
    return min(GRID - 1, max(0, math.ceil(cell) - 1 if end else int(cell)))


def _clean(text: str, limit: int) -> str:
    """One printable line without double quotes, at most `limit` characters."""
    text = "".join(" " if unicodedata.category(c)[0] == "C" else c for c in text).replace('"', "'")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def parse_line(line: str) -> GroundedRegion:
    """Inverse of `GroundedRegion.line` (area "<1" reads back as 0.5); raises ValueError on any other text."""
    m = LINE_RE.match(line)
    if not m:
        raise ValueError(f"not a region line: {line!r}")
    area = 0.5 if m["area"] == "<1" else float(m["area"])
    box = tuple(int(v) for v in m["box"].split(","))
    return GroundedRegion(int(m["number"]), m["concept"], float(m["prob"]), box, area, m["caption"],  # type: ignore[arg-type]
                          m["kind"])


def grounding_block(regions: list[GroundedRegion]) -> str:
    """The lines for the regions a turn mentions or adds, one per line: user regions by number, then scene ones."""
    return "\n".join(r.line() for r in sorted(regions, key=lambda r: (r.kind != "region", r.number)))
