"""`tap-priors`: the CLIP teacher that turns SA-1B masks into SemanticSA-1B concept priors (the paper's §3.1).

For every mask, V_C = the CLIP image embedding of the masked segment, stored raw (fp16; training normalises it).
For the vocabulary, T_C = CLIP text embeddings of every concept name, averaged over the prompt templates, and stored
as the official concept-file matrix (normalised, times the CLIP logit scale), so P_target = softmax(V_C . T_C / tau)
is computed at training time (`priors.target_log_probs`).

The segment crop (`segment_crop`): the square centred on the mask's tight box, with side = the box's longer side
plus `CROP_MARGIN` on each side, so a long thin mask is never cut the way CLIP's own centre crop would cut it;
pixels outside the mask (or outside the image) get the teacher's mean colour, which normalises to zero and so
carries no signal; then a bicubic resize to the teacher's input size and its mean/std normalisation. The box comes
from the mask itself, not the annotation, so the crop and the mask always agree.

Backends: open_clip (`MODEL[:PRETRAINED]`, e.g. the paper's `EVA02-E-14-plus:laion2b_s9b_b144k`), or transformers
CLIP (`hf:openai/clip-vit-large-patch14`, or a folder written by `save_pretrained`). Work is split into shards (one
SA-1B `.tar`, or `--shard-size` images of a folder in sorted order); shard s belongs to rank s % world, so any
number of processes (`accelerate launch` / `torchrun`, which set RANK and WORLD_SIZE) can share a run, and a shard
already on disk is never recomputed, so a run can be stopped and started again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tokenizer_tap.checkpoint import load_concepts
from tokenizer_tap.errors import WeightsNotFoundError

from .priors import PriorsWriter
from .records import BadRecords, RegionDataset, open_sa1b

#: OpenAI CLIP's normalisation, shared by EVA-CLIP and most open_clip / transformers CLIP weights.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: The paper's prompt templates for concept names.
DEFAULT_TEMPLATES = ("a {}", "a photo of a {}")
DEFAULT_CLIP = "EVA02-E-14-plus:laion2b_s9b_b144k"
#: Context around a segment, as a fraction of its box's longer side, on each side.
CROP_MARGIN = 0.1


# ------------------------------------------------------------------------------------------------ crops
def mean_colour(mean: Sequence[float]) -> np.ndarray:
    """The teacher's mean colour as uint8 RGB: the fill that normalises to (about) zero."""
    return np.clip(np.round(np.asarray(mean, dtype=np.float64) * 255), 0, 255).astype(np.uint8)


def segment_crop(image: np.ndarray, mask: np.ndarray, fill: np.ndarray,
                 margin: float = CROP_MARGIN) -> np.ndarray | None:
    """The square (side, side, 3) uint8 crop around `mask` with everything outside it set to `fill`; None if the
    mask is empty. See the module docstring for why it is square and filled."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    side = max(1, int(np.ceil(max(y1 - y0, x1 - x0) * (1 + 2 * margin))))
    top, left = (y0 + y1 - side) // 2, (x0 + x1 - side) // 2
    crop = np.empty((side, side, 3), np.uint8)
    crop[:] = fill
    h, w = mask.shape
    iy0, iy1, ix0, ix1 = max(top, 0), min(top + side, h), max(left, 0), min(left + side, w)
    inside = mask[iy0:iy1, ix0:ix1]
    crop[iy0 - top:iy1 - top, ix0 - left:ix1 - left][inside] = image[iy0:iy1, ix0:ix1][inside]
    return crop


def resize_square(image: np.ndarray | Image.Image, size: int) -> np.ndarray:
    """CLIP's geometry: bicubic resize of the shorter side to `size`, then the centre `size` x `size` crop."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    pil = pil.convert("RGB")
    w, h = pil.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        pil = pil.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        pil = pil.crop((left, top, left + size, top + size))
    return np.asarray(pil, dtype=np.uint8)


