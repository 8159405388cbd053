"""The one bounded cache every layer uses: a named LRU map with a limit in items or in bytes.

Every cache registers itself under its name, so `cache_report()` lists what the process holds against each bound
(memory limits read at a glance, in one place, instead of per hand-rolled OrderedDict).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_LIVE: weakref.WeakSet[BoundedCache] = weakref.WeakSet()


class BoundedCache(Generic[K, V]):
    """Least-recently-used map holding at most `max_items` entries, or with `weigh`, at most `max_items` in total
    weight (bytes, say). Inserting evicts the oldest entries, calling `on_evict(key, value)` for each; an entry that
    alone exceeds the bound is not kept. Thread-safe: each operation holds the cache's own lock.
    """

    def __init__(self, name: str, max_items: int, *, weigh: Callable[[V], int] | None = None,
                 on_evict: Callable[[K, V], None] | None = None, unit: str = "") -> None:
        if max_items < 1:
            raise ValueError(f"cache {name}: the limit must be at least 1, got {max_items}")
        self.name, self.limit, self._weigh, self._on_evict = name, max_items, weigh, on_evict
        self.unit = unit or ("items" if weigh is None else "weight")
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.RLock()
        _LIVE.add(self)

    def get(self, key: K, default: V | None = None) -> V | None:
        """The value (now the most recently used), or `default`."""
        with self._lock:
            if key not in self._data:
                return default
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key: K, value: V) -> V:
        """Insert or replace, then evict beyond the bound; returns `value`."""
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while self._data and self.size > self.limit:
                old_key, old = self._data.popitem(last=False)
                if self._on_evict is not None:
                    self._on_evict(old_key, old)
        return value

    def pop(self, key: K, default: V | None = None) -> V | None:
        with self._lock:
            return self._data.pop(key, default)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    @property
    def size(self) -> int:
        """Entries, or their total weight when the cache weighs them."""
        with self._lock:
            return len(self._data) if self._weigh is None else sum(map(self._weigh, self._data.values()))

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[K]:
        with self._lock:
            return iter(list(self._data))

    def values(self) -> list[V]:
        """A snapshot of the values, oldest first (does not refresh them)."""
        with self._lock:
            return list(self._data.values())


def cache_report() -> list[tuple[str, int, int, str]]:
    """(name, current size, limit, unit) of every live cache in the process, by name (the app logs it at start)."""
    return sorted((c.name, c.size, c.limit, c.unit) for c in list(_LIVE))
