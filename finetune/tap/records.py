"""Readers of region data for TAP pre-training: SA-1B (folders or the distributed .tar shards, read in place), COCO
instances ("my own data") and Visual Genome region captions (official `region_descriptions.json` or GRiT's JSON).

Every reader is a random-access `RegionDataset` (the trainer draws its own order) that decodes lazily. Records a
trainer cannot use are counted in a `BadRecords`, listed with where they came from, and skipped: a missing or
corrupt image, JSON that does not parse, an RLE that does not decode or does not fit the image (its declared size
is checked before decoding), an empty mask, a missing or malformed box or one outside the image. An input that
cannot be read as a whole (a cut or garbled .tar shard, a missing folder) raises one error naming the file instead.
COCO RLE is encoded and decoded by pycocotools.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from tokenizer_tap.errors import ImageError
from tokenizer_tap.image_io import load_image

from .priors import mask_key


# ----------------------------------------------------------------------------------------------------------- RLE
class MaskSizeError(ValueError):
    """An RLE declares another size than its image; raised before decoding, since the size may be huge."""


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of an (H, W) boolean mask (pycocotools), with `counts` as text so it goes into JSON."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _runs_total(counts: Any) -> int:
    """The pixels an RLE's runs cover. pycocotools refuses runs past the end of the mask but leaves the pixels after
    runs that stop short uninitialised, so the total is checked before it decodes."""
    if isinstance(counts, list):
        runs = [int(c) for c in counts]
        if runs != counts:
            raise ValueError("RLE counts must be whole numbers")
    elif isinstance(counts, str):
        runs = []
        pos = 0
        while pos < len(counts):
            x, shift, more = 0, 0, True
            while more:
                if pos >= len(counts):
                    raise ValueError("RLE string ends inside a number")
                c = ord(counts[pos]) - 48
                if not 0 <= c < 64:
                    raise ValueError(f"RLE string has an invalid character {counts[pos]!r}")
                x |= (c & 0x1F) << shift
                more = bool(c & 0x20)
                pos += 1
                shift += 5
                if not more and c & 0x10:
                    x |= -1 << shift
            runs.append(x + runs[-2] if len(runs) > 2 else x)
    else:
        raise ValueError("RLE counts must be a string or a list of numbers")
    if any(r < 0 for r in runs):
        raise ValueError("RLE has a negative run")
    return sum(runs)


def decode_rle(rle: dict[str, Any], image_hw: tuple[int, int] | None = None) -> np.ndarray:
    """An (H, W) boolean mask from COCO RLE (compressed string or uncompressed list of counts), decoded by
    pycocotools; ValueError if broken. With `image_hw`, a declared size that differs raises MaskSizeError before
    anything is allocated."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError):
        raise ValueError("RLE needs 'size' [h, w] and 'counts'") from None
    if image_hw is not None and (h, w) != tuple(image_hw):
        raise MaskSizeError(f"the RLE declares {h}x{w} pixels, the image has {image_hw[0]}x{image_hw[1]}")
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", "replace")
    total = _runs_total(counts)
    if h <= 0 or w <= 0 or total != h * w:
        raise ValueError(f"RLE runs add up to {total} pixels, not {h}x{w}")
    if isinstance(counts, list):
        compressed = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    else:
        compressed = {"size": [h, w], "counts": counts.encode("ascii")}
    return mask_utils.decode(compressed).astype(bool)


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
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise ValueError("not finite")
    return x, y, x + w, y + h


def _is_id(value: Any) -> bool:
    """Whether a JSON id can key a dict (a list or an object cannot)."""
    return isinstance(value, int | str) and not isinstance(value, bool)


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
    """Validate one region against its image (its mask is already at the image's size); None (and counted) when
    unusable."""
    h, w = image_hw
    if bbox is None:
        bad.add("missing box", where)
        return None
    try:
        x1, y1, x2, y2 = _xyxy(bbox)
    except (TypeError, ValueError):
        bad.add("malformed box", f"{where}: {bbox!r}"[:300])
        return None
    cx1, cy1, cx2, cy2 = max(0.0, x1), max(0.0, y1), min(float(w), x2), min(float(h), y2)
    if cx2 - cx1 <= 0 or cy2 - cy1 <= 0:
        bad.add("box outside the image", where)
        return None
    if mask is not None and not mask.any():
        bad.add("empty mask", where)
        return None
    return RegionAnn(key, (cx1, cy1, cx2, cy2), mask, caption, category)


