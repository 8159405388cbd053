"""Writing the synthetic world to disk (`python -m finetune tap-world OUT`), and reading back what the region
benchmarks need: SA-1B records, simulated teacher priors, Visual Genome captions, `world.json`, COCO / LVIS
instance files, and the command line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..coco_rle import encode_rle
from ..priors import PriorsWriter, mask_key
from .canvas import PALETTE
from .scene import CONCEPTS, EVAL_BASE, SPLITS, Scene, render

FORMAT = "tapchat-world/1"
LOGIT_SCALE = 100.0  # CLIP's: the concept matrix is normalised text embeddings x this
CHUNK = 500  # images per priors shard, so memory stays flat for large worlds


def concept_vectors(seed: int, dim: int) -> np.ndarray:
    """(K, dim) the simulated teacher's orthonormal concept vectors (fixed by the seed): orthogonal, so how often a
    target is wrong depends on the noise alone, not on the width."""
    q, _ = np.linalg.qr(np.random.default_rng([seed, 0xC0DE]).normal(size=(dim, len(CONCEPTS))))
    return q.T


def sa1b_record(scene: Scene, size: int) -> dict:
    """A scene's `sa_<id>.json`: the SA-1B fields `records.open_sa1b` reads, exact masks as RLE."""
    return {"image": {"image_id": scene.image_id, "width": size, "height": size,
                      "file_name": f"sa_{scene.image_id}.jpg"},
            "annotations": [{"id": r.id, "segmentation": encode_rle(r.mask), "bbox": r.bbox,
                             "area": r.area, "point_coords": [r.point()], "predicted_iou": 1.0,
                             "stability_score": 1.0, "crop_box": [0, 0, size, size]} for r in scene.regions]}


def world_entry(scene: Scene, split: str, size: int) -> dict:
    """A scene's entry in `world.json`: the facts chat questions are answered from."""
    return {"image_id": scene.image_id, "file_name": f"{split}/sa_{scene.image_id}.jpg", "width": size,
            "height": size,
            "objects": [{"id": r.id, "concept": r.concept, "colour": r.colour, "kind": r.kind, "bbox": r.bbox,
                         "area": r.area, "position": r.position, "part_of": r.part_of, "parts": r.parts,
                         "relations": [list(x) for x in r.relations], "caption": r.caption}
                        for r in scene.regions]}


def _link(src: Path, dst: Path) -> None:
    """`dst` as a second name of `src` (VG's `<id>.jpg`), copied where hard links are not allowed."""
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
    """The `tap-world` command's options."""
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
    """The `tap-world` command: bad arguments and unwritable folders exit 2 with one line on stderr."""
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
