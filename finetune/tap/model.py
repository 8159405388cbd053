"""The training forward pass of TAP: encode each image once, decode its stage-1 prompts, sample stage-2 prompts from
the errors, decode again, and return the summed losses of the micro-batch.

Images are encoded one at a time, so BatchNorm statistics (the cross-window convs, the neck) are per image and do not
depend on how images are split over micro-batches or processes.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenizer_tap.modeling.tap import TAP

from .batch import ImageTargets, TapBatch
from .config import TapLossConfig, TapSamplerConfig
from .losses import caption_loss, concept_loss, segmentation_loss
from .sampler import first_stage, second_stage

TERMS = ("seg", "concept", "caption")


class TapTrainModel(nn.Module):
    """forward(batch) -> {"seg", "concept", "caption"} summed over prompts (caption: over tokens)."""

    def __init__(self, tap: TAP, loss: TapLossConfig, sampler: TapSamplerConfig,
                 concept_weights: torch.Tensor | None) -> None:
        super().__init__()
        self.tap, self.loss, self.sampler = tap, loss, sampler
        self.concept_weights = concept_weights  # (D, K) teacher text matrix; a plain tensor, not a weight

    def forward(self, batch: TapBatch) -> dict[str, torch.Tensor]:
        device = self.tap.device
        sums = {k: torch.zeros((), device=device) for k in TERMS}
        for item in batch.images:
            for k, v in self.image_losses(item).items():
                sums[k] = sums[k] + v
        return sums

    def image_losses(self, item: ImageTargets) -> dict[str, torch.Tensor]:
        tap, device = self.tap, self.tap.device
        features = tap.image_encoder(tap.normalize(item.image[None]).contiguous(memory_format=torch.channels_last))
        size = tap.config.image_size
        low = features.shape[-1] * 4
        stride = size / low
        gen = torch.Generator().manual_seed(item.seed)
        prompts, is_box = first_stage(item.masks, item.boxes, self.sampler, stride, size, gen)
        out = tap.get_outputs(features, prompts.to(device))
        with_mask = [i for i, m in enumerate(item.masks) if m is not None]
        sums = self.region_losses(item, out, is_box, with_mask)
        if self.sampler.second_stage and with_mask:
            chosen = sums.pop("chosen")
            rows = torch.tensor(with_mask)
            predicted = out["mask_pred"][rows, chosen[rows]].detach().cpu() > 0
            prompts2, is_box2 = second_stage([item.masks[i] for i in with_mask], prompts[rows], is_box[rows],
                                             predicted, self.sampler, stride, gen)
            out2 = tap.get_outputs(features, prompts2.to(device))
            sub = ImageTargets(item.image, [item.masks[i] for i in with_mask], item.boxes[rows], item.priors[rows],
                               item.has_prior[rows], item.caption_in[rows], item.caption_target[rows],
                               item.has_caption[rows], item.seed)
            second = self.region_losses(sub, out2, is_box2, list(range(len(with_mask))))
            second.pop("chosen")
            sums = {k: sums[k] + second[k] for k in TERMS}
        sums.pop("chosen", None)
        return sums

    def region_losses(self, item: ImageTargets, out: dict[str, torch.Tensor], is_box: torch.Tensor,
                      with_mask: list[int]) -> dict[str, torch.Tensor]:
        """Losses of one decoder call; also returns "chosen", the routed mask index of every prompt."""
        device = out["iou_pred"].device
        n = out["iou_pred"].shape[0]
        chosen = torch.zeros(n, dtype=torch.long, device=device)  # caption-only boxes: mask 0, as at inference
        seg = torch.zeros((), device=device)
        if with_mask:
            rows = torch.tensor(with_mask, device=device)
            target = torch.stack([item.masks[i] for i in with_mask]).to(device)
            per_prompt, picked = segmentation_loss(out["mask_pred"][rows], target, out["iou_pred"][rows],
                                                   is_box[with_mask], self.loss.focal, self.loss.dice, self.loss.iou)
            seg = per_prompt.sum()
            chosen[rows] = picked
        every = torch.arange(n, device=device)
        concept = torch.zeros((), device=device)
        has_prior = item.has_prior.to(device)
        if self.concept_weights is not None and bool(has_prior.any()):
            w = self.concept_weights.to(device)
            sem = out["sem_embeds"][every, chosen][has_prior]
            concept = concept_loss(sem, item.priors.to(device)[has_prior], w).sum()
        caption = torch.zeros((), device=device)
        has_caption = item.has_caption.to(device)
        if bool(has_caption.any()):
            tokens = out["sem_tokens"][every, chosen][has_caption]  # (n, 1, C)
            logits = self.tap.text_decoder(tokens, item.caption_in.to(device)[has_caption])
            caption = caption_loss(logits, item.caption_target.to(device)[has_caption], self.loss.label_smoothing)
        return {"seg": seg, "concept": concept, "caption": caption, "chosen": chosen}
