"""What a drawn scene means: its regions (exact visible masks, parts nested in their objects), the relations between
objects, and a grounded caption for each region. `render` turns a seed into an annotated `Scene`.

As in SA-1B, objects and their parts are separate masks (house / wall, roof, door, window; tree / trunk, leaves;
car / wheel, window), so a point prompt is ambiguous, and stuff (sky, grass, hills, roads) has masks too. Masks
under `MIN_AREA` pixels (hidden or tiny) are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tokenizer_tap.region import place

from .draw import draw_scene

SPLITS = ("train", "eval")
EVAL_BASE = 1_000_000  # eval image ids start above every train id
MIN_AREA = 20  # masks with fewer visible pixels are dropped (SA-1B has no specks either)
MIN_OCCLUSION = 10  # pixels of B that A must hide for "A in front of B"

CONCEPTS = (
    "sky", "grass", "hill", "mountain", "snow", "lake", "road", "path",
    "house", "wall", "roof", "door", "window", "chimney",
    "tree", "trunk", "leaves", "bush", "flower", "fence", "stone",
    "car", "wheel", "boat", "sail", "person", "head",
    "sun", "cloud", "bird", "balloon",
    "circle", "square", "triangle", "star", "diamond", "ring", "crescent",
)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """x1, y1, x2, y2 (exclusive) of a non-empty mask."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


@dataclass
class Annotation:
    """One annotation: a visible mask and what the world knows about it."""

    id: int
    concept: str
    colour: str | None
    kind: str  # "stuff" | "object" | "part"
    mask: np.ndarray
    part_of: int | None = None
    parts: list[int] = field(default_factory=list)
    relations: list[tuple[str, int]] = field(default_factory=list)  # (relation, other region id), objects only
    caption: str = ""

    def __post_init__(self) -> None:
        self.box = mask_box(self.mask)  # x1, y1, x2, y2 (exclusive)
        self.area = int(np.count_nonzero(self.mask))

    @property
    def bbox(self) -> list[int]:
        """SA-1B / COCO [x, y, w, h]."""
        x1, y1, x2, y2 = self.box
        return [x1, y1, x2 - x1, y2 - y1]

    @property
    def position(self) -> str:
        """Where the box centre lies on a 3 x 3 grid of the image ("top left" ... "bottom right")."""
        h, w = self.mask.shape
        return place(self.box, w, h)

    def point(self) -> list[float]:
        """The mask pixel nearest to the mask's centroid (inside it, also for rings and crescents)."""
        x1, y1, x2, y2 = self.box
        ys, xs = np.nonzero(self.mask[y1:y2, x1:x2])
        i = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
        return [float(xs[i] + x1), float(ys[i] + y1)]


@dataclass
class Scene:
    """One annotated image: what `render` returns and the writers save."""

    image_id: int
    image: np.ndarray  # (H, W, 3) uint8 as drawn (the file is its JPEG)
    regions: list[Annotation]


def image_id(split: str, index: int) -> int:
    """The SA-1B image id: train 1..N, eval above `EVAL_BASE`, so the two splits never share ids."""
    return index + 1 + (EVAL_BASE if split == "eval" else 0)


def hides(a: Annotation, b_full: np.ndarray, b_full_box: tuple[int, int, int, int]) -> bool:
    """Whether a covers at least `MIN_OCCLUSION` pixels of what b would show alone ("a in front of b")."""
    x1, y1 = max(a.box[0], b_full_box[0]), max(a.box[1], b_full_box[1])
    x2, y2 = min(a.box[2], b_full_box[2]), min(a.box[3], b_full_box[3])
    if x2 <= x1 or y2 <= y1:
        return False
    return int(np.count_nonzero(a.mask[y1:y2, x1:x2] & b_full[y1:y2, x1:x2])) >= MIN_OCCLUSION


