"""SAM-style two-way transformer decoder that also emits semantic tokens (TAP's addition).

Per prompt it predicts 4 masks, 4 raw IoU scores and 4 semantic tokens; mask 0 is meant for boxes, masks 1-3
for (ambiguous) points, see `route`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP, ChannelLayerNorm, Predictor
from .prompt_encoder import BOX_TOP_LEFT


def expand(x: torch.Tensor, n: int) -> torch.Tensor:
    """Repeat a per-image batch (B, ...) to per-prompt (N, ...) with prompts grouped by image."""
    return x if x.shape[0] == n else x.repeat_interleave(n // x.shape[0], dim=0)


class Attention(nn.Module):
    """Attention with separate q/k/v projections to an `internal_dim` that may be narrower than the tokens."""

    def __init__(self, dim: int, num_heads: int, internal_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, internal_dim)
        self.k_proj = nn.Linear(dim, internal_dim)
        self.v_proj = nn.Linear(dim, internal_dim)
        self.proj = nn.Linear(internal_dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Inputs may have batch B (per image) or N (per prompt, grouped by image): each side is projected at
        its own batch size and only then expanded, so image-side projections are shared by all prompts."""
        n = max(q.shape[0], k.shape[0])
        q, k, v = (expand(self._heads(t), n) for t in (self.q_proj(q), self.k_proj(k), self.v_proj(v)))
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).flatten(2))


class TwoWayBlock(nn.Module):
    """Tokens attend to themselves and the image; then the image attends back to the tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, skip_first_pe: bool, dropout: float = 0.0) -> None:
        super().__init__()
        self.skip_first_pe = skip_first_pe
        self.dropout = nn.Dropout(dropout)  # on every branch before its residual add (training only)
        self.self_attn = Attention(dim, num_heads, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, dim // 2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, dim // 2)
        self.norm4 = nn.LayerNorm(dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, query_pos: torch.Tensor,
                key_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (N, T, D) and image (N, HW, D) attend to each other; returns both updated."""
        if self.skip_first_pe:  # the first block has neither positional encoding nor residual here
            query = self.norm1(self.dropout(self.self_attn(query, query, query)))
        else:
            q = query + query_pos
            query = self.norm1(query + self.dropout(self.self_attn(q, q, query)))
        q, k = query + query_pos, key + key_pos
        query = self.norm2(query + self.dropout(self.cross_attn_token_to_image(q, k, key)))
        query = self.norm3(query + self.dropout(self.mlp(query)))
        q = query + query_pos
        key = self.norm4(expand(key, query.shape[0]) + self.dropout(self.cross_attn_image_to_token(k, q, query)))
        return query, key


class TwoWayTransformer(nn.Module):
    """`depth` two-way blocks, then a last token-to-image attention."""

    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TwoWayBlock(dim, num_heads, mlp_dim, i == 0, dropout) for i in range(depth))
        self.dropout = nn.Dropout(dropout)
        self.final_attn_token_to_image = Attention(dim, num_heads, dim // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, query_pos: torch.Tensor,
                key_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (N, T, D), image (N, HW, D) and their positions -> updated (tokens, image)."""
        for block in self.blocks:
            query, key = block(query, key, query_pos, key_pos)
        query = self.norm(query + self.dropout(self.final_attn_token_to_image(query + query_pos, key + key_pos, key)))
        return query, key


class ImageDecoder(nn.Module):
    """Decodes prompt tokens against image features into masks, IoU scores and semantic tokens."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_dim: int, num_mask_tokens: int,
                 sem_embed_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_mask_tokens = num_mask_tokens
        self.transformer = TwoWayTransformer(depth, dim, num_heads, mlp_dim, dropout)
        self.iou_token = nn.Embedding(1, dim)
        self.sem_tokens = nn.Embedding(num_mask_tokens, dim)
        self.mask_tokens = nn.Embedding(num_mask_tokens, dim)
        self.output_conv = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, 2, 2), ChannelLayerNorm(dim // 4), nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, 2, 2), nn.GELU())
        self.mask_pred = nn.ModuleList(Predictor(dim, dim, dim // 8) for _ in range(num_mask_tokens))
        self.iou_pred = Predictor(dim, dim, num_mask_tokens)
        self.sem_pred = Predictor(dim, sem_embed_dim, sem_embed_dim)

    def forward(self, image_embeds: torch.Tensor, image_pe: torch.Tensor,
                sparse_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """Decode N prompts over B images.

        Args:
            image_embeds: (B, C, h, w) neck features.
            image_pe: (h * w, C) dense positional encoding.
            sparse_embeds: (N, K, C) prompt tokens, grouped contiguously per image (N divisible by B).

        Returns:
            iou_pred (N, M) float32 raw scores, mask_pred (N, M, 4h, 4w) logits, sem_tokens (N, M, 1, C) and
            sem_embeds (N, M, sem_embed_dim), with M = num_mask_tokens.
        """
        n, b = sparse_embeds.shape[0], image_embeds.shape[0]
        if n % b:
            raise ValueError(f"{n} prompts cannot be split evenly over {b} images")
        c, h, w = image_embeds.shape[1:]
        m = self.num_mask_tokens
        # Keys stay per image until the first image-to-token attention makes them prompt-specific.
        key = image_embeds.flatten(2).transpose(1, 2)
        tokens = torch.cat([self.sem_tokens.weight, self.iou_token.weight, self.mask_tokens.weight])
        query = torch.cat([tokens.unsqueeze(0).expand(n, -1, -1), sparse_embeds], dim=1)
        query, key = self.transformer(query, key, query, image_pe.unsqueeze(0))
        sem_tokens, iou_token = query[:, :m], query[:, m]
        mask_tokens = query[:, m + 1:2 * m + 1]
        mask_embeds = self.output_conv(key.transpose(1, 2).reshape(n, c, h, w))
        hyper = torch.stack([head(mask_tokens[:, i]) for i, head in enumerate(self.mask_pred)], dim=1)
        masks = (hyper @ mask_embeds.flatten(2)).view(n, m, *mask_embeds.shape[2:])
        return {
            "iou_pred": self.iou_pred(iou_token).float(),
            "mask_pred": masks,
            "sem_tokens": sem_tokens.unsqueeze(2),
            "sem_embeds": self.sem_pred(sem_tokens),
        }


def route(iou_pred: torch.Tensor, first_labels: torch.Tensor) -> torch.Tensor:
    """Pick one mask per prompt: mask 0 for box prompts (first label 2), else the best IoU among masks 1..M-1."""
    score = iou_pred.clone()
    is_box = first_labels.to(score.device) == BOX_TOP_LEFT
    score[:, 0] += torch.where(is_box, 1000.0, -1000.0)
    return score.argmax(dim=1)
