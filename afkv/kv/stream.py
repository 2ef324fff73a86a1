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
and quantized formats put compressed bytes on the wire. Attention reads a layer's ring slot in
place (`StreamStep.cache`: a one-layer cache for the decode and prefill kernels, whose quantized
ones multiply the codes in registers and rotate the query and output for int8 / int4; on a CPU
the torch references dequantize it into a scratch buffer).

Streaming (`StreamRing`, `StreamStep`; model worker only): a device staging ring of ahead + 1
slots, each uint8 [num_blocks, layer_nbytes] (every store block fits one slot, so a step never
splits). Per step: the copy stream first waits for the compute stream (spills queued before
the step, the previous step's reads of the ring); layers 0 .. ahead are copied; attention of
layer l makes the compute stream wait for layer l's event, then queues the copy of layer
l + ahead into the slot layer l - 1 used, after the compute stream's work so far. No host
synchronisation anywhere (events only); on the CPU the same code copies inline. Not captured
in CUDA graphs: a step with streamed blocks runs eagerly.

Disk under the store (`[kv] stream_disk_mib / stream_disk_num_blocks`, `stream_disk_path`;
StreamDisk): store ids past the host region are block files in the disk tier's format
(afkv.kv.tiers.disk: header with the payload's crc32; reads through its FileIO, kvikio on GPUs).
The store hands out the lowest free ids, so a sequence's middle fills host memory first and the
rest goes to disk as it spills. Full attention reads every streamed block every step, so no
block is colder than another and caching disk blocks in the store would only move them: each
step instead reads each layer's sections of the disk blocks at their file offsets (the payload
is one section per layer) into a host bounce slot, on StreamDisk's one I/O thread, `ahead`
layers before use like the store's copies (a step waits only when a read is late), and checks
each block's crc32, accumulated over its sections, after the last layer. A block that fails
(flipped bytes, a bad header, a missing or short file) reads as zeros and is named in
`StreamStep.corrupt`; the runner names them in the results of the requests that own one, whose
step is not committed: the scheduler frees their device, store and disk blocks and computes their
KV again from their tokens (the rest of the step goes on; a request whose blocks keep failing
ends with RequestFailedError naming the file, afkv.engine.scheduler.MAX_STREAM_RECOMPUTES). The
device ring holds ahead + 1 layers of every store id, host and disk. A spill to disk waits for
the device once (the encoded rows to the host) and queues the file writes on the I/O thread,
ahead of every read of them. The files live in a private directory (mkdtemp) under
stream_disk_path, removed at close. A sequence larger than device + store + disk is refused at
admission with the settings named.

Limits of this first version: the store is its own pinned region (not the LRU host tier);
streamed blocks are private to their sequence (a streaming sequence stops registering prefix
blocks, like a pruned one); a preempted streaming sequence, or one that read a corrupt disk
block, recomputes all of its KV (recomputing only the bad block in place would need a prefill of
its tokens into streamed slots, not built); disk reads are one pread per block and layer on one
thread.
"""

from __future__ import annotations

import heapq
import logging
import shutil
import tempfile
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from afkv.errors import CorruptBlockError, TierError
from afkv.kv.checks import accounted, owned
from afkv.kv.formats import BlockFormat
from afkv.kv.metrics import KVMetrics, TierUsage
from afkv.kv.pinned import PinnedRegion
from afkv.kv.tiers.disk import HEADER_NBYTES, block_file_name, check_header, write_block
from afkv.kv.tiers.fileio import FileIO, default_fileio
from afkv.ops.attention import QuantizedKVCache

log = logging.getLogger("afkv.kv.stream")


@dataclass(frozen=True)
class StreamConfig:
    format: BlockFormat  # how the store holds a block (the host format)
    num_blocks: int  # store capacity
    num_sink_tokens: int  # first tokens that stay on the device
    window: int  # last cached tokens that stay on the device
    ahead: int  # layers copied ahead of the one attended
    disk_blocks: int = 0  # stream blocks past the store, in files under disk_path (StreamDisk)
    disk_path: Path | None = None

    def __post_init__(self) -> None:
        assert self.num_blocks > 0 and self.window >= 1 and self.ahead >= 1  # validated by the config
        assert self.disk_blocks >= 0 and (self.disk_path is not None or not self.disk_blocks)

    @property
    def total_blocks(self) -> int:
        """Store ids: 0 .. num_blocks - 1 in host memory, then disk_blocks on disk."""
        return self.num_blocks + self.disk_blocks

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

    def __init__(self, config: StreamConfig, device: torch.device, metrics: KVMetrics, fileio: FileIO | None = None,
                 host: torch.Tensor | None = None):
        """host: uint8 memory to lay `buf` in (its first num_layers x num_blocks x layer_nbytes
        bytes; page-locked on CUDA, owned by the caller), or None: a PinnedRegion of its own on
        CUDA (exactly its size), plain memory on a CPU."""
        fmt = config.format
        self.config, self.format, self.metrics = config, fmt, metrics
        self.device = device
        shape = (fmt.layout.num_layers, config.num_blocks, fmt.layer_nbytes)
        nbytes = shape[0] * shape[1] * shape[2]
        self._region = None
        if host is None:
            if device.type == "cuda":
                self._region = PinnedRegion(nbytes, cuda=True)
                host = self._region.tensor
            else:
                host = torch.empty(nbytes, dtype=torch.uint8)
        accounted(host.dtype == torch.uint8 and host.is_contiguous() and host.numel() >= nbytes,
                  f"a stream store of {nbytes} bytes laid in a region of {host.numel()}")
        self.buf = host[:nbytes].view(shape)  # [L, num_blocks, lnb]
        self.disk = StreamDisk(config, fileio or default_fileio()) if config.disk_blocks else None
        self._free: list[int] = list(range(config.total_blocks))  # the host ids first
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
        self.metrics.counters["stream_disk_spills"] += sum(1 for i in store_ids if i >= self.config.num_blocks)
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
        the steps; on CUDA the copies into pinned memory are asynchronous). Blocks with disk
        ids are copied to the host (on CUDA a wait for the device, once per spilled block) and
        their files written by StreamDisk's I/O thread, ahead of every read of them."""
        fmt, cuda = self.format, kv.is_cuda
        with torch.inference_mode():
            ids = torch.tensor([b for b, _ in spills], dtype=torch.int64, device=kv.device)  # [n]
            rows = fmt.encode(kv.index_select(0, ids))  # [n, nbytes]
            host = [(i, s) for i, (_, s) in enumerate(spills) if s < self.config.num_blocks]
            if host:
                at = torch.tensor([i for i, _ in host], dtype=torch.int64, device=kv.device)
                layers = rows.index_select(0, at).view(len(host), fmt.layout.num_layers, fmt.layer_nbytes)
                layers = layers.transpose(0, 1).contiguous()  # [L, h, lnb]
                for start, first, count in runs([s for _, s in host]):
                    for layer in range(fmt.layout.num_layers):
                        self.buf[layer, first : first + count].copy_(layers[layer, start : start + count], non_blocking=cuda)
            disk = [(i, s) for i, (_, s) in enumerate(spills) if s >= self.config.num_blocks]
            if disk:
                at = torch.tensor([i for i, _ in disk], dtype=torch.int64, device=kv.device)
                self.disk.write([s for _, s in disk], rows.index_select(0, at).cpu())  # [d, nbytes]

    def usage(self) -> tuple[TierUsage, ...]:
        cfg = self.config
        free_host = sum(1 for i in self._free if i < cfg.num_blocks)
        usage = (TierUsage("stream", self.format.name, cfg.num_blocks - free_host, cfg.num_blocks, self.format.nbytes),)
        if self.disk is None:
            return usage
        return (*usage, TierUsage("stream_disk", self.format.name, cfg.disk_blocks - (len(self._free) - free_host),
                                  cfg.disk_blocks, self.format.nbytes))

    def close(self) -> None:
        """Wait for the disk I/O and remove the disk directory; unlock its own host region once
        the device is idle (blocking; twice is a no-op)."""
        if self.disk is not None:
            self.disk.close()
        if self._region is not None:
            torch.cuda.synchronize(self.device)  # no copy from buf in flight
            self._region.close()

    def check_invariants(self, seq_ids: set[int]) -> None:
        held = [i for ids in self._ids.values() for i in ids]
        accounted(len(set(held)) == len(held) and not set(held) & set(self._free), "a stream store block has two owners")
        accounted(len(held) + len(self._free) == self.config.total_blocks, "a stream store block leaked")
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

    def close(self) -> None:
        pass

    def check_invariants(self, seq_ids: set[int]) -> None:
        pass


def runs(ids: Sequence[int], at: Sequence[int] | None = None) -> list[tuple[int, int, int]]:
    """ids -> (position of the run's first id, first id, count) of each run of consecutive ids
    at consecutive positions (`at`: the ids' positions; default 0, 1, 2, ...)."""
    out: list[tuple[int, int, int]] = []
    for i, x in enumerate(ids):
        pos = i if at is None else at[i]
        if out and out[-1][1] + out[-1][2] == x and out[-1][0] + out[-1][2] == pos:
            start, first, count = out[-1]
            out[-1] = (start, first, count + 1)
        else:
            out.append((pos, x, 1))
    return out


@dataclass
class DiskRead:
    """One step's reads of disk stream blocks (StreamDisk's I/O thread): the crc32 of each
    block's sections read so far, and the blocks found bad -> why (their sections zeroed)."""

    crcs: dict[int, int] = field(default_factory=dict)
    bad: dict[int, str] = field(default_factory=dict)


class StreamDisk:
    """Stream blocks past the store's host region: store ids num_blocks .. total_blocks - 1,
    one block file each in the disk tier's format (afkv.kv.tiers.disk: a header with the
    payload's crc32; the block hash is the store id), the payload a row of the host format:
    one section per layer. Every step reads each layer's sections at their offsets, `ahead`
    layers before use like the store's copies, and checks the accumulated crc32 after the last.

    Owner: one I/O thread does every write and read, in submission order (a block's write,
    submitted with its spill, precedes every read of it), and owns `_crcs` (store id -> the
    crc32 its file was written with). The directory is a private one (mkdtemp, 0700) under
    disk_path, removed at close: the files are scratch, never reused by another engine."""

    def __init__(self, config: StreamConfig, fileio: FileIO):
        """TierError naming the settings when the directory cannot be made or its file system
        has no room for disk_blocks files."""
        assert config.disk_path is not None  # config.disk_blocks > 0
        fmt = config.format
        try:
            config.disk_path.mkdir(mode=0o700, parents=True, exist_ok=True)
            free = shutil.disk_usage(config.disk_path).free
        except OSError as exc:
            raise TierError(f"stream disk {config.disk_path}: {exc}; set kv.stream_disk_path") from exc
        need = config.disk_blocks * (HEADER_NBYTES + fmt.nbytes)
        if need > free:
            raise TierError(f"stream disk {config.disk_path}: {config.disk_blocks} blocks need {need} bytes but its file "
                            f"system has {free} free; lower kv.stream_disk_mib / kv.stream_disk_num_blocks")
        self.path = Path(tempfile.mkdtemp(prefix="afkv-stream-", dir=config.disk_path))
        self.format, self.fileio = fmt, fileio
        self.io = ThreadPoolExecutor(1, thread_name_prefix="afkv-stream-io")
        self._crcs: dict[int, int] = {}
        self._closed = False

    @staticmethod
    def block_hash(store_id: int) -> bytes:
        return store_id.to_bytes(16, "big")

    def file(self, store_id: int) -> Path:
        return self.path / block_file_name(self.block_hash(store_id))

    def write(self, store_ids: list[int], rows: torch.Tensor) -> Future:
        """Queue the files of store_ids from host rows uint8 [n, nbytes]."""
        return self.io.submit(self._write, store_ids, rows)

    def _write(self, store_ids: list[int], rows: torch.Tensor) -> None:
        for sid, row in zip(store_ids, rows.numpy()):
            self._crcs.pop(sid, None)
            try:
                self._crcs[sid] = write_block(self.path, self.format.digest, self.block_hash(sid), row, self.fileio)
            except OSError as exc:  # its reads find no checksum: its sequence recomputes
                log.error("stream block %d: cannot write %s: %s", sid, self.file(sid), exc)

    def read(self, layer: int, store_ids: list[int], out: np.ndarray, state: DiskRead,
             before: torch.cuda.Event | None = None) -> Future:
        """Queue the read of `layer`'s sections of store_ids into out uint8 [n, lnb] (after
        `before`: the last copy out of `out`); the last layer checks each block's crc32."""
        return self.io.submit(self._read, layer, store_ids, out, state, before)

    def _read(self, layer: int, store_ids: list[int], out: np.ndarray, state: DiskRead,
              before: torch.cuda.Event | None) -> None:
        if before is not None:
            before.synchronize()  # this I/O thread waits, never the compute stream
        fmt, lnb = self.format, self.format.layer_nbytes
        last = layer == fmt.layout.num_layers - 1
        for i, sid in enumerate(store_ids):
            if sid in state.bad:
                out[i] = 0
                continue
            name = self.file(sid)
            try:
                if layer == 0:
                    if sid not in self._crcs:
                        raise CorruptBlockError(f"{name}: was not written")
                    check_header(self.path, fmt.digest, self.block_hash(sid), self._crcs[sid], fmt.nbytes)
                    state.crcs[sid] = 0
                got = self.fileio.read_into(name, HEADER_NBYTES + layer * lnb, out[i])
                if got != lnb:
                    raise CorruptBlockError(f"{name}: truncated ({got} of {lnb} bytes of layer {layer} read)")
                state.crcs[sid] = zlib.crc32(out[i], state.crcs[sid])
                if last and state.crcs[sid] != self._crcs[sid]:
                    raise CorruptBlockError(f"{name}: checksum mismatch")
            except (CorruptBlockError, OSError) as exc:
                state.bad[sid] = str(exc)
                out[i] = 0

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.io.shutdown(wait=True)
        shutil.rmtree(self.path, ignore_errors=True)


class StreamRing:
    """The device side of streaming (model worker only): the staging ring uint8 [ahead + 1,
    store blocks (host and disk), layer_nbytes] and, on CUDA, the copy stream and one event per
    slot; with a disk, host bounce slots uint8 [ahead + 1, disk blocks, layer_nbytes] (pinned on
    CUDA) that StreamDisk reads into, each with an event of its last copy to the device. `begin`
    starts a step's stream over the given store ids."""

    def __init__(self, store: StreamStore, device: torch.device):
        cfg = store.config
        self.store, self.format, self.ahead = store, store.format, cfg.ahead
        self.num_layers = self.format.layout.num_layers
        self.staging = torch.empty((cfg.ahead + 1, cfg.total_blocks, self.format.layer_nbytes), dtype=torch.uint8,
                                   device=device)
        self.copy_stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        self.events = [torch.cuda.Event() for _ in range(cfg.ahead + 1)] if self.copy_stream is not None else []
        self.bounce = None
        if store.disk is not None:
            self.bounce = torch.empty((cfg.ahead + 1, cfg.disk_blocks, self.format.layer_nbytes), dtype=torch.uint8,
                                      pin_memory=device.type == "cuda")
        self.bounce_events = ([torch.cuda.Event() for _ in range(cfg.ahead + 1)]
                              if self.copy_stream is not None and self.bounce is not None else [])
        self.bounce_used = [False] * (cfg.ahead + 1)  # a bounce slot's event was recorded

    def begin(self, store_ids: Sequence[int]) -> StreamStep:
        """A step's stream of the blocks store_ids (each sequence's, concatenated: staging
        index i holds store_ids[i])."""
        accounted(len(store_ids) <= self.staging.shape[1], f"{len(store_ids)} streamed blocks in a step of a ring of "
                  f"{self.staging.shape[1]}")
        return StreamStep(self, store_ids)


class StreamStep:
    """One step's layer-by-layer stream (model worker only). `layer(l)` must be called for
    l = 0, 1, ... in order (repeated calls for the same layer, one per micro-batch, are free).
    Disk blocks found bad (`corrupt`: store id -> why) are zeros in attention: the runner names
    them in the results of the requests that own them, which compute their KV again."""

    def __init__(self, ring: StreamRing, store_ids: Sequence[int]):
        first_disk = ring.store.config.num_blocks
        host = [(i, s) for i, s in enumerate(store_ids) if s < first_disk]
        self.ring, self.num_blocks = ring, len(store_ids)
        self.runs = runs([s for _, s in host], [i for i, _ in host])  # (staging index, store id, count)
        disk = [i for i, s in enumerate(store_ids) if s >= first_disk]
        self.disk_ids = [store_ids[i] for i in disk]
        self.disk_runs = runs(disk)  # (bounce index, staging index, count)
        self._disk = DiskRead()
        self._reads: dict[int, Future] = {}  # layer -> its disk read in flight
        self._layer = -1

    @property
    def corrupt(self) -> dict[int, str]:
        """Disk blocks of this step that failed their checks (final once the last layer was read)."""
        return self._disk.bad

    def _issue(self, layer: int) -> None:
        """Queue the copies of `layer`'s host sections into its ring slot (on CUDA after
        everything the compute stream was given so far: the slot's previous reader among it),
        and the read of its disk sections into its bounce slot."""
        ring = self.ring
        k = layer % (ring.ahead + 1)
        slot = ring.staging[k]  # [num_blocks, lnb]
        if self.disk_ids:
            before = ring.bounce_events[k] if ring.bounce_events and ring.bounce_used[k] else None
            out = ring.bounce[k, : len(self.disk_ids)].numpy()  # [d, lnb]
            self._reads[layer] = ring.store.disk.read(layer, self.disk_ids, out, self._disk, before)
        src = ring.store.buf[layer]  # [store blocks, lnb]
        if ring.copy_stream is None:
            for start, first, count in self.runs:
                slot[start : start + count].copy_(src[first : first + count])
            return
        ring.copy_stream.wait_stream(torch.cuda.current_stream(slot.device))
        with torch.cuda.stream(ring.copy_stream):
            for start, first, count in self.runs:
                slot[start : start + count].copy_(src[first : first + count], non_blocking=True)
        ring.events[k].record(ring.copy_stream)

    def _land(self, layer: int) -> None:
        """Wait for `layer`'s disk read (a wait here means the read was late) and queue the
        copy of its bounce slot into the ring slot."""
        ring = self.ring
        k = layer % (ring.ahead + 1)
        self._reads.pop(layer).result()
        slot, bounce = ring.staging[k], ring.bounce[k]
        if ring.copy_stream is None:
            for start, at, count in self.disk_runs:
                slot[at : at + count].copy_(bounce[start : start + count])
            return
        with torch.cuda.stream(ring.copy_stream):
            for start, at, count in self.disk_runs:
                slot[at : at + count].copy_(bounce[start : start + count], non_blocking=True)
        ring.events[k].record(ring.copy_stream)
        ring.bounce_events[k].record(ring.copy_stream)
        ring.bounce_used[k] = True

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
            if self.disk_ids:
                self._land(layer)
            self._layer = layer
        if ring.copy_stream is not None:
            torch.cuda.current_stream(ring.staging.device).wait_event(ring.events[layer % (ring.ahead + 1)])
        return ring.staging[layer % (ring.ahead + 1), : self.num_blocks]

    @property
    def block_size(self) -> int:
        return self.ring.format.layout.block_size

    def cache(self, layer: int) -> torch.Tensor | QuantizedKVCache:
        """The streamed blocks of `layer` as a one-layer attention cache that the attention kernels
        read in place (staging index i is block i): the model dtype's [num_blocks, 1, 2, bs, Hkv,
        D], or quantized one-layer rows (BlockFormat.layer_cache). Ready on the compute stream."""
        return self.ring.format.layer_cache(self.layer(layer))
