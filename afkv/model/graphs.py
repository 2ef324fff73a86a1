"""CUDA graphs of the decode step: one launch per step instead of thousands.

A decode step of B sequences (one new token each) is captured once per padded batch size
(bucket) and number of micro-batches, then replayed with its inputs copied into static
buffers. Rows past B are padding: token 0 at position 0, writing its K/V into a scratch
block that no sequence owns, attending over that block only. Logits of every row come
out of the graph; the caller samples the first B.

What can be captured: every op of the step must run without a host synchronisation and
with shapes that depend only on the bucket. That holds for the attention side with the
Triton decode kernels (afkv.ops.triton_attention, afkv.ops.triton_mla for MLA latents: their
grids depend on shapes, not on context lengths; over the device cache or a quantized device
tier, whose padding rows write a scratch staging block), for grouped-GEMM experts (LocalFFN)
and for the data plane of expert nodes (afkv.nodes.remote_ffn.RemoteFFN: fixed-capacity
buffers, sends and receives on streams forked from the captured one). Host work of a remote
FFN (announcing the step to the expert nodes, the bounded wait for its end) happens around
each replay, not in the graph. When capture fails (an op that
syncs), `DecodeGraphs.capture` raises `GraphCaptureError` and the caller keeps running eagerly.
"""

from __future__ import annotations

import logging
import threading

import torch

from afkv.errors import AfkvError
from afkv.model.model import Model, split_micro_batches
from afkv.model.sides import DecodeRows, SeqChunk, StepInputs
from afkv.ops.attention import QuantizedKVCache
from afkv.transport.streams import dedicated_stream

# One CUDA graph capture at a time in a process: entering a capture synchronises the device,
# which fails while another thread's stream is capturing (engines sharing a process, the
# attention links of an expert node). Other threads' work goes on meanwhile (thread-local mode).
CAPTURE_LOCK = threading.Lock()

log = logging.getLogger("afkv.graphs")


class GraphCaptureError(AfkvError):
    """The decode step could not be captured as a CUDA graph (the step runs eagerly)."""


def default_buckets(max_batch: int) -> list[int]:
    """Padded batch sizes: 1, 2, 4, 8, then steps of 8 up to 64, of 32 up to 256, of 64 beyond."""
    out, b = [], 1
    while b < 8:
        out.append(b)
        b *= 2
    while b <= max_batch:
        out.append(b)
        b += 8 if b < 64 else 32 if b < 256 else 64
    if not out or out[-1] < max_batch:
        out.append(max_batch)
    return [x for x in out if x <= max_batch]


