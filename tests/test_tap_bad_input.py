"""The readers of TAP training data (`finetune/tap/records.py`, `priors.py`) on bad input: every kind of bad record
is counted under its reason and skipped while the rest of its image and the other images stay usable; a bad whole
input (a cut or garbled tar shard, a missing folder, a broken priors shard) raises one error naming the file; and
COCO RLE is pycocotools' own, bit for bit. `tests/test_tap_teacher.py` feeds the same kinds of input to the
`tap-train` and `tap-priors` command lines."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from finetune.tap.priors import Priors, PriorsWriter
from finetune.tap.records import (
    InputError,
    MaskSizeError,
    decode_rle,
    encode_rle,
    open_coco,
    open_regions,
    open_sa1b,
    open_vg_captions,
    tar_bytes,
)

H, W = 16, 24


# ----------------------------------------------------------------------------------------------------------- RLE
def masks() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    blob = np.zeros((300, 450), bool)
    blob[40:260, 100:130] = blob[120:140, 20:400] = True
    corners = np.zeros((7, 5), bool)
    corners[0, 0] = corners[-1, -1] = True
    return {"random non-square": rng.random((13, 7)) < 0.5, "random wide": rng.random((3, 40)) < 0.2,
            "empty": np.zeros((6, 9), bool), "full": np.ones((9, 6), bool), "first and last pixel": corners,
            "one column": rng.random((11, 1)) < 0.5, "large, long runs": blob}


def column_runs(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed counts: column-major runs, starting with zeros."""
    flat = mask.ravel(order="F")
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], edges, [flat.size]))).tolist()
    return [0, *runs] if flat[0] else runs


@pytest.mark.parametrize("name", list(masks()))
def test_rle_round_trips_against_pycocotools(name):
    mask = masks()[name]
    theirs = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    ours = encode_rle(mask)
    assert ours == {"size": list(mask.shape), "counts": theirs["counts"].decode()}
    assert json.loads(json.dumps(ours)) == ours  # it goes into SA-1B JSON as it is
    for rle in (ours, theirs, {"size": list(mask.shape), "counts": column_runs(mask)}):
        decoded = decode_rle(rle, mask.shape)
        assert decoded.dtype == bool and decoded.shape == mask.shape and np.array_equal(decoded, mask)
    assert np.array_equal(mask_utils.decode(ours), mask)
    uncompressed = mask_utils.frPyObjects({"size": list(mask.shape), "counts": column_runs(mask)}, *mask.shape)
    assert uncompressed["counts"] == theirs["counts"]  # the test's own runs are COCO's


@pytest.mark.parametrize("counts, message", [
    ("1", "add up to 1 pixels, not 4x5"),  # pycocotools would leave the other 19 pixels uninitialised
    ("0i0", "add up to 25 pixels"),
    ("0!", "invalid character"),
    ("0P", "ends inside a number"),
    ("111K", "negative run"),  # the fourth count is the second plus -5
    ([5, -1, 16], "negative run"),
    ([2.5, 17.5], "whole numbers"),
    ([30], "add up to 30 pixels"),
    (7, "a string or a list"),
])
def test_malformed_rle_counts_are_refused(counts, message):
    with pytest.raises(ValueError, match=message):
        decode_rle({"size": [4, 5], "counts": counts}, (4, 5))


def test_an_rle_of_another_size_is_refused_before_it_is_decoded():
    runs = {"size": [100_000, 100_000], "counts": [4_000_000_000, 4_000_000_000, 2_000_000_000]}
    huge = mask_utils.frPyObjects(runs, 100_000, 100_000)  # well-formed: 10 GB once decoded
    with pytest.raises(MaskSizeError, match="declares 100000x100000 pixels, the image has 4x5"):
        decode_rle(huge, (4, 5))
    with pytest.raises(MaskSizeError, match="declares 5x4"):
        decode_rle(encode_rle(np.ones((5, 4), bool)), (4, 5))
    with pytest.raises(ValueError, match="needs 'size'"):
        decode_rle({"counts": "04"}, (4, 5))


