"""TierStack: the host and disk tiers below the device pool, and every move between tiers.

    device pool --demote--> host --spill (write-through)--> disk
    device pool <-promote-- host <-------fetch------------- disk

- demote: a cached device block (ref count 0, hashed) whose slot the pool reuses is copied
  to host memory first, in the tier format (quantized on the way down when the format is
  int8/int4; a quantized device block whose format equals the tier's moves as its bytes).
  A full host tier evicts its least recently used entry; with a disk tier,
  every block entering host memory is also written to disk, so evicting it from host loses
  nothing. The disk tier, the last one, deletes its least recently used files.
- promote: host -> device copy into a freshly allocated device block (dequantized).
- fetch: disk -> host read; the manager promotes the block once it is verified.

Copies between device and host run in batches on the model worker (see copier.py), in
order with the model's steps. File I/O runs on a small thread pool; jobs of one block hash
run in submission order, and a job touching a host slot first waits for the copy batch
that last touched it (the slot's fence). The loop thread submits everything at `flush`
(the end of a scheduling pass) and collects results at `poll` (the start of the next), so
every field here is touched by the loop thread only, and no call blocks the event loop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from enum import Enum

import torch

from afkv.errors import CorruptBlockError, KVError
from afkv.kv.block_pool import BlockHash
from afkv.kv.checks import accounted
from afkv.kv.formats import QuantFormat
from afkv.kv.metrics import KVMetrics, TierUsage
from afkv.kv.tiers.config import TierConfig
from afkv.kv.tiers.copier import Copier, CopyOp, Direction, Fence
from afkv.kv.tiers.disk import DiskTier, delete_block, index_error, read_block, write_block, write_index
from afkv.kv.tiers.fileio import default_fileio
from afkv.kv.tiers.host import HostTier

log = logging.getLogger("afkv.kv.tiers")

INDEX_SAVE_INTERVAL_S = 1.0


class Where(Enum):
    HOST = "host"  # readable in host memory: promote now
    FETCHING = "fetching"  # being read from disk into host memory
    DISK = "disk"  # on disk only: fetch first


class _IOKind(Enum):
    WRITE = "write"  # host slot -> file
    READ = "read"  # file -> host slot
    DELETE = "delete"
    INDEX = "index"


@dataclass(eq=False)
class _IOJob:
    kind: _IOKind
    block_hash: BlockHash | None  # None for INDEX
    slot: int | None = None  # host slot of WRITE / READ
    data: bytes = b""  # INDEX: the index file's bytes
    future: Future | None = None  # set when submitted


class TierStack:
    """Owner of `host`, `disk` and these fields (loop thread only):

    _ops         copies queued for the next batch (flush submits them as one worker job)
    _queued      I/O jobs queued until flush (so they can wait for the batch of their slot)
    _batches     submitted copy batches not yet polled
    _inflight    submitted I/O jobs not yet polled
    _tails       hash -> the last submitted I/O future of that hash
    _fetches     hash -> start time of its disk read
    _index_job   the index save in flight, if any
    """

    def __init__(self, config: TierConfig, kv: torch.Tensor, worker: Executor, metrics: KVMetrics,
                 wakeup: Callable[[], None] | None = None, device_format: QuantFormat | None = None):
        """kv: the device tier, as the Copier takes it (the cache, or quantized rows of
        `device_format`)."""
        self.config = config
        self.metrics = metrics
        self.host = HostTier(config.format, config.host_num_blocks, config.eviction, pin_memory=kv.is_cuda)
        self.disk: DiskTier | None = None
        self._io: ThreadPoolExecutor | None = None
        if config.disk_path is not None:
            self.disk = DiskTier.open(config.disk_path, config.format, config.disk_num_blocks, config.eviction,
                                      config.disk_capacity_key)
            self._io = ThreadPoolExecutor(config.io_threads, thread_name_prefix="afkv-kv-io")
        self._fileio = default_fileio()
        self._copier = Copier(kv, self.host.buf, config.format, device_format)
        self._worker = worker
        self._wakeup = wakeup
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ops: list[CopyOp] = []
        self._queued: list[_IOJob] = []
        self._batches: list[Fence] = []
        self._inflight: list[_IOJob] = []
        self._tails: dict[BlockHash, Future] = {}
        self._fetches: dict[BlockHash, float] = {}
        self._index_job: _IOJob | None = None
        self._index_saved_s = time.monotonic()
        self._logged_errnos: set[int | None] = set()

    # ---- questions ------------------------------------------------------------------------
    def locate(self, block_hash: BlockHash) -> Where | None:
        if self.host.lookup(block_hash) is not None:
            return Where.HOST
        if self.host.is_loading(block_hash):
            return Where.FETCHING
        if self.disk is not None and self.disk.lookup(block_hash) is not None:
            return Where.DISK
        return None

    def usage(self) -> tuple[TierUsage, ...]:
        fmt = self.config.format
        out = [TierUsage("host", fmt.name, self.host.num_used, self.host.num_blocks, fmt.nbytes)]
        if self.disk is not None:
            out.append(TierUsage("disk", fmt.name, self.disk.num_used, self.disk.num_blocks, self.disk.file_nbytes))
        return tuple(out)

    def in_flight(self) -> list[Future]:
        return [f.future for f in self._batches] + [j.future for j in self._inflight]

    # ---- moves (queued; flush submits them) -------------------------------------------------
    def demote(self, block_id: int, block_hash: BlockHash) -> None:
        """The device pool is about to reuse `block_id`, which holds `block_hash`: keep a copy
        below. Called from inside the pool's allocate, before anything overwrites the block."""
        host, counters = self.host, self.metrics.counters
        if block_hash in host:
            if host.lookup(block_hash) is not None:
                host.touch(block_hash)
            return
        reserved = host.reserve(block_hash, loading=False)
        if reserved is None:  # every host entry is busy with I/O: the block is lost
            counters["dropped"] += 1
            return
        slot, evicted = reserved
        self._count_host_eviction(evicted)
        self._ops.append(CopyOp(Direction.TO_HOST, block_id, slot))
        counters["demotions"] += 1
        counters["bytes_device_to_host"] += self.config.format.nbytes
        if self.disk is not None and block_hash not in self.disk:
            self._spill(block_hash, slot)

    def promote(self, block_hash: BlockHash, block_id: int) -> None:
        """Copy a readable host entry into device block `block_id` (before the next step)."""
        slot = self.host.lookup(block_hash)
        accounted(slot is not None, f"promoting {block_hash.hex()}, which is not readable in host memory")
        self.host.touch(block_hash)
        self._ops.append(CopyOp(Direction.TO_DEVICE, block_id, slot))
        self.metrics.counters["promotions"] += 1
        self.metrics.counters["bytes_host_to_device"] += self.config.format.nbytes

    def fetch(self, block_hash: BlockHash, *, ahead: bool = False) -> bool:
        """Start reading a disk block into host memory (no-op if already under way). False when
        no host slot is free of I/O, or (ahead: a prefetch) when half the host tier is already
        being fetched into."""
        if self.host.is_loading(block_hash):
            return True
        accounted(self.disk is not None and self.disk.lookup(block_hash) is not None,
                  f"fetching {block_hash.hex()}, which is not on disk")
        if ahead and len(self._fetches) >= max(1, self.host.num_blocks // 2):
            return False
        reserved = self.host.reserve(block_hash, loading=True)
        if reserved is None:
            return False
        slot, evicted = reserved
        self._count_host_eviction(evicted)
        self.disk.pin(block_hash)
        self._fetches[block_hash] = time.perf_counter()
        self._queued.append(_IOJob(_IOKind.READ, block_hash, slot))
        if ahead:
            self.metrics.counters["prefetches"] += 1
        return True

    def _spill(self, block_hash: BlockHash, slot: int) -> None:
        victims = self.disk.reserve(block_hash)
        if victims is None:
            self.metrics.counters["spills_skipped"] += 1
            return
        self.metrics.counters["disk_evictions"] += len(victims)
        for victim in victims:
            self._queued.append(_IOJob(_IOKind.DELETE, victim))
        self.host.pin(block_hash)
        self._queued.append(_IOJob(_IOKind.WRITE, block_hash, slot))

    def _count_host_eviction(self, evicted: BlockHash | None) -> None:
        if evicted is None:
            return
        if self.disk is not None and self.disk.lookup(evicted) is not None:
            self.metrics.counters["host_evictions"] += 1
        else:
            self.metrics.counters["dropped"] += 1

    # ---- submit / collect -----------------------------------------------------------------
    def flush(self) -> None:
        """Submit the queued copies (one worker batch) and I/O jobs. Call at the end of every
        scheduling pass, before the step it planned is submitted."""
        if self._ops:
            fence = Fence(self._worker.submit(self._copier.run, self._ops))
            for op in self._ops:
                self.host.set_fence(op.slot, fence)
            self._batches.append(fence)
            self._ops = []
        if self.disk is None:
            return
        if self.disk.index_dirty and self._index_job is None and time.monotonic() - self._index_saved_s >= INDEX_SAVE_INTERVAL_S:
            self._index_job = _IOJob(_IOKind.INDEX, None, data=self.disk.index_bytes())
            self._index_saved_s = time.monotonic()
            self._queued.append(self._index_job)
        if self._queued:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop (tests, benchmarks): the caller polls or drains
                self._loop = None
            for job in self._queued:
                self._submit(job)
            self._queued = []

    def _submit(self, job: _IOJob) -> None:
        disk, h = self.disk, job.block_hash
        path, digest = disk.path, self.config.format.digest
        fence = None if job.slot is None else self.host.fence(job.slot)
        prev = None if h is None else self._tails.get(h)
        if job.kind is _IOKind.WRITE:
            call = (write_block, path, digest, h, self.host.buf[job.slot].numpy(), self._fileio)
        elif job.kind is _IOKind.READ:
            call = (read_block, path, digest, h, disk.lookup(h), self.host.buf[job.slot].numpy(), self._fileio)
        elif job.kind is _IOKind.DELETE:
            call = (delete_block, path, h)
        else:
            call = (write_index, path, job.data)
        job.future = self._io.submit(_run_io, prev, fence, *call)
        job.future.add_done_callback(self._notify)
        if h is not None:
            self._tails[h] = job.future
        self._inflight.append(job)

    def _notify(self, _future: Future) -> None:
        """(any thread) An I/O job ended: wake the engine's step loop so it polls."""
        loop, wakeup = self._loop, self._wakeup
        if loop is None or wakeup is None:
            return
        try:
            loop.call_soon_threadsafe(wakeup)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            return

    def poll(self) -> list[tuple[BlockHash, bool]]:
        """Collect finished batches and I/O jobs. -> [(hash, ok)] of the disk reads that ended
        (ok: the block is readable in host memory; else it is gone from every tier)."""
        for fence in [f for f in self._batches if f.future.done()]:
            self._batches.remove(fence)
            exc = fence.future.exception()
            if exc is not None:
                raise KVError("a batch of KV block copies failed") from exc
            self.metrics.latency["copy"].add(fence.future.result().elapsed_s)
        done = [j for j in self._inflight if j.future.done()]
        if not done:
            return []
        self._inflight = [j for j in self._inflight if j not in done]
        fetched = []
        for job in done:
            if job.block_hash is not None and self._tails.get(job.block_hash) is job.future:
                del self._tails[job.block_hash]
            if job.kind is _IOKind.WRITE:
                self._finish_write(job)
            elif job.kind is _IOKind.READ:
                fetched.append((job.block_hash, self._finish_read(job)))
            else:
                if job.kind is _IOKind.INDEX:
                    self._index_job = None
                self._check_io(job)
        return fetched

    def _finish_write(self, job: _IOJob) -> None:
        h, counters = job.block_hash, self.metrics.counters
        self.host.unpin(h)
        exc = self._check_io(job)
        if exc is None:
            crc, elapsed_s = job.future.result()
            self.disk.finish_write(h, crc)
            counters["spills"] += 1
            counters["bytes_host_to_disk"] += self.config.format.nbytes
            self.metrics.latency["spill"].add(elapsed_s)
            return
        self.disk.finish_write(h, None)
        counters["disk_write_errors"] += 1
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            self.disk.lower_capacity()

    def _finish_read(self, job: _IOJob) -> bool:
        h, counters = job.block_hash, self.metrics.counters
        self.disk.unpin(h)
        started_s = self._fetches.pop(h)
        exc = job.future.exception()
        if exc is None:
            self.host.finish_loading(h, True)
            self.disk.touch(h)
            counters["fetches"] += 1
            counters["bytes_disk_to_host"] += self.config.format.nbytes
            self.metrics.latency["prefetch"].add(time.perf_counter() - started_s)
            return True
        self.host.finish_loading(h, False)
        if isinstance(exc, CorruptBlockError):
            counters["corrupt_blocks"] += 1
        elif isinstance(exc, FileNotFoundError):
            counters["missing_blocks"] += 1
        elif isinstance(exc, OSError):
            counters["disk_io_errors"] += 1
        else:
            raise KVError(f"reading KV block {h.hex()} failed") from exc
        log.warning("disk tier: block %s is unusable (%s); it will be recomputed", h.hex(), exc)
        self.disk.remove(h)
        self._queued.append(_IOJob(_IOKind.DELETE, h))
        return False

    def _check_io(self, job: _IOJob) -> OSError | None:
        """The OSError a finished job raised (logged, counted unless it is a write's), or None;
        anything else is a bug and raises."""
        exc = job.future.exception()
        if exc is None:
            return None
        if not isinstance(exc, OSError):
            raise KVError(f"disk tier {job.kind.value} job failed") from exc
        if job.kind is not _IOKind.WRITE:
            self.metrics.counters["disk_io_errors"] += 1
        level = logging.DEBUG if exc.errno in self._logged_errnos else logging.WARNING
        self._logged_errnos.add(exc.errno)
        what = "the block stays in host memory only" if job.kind is _IOKind.WRITE else "continuing"
        log.log(level, "disk tier %s: %s failed (%s); %s", self.disk.path, job.kind.value, exc, what)
        return exc

    # ---- end --------------------------------------------------------------------------------
    def close(self) -> None:
        """Write the index (TierError if it cannot) and release the disk directory. Call with
        nothing in flight."""
        accounted(not self.in_flight() and not self._ops and not self._queued, "closing the tiers with work in flight")
        if self.disk is not None:
            try:
                write_index(self.disk.path, self.disk.index_bytes())
            except OSError as exc:
                raise index_error(self.disk.path, exc) from exc
            finally:
                self.disk.close()
                self._io.shutdown(wait=True)

    async def aclose(self) -> None:
        """As close, with the index written on an I/O thread."""
        accounted(not self.in_flight() and not self._ops and not self._queued, "closing the tiers with work in flight")
        if self.disk is not None:
            try:
                await asyncio.wrap_future(self._io.submit(write_index, self.disk.path, self.disk.index_bytes()))
            except OSError as exc:
                raise index_error(self.disk.path, exc) from exc
            finally:
                self.disk.close()
                self._io.shutdown(wait=False)

    def check_invariants(self) -> None:
        self.host.check_invariants()
        if self.disk is not None:
            self.disk.check_invariants()
        accounted(all(self.host.is_loading(h) for h in self._fetches), "a disk read into a host entry not loading")


def _run_io(prev: Future | None, fence: Fence | None, fn, *args):
    """(I/O thread) Run fn(*args) after the previous job of the same hash and after the copy
    batch that last touched the job's host slot. -> (fn's result, seconds fn took)."""
    if prev is not None:
        wait([prev])  # its outcome is handled by its own poll
    if fence is not None:
        fence.wait()
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start
