"""Contexts larger than the device: the middle of a long sequence lives in host memory and
attention streams it to the device layer by layer (FlexGen / ShadowKV's idea, on paged blocks).

Placement (`StreamConfig`, `[kv] stream_*`): a sequence keeps on the device its first
ceil(stream_sink_tokens / block_size) blocks (attention sinks) and the blocks holding its last
`stream_window` cached tokens; every full block strictly between them moves to the *stream
store* before the table grows (`StreamStore.place`, called where pruning is: a long prompt's
chunked prefill spills as it goes, so a prompt longer than the device tier is prefilled at all).
The device table then reads like a StreamingLLM-pruned one: the streamed tokens are counted
in the manager's `num_dropped` (token p sits in device slot p - num_dropped) and keys keep the
rotation of their true position, so attention needs no positions, only two parts:

    device part    the sinks + the recent blocks: paged attention, causal by slot
    streamed part  every streamed block precedes every query: no mask at all
    output         the two merged by log-sum-exp (afkv.ops.attention.merge_partials)

Host layout (the store): uint8 [num_layers, num_blocks, layer_nbytes], *layer-major*, in the
host format (`[kv] spill_format`: none, fp8, int8, int4; afkv.kv.formats: a row is one section
per layer). One layer of many blocks is then one contiguous run of pinned memory per run of
consecutive store ids (the store hands out the lowest free ids, so a sequence spilled chunk by
chunk gets long runs): a plain `copy_(non_blocking=True)` at the link's rate, no gather kernel,
and quantized formats put compressed bytes on the wire. A decode row reads a layer's ring slot
in place (`StreamStep.cache`: a one-layer cache for the decode kernels, whose quantized one
multiplies the codes in registers); a prefill chunk takes `StreamStep.blocks`, the sections
decoded (int8 / int4 vectors left Hadamard-rotated: attention rotates the query and its output
once instead of every key and value).

Streaming (`StreamRing`, `StreamStep`; model worker only): a device staging ring of ahead + 1
slots, each uint8 [num_blocks, layer_nbytes] (every store block fits one slot, so a step never
splits). Per step: the copy stream first waits for the compute stream (spills queued before
the step, the previous step's reads of the ring); layers 0 .. ahead are copied; attention of
layer l makes the compute stream wait for layer l's event, then queues the copy of layer
l + ahead into the slot layer l - 1 used, after the compute stream's work so far. No host
synchronisation anywhere (events only); on the CPU the same code copies inline. Not captured
in CUDA graphs: a step with streamed blocks runs eagerly.

Limits of this first version: the store is its own pinned region (not the LRU host tier, and
not backed by disk: a sequence larger than device + store is refused at admission with the
settings named); streamed blocks are private to their sequence (a streaming sequence stops
registering prefix blocks, like a pruned one); a preempted streaming sequence recomputes.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import torch

from afkv.kv.checks import accounted, owned
from afkv.kv.formats import BlockFormat
from afkv.kv.metrics import KVMetrics, TierUsage
from afkv.ops.attention import QuantizedKVCache


@dataclass(frozen=True)
class StreamConfig:
    format: BlockFormat  # how the store holds a block (the host format)
    num_blocks: int  # store capacity
    num_sink_tokens: int  # first tokens that stay on the device
    window: int  # last cached tokens that stay on the device
    ahead: int  # layers copied ahead of the one attended

    def __post_init__(self) -> None:
        assert self.num_blocks > 0 and self.window >= 1 and self.ahead >= 1  # validated by the config

    def spill_range(self, num_slots: int) -> range:
        """Device-table indexes of the blocks to stream for a sequence with num_slots device
        slots: the full blocks after the sink blocks that hold no token of the window."""
        bs = self.format.layout.block_size
        first = -(-self.num_sink_tokens // bs)
        end = max(0, num_slots - self.window) // bs
        return range(first, max(first, end))


class StreamStore:
    """The host blocks of streaming sequences. Owner of these fields (loop thread only):

    _free     free store ids (a heap: the lowest first, so spills form long runs)
    _ids      sequence id -> its streamed store ids, in token order (the middle of its context)
    _spills   (device block id, store id) copies queued for the next flush

    `buf` uint8 [num_layers, num_blocks, layer_nbytes] (pinned on CUDA) is written by the
    model worker: spills on the compute stream, before the step that made them; read by the
    copy stream of StreamRing, which waits for the compute stream first."""

    def __init__(self, config: StreamConfig, device: torch.device, metrics: KVMetrics):
        fmt = config.format
        self.config, self.format, self.metrics = config, fmt, metrics
        self.buf = torch.empty((fmt.layout.num_layers, config.num_blocks, fmt.layer_nbytes), dtype=torch.uint8,
                               pin_memory=device.type == "cuda")
        self._free: list[int] = list(range(config.num_blocks))
        self._ids: dict[int, list[int]] = {}
        self._spills: list[tuple[int, int]] = []

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def has(self, seq_id: int) -> bool:
        return seq_id in self._ids

    def ids(self, seq_id: int) -> list[int]:
        """The sequence's streamed store ids, in token order (empty when none)."""
        return self._ids.get(seq_id, [])

    def num_tokens(self, seq_id: int) -> int:
        return len(self._ids.get(seq_id, ())) * self.format.layout.block_size

    def place(self, seq_id: int, table: list[int], num_slots: int, release: Callable[[Sequence[int]], None]) -> int:
        """Move the blocks of the sequence's middle (StreamConfig.spill_range of its num_slots
        device slots) to the store: queue their copies, hand the device blocks to `release`, cut
        them from `table`. As many as the store has room for. -> tokens moved."""
        span = self.config.spill_range(num_slots)
        owned(num_slots <= len(table) * self.format.layout.block_size,
              f"sequence {seq_id}: {num_slots} device slots but {len(table)} blocks")
        if not span:
            return 0
        n = min(len(span), len(self._free))
        if n < len(span):
            self.metrics.counters["stream_store_full"] += 1  # the rest stays on the device
        if n == 0:
            return 0
        block_ids = table[span.start : span.start + n]
        store_ids = [heapq.heappop(self._free) for _ in range(n)]
        self._spills.extend(zip(block_ids, store_ids))
        self._ids.setdefault(seq_id, []).extend(store_ids)
        release(block_ids)
        del table[span.start : span.start + n]
        self.metrics.counters["stream_spills"] += n
        self.metrics.counters["bytes_device_to_stream"] += n * self.format.nbytes
        return n * self.format.layout.block_size

    def forget(self, seq_id: int) -> None:
        """A sequence is freed: its store ids are free again (a spill still queued for one is
        dropped: nobody reads it)."""
        ids = self._ids.pop(seq_id, None)
        if not ids:
            return
        gone = set(ids)
        self._spills = [s for s in self._spills if s[1] not in gone]
        for i in ids:
            heapq.heappush(self._free, i)

    def flush(self, worker: Executor, kv: torch.Tensor) -> Future | None:
        """Submit the queued spills (one worker job, before the tier copies of this pass: a
        device block released by a spill may be refilled by them)."""
        if not self._spills:
            return None
        spills, self._spills = self._spills, []
        return worker.submit(self._run_spills, kv, spills)

    def _run_spills(self, kv: torch.Tensor, spills: list[tuple[int, int]]) -> None:
        """Worker: device blocks -> their store sections, on the compute stream (ordered with
        the steps; on CUDA the copies into pinned memory are asynchronous)."""
        fmt, cuda = self.format, kv.is_cuda
        with torch.inference_mode():
            ids = torch.tensor([b for b, _ in spills], dtype=torch.int64, device=kv.device)  # [n]
            rows = fmt.encode(kv.index_select(0, ids))  # [n, nbytes]
            layers = rows.view(len(spills), fmt.layout.num_layers, fmt.layer_nbytes).transpose(0, 1).contiguous()  # [L, n, lnb]
            for start, first, count in runs([s for _, s in spills]):
                for layer in range(fmt.layout.num_layers):
                    self.buf[layer, first : first + count].copy_(layers[layer, start : start + count], non_blocking=cuda)

    def usage(self) -> tuple[TierUsage, ...]:
        return (TierUsage("stream", self.format.name, self.config.num_blocks - len(self._free), self.config.num_blocks,
                          self.format.nbytes),)

    def check_invariants(self, seq_ids: set[int]) -> None:
        held = [i for ids in self._ids.values() for i in ids]
        accounted(len(set(held)) == len(held) and not set(held) & set(self._free), "a stream store block has two owners")
        accounted(len(held) + len(self._free) == self.config.num_blocks, "a stream store block leaked")
        owned(set(self._ids) <= seq_ids, "stream store blocks of a freed sequence")


