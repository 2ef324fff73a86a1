"""RemoteFFN: the FFN backend of an attention node, dispatching to expert nodes.

Called from the model worker thread (`submit` returns at once; `result` waits); all
socket I/O runs on the attention node's event loop. Each (token, expert) pair goes to one
replica of its expert (ExpertPlacement.parts: split evenly and deterministically among
replicas), plus every token to the node of a shared expert or dense MLP; partial sums
coming back are added up.

Faults: an expert node that dies or stays silent for `timeout_s` is marked dead (on the
worker thread, the only owner of `dead`), and the pairs it was given are sent again to
other replicas of their experts in the same step, so the step completes with the same
output. A row (token) with a pair whose expert has no live replica is left out (none of
its pairs is sent again) and recorded; `end_step` then raises ExpertRowsUnavailableError
naming those rows in step order, and the engine ends only their requests. Rows are
numbered from the micro-batch sizes given to `begin_step` (micro-batches are submitted in
order within each layer). Dead nodes rejoin: at the start of a step when some expert has no
live replica (a synchronous reconnect, so a restarted node is used at once), else from a
background probe every `heartbeat_interval_s`; a rejoining node is first given the
current placement (`eplb_set`).

Placement changes: `adopt(placement)` runs on the worker thread between steps. An expert
node's answer "stale" (it does not hold an expert we sent) or an answer carrying a newer
epoch makes us fetch the node's placement and adopt it (the stale pairs are re-sent).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from afkv.errors import AfkvError, ExpertRowsUnavailableError, ExpertUnavailableError, PeerLostError, TransportError
from afkv.nodes.expert import DATA_FRAME_BYTES
from afkv.nodes.placement import ExpertPlacement, Part
from afkv.transport.control import ConnState, ControlClient, ControlLimits
from afkv.transport.tensors import pack_tensor, unpack_tensor

log = logging.getLogger("afkv.remote_ffn")


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
    def __init__(self, owner: "RemoteFFN", layer: int, x: torch.Tensor, offset: int, first_row: int,
                 sent: list[tuple[Part, Future]]):
        self._owner, self._layer, self._x, self._offset, self._sent = owner, layer, x, offset, sent
        self._first_row = first_row  # step row of this micro-batch's row 0
        self._t0 = time.perf_counter()

    def result(self) -> torch.Tensor:
        owner = self._owner
        out = torch.zeros_like(self._x)  # [T, H]
        slowest = 0.0
        pending = list(self._sent)
        for _ in range(2 * owner.placement.num_nodes + 2):  # each round marks a node dead or adopts a newer epoch
            retry: list[Part] = []
            for part, fut in pending:
                try:
                    reply = fut.result(timeout=owner.timeout_s + 1.0)
                except (PeerLostError, concurrent.futures.TimeoutError) as exc:
                    owner.lost(part.node, exc)
                    retry.append(part)
                    continue
                if reply["type"] == "stale":
                    owner.refresh(part.node)
                    retry.append(part)
                    continue
                owner.note_epoch(part.node, int(reply.get("epoch", 0)))
                y = unpack_tensor(reply["y"], out.device).to(out.dtype)  # [n, H]
                slowest = max(slowest, float(reply.get("compute_s", 0.0)))
                if part.rows is None:
                    out += y
                else:
                    out.index_add_(0, part.rows.to(out.device), y)
            if not retry:
                break
            pending = [sub for part in retry
                       for sub in owner.resend(self._layer, self._x, part, self._offset, self._first_row)]
        else:
            raise PeerLostError(f"layer {self._layer}: expert nodes kept failing or changing placement")
        now = time.perf_counter()
        t = owner.timings
        t.count += 1
        t.round_trip_s += now - self._t0
        t.expert_s += slowest
        return out


class RemoteFFN:
    def __init__(self, placement: ExpertPlacement, resolve: Callable[[int], Awaitable[tuple[str, int]]],
                 node_id: str, token: str | None, timeout_s: float, loop: asyncio.AbstractEventLoop,
                 heartbeat_interval_s: float = 1.0, executor: concurrent.futures.Executor | None = None,
                 rank: int = 0):
        """`resolve(j)` finds expert node j's address (again after it restarts). `executor`:
        the model worker thread (owner of `placement` and `dead`); `rank` offsets the
        replica choice so that attention nodes do not all start on replica 0."""
        self.placement, self.resolve, self.node_id = placement, resolve, node_id
        self.token, self.timeout_s, self.loop = token, timeout_s, loop
        self.heartbeat_interval_s = heartbeat_interval_s
        self.executor, self.rank = executor, rank
        self.timings = TransferTimings()
        self.dead: set[int] = set()  # expert nodes lost (worker thread only)
        self._steps = 0
        self._mb_starts: list[int] = [0]  # step row of each micro-batch's first row (this step)
        self._submits = 0  # submits in this step: micro-batch = submits % len(_mb_starts)
        self._failed: dict[int, ExpertUnavailableError] = {}  # step row -> why it has no result
        self._newer_at: int | None = None  # an expert node that answered with a newer epoch
        n = placement.num_nodes
        self._clients: list[ControlClient | None] = [None] * n
        self._connecting: list[asyncio.Lock] = [asyncio.Lock() for _ in range(n)]
        self._probe: asyncio.Task | None = None

    async def connect(self) -> None:
        await asyncio.gather(*(self._client(j) for j in range(self.placement.num_nodes)))
        self._probe = asyncio.create_task(self._probe_dead(), name=f"{self.node_id}-rejoin")

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            try:
                await self._probe
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    raise
            self._probe = None
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

    async def address(self, j: int) -> tuple[str, int]:
        """Expert node j's control address (as connected to now)."""
        try:
            return (await self._client(j)).peer.address
        except TransportError as exc:
            raise PeerLostError(f"expert node {j} lost: {exc}") from exc

    async def _request(self, j: int, msg: dict) -> dict:
        try:
            client = await self._client(j)
            return await client.request(msg, self.timeout_s)
        except AfkvError as exc:  # the link's (PeerLostError included), or the node's own (its class is the cause)
            raise PeerLostError(f"expert node {j} lost: {exc}") from exc

    async def _notify(self, j: int, msg: dict) -> None:
        try:
            await (await self._client(j)).send(msg)
        except TransportError as exc:
            raise PeerLostError(f"expert node {j} lost: {exc}") from exc

    def _call(self, coro, timeout_s: float):
        """Worker thread: run a coroutine on the loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout_s)

    # ---- steps (worker thread) -------------------------------------------------------------
    def begin_step(self, mb_sizes: list[int]) -> None:
        """A step boundary: adopt a newer placement seen in an answer; rejoin dead nodes
        whose loss leaves some expert without a live replica."""
        self._steps += 1
        self._mb_starts = [sum(mb_sizes[:i]) for i in range(len(mb_sizes))] or [0]
        self._submits, self._failed = 0, {}
        if self._newer_at is not None:
            j, self._newer_at = self._newer_at, None
            self.refresh(j)
        self.rejoin_if_uncovered()

    def rejoin_if_uncovered(self) -> None:
        """Worker thread: when some expert has no live replica, try the lost nodes at once (a
        restarted node is used by this very step)."""
        if self.dead and not self.placement.covered(frozenset(self.dead)):
            for j in sorted(self.dead):
                try:
                    self._call(self._rejoin(j), self.timeout_s * 2 + 1.0)
                except (PeerLostError, concurrent.futures.TimeoutError) as exc:
                    log.info("%s: expert node %d still lost: %s", self.node_id, j, exc)
                    continue
                self.dead.discard(j)

    def end_step(self) -> None:
        """Every result was received (with a timeout) by `result`; raises
        ExpertRowsUnavailableError when rows were left out for lack of a live replica."""
        failed, self._failed = self._failed, {}
        if failed:
            raise ExpertRowsUnavailableError(failed)

    def submit(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> _RemoteHandle:
        """Worker thread: send each expert node its pairs of this micro-batch; returns at once."""
        offset = self._steps + self.rank
        first_row = self._mb_starts[self._submits % len(self._mb_starts)]
        self._submits += 1
        step_rows = first_row + torch.arange(topk_ids.shape[0])  # [T]
        parts = self._parts(layer, topk_ids, topk_weights, offset, step_rows, True)
        return _RemoteHandle(self, layer, x, offset, first_row, [(p, self._send(layer, x, p)) for p in parts])

    def _parts(self, layer: int, topk_ids: torch.Tensor, topk_weights: torch.Tensor, offset: int,
               step_rows: torch.Tensor, with_dense: bool) -> list[Part]:
        """placement.parts over the live nodes, leaving out (and recording) the rows that need
        an expert with no live replica. step_rows [T]: the step row of each row."""
        dead = frozenset(self.dead)
        lost = self.placement.unavailable(layer, topk_ids, dead, with_dense)
        if lost:
            ids, w = topk_ids.cpu(), topk_weights.cpu()
            bad = torch.zeros(ids.shape[0], dtype=torch.bool)  # [T]
            for rows, exc in lost:
                bad[rows] = True
                for r in step_rows[rows].tolist():
                    self._failed.setdefault(r, exc)
                if exc.expert is None:  # the dense / shared part: every row is lost
                    with_dense = False
            topk_ids = torch.where(bad[:, None], self.placement.sentinel, ids)
            topk_weights = torch.where(bad[:, None], torch.zeros((), dtype=w.dtype), w)
        return self.placement.parts(layer, topk_ids, topk_weights, offset, dead, with_dense)

    def _send(self, layer: int, x: torch.Tensor, part: Part) -> Future:
        xs = x if part.rows is None else x[part.rows.to(x.device)]
        msg = {"type": "ffn", "layer": layer, "x": pack_tensor(xs), "ids": pack_tensor(part.topk_ids.to(torch.int32)),
               "w": pack_tensor(part.topk_weights.float())}
        return asyncio.run_coroutine_threadsafe(self._request(part.node, msg), self.loop)

    def resend(self, layer: int, x: torch.Tensor, part: Part, offset: int, first_row: int) -> list[tuple[Part, Future]]:
        """Worker thread: send the pairs of a part that failed to their replicas now."""
        local = torch.arange(x.shape[0]) if part.rows is None else part.rows.cpu()  # [n] rows in the micro-batch
        subs = self._parts(layer, part.topk_ids, part.topk_weights, offset, first_row + local, part.dense)
        out = []
        for sub in subs:
            rows = sub.rows if part.rows is None else (part.rows if sub.rows is None else part.rows[sub.rows])
            full = Part(sub.node, rows, sub.topk_ids, sub.topk_weights, sub.dense)
            out.append((full, self._send(layer, x, full)))
        return out

    def lost(self, j: int, exc: BaseException) -> None:
        """Worker thread: expert node j failed; its pairs go to other replicas from now on."""
        if j not in self.dead:
            log.warning("%s: expert node %d lost (%s); serving from replicas", self.node_id, j, exc)
            self.dead.add(j)

    def note_epoch(self, j: int, epoch: int) -> None:
        if epoch > self.placement.epoch:
            self._newer_at = j

    def refresh(self, j: int) -> None:
        """Worker thread: fetch expert node j's placement; adopt it when newer."""
        try:
            reply = self._call(self._request(j, {"type": "eplb_placement"}), self.timeout_s + 1.0)
        except (PeerLostError, concurrent.futures.TimeoutError) as exc:
            self.lost(j, exc)
            return
        new = ExpertPlacement.from_msg(reply["placement"])
        if new.epoch > self.placement.epoch:
            self.adopt(new)
            return
        try:  # the node is behind us (it restarted, or missed a commit): give it our placement
            self._call(self._rejoin(j), self.timeout_s + 1.0)
        except (PeerLostError, concurrent.futures.TimeoutError) as exc:
            self.lost(j, exc)

    def adopt(self, placement: ExpertPlacement) -> None:
        """Worker thread (between steps, or inside `result` when re-sending): use `placement`."""
        assert placement.num_nodes == self.placement.num_nodes
        log.info("%s: placement epoch %d -> %d", self.node_id, self.placement.epoch, placement.epoch)
        self.placement = placement

    # ---- rejoining (event loop) -------------------------------------------------------------
    async def _rejoin(self, j: int) -> None:
        """Reconnect expert node j and give it the current placement, with the addresses of
        the other connected nodes (it copies the experts it lacks from them)."""
        peers = [[k, *c.peer.address] for k, c in enumerate(self._clients)
                 if k != j and c is not None and c.state is ConnState.OPEN]
        await self._request(j, {"type": "eplb_set", "placement": self.placement.to_msg(), "peers": peers})

    async def _probe_dead(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            for j in sorted(self.dead):
                try:
                    await self._rejoin(j)
                except PeerLostError:
                    continue
                if self.executor is not None:
                    await self.loop.run_in_executor(self.executor, self.dead.discard, j)
                else:
                    self.dead.discard(j)
                log.info("%s: expert node %d rejoined", self.node_id, j)

    async def request_all(self, msg: dict, nodes: list[int] | None = None) -> list[dict]:
        """A control request to every expert node, or to `nodes` (stats, shutdown, eplb_*)."""
        nodes = range(self.placement.num_nodes) if nodes is None else nodes
        return await asyncio.gather(*(self._request(j, msg) for j in nodes))
