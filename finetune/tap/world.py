"""The synthetic scene world (`python -m finetune tap-world OUT`): the data that proves TAP pre-training learns.

Scenes like examples/scene.jpg (sky, sun, clouds, hills, grass, houses, trees, cars, people, boats, coloured
shapes, ...) are drawn in painter's order onto the image and, with the same calls, onto a label map, so every mask
is exact: the visible pixels of its object. Masks under `MIN_AREA` pixels (hidden or tiny) are dropped. As in
SA-1B, objects and their parts are separate masks (house / wall, roof, door, window; tree / trunk, leaves; car /
wheel, window), so a point prompt is ambiguous, and stuff (sky, grass, hills, roads) has masks too.

Output, every byte a function of the arguments:
- `train/` and `eval/`: SA-1B layout, `sa_<id>.jpg` + `sa_<id>.json` (what `records.open_sa1b` reads);
- `priors/`: concept priors in the `tap-priors` format, by the same writer. The teacher is simulated: the concepts
  have fixed random orthonormal vectors, and a mask's V_C is its concept's vector plus Gaussian noise. As with CLIP
  at width 1024, the cosine to the own concept is small (~0.14 at the default noise) and the logit scale 100 turns
  its few-point lead into a target that is confident (top-1 right ~98 % of the time) but not one-hot;
- `concepts.txt`: the vocabulary, one name a line (also usable as `tap-priors --concepts`);
- `captions_<split>.json`: one short grounded caption per mask ("a red car left of a white house", "the brown door
  of a house") in Visual Genome's official `region_descriptions.json` format. `region_id` is the SA-1B annotation
  id and `id` the SA-1B image id, so captions and priors share keys (`mask_key`). VG looks images up as
  `<image_id>.jpg`, so each split folder also holds that name, hard-linked to `sa_<image_id>.jpg`;
- `world.json`: per image, every mask's concept, colour, box, position word, parent / parts and relations to the
  other objects (left of, above, in front of, ...): the answers to colour / count / position / relation questions.

Image ids: train 1..N, eval from `EVAL_BASE` + 1; each image is drawn from its own seed (seed, split, index), so the
eval images do not depend on --train. Annotation ids are image_id * 1000 + k, unique across the world.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .priors import PriorsWriter, mask_key
from .records import encode_rle

FORMAT = "tapchat-world/1"
SPLITS = ("train", "eval")
EVAL_BASE = 1_000_000  # eval image ids start above every train id
MIN_AREA = 20  # masks with fewer visible pixels are dropped (SA-1B has no specks either)
MIN_OCCLUSION = 10  # pixels of B that A must hide for "A in front of B"
LOGIT_SCALE = 100.0  # CLIP's: the concept matrix is normalised text embeddings x this
CHUNK = 500  # images per priors shard, so memory stays flat for large worlds

CONCEPTS = (
    "sky", "grass", "hill", "mountain", "snow", "lake", "road", "path",
    "house", "wall", "roof", "door", "window", "chimney",
    "tree", "trunk", "leaves", "bush", "flower", "fence", "stone",
    "car", "wheel", "boat", "sail", "person", "head",
    "sun", "cloud", "bird", "balloon",
    "circle", "square", "triangle", "star", "diamond", "ring", "crescent",
)
SHAPES = ("circle", "square", "triangle", "star", "diamond", "ring", "crescent")

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (205, 40, 40), "orange": (240, 135, 30), "yellow": (245, 205, 45), "green": (55, 150, 60),
    "blue": (45, 95, 205), "purple": (130, 60, 170), "pink": (240, 135, 180), "brown": (115, 72, 38),
    "white": (242, 242, 236), "grey": (135, 135, 135), "black": (30, 30, 30),
}
BRIGHT = ("red", "orange", "yellow", "green", "blue", "purple", "pink")
SKIES = {"blue": ((95, 155, 230), (190, 220, 245)), "grey": ((140, 145, 155), (200, 202, 208)),
         "orange": ((235, 130, 70), (250, 205, 140))}
PLACES = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")


# ------------------------------------------------------------------------------------------------------ drawing
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
    allowed = [o for o in options if o not in avoid] or list(options)
    return allowed[int(rng.integers(len(allowed)))]


def ellipse(cx: float, cy: float, rx: float, ry: float) -> list[float]:
    return [cx - rx, cy - ry, cx + rx, cy + ry]


def rotated(points: list[tuple[float, float]], cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def whole(concept: str, colour: str | None, parts: list[Thing], own: Sequence[int] = (),
          kind: str = "object") -> list[Thing]:
    """An object made of `parts` and of pieces `own` that are no part of their own, followed by those parts."""
    obj = Thing(concept, colour, list(own) + [p for t in parts for p in t.pieces], kind)
    for t in parts:
        t.parent = obj
    return [obj, *parts]


Builder = Callable[[Canvas, np.random.Generator, float, float, float, str], list[Thing]]


def house(c: Canvas, rng: np.random.Generator, x: float, base: float, k: float, ground: str) -> list[Thing]:
    w = 80 * k * rng.uniform(0.85, 1.15)
    wall_h, roof_h, over = w * rng.uniform(0.55, 0.7), w * rng.uniform(0.35, 0.5), w * 0.08
    wall_c = pick(rng, ("red", "orange", "yellow", "white", "blue", "pink", "grey"))
    roof_c = pick(rng, ("red", "brown", "grey", "black"), [wall_c])
    x1, x2, y1 = x - w / 2, x + w / 2, base - wall_h
    parts = []
    if rng.random() < 0.5:  # drawn before the roof, which hides its foot
        cx = x + w * rng.uniform(0.12, 0.3) * (1 if rng.random() < 0.5 else -1)
        box = [cx - w * 0.06, y1 - roof_h * 0.9, cx + w * 0.06, y1 - roof_h * 0.3]
        parts.append(Thing("chimney", roof_c, [c.add("rectangle", box, rgb(roof_c, rng, 0.8))], "part"))
    parts.append(Thing("wall", wall_c, [c.add("rectangle", [x1, y1, x2, base], rgb(wall_c, rng))], "part"))
    roof = [(x1 - over, y1), (x, y1 - roof_h), (x2 + over, y1)]
    parts.append(Thing("roof", roof_c, [c.add("polygon", roof, rgb(roof_c, rng))], "part"))
    door_c = pick(rng, ("brown", "red", "blue", "green", "black"), [wall_c])
    dw, dh = w * 0.2, wall_h * rng.uniform(0.5, 0.65)
    slot = int(rng.integers(3))  # the door on the left, in the middle or on the right; windows elsewhere
    centres = (x1 + w * 0.22, x, x2 - w * 0.22)
    dx = centres[slot]
    door = [dx - dw / 2, base - dh, dx + dw / 2, base]
    parts.append(Thing("door", door_c, [c.add("rectangle", door, rgb(door_c, rng))], "part"))
    win_c = pick(rng, ("blue", "white", "yellow"), [wall_c])
    ws, wy = w * rng.uniform(0.15, 0.2), y1 + wall_h * 0.3
    for j, wx in enumerate(centres):
        if j != slot and (rng.random() < 0.8 or j == (slot + 1) % 3):
            box = [wx - ws / 2, wy - ws / 2, wx + ws / 2, wy + ws / 2]
            parts.append(Thing("window", win_c, [c.add("rectangle", box, rgb(win_c, rng, 1.05))], "part"))
    return whole("house", wall_c, parts)


def tree(c: Canvas, rng: np.random.Generator, x: float, base: float, k: float, ground: str) -> list[Thing]:
    leaves_c = "green" if rng.random() < 0.7 else pick(rng, ("orange", "red", "yellow"))
    trunk_c = "brown" if rng.random() < 0.85 else "grey"
    h, tw = 80 * k * rng.uniform(0.8, 1.2), 7 * k * rng.uniform(0.8, 1.3)
    if rng.random() < 0.3:  # a pine: a short trunk under stacked triangles
        trunk = c.add("rectangle", [x - tw / 2, base - h * 0.25, x + tw / 2, base], rgb(trunk_c, rng))
        leaves_c, pieces, half = "green", [], h * 0.3
        for j in range(3):
            top, bottom, side = base - h * (0.55 + 0.15 * j) - half * 0.6, base - h * (0.15 + 0.2 * j), 1 - 0.2 * j
            tri = [(x - half * side, bottom), (x, top), (x + half * side, bottom)]
            pieces.append(c.add("polygon", tri, rgb("green", rng, 0.7)))
    else:
        r = h * rng.uniform(0.25, 0.32)
        trunk = c.add("rectangle", [x - tw / 2, base - h + r, x + tw / 2, base], rgb(trunk_c, rng))
        crown = ellipse(x, base - h + r, r, r * rng.uniform(0.9, 1.1))
        pieces = [c.add("ellipse", crown, rgb(leaves_c, rng, 0.75 if leaves_c == "green" else 1.0))]
    return whole("tree", leaves_c, [Thing("trunk", trunk_c, [trunk], "part"),
                                    Thing("leaves", leaves_c, pieces, "part")])


def bush(c: Canvas, rng: np.random.Generator, x: float, base: float, k: float, ground: str) -> list[Thing]:
    w = 36 * k * rng.uniform(0.8, 1.2)
    col = rgb("green", rng, 0.65)
    pieces = [c.add("ellipse", ellipse(x + dx * w, base - w * 0.3, w * 0.32, w * 0.3), col) for dx in (-0.22, 0.22)]
    pieces.append(c.add("ellipse", ellipse(x, base - w * 0.42, w * 0.3, w * 0.32), col))
    return [Thing("bush", "green", pieces, "object")]


def car(c: Canvas, rng: np.random.Generator, x: float, base: float, k: float, ground: str) -> list[Thing]:
    w = 58 * k * rng.uniform(0.85, 1.15)
    body_c = pick(rng, ("red", "blue", "yellow", "white", "black", "orange", "green", "purple"), [ground])
    r = w * 0.11
    face = 1 if rng.random() < 0.5 else -1  # which way the cabin leans
    col = rgb(body_c, rng)
    body = [c.add("rectangle", [x - w / 2, base - r - w * 0.22, x + w / 2, base - r * 0.6], col)]
    cab_bottom, cab_top = base - r - w * 0.22, base - r - w * 0.42
    cab = [(x - w * 0.3, cab_bottom), (x - w * 0.18, cab_top), (x + w * 0.18, cab_top), (x + w * 0.3, cab_bottom)]
    body.append(c.add("polygon", [(x + (px - x) * face, py) for px, py in cab], col))
    win_c = pick(rng, ("blue", "white", "grey"), [body_c])
    glass = [(x - w * 0.2, cab_bottom - 1), (x - w * 0.13, cab_top + w * 0.04), (x + w * 0.13, cab_top + w * 0.04),
             (x + w * 0.2, cab_bottom - 1)]
    window = Thing("window", win_c, [c.add("polygon", glass, rgb(win_c, rng, 1.1))], "part")
    wheel_c = "black" if body_c != "black" else "grey"
    wheels = [Thing("wheel", wheel_c, [c.add("ellipse", ellipse(x + dx * w, base - r, r, r), rgb(wheel_c, rng))],
                    "part") for dx in (-0.3, 0.3)]
    return whole("car", body_c, [window, *wheels], own=body)


def person(c: Canvas, rng: np.random.Generator, x: float, base: float, k: float, ground: str) -> list[Thing]:
    h = 46 * k * rng.uniform(0.85, 1.15)
    shirt = pick(rng, (*BRIGHT, "white", "black"), [ground])
    legs_c = rgb(pick(rng, ("blue", "black", "brown", "grey"), [shirt]), rng, 0.8)
    skin = [(240, 200, 165), (200, 150, 110), (140, 95, 60)][int(rng.integers(3))]
    legs = [c.add("rectangle", [x + dx - h * 0.045, base - h * 0.42, x + dx + h * 0.045, base], legs_c)
            for dx in (-h * 0.06, h * 0.06)]
    torso = [(x - h * 0.14, base - h * 0.4), (x - h * 0.12, base - h * 0.75), (x + h * 0.12, base - h * 0.75),
             (x + h * 0.14, base - h * 0.4)]
    body = c.add("polygon", torso, rgb(shirt, rng))
    head = c.add("ellipse", ellipse(x, base - h * 0.86, h * 0.12, h * 0.13), skin)
    return whole("person", shirt, [Thing("head", None, [head], "part")], own=[*legs, body])


def fence(c: Canvas, rng: np.random.Generator, x: float, base: float, k: float, ground: str) -> list[Thing]:
    w, h = 70 * k * rng.uniform(0.8, 1.3), 20 * k * rng.uniform(0.9, 1.1)
    colour = pick(rng, ("white", "brown", "red", "grey"))
    col = rgb(colour, rng)
    n = max(3, int(w / (9 * k)))
    pieces = [c.add("rectangle", [x - w / 2, base - h * y, x + w / 2, base - h * y + max(2, h * 0.12)], col)
              for y in (0.8, 0.4)]
    for j in range(n):
        px = x - w / 2 + j * w / (n - 1)
        plank = [(px - 2 * k, base), (px - 2 * k, base - h), (px, base - h - 3 * k), (px + 2 * k, base - h),
                 (px + 2 * k, base)]
        pieces.append(c.add("polygon", plank, col))
    return [Thing("fence", colour, pieces, "object")]


def flower(c: Canvas, rng: np.random.Generator, x: float, base: float, k: float, ground: str) -> list[Thing]:
    h, r = 16 * k * rng.uniform(0.9, 1.2), 5.5 * k * rng.uniform(0.9, 1.2)
    colour = pick(rng, ("red", "pink", "purple", "yellow", "white", "blue", "orange"))
    pieces = [c.add("line", [(x, base), (x, base - h)], rgb("green", rng, 0.8)),
              c.add("ellipse", ellipse(x, base - h, r, r), rgb(colour, rng))]
    centre = "brown" if colour in ("yellow", "orange") else "yellow"
    pieces.append(c.add("ellipse", ellipse(x, base - h, r * 0.4, r * 0.4), rgb(centre, rng)))
    return [Thing("flower", colour, pieces, "object")]


def stone(c: Canvas, rng: np.random.Generator, x: float, base: float, k: float, ground: str) -> list[Thing]:
    w = 22 * k * rng.uniform(0.8, 1.3)
    colour = pick(rng, ("grey", "white", "brown"))
    piece = c.add("ellipse", [x - w / 2, base - w * 0.55, x + w / 2, base], rgb(colour, rng))
    return [Thing("stone", colour, [piece], "object")]


def boat(c: Canvas, rng: np.random.Generator, x: float, base: float, k: float, ground: str) -> list[Thing]:
    w = 40 * k * rng.uniform(0.85, 1.15)
    hull_c = pick(rng, ("red", "white", "brown", "yellow", "orange", "black"))
    sail_c = pick(rng, ("white", "red", "yellow", "orange"), [hull_c])
    hull = c.add("polygon", [(x - w / 2, base - w * 0.22), (x + w / 2, base - w * 0.22), (x + w * 0.35, base),
                             (x - w * 0.35, base)], rgb(hull_c, rng))
    mast = c.add("line", [(x, base - w * 0.22), (x, base - w * 1.05)], rgb("brown", rng))
    sail = c.add("polygon", [(x + 2, base - w * 1.0), (x + 2, base - w * 0.3), (x + w * 0.42, base - w * 0.3)],
                 rgb(sail_c, rng))
    return whole("boat", hull_c, [Thing("sail", sail_c, [sail], "part")], own=[hull, mast])


def shape(c: Canvas, rng: np.random.Generator, x: float, y: float, k: float, ground: str) -> list[Thing]:
    """A flat coloured shape centred at (x, y), like those of the chat learning proof's world."""
    name = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = pick(rng, (*BRIGHT, "white", "black"), [ground])
    r, col, angle = 15 * k * rng.uniform(0.8, 1.25), rgb(colour, rng), rng.uniform(-0.4, 0.4)
    if name == "circle":
        piece = c.add("ellipse", ellipse(x, y, r, r), col)
    elif name == "ring":
        piece = c.add("ellipse", ellipse(x, y, r, r), col, outline=max(3, round(r * 0.35)))
    elif name == "square":
        s = r * 0.85
        piece = c.add("polygon", rotated([(x - s, y - s), (x + s, y - s), (x + s, y + s), (x - s, y + s)], x, y,
                                         angle), col)
    elif name == "triangle":
        piece = c.add("polygon", rotated([(x, y - r), (x + r, y + r * 0.75), (x - r, y + r * 0.75)], x, y, angle),
                      col)
    elif name == "diamond":
        piece = c.add("polygon", [(x, y - r * 1.15), (x + r * 0.75, y), (x, y + r * 1.15), (x - r * 0.75, y)], col)
    elif name == "star":
        radius = [r if j % 2 == 0 else r * 0.45 for j in range(10)]
        pts = [(x + radius[j] * math.sin(j * math.pi / 5 + angle), y - radius[j] * math.cos(j * math.pi / 5 + angle))
               for j in range(10)]
        piece = c.add("polygon", pts, col)
    else:  # crescent: a disc minus the same disc shifted by d, as the polygon of the two arcs
        d = r * 0.9
        phi = math.atan2(math.sqrt(r * r - d * d / 4), d / 2)
        outer = [(x + r * math.cos(t), y + r * math.sin(t)) for t in np.linspace(phi, 2 * math.pi - phi, 24)]
        inner = [(x + d + r * math.cos(t), y + r * math.sin(t)) for t in np.linspace(math.pi + phi, math.pi - phi, 16)]
        piece = c.add("polygon", rotated(outer + inner, x, y, angle * 3 + math.pi * (rng.random() < 0.5)), col)
    return [Thing(name, colour, [piece], "object")]