def _decode_segmentation(seg: Any, hw: tuple[int, int], where: str, bad: BadRecords) -> np.ndarray | None:
    """An annotation's mask at its image's size (an RLE's declared size is checked first); None (and counted) when
    unusable."""
    if isinstance(seg, dict):
        try:
            return decode_rle(seg, hw)
        except MaskSizeError as exc:
            bad.add("mask size differs from the image", f"{where}: {exc}")
        except (ValueError, TypeError, OverflowError) as exc:
            bad.add("broken RLE", f"{where}: {exc}"[:300])
        return None
    if isinstance(seg, list):
        try:
            return polygons_to_mask(seg, *hw)
        except (ValueError, TypeError, OverflowError) as exc:
            bad.add("broken polygon", f"{where}: {exc}"[:300])
        return None
    bad.add("missing mask", f"{where}: no segmentation")
    return None


# ------------------------------------------------------------------------------------------------------ SA-1B
def _sa1b_sample(image_bytes_or_path: Any, meta_text: bytes | str, where: str, bad: BadRecords,
                 max_masks: int | None) -> ImageSample | None:
    try:
        meta = json.loads(meta_text)
        info, anns = meta["image"], meta["annotations"]
    except (ValueError, KeyError, TypeError) as exc:
        bad.add("unreadable annotation JSON", f"{where}: {exc}"[:300])
        return None
    if not isinstance(info, dict) or not isinstance(anns, list):
        bad.add("unreadable annotation JSON", f"{where}: 'image' must be an object and 'annotations' a list")
        return None
    image = _read_image(image_bytes_or_path, where, bad)
    if image is None:
        return None
    hw = image.shape[:2]
    regions = []
    for ann in anns[:max_masks] if max_masks else anns:
        if not isinstance(ann, dict):
            bad.add("malformed annotation", f"{where}: {ann!r}"[:300])
            continue
        aid = ann.get("id")
        at = f"{where} annotation {aid}"
        mask = _decode_segmentation(ann.get("segmentation"), hw, at, bad)
        if mask is None:
            continue
        region = _region(mask_key(info.get("image_id"), aid), ann.get("bbox"), mask, hw, at, bad)
        if region is not None:
            regions.append(region)
    return ImageSample(str(info.get("image_id", where)), image, regions)


class InputError(ValueError):
    """A whole input cannot be read (not a tar, truncated): the run stops with this message, which names the file,
    rather than training on whatever part of it happens to parse."""