# ----------------------------------------------------------------------------------------------- teachers
class ClipTeacher(ABC):
    """What `tap-priors` needs of a CLIP: image and text embeddings (unnormalised), the logit scale, and the
    image geometry. Subclasses provide the two forward passes."""

    description: str  # the manifest's `teacher`, e.g. "open_clip:EVA02-E-14-plus:laion2b_s9b_b144k"
    image_size: int
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    logit_scale: float  # exp(logit_scale): the inverse softmax temperature (~100 for trained CLIPs)

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype

    @abstractmethod
    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, D) embeddings of normalised (N, 3, S, S) pixels."""

    @abstractmethod
    def _text_features(self, texts: list[str]) -> torch.Tensor:
        """(N, D) embeddings of texts."""

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)

    @property
    def fill(self) -> np.ndarray:
        return mean_colour(self.mean)

    @cached_property
    def dim(self) -> int:
        """The embedding width, probed once (backends do not all expose it the same way)."""
        return int(self.encode_texts(["a"]).shape[-1])

    def encode_images(self, images: Sequence[np.ndarray | Image.Image]) -> torch.Tensor:
        """(N, D) float32 embeddings (CPU) of RGB images (uint8 arrays or PIL), preprocessed CLIP's way."""
        if not images:
            return torch.zeros(0, self.dim)
        batch = torch.from_numpy(np.stack([resize_square(im, self.image_size) for im in images]))
        pixels = batch.to(self.device).permute(0, 3, 1, 2).float().div_(255)
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        with torch.inference_mode(), self._autocast():
            return self._image_features((pixels - mean) / std).float().cpu()

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) float32 text embeddings (CPU)."""
        with torch.inference_mode(), self._autocast():
            return self._text_features(list(texts)).float().cpu()


class HfClipTeacher(ClipTeacher):
    """transformers `CLIPModel` from the hub or a local `save_pretrained` folder (with its tokenizer). Mean/std come
    from the folder's `preprocessor_config.json` when it has one, else OpenAI's (what hub CLIPs use)."""

    def __init__(self, source: str, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(device, dtype)
        from transformers import AutoTokenizer, CLIPModel
        try:
            self.model = CLIPModel.from_pretrained(source).eval().requires_grad_(False).to(device)
            self.tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise WeightsNotFoundError(f"CLIP {source!r}: not a transformers CLIP folder and not available from "
                                       f"the hub: {exc}") from None
        config = self.model.config
        self.description = f"hf:{source}"
        self.image_size = int(config.vision_config.image_size)
        self.max_length = int(config.text_config.max_position_embeddings)
        self.logit_scale = float(self.model.logit_scale.exp())
        processor = Path(source) / "preprocessor_config.json"
        if processor.is_file():
            meta = json.loads(processor.read_text())
            self.mean = tuple(meta.get("image_mean", CLIP_MEAN))
            self.std = tuple(meta.get("image_std", CLIP_STD))

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return self.model.visual_projection(pooled)

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        pooled = self.model.text_model(input_ids=tokens["input_ids"],
                                       attention_mask=tokens["attention_mask"]).pooler_output
        return self.model.text_projection(pooled)


class OpenClipTeacher(ClipTeacher):
    """open_clip (`open-clip-torch`): any of its model names, with an optional pretrained tag."""

    def __init__(self, name: str, pretrained: str, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(device, dtype)
        try:
            import open_clip
        except Exception as exc:  # a broken torchvision makes the import fail in many ways
            raise ValueError(
                f"--clip {name}: the open_clip backend is unavailable ({type(exc).__name__}: {exc}). Install "
                "`open-clip-torch` (it needs a working torchvision), or use a transformers CLIP: "
                "--clip hf:openai/clip-vit-large-patch14 or a folder saved with save_pretrained") from None
        try:
            model = open_clip.create_model(name, pretrained=pretrained or None, device=device)
        except RuntimeError as exc:  # unknown model name or pretrained tag, failed download
            raise ValueError(f"--clip {name}:{pretrained}: open_clip cannot build it: {exc}") from None
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.description = f"open_clip:{name}" + (f":{pretrained}" if pretrained else "")
        visual = self.model.visual
        size = getattr(visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        cfg = getattr(visual, "preprocess_cfg", None) or {}
        self.mean = tuple(cfg.get("mean") or getattr(visual, "image_mean", None) or CLIP_MEAN)
        self.std = tuple(cfg.get("std") or getattr(visual, "image_std", None) or CLIP_STD)
        self.logit_scale = float(self.model.logit_scale.exp())

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """`auto`: this process's GPU (LOCAL_RANK) with bf16 autocast, else the CPU in fp32."""
    if device == "auto":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local % max(1, torch.cuda.device_count())}" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available here (use --device cpu or auto)")
    if dtype not in ("auto", "bf16", "fp32"):
        raise ValueError(f"--dtype {dtype!r}: choose auto, bf16 or fp32")
    bf16 = dtype == "bf16" or (dtype == "auto" and dev.type == "cuda")
    return dev, torch.bfloat16 if bf16 else torch.float32


