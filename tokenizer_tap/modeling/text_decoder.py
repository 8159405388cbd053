"""Small causal text decoder that captions a region from its semantic token (a one-token visual prefix).

Pure PyTorch: interleaved (GPT-J) rotary positions, a preallocated batched KV cache and fused SDPA. The official
code needs CUDA + flash-attn for this part; this one runs anywhere and matches it token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP


def rotary_tables(head_dim: int, length: int, dtype: torch.dtype, device: torch.device | None = None,
                  base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(length, head_dim) tables for interleaved rotary: theta = p * base^(-2i/d), computed in fp32 and stored in
    `dtype` (as upstream). Each angle fills both slots of its pair; the sine is negated in the even slot."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    theta = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    cos, sin = theta.cos().to(dtype), theta.sin().to(dtype)
    return cos.repeat_interleave(2, dim=-1), torch.stack([-sin, sin], dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs: out[2i] = x[2i] cos - x[2i+1] sin, out[2i+1] = x[2i+1] cos + x[2i] sin (fp32 math).

    Written as x * cos + swap_pairs(x) * signed_sin, which rounds identically and takes four kernels, not twelve.
    """
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (xf * cos.float() + swapped * sin.float()).to(x.dtype)


@dataclass
class KVCache:
    """Preallocated keys/values per block, (N, heads, max_len, head_dim) each; rows can be dropped mid-way."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def empty(cls, depth: int, batch: int, heads: int, length: int, head_dim: int, like: torch.Tensor) -> KVCache:
        """Zeroed keys and values for every block, in `like`'s dtype and device."""
        keys, values = ([like.new_zeros(batch, heads, length, head_dim) for _ in range(depth)] for _ in range(2))
        return cls(keys, values)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (used to stop computing captions that already ended)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]


class Attention(nn.Module):
    """Causal self-attention with rotary positions, writing into and reading from the preallocated KV cache."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None, start: int) -> torch.Tensor:
        """Causal self-attention of (N, L, dim) at positions start..start+L, reading and writing `cache`."""
        n, length, dim = x.shape
        qkv = self.qkv(x).view(n, length, 3, self.num_heads, -1)  # channels: (which, head, head_dim)
        qk = apply_rotary(qkv[:, :, :2], cos[:, None, None], sin[:, None, None])  # q and k in one pass
        q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)
        v = qkv[:, :, 2].transpose(1, 2)
        if cache is not None:  # write this step, then attend over everything written so far
            cache[0][:, :, start:start + length] = k
            cache[1][:, :, start:start + length] = v
            k, v = cache[0][:, :, :start + length], cache[1][:, :, :start + length]
        if length == 1:
            out = F.scaled_dot_product_attention(q, k, v)
        elif start == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # causal, aligned bottom-right: query i sees keys <= start + i
            mask = torch.ones(length, start + length, dtype=torch.bool, device=x.device).tril(start)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class Block(nn.Module):
    """Pre-norm causal block; `dropout` acts on both residual branches in training."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None, start: int) -> torch.Tensor:
        """(N, L, dim) -> (N, L, dim); `cache` is this block's (keys, values) buffer or None."""
        x = x + self.dropout(self.attn(self.norm1(x), cos, sin, cache, start))
        return x + self.dropout(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """Token embeddings, the causal blocks, the final norm and the (untied) output projection."""

    def __init__(self, dim: int, num_heads: int, depth: int, mlp_ratio: float, vocab_size: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.text_proj = nn.Linear(dim, vocab_size, bias=False)


class TextDecoder(nn.Module):
    """Semantic token (N, 1, C_img) + token ids -> next-token logits; `generate` captions greedily."""

    def __init__(self, in_dim: int, dim: int, num_heads: int, depth: int, mlp_ratio: float, vocab_size: int,
                 max_seq_len: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.max_seq_len = num_heads, dim // num_heads, max_seq_len
        self.encoder = nn.Linear(in_dim, dim, bias=False)
        self.transformer = Transformer(dim, num_heads, depth, mlp_ratio, vocab_size, dropout)
        self._rotary: tuple[torch.Tensor, torch.Tensor] | None = None

    def rotary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) tables for every position, built once per dtype and device."""
        weight = self.encoder.weight
        tables = self._rotary
        if tables is None or tables[0].dtype != weight.dtype or tables[0].device != weight.device:
            tables = self._rotary = rotary_tables(self.head_dim, self.max_seq_len, weight.dtype, weight.device)
        return tables

    def run(self, x: torch.Tensor, start: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        """Embedded sequence (N, L, dim) at positions start..start+L-1 -> logits (N, L, vocab) in float32."""
        if start + x.shape[1] > self.max_seq_len:
            raise ValueError(f"text decoder context is {self.max_seq_len} positions; got {start + x.shape[1]}")
        cos, sin = self.rotary()
        cos, sin = cos[start:start + x.shape[1]], sin[start:start + x.shape[1]]
        for i, block in enumerate(self.transformer.blocks):
            x = block(x, cos, sin, None if cache is None else (cache.keys[i], cache.values[i]), start)
        return self.transformer.text_proj(self.transformer.norm(x)).float()

    def forward(self, sem_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits: (N, 1, C_img) prefix + (N, T) ids -> (N, T, vocab); row j predicts token j+1."""
        prefix = self.encoder(sem_tokens)
        x = torch.cat([prefix, self.transformer.tok_embeddings(tokens)], dim=1)
        return self.run(x)[:, 1:]

    @torch.inference_mode()
    def generate(self, sem_tokens: torch.Tensor, bos_id: int, eos_id: int, pad_id: int,
                 max_new_tokens: int | None = None, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Caption N semantic tokens at once.

        Returns an (N, 1 + max_new_tokens) int64 buffer: BOS, the generated ids, and `pad_id` after a row's EOS
        (finished rows leave the batch, so later steps cost only the rows still running).
        """
        limit = self.max_seq_len - 2
        steps = limit if max_new_tokens is None else max(0, min(max_new_tokens, limit))
        n = sem_tokens.shape[0]
        prefix = self.encoder(sem_tokens.reshape(n, 1, -1))
        out = torch.full((n, steps + 1), pad_id, dtype=torch.long, device=prefix.device)
        out[:, 0] = bos_id
        if n == 0 or steps == 0:
            return out
        cache = KVCache.empty(len(self.transformer.blocks), n, self.num_heads, self.max_seq_len, self.head_dim,
                              prefix)
        embed = self.transformer.tok_embeddings
        active = torch.arange(n, device=prefix.device)
        x = torch.cat([prefix, embed(out[:, :1])], dim=1)
        start = 0
        for step in range(1, steps + 1):
            logits = self.run(x, start, cache)[:, -1]
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                nxt = logits.argmax(dim=-1)
            out[active, step] = nxt
            start += x.shape[1]
            running = nxt != eos_id
            if not bool(running.all()):
                keep = running.nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                active, nxt = active[keep], nxt[keep]
                cache.select(keep)
            x = embed(nxt).unsqueeze(1)
        return out