def relations(a: Annotation, b: Annotation, a_hides_b: bool, b_hides_a: bool) -> list[str]:
    """What holds of a with respect to b: strict box separation for left of / right of / above / below, and
    occlusion for in front of / behind."""
    (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = a.box, b.box
    return [name for name, holds in (("left of", ax2 <= bx1), ("right of", ax1 >= bx2), ("above", ay2 <= by1),
                                     ("below", ay1 >= by2), ("in front of", a_hides_b), ("behind", b_hides_a))
            if holds]


def article(phrase: str) -> str:
    """The phrase with its indefinite article, for captions."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def noun(r: Annotation, colour: bool = True, size: str = "") -> str:
    """How a caption names a region: size, colour and concept (a person is named by the shirt's colour)."""
    if r.concept == "person":
        return " ".join(w for w in (size, "person") if w) + (f" in {r.colour}" if colour and r.colour else "")
    return " ".join(w for w in (size, r.colour if colour else "", r.concept) if w)


def describe(r: Annotation, by_id: dict[int, Annotation], rng: np.random.Generator) -> str:
    """A short grounded caption from a small grammar: colour + concept, a size word when the concept repeats, and
    often a true relation to another object; parts name their object, stuff its colour."""
    if r.kind == "part" and r.part_of is not None:
        parent = by_id[r.part_of]
        own = f"{r.colour} {r.concept}" if r.colour else r.concept
        return f"the {own} of {article(noun(parent, colour=parent.colour != r.colour and rng.random() < 0.6))}"
    if r.kind == "stuff":
        if r.concept == "sky":
            return f"the {r.colour} sky"
        return f"{r.colour} grass" if r.concept == "grass" else article(noun(r))
    same = [o.area for o in by_id.values() if o.kind == "object" and o.concept == r.concept]
    size = "" if len(same) < 2 else "big" if r.area == max(same) else "small" if r.area == min(same) else ""
    text = article(noun(r, size=size))
    if r.relations and rng.random() < 0.7:
        rel, other = r.relations[int(rng.integers(len(r.relations)))]
        text += f" {rel} {article(noun(by_id[other], colour=rng.random() < 0.5))}"
    return text


def render(seed: int, split: str, index: int, size: int = 256) -> Scene:
    """Image `index` of `split`: drawn, then annotated from its label map (a function of the arguments alone)."""
    stream = [seed, SPLITS.index(split), index]
    rng = np.random.default_rng(stream)
    canvas, things = draw_scene(rng, size)
    grain = rng.normal(0.0, 2.0, (size, size, 3))  # a little sensor noise, so flat colours are not exact
    image = np.clip(np.asarray(canvas.image, float) + grain, 0, 255).round().astype(np.uint8)
    labels = np.asarray(canvas.labels)
    iid = image_id(split, index)
    regions: list[Annotation] = []
    made: dict[int, Annotation] = {}  # id(thing) -> its region
    for thing in things:
        lut = np.zeros(256, bool)
        lut[thing.pieces] = True
        mask = lut[labels]
        parent = made.get(id(thing.parent)) if thing.parent is not None else None
        if np.count_nonzero(mask) < MIN_AREA or (parent is not None and np.array_equal(mask, parent.mask)):
            continue  # hidden, a speck, or a part that is all that shows of its object
        if thing.parent is not None and parent is None:
            continue  # the object itself was dropped
        region = Annotation(iid * 1000 + len(regions) + 1, thing.concept, thing.colour, thing.kind, mask,
                        parent.id if parent is not None else None)
        if parent is not None:
            parent.parts.append(region.id)
        made[id(thing)] = region
        regions.append(region)
    objects = [(t, made[id(t)]) for t in things if t.kind == "object" and id(t) in made]
    alone = [canvas.alone(t.pieces) for t, _ in objects]
    boxes = [mask_box(m) for m in alone]
    covers = [[i != j and hides(a, alone[j], boxes[j]) for j in range(len(objects))] for i, (_, a) in
              enumerate(objects)]
    for i, (_, a) in enumerate(objects):
        for j, (_, b) in enumerate(objects):
            if i != j:
                a.relations += [(rel, b.id) for rel in relations(a, b, covers[i][j], covers[j][i])]
    words = np.random.default_rng(stream + [1])
    by_id = {r.id: r for r in regions}
    for r in regions:
        r.caption = describe(r, by_id, words)
    return Scene(iid, image, regions)
