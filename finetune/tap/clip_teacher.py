"""The CLIP that teaches TAP its concepts (`tap-priors`), behind one interface whatever its backend: image and text
embeddings, the logit scale, and the image geometry and normalisation its weights were trained with.

Backends: open_clip (`MODEL[:PRETRAINED]`, e.g. the paper's `EVA02-E-14-plus:laion2b_s9b_b144k`), or transformers
CLIP (`hf:openai/clip-vit-large-patch14`, or a folder written by `save_pretrained`).
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tokenizer_tap.errors import WeightsNotFoundError

#: OpenAI CLIP's normalisation, shared by EVA-CLIP and most open_clip / transformers CLIP weights.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_CLIP = "EVA02-E-14-plus:laion2b_s9b_b144k"


def mean_colour(mean: Sequence[float]) -> np.ndarray:
    """The teacher's mean colour as uint8 RGB: the fill that normalises to (about) zero."""
    return np.clip(np.round(np.asarray(mean, dtype=np.float64) * 255), 0, 255).astype(np.uint8)


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
