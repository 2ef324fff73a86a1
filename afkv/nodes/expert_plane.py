"""ExpertPlane: an expert node's side of the fixed-buffer data plane, one link per attention node.

    attention node --{"type": "nccl_init", key, attention, gpu}--> join: two peers (dispatch,
                     combine) of the kind afkv.transport.peer.peer_kind picks; their ids wait
                     in the rendezvous under `key`
    attention node --{"type": "step", caps, mb_caps, dense_layers, epoch}--> one whole step:
                     for every layer and micro-batch, receive x [c, H], ids [c, k], weights
                     [c, k] into fixed buffers, compute the FFN, send y [c, H] back
    attention node <--{"type": "step", epoch, ok, compute_s}-- (ok: this node holds the experts
                     of that placement epoch; compute_s: FFN seconds measured since the last answer)

Steps run on lanes: a thread and its streams, with the buffers, CUDA graphs and load counts
of the steps it ran. `expert_batching` (the deployment's key) picks how:

    per_attention_node  each link has its own lane and each step runs alone on it (steps of
                        several attention nodes interleave: a shared thread or stream could
                        make two of them wait for each other)
    merged              the event loop gathers the links' step announcements into a bundle
                        and runs it as one step on a lane of the node's pool: for every layer
                        and micro-batch slot, each member's rows are received into its segment
                        of one buffer (x [sum of caps, H], ids, w: views, no concatenation),
                        ONE FFN call runs over the whole buffer, and each member gets its
                        segment of y back. A slot only some members have merges those.

A run (`_run_bundle`) is the same code for both: per_attention_node runs bundles of one.
Rows stay their link's and the FFN is row-independent, so every member's y equals what a
step of its own would have given (greedy tokens equal colocated's, as in every topology).

Gathering (merged, event loop, `_gather`): a bundle waits for every *active* link (one that
stepped and was not found idle) to announce its step, then runs with those that came. The wait
is bounded by `gather_bound_s`: twice the previous run's wall time (at least GATHER_FLOOR_S, at
most a tenth of the peer timeout), measured from the end of that run (or the first
announcement). In lockstep an attention node announces its next step within its own host
turnaround after the answer, well inside a step; one that has not come within two steps'
time is idle or out of step, and waiting longer would cost more than running it in the next
bundle. A link missing at the bound is no longer active (`gather_timeouts` counts it): an
attention node that stops stepping (no requests) delays the others by the bound once, then not
at all until it steps again. The barrier makes the attention nodes run in lockstep (their
answers return together): MegaScale-Infer's aggregation, intended.

Lanes (merged): in steady state every bundle runs on the pool's first lane, so its graphs
replay. A bundle never waits behind a run it does not depend on: with several expert nodes
their bundles can differ (A alone on one node, A and B merged on another), and if B's run
queued behind A's alone while A's merged run waited for B's rows, the two nodes would wait for
each other until the peer timeout. So a bundle takes a lane that is idle on the host and
whose pending device work (the last run's: runs on a lane take it in this order) is either
done or only of links in the bundle (each of them has ended that step on its attention node:
it announced the next one, so that work finishes); else a new lane. Its run first waits (on
the device, an event) for the previous run of each member that ran on another lane, so each
peer's calls stay in one order on the device. The pool holds at most twice the links; past
that a bundle takes the oldest lane (it may then wait for it).

On GPUs with NCCL peers the first run of a bundle shape (the tuple of (link, StepShape))
runs eagerly (it warms up the kernels), the second is captured as a CUDA graph
(thread-local capture: other lanes go on meanwhile) and replayed from then on; host peers
never are (their calls are host work). In a merged run every member's receives of a (layer,
slot) are one NCCL group on the lane's receive stream, their sends one group on its send
stream. On CPUs the work is synchronous. Slots without a row name expert `sentinel` (held by
nobody) with weight 0.

Faults: a member whose host peer fails mid-run (PeerLostError, TransportError), or whose
rows do not come within half the peer timeout (MEMBER_WAIT_SHARE: the others' attention
nodes wait for their answers at most the whole timeout), gets that error as its answer; its
segment holds sentinel rows from then on and the others' run goes on. On NCCL peers a lost member stalls its lane's streams: when an attention node joins
again while a lane with its last run has not finished it, the peers of that run's members
are aborted too (the stalled kernels return), and those members' attention nodes see their
step fail and join again, as after any stuck data plane.

Load counts: each lane counts pairs per (layer, expert) on the device inside its runs (a
merged FFN counts each pair once); `flush_loads` moves them to the load window (`window`,
afkv.eplb.stats) without waiting for the device, or waiting (the `stats` answer).

Owners: `_links`, `_joining`, `_pending`, `_active`, the lane pool (and each lane's `busy`)
and the gatherer belong to the event loop
(a join's peers are opened on the link's own thread, then installed by the loop); threads
read `_links` as a snapshot. A lane's buffers, graphs and streams belong to its thread.
`_loads_lock` guards the lanes' device counts (a lane adds, the worker or a lane flushes),
`_flush_lock` the copies on their way to the window.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from afkv.config import EXPERT_BATCHING
from afkv.eplb.stats import LoadWindow
from afkv.errors import ConfigError, FrameError, PeerLostError, TransportError
from afkv.model.graphs import CAPTURE_LOCK
from afkv.model.sides import FFNSide
from afkv.model.spec import ModelSpec
from afkv.nodes.expert_stats import ExpertStats
from afkv.nodes.holdings import Holdings
from afkv.transport.peer import Peer, abort_all, gpu_identity, open_peer, peer_kind
from afkv.transport.streams import DeviceStreams

log = logging.getLogger("afkv.expert_plane")

GATHER_RUNS = 2.0  # merged: a bundle waits for the active links at most this many times the last run's wall time,
GATHER_FLOOR_S = 0.005  # at least this long,
GATHER_SHARE = 0.1  # and at most this share of the peer timeout
MEMBER_WAIT_SHARE = 0.5  # merged, host peers: a member's rows come within this share of the peer timeout


def _log_failure(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("joining the data plane's peers failed: %s", fut.exception())


def _log_gatherer_end(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the merged steps' gatherer failed: %r", task.exception())


@dataclass(frozen=True)
class StepShape:
    """Buffers of one fixed-buffer step: this node's capacity per micro-batch (`caps`), the
    micro-batch capacities (`mb_caps`, for `dense_layers`: layers whose dense MLP / shared
    expert this node computes for every row)."""

    caps: tuple[int, ...]
    mb_caps: tuple[int, ...]
    dense_layers: frozenset[int]

    @classmethod
    def from_msg(cls, msg: dict) -> "StepShape":
        try:
            shape = cls(tuple(int(c) for c in msg["caps"]), tuple(int(c) for c in msg["mb_caps"]),
                        frozenset(int(i) for i in msg.get("dense_layers", ())))
        except (KeyError, TypeError, ValueError) as exc:
            raise FrameError(f"malformed step: {exc}") from exc
        if len(shape.caps) != len(shape.mb_caps):
            raise FrameError(f"step with {len(shape.caps)} capacities for {len(shape.mb_caps)} micro-batches")
        if any(c < 0 for c in shape.caps + shape.mb_caps):
            raise FrameError(f"step with a negative capacity: {shape.caps}, {shape.mb_caps}")
        return shape


@dataclass(eq=False)
class _Lane:
    """A thread and streams that run steps, and what its runs keep."""

    executor: ThreadPoolExecutor
    recv: object  # streams
    send: object
    compute: object
    loads: torch.Tensor  # [L, E + 1] pairs per (layer, expert) since the last flush
    buffers: dict = field(default_factory=dict)  # (slot, caps per member, k) -> static x, ids, w
    read: dict = field(default_factory=dict)  # same key -> event: end of the last FFN reading them
    graphs: dict = field(default_factory=dict)  # bundle key -> captured run
    counts: dict = field(default_factory=dict)  # bundle key -> runs
    pool: object = None  # CUDA graph memory pool of this lane's graphs
    ffn: object = None  # the FFN side its graphs were captured with
    done: object = None  # event after the last run's work (merged)
    members: frozenset = frozenset()  # links of the last run (merged): its device work may still wait for them
    busy: bool = False  # a run is on its thread (merged; the event loop's)


@dataclass(eq=False)
class _Link:
    """One attention node's data plane on this expert node."""

    attention: str
    dispatch: Peer
    combine: Peer
    executor: ThreadPoolExecutor  # the thread joining its peers (per_attention_node: running its steps too)
    lane: _Lane | None  # its own lane (per_attention_node); None when the node's lanes run its steps
    last: tuple | None = None  # merged: its last run's (lane, event after its work, members)


