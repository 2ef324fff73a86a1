"""Copier: batches of device <-> host block copies, run on the model worker thread.

The loop thread queues copies while it schedules a step and submits them as one batch to
the executor that runs the model's steps. That executor is one thread, first in first out,
so a batch submitted before a step runs before it: a block demoted in this batch is read
before the step overwrites it, and a promoted block is in place before the step reads it.
No lock, no host synchronisation on the loop thread.

On CUDA the batch runs on its own copy stream (pinned host buffer, non-blocking copies),
after the work already queued on the compute stream; the compute stream then waits for the
batch's event, and threads other than the worker wait for it through the batch's Fence.
A batch's rows move in a few large copies (`move_rows`): one per run of consecutive blocks
and slots, or one indexed kernel when both sides are on the device (a KV hand-off through
CUDA IPC), never one per block.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from enum import Enum

import torch

from afkv.kv.formats import BlockFormat, QuantFormat, RawFormat
from afkv.ops import triton_rows


class Direction(Enum):
    TO_HOST = "to_host"  # demotion: device block -> host slot (encoded)
    TO_DEVICE = "to_device"  # promotion: host slot -> device block (decoded)


@dataclass(frozen=True)
class CopyOp:
    direction: Direction
    block_id: int
    slot: int


@dataclass(frozen=True)
class BatchResult:
    elapsed_s: float  # worker time to run (CPU) or enqueue (CUDA) the batch
    event: torch.cuda.Event | None  # CUDA: recorded on the copy stream after the batch


class Fence:
    """The end of one copy batch, for threads other than the worker."""

    def __init__(self, future: Future):
        self.future = future

    def wait(self) -> None:
        """Block until the batch's copies are complete (raises if the batch failed)."""
        result: BatchResult = self.future.result()
        if result.event is not None:
            result.event.synchronize()


class Copier:
    """Copies between the device tier and a host buffer uint8 [num_slots, format.nbytes]. The
    device tier is the cache kv [num_blocks, *block_shape] (device_format None), or rows uint8
    [num_blocks, device_format.nbytes] of a quantized device format. When both sides use the
    same format a block moves as its bytes, unchanged; otherwise it is decoded from one format
    and encoded into the other. `run` is the only method, and it runs on the worker."""

    def __init__(self, kv: torch.Tensor, host_buf: torch.Tensor, fmt: BlockFormat,
                 device_format: QuantFormat | None = None):
        self.kv, self.buf, self.format, self.device_format = kv, host_buf, fmt, device_format
        if device_format is None:
            self.rows = kv.view(kv.shape[0], -1).view(torch.uint8)  # [num_blocks, block_nbytes], same memory
            self.same = isinstance(fmt, RawFormat)
        else:
            self.rows = kv  # [num_blocks, device_format.nbytes]
            self.same = fmt.digest == device_format.digest
        self.stream = torch.cuda.Stream(device=kv.device) if kv.is_cuda else None

    @torch.inference_mode()
    def run(self, ops: list[CopyOp]) -> BatchResult:
        start = time.perf_counter()
        if self.stream is None:
            for group in _groups(ops):
                self._run_group(group)
            return BatchResult(time.perf_counter() - start, None)
        compute = torch.cuda.current_stream(self.kv.device)
        self.stream.wait_stream(compute)  # read blocks only after the steps queued before
        with torch.cuda.stream(self.stream):
            for group in _groups(ops):
                self._run_group(group)
        event = torch.cuda.Event()
        event.record(self.stream)
        compute.wait_event(event)  # the next step touches kv only after these copies
        return BatchResult(time.perf_counter() - start, event)

    def _run_group(self, group: list[CopyOp]) -> None:
        rows, buf, fmt = self.rows, self.buf, self.format
        cuda = self.stream is not None
        to_host = group[0].direction is Direction.TO_HOST
        if self.same:  # bytes as they are, no staging: a few large copies
            block_ids, slots = [op.block_id for op in group], [op.slot for op in group]
            if to_host:
                move_rows(buf, slots, rows, block_ids, cuda)
            else:
                move_rows(rows, block_ids, buf, slots, cuda)
            return
        ids = _index([op.block_id for op in group], rows.device)  # [n]
        slots, staged_rows = [op.slot for op in group], list(range(len(group)))
        if to_host:
            encoded = fmt.encode(self._device_blocks(ids))  # [n, nbytes] on the device
            move_rows(buf, slots, encoded, staged_rows, cuda)
            return
        staged = torch.empty((len(group), fmt.nbytes), dtype=torch.uint8, device=rows.device)  # [n, nbytes]
        move_rows(staged, staged_rows, buf, slots, cuda)
        blocks = torch.empty((len(group), *self._block_shape()), dtype=self._dtype(), device=rows.device)
        fmt.decode(staged, blocks)  # [n, *block_shape]
        if self.device_format is None:
            self.kv.index_copy_(0, ids, blocks)
        else:
            rows.index_copy_(0, ids, self.device_format.encode(blocks))

    def _device_blocks(self, ids: torch.Tensor) -> torch.Tensor:
        """Device blocks `ids` [n] -> [n, *block_shape] in full precision."""
        if self.device_format is None:
            return self.kv.index_select(0, ids)
        out = torch.empty((ids.shape[0], *self._block_shape()), dtype=self._dtype(), device=ids.device)
        self.device_format.decode(self.rows.index_select(0, ids), out)
        return out

    def _block_shape(self) -> tuple[int, ...]:
        return tuple(self.kv.shape[1:]) if self.device_format is None else self.device_format.layout.block_shape

    def _dtype(self) -> torch.dtype:
        return self.kv.dtype if self.device_format is None else self.device_format.layout.dtype


