"""The paper's two-stage prompt sampler (§3.1), producing prompt rows exactly as inference builds them.

Stage 1: a box or a point, with equal probability, from each ground-truth mask. Stage 2: either 1-8 points from the
error region between the stage-1 prediction and the mask (missed pixels give positive points, spurious pixels
negative ones), added to the stage-1 prompt; or, with probability 0.5, a fresh non-interactive draw of 1-9
positive points from the mask (what lets a sketch act like a mask prompt). At most 9 points per prompt.

Rows are (x, y, label) in the padded input frame, as `TapPredictor` feeds the decoder: a box is its two corners
(labels 2, 3); points are followed by one padding row (label 4), as the official point and sketch prompts are;
prompts of one image are padded with more label-4 rows to a common length. All randomness comes from the
generator passed in, so a run is reproducible whatever the number of processes.
"""

from __future__ import annotations

import torch

from tokenizer_tap.modeling import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT, NEGATIVE, PAD, POSITIVE

from .config import TapSamplerConfig


def _uniform_points(mask: torch.Tensor, n: int, stride: float, gen: torch.Generator) -> torch.Tensor:
    """`n` points (x, y) drawn uniformly (with replacement) from the true cells of a low-res mask, jittered inside
    the cell, in input-frame pixels."""
    cells = mask.nonzero()
    pick = cells[torch.randint(len(cells), (n,), generator=gen)].float()
    offset = torch.rand(n, 2, generator=gen)
    return torch.stack([(pick[:, 1] + offset[:, 0]) * stride, (pick[:, 0] + offset[:, 1]) * stride], dim=1)


def _box_rows(box: torch.Tensor, noise: float, limit: float, gen: torch.Generator) -> torch.Tensor:
    """Box corners with SAM-style noise: each coordinate moves by up to `noise` x the side (at most 20 px)."""
    x1, y1, x2, y2 = box.tolist()
    if noise > 0:
        w, h = x2 - x1, y2 - y1
        jitter = (torch.rand(4, generator=gen) * 2 - 1) * torch.tensor([w, h, w, h]).clamp(max=200.0) * noise
        x1, y1, x2, y2 = (torch.tensor([x1, y1, x2, y2]) + jitter).clamp(0, limit).tolist()
        if x2 <= x1 or y2 <= y1:  # noise must not turn the box inside out
            x1, y1, x2, y2 = box.tolist()
    return torch.tensor([[x1, y1, BOX_TOP_LEFT], [x2, y2, BOX_BOTTOM_RIGHT]])


def _with_labels(points: torch.Tensor, label: int) -> torch.Tensor:
    return torch.cat([points, torch.full((len(points), 1), float(label))], dim=1)


def _pad_row() -> torch.Tensor:
    return torch.tensor([[0.0, 0.0, PAD]])


def stack_prompts(prompts: list[torch.Tensor]) -> torch.Tensor:
    """(K_i, 3) prompts -> (N, K, 3), padded at the end with label-4 rows."""
    k = max(len(p) for p in prompts)
    out = torch.zeros(len(prompts), k, 3)
    out[..., 2] = PAD
    for i, p in enumerate(prompts):
        out[i, :len(p)] = p
    return out


def first_stage(masks: list[torch.Tensor | None], boxes: torch.Tensor, cfg: TapSamplerConfig, stride: float,
                image_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt per region: a box or a point. Regions without a mask (caption-only boxes) always get their box.

    Returns (N, 2, 3) rows and (N,) booleans telling which prompts are boxes."""
    rows, is_box = [], []
    for mask, box in zip(masks, boxes):
        if mask is not None and bool(mask.any()) and float(torch.rand(1, generator=gen)) >= cfg.box_prob:
            rows.append(torch.cat([_with_labels(_uniform_points(mask, 1, stride, gen), POSITIVE), _pad_row()]))
            is_box.append(False)
        else:
            rows.append(_box_rows(box, cfg.box_noise, image_size - 1, gen))
            is_box.append(True)
    return stack_prompts(rows), torch.tensor(is_box, dtype=torch.bool)


def second_stage(masks: list[torch.Tensor], first: torch.Tensor, first_is_box: torch.Tensor,
                 predicted: torch.Tensor, cfg: TapSamplerConfig, stride: float,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A refined prompt per region (all regions here have masks).

    Args:
        masks: (L, L) boolean ground truth per region.
        first: (N, K, 3) stage-1 rows; first_is_box: (N,) their kind.
        predicted: (N, L, L) boolean stage-1 prediction (the routed mask), compared with the ground truth.

    Returns (N, K', 3) rows and (N,) booleans telling which prompts start with a box (the routing rule)."""
    rows, is_box = [], []
    for mask, prev, box, pred in zip(masks, first, first_is_box.tolist(), predicted):
        if float(torch.rand(1, generator=gen)) < cfg.non_interactive_prob:
            n = int(torch.randint(1, cfg.max_points + 1, (1,), generator=gen))
            rows.append(torch.cat([_with_labels(_uniform_points(mask, n, stride, gen), POSITIVE), _pad_row()]))
            is_box.append(False)
            continue
        kept = prev[prev[:, 2] != PAD]  # the stage-1 box corners or point, without padding
        budget = min(cfg.max_points - 1, cfg.max_points - int((kept[:, 2] <= POSITIVE).sum()))  # 1-8 points
        n = int(torch.randint(1, max(1, budget) + 1, (1,), generator=gen))
        missed, spurious = mask & ~pred, pred & ~mask
        error = missed | spurious
        if bool(error.any()):
            pts = _uniform_points(error, n, stride, gen)
            cells = (pts / stride).long().clamp(max=mask.shape[0] - 1)
            labels = mask[cells[:, 1], cells[:, 0]].float() * (POSITIVE - NEGATIVE) + NEGATIVE
            new = torch.cat([pts, labels[:, None]], dim=1)
        else:  # a perfect first guess: confirm it with points from the mask
            new = _with_labels(_uniform_points(mask, n, stride, gen), POSITIVE)
        parts = [kept, new] if box else [kept, new, _pad_row()]
        rows.append(torch.cat(parts))
        is_box.append(box)
    return stack_prompts(rows), torch.tensor(is_box, dtype=torch.bool)
