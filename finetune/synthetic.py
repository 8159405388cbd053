"""A small dataset made in code, to prove the pipeline learns: coloured shapes at known places.

Each image (256x256, light background) holds one to three shapes (circle, square, triangle) in four colours, each
in its own cell of a 3x3 grid. Training records are multi-turn conversations about the image; evaluation questions
are held-out images with one short-answer question each: the colour or shape at a place, the number of shapes, or
the colour of a clicked region given as the assistant's region line (box only, so the answer must come from the
pixels). Answers are one word, scored by exact match. Chance is 1/4 for colours and 1/3 for shapes and counts.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from assistant.template import line as region_line
from tokenizer_tap.region import PLACES, Region

SIZE = 256
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three")


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    cell: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        cw = SIZE // 3
        x, y = (self.cell % 3) * cw, (self.cell // 3) * cw
        return x + 14, y + 14, x + cw - 14, y + cw - 14


def draw(shapes: list[Shape]) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), (236, 236, 228))
    d = ImageDraw.Draw(img)
    for s in shapes:
        x1, y1, x2, y2 = s.box
        col = COLOURS[s.colour]
        if s.shape == "circle":
            d.ellipse((x1, y1, x2, y2), fill=col)
        elif s.shape == "square":
            d.rectangle((x1, y1, x2, y2), fill=col)
        else:
            d.polygon([((x1 + x2) // 2, y1), (x2, y2), (x1, y2)], fill=col)
    return img


def caption(shapes: list[Shape]) -> str:
    parts = [f"a {s.colour} {s.shape} at the {PLACES[s.cell]}" for s in sorted(shapes, key=lambda s: s.cell)]
    return (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]) + "."


def questions(shapes: list[Shape], rng: random.Random) -> list[tuple[str, str, str]]:
    """(kind, question, answer) about one image."""
    out = [("count", "How many shapes are there?", COUNTS[len(shapes) - 1])]
    for s in shapes:
        out.append(("colour", f"What colour is the shape at the {PLACES[s.cell]}?", s.colour))
        out.append(("shape", f"What shape is at the {PLACES[s.cell]}?", s.shape))
    s = rng.choice(shapes)
    x1, y1, x2, y2 = s.box
    line = region_line(Region([("shape", 1.0)], box=(x1, y1, x2 + 1, y2 + 1), size=(SIZE, SIZE), number=1))
    out.append(("region", f"{line}\nWhat colour is <region1>?", s.colour))
    return out


def scene(rng: random.Random) -> list[Shape]:
    cells = rng.sample(range(9), rng.randint(1, 3))
    return [Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), c) for c in cells]


def make(folder: str | Path, train_images: int = 400, eval_images: int = 100, seed: int = 0,
         kinds: tuple[str, ...] = ("count", "colour", "shape", "region")) -> dict[str, Path]:
    """Write images/, captions.json (stage 1), train.json (stage 2, multi-turn) and eval.json (held out).

    `kinds` restricts the questions (the quick test in the suite uses colour and region questions only).
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    captions, train, evaluation = [], [], []
    for i in range(train_images + eval_images):
        shapes = scene(rng)
        name = f"images/{i:05d}.png"
        draw(shapes).save(folder / name)
        qs = [q for q in questions(shapes, rng) if q[0] in kinds]
        if i < train_images:
            captions.append({"id": f"cap-{i}", "image": name,
                             "conversations": [{"from": "human", "value": "<image>"},
                                               {"from": "gpt", "value": caption(shapes)}]})
            picked = rng.sample(qs, min(3, len(qs)))
            conv = []
            for k, (_, q, a) in enumerate(picked):
                conv += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + q}, {"from": "gpt", "value": a}]
            train.append({"id": f"train-{i}", "image": name, "conversations": conv})
        else:
            kind, q, a = rng.choice(qs)
            evaluation.append({"id": f"eval-{i}", "image": name, "kind": kind, "question": q, "answer": a})
    paths = {"captions": folder / "captions.json", "train": folder / "train.json", "eval": folder / "eval.json"}
    for key, data in [("captions", captions), ("train", train), ("eval", evaluation)]:
        paths[key].write_text(json.dumps(data, indent=1))
    return paths

