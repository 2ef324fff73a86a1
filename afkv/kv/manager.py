"""KVManager: per-sequence block tables over a BlockPool, the device KV tensor, and the
tiers below it (host memory, disk) when configured.

A sequence's table lists device blocks: the blocks of its matched prefix, then blocks for
tokens to compute. A prefix block may come from any tier: found in the device pool (shared,
ref count + 1), in host memory (copied into a fresh device block before the next step), or
on disk (read into host memory by an I/O thread, then copied; meanwhile the sequence is
*loading* and the scheduler runs others). A block that fails its checks on the way up ends
the usable prefix there: the sequence computes the rest from its tokens.

KV pruning (afkv.kv.pruning, per sequence from `match_prefix`): a pruned sequence's table
holds its kept tokens, slot s at (table[s // block_size], s % block_size). StreamingLLM drops
whole blocks from the table (shared blocks are only released, never written); H2O compacts
its kept tokens into the first blocks of its table with a copy on the worker, so an H2O
sequence is *private*: it neither reuses nor registers prefix blocks, and no other sequence
ever holds its blocks. A sequence that has pruned stops registering blocks (their content no
longer matches their chained hash).

Quantized device tier (afkv.kv.device, `quant`): pool blocks are rows of `blocks` (fp8/int8/int4);
while a block is written and within its sequence's window it lives in a full-precision staging
block of `kv` instead, and `block_table` names it num_blocks + staging slot (what attention
reads, afkv.ops.attention.QuantizedKVCache). A block is quantized into its row (a worker job,
submitted at flush before the step) when it is full and leaves the window of a sequence that
holds it, or when its last holder releases it while it is registered (cached blocks are always
quantized). Every table is quantized blocks first, then staging blocks: quantization always
covers a prefix of a table, and blocks are shared only as common prefixes. H2O (which rewrites
slots in place) is not available on a quantized device tier.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, wait

import torch

from afkv.kv.block_pool import BlockHash, BlockPool, chain_hash
from afkv.kv.device import DeviceQuant
from afkv.kv.layout import KVLayout
from afkv.kv.metrics import KVMetrics, KVMetricsSnapshot, TierUsage
from afkv.kv.pruning import KVPruning, h2o_keep, h2o_should_prune, streaming_drop
from afkv.kv.tiers.config import TierConfig
from afkv.kv.tiers.copier import InlineExecutor
from afkv.kv.tiers.stack import TierStack, Where
from afkv.ops.attention import QuantizedKVCache

log = logging.getLogger("afkv.kv")


class KVManager:
    """Owner of these fields (loop thread only); asks the pool for blocks and the tier stack
    for moves, never touching their lists:

    _tables    sequence id -> device block ids
    _hashes    sequence id -> chained hashes of its full blocks (computed, or matched)
    _pending   sequence id -> indexes of its table's blocks still being read from disk
    _failed    sequence id -> lowest index of a block whose read failed
    _waiters   hash -> (sequence id, index) of the table entries waiting for that read
    _pruning   sequence id -> its pruning spec (pruned sequences only)
    _private   sequence ids that register no blocks (H2O from the start; others once pruned)
    _compact   H2O compactions queued for the next flush: (old table, slots held, spec)
    _zero      blocks whose key mass is reset at the next flush (new blocks of H2O sequences)
    _jobs      submitted pruning and quantization jobs not yet polled
    _dropped   sequence id -> tokens pruning dropped from its cache (its slots = tokens - dropped)
    _staging   block id -> its full-precision staging slot (quantized device tier: blocks not yet quantized)
    _free_staging  free staging slots
    _quantize  (staging slot, block id) copies queued for the next flush
    _scratch_slots  staging slots reserved for CUDA graphs (reserve_scratch_block), never freed

