"""Building a ready-to-use TAP model: config + weights + concept vocabulary, on a chosen device and dtype."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_concepts, load_folder_concepts, load_weights
from .config import TAPConfig, get_config
from .cpu import Work, fastest_dtype
from .hub import checkpoint_path, concepts_path
from .modeling import TAP

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
TINY_TOKENIZER = Path(__file__).parent / "assets" / "tiny_tokenizer.model"
#: The vocabulary used unless another is named; a checkpoint folder's own vocabulary replaces it.
DEFAULT_CONCEPTS = "merged_2560"
#: Vocabulary of the random-weight demo model (its "concepts" are random directions with these names).
TINY_CONCEPTS = ["person", "dog", "cat", "car", "tree", "house", "sky", "cloud", "grass", "road", "water", "boat",
                 "bird", "horse", "chair", "table", "window", "door", "flower", "mountain", "roof", "sun"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) != "auto":
        try:
            return torch.device(device)
        except RuntimeError:
            raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, work: Work = "compute") -> torch.dtype:
    """`auto` is float16 on GPUs (the weights are fp16, as upstream); on CPU what this CPU runs `work` fastest
    (float32 or bfloat16, `cpu.fastest_dtype`); elsewhere float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type in ("cuda", "mps"):
            return torch.float16
        return fastest_dtype(work) if device.type == "cpu" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}") from None


def checkpoint_folder(model: str | Path | TAPConfig, checkpoint: str | Path | None) -> Path | None:
    """The TAP checkpoint folder named by `checkpoint` or, failing that, by `model`; None when neither is one."""
    for candidate in (checkpoint, model):
        if isinstance(candidate, (str, Path)) and str(candidate) and Path(candidate).is_dir():
            return Path(candidate)
    return None


def build_tap(model: str | Path | TAPConfig = "tap_vit_l", checkpoint: str | Path | None = None, *,
              concepts: str | Path | None = DEFAULT_CONCEPTS, device: str | torch.device = "auto",
              dtype: str | torch.dtype = "auto", random_weights: bool = False, seed: int = 0) -> TAP:
    """Build a TAP model in eval mode.

    Args:
        model: preset name (`tap_vit_b`, `tap_vit_l`, `tap_vit_h`, `tap_tiny`), a `TAPConfig`, or a checkpoint
            folder (`save_pretrained`).
        checkpoint: weights file (.pkl, .safetensors, .pt) or checkpoint folder; None fetches the official file from
            the hub cache (or reads the folder given as `model`).
        concepts: vocabulary name (`merged_2560`, `lvis_1203`, `coco_80`), a concept .pkl path, or None.
        random_weights: skip loading (seeded init) - for tests, benchmarks and the offline demo.
    """
    folder = checkpoint_folder(model, checkpoint)
    if folder is not None:  # a checkpoint folder carries its own config (a TAPConfig passed in may adjust it)
        config = model if isinstance(model, TAPConfig) else get_config(folder)
        checkpoint = folder / "model.safetensors"
    else:
        config = get_config(model)
    dev = resolve_device(device)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG state
        torch.manual_seed(seed)
        tap = TAP(config)
    if random_weights:
        rng = np.random.default_rng(seed)
        weights = rng.standard_normal((config.sem_embed_dim, len(TINY_CONCEPTS))).astype(np.float32)
        tap.concept_projector.reset_weights(100 * weights / np.linalg.norm(weights, axis=0), TINY_CONCEPTS)
    else:
        load_weights(tap, checkpoint_path(config, checkpoint))
        if folder is not None and concepts == DEFAULT_CONCEPTS:  # a folder's own vocabulary (if any) is its default
            own = load_folder_concepts(folder)
            if own is not None:
                tap.concept_projector.reset_weights(*own)
        elif concepts is not None:
            tap.concept_projector.reset_weights(*load_concepts(concepts_path(concepts)))
    return tap.to(device=dev, dtype=resolve_dtype(dtype, dev)).eval()