# --------------------------------------------------------------------------------------------------- records
def image_files(i: int, change_first: Callable[[dict], object] | None = None) -> dict[str, bytes]:
    """SA-1B image `i` (PNG bytes: lossless) with two masks, as file name -> bytes; `change_first` edits the first
    annotation."""
    top, bottom = np.zeros((H, W), bool), np.zeros((H, W), bool)
    top[2:8, 3:12] = True
    bottom[9:15, 10:20] = True
    anns = [{"id": 10 * i, "segmentation": encode_rle(top), "bbox": [3, 2, 9, 6]},
            {"id": 10 * i + 1, "segmentation": encode_rle(bottom), "bbox": [10, 9, 10, 6]}]
    if change_first is not None:
        change_first(anns[0])
    png = io.BytesIO()
    Image.fromarray(np.full((H, W, 3), 60 * i, np.uint8)).save(png, format="PNG")
    return {f"sa_{i}.jpg": png.getvalue(),
            f"sa_{i}.json": json.dumps({"image": {"image_id": i}, "annotations": anns}).encode()}


def break_first_mask(change: Callable[[dict], object]) -> Callable[[dict[str, bytes]], None]:
    """Change the first annotation of image 1 (its second mask and image 0 stay good)."""
    return lambda files: files.update(image_files(1, change))


def second_mask(i: int) -> dict:
    return json.loads(image_files(i)[f"sa_{i}.json"])["annotations"][1]


def set_json(data: object) -> Callable[[dict[str, bytes]], None]:
    return lambda files: files.update({"sa_1.json": json.dumps(data).encode()})


def two_images(folder: Path, edit: Callable[[dict[str, bytes]], None] | None = None, tar: bool = False) -> Path:
    files = {**image_files(0), **image_files(1)}
    if edit is not None:
        edit(files)
    folder.mkdir(exist_ok=True)
    if tar:
        (folder / "sa_000000.tar").write_bytes(tar_bytes(files))
        return folder / "sa_000000.tar"
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


#: reason -> [(how image 1 is broken, regions still usable of the four)]
BAD_RECORDS = {
    "missing or corrupt image": [(lambda files: files.update({"sa_1.jpg": b"GIF89a cut"}), 2)],
    "unreadable annotation JSON": [(lambda files: files.update({"sa_1.json": b'{"image": '}), 2),
                                   (set_json({"image": {"image_id": 1}}), 2),
                                   (set_json({"image": [1], "annotations": {}}), 2)],
    "malformed annotation": [(set_json({"image": {"image_id": 1}, "annotations": [7, second_mask(1)]}), 3)],
    "missing mask": [(break_first_mask(lambda a: a.pop("segmentation")), 3)],
    "broken RLE": [(break_first_mask(lambda a: a["segmentation"].update(counts="0!")), 3),
                   (break_first_mask(lambda a: a["segmentation"].update(counts="1")), 3),
                   (break_first_mask(lambda a: a["segmentation"].pop("size")), 3)],
    "mask size differs from the image": [(break_first_mask(lambda a: a["segmentation"].update(size=[W, H])), 3)],
    "broken polygon": [(break_first_mask(lambda a: a.update(segmentation=[[1, 2, "x", 4, 5, 6]])), 3)],
    "missing box": [(break_first_mask(lambda a: a.pop("bbox")), 3)],
    "malformed box": [(break_first_mask(lambda a: a.update(bbox=[1, 2, 3])), 3),
                      (break_first_mask(lambda a: a.update(bbox=[1, 2, float("nan"), 3])), 3)],
    "box outside the image": [(break_first_mask(lambda a: a.update(bbox=[100, 100, 5, 5])), 3)],
    "empty mask": [(break_first_mask(lambda a: a.update(segmentation=encode_rle(np.zeros((H, W), bool)))), 3)],
}


