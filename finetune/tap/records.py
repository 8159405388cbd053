"""Readers of region data for TAP pre-training: SA-1B (folders or the distributed .tar shards, read in place,
`sa1b.py`), COCO instances ("my own data") and Visual Genome region captions (official `region_descriptions.json` or
GRiT's JSON, `coco_vg.py`); `open_regions` picks the reader a path needs.

Every reader is a random-access `RegionDataset` (the trainer draws its own order) that decodes lazily
(`samples.py`). Records a trainer cannot use are counted in a `BadRecords`, listed with where they came from, and
skipped (`validate.py`): a missing or corrupt image, JSON that does not parse, an RLE that does not decode or does not
fit the image (its declared size is checked before decoding), an empty mask, a missing or malformed box or one outside
the image. An input that cannot be read as a whole (a cut or garbled .tar shard, a missing folder) raises one error
naming the file instead. COCO RLE is encoded and decoded by pycocotools (`coco_rle.py`).
"""

from __future__ import annotations

from pathlib import Path

from .coco_rle import MaskSizeError, decode_rle, encode_rle
from .coco_vg import load_json, open_coco, open_vg_captions
from .sa1b import InputError, open_sa1b, tar_bytes
from .samples import BadRecords, ImageSample, RegionAnn, RegionDataset

__all__ = ["BadRecords", "ImageSample", "InputError", "MaskSizeError", "RegionAnn", "RegionDataset", "decode_rle",
           "encode_rle", "open_coco", "open_regions", "open_sa1b", "open_vg_captions", "tar_bytes"]


def open_regions(path: str | Path, image_folder: str | Path | None = None, bad: BadRecords | None = None,
                 max_masks: int | None = None) -> RegionDataset:
    """Whatever `path` is: an SA-1B folder or shard, a COCO instances file, or a Visual Genome caption file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such SA-1B folder or shard, or annotation file")
    if path.is_dir() or path.suffix == ".tar":
        return open_sa1b(path, bad, max_masks)
    data = load_json(path)
    folder = image_folder if image_folder is not None else path.parent
    anns = data.get("annotations") if isinstance(data, dict) else None
    is_coco = isinstance(anns, list) and any(isinstance(a, dict) and "segmentation" in a for a in anns[:50])
    if is_coco:
        return open_coco(path, folder, bad=bad, max_masks=max_masks)
    return open_vg_captions(path, folder, bad)
