"""A synthetic scene world in SA-1B layout, for proving that TAP pre-training learns (`python -m finetune tap-world`).

Scenes like `examples/scene.jpg`: sky and grass (sometimes a hill), a sun, clouds, houses with roofs, doors and
windows, trees, cars with wheels, people, flowers, stones, a fence and coloured shapes. Every object is drawn into an
instance map, so each mask is exactly the object's visible pixels after occlusion; wholes (a house) and their parts
(its door) are both masks, as in SA-1B.

Written per split (`train/`, `eval/`): `sa_<id>.jpg` + `sa_<id>.json` (SA-1B annotations with COCO RLE). Beside them:
- `priors/`: teacher embeddings in the `tap-priors` format (the same writer). Each concept gets a fixed random unit
  vector; a mask's V_C is its concept's vector (a part's mixed with its whole's, as a CLIP crop of a door still sees
  the house) plus Gaussian noise, so the target distribution is right but not one-hot.
- `concepts.txt`: the vocabulary, one name per line (also usable as `tap-priors --concepts`).
- `captions_<split>.json`: region captions in GRiT's Visual Genome layout (COCO-style, `file_name` per image), one
  per mask, whose annotation ids equal the SA-1B ones, so captions, priors and masks share keys.
- `world.json`: every object with its concept, colour, box and caption, for evaluation and chat data.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .priors import PriorsWriter, mask_key
from .records import encode_rle

PALETTE = {"red": (205, 45, 40), "blue": (45, 85, 205), "yellow": (240, 205, 40), "green": (40, 150, 60),
           "white": (240, 240, 236), "black": (35, 35, 38), "orange": (235, 130, 35), "purple": (130, 60, 170),
           "brown": (120, 75, 40), "grey": (130, 130, 135), "pink": (235, 140, 175)}
#: Concepts a scene can hold; a caption names the colour only where colour varies between instances.
CONCEPTS = ["sky", "grass", "hill", "sun", "cloud", "house", "roof", "door", "window", "tree", "trunk", "leaves",
            "car", "wheel", "person", "head", "shirt", "flower", "stone", "fence", "circle", "square", "triangle",
            "star", "ball", "kite", "bird", "bush", "road", "chimney"]
MIN_AREA = 20  # pixels: smaller visible remains of an occluded object are not annotated


@dataclass
class Thing:
    """One annotated object or part: its instance ids in the map, concept, colour and parent object."""

    concept: str
    colour: str = ""
    parent: int = -1  # index of the whole this is a part of
    ids: list[int] = field(default_factory=list)


class Canvas:
    """An RGB image and an instance map drawn together, so masks are exact."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.image = Image.new("RGB", (size, size))
        self.ids = Image.new("I", (size, size), 0)
        self.draw, self.idraw = ImageDraw.Draw(self.image), ImageDraw.Draw(self.ids)
        self.things: list[Thing] = []
        self.next_id = 1

    def add(self, concept: str, colour: str = "", parent: int = -1) -> int:
        self.things.append(Thing(concept, colour, parent))
        return len(self.things) - 1

    def paint(self, thing: int, shape: str, xy, colour: tuple[int, int, int]) -> None:
        """Draw `shape` (ellipse, rectangle, polygon) for `thing` and its parents."""
        uid = self.next_id
        self.next_id += 1
        t = thing
        while t >= 0:
            self.things[t].ids.append(uid)
            t = self.things[t].parent
        getattr(self.draw, shape)(xy, fill=colour)
        getattr(self.idraw, shape)(xy, fill=uid)

    def masks(self) -> list[tuple[Thing, np.ndarray]]:
        ids = np.asarray(self.ids)
        out = []
        for thing in self.things:
            mask = np.isin(ids, thing.ids)
            if mask.sum() >= MIN_AREA:
                out.append((thing, mask))
        return out


