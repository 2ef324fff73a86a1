"""Eviction order of one tier's entries (the oldest entry is evicted first).

    LRUOrder    a read (touch) makes an entry the newest
    FIFOOrder   entries leave in insertion order; reads do not reorder
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator

EVICTION_POLICIES = ("lru", "fifo")


class LRUOrder:
    """Owner of `_order`: the entries of one tier, oldest first."""

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def insert(self, key: Hashable) -> None:
        assert key not in self._order
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
        assert key in self._order


def make_order(policy: str) -> LRUOrder:
    """`policy` is one of EVICTION_POLICIES (validated by the config)."""
    return FIFOOrder() if policy == "fifo" else LRUOrder()
