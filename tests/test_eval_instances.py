"""The region-level benchmarks (paper Tables 1 and 3) on small COCO/LVIS files of non-square scenes whose boxes and
masks are known exactly: the evaluators themselves (perfect answers score 100, shuffled categories fall,
faster-coco-eval's LVIS mode equals the reference `lvis` package), what the answerer writes checked box by box and
mask by mask (through an oracle decoder, so a height/width swap anywhere shows), and `eval run lvis-cls` /
`coco-seg` end to end with a TAP checkpoint folder."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from eval import instances, tap_answerers
from eval.cli import main as eval_main
from tokenizer_tap.image_io import load_image
from tokenizer_tap.predictor import TapPredictor

# Category ids are neither contiguous nor in name order, and the vocabulary below lists them in yet another order
# and spelling: a mapping by position, or a lookup by index instead of id, gives wrong categories.
CATEGORIES = {4: ("red_box", (220, 40, 40)), 9: ("blue disc", (40, 60, 220)), 17: ("green_bar", (40, 200, 60)),
              23: ("yellow ring", (230, 210, 40))}
VOCABULARY = ["Yellow_Ring", "green bar", "Red Box", "Blue_Disc"]
# (width, height) and the shapes on each: (category id, kind, x0, y0, x1, y1). Both orientations, and shapes past
# the short side of the landscape images, so swapping height and width moves, clips or reshapes them.
SCENES = [((176, 96), [(4, "box", 8, 10, 60, 70), (9, "disc", 100, 4, 168, 70), (17, "box", 70, 74, 150, 90)]),
          ((96, 160), [(23, "ring", 10, 90, 86, 150), (4, "box", 20, 8, 70, 60)]),
          ((200, 120), [(17, "box", 120, 10, 140, 110), (9, "disc", 10, 30, 80, 100), (23, "ring", 150, 40, 196, 90)]),
          ((128, 72), [(4, "box", 90, 8, 124, 64), (9, "disc", 4, 4, 60, 60)])]


def shape_mask(kind: str, box: tuple[int, int, int, int], width: int, height: int) -> np.ndarray:
    x0, y0, x1, y1 = box
    ys, xs = np.mgrid[:height, :width]
    inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    if kind == "box":
        return inside
    cx, cy, rx, ry = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    r = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2
    return inside & (r <= 1) & ((r >= 0.35) if kind == "ring" else True)


def rle(mask: np.ndarray) -> dict:
    encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode()}


def write_scenes(folder: Path) -> dict[str, Path]:
    """The images (PNG), a COCO instances file and an LVIS one over them, and the exact masks by annotation id."""
    (folder / "eval").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id, ((width, height), shapes) in enumerate(SCENES, start=11):
        pixels = rng.integers(90, 130, (height, width, 3), dtype=np.uint8)
        for category, kind, *box in shapes:
            mask = shape_mask(kind, tuple(box), width, height)
            pixels[mask] = CATEGORIES[category][1]
            ys, xs = np.nonzero(mask)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                         int(ys.max() - ys.min() + 1)],
                                "area": int(mask.sum()), "segmentation": rle(mask), "iscrowd": 0})
        name = f"eval/scene_{image_id}.png"
        Image.fromarray(pixels).save(folder / name)
        images.append({"id": image_id, "width": width, "height": height, "file_name": name})
    categories = [{"id": i, "name": name, "supercategory": "shape"} for i, (name, _) in CATEGORIES.items()]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    lvis = {"images": [{"id": im["id"], "width": im["width"], "height": im["height"], "neg_category_ids": [],
                        "not_exhaustive_category_ids": [], "coco_url": f"http://example.invalid/{im['file_name']}"}
                       for im in images],
            "annotations": [{k: v for k, v in a.items() if k != "iscrowd"} for a in annotations],
            "categories": [{**c, "frequency": "rcf"[n % 3]} for n, c in enumerate(categories)]}
    paths = {"coco": folder / "instances_eval.json", "lvis": folder / "lvis_eval.json"}
    paths["coco"].write_text(json.dumps(coco))
    paths["lvis"].write_text(json.dumps(lvis))
    return paths


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scenes")
    write_scenes(folder)
    return folder


def perfect(data: dict, iou_type: str) -> list[dict]:
    key = "bbox" if iou_type == "bbox" else "segmentation"
    return [{"image_id": a["image_id"], "category_id": a["category_id"], key: a[key], "score": 1.0}
            for a in data["annotations"]]


@pytest.mark.parametrize("name", ["instances_eval.json", "lvis_eval.json"])
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_perfect_answers_score_100_and_wrong_categories_fall(world: Path, name: str, iou_type: str) -> None:
    data = instances.read(world / name)
    assert instances.flavour(data) == ("lvis" if name.startswith("lvis") else "coco")
    metrics = instances.evaluate(data, perfect(data, iou_type), iou_type)
    assert metrics["AP"] == pytest.approx(100.0)
    if instances.flavour(data) == "lvis":
        assert {"APr", "APc", "APf"} <= set(metrics)
    shuffled = perfect(data, iou_type)
    ids = [c["id"] for c in data["categories"]]
    rng = random.Random(0)
    for det in shuffled:
        det["category_id"] = rng.choice([i for i in ids if i != det["category_id"]])
    assert instances.evaluate(data, shuffled, iou_type)["AP"] < 10.0


def test_faster_coco_eval_lvis_mode_equals_the_lvis_package(world: Path, monkeypatch) -> None:
    """Why faster-coco-eval: the reference `lvis` (0.5.3) needs `np.float`, gone since numpy 1.24. With that alias
    patched back in, both give the same APs on noisy detections."""
    lvis = pytest.importorskip("lvis")
    data = instances.read(world / "lvis_eval.json")
    rng = np.random.default_rng(0)
    ids = [c["id"] for c in data["categories"]]
    results = []
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        results.append({"image_id": a["image_id"], "bbox": [x + rng.normal() * 2, y + rng.normal() * 2, w, h],
                        "category_id": a["category_id"] if rng.random() < 0.7 else int(rng.choice(ids)),
                        "score": float(rng.random())})
    ours = instances.evaluate(data, results, "bbox")
    monkeypatch.setattr(np, "float", float, raising=False)
    gt = lvis.LVIS(str(world / "lvis_eval.json"))
    reference = lvis.LVISEval(gt, lvis.LVISResults(gt, [dict(r) for r in results]), "bbox")
    reference.run()
    got = reference.get_results()
    for ours_key, ref_key in [("AP", "AP"), ("AP50", "AP50"), ("AP75", "AP75"), ("APr", "APr"), ("APc", "APc"),
                              ("APf", "APf")]:
        assert ours[ours_key] == pytest.approx(100 * got[ref_key], abs=1e-6), ours_key


def test_nms_and_the_vocabulary_mapping() -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
    assert tap_answerers.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5) == [0, 2]
    assert tap_answerers.nms(boxes, torch.tensor([0.5, 0.8, 0.7]), 0.5) == [1, 2]
    data = {"categories": [{"id": 7, "name": "traffic_light"}, {"id": 3, "name": "car"}, {"id": 5, "name": "t-shirt"}]}
    assert instances.vocabulary_categories(["car", "Traffic Light", "t shirt"], data) == [3, 7, 5]
    with pytest.raises(ValueError, match=r"3 of 3 names are not category names \(entries 0: 'a'; 1: 'b'; 2: 'c'"):
        instances.vocabulary_categories(["a", "b", "c"], data)  # same size, other names: never mapped by position
    with pytest.raises(ValueError, match=r"1 of 3 names are not category names \(entries 1: 'bus';"):
        instances.vocabulary_categories(["car", "bus", "traffic light"], data)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """tap_tiny with random weights and VOCABULARY as its concepts, entry k scored by direction k of the semantic
    embedding (what the oracle decoder below emits), saved as a checkpoint folder."""
    from tokenizer_tap.build import TINY_TOKENIZER, build_tap
    from tokenizer_tap.checkpoint import save_pretrained
    tap = build_tap("tap_tiny", random_weights=True, seed=0, device="cpu", dtype="float32")
    weights = 30 * np.eye(tap.config.sem_embed_dim, len(VOCABULARY), dtype=np.float32)
    folder = tmp_path_factory.mktemp("tap")
    save_pretrained(tap, folder, TINY_TOKENIZER, (weights, VOCABULARY))
    return folder


@pytest.fixture
def oracle(world: Path, monkeypatch) -> None:
    """Replace TAP's decoder by one that knows the scenes: for a box prompt (original pixels, as the answerer sends
    it) that is an annotation's box, that annotation's known mask drawn in the model's resized and padded input
    frame, and a semantic embedding that picks its category in VOCABULARY; for any other box, an empty mask and no
    category. Everything around the decoder (the prompts, the way back to the original size, RLE, categories,
    boxes) is the real code."""
    data = instances.read(world / "instances_eval.json")
    names = {c["id"]: c["name"].replace("_", " ").lower() for c in data["categories"]}
    vocabulary = [n.replace("_", " ").lower() for n in VOCABULARY]
    by_key = {}
    for image in data["images"]:
        key = TapPredictor.image_key(load_image(world / image["file_name"]))
        by_key[key] = [a for a in data["annotations"] if a["image_id"] == image["id"]]

    def decode_rows(self, image, rows):
        size, (rh, rw) = image.info.size, image.info.resized_hw
        masks, embeds = [], []
        for row in rows:
            box = (*row[0][:2], *row[1][:2])
            ann = next((a for a in by_key[image.key] if box_iou(box, instances.xyxy(a["bbox"])) > 0.95), None)
            logits, embed = torch.full((size, size), -10.0), torch.zeros(self.model.concept_projector.sem_dim)
            if ann is not None:
                mask = coco_mask.decode(ann["segmentation"]).astype(bool)
                resized = np.array(Image.fromarray(mask).resize((rw, rh), Image.NEAREST))
                logits[:rh, :rw][torch.from_numpy(resized)] = 10.0
                embed[vocabulary.index(names[ann["category_id"]])] = 1.0
            masks.append(logits)
            embeds.append(embed)
        n = len(rows)
        return {"iou": torch.ones(n), "index": torch.zeros(n, dtype=torch.long), "mask_logits": torch.stack(masks),
                "sem_tokens": torch.zeros(n, 8), "sem_embeds": torch.stack(embeds)}

    monkeypatch.setattr(TapPredictor, "decode_rows", decode_rows)


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union


def answers_by_image(path: Path) -> dict[int, list[dict]]:
    return {int(row["question_id"]): json.loads(row["text"])
            for row in map(json.loads, path.read_text().splitlines())}


def test_classify_writes_the_known_boxes_and_categories(world: Path, checkpoint: Path, oracle, tmp_path: Path,
                                                        capsys) -> None:
    answers = tmp_path / "cls.jsonl"
    eval_main(["run", "lvis-cls", "--questions", str(world / "lvis_eval.json"), "--images", str(world),
               "--tap-checkpoint", str(checkpoint), "--answers", str(answers)])
    data = instances.read(world / "lvis_eval.json")
    got = answers_by_image(answers)
    assert set(got) == {image["id"] for image in data["images"]}
    for image_id, detections in got.items():
        truth = sorted((a["category_id"], a["bbox"]) for a in data["annotations"] if a["image_id"] == image_id)
        assert sorted((d["category_id"], d["bbox"]) for d in detections) == truth, image_id
        assert all(d["score"] == pytest.approx(1.0) for d in detections)
    assert "| ours | 100.0 |" in capsys.readouterr().out


def test_segment_writes_the_known_masks_at_each_images_size(world: Path, checkpoint: Path, oracle, tmp_path: Path,
                                                             capsys) -> None:
    data = instances.read(world / "instances_eval.json")
    detections = [{**det, "score": 0.5 + 0.01 * n} for n, det in enumerate(perfect(data, "bbox"))]
    (tmp_path / "dets.json").write_text(json.dumps(detections))
    answers = tmp_path / "seg.jsonl"
    eval_main(["run", "coco-seg", "--questions", str(world / "instances_eval.json"), "--images", str(world),
               "--detections", str(tmp_path / "dets.json"), "--tap-checkpoint", str(checkpoint),
               "--answers", str(answers)])
    assert "APl" in capsys.readouterr().out
    sizes = {image["id"]: [image["height"], image["width"]] for image in data["images"]}
    got = answers_by_image(answers)
    for det in detections:  # each box's detection: the detector's category and score, the known mask
        truth = next(a for a in data["annotations"] if a["image_id"] == det["image_id"] and a["bbox"] == det["bbox"])
        mine = next(d for d in got[det["image_id"]] if d["score"] == det["score"])
        assert mine["category_id"] == truth["category_id"]
        assert mine["segmentation"]["size"] == sizes[det["image_id"]]
        mask, known = coco_mask.decode(mine["segmentation"]), coco_mask.decode(truth["segmentation"])
        assert (mask & known).sum() / (mask | known).sum() > 0.9, (det["image_id"], truth["id"])


def test_lvis_cls_runs_resumes_and_scores(world: Path, checkpoint: Path, tmp_path: Path, capsys) -> None:
    answers = tmp_path / "cls.jsonl"
    args = ["run", "lvis-cls", "--questions", str(world / "lvis_eval.json"), "--images", str(world),
            "--tap-checkpoint", str(checkpoint), "--answers", str(answers), "--batch-size", "2"]
    eval_main(args)
    out = capsys.readouterr().out
    assert f"{len(SCENES)} answered" in out and "APr" in out and "box AP (LVIS evaluator)" in out
    data = instances.read(world / "lvis_eval.json")
    boxes = {image["id"]: {tuple(a["bbox"]) for a in data["annotations"] if a["image_id"] == image["id"]}
             for image in data["images"]}
    got = answers_by_image(answers)
    assert set(got) == set(boxes)
    for image_id, detections in got.items():  # the real model's classes are random; its boxes are the known ones
        assert 0 < len(detections) <= 300 and all(0 <= d["score"] <= 1 for d in detections)
        assert {tuple(d["bbox"]) for d in detections} <= boxes[image_id]
        assert {d["category_id"] for d in detections} <= set(CATEGORIES)
    eval_main(args)  # a rerun resumes: nothing left to answer
    assert f"0 answered, {len(SCENES)} already in" in capsys.readouterr().out
    eval_main(["score", "lvis-cls", str(answers), "--annotations", str(world / "lvis_eval.json")])
    assert "APf" in capsys.readouterr().out


def test_coco_seg_uses_the_detectors_boxes_scores_and_categories(world: Path, checkpoint: Path, tmp_path: Path,
                                                                 capsys) -> None:
    data = instances.read(world / "instances_eval.json")
    detections = perfect(data, "bbox")
    detections.append({"image_id": 999, "category_id": 4, "bbox": [0, 0, 5, 5], "score": 0.5})  # unknown image
    (tmp_path / "dets.json").write_text(json.dumps(detections))
    answers = tmp_path / "seg.jsonl"
    eval_main(["run", "coco-seg", "--questions", str(world / "instances_eval.json"), "--images", str(world),
               "--detections", str(tmp_path / "dets.json"), "--tap-checkpoint", str(checkpoint),
               "--answers", str(answers)])
    out = capsys.readouterr().out
    assert "1 bad records" in out and "detection 10: image 999 is not in the annotations file" in out and "APl" in out
    results = [{**d, "image_id": i} for i, dets in answers_by_image(answers).items() for d in dets]
    assert len(results) == len(data["annotations"])
    assert sorted(r["category_id"] for r in results) == sorted(a["category_id"] for a in data["annotations"])
    sizes = {image["id"]: [image["height"], image["width"]] for image in data["images"]}
    assert all(r["score"] == 1.0 and r["segmentation"]["size"] == sizes[r["image_id"]] for r in results)


def test_lvis_results_keep_the_best_300_per_image(world: Path, tmp_path: Path, capsys) -> None:
    """As the official LVIS evaluator (max_dets=300): an image's detections beyond its best 300 by score are dropped
    before scoring, and the report says how many."""
    data = instances.read(world / "lvis_eval.json")
    truth = perfect(data, "bbox")
    noise = [{"image_id": 11, "category_id": 9, "bbox": [1, 1, 4, 4], "score": 0.5 - n / 1000} for n in range(305)]
    rows = [{"question_id": 11, "text": json.dumps([{k: v for k, v in d.items() if k != "image_id"}
                                                    for d in truth + noise if d["image_id"] == 11])}]
    results = instances.results_of(rows, data, "bbox")
    kept = sorted(d["score"] for d in results.detections)
    assert results.dropped == 8 and len(kept) == 300
    assert kept[0] == pytest.approx(0.5 - 296 / 1000)  # the lowest scores went: the best 300 stayed
    assert all(t in results.detections for t in truth if t["image_id"] == 11)
    (tmp_path / "results.json").write_text(json.dumps(truth + noise))
    eval_main(["score", "lvis-cls", str(tmp_path / "results.json"), "--annotations", str(world / "lvis_eval.json")])
    out = capsys.readouterr().out
    assert "Note: 8 detections beyond the best 300 of their image dropped" in out
    coco = instances.read(world / "instances_eval.json")
    assert instances.results_of(rows, coco, "bbox").dropped == 0  # COCO's evaluator applies its own maxDets


def test_missing_files_are_said_plainly(world: Path, tmp_path: Path) -> None:
    base = ["--images", str(world), "--tiny", "--answers", str(tmp_path / "x.jsonl")]
    with pytest.raises(SystemExit, match="--detections"):
        eval_main(["run", "coco-seg", "--questions", str(world / "instances_eval.json"), *base])
    with pytest.raises(SystemExit, match="not shipped"):
        eval_main(["run", "coco-seg", "--questions", str(world / "instances_eval.json"), "--detections",
                   str(tmp_path / "none.json"), *base])
    with pytest.raises(SystemExit, match="lvisdataset.org"):
        eval_main(["run", "lvis-cls", "--questions", str(tmp_path / "lvis_v1_val.json"), *base])


def test_a_checkpoint_without_a_vocabulary_is_refused_plainly(world: Path, tmp_path: Path) -> None:
    from tokenizer_tap.build import TINY_TOKENIZER, build_tap
    from tokenizer_tap.checkpoint import save_pretrained
    save_pretrained(build_tap("tap_tiny", random_weights=True, device="cpu", dtype="float32"), tmp_path / "ck",
                    TINY_TOKENIZER)
    with pytest.raises(SystemExit, match="no concept vocabulary"):
        eval_main(["run", "lvis-cls", "--questions", str(world / "lvis_eval.json"), "--images", str(world),
                   "--tap-checkpoint", str(tmp_path / "ck"), "--answers", str(tmp_path / "x.jsonl")])


def test_score_takes_any_systems_coco_results(world: Path, tmp_path: Path, capsys) -> None:
    data = instances.read(world / "lvis_eval.json")
    (tmp_path / "results.json").write_text(json.dumps(perfect(data, "segm")))
    eval_main(["score", "lvis-seg", str(tmp_path / "results.json"), "--annotations", str(world / "lvis_eval.json")])
    assert "| ours | 100.0 |" in capsys.readouterr().out