`key_mass` [num_blocks, block_size] float32: the attention mass each cached token received
(H2O), accumulated by attention on the worker, moved with its token by compaction.

    `worker` must be the single-threaded executor that runs the model's steps (tier copies
    are ordered with the steps through it); None runs copies inline (no engine).
    """

    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device, salt: bytes = b"",
                 tiers: TierConfig | None = None, worker: Executor | None = None,
                 wakeup: Callable[[], None] | None = None, quant: DeviceQuant | None = None):
        """quant: store full device blocks quantized (`kv` is then the staging blocks and
        `blocks` the quantized rows)."""
        self.layout = layout
        self.salt = salt
        self.quant = quant
        self.blocks: torch.Tensor | None = None  # uint8 [num_blocks, nbytes] (quantized device tier)
        if quant is None:
            self.kv = torch.zeros((num_blocks, *layout.block_shape), dtype=layout.dtype, device=device)
            device_rows = self.kv
        else:
            assert quant.format.layout == layout
            self.kv = torch.zeros((quant.num_staging_blocks, *layout.block_shape), dtype=layout.dtype, device=device)
            self.blocks = torch.zeros((num_blocks, quant.format.nbytes), dtype=torch.uint8, device=device)
            device_rows = self.blocks
        self.metrics = KVMetrics()
        self.tiers: TierStack | None = None
        self._tiers_closed = False
        if tiers is not None:
            self.tiers = TierStack(tiers, device_rows, worker or InlineExecutor(), self.metrics, wakeup,
                                   device_format=None if quant is None else quant.format)
        self.pool = BlockPool(num_blocks, on_evict=self.tiers.demote if self.tiers else None)
        self._tables: dict[int, list[int]] = {}
        self._hashes: dict[int, list[BlockHash]] = {}
        self._pending: dict[int, set[int]] = {}
        self._failed: dict[int, int] = {}
        self._waiters: dict[BlockHash, list[tuple[int, int]]] = {}
        self.key_mass = torch.zeros((num_blocks, layout.block_size), dtype=torch.float32, device=device)
        self._worker = worker or InlineExecutor()
        self._pruning: dict[int, KVPruning] = {}
        self._private: set[int] = set()
        self._compact: list[tuple[tuple[int, ...], int, KVPruning]] = []
        self._zero: list[int] = []
        self._jobs: list[Future] = []
        self._dropped: dict[int, int] = {}
        self._staging: dict[int, int] = {}
        self._free_staging: list[int] = list(range(quant.num_staging_blocks - 1, -1, -1)) if quant else []
        self._quantize: list[tuple[int, int]] = []
        self._scratch_slots: list[int] = []  # staging slots reserved for CUDA graphs' padding rows
        self._warned_h2o = False

    @property
    def attention_cache(self) -> torch.Tensor | QuantizedKVCache:
        """What the model's attention reads and writes: the device cache `kv`, or (quantized
        device tier) the quantized rows with the staging blocks."""
        if self.quant is None:
            return self.kv
        return QuantizedKVCache(self.blocks, self.kv, self.quant.format.spec, self.quant.max_tail_blocks)

    def reserve_scratch_block(self) -> int | None:
        """A block id that padding rows of captured decode steps may write and attend over, never
        given to a sequence and never freed: a pool block, or (quantized device tier) a staging
        block (the one staging_blocks_needed counts for it). None when none is free."""
        if self.quant is None:
            blocks = self.pool.allocate(1)
            return None if blocks is None else blocks[0]
        if not self._free_staging:
            return None
        self._scratch_slots.append(self._free_staging.pop())
        return self.pool.num_blocks + self._scratch_slots[-1]

    @property
    def num_free_staging_blocks(self) -> int:
        """Quantized device tier: staging blocks free for new tokens (0 without one)."""
        return len(self._free_staging)

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.layout.block_size

    @property
    def prefetch_depth(self) -> int:
        """Waiting sequences whose disk blocks the scheduler reads ahead (0 without a disk tier)."""
        if self.tiers is None or self.tiers.disk is None:
            return 0
        return self.tiers.config.prefetch_depth

    def block_table(self, seq_id: int) -> list[int]:
        """The ids attention reads: pool block ids (quantized device tier: a block still in full
        precision is num_blocks + its staging slot)."""
        table = self._tables[seq_id]
        if self.quant is None:
            return table
        nb = self.pool.num_blocks
        return [nb + self._staging[b] if b in self._staging else b for b in table]

    def has(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def num_dropped(self, seq_id: int) -> int:
        """Tokens pruning dropped from the sequence's cache: its token p sits in slot p - num_dropped."""
        return self._dropped.get(seq_id, 0)

    def is_loading(self, seq_id: int) -> bool:
        return bool(self._pending.get(seq_id))

    # ---- prefix reuse across tiers --------------------------------------------------------
    def match_prefix(self, seq_id: int, token_ids: Sequence[int], pruning: KVPruning | None = None) -> int:
        """Start a sequence's table with the blocks of its longest known prefix, from any tier.
        Returns the number of tokens covered (a multiple of block_size, always less than
        len(token_ids) so the last prompt token is computed), counting blocks still loading:
        call `settle` for what is usable once `is_loading` is False. `pruning`: how `prune`
        treats this sequence (an H2O sequence reuses no prefix: it starts empty)."""
        assert seq_id not in self._tables
        if pruning is not None and pruning.needs_scores and self.quant is not None:
            if not self._warned_h2o:
                log.warning("H2O pruning rewrites cached slots in place: not available with a quantized "
                            "device tier ([kv] device_format); such requests run without pruning")
                self._warned_h2o = True
            self.metrics.counters["pruning_unsupported"] += 1
            pruning = None
        if pruning is not None and pruning.enabled:
            self._pruning[seq_id] = pruning
            if pruning.needs_scores:
                self._private.add(seq_id)
                token_ids = []
        bs = self.layout.block_size
        table: list[int] = []
        hashes: list[BlockHash] = []
        self._tables[seq_id] = table
        self._hashes[seq_id] = hashes
        parent = None
        for b in range((len(token_ids) - 1) // bs):
            h = chain_hash(parent, token_ids[b * bs : (b + 1) * bs], self.salt)
            block_id = self.pool.lookup(h)
            if block_id is not None:
                self.pool.acquire(block_id)
                self.metrics.hit_blocks["device"] += 1
            else:
                block_id = self._bring_up(seq_id, b, h)
                if block_id is None:
                    break
            table.append(block_id)
            hashes.append(h)
            parent = h
        self.metrics.counters["lookups"] += 1
        if self.quant is not None:  # keep "quantized first": a row brought up after a staging block
            last_row = max((j for j, b in enumerate(table) if b not in self._staging), default=-1)
            self._quantize_prefix(table, last_row)
        return len(table) * bs

    def _bring_up(self, seq_id: int, index: int, h: BlockHash) -> int | None:
        """A device block for table entry `index` holding `h` from a lower tier: filled before
        the next step (host), or once its disk read ends (then the entry is pending)."""
        if self.tiers is None or self.tiers.locate(h) is None:
            return None
        blocks = self.pool.allocate(1)  # may demote another block, which may evict h from host
        if blocks is None:
            return None
        [block_id] = blocks
        where = self.tiers.locate(h)
        if where is Where.HOST:
            self.tiers.promote(h, block_id)
            registered = self.pool.register(block_id, h)
            assert registered, "the pool missed h a moment ago"
            self.metrics.hit_blocks["host"] += 1
            return block_id
        if where is None or not self.tiers.fetch(h):
            self.pool.release([block_id])
            return None
        self._pending.setdefault(seq_id, set()).add(index)
        self._waiters.setdefault(h, []).append((seq_id, index))
        self.metrics.hit_blocks["disk"] += 1
        return block_id

    def settle(self, seq_id: int) -> int | None:
        """None while the sequence's prefix is loading; then the number of prefix tokens whose
        KV is usable (the table is cut at the first block that failed to load). Call before
        the sequence's first `allocate`."""
        if self._pending.get(seq_id):
            return None
        table, hashes = self._tables[seq_id], self._hashes[seq_id]
        assert len(table) == len(hashes), "settle is for a matched prefix, before allocate"
        failed = self._failed.pop(seq_id, None)
        if failed is not None:
            self._release(table[failed:])
            del table[failed:]
            del hashes[failed:]
        return len(table) * self.layout.block_size

    def prefetch(self, token_ids: Sequence[int]) -> int:
        """Start reading from disk the blocks of this prompt's known prefix that are in no
        faster tier (a waiting sequence, before it is admitted). -> reads started."""
        if self.tiers is None or self.tiers.disk is None:
            return 0
        bs = self.layout.block_size
        started = 0
        parent = None
        for b in range((len(token_ids) - 1) // bs):
            h = chain_hash(parent, token_ids[b * bs : (b + 1) * bs], self.salt)
            parent = h
            if self.pool.lookup(h) is not None:
                continue
            where = self.tiers.locate(h)
            if where is None:
                break
            if where is Where.DISK:
                if not self.tiers.fetch(h, ahead=True):
                    break
                started += 1
        return started

    # ---- growth and release ---------------------------------------------------------------
    def num_new_blocks(self, seq_id: int, num_tokens: int) -> int:
        return max(0, self.layout.num_blocks_for(num_tokens) - len(self._tables[seq_id]))

    def can_allocate(self, seq_id: int, num_tokens: int) -> bool:
        n = self.num_new_blocks(seq_id, num_tokens)
        return n <= self.pool.num_free_blocks and (self.quant is None or n <= len(self._free_staging))

    def allocate(self, seq_id: int, num_tokens: int) -> bool:
        """Grow the table to cover num_tokens; False (and no change) when the pool (or, with a
        quantized device tier, the staging pool) is short. New blocks are written in full
        precision: on a quantized device tier each gets a staging slot."""
        n = self.num_new_blocks(seq_id, num_tokens)
        if self.quant is not None and n > len(self._free_staging):
            self.metrics.counters["staging_full"] += 1
            return False
        blocks = self.pool.allocate(n)
        if blocks is None:
            return False
        if self.quant is not None:
            for block_id in blocks:
                self._staging[block_id] = self._free_staging.pop()
        self._tables[seq_id].extend(blocks)
        if seq_id in self._pruning and self._pruning[seq_id].needs_scores:
            self._zero.extend(blocks)
        return True

    def commit(self, seq_id: int, token_ids: Sequence[int], num_computed: int) -> None:
        """Register the blocks that became full and computed, so later prompts can share them;
        quantized device tier: queue the quantization of the full blocks that left the window."""
        bs = self.layout.block_size
        table, hashes = self._tables[seq_id], self._hashes[seq_id]
        if seq_id not in self._private:
            while len(hashes) < num_computed // bs:
                b = len(hashes)
                h = chain_hash(hashes[-1] if hashes else None, token_ids[b * bs : (b + 1) * bs], self.salt)
                self.pool.register(table[b], h)
                hashes.append(h)
        if self.quant is not None:
            num_slots = num_computed - self._dropped.get(seq_id, 0)
            self._quantize_prefix(table, max(0, num_slots - self.quant.fp_window) // bs)

    def _quantize_prefix(self, table: list[int], num_blocks: int) -> None:
        """Queue the quantization of the staging blocks among table[:num_blocks] (all full)."""
        for block_id in table[:num_blocks]:
            slot = self._staging.pop(block_id, None)
            if slot is not None:
                self._quantize.append((slot, block_id))
                self._free_staging.append(slot)

    def _release(self, block_ids: Sequence[int]) -> None:
        """Release blocks to the pool; a staging block whose last holder lets go is quantized
        first when it is registered (the pool keeps it cached), else just dropped."""
        self.pool.release(block_ids)
        if self.quant is None:
            return
        for block_id in block_ids:
            if block_id in self._staging and self.pool.ref_count(block_id) == 0:
                slot = self._staging.pop(block_id)
                if self.pool.block_hash(block_id) is not None:
                    self._quantize.append((slot, block_id))
                self._free_staging.append(slot)

    def _run_quantize(self, copies: list[tuple[int, int]]) -> None:
        """Worker: staging blocks -> their quantized device rows."""
        device = self.kv.device
        with torch.inference_mode():
            slots = torch.tensor([s for s, _ in copies], dtype=torch.int64, device=device)  # [n]
            ids = torch.tensor([b for _, b in copies], dtype=torch.int64, device=device)  # [n]
            self.blocks.index_copy_(0, ids, self.quant.format.encode(self.kv.index_select(0, slots)))  # [n, nbytes]

    def free(self, seq_id: int) -> None:
        """Release a sequence's blocks (full ones stay cached, and are demoted to the tiers
        below when the pool reuses their slots: a preempted sequence is swapped out this way)."""
        table = self._tables.pop(seq_id, None)
        hashes = self._hashes.pop(seq_id, None)
        for index in self._pending.pop(seq_id, ()):
            waiters = self._waiters[hashes[index]]
            waiters.remove((seq_id, index))
            if not waiters:
                del self._waiters[hashes[index]]
        self._failed.pop(seq_id, None)
        self._pruning.pop(seq_id, None)
        self._private.discard(seq_id)
        self._dropped.pop(seq_id, None)
        if table:
            self._release(table)

    # ---- pruning --------------------------------------------------------------------------
    def prune(self, seq_id: int, num_slots: int) -> int:
        """Apply the sequence's pruning policy to its num_slots cached tokens (call between
        steps, before growing its table). -> number of cached tokens dropped (0: nothing to do
        yet). Freed blocks go back to the pool now; an H2O copy runs at the next flush."""
        spec = self._pruning.get(seq_id)
        if spec is None:
            return 0
        bs = self.layout.block_size
        table = self._tables[seq_id]
        assert num_slots <= len(table) * bs
        if spec.policy == "streaming":
            drop = streaming_drop(num_slots, bs, spec)
            if not drop:
                return 0
            self._release(table[drop.start : drop.stop])
            del table[drop.start : drop.stop]
            dropped = len(drop) * bs
        else:
            if not h2o_should_prune(num_slots, bs, spec):
                return 0
            assert self.quant is None, "match_prefix turns H2O off on a quantized device tier"
            self._compact.append((tuple(table[: self.layout.num_blocks_for(num_slots)]), num_slots, spec))
            keep_blocks = self.layout.num_blocks_for(spec.budget)
            self._release(table[keep_blocks:])
            del table[keep_blocks:]
            dropped = num_slots - spec.budget
        self._private.add(seq_id)
        self._dropped[seq_id] = self._dropped.get(seq_id, 0) + dropped
        self.metrics.counters["pruned_tokens"] += dropped
        return dropped

    def _run_pruning(self, compactions: list[tuple[tuple[int, ...], int, KVPruning]], zero: list[int]) -> None:
        """Worker: H2O compactions (keys, values and key mass move with their token), then
        reset the key mass of blocks new to H2O sequences."""
        bs = self.layout.block_size
        device = self.kv.device
        with torch.inference_mode():
            for table, num_slots, spec in compactions:
                blocks = torch.tensor(table, dtype=torch.int64, device=device)  # [nb]
                slots = (blocks[:, None] * bs + torch.arange(bs, device=device)).flatten()[:num_slots]  # [N]
                mass = self.key_mass.view(-1)  # [num_blocks * bs]
                keep = h2o_keep(mass[slots], spec)  # [K] sorted slot indexes
                moved = keep != torch.arange(keep.shape[0], device=device)  # [K]
                src = slots[keep[moved]]  # [M] flat slot ids
                dst = slots[: keep.shape[0]][moved]  # [M]
                values = self.kv[src // bs, :, :, src % bs]  # [M, L, 2, Hkv, D] (a copy: safe to overwrite src)
                self.kv[dst // bs, :, :, dst % bs] = values
                mass[dst] = mass[src]
            if zero:
                self.key_mass[torch.tensor(zero, dtype=torch.int64, device=device)] = 0

    @property
    def num_sequences(self) -> int:
        return len(self._tables)

    # ---- transfers --------------------------------------------------------------------------
    def poll(self) -> None:
        """Collect finished transfers: a block read from disk is copied into the device block
        of every sequence waiting for it (or marks their prefix as ending there)."""
        for job in [j for j in self._jobs if j.done()]:
            self._jobs.remove(job)
            job.result()  # a failed pruning copy is a bug: raise it here
        if self.tiers is None:
            return
        for h, ok in self.tiers.poll():
            for seq_id, index in self._waiters.pop(h, ()):
                pending = self._pending[seq_id]
                pending.remove(index)
                if not pending:
                    del self._pending[seq_id]
                if ok:
                    block_id = self._tables[seq_id][index]
                    self.tiers.promote(h, block_id)
                    self.pool.register(block_id, h)  # False: another block got h first; this one stays private
                else:
                    self._failed[seq_id] = min(index, self._failed.get(seq_id, index))

    def flush(self) -> None:
        """Submit the transfers queued by this scheduling pass (before its step is submitted).
        Pruning copies go first: they read blocks this pass released, which tier copies of this
        pass may fill."""
        if self._compact or self._zero:
            self._jobs.append(self._worker.submit(self._run_pruning, self._compact, self._zero))
            self._compact, self._zero = [], []
        if self._quantize:  # before tier copies: a block demoted in this pass is read from its row
            self._jobs.append(self._worker.submit(self._run_quantize, self._quantize))
            self.metrics.counters["quantized_blocks"] += len(self._quantize)
            self._quantize = []
        if self.tiers is not None:
            self.tiers.flush()

    def drain(self) -> None:
        """Block until no transfer is in flight (tests, benchmarks, close; never on the loop)."""
        self.flush()
        wait(self._jobs)
        self.poll()
        if self.tiers is None:
            return
        while True:
            self.tiers.flush()
            futures = self.tiers.in_flight()
            if not futures:
                return
            wait(futures)
            self.poll()

    def close(self) -> None:
        """Drain, write the disk index and release the disk directory (blocking)."""
        if self.tiers is None:
            self.drain()  # pruning copies
        elif not self._tiers_closed:
            self._tiers_closed = True
            self.drain()
            self.tiers.close()

    async def aclose(self) -> None:
        """As close, without blocking the event loop. Closing twice is a no-op."""
        self.flush()
        if self._jobs:  # pruning copies
            await asyncio.wait([asyncio.wrap_future(j) for j in self._jobs])
            self.poll()
        if self.tiers is None or self._tiers_closed:
            return
        self._tiers_closed = True
        while True:
            self.tiers.flush()
            futures = self.tiers.in_flight()
            if not futures:
                break
            await asyncio.wait([asyncio.wrap_future(f) for f in futures])
            self.poll()
        await self.tiers.aclose()

    # ---- metrics and checks -------------------------------------------------------------------
    def metrics_snapshot(self) -> KVMetricsSnapshot:
        fmt = self.quant.format if self.quant is not None else None
        device = TierUsage("device", fmt.name if fmt else "none", self.pool.num_held_blocks, self.pool.num_blocks,
                           fmt.nbytes if fmt else self.layout.block_nbytes)
        lower = self.tiers.usage() if self.tiers is not None else ()
        return self.metrics.snapshot((device, *lower))

    def check_invariants(self) -> None:
        """Accounting invariants across the manager, the pool and the tiers (tests)."""
        self.pool.check_invariants()
        refs: dict[int, int] = {}
        for seq_id, table in self._tables.items():
            assert len(set(table)) == len(table), f"sequence {seq_id} holds a block twice"
            for block_id in table:
                refs[block_id] = refs.get(block_id, 0) + 1
        for block_id in range(self.pool.num_blocks):
            assert self.pool.ref_count(block_id) == refs.get(block_id, 0), f"block {block_id} leaked or double-owned"
        waiting = {(s, i) for ws in self._waiters.values() for s, i in ws}
        assert waiting == {(s, i) for s, idx in self._pending.items() for i in idx}
        assert all(self._pending.values())
        assert set(self._pruning) <= set(self._tables) and self._private <= set(self._tables)
        for seq_id, spec in self._pruning.items():
            if spec.needs_scores:  # H2O blocks are written in place: never shared
                assert seq_id in self._private
                assert all(self.pool.ref_count(b) == 1 for b in self._tables[seq_id]), f"H2O sequence {seq_id} shares a block"
        if self.quant is not None:
            slots = list(self._staging.values())
            assert len(set(slots)) == len(slots) and not set(slots) & set(self._free_staging)
            assert not set(self._scratch_slots) & (set(slots) | set(self._free_staging))
            assert len(slots) + len(self._free_staging) + len(self._scratch_slots) == self.quant.num_staging_blocks, \
                "staging slot leaked"
            assert all(self.pool.ref_count(b) > 0 for b in self._staging), "a free block holds a staging slot"
            for seq_id, table in self._tables.items():
                staged = [b in self._staging for b in table]
                assert staged == sorted(staged), f"sequence {seq_id}: a quantized block after a staging block"
        if self.tiers is not None:
            self.tiers.check_invariants()
