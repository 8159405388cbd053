"""`tap-priors`: the CLIP teacher that turns SA-1B masks into SemanticSA-1B concept priors (the paper's §3.1).

For every mask, V_C = the CLIP image embedding of the masked segment, stored raw (fp16; training normalises it;
`segments.py` says how a segment is cropped). For the vocabulary, T_C = CLIP text embeddings of every concept name,
averaged over the prompt templates, and stored as the official concept-file matrix (normalised, times the CLIP
logit scale), so P_target = softmax(V_C . T_C / tau) is computed at training time (`priors.target_log_probs`).

The teacher is open_clip or transformers CLIP (`clip_teacher.py`). Work is split into shards (one SA-1B `.tar`, or
`--shard-size` images of a folder in sorted order); shard s belongs to rank s % world, so any number of processes
(`accelerate launch` / `torchrun`, which set RANK and WORLD_SIZE) can share a run, and a shard already on disk is
never recomputed, so a run can be stopped and started again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tokenizer_tap.checkpoint import load_concepts

from .clip_teacher import DEFAULT_CLIP, ClipTeacher, load_teacher
from .priors import PriorsWriter
from .sa1b import open_sa1b
from .samples import BadRecords, RegionDataset
from .segments import ShardStats, embed_shard, segment_crop

#: The command's interface; the teacher and the embedding pass are its modules' own, and importable from here too.
__all__ = ["DEFAULT_TEMPLATES", "Shard", "add_arguments", "check_templates", "compute_priors", "concept_matrix",
           "embed_shard", "list_shards", "load_teacher", "rank_and_world", "read_concept_names", "run", "segment_crop"]

#: The paper's prompt templates for concept names.
DEFAULT_TEMPLATES = ("a {}", "a photo of a {}")


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
    """Refuse a template without `{}`: it would give every concept the same text embedding."""
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
