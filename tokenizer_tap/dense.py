"""The dense-prompt pass: a grid of point prompts over the whole image, decoded once and kept per image.

`segment_everything` and `find` read the same pass, so after one of them the other - and every later `find` query
on that image - costs no decoder work for the grid: only ranking, merging duplicates, and the kept regions' masks
and captions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .prompts import Prompt
from .transforms import ResizeInfo

#: `find` keeps an instance when its grid masks' weights (concept probability x predicted IoU) add up to this, on a
#: 16 x 16 grid (scaled with the grid's area): one confident, well-segmented mask, or several weaker ones agreeing.
SUPPORT = 0.5
#: `find` groups masks by their overlaps at most this many cells a side: the demo model's whole 64 x 64 output, a
#: 4 x 4 pooled full-size one (256 x 256), so a later query stays cheap when hundreds of masks name its concept.
COARSE = 64
SHOWN = 4  # `merge` shows a group by one of its heaviest masks: bounded work however many masks a group has


def grid_prompts(width: int, height: int, points_per_side: int) -> list[Prompt]:
    """An n x n grid of point prompts at the cell centres, row by row, in original pixels."""
    centres = (np.arange(points_per_side) + 0.5) / points_per_side
    return [Prompt.point(float(x * width), float(y * height)) for y in centres for x in centres]


def crop_binary(logits: torch.Tensor, info: ResizeInfo) -> torch.Tensor:
    """(N, h, w) low-res mask logits -> (N, h', w') binary masks of the image area (the padding holds nothing)."""
    rh, rw = info.resized_hw
    lh = max(1, round(rh * logits.shape[-2] / info.size))
    lw = max(1, round(rw * logits.shape[-1] / info.size))
    return logits[:, :lh, :lw] > 0


def coarse(masks: torch.Tensor, cells: int = COARSE) -> torch.Tensor:
    """(N, h, w) binary masks -> (N, h'' * w'') share of each cell they cover, at most `cells` x `cells` cells."""
    n, h, w = masks.shape
    k = -(-max(h, w) // cells)
    if k > 1:
        padded = masks.new_zeros((n, -(-h // k) * k, -(-w // k) * k))
        padded[:, :h, :w] = masks
        masks = padded.view(n, padded.shape[1] // k, k, padded.shape[2] // k, k).sum((2, 4)) / (k * k)
    return masks.flatten(1).half()


@dataclass
class PointMasks:
    """Every point mask of every grid prompt (masks 1..M-1; mask 0 answers boxes), flattened prompt by prompt: what
    `find` ranks. Routing keeps one mask per click, and a click on a house's wall routes to the wall while the house
    is among the others: on the demo model's training scenes the routed masks reach 63 % of the objects with a mask
    of the right top concept (IoU >= 0.5), all point masks 75 %."""

    row: torch.Tensor  # (C,) the grid prompt each mask answers
    out: dict[str, torch.Tensor]  # as `DenseGrid.out`, per mask; float32 mask logits kept at half precision
    cells: torch.Tensor  # (C, h'' * w'') float16 `coarse` masks of the image area, to group
    area: torch.Tensor  # (C,) float32 share of the image each covers
    top: torch.Tensor  # (C,) most probable concept
    score: torch.Tensor  # (C,) its probability
    weight: torch.Tensor  # (C,) score x predicted IoU (clamped to [0, 1]): how much the mask counts as an instance

    @classmethod
    def build(cls, every: dict[str, torch.Tensor], probs: torch.Tensor, info: ResizeInfo) -> PointMasks:
        """From (N, M', ...) outputs of each prompt's point masks and their (N * M', K) concept probabilities."""
        n, m = every["iou"].shape[:2]
        out = {k: v.flatten(0, 1) for k, v in every.items()}
        low = crop_binary(out["mask_logits"], info)
        if out["mask_logits"].dtype == torch.float32:  # the sign is what counts: half the memory, same masks
            out["mask_logits"] = out["mask_logits"].half()
        score, top = probs.max(1)
        row = torch.arange(n, device=top.device).repeat_interleave(m)
        area = low.flatten(1).sum(1).float() / low[0].numel()
        return cls(row, out, coarse(low), area, top, score, score * out["iou"].float().clamp(0, 1))

    @property
    def nbytes(self) -> int:
        tensors = [self.row, self.cells, self.area, self.top, self.score, self.weight, *self.out.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class DenseGrid:
    """The decoder's routed outputs for every grid prompt (`TapPredictor.decode_rows`), with what every query of
    the pass reads again: binary masks at the decoder's resolution, cropped to the image (to rank and merge), the
    share of the image each covers, the concept probabilities (None without a vocabulary), and every point mask of
    each prompt for `find` (None without a vocabulary)."""

    prompts: list[Prompt]
    out: dict[str, torch.Tensor]
    low: torch.Tensor  # (N, h * w) bool
    area: torch.Tensor  # (N,) float32
    probs: torch.Tensor | None  # (N, K) float32
    points: PointMasks | None = None

    @classmethod
    def build(cls, prompts: list[Prompt], out: dict[str, torch.Tensor], probs: torch.Tensor | None,
              info: ResizeInfo, points: PointMasks | None = None) -> DenseGrid:
        """Crop the low-res masks to the image area and binarise them."""
        low = crop_binary(out["mask_logits"], info).flatten(1)
        return cls(prompts, out, low, low.float().mean(1), probs, points)

    @property
    def nbytes(self) -> int:
        """Memory held, for the cache's bound: at 16 x 16 about 190 MiB for full-size models (256 x 256 logits: the
        routed ones, and every point mask's at half precision), 19 MiB for the demo model (5 MiB routed alone)."""
        tensors = [*self.out.values(), self.low, self.area] + ([self.probs] if self.probs is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors) + (self.points.nbytes if self.points else 0)


def dedupe(low: torch.Tensor, order: Sequence[int], overlap: float, limit: int) -> list[int]:
    """Greedy non-maximum suppression of (N, P) binary masks: walk `order` (best first) and keep a mask unless its
    IoU with one already kept is over `overlap`, until `limit` are kept."""
    kept = torch.empty((min(limit, len(order)), low.shape[1]), device=low.device)  # filled in order; read as views
    sizes = torch.empty(kept.shape[0], device=low.device)
    keep: list[int] = []
    for i in order:
        n = len(keep)
        if n >= limit:
            break
        mask = low[i].float()
        size = mask.sum()
        if n:
            inter = kept[:n] @ mask
            if bool((inter / (sizes[:n] + size - inter).clamp(min=1) > overlap).any()):
                continue
        kept[n], sizes[n] = mask, size
        keep.append(i)
    return keep


def shared(kept: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(n,) area `mask` shares with each of `kept` (n, P), `coarse` masks: within a cell the smaller share is taken
    to lie inside the larger (the masks grouped are views of one object, nested), exact for binary masks."""
    return torch.minimum(kept, mask).sum(-1)


def merge(cells: torch.Tensor, order: Sequence[int], weight: torch.Tensor, overlap: float) -> list[tuple[int, float]]:
    """Group (N, P) `coarse` masks into instances: walk `order` (heaviest first); a mask sharing more than `overlap`
    of the smaller mask with a group's first joins the group it shares most with (one grid point's view of a car's
    window, or of the whole car, is the car), else it starts a group.

    Returns, per group, the mask its members agree with most, of its `SHOWN` heaviest (the largest `weight`-weighted
    sum of IoUs with them: a consensus, where the heaviest mask may have spilt onto a neighbour; on the demo model's
    training scenes any of the members would not do better), and its summed `weight` (its support).
    """
    sizes = cells.sum(1)
    firsts: list[int] = []
    groups: list[list[int]] = []
    for i in order:
        if firsts:
            share = shared(cells[firsts], cells[i]) / torch.minimum(sizes[firsts], sizes[i]).clamp(min=1e-6)
            j = int(share.argmax())
            if float(share[j]) > overlap:
                groups[j].append(i)
                continue
        firsts.append(i)
        groups.append([i])
    found: list[tuple[int, float]] = []
    for members in groups:
        w = weight[members].float()
        inter = torch.stack([shared(cells[members], cells[k]) for k in members[:SHOWN]])
        union = sizes[members[:SHOWN], None] + sizes[members][None] - inter
        agree = (inter / union.clamp(min=1e-6)) @ w
        found.append((members[int(agree.argmax())], float(w.sum())))
    return found


def instances(points: PointMasks, wanted: list[int], min_score: float, overlap: float, min_area: float,
              support: float) -> list[int]:
    """The point masks that stand for instances of the `wanted` concepts, most probable first: masks whose top
    concept is wanted with at least `min_score`, grouped heaviest first (`merge`), each group kept when
    its weights add up to `support`."""
    rows = torch.nonzero(torch.isin(points.top, torch.tensor(wanted, device=points.top.device))
                         & (points.score >= min_score) & (points.area >= min_area)).flatten()
    order = torch.argsort(points.weight[rows], descending=True, stable=True).tolist()
    kept = [int(rows[i]) for i, total in merge(points.cells[rows].float(), order, points.weight[rows], overlap)
            if total >= support]
    return sorted(kept, key=lambda i: -float(points.score[i]))
