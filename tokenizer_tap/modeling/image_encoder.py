"""ViT image encoder of TAP: windowed attention everywhere, conv bottlenecks across windows, a one-level neck.

Unlike SAM there are no global-attention blocks: the 64x64 token grid is cut into 16x16 windows and the only
information flow between windows is the conv bottleneck after the last block of each quarter of the encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .common import MLP


def relative_position_index(window: int) -> torch.Tensor:
    """(window², window²) int64 table: index[i, j] = (yi - yj + w - 1) * (2w - 1) + (xi - xj + w - 1)."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + window - 1
    dx = xs[:, None] - xs[None, :] + window - 1
    return dy * (2 * window - 1) + dx


class RelPosEmbed(nn.Module):
    """Swin-style 2-D relative position bias: one learned value per (head, offset) looked up through `index`."""

    def __init__(self, num_heads: int, window: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_heads, (2 * window - 1) ** 2))
        self.register_buffer("index", relative_position_index(window))

    def forward(self, dtype: torch.dtype) -> torch.Tensor:
        """(1, heads, L, L) bias in `dtype`; 4-D because a 3-D mask sends SDPA to its slow unfused CPU path."""
        return self.weight[:, self.index].to(dtype)[None]


class Attention(nn.Module):
    """Multi-head self-attention inside one window, with the relative-position bias as an additive mask."""

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_embed = RelPosEmbed(num_heads, window)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """`bias` is `rel_pos_embed(dtype)`, computed once per forward by the encoder for all window groups."""
        n, length, dim = x.shape
        # Channel layout of qkv is (which, head, head_dim).
        q, k, v = self.qkv(x).view(n, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(x.transpose(1, 2).reshape(n, length, dim))


class DropPath(nn.Module):
    """Stochastic depth: in training, drop a residual branch for a whole sample with probability `p`."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Identity in eval; in training, zero whole samples and rescale the rest by 1 / (1 - p)."""
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-5, exact GELU)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """(windows, length, dim) tokens with their attention `bias` -> the same shape."""
        x = x + self.drop_path(self.attn(self.norm1(x), bias))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1, 3x3, 1x1 with BatchNorm) on the full grid: the only cross-window path."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden = dim // 2
        self.conv1 = nn.Conv2d(dim, hidden, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, dim, 1, bias=False)
        self.norm3 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W), residual."""
        y = F.gelu(self.norm1(self.conv1(x)))
        y = F.gelu(self.norm2(self.conv2(y)))
        return x + self.norm3(self.conv3(y))


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: one strided conv (the encoder's input, figure: "image encoder")."""

    def __init__(self, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised pixels -> (N, dim, S / patch, S / patch)."""
        return self.proj(x)


class PosEmbed(nn.Module):
    """Learned absolute position embedding, one row per grid cell (row-major); no interpolation."""

    def __init__(self, num_positions: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_positions, dim))


def conv_bn(in_dim: int, out_dim: int, kernel: int) -> nn.Sequential:
    """A bias-free conv with "same" padding followed by BatchNorm (the neck's building block)."""
    return nn.Sequential(nn.Conv2d(in_dim, out_dim, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(out_dim))


class Neck(nn.Module):
    """Single-level feature pyramid: 1x1 conv+BN to `out_dim`, then 3x3 conv+BN; no activation."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.lateral_conv = nn.ModuleList([conv_bn(dim, out_dim, 1)])
        self.output_conv = nn.ModuleList([conv_bn(out_dim, out_dim, 3)])

    def forward(self, x: torch.Tensor, taps: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(N, dim, h, w) -> (N, out_dim, h, w); `taps` collects the lateral output for parity checks."""
        x = self.lateral_conv[0](x)
        if taps is not None:
            taps["neck_lateral"] = x
        return self.output_conv[0](x)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nH * nW, window², C); windows row-major inside each image."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).transpose(2, 3)
    return x.reshape(-1, window * window, c)


def window_merge(x: torch.Tensor, window: int, grid: int) -> torch.Tensor:
    """Inverse of `window_partition` for a square grid: -> (B, grid, grid, C)."""
    n = grid // window
    c = x.shape[-1]
    x = x.view(-1, n, n, window, window, c).transpose(2, 3)
    return x.reshape(-1, grid, grid, c)


class ImageEncoder(nn.Module):
    """(B, 3, S, S) normalised BGR image -> (B, out_dim, S/16, S/16) features.

    The forward pass is `neck(trunk(x))`, and the trunk is `finish(run(stem(x), 0, depth))`. These pieces are the
    public API: the chat projector reads `trunk` features, and fine-tuning runs the frozen blocks [0, k) with `run`
    and the trainable tail (blocks [k, depth), then `finish`) itself.
    """

    #: Tokens per group of windows that the blocks run on (see `run_blocks`). Measured on a 2-core AVX-512/AMX
    #: CPU: 2048 beats the whole 64x64 grid (fp32 ~14%, bf16 ~8% faster) and 1024 (a slow oneDNN bf16 GEMM shape).
    chunk_tokens = 2048

    def __init__(self, depth: int, dim: int, num_heads: int, mlp_ratio: float, patch_size: int, window: int,
                 grid: int, out_dim: int, cross_indices: tuple[int, ...], drop_path: float = 0.0) -> None:
        super().__init__()
        self.window, self.grid = window, grid
        self.cross_indices = tuple(cross_indices)
        self.gradient_checkpointing = False  # recompute each block in backward (training only)
        self.patch_embed = PatchEmbed(dim, patch_size)
        self.pos_embed = PosEmbed(grid * grid, dim)
        rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]  # linearly deeper, as in ViT practice
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, window, rates[i]) for i in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.cross_conv = nn.ModuleList(Bottleneck(dim) for _ in self.cross_indices)
        self.neck = Neck(dim, out_dim)

    def run_blocks(self, x: torch.Tensor, blocks: nn.ModuleList | list[nn.Module],
                   chunked: bool = True) -> torch.Tensor:
        """Run `blocks` on (windows, window², C) one group of windows at a time.

        Blocks never mix windows, so this is exact; it keeps each intermediate (qkv, MLP hidden) small enough to
        be recycled by the allocator instead of being freshly page-faulted in every layer, and cache-warm.
        `chunked=False` calls each block once on all windows (ZeRO-3 gathers a block's weights per call).
        """
        biases = [block.attn.rel_pos_embed(x.dtype) for block in blocks]  # gathered once, not per group
        size = max(1, self.chunk_tokens // x.shape[1]) if chunked else x.shape[0]
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        chunks = []
        for chunk in x.split(size):
            for block, bias in zip(blocks, biases):
                chunk = checkpoint(block, chunk, bias, use_reentrant=False) if recompute else block(chunk, bias)
            chunks.append(chunk)
        return torch.cat(chunks)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding plus absolute positions: (B, 3, S, S) -> channels-last (B, g, g, C)."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed.weight
        return x.view(-1, self.grid, self.grid, x.shape[-1])

    def run(self, x: torch.Tensor, start: int, stop: int, taps: dict[str, torch.Tensor] | None = None,
            chunked: bool = True) -> torch.Tensor:
        """Blocks [start, stop) on a channels-last (B, g, g, C) grid, each followed by its stage's cross-window conv,
        except the last stage's (that one comes with the final norm in `finish`)."""
        last = len(self.blocks) - 1
        for k, end in enumerate(self.cross_indices):
            lo, hi = max(start, end + 1 - self._stage_len(k)), min(stop, end + 1)
            if hi > lo:
                x = self.run_blocks(window_partition(x.contiguous(), self.window), self.blocks[lo:hi], chunked)
                x = window_merge(x, self.window, self.grid)
            if hi == end + 1 and hi > lo:
                if taps is not None:
                    taps[f"block{end}"] = x
                if end != last:
                    x = self.cross_conv[k](x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
                    if taps is not None:
                        taps[f"cross_conv{k}"] = x
        return x

    def _stage_len(self, k: int) -> int:
        return self.cross_indices[k] - (self.cross_indices[k - 1] if k else -1)

    def finish(self, x: torch.Tensor, taps: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Final LayerNorm and the last cross-window conv: channels-last grid -> (B, C, g, g) trunk features."""
        x = self.cross_conv[-1](self.norm(x).permute(0, 3, 1, 2))
        if taps is not None:
            taps[f"cross_conv{len(self.cross_conv) - 1}"] = x.permute(0, 2, 3, 1)
        return x

    def trunk(self, x: torch.Tensor, taps: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, 3, S, S) -> (B, C, g, g): the encoder before the neck (what a chat projector reads)."""
        x = self.stem(x)
        if taps is not None:
            taps["pos_embed"] = x
        return self.finish(self.run(x, 0, len(self.blocks), taps), taps)

    def forward(self, x: torch.Tensor, taps: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """`taps`, when given, receives channels-last (B, grid, grid, C) intermediates for parity debugging."""
        return self.neck(self.trunk(x, taps), taps)