@pytest.mark.parametrize("tar", [False, True], ids=["folder", "tar"])
@pytest.mark.parametrize("reason, case", [(r, i) for r, cases in BAD_RECORDS.items() for i in range(len(cases))])
def test_each_bad_record_is_counted_listed_and_skipped(tmp_path, reason, case, tar):
    """The bad record is counted once under its reason, listed with its file, and everything else still loads."""
    edit, usable = BAD_RECORDS[reason][case]
    dataset = open_sa1b(two_images(tmp_path / "sa1b", edit, tar))
    samples = [dataset[i] for i in range(len(dataset))] + [dataset[1]]  # read twice, as in a second epoch
    assert dataset.bad.counts == {reason: 1}
    (said, where), = dataset.bad.examples
    assert said == reason and ("sa_000000.tar:sa_1.json" if tar else str(tmp_path / "sa1b" / "sa_1.json")) in where
    assert sum(len(s.regions) for s in samples[:2] if s is not None) == usable
    assert samples[0] is not None and [r.key for r in samples[0].regions] == ["0/0", "0/1"]
    assert f"{reason}: 1 (e.g. " in dataset.bad.summary()


def test_an_image_missing_from_its_shard_or_an_unreadable_json_is_a_bad_record(tmp_path):
    dataset = open_sa1b(two_images(tmp_path / "tar", lambda files: files.pop("sa_1.jpg"), tar=True))
    assert dataset[1] is None and dataset.bad.examples == [
        ("missing or corrupt image", "sa_000000.tar:sa_1.json: no sa_1.jpg in the shard")]
    folder = two_images(tmp_path / "folder")
    (folder / "sa_2.json").mkdir()  # listed like an annotation file, unreadable as one
    dataset = open_sa1b(folder)
    assert [s is not None for s in (dataset[i] for i in range(len(dataset)))] == [True, True, False]
    assert dataset.bad.counts == {"unreadable annotation JSON": 1} and "sa_2.json" in dataset.bad.examples[0][1]


# ------------------------------------------------------------------------------------------- COCO and VG
def test_coco_and_vg_entries_that_are_not_records_are_counted(tmp_path):
    two_images(tmp_path)
    good = json.loads(image_files(0)["sa_0.json"])["annotations"]
    instances = {
        "images": [{"id": 0, "file_name": "sa_0.jpg"}, {"file_name": "sa_1.jpg"}, "sa_2.jpg"],
        "annotations": [{**good[0], "image_id": 0, "category_id": 3, "caption": "the top block"},
                        {**good[1], "image_id": 0, "category_id": 3},
                        {**good[1], "id": 2, "image_id": 0, "iscrowd": 1},  # crowd: left out, not bad
                        {**good[1], "id": 3, "image_id": 9}, {**good[1], "id": 4, "image_id": [0]}, None],
        "categories": [{"id": 3, "name": "block"}, "nothing"]}
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    captions = [{"id": 0, "regions": [{"region_id": 5, "x": 10, "y": 9, "width": 10, "height": 6,
                                       "phrase": "the bottom block"}, {"region_id": 6}]}, [1], {"id": [0]}]
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    (tmp_path / "0.jpg").write_bytes(image_files(0)["sa_0.jpg"])  # the official VG layout names images by id
    dataset = open_coco(tmp_path / "instances.json", tmp_path, captions=tmp_path / "captions.json")
    assert len(dataset) == 1
    sample = dataset[0]
    assert [(r.key, r.category, r.caption) for r in sample.regions] == [
        ("0/0", "block", "the top block"), ("0/1", "block", "the bottom block")]
    assert dataset.bad.counts == {"malformed image entry": 4, "malformed annotation": 3}
    assert all(where.startswith(("instances.json: ", "captions.json: ")) for _, where in dataset.bad.examples)

    vg = open_vg_captions(tmp_path / "captions.json", tmp_path)
    assert [(r.key, r.caption) for r in vg[0].regions] == [("0/5", "the bottom block")]
    assert vg.bad.counts == {"malformed image entry": 2}
    assert open_regions(tmp_path / "instances.json", tmp_path).name.startswith("coco:")