def load_teacher(spec: str, device: str = "auto", dtype: str = "auto") -> ClipTeacher:
    """`hf:NAME` or an existing folder -> transformers CLIP; `[open_clip:]MODEL[:PRETRAINED]` -> open_clip."""
    dev, dt = resolve_device(device, dtype)
    if spec.startswith("hf:"):
        return HfClipTeacher(spec[3:], dev, dt)
    if Path(spec).is_dir():
        return HfClipTeacher(spec, dev, dt)
    spec = spec.removeprefix("open_clip:")
    if spec.startswith(("hf-hub:", "local-dir:")):  # open_clip's own schemes carry the weights in the name
        return OpenClipTeacher(spec, "", dev, dt)
    name, _, pretrained = spec.partition(":")
    if not name:
        raise ValueError(f"--clip needs a model, e.g. {DEFAULT_CLIP} or hf:openai/clip-vit-large-patch14")
    return OpenClipTeacher(name, pretrained, dev, dt)


# ----------------------------------------------------------------------------------------------- concepts
def read_concept_names(path: str | Path) -> list[str]:
    """Concept names from an official concept file (`.pkl`, names only) or a text file with one name per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--concepts {path}: no such file")
    if path.suffix == ".pkl":
        names = load_concepts(path)[1]
    else:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"--concepts {path}: no concept names in it")
    return names


def concept_matrix(teacher: ClipTeacher, names: Sequence[str], templates: Sequence[str],
                   batch_size: int = 256) -> torch.Tensor:
    """(D, K) float32: per concept, the mean of its normalised template embeddings, re-normalised, times the logit
    scale (the official concept-file convention)."""
    check_templates(templates)
    total = torch.zeros(len(names), teacher.dim)
    for template in templates:
        texts = [template.replace("{}", n) for n in names]
        emb = torch.cat([teacher.encode_texts(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])
        total += F.normalize(emb, dim=-1)
    return (F.normalize(total, dim=-1) * teacher.logit_scale).T.contiguous()


def check_templates(templates: Sequence[str]) -> None:
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"--templates: every template needs a {{}} for the concept name (got {list(templates)})")


# ------------------------------------------------------------------------------------------------- shards
@dataclass
class Shard:
    """A unit of work with a name that is the same in every run: one SA-1B tar, or a slice of a folder."""

    name: str
    path: Path
    indices: range | None = None  # None: every image of the tar
    dataset: RegionDataset | None = None  # the folder's, opened once and shared by its slices

    def open(self, bad: BadRecords) -> tuple[RegionDataset, range]:
        dataset = self.dataset if self.dataset is not None else open_sa1b(self.path, bad)
        return dataset, self.indices if self.indices is not None else range(len(dataset))


def list_shards(path: str | Path, shard_size: int, bad: BadRecords) -> list[Shard]:
    """SA-1B `.tar` files (a file or a folder of them) are one shard each; a folder of `sa_*.jpg/json` is cut
    into slices of `shard_size` images in sorted order, named `n<size>-<index>` (another size, other names)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--sa1b {path}: no such SA-1B folder or shard")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, not {shard_size}")
    if path.is_file():
        return [Shard(path.stem, path)]
    tars = sorted(path.glob("*.tar"))
    if tars:
        if any(p.name != "manifest.json" for p in path.glob("*.json")):
            print(f"{path}: has .tar shards; its loose .json/.jpg files are not read", flush=True)
        return [Shard(t.stem, t) for t in tars]
    dataset = open_sa1b(path, bad)
    return [Shard(f"n{shard_size}-{i // shard_size:06d}", path, range(i, min(i + shard_size, len(dataset))), dataset)
            for i in range(0, len(dataset), shard_size)]


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the process count, from the launcher's environment (1 process without one)."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError("RANK and WORLD_SIZE must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK {rank} is not in [0, WORLD_SIZE={world})")
    return rank, world


