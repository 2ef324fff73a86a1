"""RemoteFFN: the FFN backend of an attention node: the expert nodes, over fixed buffers.

Per step, one control message tells every expert node the capacities of its buffers
(step metadata, so no per-layer count exchange). Per layer and micro-batch:

    compute stream:  attention -> router -> pack (afkv.nodes.dispatch) --event--+
    send stream:                  to each expert node: x [c, H], ids [c, k] i32, weights [c, k] f32
    recv stream:     from each expert node: y [c, H] (posted at once) --event--> compute: combine

Each expert node gets only the rows with a pair for it (every row where it holds the
layer's dense MLP / shared expert), in a buffer of fixed capacity c per (micro-batch,
peer); pairs of an expert with replicas are split among them on the device
(afkv.nodes.dispatch, the one routing rule). Capacities come from the placement (the rows a
peer needs under uniform routing, plus four standard deviations; or `dispatch_capacity` x
the micro-batch) and grow when a step overflows: that step raises StepRetryError and is
computed again. Two peers per expert node (dispatch, combine), each used from one stream
in one order on both ends. Nothing here synchronises the host with the device before the
end of a step.

Peers (afkv.transport.peer): NCCL between two GPUs; the host peer on CPUs and between two
processes on one GPU (`peer_kind`, asked of each expert node's identity at every join). On
GPUs with NCCL peers a step's work is captured in a CUDA graph by afkv.model.graphs; host
peers are not capturable (`graph_safe`).

Faults: end_step waits at most timeout_s. On timeout the peers are aborted, the expert
nodes that do not answer on the control plane are marked lost (ExpertLinks), and the step
is computed again (StepRetryError) over the live nodes: experts with a live replica keep
serving, rows needing one without end with ExpertRowsUnavailableError, each naming the
first (layer, expert) it lacked. Lost nodes rejoin through ExpertLinks and the next step
joins them again.

Timings (`timings`, per micro-batch layer): the host time of each submit's transfers (on
CPUs the whole round trip; on GPUs only the launch) and the slowest expert node's FFN time of
each step, as the nodes report it in their step answers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass

import torch

from afkv.errors import EngineError, ExpertRowsUnavailableError, PeerLostError, StepRetryError
from afkv.model.spec import ModelSpec
from afkv.nodes.dispatch import DispatchTables, capacity, combine, pack, peer_capacity, row_shares
from afkv.nodes.links import ExpertLinks
from afkv.transport.peer import Peer, abort_all, gpu_identity, new_peer_id, open_peer, peer_kind
from afkv.transport.streams import DeviceStreams

log = logging.getLogger("afkv.remote_ffn")


@dataclass
class TransferTimings:
    """Accumulated over micro-batch layers (seconds)."""

    count: int = 0
    round_trip_s: float = 0.0  # host time of a submit's sends and receives
    expert_s: float = 0.0  # FFN compute on the slowest expert node

    @property
    def transfer_s(self) -> float:
        return max(0.0, self.round_trip_s - self.expert_s)


class _Buffers:
    """Static buffers of one (micro-batch slot, per-peer capacities, top-k)."""

    def __init__(self, caps: tuple[int, ...], hidden: int, k: int, dtype: torch.dtype, device: torch.device):
        c, p = max(caps), len(caps)
        self.caps = caps
        self.caps_t = torch.tensor(caps, dtype=torch.int64, device=device)  # [P]
        self.src = torch.zeros(p, c, dtype=torch.int64, device=device)  # [P, C] row of each slot
        self.x = torch.zeros(p, c, hidden, dtype=dtype, device=device)  # [P, C, H]
        self.ids = torch.zeros(p, c, k, dtype=torch.int32, device=device)  # [P, C, k]
        self.w = torch.zeros(p, c, k, dtype=torch.float32, device=device)  # [P, C, k]
        self.y = [torch.zeros(cap, hidden, dtype=dtype, device=device) for cap in caps]  # [c_p, H] each


class _Handle:
    def __init__(self, owner: "RemoteFFN", b: _Buffers, n: int, done, direct: bool):
        self._owner, self._b, self._n, self._done, self._direct = owner, b, n, done, direct

    def result(self) -> torch.Tensor:
        self._owner._streams.current().wait_event(self._done)
        if self._direct:  # one peer, every row in order
            return self._b.y[0][: self._n]  # a view of the static buffer: consumed at once by the caller
        return combine(self._b.y, self._b.src, self._n)  # [n, H]


class RemoteFFN:
    """Owner (model worker thread): the peers, buffers, capacities and per-step device
    state; the placement and the lost nodes are ExpertLinks'."""

    def __init__(self, links: ExpertLinks, spec: ModelSpec, device: torch.device, dtype: torch.dtype,
                 fixed_capacity: float = 0.0, host: str = "127.0.0.1"):
        """`fixed_capacity`: each peer's rows per micro-batch as a share of it (0: from the
        placement, grown on overflow); `host`: where host peers listen."""
        self.links, self.spec, self.device, self.dtype = links, spec, device, dtype
        self.host = host
        self.timings = TransferTimings()
        self.fixed_capacity = fixed_capacity
        self._streams = DeviceStreams(device)
        self._dispatch: list[Peer | None] = []  # per expert node: its peer, None while it is lost
        self._combine: list[Peer | None] = []
        self._joined_over: list[int] = []  # per expert node: links.connects(j) when its peers were joined
        self._send_stream = self._streams.stream()
        self._recv_stream = self._streams.stream()
        self._buffers: dict[tuple, _Buffers] = {}  # (slot, caps, k) -> buffers
        self._mb_caps: list[int] = []  # capacity of each micro-batch of the current step
        self._mb_starts: list[int] = []  # step row of each micro-batch's first row
        self._caps: list[tuple[int, ...]] = []  # per micro-batch: each peer's capacity
        self._submits = 0  # submits in the current step: layer-major, micro-batch-minor
        self.trace: list[tuple] | None = None  # (ready, done) events when measuring
        self._last_done = None  # combine event of the step's last submit
        self._broken: PeerLostError | None = None  # set when a step timed out and aborted the peers
        self._store, self._rank = None, 0
        self.generation = 0  # +1 whenever captured steps are void (peers joined again, new capacities or tables)
        placement = links.placement
        self._tables = DispatchTables(placement, device)
        top_k = max([spec.layer_top_k(i) for i in range(spec.num_layers) if spec.layer_has_router(i)] + [1])
        self._top_k = top_k
        self._shares = row_shares(placement, top_k)
        self._seen = [0.0] * placement.num_nodes  # per peer: largest share of rows needed in an overflow
        # per-step device state, reset by the step's first submit (inside a captured graph too)
        self._offset = torch.zeros((), dtype=torch.int64, device=device)  # replica rotation, +1 per step
        self._peak = torch.zeros(placement.num_nodes, dtype=torch.float32, device=device)  # rows / cap
        self._over = torch.zeros((), dtype=torch.bool, device=device)
        self._lost = torch.zeros(0, dtype=torch.int64, device=device)  # [step rows] lost_code of each row
        self.overflows = 0  # steps computed again for lack of room
        self._replies: list[tuple[int, concurrent.futures.Future]] = []  # this step's answers, per expert node
        self._mb_sizes: list[int] = []

    @property
    def graph_safe(self) -> bool:
        """Whether a step's GPU work (sends, receives, waits) can be captured in a CUDA graph."""
        return all(p.graph_safe for p in self._live_peers())

    @classmethod
    async def connect(cls, links: ExpertLinks, spec: ModelSpec, store, rank: int, device: torch.device,
                      dtype: torch.dtype, executor, fixed_capacity: float = 0.0,
                      host: str = "127.0.0.1") -> "RemoteFFN":
        """Join the peers of every expert node (the ids travel through the store), on
        `executor`: the model worker thread, which does all of this node's device work."""
        self = cls(links, spec, device, dtype, fixed_capacity, host)
        self._store, self._rank = store, rank
        await asyncio.get_running_loop().run_in_executor(executor, self._join_all)
        return self

    # ---- peers -------------------------------------------------------------------------------
    def _join_all(self) -> None:
        """Worker thread: join the two peers of each live expert node. Both ends block in
        creation until the other joins; the expert node is asked over the control plane (on
        the event loop) to join, and answers before it does."""
        links = self.links
        dead = frozenset(links.dead)
        dispatch: list[Peer | None] = []
        combine_peers: list[Peer | None] = []
        mine = gpu_identity(self.device)
        for j in range(links.num_nodes):
            if j in dead:
                dispatch.append(None)
                combine_peers.append(None)
                continue
            key = f"afkv/nccl/{self._rank}/{j}/{self.generation + 1}"
            try:
                kind = peer_kind(mine, str(links.request_now(j, {"type": "identity"}).get("gpu", "")))
                ids = [new_peer_id(kind, self.host), new_peer_id(kind, self.host)]
                self._store.set(key, "\n".join(ids))
                links.request_now(j, {"type": "nccl_init", "key": key, "attention": self._rank, "gpu": mine})
            except PeerLostError as exc:
                links.lost(j, exc)
                abort_all([p for p in dispatch + combine_peers if p is not None], timeout_s=links.timeout_s)
                self.generation += 1  # fresh store keys
                return self._join_all()  # start over without it
            dispatch.append(open_peer(kind, ids[0], 0, self.device, links.timeout_s))
            combine_peers.append(open_peer(kind, ids[1], 0, self.device, links.timeout_s))
        self._dispatch, self._combine = dispatch, combine_peers
        self._joined_over = [links.connects(j) for j in range(links.num_nodes)]
        self._load_tables()
        self._broken = None
        self.generation += 1  # CUDA graphs captured on the old peers are void

    def _live_peers(self) -> list[Peer]:
        return [p for p in self._dispatch + self._combine if p is not None]

    def _load_tables(self) -> None:
        placement, dead = self.links.placement, frozenset(self.links.dead)
        self._tables.load(placement, dead)
        self._shares = row_shares(placement, self._top_k, dead)
        self._buffers.clear()

    # ---- steps (worker thread) ---------------------------------------------------------------
    def end_step(self) -> None:
        """Worker thread: wait for the step's last partial sums, at most timeout_s, then check
        the step's dispatch (room, lost rows). On timeout the peers are aborted and the step
        is computed again over the live expert nodes."""
        done = self._last_done
        if done is None:
            return
        self._last_done = None
        links = self.links
        deadline = time.monotonic() + links.timeout_s
        while not done.query():
            if time.monotonic() > deadline:
                self._lose_peers()
            time.sleep(0.0002)
        self._check_replies(deadline)
        if self._direct():
            return
        rows = sum(self._mb_sizes)
        state = torch.cat([self._peak.double(), self._over.double()[None], self._lost[:rows].double()]).tolist()
        num_peers = len(self._dispatch)
        peak, over, lost = state[:num_peers], state[num_peers] > 0, state[num_peers + 1:]
        if over:
            self.overflows += 1
            self._seen = [max(s, p) for s, p in zip(self._seen, peak)]
            log.info("%s: a dispatch buffer overflowed (rows needed per peer / capacity: %s); computing the step "
                     "again with more room", links.node_id, [round(p, 3) for p in peak])
            self._buffers.clear()
            self.generation += 1  # captured steps have the old capacities
            raise StepRetryError("an expert node's dispatch buffer overflowed")
        if any(lost):
            raise ExpertRowsUnavailableError({r: self._tables.lost_error(int(c)) for r, c in enumerate(lost) if c})

    def _lose_peers(self) -> None:
        """A step timed out or a peer connection broke: abort every peer, mark the expert
        nodes that do not answer on the control plane lost, and have the step computed again
        with the peers joined again. A node that answers over a control connection made since
        its peers were joined restarted (or its connection broke): it is joined again too. When
        every node answers on the connection of its join, the data plane itself is stuck: the
        step fails."""
        links = self.links
        log.warning("%s: a step on the fixed-buffer data plane failed; aborting its connections and asking "
                    "the expert nodes", links.node_id)
        aborted = abort_all(self._live_peers(), timeout_s=links.timeout_s)
        silent, renewed = [], []
        for j, peer in enumerate(self._dispatch):
            if peer is None:
                continue
            try:
                links.request_now(j, {"type": "eplb_placement"}, min(links.timeout_s, 5.0) + 1.0)
            except PeerLostError as exc:
                links.lost(j, exc)
                silent.append(j)
                continue
            if links.connects(j) != self._joined_over[j]:
                renewed.append(j)
        self._broken = PeerLostError(
            f"expert node(s) {', '.join(map(str, silent)) or '(none silent)'} did not answer within "
            f"{links.timeout_s:.0f} s" + (f", node(s) {', '.join(map(str, renewed))} connected again" if renewed
                                          else "") + "; peers " + ("aborted" if aborted else "abort still running"))
        if silent or renewed:
            raise StepRetryError(str(self._broken)) from self._broken
        raise self._broken

    def _direct(self) -> bool:
        """One expert node, one replica per expert, none lost: every row goes to it, in order."""
        return len(self._dispatch) == 1 and self._tables.single

    def ensure_joined(self) -> None:
        """Join the expert nodes again when the last step aborted the peers, a lost node came
        back, or the placement changed (before a CUDA graph is chosen: graphs captured on the
        old peers or tables are void)."""
        links = self.links
        links.sync_placement()
        dead = frozenset(links.dead)
        if self._broken is not None or dead != self._tables.dead:
            if self._broken is None:  # a lost node came back: drop what is left of the old peers
                for p in self._live_peers():
                    p.abort()
            self._join_all()
        elif links.placement is not self._tables.placement:
            log.info("%s: dispatch tables for placement epoch %d", links.node_id, links.placement.epoch)
            self._load_tables()
            self.generation += 1

    def begin_step(self, mb_sizes: list[int], announce: bool = True) -> None:
        """Set the step's capacities and tell every expert node (step metadata). Without
        `announce` only the shapes are set: a CUDA graph capturing the step enqueues nothing
        real, and the step is announced before each replay."""
        self.ensure_joined()
        self._mb_sizes = list(mb_sizes)
        self._mb_starts = [sum(mb_sizes[:i]) for i in range(len(mb_sizes))]
        self._mb_caps = [capacity(n) for n in mb_sizes]
        if self._direct():
            self._caps = [(c,) for c in self._mb_caps]
        else:
            self._caps = [tuple(0 if self._dispatch[j] is None else
                                peer_capacity(c, s, self.fixed_capacity, self._seen[j])
                                for j, s in enumerate(self._shares)) for c in self._mb_caps]
        self._submits = 0
        rows = sum(mb_sizes)
        if self._lost.numel() < rows:
            self._lost = torch.zeros(capacity(rows), dtype=torch.int64, device=self.device)
            self.generation += 1
        if not announce:
            return
        epoch = self._tables.placement.epoch
        self._replies = []
        for j, peer in enumerate(self._dispatch):
            if peer is None:
                continue
            dense = [i for i, home in enumerate(self._tables.dense_home) if home == j]
            msg = {"type": "step", "caps": [c[j] for c in self._caps], "mb_caps": self._mb_caps,
                   "dense_layers": dense, "epoch": epoch}
            self._replies.append((j, self.links.submit(j, msg)))

    def _check_replies(self, deadline: float) -> None:
        """Every expert node answers a step with its placement epoch, whether it holds the
        experts of ours, and its FFN time. A node that did not hold them computed wrong
        partial sums: it is brought to our placement (or we to its newer one) and the step is
        computed again."""
        links = self.links
        replies, self._replies = self._replies, []
        behind = []
        slowest = 0.0
        for j, fut in replies:
            try:
                reply = fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except (PeerLostError, concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
                continue  # faults show on the data plane
            epoch = int(reply.get("epoch", 0))
            links.note_epoch(j, epoch)  # a newer placement is fetched before the next step
            slowest = max(slowest, float(reply.get("compute_s", 0.0)))
            if not reply.get("ok", True):
                behind.append((j, epoch))
        self.timings.expert_s += slowest
        if not behind:
            return
        mine = self._tables.placement.epoch
        for j, epoch in behind:
            if epoch < mine:  # it missed a placement: give it ours
                try:
                    links.push_placement(j, links.timeout_s * 2 + 1.0)
                except PeerLostError as exc:
                    links.lost(j, exc)
        raise StepRetryError(f"expert node(s) {[j for j, _ in behind]} did not hold placement epoch {mine}")

    def after_replay(self) -> None:
        """A replayed graph's events do not mark host-visible progress: end_step waits on an
        event recorded after the replay instead."""
        done = self._streams.event()
        done.record(self._streams.current())
        self._last_done = done

    def join(self) -> None:
        """The compute stream waits for this step's sends (a CUDA graph capture must end with
        every stream it forked joined back)."""
        self._streams.current().wait_stream(self._send_stream)

    def _layer_caps(self, layer: int, slot: int) -> tuple[int, ...]:
        """Each peer's capacity at `layer`: the whole micro-batch for the node of its dense MLP /
        shared expert, nothing for the other nodes at a layer without routed experts."""
        caps = self._caps[slot]
        home = self._tables.dense_home[layer]
        if home < 0 or self._direct():
            return caps
        routed = self._tables.has_router[layer]
        return tuple(self._mb_caps[slot] if j == home and c else c if routed else 0 for j, c in enumerate(caps))

    def submit(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> _Handle:
        first = self._submits == 0
        slot = self._submits % len(self._caps)
        self._submits += 1
        n, k = topk_ids.shape
        if n > self._mb_caps[slot]:
            raise EngineError(f"micro-batch of {n} tokens over its announced capacity {self._mb_caps[slot]}")
        caps = self._layer_caps(layer, slot)
        key = (slot, caps, k)
        b = self._buffers.get(key)
        if b is None:
            b = self._buffers[key] = _Buffers(caps, self.spec.hidden_size, k, self.dtype, self.device)
        direct = self._direct()
        # Fill the static buffers on the compute stream. Reuse is safe by causality: the
        # previous layer's y of this slot was received (so its x was sent) before we got here.
        if direct:
            b.x[0, :n].copy_(x)
            b.ids[0, :n].copy_(topk_ids)
            b.ids[0, n:].fill_(self._tables.sentinel)  # held by no expert node
            b.w[0, :n].copy_(topk_weights)
            b.w[0, n:].zero_()
        else:
            if first:  # per-step device state (inside a captured graph: reset on every replay)
                self._offset += 1
                self._peak.zero_()
                self._over.zero_()
                self._lost.zero_()
            t = self._tables
            node = t.assign(layer, topk_ids, self._offset)  # [n, k]
            need = pack(node, topk_ids, topk_weights, x, t.dense_home[layer], t.sentinel, b.caps_t, b.src, b.x,
                        b.ids, b.w)  # [P]
            torch.maximum(self._peak, need.float() / self._mb_caps[slot], out=self._peak)
            self._over |= (need > b.caps_t).any()
            if t.dead:
                start = self._mb_starts[slot]
                seen = self._lost[start: start + n]  # [n] the first loss of each row wins
                seen.copy_(torch.where(seen == 0, t.lost_code(layer, topk_ids), seen))
        s = self._streams
        compute = s.current()
        ready = s.event(enable_timing=self.trace is not None)
        ready.record(compute)
        self._send_stream.wait_event(ready)
        t0 = time.perf_counter()
        try:
            with s.use(self._send_stream):
                for j, peer in enumerate(self._dispatch):
                    c = caps[j]
                    if peer is None or c == 0:
                        continue
                    with peer.group():
                        peer.send(b.x[j, :c], self._send_stream)
                        peer.send(b.ids[j, :c], self._send_stream)
                        peer.send(b.w[j, :c], self._send_stream)
            self._recv_stream.wait_event(ready)  # forked from the compute stream: part of a graph capture
            with s.use(self._recv_stream):
                for peer, y in zip(self._combine, b.y):
                    if peer is not None and y.shape[0]:
                        peer.recv(y, self._recv_stream)
        except PeerLostError:  # a host connection broke (NCCL faults show as a timeout in end_step)
            self._last_done = None
            self._lose_peers()
        self.timings.count += 1
        self.timings.round_trip_s += time.perf_counter() - t0
        done = s.event(enable_timing=self.trace is not None)
        done.record(self._recv_stream)
        if self.trace is not None:
            self.trace.append((ready, done))
        self._last_done = done
        return _Handle(self, b, n, done, direct)

    async def aclose(self) -> None:
        await self.links.aclose()
        # peers are freed with the process: destroying an NCCL communicator while the peer
        # may still be inside a call can hang, and shutdown must never deadlock
