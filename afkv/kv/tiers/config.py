"""TierConfig: the tiers below the device, as the engine config asks for them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from afkv.kv.formats import BlockFormat


@dataclass(frozen=True)
class TierConfig:
    format: BlockFormat  # how host memory and disk store a block (disk files hold host bytes)
    host_num_blocks: int
    disk_num_blocks: int = 0  # 0: no disk tier
    disk_path: Path | None = None
    eviction: str = "lru"  # lru | fifo, in host memory and on disk
    prefetch_depth: int = 4  # waiting sequences whose blocks are read ahead from disk
    io_threads: int = 4
    disk_capacity_key: str = "disk_capacity_mib"  # the config key that set disk_num_blocks (for errors)

    def __post_init__(self) -> None:
        assert self.host_num_blocks > 0 and self.disk_num_blocks >= 0 and self.io_threads > 0
        assert (self.disk_num_blocks > 0) == (self.disk_path is not None)
