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
"""

from __future__ import annotations

import asyncio

import torch

from afkv.nodes.remote_ffn import RemoteFFN
from afkv.transport.nccl import NcclPeer, new_unique_id


class _NcclHandle:
    def __init__(self, y: torch.Tensor, done: torch.cuda.Event):
        self._y, self._done = y, done

    def result(self) -> torch.Tensor:
        stream = torch.cuda.current_stream(self._y.device)
        stream.wait_event(self._done)
        self._y.record_stream(stream)
        return self._y


class NcclFFN:
    def __init__(self, control: RemoteFFN, device: torch.device, dtype: torch.dtype, hidden: int):
        self.control, self.device, self.dtype, self.hidden = control, device, dtype, hidden
        self.timings = control.timings
        self._dispatch: list[NcclPeer] = []
        self._combine: list[NcclPeer] = []
        self._send_stream = torch.cuda.Stream(device)
        self._recv_stream = torch.cuda.Stream(device)
        self.trace: list[tuple[torch.cuda.Event, torch.cuda.Event]] | None = None  # (ready, done) when measuring

    @classmethod
    async def connect(cls, control: RemoteFFN, store, rank: int, device: torch.device, dtype: torch.dtype,
                      hidden: int, executor) -> "NcclFFN":
        """Create the communicators with every expert node (the unique ids travel through the store)."""
        self = cls(control, device, dtype, hidden)
        loop = asyncio.get_running_loop()
        for j in range(control.placement.num_nodes):
            key = f"afkv/nccl/{rank}/{j}"
            ids = [new_unique_id(), new_unique_id()]
            await asyncio.to_thread(store.set, key, "\n".join(ids))
            # both ends block in communicator creation until the other joins
            expert_side = asyncio.ensure_future(
                control._request(j, {"type": "nccl_init", "key": key, "attention": rank}))
            peers = await loop.run_in_executor(executor, lambda: [NcclPeer(u, 0, device) for u in ids])
            await expert_side
            self._dispatch.append(peers[0])
            self._combine.append(peers[1])
        return self

    def begin_step(self, mb_sizes: list[int]) -> None:
        msg = {"type": "step", "mbs": mb_sizes}
        for j in range(len(self._dispatch)):
            asyncio.run_coroutine_threadsafe(self.control._notify(j, msg), self.control.loop)

    def submit(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> _NcclHandle:
        compute = torch.cuda.current_stream(self.device)
        ids = topk_ids.to(torch.int32)  # [n, k]
        w = topk_weights.float()  # [n, k]
        x = x.contiguous()
        ready = torch.cuda.Event(enable_timing=self.trace is not None)
        ready.record(compute)
        ys = [torch.empty_like(x) for _ in self._combine]  # [n, H] partial sums, one per expert node
        self._send_stream.wait_event(ready)
        with torch.cuda.stream(self._send_stream):
            for peer in self._dispatch:
                with peer.group():
                    peer.send(x, self._send_stream)
                    peer.send(ids, self._send_stream)
                    peer.send(w, self._send_stream)
        for t in (x, ids, w):
            t.record_stream(self._send_stream)
        with torch.cuda.stream(self._recv_stream):
            for peer, y in zip(self._combine, ys):
                peer.recv(y, self._recv_stream)
                y.record_stream(self._recv_stream)
            y = ys[0] if len(ys) == 1 else torch.stack(ys).sum(0)
        done = torch.cuda.Event(enable_timing=self.trace is not None)
        done.record(self._recv_stream)
        if self.trace is not None:
            self.trace.append((ready, done))
        return _NcclHandle(y, done)

    async def aclose(self) -> None:
        await self.control.aclose()
        # communicators are freed with the process: destroying one while the peer may still
        # be inside a call can hang, and shutdown must never deadlock
