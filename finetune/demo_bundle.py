"""What a demo-models bundle holds besides its metrics: the two trained checkpoints, copied and stored in float16
(`pack`), and the gallery of held-out scenes that the app shows as its examples (`gallery`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from finetune.tap.world import Annotation

GALLERY_SIZE = 256
GALLERY_SCAN = 64
GALLERY_CONCEPTS = ("sun", "house", "car", "boat", "tree", "balloon", "cloud")
TAP_FILES = ("config.json", "model.safetensors", "text_tokenizer.model", "concepts.safetensors")


def gallery(bundle: Path, seed: int, count: int = 4) -> list[dict]:
    """Held-out scenes (the eval split's first ones, drawn at `GALLERY_SIZE` px: the same scene, finer) with a click
    or a box (`prompt`) on an object that is the only one of its kind, and a question whose answer is known: the
    app's example gallery for the demo models (`gallery/examples.json`, the layout of examples/examples.json) and
    what tests check."""
    from collections import Counter  # heavy: `python -m finetune` imports this module for every command's parser

    from PIL import Image

    from finetune.tap.world import render
    folder = bundle / "gallery"
    folder.mkdir(parents=True, exist_ok=True)
    items: list[dict] = []
    for index in range(GALLERY_SCAN):  # any eval-split scene is unseen in training, also past --eval-images
        scene = render(seed, "eval", index, GALLERY_SIZE)
        counts = Counter(r.concept for r in scene.regions)
        shown = {item["concept"] for item in items}
        picks = [r for r in scene.regions if r.kind == "object" and r.concept in GALLERY_CONCEPTS and r.colour
                 and counts[r.concept] == 1 and r.concept not in shown and r.area >= 0.01 * GALLERY_SIZE ** 2]
        if not picks:
            continue
        r = max(picks, key=lambda p: p.area)
        name = f"scene_{scene.image_id}.jpg"
        Image.fromarray(scene.image).save(folder / name, "JPEG", quality=92)
        items.append({"image": name, "regions": [prompt(r)],
                      "question": "What colour is <region1>?", "concept": r.concept, "answer": r.colour})
        if len(items) == count:
            break
    (folder / "examples.json").write_text(json.dumps(items, indent=1))
    return items


def prompt(region: Annotation) -> dict:
    """The gallery's prompt for an object: a click where the object is one piece (a sun, a cloud), a box where it is
    made of parts (a click on a house lands on its wall or a window, and a part is as right an answer as the whole,
    as for SAM; the box says which is meant)."""
    if region.parts:
        return {"box": [int(v) for v in region.box]}
    x, y = region.point()
    return {"point": [round(x), round(y)]}


def pack(tap_run: Path, chat_run: Path, bundle: Path) -> None:
    """Copy the two checkpoints into the bundle (the chat one naming `../tap`), stored in float16."""
    from assistant.model import ChatModel  # heavy: `python -m finetune` imports this module for every command's parser
    if bundle.exists():
        shutil.rmtree(bundle)
    (bundle / "tap").mkdir(parents=True)
    for name in TAP_FILES:
        shutil.copyfile(tap_run / name, bundle / "tap" / name)
    chat = ChatModel.from_pretrained(chat_run)
    chat.config = chat.config.with_(tap_model="../tap")
    chat.save_pretrained(bundle / "chat")
    for path in bundle.rglob("*.safetensors"):
        halve(path)


def halve(path: Path) -> None:
    """Store a safetensors file's float32 tensors as float16 (metadata kept): half the bytes in the repository.
    Loading casts them back into the float32 modules, and the bundle is evaluated as stored."""
    import torch  # heavy: `python -m finetune` imports this module for every command's parser
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        names = f.keys()  # a safe_open handle is not iterable
        tensors = {k: f.get_tensor(k) for k in names}
    save_file({k: v.half() if v.dtype == torch.float32 else v for k, v in tensors.items()}, str(path), metadata)