# ---------------------------------------------------------------------------------------------- whole inputs
def cut_tar(data: bytes, how: str) -> bytes:
    """A shard broken the ways a download or a copy breaks one."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last = tar.getmembers()[-1]
    ends = last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return {"in a member's data": data[:last.offset_data + 10],
            "between two members": data[:last.offset],
            "after the last member": data[:ends],  # every member whole, no end-of-archive block
            "inside a header": data[:last.offset + 100],
            "garbled header": data[:last.offset] + b"x" * tarfile.BLOCKSIZE + data[last.offset_data:]}[how]


@pytest.mark.parametrize("how", ["in a member's data", "between two members", "after the last member",
                                 "inside a header", "garbled header"])
def test_a_cut_or_garbled_tar_shard_is_refused_whole(tmp_path, how):
    shard = two_images(tmp_path, tar=True)
    shard.write_bytes(cut_tar(shard.read_bytes(), how))
    with pytest.raises(InputError, match=rf"^{re.escape(str(shard))}: truncated or corrupt tar shard"):
        open_sa1b(shard)
    with pytest.raises(InputError, match="truncated or corrupt tar shard"):  # in a folder of shards too
        open_sa1b(tmp_path)


def test_other_unreadable_inputs_raise_one_error_naming_the_file(tmp_path):
    import gzip
    shard = two_images(tmp_path / "gz", tar=True)
    shard.write_bytes(gzip.compress(shard.read_bytes()))  # SA-1B shards are plain tars, read by offset
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"")
    (tmp_path / "empty").mkdir()
    for path, error, message in [(shard, InputError, "not an uncompressed tar archive"),
                                 (junk, InputError, "not an uncompressed tar archive"),
                                 (tmp_path / "nowhere", FileNotFoundError, "no such SA-1B folder or shard"),
                                 (tmp_path / "empty", ValueError, "no SA-1B annotations")]:
        with pytest.raises(error, match=f"^{re.escape(str(path))}: {message}"):
            open_sa1b(path)
    (tmp_path / "shards" / "sa_000001.tar").mkdir(parents=True)  # in a folder of shards, a "shard" that is a folder
    with pytest.raises(InputError, match=f"^{re.escape(str(tmp_path / 'shards' / 'sa_000001.tar'))}: cannot be read"):
        open_sa1b(tmp_path / "shards")
    with pytest.raises(FileNotFoundError, match="no such SA-1B folder or shard, or annotation file"):
        open_regions(tmp_path / "nowhere")

    dataset = open_sa1b(two_images(tmp_path / "shrinks", tar=True))
    (tmp_path / "shrinks" / "sa_000000.tar").write_bytes(b"")  # replaced during the run
    with pytest.raises(InputError, match="sa_0.jpg is cut short"):
        dataset[0]


def test_a_broken_priors_folder_is_refused_naming_the_file(tmp_path):
    writer = PriorsWriter(tmp_path, dim=4)
    good = writer.write_shard("a", ["0/0", "0/1"], np.ones((2, 4), np.float32))
    assert len(Priors(tmp_path)) == 2
    cut = writer.write_shard("b", ["1/0"], np.ones((1, 4), np.float32))
    cut.write_bytes(cut.read_bytes()[:-8])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(cut))}: not a readable priors shard"):
        Priors(tmp_path)
    cut.unlink()
    from safetensors.torch import save_file
    save_file({"embeddings": torch.ones(3, 4)}, str(good), metadata={"keys": '["0/0"]'})
    with pytest.raises(ValueError, match=rf"^{re.escape(str(good))}: 1 keys for embeddings of shape \(3, 4\)"):
        Priors(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match="manifest.json: not a priors manifest"):
        Priors(tmp_path)
