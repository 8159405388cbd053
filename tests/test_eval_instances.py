"""The region-level benchmarks (paper Tables 1 and 3) on a small COCO/LVIS-format export of the synthetic world:
the evaluators themselves (perfect answers score 100, shuffled categories fall, faster-coco-eval's LVIS mode equals
the reference `lvis` package), and `eval run lvis-cls` / `coco-seg` end to end with a TAP checkpoint folder."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from eval import instances
from eval.cli import main as eval_main


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from finetune.tap.world import export_instances, make_world
    folder = tmp_path_factory.mktemp("world")
    make_world(folder, train=1, eval=6, seed=3, size=128, dim=64)
    export_instances(folder, "eval")
    export_instances(folder, "eval", lvis=True)
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
    assert instances.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5) == [0, 2]
    assert instances.nms(boxes, torch.tensor([0.5, 0.8, 0.7]), 0.5) == [1, 2]
    data = {"categories": [{"id": 7, "name": "traffic_light"}, {"id": 3, "name": "car"}]}
    assert instances.vocabulary_categories(["car", "Traffic Light"], data) == [3, 7]
    assert instances.vocabulary_categories(["a", "b"], data) == [3, 7]  # same size: by position, in id order
    with pytest.raises(ValueError, match="does not match"):
        instances.vocabulary_categories(["car", "bus", "tram"], data)


@pytest.fixture(scope="module")
def checkpoint(world: Path, tmp_path_factory) -> Path:
    """tap_tiny with random weights and the world's 38 concepts as its vocabulary, saved as a checkpoint folder."""
    from tokenizer_tap.build import TINY_TOKENIZER, build_tap
    from tokenizer_tap.checkpoint import save_pretrained
    tap = build_tap("tap_tiny", random_weights=True, seed=0, device="cpu", dtype="float32")
    names = json.loads((world / "world.json").read_text())["concepts"]
    weights = torch.randn(tap.config.sem_embed_dim, len(names), generator=torch.Generator().manual_seed(0))
    folder = tmp_path_factory.mktemp("tap")
    save_pretrained(tap, folder, TINY_TOKENIZER, (weights.numpy() * 30, names))
    return folder


def test_lvis_cls_runs_resumes_and_scores(world: Path, checkpoint: Path, tmp_path: Path, capsys) -> None:
    answers = tmp_path / "cls.jsonl"
    args = ["run", "lvis-cls", "--questions", str(world / "lvis_eval.json"), "--images", str(world),
            "--tap-checkpoint", str(checkpoint), "--answers", str(answers), "--batch-size", "2"]
    eval_main(args)
    out = capsys.readouterr().out
    assert "6 answered" in out and "APr" in out and "box AP (LVIS evaluator)" in out
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        detections = json.loads(row["text"])
        assert 0 < len(detections) <= 300 and all(0 <= d["score"] <= 1 for d in detections)
    eval_main(args)  # a rerun resumes: nothing left to answer
    assert "0 answered, 6 already in" in capsys.readouterr().out
    eval_main(["score", "lvis-cls", str(answers), "--annotations", str(world / "lvis_eval.json")])
    assert "APf" in capsys.readouterr().out


def test_coco_seg_uses_the_detectors_boxes_scores_and_categories(world: Path, checkpoint: Path, tmp_path: Path,
                                                                 capsys) -> None:
    data = instances.read(world / "instances_eval.json")
    detections = perfect(data, "bbox")
    detections.append({"image_id": 999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5})  # unknown image
    (tmp_path / "dets.json").write_text(json.dumps(detections))
    answers = tmp_path / "seg.jsonl"
    eval_main(["run", "coco-seg", "--questions", str(world / "instances_eval.json"), "--images", str(world),
               "--detections", str(tmp_path / "dets.json"), "--tap-checkpoint", str(checkpoint),
               "--answers", str(answers)])
    out = capsys.readouterr().out
    assert "1 bad records" in out and "detection " in out and "APl" in out
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    results, _ = instances.results_of(rows)
    assert len(results) == len(data["annotations"])
    by_image = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["category_id"])
    assert sorted(r["category_id"] for r in results) == sorted(a["category_id"] for a in data["annotations"])
    assert all(r["score"] == 1.0 and r["segmentation"]["size"] == [128, 128] for r in results)


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
