"""NcclFFN: the FFN backend of an attention node on GPUs (data plane: NCCL, afkv.transport.nccl).

Per step, one control message tells every expert node the micro-batch sizes of the step
(step metadata, so no per-layer count exchange). Per layer and micro-batch:

    compute stream:  attention -> router ----event----+
    dispatch stream:                        send x [n, H], topk_ids [n, k] i32, topk_weights [n, k] f32
    combine stream:  recv y [n, H] (posted at once, completes when the expert node answers) --event--> compute

Two communicators per expert node (dispatch and combine), each used from one stream in
one order on both ends. Every expert node receives every token (on GPUs the dispatch
buffer is the whole micro-batch; tokens without a held expert contribute zero there).
Nothing here synchronises the host with the GPU.

Dispatch buffers have a fixed capacity per (micro-batch, peer): the micro-batch's token
count rounded up to a power of two (at least MIN_CAPACITY). They are allocated once per
capacity and reused, rows past the real tokens carry the expert id `num_experts` (held by
nobody: the grouped GEMM skips them) and weight 0. So the step metadata holds only
capacities, and a step's GPU work has static shapes and addresses (CUDA-graph friendly).
"""

from __future__ import annotations

import asyncio
import time

import torch

from afkv.errors import PeerLostError
from afkv.model.spec import ModelSpec
from afkv.nodes.remote_ffn import RemoteFFN
from afkv.transport.nccl import NcclPeer, abort_all, new_unique_id


MIN_CAPACITY = 16


def capacity(num_tokens: int) -> int:
    """Dispatch capacity of a micro-batch of num_tokens: the next power of two, >= MIN_CAPACITY."""
    return max(MIN_CAPACITY, 1 << max(0, num_tokens - 1).bit_length())


class _Buffers:
    """Static dispatch/combine buffers of one (micro-batch slot, capacity, top-k)."""

    def __init__(self, cap: int, hidden: int, k: int, num_peers: int, dtype: torch.dtype, device: torch.device):
        self.x = torch.zeros(cap, hidden, dtype=dtype, device=device)  # [cap, H]
        self.ids = torch.zeros(cap, k, dtype=torch.int32, device=device)  # [cap, k]
        self.w = torch.zeros(cap, k, dtype=torch.float32, device=device)  # [cap, k]
        self.y = [torch.zeros(cap, hidden, dtype=dtype, device=device) for _ in range(num_peers)]  # [cap, H] each


class _NcclHandle:
    def __init__(self, ys: list[torch.Tensor], n: int, done: torch.cuda.Event):
        self._ys, self._n, self._done = ys, n, done

    def result(self) -> torch.Tensor:
        torch.cuda.current_stream(self._ys[0].device).wait_event(self._done)
        y = self._ys[0][: self._n]  # [n, H] (a view of the static buffer: consumed at once by the caller)
        for other in self._ys[1:]:
            y = y + other[: self._n]
        return y