# ---------------------------------------------------------------------------------------------- embedding
@dataclass
class ShardStats:
    images: int = 0
    masks: int = 0
    empty_masks: int = 0  # nothing to embed (an empty or missing mask): skipped
    unreadable_images: int = 0  # the dataset returned None (its BadRecords says why)

    def add(self, other: ShardStats) -> None:
        for f in ("images", "masks", "empty_masks", "unreadable_images"):
            setattr(self, f, getattr(self, f) + getattr(other, f))


@dataclass
class _Crops:
    keys: list[str] = field(default_factory=list)
    crops: list[np.ndarray] = field(default_factory=list)
    stats: ShardStats = field(default_factory=ShardStats)


def _image_crops(dataset: RegionDataset, index: int, size: int, fill: np.ndarray) -> _Crops:
    """One image's segment crops, already at the teacher's size (so the worker threads do the resizing)."""
    out = _Crops()
    sample = dataset[index]
    if sample is None:
        out.stats.unreadable_images = 1
        return out
    out.stats.images = 1
    for region in sample.regions:
        crop = None if region.mask is None else segment_crop(sample.image, region.mask, fill)
        if crop is None:
            out.stats.empty_masks += 1
            continue
        out.keys.append(region.key)
        out.crops.append(resize_square(crop, size))
    return out


def _prefetch(fn: Callable[[int], Any], items: Iterable[int], workers: int) -> Iterator[Any]:
    """`map(fn, items)` in order, `workers` threads ahead (bounded, so crops never pile up in memory)."""
    if workers <= 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def embed_shard(teacher: ClipTeacher, dataset: RegionDataset, indices: Iterable[int], batch_size: int = 64,
                workers: int = 0, progress: Callable[[ShardStats], None] | None = None,
                ) -> tuple[list[str], torch.Tensor, ShardStats]:
    """The mask keys, (N, D) fp16 embeddings and counts of the images `indices` of `dataset`."""
    keys: list[str] = []
    chunks: list[torch.Tensor] = []
    stats = ShardStats()
    pending_keys: list[str] = []
    pending: list[np.ndarray] = []

    def flush() -> None:
        chunks.append(teacher.encode_images(pending).half())
        keys.extend(pending_keys)
        stats.masks += len(pending)
        pending.clear()
        pending_keys.clear()

    def crops_of(i: int) -> _Crops:
        return _image_crops(dataset, i, teacher.image_size, teacher.fill)

    for item in _prefetch(crops_of, indices, workers):
        stats.add(item.stats)
        for key, crop in zip(item.keys, item.crops):
            pending_keys.append(key)
            pending.append(crop)
            if len(pending) >= batch_size:
                flush()
        if progress is not None:
            progress(stats)
    if pending:
        flush()
    return keys, torch.cat(chunks) if chunks else torch.zeros(0, teacher.dim, dtype=torch.float16), stats


