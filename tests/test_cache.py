"""The shared bounded cache: LRU order, item and weight bounds, eviction callbacks, the process-wide report."""

from __future__ import annotations

import pytest

from tokenizer_tap.cache import BoundedCache, cache_report


def test_least_recently_used_goes_first() -> None:
    evicted = []
    c = BoundedCache("test.lru", 2, on_evict=lambda k, v: evicted.append((k, v)))
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1  # a is now the most recent
    c.put("c", 3)
    assert evicted == [("b", 2)] and "b" not in c and list(c) == ["a", "c"] and c.values() == [1, 3] and len(c) == 2
    assert c.pop("a") == 1 and c.pop("a") is None and c.get("zz", 7) == 7


def test_a_weight_bound_keeps_the_total_under_it() -> None:
    c = BoundedCache("test.bytes", 10, weigh=len, unit="bytes")
    c.put("x", b"1234")
    c.put("y", b"123456")
    assert c.size == 10 and len(c) == 2
    c.put("z", b"12")
    assert list(c) == ["y", "z"] and c.size == 8
    c.put("big", b"x" * 11)  # alone over the bound: not kept, and it pushed everything out
    assert len(c) == 0 and c.size == 0
    assert ("test.bytes", 0, 10, "bytes") in cache_report()


def test_the_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        BoundedCache("test.bad", 0)