MAX_RUNS = 8  # above this many runs of consecutive rows, rows on one device move in one indexed kernel
# The indexed kernel for rows on one GPU: "torch" (index_select / index_copy_ over 8-byte words)
# or "triton" (afkv.ops.triton_rows.copy_rows: 16-byte vector copies, one row index per program),
# a candidate that `afkv bench pd-rows` times against it on the GPU; the default stays what was measured.
INDEXED_KERNELS = ("torch", "triton")
INDEXED_KERNEL = "torch"


def move_rows(dst: torch.Tensor, dst_rows: list[int], src: torch.Tensor, src_rows: list[int],
              non_blocking: bool = False, indexed: str = INDEXED_KERNEL) -> None:
    """dst[dst_rows[k]] = src[src_rows[k]] for every k, rows of uint8 [*, nbytes] (dst_rows
    distinct). One slice copy per run of rows consecutive on both sides (a pool hands out runs of
    blocks, and slots are taken in order, so a batch is usually one run); when there are more than
    MAX_RUNS runs and both tensors are on one device, one indexed kernel (`indexed`, among
    INDEXED_KERNELS; "triton" on CUDA only): torch's gather (index_select into a range of dst
    rows) or scatter (index_copy_ from a range of src rows), or Triton's copy_rows, moving 8-byte
    words where the row width allows. Never a host synchronisation: on CUDA the index tensors go
    through pinned memory on the current stream."""
    runs = _runs(dst_rows, src_rows)
    if len(runs) <= MAX_RUNS or dst.device != src.device:
        for d, s, n in runs:
            dst[d:d + n].copy_(src[s:s + n], non_blocking=non_blocking)
        return
    wide_dst, wide_src = _words(dst), _words(src)
    if wide_dst.dtype != wide_src.dtype:
        wide_dst, wide_src = dst, src
    n = len(dst_rows)
    if indexed == "triton" and dst.is_cuda:
        triton_rows.copy_rows(wide_dst, _index(dst_rows, dst.device), wide_src, _index(src_rows, src.device))
        return
    if dst_rows == list(range(dst_rows[0], dst_rows[0] + n)):
        torch.index_select(wide_src, 0, _index(src_rows, src.device), out=wide_dst[dst_rows[0]:dst_rows[0] + n])
    elif src_rows == list(range(src_rows[0], src_rows[0] + n)):
        wide_dst.index_copy_(0, _index(dst_rows, dst.device), wide_src[src_rows[0]:src_rows[0] + n])
    else:
        wide_dst.index_copy_(0, _index(dst_rows, dst.device), wide_src.index_select(0, _index(src_rows, src.device)))


def _runs(dst_rows: list[int], src_rows: list[int]) -> list[tuple[int, int, int]]:
    """(dst row, src row, length) of each run of pairs consecutive on both sides, in order."""
    runs: list[tuple[int, int, int]] = []
    for d, s in zip(dst_rows, src_rows):
        if runs and runs[-1][0] + runs[-1][2] == d and runs[-1][1] + runs[-1][2] == s:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((d, s, 1))
    return runs


def _words(rows: torch.Tensor) -> torch.Tensor:
    """uint8 [n, nbytes] rows as the same memory in the widest of int64 / int32 / int16 that the
    row width and the tensor's offset allow (an indexed kernel moves one element per thread)."""
    for dtype in (torch.int64, torch.int32, torch.int16):
        size = dtype.itemsize
        if rows.shape[1] % size == 0 and rows.stride(0) % size == 0 and rows.storage_offset() % size == 0 \
                and rows.stride(1) == 1:
            return rows.view(dtype)  # [n, nbytes / size]
    return rows


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    """values as int64 [n] on `device`; on CUDA copied from pinned memory, without blocking the host."""
    index = torch.tensor(values, dtype=torch.int64)  # [n]
    if device.type != "cuda":
        return index
    return index.pin_memory().to(device, non_blocking=True)


def _groups(ops: list[CopyOp]) -> Iterator[list[CopyOp]]:
    """Runs of consecutive copies in one direction with distinct targets: copies of one run
    can go as one batched operation without changing the result of running them in order."""
    group: list[CopyOp] = []
    targets: set[int] = set()
    for op in ops:
        target = op.slot if op.direction is Direction.TO_HOST else op.block_id
        if group and (op.direction is not group[0].direction or target in targets):
            yield group
            group, targets = [], set()
        group.append(op)
        targets.add(target)
    if group:
        yield group


class InlineExecutor(Executor):
    """Runs each submitted call at once on the caller's thread (managers without an engine:
    unit tests, benchmarks of the tiers alone)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to whoever reads the future
            future.set_exception(exc)
        return future
