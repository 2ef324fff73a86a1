"""ExpertLinks: an attention node's links to the expert nodes of its deployment.

One object answers "who are the expert nodes, which are alive, and which placement do we
route with": the data plane (afkv.nodes.remote_ffn) and the EPLB coordinator
(afkv.nodes.balancer) both ask it, never each other.

    requests     `request(j, msg)` on the event loop; `request_now(j, msg)` from the model
                 worker thread (it waits, bounded); `submit(j, msg)` from the worker without
                 waiting. Every failure of expert node j is PeerLostError naming j. A lost
                 control connection is made again at the next request (`connects` counts them).
    liveness     `dead`: expert nodes lost. `lost(j)` marks one (the data plane, when it does
                 not answer); a background probe tries the lost ones every
                 heartbeat_interval_s, and `sync_placement` (at a step boundary) tries them at
                 once when some expert has no live replica left, so a restarted node serves
                 the very next step. A node that comes back is first given the current
                 placement (`eplb_set`, with the addresses of the other nodes: it copies the
                 experts it lacks from them).
    placement    `placement` and its epoch: `adopt` (the coordinator's rebalance, through
                 `switch`), `note_epoch` (an expert node answered with a newer epoch: fetched
                 and adopted at the next step boundary), `push_placement` (a node behind us
                 is given ours).

Owners: `placement` and `dead` belong to the model worker thread (`executor`): it reads
them while it plans a step, and every change happens there, between steps (`switch` and
the probe hop onto it). `_clients` belongs to the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Awaitable, Callable

from afkv.errors import AfkvError, EngineError, PeerLostError, TransportError
from afkv.nodes.placement import ExpertPlacement
from afkv.transport.control import ConnState, ControlClient, ControlLimits

log = logging.getLogger("afkv.links")


class ExpertLinks:
    def __init__(self, placement: ExpertPlacement, resolve: Callable[[int], Awaitable[tuple[str, int]]],
                 node_id: str, token: str | None, timeout_s: float, loop: asyncio.AbstractEventLoop,
                 heartbeat_interval_s: float = 1.0, executor: concurrent.futures.Executor | None = None):
        """`resolve(j)` finds expert node j's address (again after it restarts). `executor`:
        the model worker thread (None: the caller's thread owns placement and dead)."""
        self.placement, self.resolve, self.node_id = placement, resolve, node_id
        self.token, self.timeout_s, self.loop = token, timeout_s, loop
        self.heartbeat_interval_s = heartbeat_interval_s
        self.executor = executor
        self.dead: set[int] = set()
        self._newer_at: int | None = None  # an expert node that answered with a newer epoch
        n = placement.num_nodes
        self._clients: list[ControlClient | None] = [None] * n
        self._connects = [0] * n  # control connections made to each expert node (event loop)
        self._connecting: list[asyncio.Lock] = [asyncio.Lock() for _ in range(n)]
        self._probe: asyncio.Task | None = None

    @property
    def num_nodes(self) -> int:
        return self.placement.num_nodes

    async def connect(self) -> None:
        await asyncio.gather(*(self._client(j) for j in range(self.num_nodes)))
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
        clients, self._clients = self._clients, [None] * self.num_nodes
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
                    limits=ControlLimits(send_timeout_s=self.timeout_s))
                c.start_heartbeat(self.heartbeat_interval_s)  # lets the expert node drop us if we die
                self._connects[j] += 1
            return c

    def connects(self, j: int) -> int:
        """How many control connections to expert node j were made: a new one since some moment
        means the node may have restarted (or its connection broke) since then."""
        return self._connects[j]

    # ---- requests ----------------------------------------------------------------------------
    async def address(self, j: int) -> tuple[str, int]:
        """Expert node j's control address (as connected to now)."""
        try:
            return (await self._client(j)).peer.address
        except TransportError as exc:
            raise PeerLostError(f"expert node {j} lost: {exc}") from exc

    async def request(self, j: int, msg: dict) -> dict:
        """Event loop: a request to expert node j, answered within timeout_s."""
        try:
            client = await self._client(j)
            return await client.request(msg, self.timeout_s)
        except AfkvError as exc:  # the link's (PeerLostError included), or the node's own (its class is the cause)
            raise PeerLostError(f"expert node {j} lost: {exc}") from exc

    async def request_all(self, msg: dict, nodes: list[int] | None = None) -> list[dict]:
        """A control request to every expert node, or to `nodes` (stats, shutdown, eplb_*)."""
        nodes = range(self.num_nodes) if nodes is None else nodes
        return await asyncio.gather(*(self.request(j, msg) for j in nodes))

    def submit(self, j: int, msg: dict) -> concurrent.futures.Future:
        """Any thread: send a request to expert node j now; the future holds its answer."""
        return asyncio.run_coroutine_threadsafe(self.request(j, msg), self.loop)

    def request_now(self, j: int, msg: dict, timeout_s: float | None = None) -> dict:
        """Worker thread: a request to expert node j, waited for at most timeout_s (default:
        the links' timeout and a second). PeerLostError when it is lost or silent."""
        return self._wait(self.request(j, msg), self.timeout_s + 1.0 if timeout_s is None else timeout_s, j)

    def _wait(self, coro, timeout_s: float, j: int):
        try:
            return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout_s)
        except concurrent.futures.TimeoutError as exc:
            raise PeerLostError(f"expert node {j} did not answer within {timeout_s:.0f} s") from exc

    # ---- liveness and placement (worker thread) ----------------------------------------------
    def lost(self, j: int, exc: BaseException) -> None:
        """Expert node j failed; its pairs go to other replicas from now on."""
        if j not in self.dead:
            log.warning("%s: expert node %d lost (%s); serving from replicas", self.node_id, j, exc)
            self.dead.add(j)

    def sync_placement(self) -> None:
        """A step boundary: adopt a newer placement an expert node answered with; rejoin lost
        nodes at once when some expert has no live replica."""
        if self._newer_at is not None:
            j, self._newer_at = self._newer_at, None
            self.refresh(j)
        if self.dead and not self.placement.covered(frozenset(self.dead)):
            for j in sorted(self.dead):
                try:
                    self.push_placement(j, self.timeout_s * 2 + 1.0)
                except PeerLostError as exc:
                    log.info("%s: expert node %d still lost: %s", self.node_id, j, exc)
                    continue
                self.dead.discard(j)

    def note_epoch(self, j: int, epoch: int) -> None:
        """Expert node j answered with placement `epoch`: a newer one is fetched at the next
        step boundary."""
        if epoch > self.placement.epoch:
            self._newer_at = j

    def refresh(self, j: int) -> None:
        """Fetch expert node j's placement; adopt it when newer, else give it ours."""
        try:
            reply = self.request_now(j, {"type": "eplb_placement"})
        except PeerLostError as exc:
            self.lost(j, exc)
            return
        new = ExpertPlacement.from_msg(reply["placement"])
        if new.epoch > self.placement.epoch:
            self.adopt(new)
            return
        try:  # the node is behind us (it restarted, or missed a commit)
            self.push_placement(j)
        except PeerLostError as exc:
            self.lost(j, exc)

    def push_placement(self, j: int, timeout_s: float | None = None) -> None:
        """Give expert node j our placement (it reconnects first if it had been lost)."""
        self._wait(self._rejoin(j), self.timeout_s + 1.0 if timeout_s is None else timeout_s, j)

    def adopt(self, placement: ExpertPlacement) -> None:
        """Route with `placement` from the next step on."""
        if placement.num_nodes != self.placement.num_nodes:
            raise EngineError(f"a placement over {placement.num_nodes} expert nodes, this deployment has "
                              f"{self.placement.num_nodes}")
        log.info("%s: placement epoch %d -> %d", self.node_id, self.placement.epoch, placement.epoch)
        self.placement = placement

    async def switch(self, placement: ExpertPlacement) -> None:
        """Event loop: `adopt` on the worker thread, i.e. between two steps."""
        if self.executor is None:
            self.adopt(placement)
        else:
            await self.loop.run_in_executor(self.executor, self.adopt, placement)

    # ---- rejoining (event loop) --------------------------------------------------------------
    async def _rejoin(self, j: int) -> None:
        """Reconnect expert node j and give it the current placement, with the addresses of
        the other connected nodes (it copies the experts it lacks from them)."""
        peers = [[k, *c.peer.address] for k, c in enumerate(self._clients)
                 if k != j and c is not None and c.state is ConnState.OPEN]
        await self.request(j, {"type": "eplb_set", "placement": self.placement.to_msg(), "peers": peers})

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