def _sky_and_ground(c: Canvas, rng: random.Random) -> int:
    s = c.size
    horizon = int(s * rng.uniform(0.45, 0.62))
    sky = c.add("sky")
    top, bottom = np.array([90, 150, 225]), np.array([185, 215, 245])
    for y in range(horizon):  # a vertical gradient, one row at a time (ids first so the sky mask is exact)
        col = tuple(int(v) for v in top + (bottom - top) * y / max(1, horizon))
        c.paint(sky, "rectangle", (0, y, s, y), col)
    grass = c.add("grass")
    c.paint(grass, "rectangle", (0, horizon, s, s), (80, 160, 70))
    if rng.random() < 0.5:
        hill = c.add("hill")
        cx, w = rng.uniform(0, s), rng.uniform(0.5, 0.9) * s
        c.paint(hill, "ellipse", (cx - w / 2, horizon - 0.18 * s, cx + w / 2, horizon + 0.18 * s), (95, 150, 75))
    if rng.random() < 0.35:
        road = c.add("road")
        x = rng.uniform(0.3, 0.7) * s
        c.paint(road, "polygon", [(x - 0.05 * s, horizon), (x + 0.05 * s, horizon), (x + 0.2 * s, s),
                                  (x - 0.2 * s, s)], (170, 160, 140))
    return horizon


def _sun_and_clouds(c: Canvas, rng: random.Random, horizon: int) -> None:
    s = c.size
    if rng.random() < 0.7:
        r = rng.uniform(0.05, 0.08) * s
        x, y = rng.uniform(r, s - r), rng.uniform(r, max(r + 1, horizon - 2 * r))
        sun = c.add("sun", "yellow")
        c.paint(sun, "ellipse", (x - r, y - r, x + r, y + r), PALETTE["yellow"])
    for _ in range(rng.randint(0, 2)):
        w, h = rng.uniform(0.15, 0.25) * s, rng.uniform(0.05, 0.08) * s
        x, y = rng.uniform(0, s - w), rng.uniform(0.02 * s, max(0.03 * s, horizon - h - 0.1 * s))
        cloud = c.add("cloud", "white")
        c.paint(cloud, "ellipse", (x, y, x + w, y + h), PALETTE["white"])
        c.paint(cloud, "ellipse", (x + w * 0.2, y - h * 0.4, x + w * 0.7, y + h * 0.6), PALETTE["white"])
    if rng.random() < 0.3:
        bird = c.add("bird", "black")
        x, y = rng.uniform(0.1, 0.9) * s, rng.uniform(0.05, 0.3) * s
        c.paint(bird, "polygon", [(x - 8, y - 4), (x, y + 3), (x + 8, y - 4), (x, y)], PALETTE["black"])
    if rng.random() < 0.25:
        colour = rng.choice(["red", "orange", "purple", "pink"])
        kite = c.add("kite", colour)
        x, y, r = rng.uniform(0.15, 0.85) * s, rng.uniform(0.1, 0.3) * s, 0.05 * s
        c.paint(kite, "polygon", [(x, y - r), (x + r * 0.7, y), (x, y + r * 1.3), (x - r * 0.7, y)], PALETTE[colour])


def _house(c: Canvas, rng: random.Random, x: float, ground: float, scale: float) -> None:
    w, h = 0.3 * scale, 0.22 * scale
    colour = rng.choice(["red", "blue", "yellow", "white", "orange"])
    house = c.add("house", colour)
    c.paint(house, "rectangle", (x, ground - h, x + w, ground), PALETTE[colour])
    roof_colour = rng.choice(["brown", "red", "grey"]) if colour != "red" else rng.choice(["brown", "grey"])
    roof = c.add("roof", roof_colour, house)
    c.paint(roof, "polygon", [(x - 0.03 * scale, ground - h), (x + w / 2, ground - h - 0.14 * scale),
                              (x + w + 0.03 * scale, ground - h)], PALETTE[roof_colour])
    if rng.random() < 0.4:
        chimney = c.add("chimney", "grey", house)
        c.paint(chimney, "rectangle", (x + 0.72 * w, ground - h - 0.12 * scale, x + 0.8 * w, ground - h - 0.04 * scale),
                PALETTE["grey"])
    door_colour = rng.choice(["brown", "black", "green"])
    door = c.add("door", door_colour, house)
    dx = x + w * rng.uniform(0.38, 0.5)
    c.paint(door, "rectangle", (dx, ground - 0.45 * h, dx + 0.18 * w, ground), PALETTE[door_colour])
    for wx in (x + 0.1 * w, x + 0.72 * w):
        window = c.add("window", "blue", house)
        c.paint(window, "rectangle", (wx, ground - 0.8 * h, wx + 0.16 * w, ground - 0.55 * h), (175, 210, 235))


