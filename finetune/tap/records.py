"""Readers of region data for TAP pre-training: SA-1B (folders or the distributed .tar shards, read in place), COCO
instances ("my own data") and Visual Genome region captions (official `region_descriptions.json` or GRiT's JSON).

Every reader is a random-access `RegionDataset` (the trainer draws its own order) that decodes lazily. Records a
trainer cannot use are counted in a `BadRecords`, listed with where they came from, and skipped: a missing or
corrupt image, JSON that does not parse, an RLE that does not decode or does not fit the image, an empty mask, a box
outside the image.
"""

from __future__ import annotations

import io
import json
import tarfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from tokenizer_tap.errors import ImageError
from tokenizer_tap.image_io import load_image

from .priors import mask_key


# ----------------------------------------------------------------------------------------------------------- RLE
def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of an (H, W) boolean mask: column-major runs starting with zeros, each run written as
    5-bit groups in characters from '0' (48), a continuation bit 0x20, and runs after the second as the difference
    to the run two before."""
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], edges, [flat.size]))).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    chars = []
    for i, c in enumerate(counts):
        x = c - counts[i - 2] if i > 2 else c
        while True:
            group = x & 0x1F
            x >>= 5
            more = not ((x == 0 and not group & 0x10) or (x == -1 and group & 0x10))
            chars.append(chr(group + (0x20 if more else 0) + 48))
            if not more:
                break
    return {"size": [int(h), int(w)], "counts": "".join(chars)}


def _rle_counts(text: str) -> list[int]:
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        x, shift, more = 0, 0, True
        while more:
            if pos >= len(text):
                raise ValueError("RLE string ends inside a number")
            c = ord(text[pos]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"RLE string has an invalid character {text[pos]!r}")
            x |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos += 1
            shift += 5
            if not more and c & 0x10:
                x |= -1 << shift
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """An (H, W) boolean mask from COCO RLE (compressed string or uncompressed list of counts); ValueError if broken."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError):
        raise ValueError("RLE needs 'size' [h, w] and 'counts'") from None
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", "replace")
    runs = _rle_counts(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if h <= 0 or w <= 0 or any(r < 0 for r in runs) or sum(runs) != h * w:
        raise ValueError(f"RLE runs add up to {sum(runs)} pixels, not {h}x{w}")
    values = np.arange(len(runs)) % 2 == 1
    return np.repeat(values, runs).reshape(w, h).T


def polygons_to_mask(polygons: list[list[float]], h: int, w: int) -> np.ndarray:
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        if len(poly) >= 6:
            draw.polygon([(float(x), float(y)) for x, y in zip(poly[0::2], poly[1::2])], fill=1)
    return np.asarray(canvas, dtype=bool)


# --------------------------------------------------------------------------------------------------- records
@dataclass
class RegionAnn:
    key: str  # priors.mask_key(image_id, ann_id): what the concept prior and captions are looked up by
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 in original pixels
    mask: np.ndarray | None  # (H, W) bool; None for caption-only boxes (Visual Genome)
    caption: str = ""
    category: str = ""  # concept name where the source has one (COCO categories)


@dataclass
class ImageSample:
    id: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    regions: list[RegionAnn]


@dataclass
class BadRecords:
    """Unusable records by reason, with the first examples of each: what `summary` prints after a run."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: list[tuple[str, str]] = field(default_factory=list)
    limit: int = 1000
    _seen: set = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, reason: str, where: str) -> None:
        with self._lock:
            if (reason, where) in self._seen:  # an image read again in a later epoch is one bad record
                return
            self._seen.add((reason, where))
            self.counts[reason] = self.counts.get(reason, 0) + 1
            if len(self.examples) < self.limit:
                self.examples.append((reason, where))

    def summary(self) -> str:
        if not self.counts:
            return "no bad records"
        lines = []
        for reason, n in sorted(self.counts.items()):
            shown = [w for r, w in self.examples if r == reason][:3]
            lines.append(f"{reason}: {n} (e.g. {'; '.join(shown)})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": [list(e) for e in self.examples]}


def _xyxy(bbox: Any) -> tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in bbox)
    return x, y, x + w, y + h


class RegionDataset:
    """Random access to images with their regions; `__getitem__` returns None for an unusable image."""

    def __init__(self, name: str, entries: list[Any], loader: Callable[[Any], ImageSample | None],
                 bad: BadRecords) -> None:
        self.name, self._entries, self._loader, self.bad = name, entries, loader, bad

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i: int) -> ImageSample | None:
        return self._loader(self._entries[i])


def _read_image(source: Any, where: str, bad: BadRecords) -> np.ndarray | None:
    try:
        return load_image(source)
    except ImageError as exc:
        bad.add("missing or corrupt image", f"{where}: {exc}"[:300])
        return None


def _region(key: str, bbox: Any, mask: np.ndarray | None, image_hw: tuple[int, int], where: str, bad: BadRecords,
            caption: str = "", category: str = "") -> RegionAnn | None:
    """Validate one region against its image; None (and counted) when unusable."""
    h, w = image_hw
    try:
        x1, y1, x2, y2 = _xyxy(bbox)
    except (TypeError, ValueError):
        bad.add("malformed box", where)
        return None
    cx1, cy1, cx2, cy2 = max(0.0, x1), max(0.0, y1), min(float(w), x2), min(float(h), y2)
    if cx2 - cx1 <= 0 or cy2 - cy1 <= 0:
        bad.add("box outside the image", where)
        return None
    if mask is not None:
        if mask.shape != (h, w):
            bad.add("mask size differs from the image", where)
            return None
        if not mask.any():
            bad.add("empty mask", where)
            return None
    return RegionAnn(key, (cx1, cy1, cx2, cy2), mask, caption, category)


def _decode_segmentation(seg: Any, hw: tuple[int, int], where: str, bad: BadRecords) -> np.ndarray | None:
    try:
        if isinstance(seg, dict):
            return decode_rle(seg)
        if isinstance(seg, list):
            return polygons_to_mask(seg, *hw)
        raise ValueError("no segmentation")
    except (ValueError, TypeError, OverflowError) as exc:
        bad.add("broken RLE", f"{where}: {exc}"[:300])
        return None


# ------------------------------------------------------------------------------------------------------ SA-1B
def _sa1b_sample(image_bytes_or_path: Any, meta_text: bytes | str, where: str, bad: BadRecords,
                 max_masks: int | None) -> ImageSample | None:
    try:
        meta = json.loads(meta_text)
        info = meta["image"]
        anns = meta["annotations"]
    except (ValueError, KeyError, TypeError):
        bad.add("unreadable annotation JSON", where)
        return None
    image = _read_image(image_bytes_or_path, where, bad)
    if image is None:
        return None
    hw = image.shape[:2]
    regions = []
    for ann in anns[:max_masks] if max_masks else anns:
        aid = ann.get("id")
        at = f"{where} annotation {aid}"
        mask = _decode_segmentation(ann.get("segmentation"), hw, at, bad)
        if mask is None:
            continue
        region = _region(mask_key(info.get("image_id"), aid), ann.get("bbox", (0, 0, 0, 0)), mask, hw, at, bad)
        if region is not None:
            regions.append(region)
    return ImageSample(str(info.get("image_id", where)), image, regions)


class _TarIndex:
    """Members of a tar file by name, read by offset without extracting (one open handle per thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with tarfile.open(path) as tar:
            self.members = {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}
        self._local = threading.local()

    def read(self, name: str) -> bytes:
        f = getattr(self._local, "f", None)
        if f is None:
            f = self._local.f = open(self.path, "rb")  # noqa: SIM115 - kept open for the dataset's lifetime
        offset, size = self.members[name]
        f.seek(offset)
        return f.read(size)


def open_sa1b(path: str | Path, bad: BadRecords | None = None, max_masks: int | None = None) -> RegionDataset:
    """SA-1B layout: a folder of `sa_*.jpg` + `sa_*.json`, one `.tar` shard, or a folder of `.tar` shards."""
    bad = bad if bad is not None else BadRecords()
    path = Path(path)
    entries: list[tuple[Any, ...]] = []
    tars = [path] if path.is_file() and tarfile.is_tarfile(path) else sorted(path.glob("*.tar"))
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such SA-1B folder or shard")
    for tar in tars:
        index = _TarIndex(tar)
        for name in sorted(index.members):
            if name.endswith(".json"):
                entries.append(("tar", index, name))
    if path.is_dir():
        entries += [("dir", p) for p in sorted(path.glob("*.json")) if p.name != "manifest.json"]
    if not entries:
        raise ValueError(f"{path}: no SA-1B annotations (sa_*.json in the folder or in .tar shards)")

    def load(entry: tuple[Any, ...]) -> ImageSample | None:
        if entry[0] == "tar":
            _, index, name = entry
            where = f"{index.path.name}:{name}"
            image_name = name[:-5] + ".jpg"
            if image_name not in index.members:
                bad.add("missing or corrupt image", f"{where}: no {image_name} in the shard")
                return None
            return _sa1b_sample(index.read(image_name), index.read(name), where, bad, max_masks)
        json_path = entry[1]
        try:
            text = json_path.read_bytes()
        except OSError:
            bad.add("unreadable annotation JSON", str(json_path))
            return None
        return _sa1b_sample(json_path.with_suffix(".jpg"), text, str(json_path), bad, max_masks)

    return RegionDataset(f"sa1b:{path}", entries, load, bad)


# ------------------------------------------------------------------------------------------------------- COCO
def _load_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise FileNotFoundError(f"{path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def _coco_index(data: dict, path: Path) -> tuple[dict[Any, dict], dict[Any, list[dict]]]:
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{path}: a COCO-style file needs 'images' and 'annotations'")
    images = {im["id"]: im for im in data["images"]}
    anns: dict[Any, list[dict]] = {i: [] for i in images}
    for ann in data["annotations"]:
        anns.setdefault(ann.get("image_id"), []).append(ann)
    return images, anns


def _caption_lookup(path: str | Path | None) -> dict[tuple[Any, tuple[int, ...]], str]:
    """Captions of a VG/GRiT-style file by (image id, rounded box), to attach to matching COCO regions."""
    if path is None:
        return {}
    out = {}
    for image_id, regions in _vg_regions(_load_json(path), Path(path)).items():
        for _, bbox, caption in regions:
            out[(image_id, tuple(round(v) for v in bbox))] = caption
    return out


def open_coco(instances: str | Path, image_folder: str | Path, captions: str | Path | None = None,
              bad: BadRecords | None = None, max_masks: int | None = None) -> RegionDataset:
    """A COCO instances file (RLE or polygon masks); crowd regions are left out. Region captions come from an
    annotation's own "caption" field or from a VG/GRiT-style `captions` file with the same image ids and boxes."""
    bad = bad if bad is not None else BadRecords()
    path = Path(instances)
    images, anns = _coco_index(_load_json(path), path)
    names = {c["id"]: c.get("name", "") for c in _load_json(path).get("categories", [])}
    extra = _caption_lookup(captions)
    folder = Path(image_folder)

    def load(image_id: Any) -> ImageSample | None:
        info = images[image_id]
        where = f"{path.name} image {image_id}"
        image = _read_image(folder / info.get("file_name", ""), where, bad)
        if image is None:
            return None
        hw = image.shape[:2]
        regions = []
        for ann in [a for a in anns.get(image_id, []) if not a.get("iscrowd")][:max_masks or None]:
            at = f"{where} annotation {ann.get('id')}"
            mask = _decode_segmentation(ann.get("segmentation"), hw, at, bad)
            if mask is None:
                continue
            caption = ann.get("caption") or extra.get((image_id, tuple(round(v) for v in ann.get("bbox", ()))), "")
            region = _region(mask_key(image_id, ann.get("id")), ann.get("bbox", (0, 0, 0, 0)), mask, hw, at, bad,
                             caption, names.get(ann.get("category_id"), ""))
            if region is not None:
                regions.append(region)
        return ImageSample(str(image_id), image, regions)

    return RegionDataset(f"coco:{path}", list(images), load, bad)


# --------------------------------------------------------------------------------------------- Visual Genome
def _vg_regions(data: Any, path: Path) -> dict[Any, list[tuple[Any, tuple[float, ...], str]]]:
    """image id -> [(region id, xywh box, caption)] from the official list or GRiT's COCO-style dict."""
    out: dict[Any, list] = {}
    if isinstance(data, list):  # official region_descriptions.json
        for entry in data:
            image_id = entry.get("id", entry.get("image_id"))
            out[image_id] = [(r.get("region_id"), (r["x"], r["y"], r["width"], r["height"]), r.get("phrase", ""))
                             for r in entry.get("regions", []) if {"x", "y", "width", "height"} <= set(r)]
        return out
    images, anns = _coco_index(data, path)
    for image_id in images:
        out[image_id] = [(a.get("id"), tuple(a["bbox"]), a.get("caption", "")) for a in anns.get(image_id, [])
                         if "bbox" in a]
    return out


def open_vg_captions(path: str | Path, image_folder: str | Path, bad: BadRecords | None = None) -> RegionDataset:
    """Region captions with boxes: the official `region_descriptions.json` (images as `<image_id>.jpg` in
    `image_folder`) or GRiT's JSON (COCO-style, images by `file_name`). Regions have no masks."""
    bad = bad if bad is not None else BadRecords()
    path = Path(path)
    data = _load_json(path)
    regions = _vg_regions(data, path)
    files = {im["id"]: im.get("file_name") for im in data["images"]} if isinstance(data, dict) else {}
    folder = Path(image_folder)

    def load(image_id: Any) -> ImageSample | None:
        where = f"{path.name} image {image_id}"
        image = _read_image(folder / (files.get(image_id) or f"{image_id}.jpg"), where, bad)
        if image is None:
            return None
        kept = []
        for rid, bbox, caption in regions[image_id]:
            region = _region(mask_key(image_id, rid), bbox, None, image.shape[:2], f"{where} region {rid}", bad,
                             str(caption).strip())
            if region is not None and region.caption:
                kept.append(region)
        return ImageSample(str(image_id), image, kept)

    return RegionDataset(f"vg:{path}", [i for i, r in regions.items() if r], load, bad)


def open_regions(path: str | Path, image_folder: str | Path | None = None, bad: BadRecords | None = None,
                 max_masks: int | None = None) -> RegionDataset:
    """Whatever `path` is: an SA-1B folder or shard, a COCO instances file, or a Visual Genome caption file."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".tar":
        return open_sa1b(path, bad, max_masks)
    data = _load_json(path)
    folder = image_folder if image_folder is not None else path.parent
    is_coco = isinstance(data, dict) and any("segmentation" in a for a in data.get("annotations", [])[:50])
    if is_coco:
        return open_coco(path, folder, bad=bad, max_masks=max_masks)
    return open_vg_captions(path, folder, bad)


def tar_bytes(members: dict[str, bytes]) -> bytes:
    """A tar archive of `members` in memory (tests and the synthetic world write SA-1B shards with it)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
