"""TAP's image encoder as a trainable vision tower: frozen up to the last k blocks, differentiable after them.

The output is exactly what the assistant feeds the projector at inference: the last stage's cross-window conv
features (`TapPredictor.trunk_features`), from the same resize-and-pad preprocessing. With k > 0 the last k blocks,
the final LayerNorm and the last cross-window conv learn; k must fit in the encoder's last stage (the blocks after
the previous cross-window conv).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

from tokenizer_tap.cache import BoundedCache
from tokenizer_tap.image_io import load_image
from tokenizer_tap.modeling.tap import TAP
from tokenizer_tap.transforms import preprocess


def read_image(path: str, size: int, blank: bool = False) -> torch.Tensor:
    """An image file as the encoder's (size, size, 3) uint8 BGR input; `blank` gives the same in black (the
    image-blind baseline)."""
    rgb = np.zeros((size, size, 3), np.uint8) if blank else load_image(path)
    return torch.from_numpy(preprocess(rgb, size)[0])


class VisionTower(nn.Module):
    """(B, S, S, 3) uint8 BGR -> (B, C, g, g) trunk features; the frozen part's output can be cached per image.

    Only the trainable tail is a registered submodule (`tail`): DDP and DeepSpeed see just that, so under ZeRO-3 the
    frozen encoder stays whole on every rank, runs (or hits its cache) without collectives, and ranks holding
    different images never disagree on which sharded weights to gather.
    """

    def __init__(self, tap: TAP, trainable_blocks: int, cache_size: int = 0) -> None:
        super().__init__()
        enc = tap.image_encoder
        last_stage = enc.cross_indices[-1] - (enc.cross_indices[-2] if len(enc.cross_indices) > 1 else -1)
        if not 0 <= trainable_blocks <= last_stage:
            raise ValueError(f"encoder_blocks must be 0..{last_stage} for {tap.config.name} (its last stage has "
                             f"{last_stage} blocks)")
        object.__setattr__(self, "tap", tap)  # frozen and unregistered (see the class docstring)
        self.k = trainable_blocks
        self.cut = len(enc.blocks) - trainable_blocks  # blocks[cut:] are trainable
        self.cache_size = cache_size
        self._cache: BoundedCache[str, torch.Tensor] = BoundedCache("finetune.frozen_features", max(cache_size, 1))
        for p in tap.parameters():
            p.requires_grad_(False)
        self.tail = nn.ModuleList(self.trainable_modules())
        for p in self.tail.parameters():
            p.requires_grad_(True)

    def trainable_modules(self) -> list[nn.Module]:
        if self.k == 0:
            return []
        enc = self.tap.image_encoder
        return [*enc.blocks[self.cut:], enc.norm, enc.cross_conv[-1]]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The tuned weights, keyed as in `tap.image_encoder.state_dict()` (the checkpoint's encoder.safetensors)."""
        names = {id(p) for m in self.trainable_modules() for p in m.parameters()}
        return {k: v.detach().cpu().clone() for k, v in self.tap.image_encoder.named_parameters() if id(v) in names}

    def forward(self, images: torch.Tensor, keys: list[str] | None = None) -> torch.Tensor:
        enc = self.tap.image_encoder
        frozen = []
        for i in range(images.shape[0]):
            key = keys[i] if keys is not None and self.cache_size else None
            hit = self._cache.get(key) if key is not None else None
            if hit is not None:
                frozen.append(hit)
                continue
            with torch.no_grad():
                x = self._frozen(images[i:i + 1])
            if key is not None:
                self._cache.put(key, x)
            frozen.append(x)
        x = torch.cat(frozen)
        if self.k:  # DeepSpeed may hold the tail in bf16 while the frozen part computes in float32
            x = x.to(next(self.tail.parameters()).dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.k > 0):
            # one call per block whatever the batch (ZeRO-3 gathers a block's weights per call)
            x = enc.run(x, self.cut, len(enc.blocks), chunked=False)
            return enc.finish(x)

    def _frozen(self, images: torch.Tensor) -> torch.Tensor:
        """Everything before the trainable blocks: (B, g, g, C) channels-last."""
        enc = self.tap.image_encoder
        x = self.tap.normalize(images).contiguous(memory_format=torch.channels_last)
        return enc.run(enc.stem(x), 0, self.cut)


def image_key(path: str) -> str:
    return hashlib.sha1(path.encode()).hexdigest()
