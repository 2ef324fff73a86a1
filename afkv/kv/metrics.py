"""Metrics of the tiered KV cache: counters owned by the loop thread, frozen snapshots out.

Counters (blocks unless the name says bytes):
    lookups              prefix matches (one per admitted sequence)
    demotions            device -> host copies (a device block's slot was reused)
    promotions           host -> device copies
    spills               blocks written to disk
    fetches              blocks read from disk into host memory (on demand or prefetched)
    prefetches           fetches started ahead of use for waiting sequences
    bytes_device_to_host, bytes_host_to_device, bytes_host_to_disk, bytes_disk_to_host
    host_evictions       blocks that left host memory while still on disk
    disk_evictions       files deleted to make room (the last tier evicts)
    dropped              blocks lost from every tier (no room below, or the last tier evicted)
    spills_skipped       disk full of in-flight files: the block stayed in host memory only
    disk_write_errors    a write failed (disk full, unwritable): logged, block kept in host memory
    corrupt_blocks       a read failed its checks: the block is recomputed
    missing_blocks       a file was gone: the block is recomputed
    disk_io_errors       other failed file operations (delete, index save)
    handoff_shared_blocks    KV hand-off (PD), decode side: prompt blocks the pool held already
    handoff_awaited_blocks   ... blocks asked of a prefill node
    handoff_received_blocks  ... blocks whose rows landed (bytes_handoff_received: their bytes)
    handoff_sent_blocks      prefill side: blocks read out for a decode node
Hits by tier: blocks of matched prefixes found on the device, in host memory, on disk.
Latency: copy (a worker batch), spill (one block write), prefetch (one block read).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class LatencyStats:
    count: int
    mean_s: float
    max_s: float


class Latency:
    def __init__(self) -> None:
        self.count = 0
        self.total_s = 0.0
        self.max_s = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total_s += seconds
        self.max_s = max(self.max_s, seconds)

    def snapshot(self) -> LatencyStats:
        return LatencyStats(self.count, self.total_s / self.count if self.count else 0.0, self.max_s)


@dataclass(frozen=True)
class TierUsage:
    name: str  # device | host | disk
    format: str  # none | int8 | int4
    num_blocks: int  # blocks held (device: blocks in use or cached)
    capacity_blocks: int
    block_nbytes: int

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_nbytes

    @property
    def capacity_nbytes(self) -> int:
        return self.capacity_blocks * self.block_nbytes


@dataclass(frozen=True)
class KVMetricsSnapshot:
    tiers: tuple[TierUsage, ...]
    hit_blocks: Mapping[str, int]  # device | host | disk -> blocks
    counters: Mapping[str, int]
    latency: Mapping[str, LatencyStats]  # copy | spill | prefetch

    @classmethod
    def from_dict(cls, d: Mapping) -> "KVMetricsSnapshot":
        """The inverse of dataclasses.asdict (a snapshot sent over the control plane)."""
        return cls(tiers=tuple(TierUsage(**t) for t in d["tiers"]), hit_blocks=dict(d["hit_blocks"]),
                   counters=dict(d["counters"]), latency={k: LatencyStats(**v) for k, v in d["latency"].items()})


class KVMetrics:
    """Owner: the loop thread (the KV manager and its tier stack count; nobody else writes)."""

    def __init__(self) -> None:
        self.hit_blocks: Counter[str] = Counter(device=0, host=0, disk=0)
        self.counters: Counter[str] = Counter()
        self.latency = {"copy": Latency(), "spill": Latency(), "prefetch": Latency()}

    def snapshot(self, tiers: tuple[TierUsage, ...]) -> KVMetricsSnapshot:
        return KVMetricsSnapshot(
            tiers=tiers,
            hit_blocks=dict(self.hit_blocks),
            counters=dict(self.counters),
            latency={name: lat.snapshot() for name, lat in self.latency.items()},
        )
