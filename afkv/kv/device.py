"""The device tier: where a pool block's bytes live on the device, and what attention reads.

    PlainDevice      the cache kv[num_blocks, *block_shape] in the model dtype: a pool block id
                     is its index; attention reads and writes it in place
    QuantizedDevice  (`[kv] device_format` fp8 / int8 / int4; fp8 / int8 for MLA latents)
                     full blocks stored as quantized rows (afkv.kv.formats) and each
                     sequence's most recent tokens in full-precision staging blocks:

    new tokens  -> staging block (full precision; written by attention)
    block full and out of the window -> quantized into its device row (a worker job, ordered
                                         with the steps), staging block freed
    attention   -> quantized rows (read in place by the kernels) + the staging tail

A sequence's staging blocks are the last blocks of its table: its partial block plus the full
blocks whose last token is among its `fp_window` most recent tokens. Between steps that is at
most ceil(fp_window / block_size) + 1 blocks, and a step adds at most ceil(n / block_size)
per sequence computing n tokens: `staging_blocks_needed` sizes the staging pool for the worst
case, so growing a table never waits for a staging block. One staging block more is the
scratch block of CUDA graphs (padding rows of a captured decode step write and read it).
Quantization always covers a prefix of a table (rows first, staging blocks last), and blocks
are shared only as common prefixes. H2O pruning (which rewrites slots in place) needs
PlainDevice (`writes_in_place`).

The KV manager calls these at its points of change (grow, commit, release, flush); both
classes answer the same calls, so the manager never asks which one it has. Both are loop-thread
bookkeeping; their tensors are written by the model worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import torch

from afkv.errors import KVError
from afkv.kv.block_pool import BlockPool
from afkv.kv.checks import owned
from afkv.kv.formats import LatentQuantFormat, QuantFormat
from afkv.kv.layout import Layout
from afkv.kv.metrics import KVMetrics, TierUsage
from afkv.ops.attention import QuantizedKVCache


@dataclass(frozen=True)
class DeviceQuant:
    format: QuantFormat | LatentQuantFormat  # how the device tier stores a full block
    fp_window: int  # tokens kept in full precision beyond the partial block
    num_staging_blocks: int

    def __post_init__(self) -> None:
        assert self.fp_window >= 0 and self.num_staging_blocks > 1  # validated by the config

    @property
    def max_tail_blocks(self) -> int:
        """Most staging blocks at the end of a decode row's table (its fixed tail bound)."""
        return -(-self.fp_window // self.format.layout.block_size) + 1


def staging_blocks_needed(block_size: int, fp_window: int, max_num_seqs: int, max_num_batched_tokens: int) -> int:
    """Staging blocks for the worst case: every running sequence with a full window and a
    partial block, plus a step's new blocks (one partial block per sequence at most), plus
    the scratch block of CUDA graphs."""
    window_blocks = -(-fp_window // block_size) + 1
    return max_num_seqs * (window_blocks + 1) + -(-max_num_batched_tokens // block_size) + 1


class PlainDevice:
    """Blocks in the model dtype: kv [num_blocks, *block_shape], read and written in place.

    Owner of scratch_blocks (loop thread): pool blocks reserved for CUDA graphs' padding rows,
    held (one reference each) for the cache's life and in no sequence's table."""

    quant = None
    blocks = None
    writes_in_place = True  # H2O compaction rewrites slots of kv

    def __init__(self, layout: Layout, pool: BlockPool, device: torch.device, metrics: KVMetrics):
        self.layout, self.pool, self.metrics = layout, pool, metrics
        self.kv = torch.zeros((pool.num_blocks, *layout.block_shape), dtype=layout.dtype, device=device)
        self.rows = self.kv  # what the tiers below copy from and to
        self.format = None  # the Copier's device format: the cache itself
        self.scratch_blocks: list[int] = []

    @property
    def attention_cache(self) -> torch.Tensor:
        return self.kv

    @property
    def num_free_staging_blocks(self) -> int:
        return 0

    def block_ids(self, table: list[int]) -> list[int]:
        return table

    def room_for(self, num_blocks: int) -> bool:
        return True

    def grew(self, block_ids: Sequence[int]) -> None:
        pass

    def matched(self, table: list[int]) -> None:
        pass

    def committed(self, table: list[int], num_slots: int) -> None:
        pass

    def released(self, block_ids: Sequence[int]) -> None:
        pass

    def reserve_scratch_block(self) -> int | None:
        blocks = self.pool.allocate(1)
        if blocks is None:
            return None
        self.scratch_blocks.append(blocks[0])
        return blocks[0]

    def flush(self, worker: Executor) -> Future | None:
        return None

    def usage(self) -> TierUsage:
        return TierUsage("device", "none", self.pool.num_held_blocks, self.pool.num_blocks, self.layout.block_nbytes)

    def check_invariants(self, tables: dict[int, list[int]]) -> None:
        pass


class QuantizedDevice:
    """Owner of these fields (loop thread only):

    _staging        block id -> its full-precision staging slot (blocks not yet quantized)
    _free_staging   free staging slots
    _quantize       (staging slot, block id) copies queued for the next flush
    _scratch_slots  staging slots reserved for CUDA graphs (reserve_scratch_block), never freed

    kv [num_staging_blocks, *block_shape] holds the staging blocks, blocks uint8 [num_blocks,
    nbytes] the quantized rows; block_ids names a staging block num_blocks + its slot."""

    writes_in_place = False
    scratch_blocks: tuple[int, ...] = ()  # its scratch is a staging slot, not a pool block

    def __init__(self, quant: DeviceQuant, pool: BlockPool, device: torch.device, metrics: KVMetrics):
        layout = quant.format.layout
        self.quant, self.layout, self.pool, self.metrics = quant, layout, pool, metrics
        self.format = quant.format
        self.kv = torch.zeros((quant.num_staging_blocks, *layout.block_shape), dtype=layout.dtype, device=device)
        self.blocks = torch.zeros((pool.num_blocks, quant.format.nbytes), dtype=torch.uint8, device=device)
        self.rows = self.blocks
        self._staging: dict[int, int] = {}
        self._free_staging: list[int] = list(range(quant.num_staging_blocks - 1, -1, -1))
        self._quantize: list[tuple[int, int]] = []
        self._scratch_slots: list[int] = []

    @property
    def attention_cache(self) -> QuantizedKVCache:
        return QuantizedKVCache(self.blocks, self.kv, self.quant.format.spec, self.quant.max_tail_blocks)

    @property
    def num_free_staging_blocks(self) -> int:
        return len(self._free_staging)

    def block_ids(self, table: list[int]) -> list[int]:
        nb = self.pool.num_blocks
        return [nb + self._staging[b] if b in self._staging else b for b in table]

    def room_for(self, num_blocks: int) -> bool:
        """Whether num_blocks new blocks get staging slots (False counts as staging_full)."""
        return num_blocks <= len(self._free_staging)

    def grew(self, block_ids: Sequence[int]) -> None:
        """New blocks are written in full precision: each gets a staging slot."""
        for block_id in block_ids:
            self._staging[block_id] = self._free_staging.pop()

    def matched(self, table: list[int]) -> None:
        """Keep "rows first" after a prefix match: a row brought up after a staging block makes
        that staging block (and any before it) quantized now."""
        last_row = max((j for j, b in enumerate(table) if b not in self._staging), default=-1)
        self._quantize_prefix(table, last_row)

    def committed(self, table: list[int], num_slots: int) -> None:
        """Queue the quantization of the full blocks that left the window of num_slots cached tokens."""
        self._quantize_prefix(table, max(0, num_slots - self.quant.fp_window) // self.layout.block_size)

    def _quantize_prefix(self, table: list[int], num_blocks: int) -> None:
        """Queue the quantization of the staging blocks among table[:num_blocks] (all full)."""
        for block_id in table[:num_blocks]:
            slot = self._staging.pop(block_id, None)
            if slot is not None:
                self._quantize.append((slot, block_id))
                self._free_staging.append(slot)

    def released(self, block_ids: Sequence[int]) -> None:
        """(after the pool released them) A staging block whose last holder let go is quantized
        first when it is registered (the pool keeps it cached), else just dropped."""
        for block_id in block_ids:
            if block_id in self._staging and self.pool.ref_count(block_id) == 0:
                slot = self._staging.pop(block_id)
                if self.pool.block_hash(block_id) is not None:
                    self._quantize.append((slot, block_id))
                self._free_staging.append(slot)

    def reserve_scratch_block(self) -> int | None:
        """A staging block (the one staging_blocks_needed counts for it), never freed."""
        if not self._free_staging:
            return None
        self._scratch_slots.append(self._free_staging.pop())
        return self.pool.num_blocks + self._scratch_slots[-1]

    def flush(self, worker: Executor) -> Future | None:
        """Submit the queued quantizations (before tier copies: a block demoted in this pass is
        read from its row)."""
        if not self._quantize:
            return None
        copies, self._quantize = self._quantize, []
        self.metrics.counters["quantized_blocks"] += len(copies)
        return worker.submit(self._run_quantize, copies)

    def _run_quantize(self, copies: list[tuple[int, int]]) -> None:
        """Worker: staging blocks -> their quantized device rows."""
        device = self.kv.device
        with torch.inference_mode():
            slots = torch.tensor([s for s, _ in copies], dtype=torch.int64, device=device)  # [n]
            ids = torch.tensor([b for _, b in copies], dtype=torch.int64, device=device)  # [n]
            self.blocks.index_copy_(0, ids, self.format.encode(self.kv.index_select(0, slots)))  # [n, nbytes]

    def usage(self) -> TierUsage:
        return TierUsage("device", self.format.name, self.pool.num_held_blocks, self.pool.num_blocks,
                         self.format.nbytes)

    def check_invariants(self, tables: dict[int, list[int]]) -> None:
        slots = list(self._staging.values())
        owned(len(set(slots)) == len(slots) and not set(slots) & set(self._free_staging), "a staging slot has two owners")
        owned(not set(self._scratch_slots) & (set(slots) | set(self._free_staging)), "the scratch slot was handed out")
        owned(len(slots) + len(self._free_staging) + len(self._scratch_slots) == self.quant.num_staging_blocks,
             "staging slot leaked")
        owned(all(self.pool.ref_count(b) > 0 for b in self._staging), "a free block holds a staging slot")
        for seq_id, table in tables.items():
            staged = [b in self._staging for b in table]
            owned(staged == sorted(staged), f"sequence {seq_id}: a quantized block after a staging block")


DeviceTier = PlainDevice | QuantizedDevice


def make_device_tier(layout: Layout, pool: BlockPool, device: torch.device, metrics: KVMetrics,
                     quant: DeviceQuant | None) -> DeviceTier:
    """The device tier for `quant` (None: blocks in the model dtype)."""
    if quant is None:
        return PlainDevice(layout, pool, device, metrics)
    if quant.format.layout != layout:
        raise KVError(f"the quantized device format is for {quant.format.layout}, the cache for {layout}")
    return QuantizedDevice(quant, pool, device, metrics)
