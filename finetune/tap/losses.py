"""TAP's training losses: L = L_concept + alpha * L_seg + beta * L_cap (the paper's §3.1).

Each function returns per-prompt (or per-token) sums, so the loop can average every term over the global batch.
Masks are compared at the decoder's output resolution (4x the feature grid: 256 x 256 for a 1024 input), with the
ground truth resampled to it, which keeps 64 prompts per image affordable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .priors import target_log_probs


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss averaged over pixels: (..., H, W) logits and {0, 1} targets -> (...)."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    weight = alpha * target + (1 - alpha) * (1 - target)
    return (weight * ce * (1 - p_t) ** gamma).flatten(-2).mean(-1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice over flattened pixels of sigmoid probabilities (eps 1, as the official building block)."""
    p = torch.sigmoid(logits).flatten(-2)
    t = target.flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + eps) / (p.sum(-1) + t.sum(-1) + eps)


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of the binarised prediction (logit > 0) with the target: (..., H, W) -> (...)."""
    pred = (logits > 0).flatten(-2)
    t = target.flatten(-2) > 0.5
    inter = (pred & t).sum(-1).float()
    union = (pred | t).sum(-1).float()
    return inter / union.clamp(min=1)


def route_training(per_mask: torch.Tensor, is_box: torch.Tensor) -> torch.Tensor:
    """The mask each prompt trains, consistent with inference routing: mask 0 for boxes, and for points the
    lowest-loss mask among 1..M-1 (the ambiguity-aware multi-mask rule)."""
    score = per_mask.detach().clone()
    score[:, 0] = torch.where(is_box.to(score.device), float("-inf"), float("inf"))
    return score.argmin(dim=1)


def segmentation_loss(mask_logits: torch.Tensor, target: torch.Tensor, iou_pred: torch.Tensor, is_box: torch.Tensor,
                      focal: float = 20.0, dice: float = 1.0, iou: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """L_seg per prompt: focal x 20 + dice on the routed mask, plus the IoU head's MSE on every mask.

    Args:
        mask_logits: (N, M, L, L); target: (N, L, L) in {0, 1}; iou_pred: (N, M) raw; is_box: (N,).

    Returns (N,) losses and the (N,) routed mask indices."""
    t = target[:, None].to(mask_logits.dtype).expand_as(mask_logits)
    per_mask = focal * focal_loss(mask_logits.float(), t.float()) + dice * dice_loss(mask_logits.float(), t.float())
    chosen = route_training(per_mask, is_box)
    rows = torch.arange(len(chosen), device=chosen.device)
    iou_target = mask_iou(mask_logits.detach(), t)
    iou_mse = ((iou_pred.float() - iou_target) ** 2).mean(-1)
    return per_mask[rows, chosen] + iou * iou_mse, chosen


def concept_loss(sem_embeds: torch.Tensor, v_c: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L_concept per prompt: KL(P_target || P_pred) over the concept vocabulary, both distributions computed as the
    official concept projector does (normalised embedding @ temperature-scaled text matrix, softmax).

    sem_embeds: (N, D) the routed semantic embeddings; v_c: (N, D) teacher image embeddings; weights: (D, K)."""
    log_pred = torch.log_softmax(F.normalize(sem_embeds.float(), dim=-1) @ weights.float(), dim=-1)
    log_tgt = target_log_probs(v_c, weights)
    return (log_tgt.exp() * (log_tgt - log_pred)).sum(-1)


def caption_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """L_cap: summed next-token cross-entropy. logits (N, T, V) from `TextDecoder.forward`, where position j
    predicts token j + 1; target (N, T) holds those next tokens, -100 where nothing is to be predicted."""
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100, reduction="sum",
                           label_smoothing=label_smoothing)