class NcclFFN:
    def __init__(self, control: RemoteFFN, spec: ModelSpec, device: torch.device, dtype: torch.dtype):
        self.control, self.spec, self.device, self.dtype = control, spec, device, dtype
        self.timings = control.timings
        self._dispatch: list[NcclPeer] = []
        self._combine: list[NcclPeer] = []
        self._send_stream = torch.cuda.Stream(device)
        self._recv_stream = torch.cuda.Stream(device)
        self._buffers: dict[tuple[int, int, int], _Buffers] = {}  # (slot, capacity, k) -> buffers
        self._caps: list[int] = []  # capacity of each micro-batch of the current step
        self._submits = 0  # submits in the current step: layer-major, micro-batch-minor
        self.trace: list[tuple[torch.cuda.Event, torch.cuda.Event]] | None = None  # (ready, done) when measuring
        self._last_done: torch.cuda.Event | None = None  # combine event of the step's last submit
        self._broken: PeerLostError | None = None  # set when a step timed out and aborted the communicators
        self._store, self._rank = None, 0
        self.generation = 0  # communicator generation: +1 on every (re)join

    graph_safe = True  # a step's GPU work (sends, receives, waits) can be captured in a CUDA graph

    @classmethod
    async def connect(cls, control: RemoteFFN, spec: ModelSpec, store, rank: int, device: torch.device,
                      dtype: torch.dtype, executor) -> "NcclFFN":
        """Create the communicators with every expert node (the unique ids travel through the
        store), on `executor`: the model worker thread, which does all of this node's GPU work."""
        # every expert node receives every token here: a replicated expert would be counted twice
        assert control.placement.max_replicas <= 1, "the NCCL data plane needs a single-replica placement"
        self = cls(control, spec, device, dtype)
        self._store, self._rank = store, rank
        await asyncio.get_running_loop().run_in_executor(executor, self._join_all)
        return self

    def _join_all(self) -> None:
        """Worker thread: make the two communicators with each expert node. Both ends block in
        communicator creation until the other joins; the expert node is asked over the control
        plane (on the event loop) to join, and answers before it does."""
        dispatch, combine = [], []
        for j in range(self.control.placement.num_nodes):
            key = f"afkv/nccl/{self._rank}/{j}"
            ids = [new_unique_id(), new_unique_id()]
            self._store.set(key, "\n".join(ids))
            # the expert node answers before it joins: only then do we block in creation
            asyncio.run_coroutine_threadsafe(
                self.control._request(j, {"type": "nccl_init", "key": key, "attention": self._rank}),
                self.control.loop).result(timeout=self.control.timeout_s + 1.0)
            peers = [NcclPeer(u, 0, self.device) for u in ids]
            dispatch.append(peers[0])
            combine.append(peers[1])
        self._dispatch, self._combine = dispatch, combine
        self._buffers.clear()  # y buffers are per peer count; make them anew
        self._broken = None
        self.generation += 1  # CUDA graphs captured on the old communicators are void

    def end_step(self) -> None:
        """Worker thread: wait for the step's last partial sums, at most timeout_s. An expert node
        that died would otherwise leave this GPU waiting in NCCL forever: on timeout the
        communicators are aborted and the step fails with PeerLostError; the next step joins
        the expert nodes again (a restarted node registers anew)."""
        done = self._last_done
        if done is None:
            return
        deadline = time.monotonic() + self.control.timeout_s
        while not done.query():
            if time.monotonic() > deadline:
                aborted = abort_all(self._dispatch + self._combine, timeout_s=self.control.timeout_s)
                self._broken = PeerLostError(
                    f"an expert node did not answer within {self.control.timeout_s:.0f} s; NCCL communicators "
                    + ("aborted" if aborted else "abort still running"))
                raise self._broken
            time.sleep(0.0002)

    def ensure_joined(self) -> None:
        """Join the expert nodes again when the last step aborted the communicators (before a
        CUDA graph is chosen: graphs captured on the old communicators are void)."""
        if self._broken is not None:
            self._join_all()

    def begin_step(self, mb_sizes: list[int], announce: bool = True) -> None:
        """Set the step's capacities and tell every expert node (step metadata). Without
        `announce` only the shapes are set: a CUDA graph capturing the step enqueues nothing
        real, and the step is announced before each replay."""
        if self._broken is not None:  # the last step aborted the communicators: join again
            self._join_all()
        self._caps = [capacity(n) for n in mb_sizes]
        self._submits = 0
        if not announce:
            return
        msg = {"type": "step", "caps": self._caps}
        for j in range(len(self._dispatch)):
            asyncio.run_coroutine_threadsafe(self.control._notify(j, msg), self.control.loop)

    def after_replay(self) -> None:
        """A replayed graph's events do not mark host-visible progress: end_step waits on an
        event recorded after the replay instead."""
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        self._last_done = done

    def join(self) -> None:
        """The compute stream waits for this step's sends (a CUDA graph capture must end with
        every stream it forked joined back)."""
        torch.cuda.current_stream(self.device).wait_stream(self._send_stream)

    def submit(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> _NcclHandle:
        slot = self._submits % len(self._caps)
        self._submits += 1
        n, k = topk_ids.shape
        cap = self._caps[slot]
        assert n <= cap, f"micro-batch of {n} tokens over its announced capacity {cap}"
        key = (slot, cap, k)
        b = self._buffers.get(key)
        if b is None:
            b = self._buffers[key] = _Buffers(cap, self.spec.hidden_size, k, len(self._combine), self.dtype, self.device)
        # Fill the static buffers on the compute stream. Reuse is safe by causality: the
        # previous layer's y of this slot was received (so its x was sent) before we got here.
        b.x[:n].copy_(x)
        b.ids[:n].copy_(topk_ids)
        b.ids[n:].fill_(self.spec.num_experts)  # held by no expert node
        b.w[:n].copy_(topk_weights)
        b.w[n:].zero_()
        compute = torch.cuda.current_stream(self.device)
        ready = torch.cuda.Event(enable_timing=self.trace is not None)
        ready.record(compute)
        self._send_stream.wait_event(ready)
        with torch.cuda.stream(self._send_stream):
            for peer in self._dispatch:
                with peer.group():
                    peer.send(b.x, self._send_stream)
                    peer.send(b.ids, self._send_stream)
                    peer.send(b.w, self._send_stream)
        self._recv_stream.wait_event(ready)  # forked from the compute stream: part of a graph capture
        with torch.cuda.stream(self._recv_stream):
            for peer, y in zip(self._combine, b.y):
                peer.recv(y, self._recv_stream)
        done = torch.cuda.Event(enable_timing=self.trace is not None)
        done.record(self._recv_stream)
        if self.trace is not None:
            self.trace.append((ready, done))
        self._last_done = done
        return _NcclHandle(b.y, n, done)

    async def aclose(self) -> None:
        await self.control.aclose()
        # communicators are freed with the process: destroying one while the peer may still
        # be inside a call can hang, and shutdown must never deadlock