class DecodeGraphs:
    def __init__(self, model: Model, kv: torch.Tensor | QuantizedKVCache, max_batch: int, max_blocks: int,
                 scratch_block: int, buckets: list[int] | None = None):
        """kv: what attention reads (the device cache, or a quantized device tier); scratch_block:
        the id padding rows write and attend over (KVManager.reserve_scratch_block)."""
        if kv.device.type != "cuda":
            raise GraphCaptureError(f"CUDA graphs need a CUDA device, the KV cache is on {kv.device}")
        self.model, self.kv = model, kv
        self.max_batch, self.max_blocks, self.scratch = max_batch, max_blocks, scratch_block
        self.buckets = buckets or default_buckets(max_batch)
        dev = kv.device
        # static inputs: [5, max_batch] (ids, positions, slot blocks, slot offsets, context lens) and tables
        self._vec = torch.zeros(5, max_batch, dtype=torch.int64, device=dev)
        self._tables = torch.full((max_batch, max_blocks), scratch_block, dtype=torch.int64, device=dev)
        self._rows = torch.arange(max_batch, device=dev)
        self._host = torch.empty(5 * max_batch + max_batch * max_blocks, dtype=torch.int64, pin_memory=True)
        self._reset_inputs()
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self.failed: set[tuple[int, int]] = set()
        self.warned = False  # the runner logs the first fallback to eager only
        self._generation = getattr(model.ffn, "generation", 0)
        # warm-up and capture streams of their own: torch's pooled streams may be another
        # engine's NCCL stream, whose work would then be caught in this capture
        self._side = dedicated_stream(dev)

    def _reset_inputs(self) -> None:
        """Every row a padding row: token 0 at position 0 in the scratch block, context 1."""
        self._vec.zero_()
        self._vec[2].fill_(self.scratch)
        self._vec[4].fill_(1)
        self._tables.fill_(self.scratch)

    def bucket(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def fits(self, batch: int, num_blocks: int) -> bool:
        return batch <= self.max_batch and num_blocks <= self.max_blocks

    def _inputs(self, b: int) -> StepInputs:
        v = self._vec
        return StepInputs(
            v[0, :b], v[1, :b], v[2, :b], v[3, :b],
            [SeqChunk(i, 1, 1, self._tables[i]) for i in range(b)],  # context_len unused: rows attend through `decode`
            DecodeRows(self._rows[:b], self._tables[:b], v[4, :b], every_row=True),
        )

    def _step(self, b: int, m: int, hooks: bool) -> torch.Tensor:
        h = self.model.forward(self._inputs(b), self.kv, m, hooks=hooks)  # [b, H]
        return self.model.attn.logits(h)  # [b, V] float32

    def sizes(self, b: int, m: int) -> list[int]:
        """Micro-batch sizes of the captured step of bucket b with m micro-batches."""
        return self._graphs[(b, m)][2]

    def capture(self, b: int, m: int) -> None:
        """Warm up (two real steps: with a remote FFN the expert nodes take part) and capture."""
        key = (b, m)
        ffn = self.model.ffn
        self._reset_inputs()
        sizes = [mb.token_ids.numel() for mb in split_micro_batches(self._inputs(b), m)]
        try:
            side = self._side
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: lazy initialisation, autotuning, workspaces
                    self._step(b, m, hooks=True)
            torch.cuda.current_stream().wait_stream(side)
            if getattr(ffn, "generation", 0) != self._generation:  # the warm-up voided the other graphs
                self._graphs.clear()
                self._pool = None
                self._generation = getattr(ffn, "generation", 0)
            g = torch.cuda.CUDAGraph()
            ffn.begin_step(sizes, announce=False)  # shapes only: nothing real is enqueued while capturing
            with CAPTURE_LOCK, torch.cuda.graph(g, pool=self._pool, stream=side, capture_error_mode="thread_local"):
                out = self._step(b, m, hooks=False)
                if hasattr(ffn, "join"):
                    ffn.join()
        except (RuntimeError, NotImplementedError) as e:
            self.failed.add(key)
            torch.cuda.current_stream().synchronize()
            raise GraphCaptureError(f"decode step of batch {b}, {m} micro-batch(es) not capturable: {e}") from e
        self._pool = g.pool()
        self._graphs[key] = (g, out, sizes)

    def run(self, ids: list[int], positions: list[int], slot_blocks: list[int], slot_offsets: list[int],
            context_lens: list[int], tables: list[tuple[int, ...]], micro_batches: int) -> torch.Tensor:
        """One decode step of len(ids) sequences -> logits [B, V] float32 (a view into the graph's
        output, valid until the next run). Captures the bucket on first use."""
        batch = len(ids)
        b = self.bucket(batch)
        if b is None or not self.fits(batch, max((len(t) for t in tables), default=0)):
            raise GraphCaptureError(f"batch {batch} is past the captured sizes (max {self.max_batch})")
        m = max(1, min(micro_batches, b))
        key = (b, m)
        ffn = self.model.ffn
        if hasattr(ffn, "ensure_joined"):
            ffn.ensure_joined()
        if getattr(ffn, "generation", 0) != self._generation:  # the FFN's peers were joined again
            self._graphs.clear()
            self._pool = None
            self._generation = getattr(ffn, "generation", 0)
        if key in self.failed:
            raise GraphCaptureError(f"batch {b}, {m} micro-batch(es) failed to capture before")
        if key not in self._graphs:
            self.capture(b, m)
        # fill the static inputs with one host->device copy; padding rows keep their values
        mb, nb = self.max_batch, self.max_blocks
        host = self._host
        vec = host[: 5 * mb].view(5, mb)
        vec[0, :b] = 0
        vec[1, :b] = 0
        vec[2, :b] = self.scratch
        vec[3, :b] = 0
        vec[4, :b] = 1
        for r, col in enumerate((ids, positions, slot_blocks, slot_offsets, context_lens)):
            vec[r, :batch] = torch.tensor(col, dtype=torch.int64)
        tab = host[5 * mb:].view(mb, nb)
        tab[:b].fill_(self.scratch)
        width = max(len(t) for t in tables)
        tab[:batch, :width] = torch.tensor([(*t, *(self.scratch,) * (width - len(t))) for t in tables], dtype=torch.int64)
        self._vec[:, :b].copy_(vec[:, :b], non_blocking=True)
        self._tables[:b].copy_(tab[:b], non_blocking=True)
        return self._replay(key)[:batch]

    def replay(self, batch: int, micro_batches: int = 1) -> torch.Tensor:
        """Replay the captured step of `batch`'s bucket on the inputs of the last `run` (benchmarks:
        the GPU's step without the host's input upload) -> logits [bucket, V]."""
        b = self.bucket(batch)
        return self._replay((b, max(1, min(micro_batches, b))))

    def _replay(self, key: tuple[int, int]) -> torch.Tensor:
        g, out, sizes = self._graphs[key]
        ffn = self.model.ffn
        ffn.begin_step(sizes)  # remote: the expert nodes run the matching step
        g.replay()
        if hasattr(ffn, "after_replay"):
            ffn.after_replay()
        ffn.end_step()  # bounded wait for the step's last partial sums
        return out
