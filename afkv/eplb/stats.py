"""Expert load statistics over a sliding time window (what an expert node reports).

The window of `window_s` seconds is kept as `num_buckets` buckets of [layers, experts]
token counts; `total()` sums the buckets younger than the window. Old buckets are reused
in a ring, so memory is fixed. Single owner: the expert node's worker thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


class LoadWindow:
    def __init__(self, num_layers: int, num_experts: int, window_s: float, num_buckets: int = 8,
                 clock: Callable[[], float] = time.monotonic):
        if not window_s > 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        if num_buckets < 1:
            raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
        self.window_s, self.clock = window_s, clock
        self.bucket_s = window_s / num_buckets
        self._counts = torch.zeros(num_buckets, num_layers, num_experts, dtype=torch.int64)  # [B, L, E]
        self._bucket_ids = [-1] * num_buckets  # which bucket_s interval each ring entry holds

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self._counts.shape[1:])

    def _slot(self, now: float) -> int:
        interval = int(now // self.bucket_s)
        slot = interval % len(self._bucket_ids)
        if self._bucket_ids[slot] != interval:
            self._counts[slot].zero_()
            self._bucket_ids[slot] = interval
        return slot

    def add(self, layer: int, counts: torch.Tensor) -> None:
        """counts [E] tokens routed to each expert of `layer` now."""
        self._counts[self._slot(self.clock()), layer] += counts.to(torch.int64).cpu()

    def add_all(self, counts: torch.Tensor) -> None:
        """counts [L, E] tokens routed to each (layer, expert) now."""
        self._counts[self._slot(self.clock())] += counts.to(torch.int64).cpu()

    def total(self) -> torch.Tensor:
        """Tokens per (layer, expert) over the last window_s seconds. -> [L, E] int64"""
        newest = int(self.clock() // self.bucket_s)
        keep = [i for i, b in enumerate(self._bucket_ids) if b >= 0 and newest - b < len(self._bucket_ids)]
        if not keep:
            return torch.zeros(self.shape, dtype=torch.int64)
        return self._counts[keep].sum(0)

    def clear(self) -> None:
        self._counts.zero_()
        self._bucket_ids = [-1] * len(self._bucket_ids)
