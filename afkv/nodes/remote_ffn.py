"""NcclFFN: the fixed-buffer data plane of an attention node (NCCL on GPUs, HostPeer on CPUs).

Per step, one control message tells every expert node the capacities of its buffers
(step metadata, so no per-layer count exchange). Per layer and micro-batch:

    compute stream:  attention -> router -> pack (afkv.nodes.dispatch) --event--+
    send stream:                  to each expert node: x [c, H], ids [c, k] i32, weights [c, k] f32
    recv stream:     from each expert node: y [c, H] (posted at once) --event--> compute: combine

Each expert node gets only the rows with a pair for it (every row where it holds the
layer's dense MLP / shared expert), in a buffer of fixed capacity c per (micro-batch,
peer); pairs of an expert with replicas are split among them on the device. Capacities
come from the placement (the rows a peer needs under uniform routing, plus four standard
deviations; or `dispatch_capacity` x the micro-batch) and grow when a step overflows:
that step raises StepRetryError and is computed again. Two communicators per expert
node (dispatch, combine), each used from one stream in one order on both ends. Nothing
here synchronises the host with the device before the end of a step.

On a CPU the same code runs with host streams and HostPeer connections (the `fixed` data
plane in tests); on GPUs a step's work is captured in a CUDA graph by afkv.model.graphs.

Faults: end_step waits at most timeout_s. On timeout the communicators are aborted, the
expert nodes that do not answer on the control plane are marked lost, and the step is
computed again (StepRetryError) over the live nodes: experts with a live replica keep
serving, rows needing one without end with ExpertRowsUnavailableError. Lost nodes rejoin
through the control plane (RemoteFFN's probe) and the next step joins them again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import socket
import time

import torch

from afkv.errors import ConfigError, ExpertRowsUnavailableError, ExpertUnavailableError, PeerLostError, StepRetryError
from afkv.model.spec import ModelSpec
from afkv.nodes.dispatch import DispatchTables, combine, pack
from afkv.nodes.placement import ExpertPlacement
from afkv.nodes.remote_ffn import RemoteFFN
from afkv.transport.nccl import abort_all
from afkv.transport.streams import DeviceStreams

log = logging.getLogger("afkv.nccl_ffn")

MIN_CAPACITY = 16
CAP_ALIGN = 8


def gpu_identity(device: torch.device) -> str:
    """host + GPU UUID (index where torch gives none): two ranks of one NCCL communicator must
    not share a GPU."""
    if device.type != "cuda":
        return ""
    props = torch.cuda.get_device_properties(device)
    return f"{socket.gethostname()}/{getattr(props, 'uuid', device.index)}"


def capacity(num_tokens: int) -> int:
    """Capacity of a micro-batch of num_tokens: the next power of two, >= MIN_CAPACITY."""
    return max(MIN_CAPACITY, 1 << max(0, num_tokens - 1).bit_length())


def row_shares(placement: ExpertPlacement, top_k: int, dead: frozenset[int] = frozenset()) -> list[float]:
    """Per node, the share of rows with at least one pair for it under uniform routing of k
    distinct experts (the worst MoE layer; pairs of an expert split evenly over its live
    replicas, counted as a fraction of an expert)."""
    shares = [0.0] * placement.num_nodes
    for layer in range(placement.num_layers):
        if not placement.has_router[layer]:
            continue
        nodes = placement.replica_nodes[layer]  # [E, R]
        real = placement.num_replicas[layer] > 0
        num_experts = int(real.sum())
        alive = (nodes >= 0) & ~torch.isin(nodes, torch.tensor(sorted(dead), dtype=torch.int64))
        for j in range(placement.num_nodes):
            if j in dead:
                continue
            on_j = ((nodes == j) & alive).sum(-1).double() / alive.sum(-1).clamp_min(1)  # [E]
            held = float(on_j[real].sum())  # experts' worth of pairs going to j
            none = 1.0  # a row's k distinct experts all elsewhere (exact without replicas)
            for i in range(min(top_k, num_experts)):
                none *= max(0.0, num_experts - held - i) / (num_experts - i)
            shares[j] = max(shares[j], 1.0 - none)
    return shares


def peer_capacity(mb_cap: int, share: float, fixed: float = 0.0, seen: float = 0.0) -> int:
    """Rows of a peer's buffer for a micro-batch of capacity mb_cap: max(`fixed`, `seen`) x
    mb_cap when `fixed` is set, else share x mb_cap + 4 standard deviations (binomial) + 2;
    aligned, <= mb_cap. `seen`: the largest share of rows the peer needed in an overflow."""
    share = max(share, seen)
    if fixed > 0:
        rows = max(fixed, seen) * mb_cap
    else:
        rows = share * mb_cap + 4.0 * math.sqrt(mb_cap * share * (1.0 - share)) + 2.0
    rows = CAP_ALIGN * math.ceil(min(rows, mb_cap) / CAP_ALIGN)
    return int(min(mb_cap, max(CAP_ALIGN, rows)))


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


class _NcclHandle:
    def __init__(self, owner: "NcclFFN", b: _Buffers, n: int, done, direct: bool):
        self._owner, self._b, self._n, self._done, self._direct = owner, b, n, done, direct

    def result(self) -> torch.Tensor:
        self._owner._streams.current().wait_event(self._done)
        if self._direct:  # one peer, every row in order
            return self._b.y[0][: self._n]  # a view of the static buffer: consumed at once by the caller
        return combine(self._b.y, self._b.src, self._n)  # [n, H]


class NcclFFN:
    def __init__(self, control: RemoteFFN, spec: ModelSpec, device: torch.device, dtype: torch.dtype,
                 fixed_capacity: float = 0.0, host: str = "127.0.0.1"):
        """`fixed_capacity`: each peer's rows per micro-batch as a share of it (0: from the
        placement, grown on overflow); `host`: where HostPeer listens (no GPU)."""
        self.control, self.spec, self.device, self.dtype = control, spec, device, dtype
        self.host = host
        self.timings = control.timings
        self.fixed_capacity = fixed_capacity
        self._streams = DeviceStreams(device)
        self._dispatch: list = []  # per expert node: its peer, None while it is lost
        self._combine: list = []
        self._send_stream = self._streams.stream()
        self._recv_stream = self._streams.stream()
        self._buffers: dict[tuple, _Buffers] = {}  # (slot, caps, k) -> buffers
        self._mb_caps: list[int] = []  # capacity of each micro-batch of the current step
        self._mb_starts: list[int] = []  # step row of each micro-batch's first row
        self._caps: list[tuple[int, ...]] = []  # per micro-batch: each peer's capacity
        self._submits = 0  # submits in the current step: layer-major, micro-batch-minor
        self.trace: list[tuple] | None = None  # (ready, done) events when measuring
        self._last_done = None  # combine event of the step's last submit
        self._broken: PeerLostError | None = None  # set when a step timed out and aborted the communicators
        self._store, self._rank = None, 0
        self.generation = 0  # +1 whenever captured steps are void (peers joined again, new capacities or tables)
        self._tables = DispatchTables(control.placement, device)
        top_k = max([spec.layer_top_k(i) for i in range(spec.num_layers) if spec.layer_has_router(i)] + [1])
        self._top_k = top_k
        self._shares = row_shares(control.placement, top_k)
        self._seen = [0.0] * control.placement.num_nodes  # per peer: largest share of rows needed in an overflow
        # per-step device state, reset by the step's first submit (inside a captured graph too)
        self._offset = torch.zeros((), dtype=torch.int64, device=device)  # replica rotation, +1 per step
        self._peak = torch.zeros(control.placement.num_nodes, dtype=torch.float32, device=device)  # rows / cap
        self._over = torch.zeros((), dtype=torch.bool, device=device)
        self._lost = torch.zeros(0, dtype=torch.bool, device=device)  # [step rows] rows without a live expert
        self.overflows = 0  # steps computed again for lack of room
        self._replies: list[tuple[int, concurrent.futures.Future]] = []  # this step's answers, per expert node
        self._mb_sizes: list[int] = []

    graph_safe = True  # a step's GPU work (sends, receives, waits) can be captured in a CUDA graph

    @classmethod
    async def connect(cls, control: RemoteFFN, spec: ModelSpec, store, rank: int, device: torch.device,
                      dtype: torch.dtype, executor, fixed_capacity: float = 0.0,
                      host: str = "127.0.0.1") -> "NcclFFN":
        """Create the communicators with every expert node (the ids travel through the
        store), on `executor`: the model worker thread, which does all of this node's device work."""
        self = cls(control, spec, device, dtype, fixed_capacity, host)
        self._store, self._rank = store, rank
        await asyncio.get_running_loop().run_in_executor(executor, self._join_all)
        return self

    # ---- peers -------------------------------------------------------------------------------
    def _new_peer_ids(self) -> list[str]:
        if self.device.type == "cuda":
            from afkv.transport.nccl import new_unique_id

            return [new_unique_id(), new_unique_id()]
        from afkv.transport.host import new_host_id

        return [new_host_id(self.host), new_host_id(self.host)]

    def _peer(self, uid: str):
        if self.device.type == "cuda":
            from afkv.transport.nccl import NcclPeer

            return NcclPeer(uid, 0, self.device)
        from afkv.transport.host import HostPeer

        return HostPeer(uid, 0, self.device, self.control.timeout_s + 5.0)

    def _join_all(self) -> None:
        """Worker thread: make the two communicators with each live expert node. Both ends
        block in creation until the other joins; the expert node is asked over the control
        plane (on the event loop) to join, and answers before it does."""
        dead = frozenset(self.control.dead)
        dispatch, combine_peers = [], []
        for j in range(self.control.placement.num_nodes):
            if j in dead:
                dispatch.append(None)
                combine_peers.append(None)
                continue
            key = f"afkv/nccl/{self._rank}/{j}/{self.generation + 1}"
            ids = self._new_peer_ids()
            self._store.set(key, "\n".join(ids))
            try:
                asyncio.run_coroutine_threadsafe(
                    self.control._request(j, {"type": "nccl_init", "key": key, "attention": self._rank,
                                              "gpu": gpu_identity(self.device)}),
                    self.control.loop).result(timeout=self.control.timeout_s + 1.0)
            except (PeerLostError, concurrent.futures.TimeoutError) as exc:
                if "on the same GPU" in str(exc):  # the expert node refused: a configuration error, not a loss
                    raise ConfigError(str(exc), key="deployment.expert_devices") from exc
                self.control.lost(j, exc)
                abort_all([p for p in dispatch + combine_peers if p is not None], timeout_s=self.control.timeout_s)
                self.generation += 1  # fresh store keys
                return self._join_all()  # start over without it
            peers = [self._peer(u) for u in ids]
            dispatch.append(peers[0])
            combine_peers.append(peers[1])
        self._dispatch, self._combine = dispatch, combine_peers
        self._load_tables()
        self._broken = None
        self.generation += 1  # CUDA graphs captured on the old communicators are void

    def _live_peers(self) -> list:
        return [p for p in self._dispatch + self._combine if p is not None]

    def _load_tables(self) -> None:
        placement, dead = self.control.placement, frozenset(self.control.dead)
        self._tables.load(placement, dead)
        self._shares = row_shares(placement, self._top_k, dead)
        self._buffers.clear()

    # ---- steps (worker thread) ---------------------------------------------------------------
    def end_step(self) -> None:
        """Worker thread: wait for the step's last partial sums, at most timeout_s, then check
        the step's dispatch (room, lost rows). On timeout the communicators are aborted and
        the step is computed again over the live expert nodes."""
        done = self._last_done
        if done is None:
            return
        self._last_done = None
        deadline = time.monotonic() + self.control.timeout_s
        while not done.query():
            if time.monotonic() > deadline:
                self._lose_peers()
            time.sleep(0.0002)
        self._check_replies(deadline)
        if self._direct():
            return
        rows = sum(self._mb_sizes)
        state = torch.cat([self._peak, self._over.float()[None], self._lost[:rows].float()]).tolist()
        num_peers = len(self._dispatch)
        peak, over, lost = state[:num_peers], state[num_peers] > 0, state[num_peers + 1:]
        if over:
            self.overflows += 1
            self._seen = [max(s, p) for s, p in zip(self._seen, peak)]
            log.info("%s: a dispatch buffer overflowed (rows needed per peer / capacity: %s); computing the step "
                     "again with more room", self.control.node_id, [round(p, 3) for p in peak])
            self._buffers.clear()
            self.generation += 1  # captured steps have the old capacities
            raise StepRetryError("an expert node's dispatch buffer overflowed")
        if any(lost):
            dead = tuple(sorted(self.control.dead))
            exc = ExpertUnavailableError(
                f"an expert this token needs has no live replica (expert node(s) {', '.join(map(str, dead))} lost)",
                layer=-1, expert=None, nodes=dead)
            raise ExpertRowsUnavailableError({r: exc for r, v in enumerate(lost) if v})

    def _lose_peers(self) -> None:
        """A step timed out or a peer connection broke: abort every communicator, mark the
        expert nodes that do not answer on the control plane lost, and have the step computed
        again (or fail it when every node answers: the data plane itself is stuck)."""
        log.warning("%s: a step on the fixed-buffer data plane failed; aborting its connections and asking "
                    "the expert nodes", self.control.node_id)
        aborted = abort_all(self._live_peers(), timeout_s=self.control.timeout_s)
        silent = []
        for j, peer in enumerate(self._dispatch):
            if peer is None:
                continue
            try:
                asyncio.run_coroutine_threadsafe(
                    self.control._request(j, {"type": "eplb_placement"}), self.control.loop).result(
                    timeout=min(self.control.timeout_s, 5.0) + 1.0)
            except (PeerLostError, concurrent.futures.TimeoutError) as exc:
                self.control.lost(j, exc)
                silent.append(j)
        self._broken = PeerLostError(
            f"expert node(s) {', '.join(map(str, silent)) or '(none silent)'} did not answer within "
            f"{self.control.timeout_s:.0f} s; communicators " + ("aborted" if aborted else "abort still running"))
        if silent:
            raise StepRetryError(str(self._broken)) from self._broken
        raise self._broken

    def _direct(self) -> bool:
        """One expert node, one replica per expert, none lost: every row goes to it, in order."""
        return len(self._dispatch) == 1 and self._tables.single

    def ensure_joined(self) -> None:
        """Join the expert nodes again when the last step aborted the communicators, a lost
        node came back, or the placement changed (before a CUDA graph is chosen: graphs
        captured on the old communicators or tables are void)."""
        control = self.control
        if control._newer_at is not None:  # an expert node answered with a newer placement epoch
            j, control._newer_at = control._newer_at, None
            control.refresh(j)
        control.rejoin_if_uncovered()
        dead = frozenset(control.dead)
        if self._broken is not None or dead != self._tables.dead:
            if self._broken is None:  # a lost node came back: drop what is left of the old communicators
                for p in self._live_peers():
                    p.abort()
            self._join_all()
        elif control.placement is not self._tables.placement:
            log.info("%s: dispatch tables for placement epoch %d", control.node_id, control.placement.epoch)
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
            self._lost = torch.zeros(capacity(rows), dtype=torch.bool, device=self.device)
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
            self._replies.append((j, asyncio.run_coroutine_threadsafe(self.control._request(j, msg),
                                                                      self.control.loop)))

    def _check_replies(self, deadline: float) -> None:
        """Every expert node answers a step with its placement epoch and whether it holds the
        experts of ours. A node that did not computed wrong partial sums: it is brought to
        our placement (or we to its newer one) and the step is computed again."""
        replies, self._replies = self._replies, []
        behind = []
        for j, fut in replies:
            try:
                reply = fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except (PeerLostError, concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
                continue  # faults show on the data plane
            epoch = int(reply.get("epoch", 0))
            self.control.note_epoch(j, epoch)  # a newer placement is fetched before the next step
            if not reply.get("ok", True):
                behind.append((j, epoch))
        if not behind:
            return
        mine = self._tables.placement.epoch
        for j, epoch in behind:
            if epoch < mine:  # it missed a placement: give it ours
                try:
                    self.control._call(self.control._rejoin(j), self.control.timeout_s * 2 + 1.0)
                except (PeerLostError, concurrent.futures.TimeoutError) as exc:
                    self.control.lost(j, exc)
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

    def submit(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> _NcclHandle:
        first = self._submits == 0
        slot = self._submits % len(self._caps)
        self._submits += 1
        n, k = topk_ids.shape
        assert n <= self._mb_caps[slot], f"micro-batch of {n} tokens over its announced capacity {self._mb_caps[slot]}"
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
            b.ids[0, n:].fill_(self.control.placement.sentinel)  # held by no expert node
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
                self._lost[start: start + n] |= t.lost_rows(layer, topk_ids)
        s = self._streams
        compute = s.current()
        ready = s.event(enable_timing=self.trace is not None)
        ready.record(compute)
        self._send_stream.wait_event(ready)
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
        done = s.event(enable_timing=self.trace is not None)
        done.record(self._recv_stream)
        if self.trace is not None:
            self.trace.append((ready, done))
        self._last_done = done
        return _NcclHandle(self, b, n, done, direct)

    async def aclose(self) -> None:
        await self.control.aclose()
        # communicators are freed with the process: destroying one while the peer may still
        # be inside a call can hang, and shutdown must never deadlock