def _tree(c: Canvas, rng: random.Random, x: float, ground: float, scale: float) -> None:
    tree = c.add("tree", "green")
    trunk = c.add("trunk", "brown", tree)
    c.paint(trunk, "rectangle", (x - 0.02 * scale, ground - 0.2 * scale, x + 0.02 * scale, ground), PALETTE["brown"])
    leaves = c.add("leaves", "green", tree)
    r = rng.uniform(0.07, 0.1) * scale
    c.paint(leaves, "ellipse", (x - r, ground - 0.2 * scale - 1.6 * r, x + r, ground - 0.2 * scale + 0.3 * r),
            (40, 120, 50))


def _car(c: Canvas, rng: random.Random, x: float, ground: float, scale: float) -> None:
    colour = rng.choice(["red", "blue", "yellow", "green", "white", "black"])
    car = c.add("car", colour)
    w, h = 0.22 * scale, 0.06 * scale
    c.paint(car, "rectangle", (x, ground - h - 0.025 * scale, x + w, ground - 0.025 * scale), PALETTE[colour])
    c.paint(car, "rectangle", (x + 0.25 * w, ground - 2 * h - 0.02 * scale, x + 0.75 * w,
                               ground - h - 0.02 * scale), PALETTE[colour])
    for wx in (x + 0.22 * w, x + 0.78 * w):
        wheel = c.add("wheel", "black", car)
        r = 0.03 * scale
        c.paint(wheel, "ellipse", (wx - r, ground - 2 * r, wx + r, ground), PALETTE["black"])


def _person(c: Canvas, rng: random.Random, x: float, ground: float, scale: float) -> None:
    colour = rng.choice(["red", "blue", "green", "yellow", "purple"])
    person = c.add("person", colour)
    legs = (60, 60, 90)
    c.paint(person, "rectangle", (x - 0.02 * scale, ground - 0.08 * scale, x + 0.02 * scale, ground), legs)
    shirt = c.add("shirt", colour, person)
    c.paint(shirt, "rectangle", (x - 0.03 * scale, ground - 0.16 * scale, x + 0.03 * scale, ground - 0.08 * scale),
            PALETTE[colour])
    head = c.add("head", "", person)
    r = 0.025 * scale
    c.paint(head, "ellipse", (x - r, ground - 0.16 * scale - 2 * r, x + r, ground - 0.16 * scale), (230, 190, 160))


