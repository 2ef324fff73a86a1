"""KVManager: prefix matching and per-sequence block tables over a BlockPool.

A sequence's table lists device blocks: the blocks of its matched prefix, then blocks for
tokens to compute. The manager decides *which* blocks a sequence holds; everything about
*where* bytes live it asks of one object per concern, each in its own module:

    pool     BlockPool (block_pool.py): free blocks, ref counts, the prefix-hash map
    device   the device tier (device.py): the cache in the model dtype, or quantized rows plus
             full-precision staging blocks; what attention reads (`attention_cache`)
    lower    the tiers below the device (tiers/loader.py): a matched block found in host memory
             or on disk is brought up (a disk read makes the sequence *loading*; `settle`
             cuts the table where a read failed); NoTiers when there are none
    stream   the stream store (stream.py): the middle of a long sequence moved to host memory,
             attended layer by layer from there (`place`); NoStream when streaming is off
    pruning  the pruning policy's per-sequence state (pruning.py): StreamingLLM drops blocks
             from the table, H2O compacts its kept tokens in place (such a sequence is
             *private*: it neither reuses nor registers prefix blocks); the one count of
             tokens each sequence dropped (`num_dropped`)

A prefix block may come from any tier: found in the device pool (shared, ref count + 1), in
host memory or on disk (see `lower`), or from another node (the KV hand-off of prefill/decode
disaggregation, afkv.nodes.handoff): `begin_handoff` starts a table with the prompt's full
blocks, shared where the pool holds them and fresh (*awaited*) for the others; `receive`
writes arrived rows into awaited blocks (a worker job, ordered before any step that reads
them) and registers them; `end_handoff` checks none is awaited any more. An awaited block is
never registered, so no other sequence can share a block whose bytes have not landed; `free`
ends a hand-off at any point. On the sending side `export_rows` reads full blocks as rows, of a
sequence being computed or of a hold on blocks the pool has already (`hold_cached`).

A pruned sequence's table holds its kept tokens, slot s at (table[s // block_size], s % block_size); once pruned it registers no more blocks (their
content no longer matches their chained hash). Block identity is the chained hash of a block's
tokens, computed in one place (block_pool.chain_hashes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait

import torch

from afkv.errors import KVError
from afkv.kv.block_pool import BlockHash, BlockPool, chain_hashes
from afkv.kv.checks import owned
from afkv.kv.device import DeviceQuant, make_device_tier
from afkv.kv.formats import BlockFormat
from afkv.kv.layout import Layout
from afkv.kv.metrics import KVMetrics, KVMetricsSnapshot
from afkv.kv.pruning import KVPruning, PruningState
from afkv.kv.stream import NoStream, StreamConfig, StreamRing, StreamStore
from afkv.kv.tiers.config import TierConfig
from afkv.kv.tiers.copier import Copier, CopyOp, Direction, InlineExecutor
from afkv.kv.tiers.loader import NoTiers, TierLoader
from afkv.kv.tiers.stack import TierStack
from afkv.ops.attention import QuantizedKVCache


class KVManager:
    """Owner of these fields (loop thread only); asks the pool for blocks, the device tier for
    what attention reads, the lower tiers for moves and the pruning state for its policy,
    never touching their lists:

    _tables    sequence id -> device block ids
    _hashes    sequence id -> chained hashes of its full blocks (computed, or matched)
    _jobs      submitted pruning, quantization and hand-off jobs not yet polled
    _awaited   sequence id -> {table index: hash} of its hand-off blocks whose rows have not landed

    `worker` must be the single-threaded executor that runs the model's steps (tier copies
    are ordered with the steps through it); None runs copies inline (no engine). On CUDA a
    thread of its own (`_waiter`) waits for exported rows, so that the worker only enqueues
    their copies and goes on to the next step.
    """

    def __init__(self, layout: Layout, num_blocks: int, device: torch.device, salt: bytes = b"",
                 tiers: TierConfig | None = None, worker: Executor | None = None,
                 wakeup: Callable[[], None] | None = None, quant: DeviceQuant | None = None,
                 stream: StreamConfig | None = None):
        """quant: store full device blocks quantized (`kv` is then the staging blocks and
        `blocks` the quantized rows). stream: move the middle of long sequences to a stream store
        in host memory (needs a device tier in the model dtype)."""
        self.layout = layout
        self.salt = salt
        self.metrics = KVMetrics()
        self._worker = worker or InlineExecutor()
        self.pool = BlockPool(num_blocks, on_evict=self._evicted)
        self.device = make_device_tier(layout, self.pool, device, self.metrics, quant)
        self.lower: TierLoader | NoTiers = NoTiers()
        if tiers is not None:
            stack = TierStack(tiers, self.device.rows, self._worker, self.metrics, wakeup,
                              device_format=self.device.format)
            self.lower = TierLoader(stack, self.pool, self.metrics)
        self.pruning = PruningState(layout, self.pool, self.device.kv, self.metrics, self.device.writes_in_place)
        self.stream: StreamStore | NoStream = NoStream()
        self.stream_ring: StreamRing | None = None  # what the runner streams a step's host blocks with
        if stream is not None:
            if quant is not None or stream.format.layout != layout:
                raise KVError("streaming needs a device tier in the model dtype ([kv] device_format = \"auto\") "
                              "and a store of the cache's geometry")
            self.stream = StreamStore(stream, device, self.metrics)
            self.stream_ring = StreamRing(self.stream, device)
        self._tables: dict[int, list[int]] = {}
        self._hashes: dict[int, list[BlockHash]] = {}
        self._jobs: list[Future] = []
        self._awaited: dict[int, dict[int, BlockHash]] = {}
        self._waiter = ThreadPoolExecutor(1, thread_name_prefix="afkv-kv-export") if device.type == "cuda" else None
        self._closed = False

    def _evicted(self, block_id: int, block_hash: BlockHash) -> None:
        self.lower.demote(block_id, block_hash)

    # ---- what the engine and tests read -----------------------------------------------------
    @property
    def quant(self) -> DeviceQuant | None:
        """The quantized device tier's settings, or None (blocks in the model dtype)."""
        return self.device.quant

    @property
    def kv(self) -> torch.Tensor:
        """The full-precision blocks attention writes: the cache, or the staging blocks."""
        return self.device.kv

    @property
    def blocks(self) -> torch.Tensor | None:
        """Quantized device tier: the rows uint8 [num_blocks, nbytes]; else None."""
        return self.device.blocks

    @property
    def tiers(self) -> TierStack | None:
        """The host and disk tiers, or None (device only)."""
        return self.lower.stack

    @property
    def key_mass(self) -> torch.Tensor:
        return self.pruning.key_mass

    @property
    def attention_cache(self) -> torch.Tensor | QuantizedKVCache:
        """What the model's attention reads and writes: the device cache `kv`, or (quantized
        device tier) the quantized rows with the staging blocks."""
        return self.device.attention_cache

    def reserve_scratch_block(self) -> int | None:
        """A block id that padding rows of captured decode steps may write and attend over, never
        given to a sequence and never freed: a pool block, or (quantized device tier) a staging
        block (the one staging_blocks_needed counts for it). None when none is free."""
        return self.device.reserve_scratch_block()

    @property
    def num_free_staging_blocks(self) -> int:
        """Quantized device tier: staging blocks free for new tokens (0 without one)."""
        return self.device.num_free_staging_blocks

    @property
    def capacity_tokens(self) -> int:
        """Tokens the device tier and the stream store (with its disk) hold together."""
        store_blocks = 0 if self.stream.config is None else self.stream.config.total_blocks
        return (self.pool.num_blocks + store_blocks) * self.layout.block_size

    @property
    def prefetch_depth(self) -> int:
        """Waiting sequences whose disk blocks the scheduler reads ahead (0 without a disk tier)."""
        return self.lower.prefetch_depth

    def block_table(self, seq_id: int) -> list[int]:
        """The ids attention reads: pool block ids (quantized device tier: a block still in full
        precision is num_blocks + its staging slot)."""
        return self.device.block_ids(self._tables[seq_id])

    def num_dropped(self, seq_id: int) -> int:
        """Tokens of the sequence before its device slots that its table does not hold (the one
        count): dropped by pruning, or streamed from the stream store. Token p of it sits in
        slot p - num_dropped; its device slots are num_computed - num_dropped."""
        return self.pruning.num_dropped(seq_id) + self.stream.num_tokens(seq_id)

    def streamed_blocks(self, seq_id: int) -> list[int]:
        """The stream store ids of the sequence's middle, in token order (empty when none)."""
        return self.stream.ids(seq_id)

    def count_streamed(self, num_blocks: int) -> None:
        """A step was planned that streams num_blocks store blocks (metrics)."""
        if num_blocks:
            self.metrics.counters["streamed_steps"] += 1
            self.metrics.counters["bytes_streamed"] += num_blocks * self.stream.format.nbytes

    def count_corrupt(self, num_blocks: int) -> None:
        """Streamed disk blocks failed their checks in a step (metrics: `corrupt_blocks`); their
        sequence computes its KV again."""
        self.metrics.counters["corrupt_blocks"] += num_blocks

    def has(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def is_loading(self, seq_id: int) -> bool:
        return self.lower.is_loading(seq_id)

    @property
    def num_sequences(self) -> int:
        return len(self._tables)

    def _block_hashes(self, token_ids: Sequence[int], num_blocks: int,
                      known: Sequence[BlockHash] = ()) -> Iterator[BlockHash]:
        return chain_hashes(token_ids, self.layout.block_size, num_blocks, self.salt, known)

    # ---- prefix reuse across tiers --------------------------------------------------------
    def match_prefix(self, seq_id: int, token_ids: Sequence[int], pruning: KVPruning | None = None) -> int:
        """Start a sequence's table with the blocks of its longest known prefix, from any tier.
        Returns the number of tokens covered (a multiple of block_size, always less than
        len(token_ids) so the last prompt token is computed), counting blocks still loading:
        call `settle` for what is usable once `is_loading` is False. `pruning`: how `prune`
        treats this sequence (an H2O sequence reuses no prefix: it starts empty)."""
        owned(seq_id not in self._tables, f"sequence {seq_id} is admitted twice")
        if not self.pruning.admit(seq_id, pruning):
            token_ids = []
        table: list[int] = []
        hashes: list[BlockHash] = []
        self._tables[seq_id] = table
        self._hashes[seq_id] = hashes
        for index, h in enumerate(self._block_hashes(token_ids, (len(token_ids) - 1) // self.layout.block_size)):
            block_id = self.pool.lookup(h)
            if block_id is not None:
                self.pool.acquire(block_id)
                self.metrics.hit_blocks["device"] += 1
            else:
                block_id = self.lower.bring_up(seq_id, index, h)
                if block_id is None:
                    break
            table.append(block_id)
            hashes.append(h)
        self.metrics.counters["lookups"] += 1
        self.device.matched(table)
        return len(table) * self.layout.block_size

    def settle(self, seq_id: int) -> int | None:
        """None while the sequence's prefix is loading; then the number of prefix tokens whose
        KV is usable (the table is cut at the first block that failed to load). Call before
        the sequence's first `allocate`."""
        if self.lower.is_loading(seq_id):
            return None
        table, hashes = self._tables[seq_id], self._hashes[seq_id]
        owned(len(table) == len(hashes), f"sequence {seq_id}: settle is for a matched prefix, before allocate")
        failed = self.lower.take_failed(seq_id)
        if failed is not None:
            self._release(table[failed:])
            del table[failed:]
            del hashes[failed:]
        return len(table) * self.layout.block_size

    def prefetch(self, token_ids: Sequence[int]) -> int:
        """Start reading from disk the blocks of this prompt's known prefix that are in no
        faster tier (a waiting sequence, before it is admitted). -> reads started."""
        return self.lower.prefetch(self._block_hashes(token_ids, (len(token_ids) - 1) // self.layout.block_size))

    # ---- growth and release ---------------------------------------------------------------
    def num_new_blocks(self, seq_id: int, num_tokens: int) -> int:
        return max(0, self.layout.num_blocks_for(num_tokens) - len(self._tables[seq_id]))

    def can_allocate(self, seq_id: int, num_tokens: int) -> bool:
        n = self.num_new_blocks(seq_id, num_tokens)
        return n <= self.pool.num_free_blocks and self.device.room_for(n)

    def allocate(self, seq_id: int, num_tokens: int) -> bool:
        """Grow the table to cover num_tokens; False (and no change) when the pool (or, with a
        quantized device tier, the staging pool) is short. New blocks are written in full
        precision: on a quantized device tier each gets a staging slot."""
        n = self.num_new_blocks(seq_id, num_tokens)
        if not self.device.room_for(n):
            self.metrics.counters["staging_full"] += 1
            return False
        blocks = self.pool.allocate(n)
        if blocks is None:
            return False
        self.device.grew(blocks)
        self._tables[seq_id].extend(blocks)
        self.pruning.grew(seq_id, blocks)
        return True

    def commit(self, seq_id: int, token_ids: Sequence[int], num_computed: int) -> None:
        """Register the blocks that became full and computed, so later prompts can share them;
        quantized device tier: queue the quantization of the full blocks that left the window."""
        table, hashes = self._tables[seq_id], self._hashes[seq_id]
        if not self.pruning.is_private(seq_id) and not self.stream.has(seq_id):
            for h in self._block_hashes(token_ids, num_computed // self.layout.block_size, hashes):
                self.pool.register(table[len(hashes)], h)
                hashes.append(h)
        self.device.committed(table, num_computed - self.num_dropped(seq_id))

    def _release(self, block_ids: Sequence[int]) -> None:
        self.pool.release(block_ids)
        self.device.released(block_ids)

    def free(self, seq_id: int) -> None:
        """Release a sequence's blocks (full ones stay cached, and are demoted to the tiers
        below when the pool reuses their slots: a preempted sequence is swapped out this way)."""
        table = self._tables.pop(seq_id, None)
        self._hashes.pop(seq_id, None)
        self._awaited.pop(seq_id, None)  # never registered: their slots go back unshared
        self.lower.forget(seq_id)
        self.pruning.forget(seq_id)
        self.stream.forget(seq_id)
        if table:
            self._release(table)

    # ---- KV hand-off between nodes (prefill/decode disaggregation) ----------------------------
    def begin_handoff(self, seq_id: int, token_ids: Sequence[int],
                      pruning: KVPruning | None = None) -> dict[int, BlockHash] | None:
        """Start the table of a sequence whose prompt KV another node computes: its full blocks
        (those `match_prefix` looks up: the last prompt token is always computed here) are shared
        where the device pool holds them, and get a fresh awaited block each otherwise.
        -> {table index: hash} of the awaited blocks (empty: nothing to receive); None, and no
        change, when the pool is short or the sequence reuses no prefix (H2O): compute it here."""
        owned(seq_id not in self._tables, f"sequence {seq_id} is admitted twice")
        if pruning is not None and pruning.needs_scores:
            return None
        hashes = list(self._block_hashes(token_ids, (len(token_ids) - 1) // self.layout.block_size))
        present = {i: self.pool.lookup(h) for i, h in enumerate(hashes)}
        missing = [i for i, b in present.items() if b is None]
        for i, b in present.items():
            if b is not None:
                self.pool.acquire(b)  # before allocating: an allocation could evict it
        fresh = self.pool.allocate(len(missing))
        if fresh is None:
            self.pool.release([b for b in present.values() if b is not None])
            return None
        self.pruning.admit(seq_id, pruning)
        fresh_of = dict(zip(missing, fresh))
        self._tables[seq_id] = [fresh_of[i] if b is None else b for i, b in present.items()]
        self._hashes[seq_id] = hashes
        awaited = self._awaited[seq_id] = {i: hashes[i] for i in missing}
        self.metrics.counters["handoff_shared_blocks"] += len(hashes) - len(missing)
        self.metrics.counters["handoff_awaited_blocks"] += len(missing)
        return dict(awaited)

    def hold_cached(self, seq_id: int, token_ids: Sequence[int]) -> bool:
        """Sending side: when the device pool holds every whole block of token_ids, start the
        sequence's table with them (shared; `export_rows` reads them, `free` ends the hold) ->
        True; else False and no change (the blocks must be computed)."""
        owned(seq_id not in self._tables, f"sequence {seq_id} is admitted twice")
        hashes = list(self._block_hashes(token_ids, len(token_ids) // self.layout.block_size))
        table = [self.pool.lookup(h) for h in hashes]
        if not hashes or None in table:
            return False
        for block_id in table:
            self.pool.acquire(block_id)
        self._tables[seq_id], self._hashes[seq_id] = table, hashes
        return True

    def awaited(self, seq_id: int) -> dict[int, BlockHash]:
        """{table index: hash} of the sequence's hand-off blocks still to receive."""
        return dict(self._awaited.get(seq_id, {}))

    def receive(self, seq_id: int, indices: Sequence[int], rows: torch.Tensor, fmt: BlockFormat,
                slots: Sequence[int] | None = None) -> Future:
        """Rows uint8 [m, fmt.nbytes] (host memory checked by the caller against their
        checksums and hashes, or a staging buffer on this cache's GPU that another process
        filled: CUDA IPC) land in awaited blocks `indices` of the sequence's table, block
        indices[k] from rows[slots[k]] (default k): written by a worker job (ordered before every
        step submitted after it), then registered, so later prompts share them. -> the job's
        Future: the rows may be overwritten once it is done. BlockOwnershipError for an index not
        awaited."""
        awaited = self._awaited[seq_id]
        for i in indices:
            owned(i in awaited, f"sequence {seq_id}: hand-off block {i} is not awaited (sent twice, or never "
                                "asked for)")
        slots = list(range(len(indices))) if slots is None else list(slots)
        owned(rows.dim() == 2 and rows.shape[1] == fmt.nbytes and len(slots) == len(indices)
              and all(0 <= k < rows.shape[0] for k in slots),
              f"sequence {seq_id}: rows {tuple(rows.shape)}, slots {slots[:8]} for {len(indices)} blocks of "
              f"{fmt.nbytes} bytes")
        table = self._tables[seq_id]
        ops = [CopyOp(Direction.TO_DEVICE, table[i], slot) for slot, i in zip(slots, indices)]
        job = self._worker.submit(_import, self.device.rows, self.device.format, rows, fmt, ops)
        self._jobs.append(job)
        for i in indices:
            self.pool.register(table[i], awaited.pop(i))  # False: another block holds it; this one stays private
        self.metrics.counters["handoff_received_blocks"] += len(indices)
        if rows.is_cuda:
            self.metrics.counters["handoff_received_device_blocks"] += len(indices)  # CUDA IPC or NCCL: no host copy
        self.metrics.counters["bytes_handoff_received"] += len(indices) * fmt.nbytes
        return job

    def end_handoff(self, seq_id: int) -> int:
        """The hand-off is complete: -> prompt tokens covered (the sequence is then admitted
        as after `settle`). BlockOwnershipError while a block is still awaited."""
        awaited = self._awaited.pop(seq_id)
        owned(not awaited, f"sequence {seq_id}: hand-off ended with blocks {sorted(awaited)} not received")
        self.device.matched(self._tables[seq_id])
        return len(self._tables[seq_id]) * self.layout.block_size

    def num_full_blocks(self, seq_id: int) -> int:
        """Full blocks of the sequence's table whose hash is known (matched or committed)."""
        return len(self._hashes[seq_id])

    def block_hashes(self, seq_id: int) -> list[BlockHash]:
        return list(self._hashes[seq_id])

    def export_rows(self, seq_id: int, indices: Sequence[int], fmt: BlockFormat, into: torch.Tensor | None = None,
                    slots: Sequence[int] | None = None) -> Future:
        """Read full blocks `indices` of the sequence's table as rows of `fmt` on the worker
        (after the steps submitted before) -> Future of uint8 [n, fmt.nbytes], complete when
        the rows are: in host memory (pinned on CUDA), or, with `into` (uint8 [m, fmt.nbytes],
        host memory or this cache's device), written into its rows `slots` (then the future's
        value is those rows). On CUDA the worker only enqueues the copies (the steps after them
        are ordered behind them on the device) and `_waiter` waits for them: a prefill node's
        worker goes on launching its next chunk while a chunk's blocks leave."""
        owned(all(i < len(self._hashes[seq_id]) for i in indices), f"sequence {seq_id}: exporting a block not full")
        block_ids = [self._tables[seq_id][i] for i in indices]
        self.metrics.counters["handoff_sent_blocks"] += len(indices)
        job = self._worker.submit(_export, self.device.rows, self.device.format, block_ids, fmt, into,
                                  list(range(len(block_ids))) if slots is None else list(slots))
        return when_copied(job, self._waiter)

    # ---- pruning --------------------------------------------------------------------------
    def prune(self, seq_id: int, num_slots: int) -> int:
        """Apply the sequence's pruning policy to its num_slots cached tokens (call between
        steps, before growing its table). -> number of cached tokens dropped (0: nothing to do
        yet; `num_dropped` keeps the total). Freed blocks go back to the pool now; an H2O copy
        runs at the next flush."""
        return self.pruning.prune(seq_id, self._tables[seq_id], num_slots, self._release)

    # ---- streaming ------------------------------------------------------------------------
    def place(self, seq_id: int, num_slots: int) -> int:
        """Move the middle of a long sequence (num_slots device slots) to the stream store, sinks
        and recent window staying on the device (call between steps, before growing its table,
        as `prune`). -> tokens moved (0: streaming off, a pruned sequence, nothing to move, or
        the store full). A streaming sequence registers no more prefix blocks."""
        if self.pruning.prunes(seq_id):
            return 0
        return self.stream.place(seq_id, self._tables[seq_id], num_slots, self._release)

    # ---- transfers --------------------------------------------------------------------------
    def poll(self) -> None:
        """Collect finished transfers (a block read from disk is copied into the device block
        of every sequence waiting for it, or marks their prefix as ending there)."""
        for job in [j for j in self._jobs if j.done()]:
            self._jobs.remove(job)
            job.result()  # a failed pruning or quantization copy is a bug: raise it here
        self.lower.poll()

    def flush(self) -> None:
        """Submit the transfers queued by this scheduling pass (before its step is submitted):
        pruning copies and spills to the stream store first (they read blocks this pass
        released, which tier copies of this pass may fill), then quantization (a block demoted
        in this pass is read from its row), then the copies between tiers."""
        for job in (self.pruning.flush(self._worker), self.stream.flush(self._worker, self.device.kv),
                    self.device.flush(self._worker)):
            if job is not None:
                self._jobs.append(job)
        self.lower.flush()

    def drain(self) -> None:
        """Block until no transfer is in flight (tests, benchmarks, close; never on the loop)."""
        self.flush()
        wait(self._jobs)
        self.poll()
        while True:
            self.lower.flush()
            futures = self.lower.in_flight()
            if not futures:
                return
            wait(futures)
            self.poll()

    def close(self) -> None:
        """Drain, write the disk index and release the disk directory (blocking). Closing twice
        is a no-op."""
        if self._closed:
            return
        self._closed = True
        self.drain()
        if self._waiter is not None:
            self._waiter.shutdown()
        self.lower.close()
        self.stream.close()

    async def aclose(self) -> None:
        """As close, without blocking the event loop."""
        self.flush()
        if self._jobs:
            await asyncio.wait([asyncio.wrap_future(j) for j in self._jobs])
            self.poll()
        if self._closed:
            return
        self._closed = True
        while True:
            self.lower.flush()
            futures = self.lower.in_flight()
            if not futures:
                break
            await asyncio.wait([asyncio.wrap_future(f) for f in futures])
            self.poll()
        await self.lower.aclose()
        await asyncio.get_running_loop().run_in_executor(None, self.stream.close)
        if self._waiter is not None:
            await asyncio.to_thread(self._waiter.shutdown)

    # ---- metrics and checks -------------------------------------------------------------------
    def metrics_snapshot(self) -> KVMetricsSnapshot:
        return self.metrics.snapshot((self.device.usage(), *self.lower.usage(), *self.stream.usage()))

    def check_invariants(self) -> None:
        """Accounting invariants across the manager, the pool, the device tier, pruning and the
        tiers below (tests); BlockOwnershipError or TierAccountingError naming the first broken."""
        self.pool.check_invariants()
        refs: dict[int, int] = {block_id: 1 for block_id in self.device.scratch_blocks}
        for seq_id, table in self._tables.items():
            owned(len(set(table)) == len(table), f"sequence {seq_id} holds a block twice")
            for block_id in table:
                refs[block_id] = refs.get(block_id, 0) + 1
        for block_id in range(self.pool.num_blocks):
            owned(self.pool.ref_count(block_id) == refs.get(block_id, 0), f"block {block_id} leaked or double-owned")
        for seq_id, awaited in self._awaited.items():
            for i in awaited:
                owned(self.pool.block_hash(self._tables[seq_id][i]) is None,
                      f"sequence {seq_id}: awaited hand-off block {i} is registered before its rows landed")
        self.pruning.check_invariants(self._tables)
        self.stream.check_invariants(set(self._tables))
        self.device.check_invariants(self._tables)
        self.lower.check_invariants()


def _import(device_rows: torch.Tensor, device_format, rows: torch.Tensor, fmt: BlockFormat, ops: list[CopyOp]) -> None:
    """Worker: rows uint8 [n, fmt.nbytes] (host memory, or a device segment) -> their device
    blocks (ordered before the next step: on CUDA the compute stream waits for the copy stream)."""
    result = Copier(device_rows, rows, fmt, device_format).run(ops)
    if rows.is_cuda and result.event is not None:
        # A device segment is shared with another process (CUDA IPC), where the caching
        # allocator's stream tracking does not reach: the slots may be reused once this job
        # ends, so the copy must be done by then. Once per hand-off batch, never per layer.
        result.event.synchronize()


def _export(device_rows: torch.Tensor, device_format, block_ids: list[int], fmt: BlockFormat,
            into: torch.Tensor | None, slots: list[int]) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Worker: device blocks -> (rows uint8 [n, fmt.nbytes]: `into`'s rows `slots`, or a new
    host buffer (pinned on CUDA); the CUDA event after which they are complete, None: complete
    on return)."""
    out = torch.empty((len(block_ids), fmt.nbytes), dtype=torch.uint8, pin_memory=device_rows.is_cuda) \
        if into is None else into  # [n or m, nbytes]
    result = Copier(device_rows, out, fmt, device_format).run(
        [CopyOp(Direction.TO_HOST, b, slot) for slot, b in zip(slots, block_ids)])
    if into is None:
        return out, result.event
    contiguous = slots == list(range(slots[0], slots[0] + len(slots))) if slots else True
    return (into[slots[0]:slots[0] + len(slots)] if contiguous and slots else
            into[torch.tensor(slots, device=into.device)]), result.event  # the gather: after the copies


def when_copied(job: Future, waiter: Executor | None) -> Future:
    """Future of (value, event | None) -> Future of value, complete once the event has
    completed too, `waiter` waiting for it (never the thread that ran `job`); a failure of
    either is the result's."""
    done: Future = Future()

    def wait_event(value, event) -> None:
        try:
            event.synchronize()
        except BaseException as exc:  # handed to whoever reads the future
            done.set_exception(exc)
            return
        done.set_result(value)

    def chain(job: Future) -> None:
        exc = job.exception()
        if exc is not None:
            done.set_exception(exc)
            return
        value, event = job.result()
        if event is None:
            done.set_result(value)
            return
        try:
            waiter.submit(wait_event, value, event)
        except RuntimeError as exc:  # the manager closed meanwhile
            done.set_exception(exc)

    job.add_done_callback(chain)
    return done