class NoStream:
    """Streaming off: no sequence has blocks on the host side of attention."""

    config = None
    num_free_blocks = 0

    def has(self, seq_id: int) -> bool:
        return False

    def ids(self, seq_id: int) -> list[int]:
        return []

    def num_tokens(self, seq_id: int) -> int:
        return 0

    def place(self, seq_id: int, table: list[int], num_slots: int, release: Callable[[Sequence[int]], None]) -> int:
        return 0

    def forget(self, seq_id: int) -> None:
        pass

    def flush(self, worker: Executor, kv: torch.Tensor) -> Future | None:
        return None

    def usage(self) -> tuple[TierUsage, ...]:
        return ()

    def check_invariants(self, seq_ids: set[int]) -> None:
        pass


def runs(ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """ids -> (index in ids, first id, count) of each run of consecutive ids."""
    out: list[tuple[int, int, int]] = []
    for i, x in enumerate(ids):
        if out and out[-1][1] + out[-1][2] == x:
            start, first, count = out[-1]
            out[-1] = (start, first, count + 1)
        else:
            out.append((i, x, 1))
    return out


class StreamRing:
    """The device side of streaming (model worker only): the staging ring uint8 [ahead + 1,
    store blocks, layer_nbytes] and, on CUDA, the copy stream and one event per slot. `begin`
    starts a step's stream over the given store ids."""

    def __init__(self, store: StreamStore, device: torch.device):
        cfg = store.config
        self.store, self.format, self.ahead = store, store.format, cfg.ahead
        self.num_layers = self.format.layout.num_layers
        self.staging = torch.empty((cfg.ahead + 1, cfg.num_blocks, self.format.layer_nbytes), dtype=torch.uint8,
                                   device=device)
        self.copy_stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        self.events = [torch.cuda.Event() for _ in range(cfg.ahead + 1)] if self.copy_stream is not None else []

    def begin(self, store_ids: Sequence[int]) -> StreamStep:
        """A step's stream of the blocks store_ids (each sequence's, concatenated: staging
        index i holds store_ids[i])."""
        accounted(len(store_ids) <= self.staging.shape[1], f"{len(store_ids)} streamed blocks in a step of a ring of "
                  f"{self.staging.shape[1]}")
        return StreamStep(self, runs(store_ids), len(store_ids))


class StreamStep:
    """One step's layer-by-layer stream (model worker only). `layer(l)` must be called for
    l = 0, 1, ... in order (repeated calls for the same layer, one per micro-batch, are free)."""

    def __init__(self, ring: StreamRing, store_runs: list[tuple[int, int, int]], num_blocks: int):
        self.ring, self.runs, self.num_blocks = ring, store_runs, num_blocks
        self._layer = -1

    def _issue(self, layer: int) -> None:
        """Queue the copies of `layer`'s sections into its ring slot (on CUDA after everything
        the compute stream was given so far: the slot's previous reader among it)."""
        ring = self.ring
        slot = ring.staging[layer % (ring.ahead + 1)]  # [num_blocks, lnb]
        src = ring.store.buf[layer]  # [store blocks, lnb]
        if ring.copy_stream is None:
            for start, first, count in self.runs:
                slot[start : start + count].copy_(src[first : first + count])
            return
        ring.copy_stream.wait_stream(torch.cuda.current_stream(slot.device))
        with torch.cuda.stream(ring.copy_stream):
            for start, first, count in self.runs:
                slot[start : start + count].copy_(src[first : first + count], non_blocking=True)
        ring.events[layer % (ring.ahead + 1)].record(ring.copy_stream)

    def layer(self, layer: int) -> torch.Tensor:
        """The sections of `layer` uint8 [num_blocks, layer_nbytes], ready on the compute stream."""
        ring = self.ring
        if layer != self._layer:
            accounted(layer == self._layer + 1, f"streamed layer {layer} asked after layer {self._layer}")
            if self._layer < 0:
                for j in range(min(ring.ahead, ring.num_layers)):
                    self._issue(j)
            if layer + ring.ahead < ring.num_layers:
                self._issue(layer + ring.ahead)  # into the slot of layer - 1
            self._layer = layer
        if ring.copy_stream is not None:
            torch.cuda.current_stream(ring.staging.device).wait_event(ring.events[layer % (ring.ahead + 1)])
        return ring.staging[layer % (ring.ahead + 1), : self.num_blocks]

    @property
    def block_size(self) -> int:
        return self.ring.format.layout.block_size

    def cache(self, layer: int) -> torch.Tensor | QuantizedKVCache:
        """The streamed blocks of `layer` as a one-layer attention cache that the decode kernels
        read in place (staging index i is block i): the model dtype's [num_blocks, 1, 2, bs, Hkv,
        D], or quantized one-layer rows (BlockFormat.layer_cache). Ready on the compute stream."""
        return self.ring.format.layer_cache(self.layer(layer))

    @property
    def rotated(self) -> bool:
        """Whether `blocks` hands out Hadamard-rotated vectors (int8 / int4 host blocks)."""
        return self.ring.format.rotated

    def blocks(self, layer: int, start: int, count: int) -> torch.Tensor:
        """Streamed blocks start .. start + count of `layer`, decoded: [count, 2, bs, Hkv, D]
        (`rotated`: float32 vectors x @ H, the rotation left to attention)."""
        return self.ring.format.decode_layer(self.layer(layer)[start : start + count], unrotate=False)