def _small(c: Canvas, rng: random.Random, x: float, ground: float, scale: float) -> None:
    kind = rng.choice(["flower", "stone", "circle", "square", "triangle", "star", "ball", "bush", "fence"])
    r = rng.uniform(0.035, 0.06) * scale
    colour = {"stone": "grey", "bush": "green", "fence": "white"}.get(kind) or rng.choice(
        ["red", "blue", "yellow", "purple", "orange", "pink"])
    thing = c.add(kind, colour)
    col = PALETTE[colour] if kind != "bush" else (55, 125, 55)
    y = ground - r
    if kind in ("circle", "ball", "stone", "bush"):
        squash = 0.6 if kind == "stone" else 1.0
        c.paint(thing, "ellipse", (x - r, y - r * squash, x + r, y + r * squash), col)
    elif kind == "square":
        c.paint(thing, "rectangle", (x - r, y - r, x + r, y + r), col)
    elif kind == "triangle":
        c.paint(thing, "polygon", [(x, y - r), (x + r, y + r), (x - r, y + r)], col)
    elif kind == "star":
        pts = [(x + (r if i % 2 == 0 else r / 2.3) * math.sin(i * math.pi / 5),
                y - (r if i % 2 == 0 else r / 2.3) * math.cos(i * math.pi / 5)) for i in range(10)]
        c.paint(thing, "polygon", pts, col)
    elif kind == "flower":
        c.paint(thing, "rectangle", (x - 1, y, x + 1, ground), (40, 120, 50))
        c.paint(thing, "ellipse", (x - r * 0.6, y - r * 0.6, x + r * 0.6, y + r * 0.6), col)
    else:  # fence: a few posts and a rail
        for k in range(4):
            c.paint(thing, "rectangle", (x - 2 * r + k * r, y - r, x - 2 * r + k * r + 3, ground), col)
        c.paint(thing, "rectangle", (x - 2 * r, y - 0.6 * r, x + r + 3, y - 0.3 * r), col)


def draw_scene(rng: random.Random, size: int) -> Canvas:
    """One random scene; objects further down (nearer) are drawn later, so they occlude."""
    c = Canvas(size)
    horizon = _sky_and_ground(c, rng)
    _sun_and_clouds(c, rng, horizon)
    makers = [_house] * 2 + [_tree] * 2 + [_car] * 2 + [_person] * 2 + [_small] * 4
    placed = []
    for _ in range(rng.randint(3, 6)):
        ground = rng.uniform(horizon + 0.05 * size, size * 0.97)
        scale = size * (0.6 + 0.6 * (ground - horizon) / max(1, size - horizon))
        placed.append((ground, rng.uniform(0.02, 0.8) * size, rng.choice(makers), scale))
    for ground, x, make, scale in sorted(placed, key=lambda p: p[0]):
        make(c, rng, x, ground, scale)
    return c