@dataclass(eq=False)
class _Pending:
    """A step announced and not yet run (merged)."""

    link: _Link
    shape: StepShape
    epoch: int
    future: asyncio.Future  # -> whether this node holds the experts of `epoch`


Plan = list[tuple[int, int, int, tuple[int, ...]]]  # (layer, slot, k, each member's rows) per FFN call


class ExpertPlane:
    def __init__(self, spec: ModelSpec, index: int, device: torch.device, dtype: torch.dtype, holdings: Holdings,
                 stats: ExpertStats, store, peer_timeout_s: float, window_s: float,
                 expert_batching: str = "per_attention_node"):
        """`store`: the rendezvous, where the attention nodes put their peers' ids;
        `expert_batching`: per_attention_node | merged (module docstring)."""
        if expert_batching not in EXPERT_BATCHING:
            raise ConfigError(f"expert_batching must be one of {', '.join(EXPERT_BATCHING)}, got {expert_batching!r}",
                              key="deployment.expert_batching")
        self.spec, self.index, self.device, self.dtype = spec, index, device, dtype
        self.holdings, self.stats, self.store, self.peer_timeout_s = holdings, stats, store, peer_timeout_s
        self.window = LoadWindow(spec.num_layers, holdings.placement.sentinel, window_s)
        self.cuda_graphs = device.type == "cuda"  # steps replay CUDA graphs after one eager step
        self._last_run_s = 0.0  # wall time of the last merged run (event loop)
        self._run_ended = 0.0  # loop time when it ended
        self._streams = DeviceStreams(device)
        self._links: dict[str, _Link] = {}  # attention node -> its link
        self._forgotten: set[str] = set()  # attention nodes whose link `forget` dropped, until they join again
        self._joining: dict[str, asyncio.Task] = {}  # attention node -> its latest join
        self._merged = expert_batching == "merged"
        self._pool: list[_Lane] = []  # merged: lanes, oldest first
        self._pending: dict[str, _Pending] = {}  # attention node -> its announced step (merged)
        self._active: set[str] = set()  # attention nodes a bundle waits for (merged)
        self._wake = asyncio.Event()  # a step was announced (merged)
        self._gatherer: asyncio.Task | None = None
        self._runs: set[asyncio.Task] = set()  # merged runs in flight
        self._load_copies: list[tuple] = []  # (event, host counts) copies on their way to the window
        self._loads_t = 0.0
        self._loads_lock = threading.Lock()
        self._flush_lock = threading.Lock()

    @property
    def linked(self) -> bool:
        return bool(self._links)

    @property
    def num_links(self) -> int:
        """Attention nodes whose data plane is joined here."""
        return len(self._links)

    @property
    def merged(self) -> bool:
        return self._merged

    @property
    def gather_bound_s(self) -> float:
        """How long a merged bundle waits for the active links (module docstring)."""
        return min(self.peer_timeout_s * GATHER_SHARE, max(GATHER_FLOOR_S, GATHER_RUNS * self._last_run_s))

    def _lane(self, name: str, executor: ThreadPoolExecutor | None = None) -> _Lane:
        cuda = self._streams.cuda
        if executor is None:
            executor = ThreadPoolExecutor(1, thread_name_prefix=name, initializer=torch.cuda.set_device if cuda else None,
                                          initargs=(self.device,) if cuda else ())
        st = self._streams
        loads = torch.zeros(self.spec.num_layers, self.window.shape[1] + 1, dtype=torch.int64, device=self.device)
        return _Lane(executor, st.stream(), st.stream(), st.stream(), loads)

    def _lanes(self) -> list[_Lane]:
        if self._merged:
            return list(self._pool)
        return [link.lane for link in list(self._links.values())]

    def _free_lane(self, members: frozenset) -> _Lane:
        """Merged, event loop: the lane for a bundle of `members` (module docstring)."""
        for lane in self._pool:
            if not lane.busy and (lane.done is None or lane.members <= members or lane.done.query()):
                return lane
        if len(self._pool) >= 2 * max(1, len(self._links)):
            log.warning("expert node %d: %d lanes busy; a bundle waits behind the oldest", self.index, len(self._pool))
            lane = self._pool.pop(0)
        else:
            lane = self._lane(f"afkv-expert{self.index}-merged{len(self._pool)}")
        self._pool.append(lane)
        return lane

    def close(self) -> None:
        if self._gatherer is not None:
            self._gatherer.cancel()
        for run in self._runs:
            run.cancel()
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(PeerLostError("the expert node is closing"))
        self._pending.clear()
        for link in self._links.values():
            link.executor.shutdown(wait=False, cancel_futures=True)
        for lane in self._pool:
            lane.executor.shutdown(wait=False, cancel_futures=True)

    def forget(self, attention: str) -> None:
        """Event loop: `attention`'s control connection ended (its process died or hung, or it
        will join again): abort its data plane's peers and drop its link, so that nothing waits
        for its rows. Its receives posted on the device end (an NCCL receive from a dead peer
        would spin on this GPU and stall its lane until a join from the same node), a merged
        run that has it as a member goes on without it, its announced step fails with
        PeerLostError, and merged bundles stop waiting for it. Its lane, buffers and graphs go
        with the link (per_attention_node; its load counts not yet flushed go too). A step it
        still sends before joining again is answered PeerLostError (a step from a node that
        never joined is a FrameError): the attention node finds its peers aborted, joins again
        and computes the step again."""
        self._active.discard(attention)
        pending = self._pending.pop(attention, None)
        if pending is not None and not pending.future.done():
            pending.future.set_exception(PeerLostError(f"{attention}'s control connection ended"))
        self._wake.set()  # a bundle waiting for it re-checks
        link = self._links.pop(attention, None)
        if link is None:
            return
        self._forgotten.add(attention)
        self.holdings.unlink(attention)  # a departed node holds no old placement's experts in memory
        log.info("expert node %d: %s left; aborting its data plane", self.index, attention)
        self.stats.link_dropped()
        threading.Thread(target=abort_all, args=([link.dispatch, link.combine], 30.0),
                         name="afkv-expert-forget", daemon=True).start()
        link.executor.shutdown(wait=False)

    # ---- joining (event loop) ------------------------------------------------------------------
    async def join(self, attention: str, msg: dict) -> dict:
        """nccl_init: answer at once, then join on the new link's own thread (it blocks until
        the attention node joins too, never the worker); its steps wait for the join."""
        key, gpu = msg.get("key"), msg.get("gpu", "")
        if not isinstance(key, str) or not isinstance(gpu, str):
            raise FrameError(f"nccl_init from {attention} needs a str key and gpu, got {key!r:.50}, {gpu!r:.50}")
        try:  # the attention node put the ids there before asking: no waiting
            ids = (await asyncio.to_thread(self.store.get, key, 0.0)).decode().split("\n")
        except PeerLostError as exc:
            raise FrameError(f"nccl_init from {attention}: no data-plane ids under {key!r}: {exc}") from exc
        if len(ids) != 2:
            raise FrameError(f"nccl_init from {attention}: {len(ids)} data-plane ids under {key!r}, not 2")
        kind = peer_kind(gpu_identity(self.device), gpu)
        cuda = self._streams.cuda
        executor = ThreadPoolExecutor(1, thread_name_prefix=f"afkv-expert{self.index}-{attention}",
                                      initializer=torch.cuda.set_device if cuda else None,
                                      initargs=(self.device,) if cuda else ())
        joining = self._joining[attention] = asyncio.create_task(self._join(attention, kind, ids, executor))
        joining.add_done_callback(_log_failure)
        return {"type": "ok"}

    async def _join(self, attention: str, kind: str, ids: list[str], executor: ThreadPoolExecutor) -> None:
        old = self._links.pop(attention, None)
        try:
            peers = await asyncio.get_running_loop().run_in_executor(executor, self._open, old, kind, ids)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        self.holdings.link(attention)
        self._forgotten.discard(attention)
        lane = None if self.merged else self._lane("", executor)
        self._links[attention] = _Link(attention, *peers, executor, lane)

    def _open(self, old: _Link | None, kind: str, ids: list[str]) -> tuple[Peer, Peer]:
        """The new link's thread: drop what the attention node's old link left in flight (it
        joins again after a failed step), then join its two new peers. Merged: when the lane
        of its last run has not finished it (a member lost on NCCL stalls it), the peers of
        that run's members are aborted too, so the lane moves again."""
        if old is not None:
            stalled = {old}
            if old.last is not None:
                _, done, members = old.last
                deadline = time.monotonic() + self.peer_timeout_s
                while not done.query() and time.monotonic() < deadline:
                    time.sleep(0.001)
                if not done.query():
                    stalled |= members
                    log.warning("expert node %d: a merged lane is stalled; aborting the peers of %s", self.index,
                                sorted(link.attention for link in stalled))
            abort_all([p for link in stalled for p in (link.dispatch, link.combine)], timeout_s=30.0)
            old.executor.shutdown(wait=False)
        return (open_peer(kind, ids[0], 1, self.device, self.peer_timeout_s),
                open_peer(kind, ids[1], 1, self.device, self.peer_timeout_s))

    # ---- steps (event loop) --------------------------------------------------------------------
    async def step(self, attention: str, msg: dict) -> dict:
        """Event loop: run one step of `attention` (alone on its link's lane, or in the next
        merged bundle) and answer it."""
        shape = StepShape.from_msg(msg)
        try:
            epoch = int(msg.get("epoch", 0))
        except (TypeError, ValueError) as exc:
            raise FrameError(f"malformed step: {exc}") from exc
        joining = self._joining.get(attention)
        if joining is not None and not joining.done():
            # the attention node may step as soon as its own end is joined: this node's end
            # (and its new link) can still be on the way, and the old link must not take it
            done, _ = await asyncio.wait([joining], timeout=self.peer_timeout_s)
            if not done:
                raise FrameError(f"step from {attention}: its data plane is not joined after "
                                 f"{self.peer_timeout_s:.0f} s")
        link = self._links.get(attention)
        if link is None:
            if attention in self._forgotten:  # it finds its peers gone, joins again and steps again
                raise PeerLostError(f"step from {attention}: its data plane was dropped on expert node "
                                    f"{self.index} when its control connection ended")
            raise FrameError(f"step from {attention} before its data plane was joined")
        if link.lane is not None:
            outcome, = await asyncio.get_running_loop().run_in_executor(
                link.lane.executor, self._run_bundle, link.lane, [(link, shape, epoch)])
            if isinstance(outcome, BaseException):
                raise outcome
            ok = outcome
        else:
            ok = await self._announce(link, shape, epoch)
        return {"type": "step", "epoch": self.holdings.placement.epoch, "ok": ok,
                "compute_s": self.stats.take_compute_s(attention)}

    async def _announce(self, link: _Link, shape: StepShape, epoch: int) -> bool:
        """Merged: queue the step for the next bundle and wait for its answer."""
        loop = asyncio.get_running_loop()
        old = self._pending.pop(link.attention, None)
        if old is not None and not old.future.done():
            old.future.set_exception(FrameError(f"step from {link.attention} replaced by its next step before it ran"))
        future = loop.create_future()
        self._pending[link.attention] = _Pending(link, shape, epoch, future)
        self._active.add(link.attention)
        self._wake.set()
        if self._gatherer is None or self._gatherer.done():
            self._gatherer = asyncio.create_task(self._gather())
            self._gatherer.add_done_callback(_log_gatherer_end)
        return await future

    async def _gather(self) -> None:
        """Merged: gather bundles and start their runs, for as long as the node serves (module
        docstring). The bound runs from the first announcement, and again from the end of each
        run meanwhile (its members announce their next steps after it)."""
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            bound_s = self.gather_bound_s
            deadline = loop.time() + bound_s
            while self._pending and not self._active <= self._pending.keys():
                try:
                    async with asyncio.timeout_at(deadline):
                        await self._wake.wait()
                except TimeoutError:
                    break
                self._wake.clear()
                deadline = max(deadline, self._run_ended + bound_s)
            missing = self._active - self._pending.keys()
            if self._pending and missing:
                log.info("expert node %d: merged step without %s (no step within %.2f s): idle until they step",
                         self.index, sorted(missing), bound_s)
                self._active -= missing
                self.stats.gather_timeout()
            pending, self._pending = list(self._pending.values()), {}
            bundle = []
            for p in pending:
                if p.future.done():  # its answer is no longer awaited
                    continue
                if self._links.get(p.link.attention) is not p.link:
                    p.future.set_exception(FrameError(f"step from {p.link.attention}: its data plane was joined "
                                                      "again before the step ran"))
                    continue
                bundle.append(p)
            if not bundle:
                continue
            lane = self._free_lane(frozenset(p.link for p in bundle))
            lane.busy = True
            run = asyncio.create_task(self._run_merged(lane, bundle))
            self._runs.add(run)
            run.add_done_callback(self._runs.discard)

    async def _run_merged(self, lane: _Lane, bundle: list[_Pending]) -> None:
        """Event loop: one bundle's run on `lane`, then each member's answer."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            outcomes = await loop.run_in_executor(lane.executor, self._run_bundle, lane,
                                                  [(p.link, p.shape, p.epoch) for p in bundle])
        except Exception as exc:  # the run itself failed (not one member): every member gets it
            outcomes = [exc] * len(bundle)
        finally:
            lane.busy = False
        self._run_ended = loop.time()
        self._last_run_s = self._run_ended - t0
        self._wake.set()  # a gathering bundle may wait for these members' next steps
        for p, outcome in zip(bundle, outcomes):
            if isinstance(outcome, BaseException):
                self._active.discard(p.link.attention)
                if not p.future.done():
                    p.future.set_exception(outcome)
            elif not p.future.done():
                p.future.set_result(outcome)

    # ---- runs (a lane's thread) ----------------------------------------------------------------
    def _plan(self, shapes: tuple[StepShape, ...]) -> Plan:
        """Every FFN call of a run over these steps, in the order both ends of each link use
        (layer-major, slot-minor): (layer, slot, k, each member's rows there; 0: none)."""
        plan = []
        for layer in range(self.spec.num_layers):
            k = self.spec.layer_top_k(layer)
            routed = self.spec.layer_has_router(layer)
            per = [s.mb_caps if layer in s.dense_layers else s.caps if routed else () for s in shapes]
            for slot in range(max(len(c) for c in per)):
                caps = tuple(c[slot] if slot < len(c) else 0 for c in per)
                if any(caps):
                    plan.append((layer, slot, k, caps))
        return plan

    @torch.inference_mode()
    def _run_bundle(self, lane: _Lane, steps: list[tuple[_Link, StepShape, int]]) -> list[bool | BaseException]:
        """The lane's thread: one run of the members' steps: for every layer and micro-batch
        slot, receive each member's rows -> one FFN -> send each its rows' results, on the
        lane's streams. -> per member: whether this node holds the experts of its step's
        placement epoch (if not, its attention node computes the step again after the
        placements agree), or the error its peers raised."""
        oks = []
        for link, _, epoch in steps:
            ok, ffn = self.holdings.step_with(link.attention, epoch)  # the last one's FFN side for the whole run
            if not ok:
                log.warning("expert node %d: step of %s with placement epoch %d; this node holds epoch %d",
                            self.index, link.attention, epoch, self.holdings.placement.epoch)
            oks.append(ok)
        if lane.ffn is not ffn:  # captured on the old weights
            lane.graphs.clear()
            lane.counts.clear()
            lane.ffn = ffn
        self.stats.settle(wait=False)
        self.flush_loads(False)
        members = tuple(link for link, _, _ in steps)
        shapes = tuple(shape for _, shape, _ in steps)
        key = tuple(zip(members, shapes))
        if self._merged:
            self._forget_old_links(lane)
        plan = self._plan(shapes)
        graph = lane.graphs.get(key)
        if (graph is None and self.cuda_graphs and lane.counts.get(key, 0) >= 1
                and all(link.dispatch.graph_safe and link.combine.graph_safe for link in members)):
            graph = self._capture(lane, key, members, plan, ffn)
        lane.counts[key] = lane.counts.get(key, 0) + 1
        failed: dict[_Link, BaseException] = {}
        with self._streams.use(lane.compute):
            if self._merged:
                for link in members:  # each peer's calls in one order on the device
                    if link.last is not None and link.last[0] is not lane:
                        lane.compute.wait_event(link.last[1])
            if graph is not None:
                graph.replay()  # FFN time of replayed steps: the `ffn_time` request measures it apart
            else:
                self._enqueue(lane, members, plan, ffn, failed, timed=True)
            if self._merged:
                done = self._streams.event()
                done.record(lane.compute)
                lane.done, lane.members = done, frozenset(members)
                for link in members:
                    link.last = (lane, done, lane.members)
        for link, shape in zip(members, shapes):
            if link not in failed:
                self.stats.step(sum(shape.caps))
        self.stats.bundle(len(members), len(plan))
        self.stats.settle(wait=False)
        return [failed.get(link, ok) for link, ok in zip(members, oks)]

    def _forget_old_links(self, lane: _Lane) -> None:
        """Graphs and counts of bundles with a link that joined again or left (its peers are void)."""
        links = self._links
        for key in [key for key in lane.counts if any(links.get(link.attention) is not link for link, _ in key)]:
            lane.counts.pop(key, None)
            lane.graphs.pop(key, None)

    def _capture(self, lane: _Lane, key: tuple, members: tuple[_Link, ...], plan: Plan, ffn: FFNSide):
        """A CUDA graph of one run's receives, FFNs and sends, or None when capture fails."""
        lane.compute.synchronize()  # the eager run before must be done
        g = torch.cuda.CUDAGraph()
        try:
            # captured on the lane's own compute stream (torch's default capture stream is
            # pooled: it may be another lane's NCCL stream)
            with CAPTURE_LOCK, torch.cuda.graph(g, pool=lane.pool, stream=lane.compute,
                                                capture_error_mode="thread_local"):
                self._enqueue(lane, members, plan, ffn, None, timed=False)
        except RuntimeError as e:
            log.warning("expert node %d: step of %s not capturable, running eagerly: %s", self.index,
                        [shape for _, shape in key], e)
            self.cuda_graphs = False
            return None
        lane.pool = g.pool()  # graphs of one lane replay in order on its stream: they may share a pool
        lane.graphs[key] = g
        return g

    def _enqueue(self, lane: _Lane, members: tuple[_Link, ...], plan: Plan, ffn: FFNSide,
                 failed: dict | None, timed: bool) -> None:
        """Enqueue a run on the current (compute) stream and the lane's side streams. A member
        whose host peer fails lands in `failed` (None while capturing: nothing may fail
        there) and its rows are sentinel rows from then on."""
        st = self._streams
        compute, recv_stream, send_stream = st.current(), lane.recv, lane.send
        begin = st.event()
        begin.record(compute)  # the side streams fork from here (and join below): capturable
        recv_stream.wait_event(begin)
        send_stream.wait_event(begin)
        hidden = self.spec.hidden_size
        attentions = tuple(link.attention for link in members)
        # host peers, merged: a member whose rows do not come within half the peer timeout is
        # dropped from the run, so the others' answers reach them within theirs
        wait_s = self.peer_timeout_s * MEMBER_WAIT_SHARE if self._merged else None
        keep = []  # outputs stay referenced until the run is enqueued: a send may still read them
        for layer, slot, k, caps in plan:
            if failed and len(failed) == len(members):
                break  # nobody left to answer
            key = (slot, caps, k)
            bufs = lane.buffers.get(key)
            if bufs is None:
                rows = sum(caps)
                bufs = lane.buffers[key] = (
                    torch.zeros(rows, hidden, dtype=self.dtype, device=self.device),  # x [sum caps, H]
                    torch.zeros(rows, k, dtype=torch.int32, device=self.device),  # ids [sum caps, k]
                    torch.zeros(rows, k, dtype=torch.float32, device=self.device))  # w [sum caps, k]
            x, ids, w = bufs
            segments = []  # (member, first row, rows)
            start = 0
            for link, cap in zip(members, caps):
                if cap:
                    segments.append((link, start, cap))
                start += cap
            last_read = lane.read.get(key)
            if last_read is not None:  # the previous FFN on these buffers must have read them
                recv_stream.wait_event(last_read)
            with st.use(recv_stream), ExitStack() as group:
                for link, _, _ in segments:
                    group.enter_context(link.dispatch.group())
                for link, a, c in segments:
                    seg = (x[a: a + c], ids[a: a + c], w[a: a + c])  # [c, H], [c, k], [c, k] views
                    if failed is not None and link in failed:
                        self._blank(*seg)
                        continue
                    try:
                        for t in seg:
                            link.dispatch.recv(t, recv_stream, wait_s)
                    except (PeerLostError, TransportError) as exc:
                        if failed is None:
                            raise
                        failed[link] = exc
                        log.warning("expert node %d: the data plane of %s failed in a step: %s", self.index,
                                    link.attention, exc)
                        self._blank(*seg)
            arrived = st.event()
            arrived.record(recv_stream)
            compute.wait_event(arrived)
            if timed:
                start_ev, end_ev = st.event(enable_timing=True), st.event(enable_timing=True)
                start_ev.record(compute)
            ids64 = ids.long()  # [sum caps, k]
            y = ffn.forward(layer, x, ids64, w)  # [sum caps, H]
            if self.spec.layer_has_router(layer):
                flat = ids64.flatten()
                with self._loads_lock:
                    lane.loads[layer].index_add_(0, flat, torch.ones_like(flat))
            read = st.event()
            read.record(compute)
            if timed:
                end_ev.record(compute)
                self.stats.time_ffn(attentions, start_ev, end_ev)
            send_stream.wait_event(read)
            with st.use(send_stream), ExitStack() as group:
                live = [(link, a, c) for link, a, c in segments if failed is None or link not in failed]
                for link, _, _ in live:
                    group.enter_context(link.combine.group())
                for link, a, c in live:
                    try:
                        link.combine.send(y[a: a + c], send_stream)  # [c, H] its rows
                    except (PeerLostError, TransportError) as exc:
                        if failed is None:
                            raise
                        failed[link] = exc
            keep.append(y)
            lane.read[key] = read
        compute.wait_stream(send_stream)
        compute.wait_stream(recv_stream)
        if timed and st.cuda:
            for y in keep:
                y.record_stream(send_stream)

    def _blank(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> None:
        """A failed member's segment: rows of no expert, weight 0, zeros (CPU host peers: synchronous)."""
        x.zero_()
        ids.fill_(self.holdings.placement.sentinel)
        w.zero_()

    # ---- load counts ---------------------------------------------------------------------------
    @torch.inference_mode()
    def flush_loads(self, wait: bool) -> None:
        """Move the device's load counts into the window, without waiting for the device
        (unless `wait`): a copy starts at most every half window bucket, and lands once its
        event has passed."""
        with self._flush_lock:
            self._flush_loads_locked(wait)

    def _flush_loads_locked(self, wait: bool) -> None:
        pending = []
        for event, host in self._load_copies:
            if wait:
                event.synchronize()
            elif not event.query():
                pending.append((event, host))
                continue
            self.window.add_all(host[:, : self.window.shape[1]])
        self._load_copies = pending
        now = time.monotonic()
        lanes = self._lanes()
        if not lanes or not (wait or now - self._loads_t > self.window.bucket_s / 2):
            return
        self._loads_t = now
        for lane in lanes:
            host = torch.empty(lane.loads.shape, dtype=torch.int64, pin_memory=self._streams.cuda)
            with self._streams.use(lane.compute), self._loads_lock:  # ordered after the lane's runs
                host.copy_(lane.loads, non_blocking=True)
                lane.loads.zero_()
                event = self._streams.event()
                event.record(lane.compute)
            if wait:
                event.synchronize()
                self.window.add_all(host[:, : self.window.shape[1]])
            else:
                self._load_copies.append((event, host))

    # ---- benchmarks ----------------------------------------------------------------------------
    @torch.inference_mode()
    def ffn_time(self, caps: list[int], reps: int) -> float:
        """Worker thread (GPU): seconds of one step's FFN compute alone (every layer and
        micro-batch at these capacities, no transfers), median of `reps` CUDA-graph replays."""
        ffn = self.holdings.ffn
        hidden = self.spec.hidden_size
        gen = torch.Generator(device=self.device).manual_seed(0)
        inputs = []
        for layer in range(self.spec.num_layers):
            k = self.spec.layer_top_k(layer)
            for cap in caps:
                x = torch.randn(cap, hidden, generator=gen, device=self.device).to(self.dtype) * 0.1
                ids = torch.randint(0, self.spec.num_experts or 1, (cap, k), generator=gen, device=self.device)
                inputs.append((layer, x, ids, torch.full((cap, k), 1.0 / k, device=self.device)))

        def run():
            for layer, x, ids, w in inputs:
                ffn.forward(layer, x, ids, w)

        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            run()  # warm-up
        torch.cuda.current_stream(self.device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()
        times = []
        for _ in range(reps + 1):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        del g
        return sorted(times[1:])[reps // 2]
