"""Copier: batches of device <-> host block copies, run on the model worker thread.

The loop thread queues copies while it schedules a step and submits them as one batch to
the executor that runs the model's steps. That executor is one thread, first in first out,
so a batch submitted before a step runs before it: a block demoted in this batch is read
before the step overwrites it, and a promoted block is in place before the step reads it.
No lock, no host synchronisation on the loop thread.

On CUDA the batch runs on its own copy stream (pinned host buffer, non-blocking copies),
after the work already queued on the compute stream; the compute stream then waits for the
batch's event, and threads other than the worker wait for it through the batch's Fence.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from enum import Enum

import torch

from afkv.kv.formats import BlockFormat, QuantFormat, RawFormat


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
        if self.same:  # bytes as they are: one copy per block, no staging
            for op in group:
                if to_host:
                    buf[op.slot].copy_(rows[op.block_id], non_blocking=cuda)
                else:
                    rows[op.block_id].copy_(buf[op.slot], non_blocking=cuda)
            return
        ids = torch.tensor([op.block_id for op in group], device=rows.device)  # [n]
        if to_host:
            encoded = fmt.encode(self._device_blocks(ids))  # [n, nbytes] on the device
            for i, op in enumerate(group):  # one transfer per block (pinned memory on CUDA)
                buf[op.slot].copy_(encoded[i], non_blocking=cuda)
            return
        staged = torch.empty((len(group), fmt.nbytes), dtype=torch.uint8, device=rows.device)  # [n, nbytes]
        for i, op in enumerate(group):
            staged[i].copy_(buf[op.slot], non_blocking=cuda)
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
