"""The synthetic scene world (`tap-world`): SA-1B layout the readers accept, exact masks, priors whose targets name
the right concept, grounded Visual Genome captions that share keys with the masks, and byte-exact determinism."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.tap import world as tw
from finetune.tap.priors import Priors, mask_key, target_log_probs
from finetune.tap.records import BadRecords, decode_rle, open_sa1b, open_vg_captions

SEED = 3


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("world")
    tw.make_world(folder, train=16, eval=4, seed=SEED, dim=64)
    return folder


def annotations(out: Path, split: str) -> list[dict]:
    records = [json.loads(p.read_text()) for p in (out / split).glob("sa_*.json")]
    return sorted(records, key=lambda r: r["image"]["image_id"])


def test_sa1b_layout_reads_without_bad_records(out: Path) -> None:
    for split, count, first in (("train", 16, 1), ("eval", 4, tw.EVAL_BASE + 1)):
        bad = BadRecords()
        data = open_sa1b(out / split, bad=bad)
        samples = [data[i] for i in range(len(data))]
        assert len(samples) == count and all(s is not None for s in samples)
        assert bad.counts == {}
        records = {r["image"]["image_id"]: r for r in annotations(out, split)}
        assert min(records) == first
        for sample in samples:
            record = records[int(sample.id)]
            info = record["image"]
            assert (out / split / info["file_name"]).is_file() and (out / split / f"{info['image_id']}.jpg").is_file()
            assert sample.image.shape == (info["height"], info["width"], 3) == (256, 256, 3)
            assert len(sample.regions) == len(record["annotations"]) >= 5
            for ann in record["annotations"]:
                assert {"id", "segmentation", "bbox", "area", "point_coords", "predicted_iou", "stability_score",
                        "crop_box"} <= set(ann)
                assert ann["id"] // 1000 == info["image_id"] and ann["crop_box"] == [0, 0, 256, 256]


def test_masks_are_exact_visible_pixels_and_parts_nest(out: Path) -> None:
    for split in ("train", "eval"):
        for index, record in enumerate(annotations(out, split)[:6]):
            scene = tw.render(SEED, split, index)
            assert scene.image_id == record["image"]["image_id"]
            saved = np.asarray(Image.open(out / split / record["image"]["file_name"]).convert("RGB"), float)
            assert np.abs(saved - scene.image).mean() < 3  # JPEG quality 95 of the drawn image
            by_id = {r.id: r for r in scene.regions}
            assert [a["id"] for a in record["annotations"]] == list(by_id)
            for ann in record["annotations"]:
                mask = decode_rle(ann["segmentation"])
                region = by_id[ann["id"]]
                assert np.array_equal(mask, region.mask) and mask.sum() == ann["area"] >= tw.MIN_AREA
                ys, xs = np.nonzero(mask)
                assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                x, y = ann["point_coords"][0]
                assert mask[int(y), int(x)]
                if region.part_of is not None:  # a part lies inside its object, and siblings do not overlap
                    parent = by_id[region.part_of]
                    assert not (mask & ~parent.mask).any()
                    assert all(not (mask & by_id[s].mask).any() for s in parent.parts if s != region.id)
            # occlusion: objects and stuff are visible pixels, so they never share one, and they cover the image
            # but for the specks that were dropped
            wholes = [r.mask for r in scene.regions if r.kind != "part"]
            assert max(np.sum(wholes, axis=0).ravel()) == 1
            assert np.mean(np.any(wholes, axis=0)) > 0.99


def test_relations_hold_for_the_boxes_and_agree_both_ways(out: Path) -> None:
    data = json.loads((out / "world.json").read_text())
    seen = set()
    opposite = dict(zip(tw_relations := ("left of", "right of", "above", "below", "in front of", "behind"),
                        ("right of", "left of", "below", "above", "behind", "in front of")))
    for entry in data["splits"]["train"]:
        objs = {o["id"]: o for o in entry["objects"]}
        for o in objs.values():
            assert o["position"] in tw.PLACES
            assert (o["kind"] == "part") == (o["part_of"] is not None)
            for rel, other in o["relations"]:
                seen.add(rel)
                a, b = o["bbox"], objs[other]["bbox"]
                assert o["kind"] == objs[other]["kind"] == "object"
                assert [opposite[rel], o["id"]] in objs[other]["relations"]
                holds = {"left of": a[0] + a[2] <= b[0], "right of": a[0] >= b[0] + b[2],
                         "above": a[1] + a[3] <= b[1], "below": a[1] >= b[1] + b[3]}
                assert holds.get(rel, True)
    assert seen == set(tw_relations)


def test_every_mask_has_a_prior_whose_target_names_its_concept(out: Path) -> None:
    priors = Priors(out / "priors")
    weights, names = priors.concepts()
    assert names == (out / "concepts.txt").read_text().split() == list(tw.CONCEPTS)
    assert 30 <= len(names) <= 60 and priors.dim == 64 and priors.teacher.startswith(f"synthetic:seed={SEED}")
    assert np.allclose(weights.norm(dim=0).numpy(), tw.LOGIT_SCALE, rtol=1e-4)
    data = json.loads((out / "world.json").read_text())
    keys, concepts = [], []
    for split in ("train", "eval"):
        for entry in data["splits"][split]:
            keys += [mask_key(entry["image_id"], o["id"]) for o in entry["objects"]]
            concepts += [o["concept"] for o in entry["objects"]]
    assert len(priors) == len(keys) and all(k in priors for k in keys)
    assert set(concepts) <= set(names)
    probs = target_log_probs(priors.embeddings(keys), weights).exp()
    top1 = np.mean([names[i] == c for i, c in zip(probs.argmax(1).tolist(), concepts)])
    assert top1 >= 0.9
    assert probs.max(1).values.min() < 0.99  # targets are not all one-hot
    assert tw.load_labels(out, "eval") == {k: c for k, c in zip(keys, concepts) if k.startswith("100")}


def test_captions_are_grounded_and_read_as_visual_genome(out: Path) -> None:
    data = json.loads((out / "world.json").read_text())
    for split in ("train", "eval"):
        bad = BadRecords()
        captions = open_vg_captions(out / f"captions_{split}.json", out / split, bad=bad)
        masks = {s.id: s for s in map(open_sa1b(out / split).__getitem__, range(len(captions)))}
        assert len(captions) == len(masks) and bad.counts == {}
        for i, entry in enumerate(data["splits"][split]):
            sample, masked = captions[i], masks[str(entry["image_id"])]
            assert sample.id == str(entry["image_id"])
            assert [r.key for r in sample.regions] == [r.key for r in masked.regions]
            assert [r.bbox for r in sample.regions] == [r.bbox for r in masked.regions]
            for obj, region in zip(entry["objects"], sample.regions):
                assert region.caption == obj["caption"]
                assert obj["concept"] in obj["caption"]
                assert obj["colour"] is None or obj["colour"] in obj["caption"]
                if obj["kind"] == "part":
                    assert obj["caption"].startswith("the ") and " of a" in obj["caption"]
    colours = {}
    for entry in data["splits"]["train"]:
        for o in entry["objects"]:
            colours.setdefault(o["concept"], set()).add(o["colour"])
    assert all(len(colours.get(c, ())) >= 3 for c in ("car", "house", "person"))  # colour is not the concept's


def test_same_arguments_give_the_same_bytes(tmp_path: Path) -> None:
    def content(path: Path) -> object:
        data = path.read_bytes()
        if path.suffix != ".safetensors":
            return data
        n = int.from_bytes(data[:8], "little")  # the header's metadata is a map whose order safetensors varies
        return json.loads(data[8:8 + n]), data[8 + n:]

    def files(folder: Path) -> dict[str, object]:
        return {str(p.relative_to(folder)): content(p) for p in sorted(folder.rglob("*")) if p.is_file()}

    for name in ("a", "b"):
        tw.make_world(tmp_path / name, train=3, eval=1, seed=7, dim=40)
    tw.make_world(tmp_path / "c", train=3, eval=2, seed=8, dim=40)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b and len(a) > 10
    assert a["train/sa_1.jpg"] != c["train/sa_1.jpg"]


def test_eval_images_do_not_depend_on_the_train_count(tmp_path: Path, out: Path) -> None:
    tw.make_world(tmp_path / "w", train=1, eval=1, seed=SEED, dim=64)
    name = f"sa_{tw.EVAL_BASE + 1}"
    for ext in (".jpg", ".json"):
        assert (tmp_path / "w" / "eval" / (name + ext)).read_bytes() == (out / "eval" / (name + ext)).read_bytes()


def test_command_line_and_user_errors(tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser()
    tw.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "w"), "--train", "2", "--eval", "0", "--dim", "40", "--size", "96"])
    assert tw.run(args) == 0
    assert "priors:" in capsys.readouterr().out
    assert Image.open(tmp_path / "w" / "train" / "sa_1.jpg").size == (96, 96)
    assert tw.run(args) == 2  # the folder is not empty any more
    assert "not empty" in capsys.readouterr().err
    for bad, says in ((dict(train=0, eval=0), "at least one image"), (dict(train=1, eval=1, size=16), "--size"),
                      (dict(train=1, eval=1, noise=-1.0), "--noise"), (dict(train=1, eval=1, dim=8), "--dim")):
        with pytest.raises(ValueError, match=says):
            tw.make_world(tmp_path / "x", **bad)
