"""`Region`: the one region type, from TAP's answer to a prompt through a conversation, the store and the page.

TAP fills in what it says about a prompt (mask, IoU, concepts, caption, semantic token); a conversation adds its
`<regionN>` number and the image it belongs to; the store keeps the mask as run-length encoding. The mask is
decoded from that encoding at most once, on first use, and its box and area are kept beside it so a grounding
line or a chip never needs the pixels.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .prompts import Prompt
from .rle import decode as rle_decode
from .rle import encode as rle_encode
from .rle import validate as rle_validate
from .transforms import mask_bbox

#: Coarse positions: where a box's centre lies on a 3 x 3 grid of the image, row by row.
PLACES = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")


def place(box: tuple[int, int, int, int], width: int, height: int) -> str:
    """The coarse position word of an (x1, y1, x2, y2) box on a width x height image ("top left" ... "bottom
    right"): what a grounding line says next to the box and what the scene world answers to "Where is ...?"."""
    x1, y1, x2, y2 = box
    row = min(2, int(3 * (y1 + y2) / 2 / max(height, 1)))
    col = min(2, int(3 * (x1 + x2) / 2 / max(width, 1)))
    return PLACES[row * 3 + col]


@dataclass
class Region:
    """One region of one image. `box` is the mask's tight (x1, y1, x2, y2) in pixels, exclusive end; `area` the
    share of the image it covers; `size` the image's (width, height). `iou` is TAP's raw predicted IoU."""

    concepts: list[tuple[str, float]]
    caption: str = ""
    iou: float = 0.0
    box: tuple[int, int, int, int] | None = None
    area: float = 0.0
    size: tuple[int, int] = (0, 0)
    prompt: Prompt | None = None
    mask_index: int = 0
    sem_token: np.ndarray | None = field(default=None, repr=False, compare=False)  # (256,): an LLM region feature
    number: int = 0  # `<regionN>` (or `<sceneN>`) once in a conversation
    kind: str = "region"  # "scene": an unprompted segment-everything region given as context; "find": an instance
    # `TapPredictor.find` returned for a query (its score is `concept_prob`: the query's concept comes first)
    image: str | None = None  # the image it belongs to: its content key (the stored sha for earlier images)
    removed: bool = False
    encoded: dict[str, Any] | None = field(default=None, repr=False)  # the mask as `rle` (what the store keeps)
    _mask: np.ndarray | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_mask(cls, mask: np.ndarray, concepts: list[tuple[str, float]], caption: str = "",
                  **fields: Any) -> Region:
        """A region whose box, area and size are read off its (H, W) boolean mask."""
        h, w = mask.shape
        box = mask_bbox(mask)
        area = float(mask.mean()) if mask.size else 0.0
        return cls(concepts, caption, box=box, area=area, size=(w, h), _mask=mask, **fields)

    @property
    def mask(self) -> np.ndarray:
        """The (H, W) boolean mask, decoded from `encoded` on first use."""
        if self._mask is None:
            if self.encoded is None:
                raise ValueError(f"region {self.number or ''} has no mask".replace("  ", " "))
            self._mask = rle_decode(self.encoded)
        return self._mask

    @property
    def has_mask(self) -> bool:
        return self._mask is not None or self.encoded is not None

    def rle(self) -> dict[str, Any]:
        """The mask run-length encoded (computed once)."""
        if self.encoded is None:
            self.encoded = rle_encode(self.mask)
        return self.encoded

    @property
    def concept(self) -> str:
        return self.concepts[0][0] if self.concepts else ""

    @property
    def concept_prob(self) -> float:
        return self.concepts[0][1] if self.concepts else 0.0

    @property
    def bbox(self) -> tuple[int, int, int, int] | None:
        return self.box

    @property
    def position(self) -> str:
        """Where the region lies in its image, as a coarse position word (`place`); "" without a box."""
        return "" if self.box is None else place(self.box, *self.size)

    @property
    def ref(self) -> str:
        return f"<{self.kind}{self.number}>"

    def describe(self) -> str:
        """The official demo's line `concept (iou, prob): caption`, with control characters blanked for display."""
        caption = "".join(" " if unicodedata.category(c) == "Cc" else c for c in self.caption)
        return f"{self.concept} ({self.iou:.2f}, {self.concept_prob:.2f}): {caption}"

    def to_dict(self, mask: bool = True) -> dict[str, Any]:
        """Plain JSON (the mask as RLE unless `mask=False`); `from_dict` reads it back."""
        out = {"concept": self.concept, "concepts": [[n, round(p, 4)] for n, p in self.concepts],
               "iou": round(self.iou, 4), "mask_index": self.mask_index, "caption": self.caption,
               "bbox": None if self.box is None else list(self.box), "area": round(self.area, 5),
               "size": list(self.size), "prompt": None if self.prompt is None else self.prompt.to_dict(),
               "number": self.number, "kind": self.kind, "image": self.image, "removed": self.removed}
        if mask and (self.encoded is not None or self._mask is not None):
            out["mask"] = self.rle()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Region:
        """A region from `to_dict`'s JSON (or a stored row in that shape); ValueError names what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("a region must be a JSON object")
        try:
            concepts = [(str(n), float(p)) for n, p in data.get("concepts") or []]
            box = data.get("bbox")
            encoded = data.get("mask")
            if encoded is not None:
                h, w, counts = rle_validate(encoded)
                size, area = (w, h), float(counts[1::2].sum()) / (h * w)
            else:
                size, area = tuple(data.get("size") or (0, 0)), float(data.get("area") or 0.0)
            return cls(concepts, str(data.get("caption") or ""), float(data.get("iou") or 0.0),
                       None if box is None else tuple(int(v) for v in box), area, size,  # type: ignore[arg-type]
                       None if data.get("prompt") is None else Prompt.from_dict(data["prompt"]),
                       int(data.get("mask_index") or 0), number=int(data.get("number") or 0),
                       kind=str(data.get("kind") or "region"), image=data.get("image"),
                       removed=bool(data.get("removed")), encoded=encoded)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not a region: {exc}") from None
