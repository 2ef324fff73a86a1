"""ExpertPlane: an expert node's side of the fixed-buffer data plane, one link per attention node.

    attention node --{"type": "nccl_init", key, attention, gpu}--> join: two peers (dispatch,
                     combine) of the kind afkv.transport.peer.peer_kind picks; their ids wait
                     in the rendezvous under `key`
    attention node --{"type": "step", caps, mb_caps, dense_layers, epoch}--> one whole step:
                     for every layer and micro-batch, receive x [c, H], ids [c, k], weights
                     [c, k] into fixed buffers, compute the FFN, send y [c, H] back
    attention node <--{"type": "step", epoch, ok, compute_s}-- (ok: this node holds the experts
                     of that placement epoch; compute_s: FFN seconds measured since the last answer)

Each link has its own thread and streams (steps of several attention nodes interleave: a
shared thread or stream could make two of them wait for each other), its buffers and its
captured steps. On GPUs with NCCL peers the first step of a shape runs eagerly (it warms up
the kernels), the second is captured as a CUDA graph (thread-local capture: other links go on
meanwhile) and replayed from then on; host peers never are (their calls are host work). On
CPUs the work is synchronous. Slots without a row name expert `sentinel` (held by nobody)
with weight 0.

Load counts: each link counts pairs per (layer, expert) on the device inside its steps;
`flush_loads` moves them to the load window (`window`, afkv.eplb.stats) without waiting for
the device, or waiting (the `stats` answer).

Owners: `_links` and `_joining` belong to the event loop (a join's peers are opened on the
link's own thread, then installed by the loop); threads read `_links` as a snapshot. A
link's buffers, graphs and streams belong to its thread. `_loads_lock` guards the links'
device counts (a link adds, the worker or a link flushes), `_flush_lock` the copies on their
way to the window.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from afkv.eplb.stats import LoadWindow
from afkv.errors import FrameError, PeerLostError
from afkv.model.graphs import CAPTURE_LOCK
from afkv.model.sides import FFNSide
from afkv.model.spec import ModelSpec
from afkv.nodes.expert_stats import ExpertStats
from afkv.nodes.holdings import Holdings
from afkv.transport.peer import Peer, abort_all, gpu_identity, open_peer, peer_kind
from afkv.transport.streams import DeviceStreams

log = logging.getLogger("afkv.expert_plane")


def _log_failure(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("joining the data plane's peers failed: %s", fut.exception())


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
        return shape


@dataclass(eq=False)
class _Link:
    """One attention node's data plane on this expert node."""

    attention: str
    dispatch: Peer
    combine: Peer
    recv: object  # streams
    send: object
    compute: object
    executor: ThreadPoolExecutor  # the thread running this link's steps
    loads: torch.Tensor  # [L, E + 1] pairs per (layer, expert) since the last flush
    buffers: dict = field(default_factory=dict)  # (slot, capacity, k) -> static x, ids, w
    read: dict = field(default_factory=dict)  # same key -> event: end of the last FFN reading them
    graphs: dict = field(default_factory=dict)  # step shape -> captured step
    counts: dict = field(default_factory=dict)  # step shape -> steps run
    pool: object = None  # CUDA graph memory pool of this link's graphs
    ffn: object = None  # the FFN side its graphs were captured with