# ---------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sa1b", required=True, type=Path,
                        help="an SA-1B .tar shard, a folder of them, or a folder of sa_*.jpg + sa_*.json")
    parser.add_argument("--out", required=True, type=Path, help="the priors folder (created; resumes if it exists)")
    parser.add_argument("--clip", default=DEFAULT_CLIP,
                        help="open_clip MODEL[:PRETRAINED] (default: the paper's EVA-CLIP-E), or hf:NAME / a folder "
                             "for a transformers CLIP")
    parser.add_argument("--concepts", required=True, type=Path,
                        help="the vocabulary: an official concept file (merged_2560.pkl; names only) or a text file "
                             "with one name per line")
    parser.add_argument("--templates", nargs="+", default=list(DEFAULT_TEMPLATES),
                        help="prompt templates with {} for the name (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="masks per teacher forward pass")
    parser.add_argument("--device", default="auto", help="auto (this rank's GPU, else CPU), cpu, cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                        help="auto: bf16 autocast on a GPU, fp32 on the CPU")
    parser.add_argument("--shard-size", type=int, default=1000,
                        help="images per shard when --sa1b is a folder of images (tars are one shard each)")
    parser.add_argument("--workers", type=int, default=4, help="threads that decode masks and cut crops")


def _check_manifest(out: Path, teacher: str, templates: Sequence[str]) -> None:
    """Resuming with another teacher or templates would mix incomparable priors in one folder."""
    path = out / "manifest.json"
    if not path.is_file():
        return
    meta = json.loads(path.read_text())
    if meta.get("teacher") != teacher or list(meta.get("templates", [])) != list(templates):
        raise ValueError(f"{out} holds priors of teacher {meta.get('teacher')!r} with templates "
                         f"{meta.get('templates')}, not {teacher!r} with {list(templates)}: use another --out")


def _progress_printer(label: str, n: int, t0: float, every_s: float = 60.0) -> Callable[[ShardStats], None]:
    """A progress callback that prints at most once per `every_s` (a tar shard takes about an hour)."""
    last = [t0]

    def progress(s: ShardStats) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s:
            last[0] = now
            print(f"{label}: {s.images + s.unreadable_images}/{n} images, {s.masks} masks, "
                  f"{s.masks / (now - t0):.1f} masks/s", flush=True)

    return progress


def run(args: argparse.Namespace) -> int:
    """`tap-priors`: 0 when this rank's shards are done; 2 (with the reason on stderr) for bad input or weights."""
    try:
        compute_priors(args)
    except (ValueError, OSError) as exc:  # bad arguments, data, output folder or weights: a message, no traceback
        print(f"tap-priors: {exc}", file=sys.stderr)
        return 2
    return 0


def compute_priors(args: argparse.Namespace) -> ShardStats:
    """Compute the priors of this rank's shards (all of them with one process), and the concepts on rank 0."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, not {args.batch_size}")
    check_templates(args.templates)
    rank, world = rank_and_world()
    tag = f"[rank {rank}/{world}] " if world > 1 else ""
    names = read_concept_names(args.concepts)
    bad = BadRecords()
    shards = list_shards(args.sa1b, args.shard_size, bad)
    teacher = load_teacher(args.clip, args.device, args.dtype)
    _check_manifest(args.out, teacher.description, args.templates)
    writer = PriorsWriter(args.out, teacher.dim, teacher.description, args.templates)
    print(f"{tag}tap-priors: {teacher.description} ({teacher.dim}-d, {teacher.image_size}px, logit scale "
          f"{teacher.logit_scale:.1f}) on {teacher.device}, {len(shards)} shards in all", flush=True)
    if rank == 0:
        writer.write_concepts(concept_matrix(teacher, names, args.templates, args.batch_size), names)
        print(f"{tag}concepts: {len(names)} names x {len(args.templates)} templates", flush=True)
    total, done, skipped = ShardStats(), 0, 0
    start = time.monotonic()
    mine = [s for i, s in enumerate(shards) if i % world == rank]
    for shard in mine:
        if writer.has_shard(shard.name):
            skipped += 1
            continue
        dataset, indices = shard.open(bad)
        t0 = time.monotonic()
        progress = _progress_printer(f"{tag}  shard {shard.name}", len(indices), t0)
        keys, embeddings, stats = embed_shard(teacher, dataset, indices, args.batch_size, args.workers, progress)
        writer.write_shard(shard.name, keys, embeddings)
        total.add(stats)
        done += 1
        elapsed = time.monotonic() - t0
        print(f"{tag}shard {shard.name}: {stats.images} images, {stats.masks} masks in {elapsed:.1f} s "
              f"({done + skipped}/{len(mine)} of this rank's shards)", flush=True)
    elapsed = time.monotonic() - start
    print(f"{tag}done: {done} shards computed, {skipped} already there (skipped), {len(shards) - len(mine)} left "
          f"to other ranks; {total.masks} masks from {total.images} images ({total.masks / max(elapsed, 1e-9):.1f} "
          f"masks/s), {total.empty_masks} empty masks skipped, {total.unreadable_images} unreadable images\n"
          f"{tag}bad records: {bad.summary()}", flush=True)
    return total