class _TarIndex:
    """Members of an uncompressed tar file by name, read by offset without extracting (one open handle per thread).

    The whole file is checked when it is opened: tarfile stops quietly at a header cut short or garbled, so the
    index must end at the archive's end-of-archive block, or the shard is truncated or corrupt (InputError)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        opened = False
        try:
            with tarfile.open(path, mode="r:") as tar:  # reads the first header
                opened = True
                self.members = {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}
                end = tar.offset
            with open(path, "rb") as f:
                f.seek(end)
                trailer = f.read(tarfile.BLOCKSIZE)
        except tarfile.ReadError as exc:
            problem = "truncated or corrupt tar shard" if opened else "not an uncompressed tar archive"
            raise InputError(f"{path}: {problem} ({exc})") from None
        except OSError as exc:
            raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
        if len(trailer) < tarfile.BLOCKSIZE or trailer.count(0) != tarfile.BLOCKSIZE:
            raise InputError(f"{path}: truncated or corrupt tar shard (no end-of-archive block after byte {end}, "
                             f"{len(self.members)} members read)")
        self._local = threading.local()

    def read(self, name: str) -> bytes:
        offset, size = self.members[name]
        try:
            f = getattr(self._local, "f", None)
            if f is None:
                f = self._local.f = open(self.path, "rb")  # noqa: SIM115 - kept open for the dataset's lifetime
            f.seek(offset)
            data = f.read(size)
        except OSError as exc:
            raise InputError(f"{self.path}: cannot be read ({exc.strerror or exc})") from None
        if len(data) != size:
            raise InputError(f"{self.path}: {name} is cut short: the shard changed or was truncated during the run")
        return data


def open_sa1b(path: str | Path, bad: BadRecords | None = None, max_masks: int | None = None) -> RegionDataset:
    """SA-1B layout: a folder of `sa_*.jpg` + `sa_*.json`, one `.tar` shard, or a folder of `.tar` shards."""
    bad = bad if bad is not None else BadRecords()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such SA-1B folder or shard")
    entries: list[tuple[Any, ...]] = []
    tars = [path] if path.is_file() else sorted(path.glob("*.tar"))
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
        except OSError as exc:
            bad.add("unreadable annotation JSON", f"{json_path}: {exc.strerror or exc}")
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


def _coco_index(data: Any, path: Path, bad: BadRecords) -> tuple[dict[Any, dict], dict[Any, list[dict]]]:
    """Images by id and their annotations; an entry that is not an object with a usable id, or an annotation of an
    image the file does not list, is counted and left out."""
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        raise ValueError(f"{path}: a COCO-style file needs 'images' and 'annotations' lists")
    images: dict[Any, dict] = {}
    for im in data["images"]:
        if isinstance(im, dict) and _is_id(im.get("id")):
            images[im["id"]] = im
        else:
            bad.add("malformed image entry", f"{path.name}: {im!r}"[:300])
    anns: dict[Any, list[dict]] = {i: [] for i in images}
    for ann in data["annotations"]:
        if isinstance(ann, dict) and _is_id(ann.get("image_id")) and ann["image_id"] in anns:
            anns[ann["image_id"]].append(ann)
        else:
            bad.add("malformed annotation", f"{path.name}: no listed image_id in {ann!r}"[:300])
    return images, anns


def _box_key(bbox: Any) -> tuple[int, ...] | None:
    """A rounded xywh box, to match the regions of two files by; None when it is not a box."""
    try:
        _xyxy(bbox)
    except (TypeError, ValueError):
        return None
    return tuple(round(float(v)) for v in bbox)


def _caption_lookup(path: str | Path | None, bad: BadRecords) -> dict[tuple[Any, tuple[int, ...] | None], str]:
    """Captions of a VG/GRiT-style file by (image id, rounded box), to attach to matching COCO regions."""
    if path is None:
        return {}
    out = {}
    for image_id, regions in _vg_regions(_load_json(path), Path(path), bad).items():
        for _, bbox, caption in regions:
            out[(image_id, _box_key(bbox))] = caption
    return out


def open_coco(instances: str | Path, image_folder: str | Path, captions: str | Path | None = None,
              bad: BadRecords | None = None, max_masks: int | None = None) -> RegionDataset:
    """A COCO instances file (RLE or polygon masks); crowd regions are left out. Region captions come from an
    annotation's own "caption" field or from a VG/GRiT-style `captions` file with the same image ids and boxes."""
    bad = bad if bad is not None else BadRecords()
    path = Path(instances)
    data = _load_json(path)
    images, anns = _coco_index(data, path, bad)
    categories = data.get("categories") if isinstance(data.get("categories"), list) else []
    names = {str(c.get("id")): str(c.get("name", "")) for c in categories if isinstance(c, dict)}
    extra = _caption_lookup(captions, bad)
    folder = Path(image_folder)

    def load(image_id: Any) -> ImageSample | None:
        info = images[image_id]
        where = f"{path.name} image {image_id}"
        image = _read_image(folder / str(info.get("file_name", "")), where, bad)
        if image is None:
            return None
        hw = image.shape[:2]
        regions = []
        for ann in [a for a in anns[image_id] if not a.get("iscrowd")][:max_masks or None]:
            at = f"{where} annotation {ann.get('id')}"
            mask = _decode_segmentation(ann.get("segmentation"), hw, at, bad)
            if mask is None:
                continue
            caption = ann.get("caption")
            if not isinstance(caption, str) or not caption:
                caption = extra.get((image_id, _box_key(ann.get("bbox"))), "")
            region = _region(mask_key(image_id, ann.get("id")), ann.get("bbox"), mask, hw, at, bad, caption,
                             names.get(str(ann.get("category_id")), ""))
            if region is not None:
                regions.append(region)
        return ImageSample(str(image_id), image, regions)

    return RegionDataset(f"coco:{path}", list(images), load, bad)


# --------------------------------------------------------------------------------------------- Visual Genome
def _vg_regions(data: Any, path: Path, bad: BadRecords) -> dict[Any, list[tuple[Any, Any, str]]]:
    """image id -> [(region id, xywh box, caption)] from the official list or GRiT's COCO-style dict (boxes are
    checked where they are used)."""
    out: dict[Any, list] = {}
    if isinstance(data, list):  # official region_descriptions.json
        for entry in data:
            image_id = entry.get("id", entry.get("image_id")) if isinstance(entry, dict) else None
            if not _is_id(image_id) or not isinstance(entry.get("regions", []), list):
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
    data = _load_json(path)
    regions = _vg_regions(data, path, bad)
    files = {im["id"]: str(im.get("file_name") or "") for im in data["images"]
             if isinstance(im, dict) and _is_id(im.get("id"))} if isinstance(data, dict) else {}
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
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such SA-1B folder or shard, or annotation file")
    if path.is_dir() or path.suffix == ".tar":
        return open_sa1b(path, bad, max_masks)
    data = _load_json(path)
    folder = image_folder if image_folder is not None else path.parent
    anns = data.get("annotations") if isinstance(data, dict) else None
    is_coco = isinstance(anns, list) and any(isinstance(a, dict) and "segmentation" in a for a in anns[:50])
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
