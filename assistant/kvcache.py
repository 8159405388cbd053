"""A KV cache written in place: each decode step's keys and values go into a preallocated buffer.

transformers' `DynamicLayer` concatenates at every step, so the whole cache is copied per token (about half of a
batched decode step at Phi-2 size). `InPlaceLayer` keeps keys and values in (batch, heads, capacity, head_dim)
buffers grown `BLOCK` positions at a time (one copy per block) and hands attention views of the filled part; each
head's positions stay contiguous, so SDPA reads the views as they are (no per-step copy).

Slack: a live buffer holds up to `BLOCK - 1` unused positions. A member leaving the batch takes an exact copy of
its row, and `fit` (what `PrefixCache.put` calls) trims whatever else is stored between turns, so only decoding
pays for the slack; blocks can then be large enough that growing (one copy of the cache) is rare.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

BLOCK = 256  # positions a buffer grows by


class _Buffer:
    """Keys or values of one layer: `data` (batch, heads, capacity, head_dim), its first `length` positions filled."""

    def __init__(self) -> None:
        self.data: torch.Tensor | None = None
        self.length = 0

    def view(self) -> torch.Tensor | None:
        return None if self.data is None else self.data[:, :, :self.length]

    def set(self, tensor: torch.Tensor | None) -> None:
        """Adopt `tensor` as the buffer (full: the next append grows it), or, for a leading view of the buffer (a
        crop, or the filled part assigned back), keep the buffer and only set the length."""
        if tensor is None or self.data is None or not _leads(tensor, self.data):
            self.data = tensor
        self.length = 0 if tensor is None else tensor.shape[-2]

    def append(self, states: torch.Tensor) -> torch.Tensor:
        """Write `states` after the filled part, growing by whole blocks when full; the filled part after."""
        end = self.length + states.shape[-2]
        if end > self.data.shape[-2]:
            grown = states.new_empty((*states.shape[:2], -(-end // BLOCK) * BLOCK, states.shape[3]))
            grown[:, :, :self.length] = self.data[:, :, :self.length]
            self.data = grown
        self.data[:, :, self.length:end] = states
        self.length = end
        return self.data[:, :, :end]


def _leads(tensor: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Whether `tensor` is `buffer[:, :, :n]` for some n (same memory, strides and other sizes)."""
    return (tensor.data_ptr() == buffer.data_ptr() and tensor.stride() == buffer.stride()
            and tensor.dtype == buffer.dtype and tensor.shape[:2] == buffer.shape[:2]
            and tensor.shape[3] == buffer.shape[3] and tensor.shape[2] <= buffer.shape[2])


class InPlaceLayer(DynamicLayer):
    """A `DynamicLayer` whose `update` writes in place. `keys` / `values` are views of the filled part; assigning
    one (what `crop`, `batch_select_indices` and our batcher do) adopts the tensor as the new buffer."""

    def __init__(self, **kwargs) -> None:
        self._keys, self._values = _Buffer(), _Buffer()
        super().__init__(**kwargs)

    @property
    def keys(self) -> torch.Tensor | None:
        return self._keys.view()

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        self._keys.set(tensor)

    @property
    def values(self) -> torch.Tensor | None:
        return self._values.view()

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        self._values.set(tensor)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Empty buffers of the states' batch, heads and head size (rather than `DynamicLayer`'s 1-d empties)."""
        self.device = key_states.device
        self.keys = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[3]))
        self.values = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[3]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new positions after the filled part; views of the filled keys and values."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self._keys.append(key_states), self._values.append(value_states)

    def get_seq_length(self) -> int:
        return self._keys.length


def new_cache(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]] = ()) -> DynamicCache:
    """A `DynamicCache` of `InPlaceLayer`s: empty, or holding copies of `pairs` ((keys, values) per layer, views
    into another cache allowed), each exactly as long as its data."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = InPlaceLayer  # `Cache` takes it; `DynamicCache.__init__` always passes its own
    for keys, values in pairs:
        layer = InPlaceLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = _copy(keys), _copy(values)
        cache.layers.append(layer)
    return cache


def fit(cache: DynamicCache) -> None:
    """Trim every buffer holding more memory than its filled part to an exact copy (a prefix kept between turns)."""
    for layer in cache.layers:
        if layer.is_initialized and any(_slack(t) for t in (layer.keys, layer.values)):
            layer.keys, layer.values = _copy(layer.keys), _copy(layer.values)


def _slack(tensor: torch.Tensor) -> bool:
    return tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size()


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    """A dense copy: never the same memory, even where `tensor` is already contiguous."""
    return tensor.clone(memory_format=torch.contiguous_format)
