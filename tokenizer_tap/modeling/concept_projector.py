"""Open-vocabulary classification of semantic embeddings against a concept vocabulary.

The vocabulary is a (sem_dim, K) matrix of CLIP text embeddings with the CLIP temperature folded in, plus K names.
It holds no checkpoint keys: it is loaded separately (see `checkpoint.load_concepts`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError


class ConceptProjector(nn.Module):
    """The figure's "concept" head: a semantic token scored against the concept vocabulary (no trained weights)."""

    def __init__(self, sem_dim: int) -> None:
        super().__init__()
        self.sem_dim = sem_dim
        # A plain attribute, not a buffer: scoring stays float32 whatever dtype the model is cast to.
        self.weights = torch.zeros(sem_dim, 0)
        self.names: list[str] = []

    def reset_weights(self, weights: np.ndarray | torch.Tensor, names: list[str]) -> None:
        """Install a (sem_dim, K) text-embedding matrix and its K names; any vocabulary, any time."""
        weights = torch.as_tensor(np.asarray(weights, dtype=np.float32))
        if weights.ndim != 2 or weights.shape[0] != self.sem_dim or weights.shape[1] != len(names):
            raise CheckpointError(f"concept matrix must be ({self.sem_dim}, K) with K names; got "
                             f"{tuple(weights.shape)} and {len(names)} names")
        self.weights = weights
        self.names = [str(n) for n in names]

    @property
    def loaded(self) -> bool:
        """Whether a vocabulary is installed (the checkpoint does not carry one)."""
        return bool(self.names)

    def probs(self, sem_embeds: torch.Tensor) -> torch.Tensor:
        """(..., sem_dim) embeddings -> (..., K) softmax probabilities, in float32."""
        if not self.loaded:
            raise RuntimeError("no concept vocabulary loaded; pass concepts=... (e.g. 'merged_2560')")
        x = F.normalize(sem_embeds.float(), dim=-1, eps=1e-12)
        if self.weights.device != x.device:
            self.weights = self.weights.to(x.device)
        return torch.softmax(x @ self.weights, dim=-1)

    def decode(self, sem_embeds: torch.Tensor, k: int = 1) -> list[list[tuple[str, float]]]:
        """Top-k (name, probability) per row of (N, sem_dim) embeddings."""
        top = self.probs(sem_embeds).topk(min(k, len(self.names)), dim=-1)
        return [[(self.names[i], float(p)) for p, i in zip(ps.tolist(), ix.tolist())]
                for ps, ix in zip(top.values, top.indices)]
