"""SA-1B's layout for TAP training data: a folder of `sa_*.jpg` + `sa_*.json`, one `.tar` shard, or a folder of
shards, read in place (a shard is indexed once and its members read by offset). A shard that cannot be read as a
whole, cut or garbled, raises one `InputError` naming the file instead of training on whatever part of it parses."""

from __future__ import annotations

import io
import json
import tarfile
import threading
from pathlib import Path
from typing import Any

from .priors import mask_key
from .samples import BadRecords, ImageSample, RegionDataset
from .validate import checked_region, decode_segmentation, read_image


def _sa1b_sample(image_bytes_or_path: Any, meta_text: bytes | str, where: str, bad: BadRecords,
                 max_masks: int | None) -> ImageSample | None:
    """One image and its annotation JSON as a sample, its unusable annotations counted and left out."""
    try:
        meta = json.loads(meta_text)
        info, anns = meta["image"], meta["annotations"]
    except (ValueError, KeyError, TypeError) as exc:
        bad.add("unreadable annotation JSON", f"{where}: {exc}"[:300])
        return None
    if not isinstance(info, dict) or not isinstance(anns, list):
        bad.add("unreadable annotation JSON", f"{where}: 'image' must be an object and 'annotations' a list")
        return None
    image = read_image(image_bytes_or_path, where, bad)
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
        mask = decode_segmentation(ann.get("segmentation"), hw, at, bad)
        if mask is None:
            continue
        region = checked_region(mask_key(info.get("image_id"), aid), ann.get("bbox"), mask, hw, at, bad)
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


def tar_bytes(members: dict[str, bytes]) -> bytes:
    """A tar archive of `members` in memory (tests and the synthetic world write SA-1B shards with it)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
