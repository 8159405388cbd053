"""Drawing the synthetic world: what each kind of object looks like, and how a scene is laid out back to front.

Every builder draws one object (with its parts) onto a `Canvas` from a random generator and returns its `Thing`s;
`draw_scene` places the sky, the ground stuff and the objects by depth. Nothing here knows about annotations: the
masks, captions and relations are read off the label map later (`scene.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .canvas import BRIGHT, Canvas, Thing, ellipse, pick, rgb, rotated, whole

SHAPES = ("circle", "square", "triangle", "star", "diamond", "ring", "crescent")
SKIES = {"blue": ((95, 155, 230), (190, 220, 245)), "grey": ((140, 145, 155), (200, 202, 208)),
         "orange": ((235, 130, 70), (250, 205, 140))}

Builder = Callable[[Canvas, np.random.Generator, float, float, float, str], list[Thing]]


def house(c: Canvas, rng: np.random.Generator, x: float, base: float, k: float, ground: str) -> list[Thing]:
    """A house standing on `base`: wall, roof, door and windows (sometimes a chimney), each its own part."""
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
    """A round tree or a pine: a trunk and leaves, the two parts a point on a tree is ambiguous between."""
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
    """A bush of three overlapping green blobs, one mask."""
    w = 36 * k * rng.uniform(0.8, 1.2)
    col = rgb("green", rng, 0.65)
    pieces = [c.add("ellipse", ellipse(x + dx * w, base - w * 0.3, w * 0.32, w * 0.3), col) for dx in (-0.22, 0.22)]
    pieces.append(c.add("ellipse", ellipse(x, base - w * 0.42, w * 0.3, w * 0.32), col))
    return [Thing("bush", "green", pieces, "object")]


def car(c: Canvas, rng: np.random.Generator, x: float, base: float, k: float, ground: str) -> list[Thing]:
    """A car facing either way: body and cabin are the car itself; the window and two wheels are parts."""
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
    """A person: legs and shirt are the person, the head a part (the colour word is the shirt's)."""
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
    """A fence of two rails and pointed planks, one mask however many pieces."""
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
    """A flower on a stem, its colour the petals'."""
    h, r = 16 * k * rng.uniform(0.9, 1.2), 5.5 * k * rng.uniform(0.9, 1.2)
    colour = pick(rng, ("red", "pink", "purple", "yellow", "white", "blue", "orange"))
    pieces = [c.add("line", [(x, base), (x, base - h)], rgb("green", rng, 0.8)),
              c.add("ellipse", ellipse(x, base - h, r, r), rgb(colour, rng))]
    centre = "brown" if colour in ("yellow", "orange") else "yellow"
    pieces.append(c.add("ellipse", ellipse(x, base - h, r * 0.4, r * 0.4), rgb(centre, rng)))
    return [Thing("flower", colour, pieces, "object")]


def stone(c: Canvas, rng: np.random.Generator, x: float, base: float, k: float, ground: str) -> list[Thing]:
    """A flat stone, one ellipse."""
    w = 22 * k * rng.uniform(0.8, 1.3)
    colour = pick(rng, ("grey", "white", "brown"))
    piece = c.add("ellipse", [x - w / 2, base - w * 0.55, x + w / 2, base], rgb(colour, rng))
    return [Thing("stone", colour, [piece], "object")]


def boat(c: Canvas, rng: np.random.Generator, x: float, base: float, k: float, ground: str) -> list[Thing]:
    """A sailing boat on the water: hull and mast are the boat, the sail a part."""
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



def overlap(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection of two xyxy boxes over the smaller one's area."""
    iw, ih = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / max(small, 1e-9)



@dataclass
class Layout:
    """What the later layers of a scene need from the earlier ones: the frame, the sky and ground colours, and where
    the lake, the road and the objects already placed are (nothing stands on the lake, things barely overlap)."""

    size: int
    horizon: float
    sky: str
    grass: str = ""
    lake: list[float] | None = None
    road: list[float] | None = None
    taken: list[list[float]] = field(default_factory=list)

    @property
    def u(self) -> float:
        """Pixels per unit: sizes are given for a 256 px image."""
        return self.size / 256

    @property
    def ground_top(self) -> float:
        """Where ground objects may stand: a little below the horizon, on the grass rather than its far edge."""
        return self.horizon + self.size * 0.06

    def scale(self, base: float) -> float:
        """Nearer (lower) objects are drawn bigger."""
        return (0.55 + 0.8 * (base - self.horizon) / (self.size - self.horizon)) * self.u


def draw_scene(rng: np.random.Generator, size: int) -> tuple[Canvas, list[Thing]]:
    """One random scene, back to front: sky things, far stuff, ground stuff, ground objects by depth, fliers.

    Every layer draws from the one generator in a fixed order, so a scene is a function of its seed alone."""
    horizon = size * rng.uniform(0.42, 0.62)
    sky_c = "blue" if rng.random() < 0.75 else pick(rng, ("grey", "orange"))
    top, bottom = (np.array(v, float) for v in SKIES[sky_c])
    ramp = np.linspace(0, 1, size)[:, None, None] ** 0.8
    c = Canvas(np.broadcast_to(top + (bottom - top) * ramp, (size, size, 3)).round().astype(np.uint8))
    at = Layout(size, horizon, sky_c)
    things = [Thing("sky", sky_c, [0], "stuff")]
    things += sky_things(c, rng, at)
    things += ground_stuff(c, rng, at)
    plan = plan_objects(rng, at)
    things += front_path(c, rng, at, plan)
    for base, x, kind in sorted(plan):
        things += (boat if kind == "boat" else GROUND[kind][0])(c, rng, x, base, at.scale(base), at.grass)
    things += fliers(c, rng, at)
    return c, things


def sky_things(c: Canvas, rng: np.random.Generator, at: Layout) -> list[Thing]:
    """The sun, clouds and a mountain: everything behind the grass."""
    size, horizon, sky_c, u = at.size, at.horizon, at.sky, at.u
    things = []
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
    return things


def ground_stuff(c: Canvas, rng: np.random.Generator, at: Layout) -> list[Thing]:
    """Grass, hills and a lake or a road; records the grass colour, the lake and the road in `at`."""
    size, horizon, u = at.size, at.horizon, at.u
    grass_c = "green" if rng.random() < 0.85 else "yellow"
    grass_rgb = np.array(rgb(grass_c, rng, 1.1 if grass_c == "green" else 0.85), float)
    grass = c.add("rectangle", [0, horizon, size, size], tuple(grass_rgb.round().astype(int).tolist()))
    things = [Thing("grass", grass_c, [grass], "stuff")]
    at.grass = grass_c
    for _ in range(int(rng.choice(3, p=[0.4, 0.4, 0.2]))):  # hills: a lighter or darker shade of the grass
        hx, hw = rng.uniform(0, 1) * size, rng.uniform(0.35, 0.7) * size
        col = tuple(np.clip(grass_rgb * rng.choice([0.82, 1.18]), 0, 255).round().astype(int).tolist())
        piece = c.add("ellipse", ellipse(hx, horizon + size * 0.08, hw / 2, rng.uniform(0.12, 0.22) * size), col)
        things.append(Thing("hill", grass_c, [piece], "stuff"))
    ground_top = at.ground_top
    if rng.random() < 0.25:
        lx, ly = rng.uniform(0.25, 0.75) * size, rng.uniform(ground_top + 0.12 * size, size * 0.85)
        lw, lh = rng.uniform(0.25, 0.4) * size, rng.uniform(0.06, 0.1) * size
        at.lake = lake = [lx - lw, ly - lh, lx + lw, ly + lh]
        things.append(Thing("lake", "blue", [c.add("ellipse", lake, rgb("blue", rng, 1.1))], "stuff"))
        at.taken.append(lake)
    elif rng.random() < 0.35:
        ry, rh = rng.uniform(ground_top + 0.15 * size, size * 0.9), rng.uniform(0.07, 0.1) * size
        at.road = road = [0, ry - rh / 2, size, ry + rh / 2]
        road_c = pick(rng, ("grey", "black"))
        pieces = [c.add("rectangle", road, rgb(road_c, rng))]
        for j in range(6):  # the dashed centre line belongs to the road's mask
            dx = (j + 0.2) * size / 6
            pieces.append(c.add("rectangle", [dx, ry - 1.5 * u, dx + size / 14, ry + 1.5 * u], rgb("white", rng)))
        things.append(Thing("road", road_c, pieces, "stuff"))
    return things


def plan_objects(rng: np.random.Generator, at: Layout) -> list[tuple[float, float, str]]:
    """(base, x, kind) of the ground objects (and a boat on the lake): placed first, so they can be drawn far to
    near; each gets 8 tries at a place that is dry (cars may use the road) and barely overlaps the others."""
    size, ground_top, lake, road, taken, u = at.size, at.ground_top, at.lake, at.road, at.taken, at.u
    plan: list[tuple[float, float, str]] = []
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
            x, k = rng.uniform(0.06, 0.94) * size, at.scale(base)
            box = [x - nw * k / 2, base - nh * k, x + nw * k / 2, base]
            feet = [box[0], base - 3 * u, box[2], base]  # nothing stands on the lake, only cars on the road
            dry = all(overlap(feet, t) == 0 for t in (lake, None if on_road else road) if t is not None)
            if dry and all(overlap(box, t) < 0.3 for t in taken):
                taken.append(box)
                plan.append((base, x, kind))
                break
    return plan


def front_path(c: Canvas, rng: np.random.Generator, at: Layout, plan: list[tuple[float, float, str]]) -> list[Thing]:
    """Sometimes a path to the front house, drawn under every object (never beside a lake or a road)."""
    houses = [(base, x) for base, x, kind in plan if kind == "house"]
    if not (houses and at.road is None and at.lake is None and rng.random() < 0.6):
        return []
    size, u = at.size, at.u
    base, x = max(houses)
    path_c = pick(rng, ("grey", "brown", "yellow"), [at.grass])
    foot, half = rng.uniform(0.25, 0.75) * size, (size - base) * 0.25 + 4 * u
    poly = [(x - 5 * u, base), (x + 5 * u, base), (foot + half, size), (foot - half, size)]
    return [Thing("path", path_c, [c.add("polygon", poly, rgb(path_c, rng, 1.2))], "stuff")]


def fliers(c: Canvas, rng: np.random.Generator, at: Layout) -> list[Thing]:
    """Birds, a balloon and flat shapes: drawn last, so they are in front of everything."""
    size, sky_c, u = at.size, at.sky, at.u
    things = []
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
        things += shape(c, rng, rng.uniform(0.08, 0.92) * size, rng.uniform(0.08, 0.92) * size, u, at.grass)
    return things
