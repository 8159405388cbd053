"""The JSON annotation files TAP trains from besides SA-1B: COCO instances ("my own data", RLE or polygon masks) and
Visual Genome region captions (the official `region_descriptions.json`, or GRiT's JSON, which is COCO-style and so
shares COCO's index). A file that is not JSON, or not of its layout, raises one error naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .priors import mask_key
from .samples import BadRecords, ImageSample, RegionDataset
from .validate import checked_region, decode_segmentation, is_id, read_image, xyxy


def load_json(path: str | Path) -> Any:
    """A whole annotation file; one error naming it when it cannot be read or is not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise FileNotFoundError(f"{path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def _coco_index(data: Any, path: Path, bad: BadRecords) -> tuple[dict[Any, dict], dict[Any, list[dict]]]:
    """Images by id and their annotations; an entry that is not an object with a usable id, or an annotation of an
    image the file does not list, is counted and left out."""
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        raise ValueError(f"{path}: a COCO-style file needs 'images' and 'annotations' lists")
    images: dict[Any, dict] = {}
    for im in data["images"]:
        if isinstance(im, dict) and is_id(im.get("id")):
            images[im["id"]] = im
        else:
            bad.add("malformed image entry", f"{path.name}: {im!r}"[:300])
    anns: dict[Any, list[dict]] = {i: [] for i in images}
    for ann in data["annotations"]:
        if isinstance(ann, dict) and is_id(ann.get("image_id")) and ann["image_id"] in anns:
            anns[ann["image_id"]].append(ann)
        else:
            bad.add("malformed annotation", f"{path.name}: no listed image_id in {ann!r}"[:300])
    return images, anns


def _box_key(bbox: Any) -> tuple[int, ...] | None:
    """A rounded xywh box, to match the regions of two files by; None when it is not a box."""
    try:
        xyxy(bbox)
    except (TypeError, ValueError):
        return None
    return tuple(round(float(v)) for v in bbox)


def _caption_lookup(path: str | Path | None, bad: BadRecords) -> dict[tuple[Any, tuple[int, ...] | None], str]:
    """Captions of a VG/GRiT-style file by (image id, rounded box), to attach to matching COCO regions."""
    if path is None:
        return {}
    out = {}
    for image_id, regions in _vg_regions(load_json(path), Path(path), bad).items():
        for _, bbox, caption in regions:
            out[(image_id, _box_key(bbox))] = caption
    return out


def open_coco(instances: str | Path, image_folder: str | Path, captions: str | Path | None = None,
              bad: BadRecords | None = None, max_masks: int | None = None) -> RegionDataset:
    """A COCO instances file (RLE or polygon masks); crowd regions are left out. Region captions come from an
    annotation's own "caption" field or from a VG/GRiT-style `captions` file with the same image ids and boxes."""
    bad = bad if bad is not None else BadRecords()
    path = Path(instances)
    data = load_json(path)
    images, anns = _coco_index(data, path, bad)
    categories = data.get("categories") if isinstance(data.get("categories"), list) else []
    names = {str(c.get("id")): str(c.get("name", "")) for c in categories if isinstance(c, dict)}
    extra = _caption_lookup(captions, bad)
    folder = Path(image_folder)

    def load(image_id: Any) -> ImageSample | None:
        info = images[image_id]
        where = f"{path.name} image {image_id}"
        image = read_image(folder / str(info.get("file_name", "")), where, bad)
        if image is None:
            return None
        hw = image.shape[:2]
        regions = []
        for ann in [a for a in anns[image_id] if not a.get("iscrowd")][:max_masks or None]:
            at = f"{where} annotation {ann.get('id')}"
            mask = decode_segmentation(ann.get("segmentation"), hw, at, bad)
            if mask is None:
                continue
            caption = ann.get("caption")
            if not isinstance(caption, str) or not caption:
                caption = extra.get((image_id, _box_key(ann.get("bbox"))), "")
            region = checked_region(mask_key(image_id, ann.get("id")), ann.get("bbox"), mask, hw, at, bad, caption,
                                    names.get(str(ann.get("category_id")), ""))
            if region is not None:
                regions.append(region)
        return ImageSample(str(image_id), image, regions)

    return RegionDataset(f"coco:{path}", list(images), load, bad)


def _vg_regions(data: Any, path: Path, bad: BadRecords) -> dict[Any, list[tuple[Any, Any, str]]]:
    """image id -> [(region id, xywh box, caption)] from the official list or GRiT's COCO-style dict (boxes are
    checked where they are used)."""
    out: dict[Any, list] = {}
    if isinstance(data, list):  # official region_descriptions.json
        for entry in data:
            image_id = entry.get("id", entry.get("image_id")) if isinstance(entry, dict) else None
            if not is_id(image_id) or not isinstance(entry.get("regions", []), list):
                bad.add("malformed image entry", f"{path.name}: {entry!r}"[:300])
                continue
            out[image_id] = [(r.get("region_id"), (r["x"], r["y"], r["width"], r["height"]), r.get("phrase", ""))
                             for r in entry.get("regions", [])
                             if isinstance(r, dict) and {"x", "y", "width", "height"} <= set(r)]
        return out
    images, anns = _coco_index(data, path, bad)
    for image_id in images:
        out[image_id] = [(a.get("id"), a["bbox"], a.get("caption", "")) for a in anns[image_id] if "bbox" in a]
    return out


def open_vg_captions(path: str | Path, image_folder: str | Path, bad: BadRecords | None = None) -> RegionDataset:
    """Region captions with boxes: the official `region_descriptions.json` (images as `<image_id>.jpg` in
    `image_folder`) or GRiT's JSON (COCO-style, images by `file_name`). Regions have no masks."""
    bad = bad if bad is not None else BadRecords()
    path = Path(path)
    data = load_json(path)
    regions = _vg_regions(data, path, bad)
    files = {im["id"]: str(im.get("file_name") or "") for im in data["images"]
             if isinstance(im, dict) and is_id(im.get("id"))} if isinstance(data, dict) else {}
    folder = Path(image_folder)

    def load(image_id: Any) -> ImageSample | None:
        where = f"{path.name} image {image_id}"
        image = read_image(folder / (files.get(image_id) or f"{image_id}.jpg"), where, bad)
        if image is None:
            return None
        kept = []
        for rid, bbox, caption in regions[image_id]:
            region = checked_region(mask_key(image_id, rid), bbox, None, image.shape[:2], f"{where} region {rid}",
                                    bad, str(caption).strip())
            if region is not None and region.caption:
                kept.append(region)
        return ImageSample(str(image_id), image, kept)

    return RegionDataset(f"vg:{path}", [i for i, r in regions.items() if r], load, bad)
