"""Eviction order of one tier's entries (the oldest entry is evicted first).

    LRUOrder    a read (touch) makes an entry the newest
    FIFOOrder   entries leave in insertion order; reads do not reorder
    PinCounts   entries in use by I/O, which no eviction may take
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator

from afkv.kv.checks import accounted

EVICTION_POLICIES = ("lru", "fifo")


class LRUOrder:
    """Owner of `_order`: the entries of one tier, oldest first."""

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def insert(self, key: Hashable) -> None:
        accounted(key not in self._order, f"entry {key!r} is inserted twice")
        self._order[key] = None

    def touch(self, key: Hashable) -> None:
        self._order.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        del self._order[key]

    def oldest_first(self) -> Iterator[Hashable]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._order


class FIFOOrder(LRUOrder):
    def touch(self, key: Hashable) -> None:
        accounted(key in self._order, f"entry {key!r} is not in the tier")


def make_order(policy: str) -> LRUOrder:
    """`policy` is one of EVICTION_POLICIES (validated by the config)."""
    return FIFOOrder() if policy == "fifo" else LRUOrder()


class PinCounts:
    """Owner of `_counts`: how many I/O jobs use each entry (present only while > 0)."""

    def __init__(self) -> None:
        self._counts: dict[Hashable, int] = {}

    def pin(self, key: Hashable) -> None:
        self._counts[key] = self._counts.get(key, 0) + 1

    def unpin(self, key: Hashable) -> None:
        n = self._counts[key] - 1
        if n:
            self._counts[key] = n
        else:
            del self._counts[key]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._counts

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._counts)

    def values(self):
        return self._counts.values()