class ExpertPlane:
    def __init__(self, spec: ModelSpec, index: int, device: torch.device, dtype: torch.dtype, holdings: Holdings,
                 stats: ExpertStats, store, peer_timeout_s: float, window_s: float):
        """`store`: the rendezvous, where the attention nodes put their peers' ids."""
        self.spec, self.index, self.device, self.dtype = spec, index, device, dtype
        self.holdings, self.stats, self.store, self.peer_timeout_s = holdings, stats, store, peer_timeout_s
        self.window = LoadWindow(spec.num_layers, holdings.placement.sentinel, window_s)
        self.cuda_graphs = device.type == "cuda"  # steps replay CUDA graphs after one eager step
        self._streams = DeviceStreams(device)
        self._links: dict[str, _Link] = {}  # attention node -> its link
        self._joining: dict[str, asyncio.Task] = {}  # attention node -> its latest join
        self._load_copies: list[tuple] = []  # (event, host counts) copies on their way to the window
        self._loads_t = 0.0
        self._loads_lock = threading.Lock()
        self._flush_lock = threading.Lock()

    @property
    def linked(self) -> bool:
        return bool(self._links)

    def close(self) -> None:
        for link in self._links.values():
            link.executor.shutdown(wait=False, cancel_futures=True)

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
        st = self._streams
        loads = torch.zeros(self.spec.num_layers, self.window.shape[1] + 1, dtype=torch.int64, device=self.device)
        self.holdings.link(attention)
        self._links[attention] = _Link(attention, *peers, st.stream(), st.stream(), st.stream(), executor, loads)

    def _open(self, old: _Link | None, kind: str, ids: list[str]) -> tuple[Peer, Peer]:
        """The new link's thread: drop what the attention node's old link left in flight (it
        joins again after a failed step), then join its two new peers."""
        if old is not None:
            abort_all([old.dispatch, old.combine], timeout_s=30.0)
            old.executor.shutdown(wait=False)
        return (open_peer(kind, ids[0], 1, self.device, self.peer_timeout_s),
                open_peer(kind, ids[1], 1, self.device, self.peer_timeout_s))

    # ---- steps ---------------------------------------------------------------------------------
    async def step(self, attention: str, msg: dict) -> dict:
        """Event loop: run one step of `attention` on its link's thread and answer it."""
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
            raise FrameError(f"step from {attention} before its data plane was joined")
        ok = await asyncio.get_running_loop().run_in_executor(link.executor, self._run, link, shape, epoch)
        return {"type": "step", "epoch": self.holdings.placement.epoch, "ok": ok,
                "compute_s": self.stats.take_compute_s(attention)}

    @torch.inference_mode()
    def _run(self, link: _Link, shape: StepShape, epoch: int) -> bool:
        """The link's thread: one step of an attention node: for every layer and micro-batch,
        recv -> FFN -> send back, on the link's own streams. -> whether this node holds the
        experts of the step's placement epoch (if not, the attention node computes the step
        again after the placements agree)."""
        ok, ffn = self.holdings.step_with(link.attention, epoch)  # one FFN side for the whole step
        if not ok:
            log.warning("expert node %d: step of %s with placement epoch %d; this node holds epoch %d",
                        self.index, link.attention, epoch, self.holdings.placement.epoch)
        if link.ffn is not ffn:  # captured on the old weights
            link.graphs.clear()
            link.counts.clear()
            link.ffn = ffn
        self.stats.settle(wait=False)
        self.flush_loads(False)
        graph = link.graphs.get(shape)
        if (graph is None and self.cuda_graphs and link.dispatch.graph_safe and link.combine.graph_safe
                and link.counts.get(shape, 0) >= 1):
            graph = self._capture(link, shape, ffn)
        link.counts[shape] = link.counts.get(shape, 0) + 1
        with self._streams.use(link.compute):
            if graph is not None:
                graph.replay()  # FFN time of replayed steps: the `ffn_time` request measures it apart
            else:
                self._enqueue(link, shape, ffn, timed=True)
        self.stats.step(sum(shape.caps))
        self.stats.settle(wait=False)
        return ok

    def _capture(self, link: _Link, shape: StepShape, ffn: FFNSide):
        """A CUDA graph of one step's receives, FFNs and sends, or None when capture fails."""
        link.compute.synchronize()  # the eager step before must be done
        g = torch.cuda.CUDAGraph()
        try:
            # captured on the link's own compute stream (torch's default capture stream is
            # pooled: it may be another link's NCCL stream)
            with CAPTURE_LOCK, torch.cuda.graph(g, pool=link.pool, stream=link.compute,
                                                capture_error_mode="thread_local"):
                self._enqueue(link, shape, ffn, timed=False)
        except RuntimeError as e:
            log.warning("expert node %d: step of %s not capturable, running eagerly: %s", self.index, shape, e)
            self.cuda_graphs = False
            return None
        link.pool = g.pool()  # graphs of one link replay in order on its stream: they may share a pool
        link.graphs[shape] = g
        return g

    def _enqueue(self, link: _Link, shape: StepShape, ffn: FFNSide, timed: bool) -> None:
        st = self._streams
        compute, recv_stream, send_stream = st.current(), link.recv, link.send
        begin = st.event()
        begin.record(compute)  # the side streams fork from here (and join below): capturable
        recv_stream.wait_event(begin)
        send_stream.wait_event(begin)
        hidden = self.spec.hidden_size
        keep = []  # outputs stay referenced until the step is enqueued: a send may still read them
        for layer in range(self.spec.num_layers):
            k = self.spec.layer_top_k(layer)
            if layer in shape.dense_layers:
                caps = shape.mb_caps
            elif self.spec.layer_has_router(layer):
                caps = shape.caps
            else:
                continue  # a dense layer whose MLP lives on another node
            for slot, cap in enumerate(caps):
                if cap == 0:
                    continue
                key = (slot, cap, k)
                bufs = link.buffers.get(key)
                if bufs is None:
                    bufs = link.buffers[key] = (
                        torch.zeros(cap, hidden, dtype=self.dtype, device=self.device),  # x [cap, H]
                        torch.zeros(cap, k, dtype=torch.int32, device=self.device),  # ids [cap, k]
                        torch.zeros(cap, k, dtype=torch.float32, device=self.device))  # w [cap, k]
                x, ids, w = bufs
                last_read = link.read.get(key)
                if last_read is not None:  # the previous FFN on these buffers must have read them
                    recv_stream.wait_event(last_read)
                with st.use(recv_stream):
                    with link.dispatch.group():
                        for t in bufs:
                            link.dispatch.recv(t, recv_stream)
                arrived = st.event()
                arrived.record(recv_stream)
                compute.wait_event(arrived)
                if timed:
                    start, end = st.event(enable_timing=True), st.event(enable_timing=True)
                    start.record(compute)
                ids64 = ids.long()
                y = ffn.forward(layer, x, ids64, w)  # [cap, H]
                if self.spec.layer_has_router(layer):
                    flat = ids64.flatten()
                    with self._loads_lock:
                        link.loads[layer].index_add_(0, flat, torch.ones_like(flat))
                read = st.event()
                read.record(compute)
                if timed:
                    end.record(compute)
                    self.stats.time_ffn(link.attention, start, end)
                send_stream.wait_event(read)
                with st.use(send_stream):
                    link.combine.send(y, send_stream)
                keep.append(y)
                link.read[key] = read
        compute.wait_stream(send_stream)
        compute.wait_stream(recv_stream)
        if timed and st.cuda:
            for y in keep:
                y.record_stream(send_stream)

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
        links = list(self._links.values())
        if not links or not (wait or now - self._loads_t > self.window.bucket_s / 2):
            return
        self._loads_t = now
        for link in links:
            host = torch.empty(link.loads.shape, dtype=torch.int64, pin_memory=self._streams.cuda)
            with self._streams.use(link.compute), self._loads_lock:  # ordered after the link's steps
                host.copy_(link.loads, non_blocking=True)
                link.loads.zero_()
                event = self._streams.event()
                event.record(link.compute)
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