GROUND: dict[str, tuple[Builder, float, float, float]] = {  # builder, nominal width and height (k = 1), weight
    "house": (house, 90, 95, 0.9), "tree": (tree, 50, 85, 1.2), "bush": (bush, 40, 22, 0.5),
    "car": (car, 60, 34, 0.8), "person": (person, 16, 50, 0.8), "fence": (fence, 80, 22, 0.35),
    "flower": (flower, 14, 22, 0.6), "stone": (stone, 24, 13, 0.5),
}


# ------------------------------------------------------------------------------------------------------- scenes
def overlap(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection of two xyxy boxes over the smaller one's area."""
    iw, ih = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / max(small, 1e-9)


def draw_scene(rng: np.random.Generator, size: int) -> tuple[Canvas, list[Thing]]:
    """One random scene, back to front: sky things, far stuff, ground stuff, ground objects by depth, fliers."""
    u = size / 256
    horizon = size * rng.uniform(0.42, 0.62)
    sky_c = "blue" if rng.random() < 0.75 else pick(rng, ("grey", "orange"))
    top, bottom = (np.array(v, float) for v in SKIES[sky_c])
    ramp = np.linspace(0, 1, size)[:, None, None] ** 0.8
    c = Canvas(np.broadcast_to(top + (bottom - top) * ramp, (size, size, 3)).round().astype(np.uint8))
    things = [Thing("sky", sky_c, [0], "stuff")]

    if rng.random() < 0.65:
        sun_c = pick(rng, ("yellow", "orange"), [sky_c])
        sx, sy, r = rng.uniform(0.1, 0.9) * size, rng.uniform(0.08, 0.3) * size, rng.uniform(10, 20) * u
        things.append(Thing("sun", sun_c, [c.add("ellipse", ellipse(sx, sy, r, r), rgb(sun_c, rng))], "object"))
    for _ in range(int(rng.choice(3, p=[0.35, 0.4, 0.25]))):
        cloud_c = "white" if sky_c != "blue" or rng.random() < 0.7 else "grey"
        cx, cy, w = rng.uniform(0.05, 0.95) * size, rng.uniform(0.08, 0.3) * size, rng.uniform(30, 55) * u
        col = rgb(cloud_c, rng, 1.0 if cloud_c == "white" else 1.3)
        pieces = [c.add("ellipse", ellipse(cx + dx * w, cy + dy * w, w * rx, w * rx * 0.7), col)
                  for dx, dy, rx in ((-0.25, 0.05, 0.3), (0.25, 0.05, 0.3), (0.0, -0.05, 0.35))]
        things.append(Thing("cloud", cloud_c, pieces, "object"))
    if rng.random() < 0.3:
        mount_c = pick(rng, ("grey", "blue", "purple", "brown"), [sky_c])
        mx, mw, mh = rng.uniform(0.2, 0.8) * size, rng.uniform(0.4, 0.7) * size, rng.uniform(0.2, 0.32) * size
        peak = (mx, horizon - mh)
        body = c.add("polygon", [(mx - mw / 2, horizon + 2), peak, (mx + mw / 2, horizon + 2)], rgb(mount_c, rng, 0.85))
        cap = [peak, (mx + mw * 0.11, horizon - mh * 0.7), (mx, horizon - mh * 0.76),
               (mx - mw * 0.11, horizon - mh * 0.7)]
        snow = c.add("polygon", cap, rgb("white", rng))
        things += whole("mountain", mount_c, [Thing("snow", "white", [snow], "part")], own=[body], kind="stuff")
    grass_c = "green" if rng.random() < 0.85 else "yellow"
    grass_rgb = np.array(rgb(grass_c, rng, 1.1 if grass_c == "green" else 0.85), float)
    grass = c.add("rectangle", [0, horizon, size, size], tuple(grass_rgb.round().astype(int).tolist()))
    things.append(Thing("grass", grass_c, [grass], "stuff"))
    for _ in range(int(rng.choice(3, p=[0.4, 0.4, 0.2]))):  # hills: a lighter or darker shade of the grass
        hx, hw = rng.uniform(0, 1) * size, rng.uniform(0.35, 0.7) * size
        col = tuple(np.clip(grass_rgb * rng.choice([0.82, 1.18]), 0, 255).round().astype(int).tolist())
        piece = c.add("ellipse", ellipse(hx, horizon + size * 0.08, hw / 2, rng.uniform(0.12, 0.22) * size), col)
        things.append(Thing("hill", grass_c, [piece], "stuff"))
    ground_top = horizon + size * 0.06
    taken: list[list[float]] = []
    lake = road = None
    if rng.random() < 0.25:
        lx, ly = rng.uniform(0.25, 0.75) * size, rng.uniform(ground_top + 0.12 * size, size * 0.85)
        lw, lh = rng.uniform(0.25, 0.4) * size, rng.uniform(0.06, 0.1) * size
        lake = [lx - lw, ly - lh, lx + lw, ly + lh]
        things.append(Thing("lake", "blue", [c.add("ellipse", lake, rgb("blue", rng, 1.1))], "stuff"))
        taken.append(lake)
    elif rng.random() < 0.35:
        ry, rh = rng.uniform(ground_top + 0.15 * size, size * 0.9), rng.uniform(0.07, 0.1) * size
        road = [0, ry - rh / 2, size, ry + rh / 2]
        road_c = pick(rng, ("grey", "black"))
        pieces = [c.add("rectangle", road, rgb(road_c, rng))]
        for j in range(6):  # the dashed centre line belongs to the road's mask
            dx = (j + 0.2) * size / 6
            pieces.append(c.add("rectangle", [dx, ry - 1.5 * u, dx + size / 14, ry + 1.5 * u], rgb("white", rng)))
        things.append(Thing("road", road_c, pieces, "stuff"))

    def scale(base: float) -> float:  # nearer (lower) objects are drawn bigger
        return (0.55 + 0.8 * (base - horizon) / (size - horizon)) * u

    plan: list[tuple[float, float, str]] = []  # (base, x, kind), drawn far to near
    if lake is not None and rng.random() < 0.7:
        bx = rng.uniform(0.7 * lake[0] + 0.3 * lake[2], 0.3 * lake[0] + 0.7 * lake[2])
        plan.append((lake[1] + (lake[3] - lake[1]) * 0.7, bx, "boat"))
    kinds, weights = list(GROUND), np.array([GROUND[g][3] for g in GROUND])
    for _ in range(int(rng.integers(3, 8))):
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        _, nw, nh, _ = GROUND[kind]
        on_road = kind == "car" and road is not None
        for _ in range(8):
            base = (road[3] - rng.uniform(0.1, 0.3) * (road[3] - road[1]) if on_road
                    else rng.uniform(ground_top + 0.08 * (size - ground_top), size - 2 * u))
            x, k = rng.uniform(0.06, 0.94) * size, scale(base)
            box = [x - nw * k / 2, base - nh * k, x + nw * k / 2, base]
            feet = [box[0], base - 3 * u, box[2], base]  # nothing stands on the lake, only cars on the road
            dry = all(overlap(feet, t) == 0 for t in (lake, None if on_road else road) if t is not None)
            if dry and all(overlap(box, t) < 0.3 for t in taken):
                taken.append(box)
                plan.append((base, x, kind))
                break
    houses = [(base, x) for base, x, kind in plan if kind == "house"]
    if houses and road is None and lake is None and rng.random() < 0.6:  # a path to the front house, under every object
        base, x = max(houses)
        path_c = pick(rng, ("grey", "brown", "yellow"), [grass_c])
        foot, half = rng.uniform(0.25, 0.75) * size, (size - base) * 0.25 + 4 * u
        poly = [(x - 5 * u, base), (x + 5 * u, base), (foot + half, size), (foot - half, size)]
        things.append(Thing("path", path_c, [c.add("polygon", poly, rgb(path_c, rng, 1.2))], "stuff"))
    for base, x, kind in sorted(plan):
        things += (boat if kind == "boat" else GROUND[kind][0])(c, rng, x, base, scale(base), grass_c)

    for _ in range(int(rng.choice(4, p=[0.5, 0.25, 0.15, 0.1]))):
        bird_c = pick(rng, ("black", "brown", "blue", "red", "white"), [sky_c])
        bx, by, w = rng.uniform(0.1, 0.9) * size, rng.uniform(0.05, 0.35) * size, rng.uniform(12, 18) * u
        wings = [(bx - w / 2, by - w * 0.25), (bx, by + w * 0.05), (bx + w / 2, by - w * 0.25),
                 (bx + w / 2, by - w * 0.05), (bx, by + w * 0.3), (bx - w / 2, by - w * 0.05)]
        things.append(Thing("bird", bird_c, [c.add("polygon", wings, rgb(bird_c, rng))], "object"))
    if rng.random() < 0.2:
        name = pick(rng, ("red", "blue", "yellow", "pink", "green", "purple", "orange"), [sky_c])
        bx, by, r = rng.uniform(0.1, 0.9) * size, rng.uniform(0.12, 0.35) * size, rng.uniform(8, 12) * u
        col = rgb(name, rng)
        knot = [(bx, by + r * 1.1), (bx - r * 0.25, by + r * 1.45), (bx + r * 0.25, by + r * 1.45)]
        pieces = [c.add("line", [(bx, by + r * 1.2), (bx + r * 0.3, by + r * 4)], rgb("grey", rng, 1.3)),
                  c.add("polygon", knot, col), c.add("ellipse", ellipse(bx, by, r * 0.85, r * 1.15), col)]
        things.append(Thing("balloon", name, pieces, "object"))
    for _ in range(int(rng.choice(3, p=[0.5, 0.3, 0.2]))):
        things += shape(c, rng, rng.uniform(0.08, 0.92) * size, rng.uniform(0.08, 0.92) * size, u, grass_c)
    return c, things


# -------------------------------------------------------------------------------------------------- annotations
def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """x1, y1, x2, y2 (exclusive) of a non-empty mask."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


@dataclass
class Region:
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
        x1, y1, x2, y2 = self.box
        return PLACES[min(2, int(3 * (y1 + y2) / 2 / h)) * 3 + min(2, int(3 * (x1 + x2) / 2 / w))]

    def point(self) -> list[float]:
        """The mask pixel nearest to the mask's centroid (inside it, also for rings and crescents)."""
        x1, y1, x2, y2 = self.box
        ys, xs = np.nonzero(self.mask[y1:y2, x1:x2])
        i = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
        return [float(xs[i] + x1), float(ys[i] + y1)]


@dataclass
class Scene:
    image_id: int
    image: np.ndarray  # (H, W, 3) uint8 as drawn (the file is its JPEG)
    regions: list[Region]


def image_id(split: str, index: int) -> int:
    return index + 1 + (EVAL_BASE if split == "eval" else 0)


def hides(a: Region, b_full: np.ndarray, b_full_box: tuple[int, int, int, int]) -> bool:
    """Whether a covers at least `MIN_OCCLUSION` pixels of what b would show alone ("a in front of b")."""
    x1, y1 = max(a.box[0], b_full_box[0]), max(a.box[1], b_full_box[1])
    x2, y2 = min(a.box[2], b_full_box[2]), min(a.box[3], b_full_box[3])
    if x2 <= x1 or y2 <= y1:
        return False
    return int(np.count_nonzero(a.mask[y1:y2, x1:x2] & b_full[y1:y2, x1:x2])) >= MIN_OCCLUSION


def relations(a: Region, b: Region, a_hides_b: bool, b_hides_a: bool) -> list[str]:
    """What holds of a with respect to b: strict box separation for left of / right of / above / below, and
    occlusion for in front of / behind."""
    (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = a.box, b.box
    return [name for name, holds in (("left of", ax2 <= bx1), ("right of", ax1 >= bx2), ("above", ay2 <= by1),
                                     ("below", ay1 >= by2), ("in front of", a_hides_b), ("behind", b_hides_a))
            if holds]


def article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def noun(r: Region, colour: bool = True, size: str = "") -> str:
    if r.concept == "person":
        return " ".join(w for w in (size, "person") if w) + (f" in {r.colour}" if colour and r.colour else "")
    return " ".join(w for w in (size, r.colour if colour else "", r.concept) if w)


def describe(r: Region, by_id: dict[int, Region], rng: np.random.Generator) -> str:
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
    regions: list[Region] = []
    made: dict[int, Region] = {}  # id(thing) -> its region
    for thing in things:
        lut = np.zeros(256, bool)
        lut[thing.pieces] = True
        mask = lut[labels]
        parent = made.get(id(thing.parent)) if thing.parent is not None else None
        if np.count_nonzero(mask) < MIN_AREA or (parent is not None and np.array_equal(mask, parent.mask)):
            continue  # hidden, a speck, or a part that is all that shows of its object
        if thing.parent is not None and parent is None:
            continue  # the object itself was dropped
        region = Region(iid * 1000 + len(regions) + 1, thing.concept, thing.colour, thing.kind, mask,
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


# ------------------------------------------------------------------------------------------------------ writing
def concept_vectors(seed: int, dim: int) -> np.ndarray:
    """(K, dim) the simulated teacher's orthonormal concept vectors (fixed by the seed): orthogonal, so how often a
    target is wrong depends on the noise alone, not on the width."""
    q, _ = np.linalg.qr(np.random.default_rng([seed, 0xC0DE]).normal(size=(dim, len(CONCEPTS))))
    return q.T


def sa1b_record(scene: Scene, size: int) -> dict:
    return {"image": {"image_id": scene.image_id, "width": size, "height": size,
                      "file_name": f"sa_{scene.image_id}.jpg"},
            "annotations": [{"id": r.id, "segmentation": encode_rle(r.mask), "bbox": r.bbox,
                             "area": r.area, "point_coords": [r.point()], "predicted_iou": 1.0,
                             "stability_score": 1.0, "crop_box": [0, 0, size, size]} for r in scene.regions]}


def world_entry(scene: Scene, split: str, size: int) -> dict:
    return {"image_id": scene.image_id, "file_name": f"{split}/sa_{scene.image_id}.jpg", "width": size,
            "height": size,
            "objects": [{"id": r.id, "concept": r.concept, "colour": r.colour, "kind": r.kind, "bbox": r.bbox,
                         "area": r.area, "position": r.position, "part_of": r.part_of, "parts": r.parts,
                         "relations": [list(x) for x in r.relations], "caption": r.caption}
                        for r in scene.regions]}


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copyfile(src, dst)


def make_world(out: str | Path, train: int, eval: int, seed: int = 0, size: int = 256, dim: int = 1024,
               noise: float = 7.0) -> dict[str, Path]:
    """Write the world to the empty (or new) folder `out`; returns the paths written, by name.

    `noise` sets how often a prior's top-1 concept is wrong, whatever `dim`: the noise per coordinate is
    noise / 32, so at width 1024 its norm is `noise` times the unit concept vector's. 0 gives one-hot targets, 7
    (the default) a top-1 that is right ~98 % of the time, 10 only ~80 %."""
    out = Path(out)
    checks = [(train >= 0 and eval >= 0 and train + eval > 0, "give at least one image (--train / --eval >= 0)"),
              (train < EVAL_BASE, f"at most {EVAL_BASE - 1} train images"),
              (64 <= size <= 4096, f"--size must be 64..4096 px, got {size}"),
              (dim >= len(CONCEPTS), f"--dim must be at least {len(CONCEPTS)} (a direction per concept), got {dim}"),
              (noise >= 0 and math.isfinite(noise), f"--noise must be >= 0, got {noise}"),
              (not out.exists() or out.is_dir(), f"{out} is a file, not a folder"),
              (not out.is_dir() or not any(out.iterdir()), f"{out} is not empty: give a new folder")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    out.mkdir(parents=True, exist_ok=True)
    vectors = concept_vectors(seed, dim)
    writer = PriorsWriter(out / "priors", dim, teacher=f"synthetic:seed={seed},noise={noise}")
    writer.write_concepts(vectors.T * LOGIT_SCALE, CONCEPTS)
    index_of = {name: i for i, name in enumerate(CONCEPTS)}
    paths = {"concepts": out / "concepts.txt", "priors": out / "priors", "world": out / "world.json"}
    paths["concepts"].write_text("\n".join(CONCEPTS) + "\n")
    world: dict[str, Any] = {"format": FORMAT, "seed": seed, "size": size, "dim": dim, "noise": noise,
                             "concepts": list(CONCEPTS), "colours": list(PALETTE), "splits": {}}
    for split, count in zip(SPLITS, (train, eval)):
        folder = out / split
        folder.mkdir()
        entries, captions, keys, embeddings = [], [], [], []
        for i in range(count):
            scene = render(seed, split, i, size)
            name = f"sa_{scene.image_id}"
            Image.fromarray(scene.image).save(folder / f"{name}.jpg", "JPEG", quality=95, subsampling=0)
            _link(folder / f"{name}.jpg", folder / f"{scene.image_id}.jpg")
            (folder / f"{name}.json").write_text(json.dumps(sa1b_record(scene, size), separators=(",", ":")))
            entries.append(world_entry(scene, split, size))
            captions.append({"id": scene.image_id, "regions": [
                {"region_id": r.id, "image_id": scene.image_id, "phrase": r.caption, "x": r.bbox[0],
                 "y": r.bbox[1], "width": r.bbox[2], "height": r.bbox[3]} for r in scene.regions]})
            noise_rng = np.random.default_rng([seed, SPLITS.index(split), i, 2])
            concepts = [index_of[r.concept] for r in scene.regions]
            keys += [mask_key(scene.image_id, r.id) for r in scene.regions]
            embeddings.append(vectors[concepts] + noise_rng.normal(size=(len(concepts), dim)) * noise / 32)
            if (i + 1) % CHUNK == 0 or i + 1 == count:
                writer.write_shard(f"{split}-{i // CHUNK:04d}", keys, np.concatenate(embeddings).astype(np.float32))
                keys, embeddings = [], []
        paths[split] = folder
        paths[f"captions_{split}"] = out / f"captions_{split}.json"
        paths[f"captions_{split}"].write_text(json.dumps(captions, separators=(",", ":")))
        world["splits"][split] = entries
    paths["world"].write_text(json.dumps(world, separators=(",", ":")))
    return paths


def load_labels(out: str | Path, split: str = "eval") -> dict[str, str]:
    """Region key (`mask_key`) -> concept for one split of a world: the `labels` of `evaluate_regions`."""
    world = json.loads((Path(out) / "world.json").read_text())
    return {mask_key(e["image_id"], o["id"]): o["concept"] for e in world["splits"][split] for o in e["objects"]}


def export_instances(out: str | Path, split: str = "eval", lvis: bool = False) -> Path:
    """A split of a world as a COCO instances file (`instances_<split>.json`), or with `lvis` as an LVIS v1 one
    (`lvis_<split>.json`: frequency groups, federated-label fields, `coco_url`), for the region benchmarks.

    Every region is labelled (none is a crowd); LVIS frequency groups go round-robin over the concepts (r, c, f) so
    that every group is populated. Image paths are relative to the world folder (`<split>/sa_<id>.jpg`)."""
    out = Path(out)
    world = json.loads((out / "world.json").read_text())
    ids = {name: i + 1 for i, name in enumerate(world["concepts"])}
    images, annotations = [], []
    for entry in world["splits"][split]:
        record = json.loads((out / entry["file_name"]).with_suffix(".json").read_text())
        concept = {o["id"]: o["concept"] for o in entry["objects"]}
        image = {"id": entry["image_id"], "width": entry["width"], "height": entry["height"]}
        if lvis:  # LVIS names images by their COCO URL: the last two parts are the path under the image root
            image.update(coco_url=f"http://example.invalid/{entry['file_name']}", neg_category_ids=[],
                         not_exhaustive_category_ids=[])
        else:
            image["file_name"] = entry["file_name"]
        images.append(image)
        for ann in record["annotations"]:
            annotations.append({"id": len(annotations) + 1, "image_id": entry["image_id"],
                                "category_id": ids[concept[ann["id"]]], "bbox": ann["bbox"], "area": ann["area"],
                                "segmentation": ann["segmentation"], "iscrowd": 0})
    categories = [{"id": i, "name": name, "supercategory": "world"} for name, i in ids.items()]
    if lvis:
        for c in categories:
            c["frequency"] = "rcf"[(c["id"] - 1) % 3]
    path = out / f"{'lvis' if lvis else 'instances'}_{split}.json"
    path.write_text(json.dumps({"info": {"description": f"synthetic world {split}"}, "images": images,
                                "annotations": annotations, "categories": categories, "licenses": []}))
    return path


# ---------------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="a new (or empty) folder for the world")
    parser.add_argument("--train", type=int, default=1000, help="training images (default 1000)")
    parser.add_argument("--eval", type=int, default=200, help="held-out images (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--dim", type=int, default=1024, help="width of the simulated teacher embeddings")
    parser.add_argument("--noise", type=float, default=7.0,
                        help="prior noise: 0 gives one-hot targets, 7 (default) ~98 %% right top-1, 10 ~80 %%")
    parser.add_argument("--instances", action="store_true",
                        help="also write the held-out split as COCO and LVIS instance files (eval lvis-cls/coco-seg)")


def run(args: argparse.Namespace) -> int:
    try:
        paths = make_world(args.out, args.train, args.eval, args.seed, args.size, args.dim, args.noise)
        if args.instances and args.eval:
            paths["instances_eval"] = export_instances(args.out, "eval")
            paths["lvis_eval"] = export_instances(args.out, "eval", lvis=True)
    except (ValueError, OSError) as exc:
        print(f"tap-world: {exc}", file=sys.stderr)
        return 2
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0