def _relation(a: tuple[float, ...], b: tuple[float, ...]) -> str:
    ax, ay, bx, by = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2, (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
    if abs(ax - bx) >= abs(ay - by):
        return "left of" if ax < bx else "right of"
    return "above" if ay < by else "below"


def caption(thing: Thing, box: tuple[float, ...], others: list[tuple[Thing, tuple[float, ...]]],
            things: list[Thing], rng: random.Random) -> str:
    name = f"{thing.colour} {thing.concept}" if thing.colour else thing.concept
    if thing.parent >= 0:
        whole = things[thing.parent]
        owner = f"{whole.colour} {whole.concept}" if whole.colour else whole.concept
        return f"the {name} of a {owner}"
    if thing.concept in ("sky", "grass", "hill", "road") or not others or rng.random() < 0.3:
        return f"a {name}"
    other, obox = rng.choice(others)
    return f"a {name} {_relation(box, obox)} a {other.concept}"


def make_world(out: str | Path, train: int = 800, eval: int = 100, seed: int = 0, size: int = 256, dim: int = 1024,
               noise: float = 0.6) -> dict[str, Path]:
    """Write the world (see the module docstring); deterministic for a seed. Returns the main paths."""
    out = Path(out)
    rng = random.Random(seed)
    vecs = np.random.default_rng(seed).standard_normal((len(CONCEPTS), dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    index = {c: i for i, c in enumerate(CONCEPTS)}
    writer = PriorsWriter(out / "priors", dim, teacher=f"synthetic:seed={seed}", templates=["a {}"])
    writer.write_concepts(vecs.T * 100.0, CONCEPTS)
    (out / "concepts.txt").write_text("\n".join(CONCEPTS) + "\n")
    world: dict = {"concepts": CONCEPTS, "size": size, "seed": seed, "splits": {}}
    noise_rng = np.random.default_rng(seed + 1)
    ann_id = 0
    for split, count, first_id in (("train", train, 1), ("eval", eval, 1_000_001)):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        keys, embeddings, images, cap_images, cap_anns = [], [], [], [], []
        for n in range(count):
            image_id = first_id + n
            canvas = draw_scene(rng, size)
            anns, objects = [], []
            found = canvas.masks()
            boxes = []
            for _, mask in found:
                ys, xs = np.nonzero(mask)
                boxes.append((float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)))
            wholes = [(t, b) for (t, _), b in zip(found, boxes) if t.parent < 0 and t.concept not in ("sky", "grass")]
            for (thing, mask), box in zip(found, boxes):
                ann_id += 1
                ys, xs = np.nonzero(mask)
                k = len(ys) // 2
                others = [(t, b) for t, b in wholes if t is not thing]
                text = caption(thing, box, others, canvas.things, rng)
                x1, y1, x2, y2 = box
                anns.append({"id": ann_id, "segmentation": encode_rle(mask), "bbox": [x1, y1, x2 - x1, y2 - y1],
                             "area": int(mask.sum()), "point_coords": [[float(xs[k]), float(ys[k])]],
                             "predicted_iou": 1.0, "stability_score": 1.0, "crop_box": [0, 0, size, size]})
                vec = vecs[index[thing.concept]]
                if thing.parent >= 0:
                    vec = 0.85 * vec + 0.5 * vecs[index[canvas.things[thing.parent].concept]]
                    vec = vec / np.linalg.norm(vec)
                keys.append(mask_key(image_id, ann_id))
                embeddings.append(vec + noise * noise_rng.standard_normal(dim).astype(np.float32) / math.sqrt(dim))
                objects.append({"id": ann_id, "concept": thing.concept, "colour": thing.colour,
                                "bbox": [x1, y1, x2, y2], "caption": text,
                                "part_of": canvas.things[thing.parent].concept if thing.parent >= 0 else ""})
                cap_anns.append({"id": ann_id, "image_id": image_id, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                 "caption": text})
            name = f"sa_{image_id}"
            canvas.image.save(folder / f"{name}.jpg", quality=95)
            info = {"image_id": image_id, "width": size, "height": size, "file_name": f"{name}.jpg"}
            (folder / f"{name}.json").write_text(json.dumps({"image": info, "annotations": anns}))
            cap_images.append({"id": image_id, "file_name": f"{name}.jpg", "width": size, "height": size})
            images.append({"image_id": image_id, "file": f"{split}/{name}.jpg", "objects": objects})
        writer.write_shard(split, keys, np.stack(embeddings) if embeddings else np.zeros((0, dim), np.float32))
        (out / f"captions_{split}.json").write_text(json.dumps({"images": cap_images, "annotations": cap_anns}))
        world["splits"][split] = images
    (out / "world.json").write_text(json.dumps(world))
    return {"train": out / "train", "eval": out / "eval", "priors": out / "priors", "world": out / "world.json",
            "captions_train": out / "captions_train.json", "captions_eval": out / "captions_eval.json",
            "concepts": out / "concepts.txt"}


def labels(world_json: str | Path, split: str = "eval") -> dict[str, str]:
    """Region key -> concept name, for scoring concept predictions on a split of the world."""
    world = json.loads(Path(world_json).read_text())
    return {mask_key(im["image_id"], o["id"]): o["concept"] for im in world["splits"][split] for o in im["objects"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="folder to write (train/, eval/, priors/, captions, world.json)")
    parser.add_argument("--train", type=int, default=800, help="training scenes")
    parser.add_argument("--eval", type=int, default=100, help="held-out scenes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--dim", type=int, default=1024, help="teacher embedding width (the model's sem_embed_dim)")


def run(args: argparse.Namespace) -> int:
    if min(args.train, args.eval) < 0 or args.size < 64 or args.dim < 8:
        print("error: need --train/--eval >= 0, --size >= 64 and --dim >= 8")
        return 2
    for key, path in make_world(args.out, args.train, args.eval, args.seed, args.size, args.dim).items():
        print(f"{key}: {path}")
    return 0
