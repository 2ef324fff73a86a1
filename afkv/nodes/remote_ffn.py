"""RemoteFFN: the FFN backend of an attention node, dispatching to expert nodes.

Called from the model worker thread (`submit` returns at once; `result` waits); all
socket I/O runs on the attention node's event loop. Each token goes only to the expert
nodes that host one of its experts (plus the node of a shared expert or dense MLP);
partial sums coming back are added up. An expert node that dies or stays silent for
`timeout_s` fails the step with PeerLostError; the next step reconnects, so the node is
used again as soon as it is back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from afkv.errors import PeerLostError, TransportError
from afkv.nodes.expert import DATA_FRAME_BYTES
from afkv.nodes.placement import ExpertPlacement
from afkv.transport.control import ConnState, ControlClient, ControlLimits
from afkv.transport.tensors import pack_tensor, unpack_tensor


@dataclass
class TransferTimings:
    """Accumulated over micro-batch layers (seconds)."""

    count: int = 0
    round_trip_s: float = 0.0  # submit -> every partial sum received
    expert_s: float = 0.0  # compute on the slowest expert node of each micro-batch layer

    @property
    def transfer_s(self) -> float:
        return max(0.0, self.round_trip_s - self.expert_s)


class _RemoteHandle:
    def __init__(self, owner: "RemoteFFN", parts: list[tuple[torch.Tensor | None, Future]], like: torch.Tensor):
        self._owner, self._parts, self._like = owner, parts, like
        self._t0 = time.perf_counter()

    def result(self) -> torch.Tensor:
        out = torch.zeros_like(self._like)  # [T, H]
        slowest = 0.0
        for rows, fut in self._parts:
            reply = fut.result(timeout=self._owner.timeout_s + 1.0)
            y = unpack_tensor(reply["y"], out.device).to(out.dtype)  # [n, H]
            slowest = max(slowest, float(reply.get("compute_s", 0.0)))
            if rows is None:
                out += y
            else:
                out.index_add_(0, rows, y)
        now = time.perf_counter()
        t = self._owner.timings
        t.count += 1
        t.round_trip_s += now - self._t0
        t.expert_s += slowest
        return out


class RemoteFFN:
    def __init__(self, placement: ExpertPlacement, resolve: Callable[[int], Awaitable[tuple[str, int]]],
                 node_id: str, token: str | None, timeout_s: float, loop: asyncio.AbstractEventLoop,
                 heartbeat_interval_s: float = 1.0):
        """`resolve(j)` finds expert node j's address (again after it restarts)."""
        self.placement, self.resolve, self.node_id = placement, resolve, node_id
        self.token, self.timeout_s, self.loop = token, timeout_s, loop
        self.heartbeat_interval_s = heartbeat_interval_s
        self.timings = TransferTimings()
        n = placement.num_nodes
        self._clients: list[ControlClient | None] = [None] * n
        self._connecting: list[asyncio.Lock] = [asyncio.Lock() for _ in range(n)]

    async def connect(self) -> None:
        await asyncio.gather(*(self._client(j) for j in range(self.placement.num_nodes)))

    async def aclose(self) -> None:
        clients, self._clients = self._clients, [None] * self.placement.num_nodes
        for c in clients:
            if c is not None:
                await c.aclose()

    async def _client(self, j: int) -> ControlClient:
        async with self._connecting[j]:
            c = self._clients[j]
            if c is None or c.state is not ConnState.OPEN:
                host, port = await self.resolve(j)
                c = self._clients[j] = await ControlClient.connect(
                    host, port, token=self.token, role="attention", node_id=self.node_id, timeout_s=self.timeout_s,
                    limits=ControlLimits(max_frame_bytes=DATA_FRAME_BYTES, send_timeout_s=self.timeout_s))
                c.start_heartbeat(self.heartbeat_interval_s)  # lets the expert node drop us if we die
            return c

    async def _request(self, j: int, msg: dict) -> dict:
        try:
            client = await self._client(j)
            return await client.request(msg, self.timeout_s)
        except TransportError as exc:  # PeerLostError included: say which expert node
            raise PeerLostError(f"expert node {j} lost: {exc}") from exc

    async def _notify(self, j: int, msg: dict) -> None:
        try:
            await (await self._client(j)).send(msg)
        except TransportError as exc:
            raise PeerLostError(f"expert node {j} lost: {exc}") from exc

    def begin_step(self, mb_sizes: list[int]) -> None:
        """Nothing to announce: each CPU request carries its own shapes."""

    def end_step(self) -> None:
        """Nothing to wait for: every result was received (with a timeout) by `result`."""

    async def request_all(self, msg: dict) -> list[dict]:
        """A control request to every expert node (stats, shutdown)."""
        return await asyncio.gather(*(self._request(j, msg) for j in range(self.placement.num_nodes)))

    def submit(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> _RemoteHandle:
        """Worker thread: send each expert node its tokens of this micro-batch; returns at once."""
        parts = []
        for node, rows in self.placement.destinations(layer, topk_ids):
            xs, ids, w = (x, topk_ids, topk_weights) if rows is None else (x[rows], topk_ids[rows], topk_weights[rows])
            msg = {"type": "ffn", "layer": layer, "x": pack_tensor(xs), "ids": pack_tensor(ids.to(torch.int32)),
                   "w": pack_tensor(w.float())}
            parts.append((rows, asyncio.run_coroutine_threadsafe(self._request(node, msg), self.loop)))
        return _RemoteHandle(self, parts, x)
