"""From an annotated image to what one training forward pass needs: the jittered, padded input image and, per
chosen region, its low-resolution mask, box, teacher prior and caption tokens.

Scale jitter (the paper's [0.5, 2.0]) multiplies the inference scale (long side to the input size): a smaller image
is padded as at inference, a larger one is cropped at a random offset. With jitter (1, 1) the image is exactly what
`TapPredictor` feeds the encoder (`tokenizer_tap.transforms.preprocess`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from tokenizer_tap.text_tokenizer import TextTokenizer
from tokenizer_tap.transforms import PAD_BGR, ResizeInfo

from .priors import Priors
from .samples import ImageSample, RegionAnn


@dataclass
class ImageTargets:
    """One image of a micro-batch and the regions chosen for it (R of them)."""

    image: torch.Tensor  # (S, S, 3) uint8 BGR, padded
    masks: list[torch.Tensor | None]  # (L, L) bool at the decoder's output resolution; None: caption-only box
    boxes: torch.Tensor  # (R, 4) x1, y1, x2, y2 in the input frame
    priors: torch.Tensor  # (R, D) teacher embeddings V_C (zeros where absent)
    has_prior: torch.Tensor  # (R,) bool
    caption_in: torch.Tensor  # (R, T) token ids [BOS, words...] padded
    caption_target: torch.Tensor  # (R, T) next tokens [words..., EOS], -100 where nothing is predicted
    has_caption: torch.Tensor  # (R,) bool
    seed: int  # seeds the prompt sampler for this image

    @property
    def stages(self) -> torch.Tensor:
        """(R,) how many sampling stages each region takes part in (caption-only boxes have no second stage)."""
        return torch.tensor([2 if m is not None else 1 for m in self.masks])


@dataclass
class TapBatch:
    images: list[ImageTargets]

    def __len__(self) -> int:
        return len(self.images)


def jitter_image(rgb: np.ndarray, size: int, scale_range: tuple[float, float],
                 gen: torch.Generator) -> tuple[np.ndarray, float, tuple[int, int], tuple[int, int]]:
    """Rescale by the inference scale times a random factor, crop or pad to `size`.

    Returns the (size, size, 3) uint8 BGR input, the scale applied, the crop offset (x0, y0) and the visible
    (height, width) of the image inside the input."""
    h, w = rgb.shape[:2]
    low, high = scale_range
    factor = low + (high - low) * float(torch.rand(1, generator=gen))
    scale = ResizeInfo.for_image(h, w, size=size).scale * factor
    rh, rw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
    x0 = int(torch.randint(rw - size + 1, (1,), generator=gen)) if rw > size else 0
    y0 = int(torch.randint(rh - size + 1, (1,), generator=gen)) if rh > size else 0
    resized = rgb if (rh, rw) == (h, w) else np.asarray(Image.fromarray(rgb).resize((rw, rh), Image.BILINEAR))
    vis = resized[y0:y0 + size, x0:x0 + size, ::-1]
    canvas = np.empty((size, size, 3), dtype=np.uint8)
    canvas[:] = PAD_BGR
    canvas[:vis.shape[0], :vis.shape[1]] = vis
    return canvas, scale, (x0, y0), vis.shape[:2]


def low_res_mask(mask: np.ndarray, scale: float, offset: tuple[int, int], size: int, low: int) -> torch.Tensor:
    """An original-size boolean mask in the input frame at the decoder's (low, low) output resolution."""
    h, w = mask.shape
    ratio = low / size
    lh, lw = max(1, round(h * scale * ratio)), max(1, round(w * scale * ratio))
    small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((lw, lh), Image.BILINEAR)) > 127
    ox, oy = round(offset[0] * ratio), round(offset[1] * ratio)
    out = np.zeros((low, low), dtype=bool)
    part = small[oy:oy + low, ox:ox + low]
    out[:part.shape[0], :part.shape[1]] = part
    return torch.from_numpy(out)


def caption_tokens(tokenizer: TextTokenizer, captions: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forcing inputs and targets for the text decoder; `max_len` = its context minus the visual prefix."""
    rows = []
    for text in captions:
        ids = tokenizer.encode(text, bos=True)[:max_len] + [tokenizer.eos_id]
        rows.append(ids)
    t = max(1, max((len(r) - 1 for r in rows), default=1))
    inputs = torch.full((len(rows), t), tokenizer.pad_id, dtype=torch.long)
    target = torch.full((len(rows), t), -100, dtype=torch.long)
    for i, ids in enumerate(rows):
        if len(ids) > 1:
            inputs[i, :len(ids) - 1] = torch.tensor(ids[:-1])
            target[i, :len(ids) - 1] = torch.tensor(ids[1:])
    return inputs, target


class TargetBuilder:
    """Turns `ImageSample`s into `ImageTargets` (regions chosen at random, at most `per_image` of them)."""

    def __init__(self, size: int, low: int, per_image: int, scale_range: tuple[float, float],
                 tokenizer: TextTokenizer | None, max_text_len: int, priors: Priors | None, dim: int) -> None:
        self.size, self.low, self.per_image, self.scale_range = size, low, per_image, tuple(scale_range)
        self.tokenizer, self.max_text_len, self.priors, self.dim = tokenizer, max_text_len, priors, dim

    def build(self, sample: ImageSample, seed: int, with_captions: bool) -> ImageTargets | None:
        gen = torch.Generator().manual_seed(seed)
        image, scale, offset, (vh, vw) = jitter_image(sample.image, self.size, self.scale_range, gen)
        chosen: list[tuple[RegionAnn, torch.Tensor | None, list[float]]] = []
        order = torch.randperm(len(sample.regions), generator=gen).tolist()
        for i in order:
            if len(chosen) >= self.per_image:
                break
            region = sample.regions[i]
            if region.mask is None and not (with_captions and region.caption):
                continue  # a box without mask or caption teaches nothing
            x1, y1, x2, y2 = (np.asarray(region.bbox, dtype=np.float64) * scale
                              - np.array([offset[0], offset[1]] * 2))
            box = [max(0.0, x1), max(0.0, y1), min(float(vw), x2), min(float(vh), y2)]
            if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                continue  # cropped away
            low = None
            if region.mask is not None:
                low = low_res_mask(region.mask, scale, offset, self.size, self.low)
                if not bool(low.any()):
                    continue
            chosen.append((region, low, box))
        if not chosen:
            return None
        keys = [r.key for r, _, _ in chosen]
        priors = torch.zeros(len(chosen), self.dim)
        has_prior = torch.zeros(len(chosen), dtype=torch.bool)
        if self.priors is not None:
            found = [i for i, k in enumerate(keys) if k in self.priors]
            if found:
                priors[found] = self.priors.embeddings([keys[i] for i in found])
                has_prior[found] = True
        captions = [r.caption if with_captions else "" for r, _, _ in chosen]
        has_caption = torch.tensor([bool(c) for c in captions], dtype=torch.bool)
        if self.tokenizer is not None:
            cap_in, cap_target = caption_tokens(self.tokenizer, captions, self.max_text_len)
            cap_target[~has_caption] = -100
        else:
            cap_in = torch.zeros(len(chosen), 1, dtype=torch.long)
            cap_target = torch.full((len(chosen), 1), -100, dtype=torch.long)
            has_caption[:] = False
        return ImageTargets(torch.from_numpy(image), [m for _, m, _ in chosen],
                            torch.tensor([b for _, _, b in chosen], dtype=torch.float32), priors, has_prior,
                            cap_in, cap_target, has_caption, seed + 1)
