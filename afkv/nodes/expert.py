"""ExpertNode: one expert node of a deployment.

Holds its shard of the routed experts of every MoE layer plus the dense MLPs / shared
experts of the layers placed on it, and serves every attention node:

    attention node --"ffn" {layer, x [n, H], topk_ids [n, k], topk_weights [n, k]}--> expert node
    attention node <--{y [n, H] partial sum over the experts held here, compute_s}--- expert node

Requests waiting at the same time for the same layer (from several attention nodes) are
computed together in one FFN call. Torch work runs on one worker thread; the event loop
only moves frames.

Load balancing (EPLB, CPU data plane): the node counts tokens per (layer, logical expert)
in a sliding window (`stats` reports it as `loads`). Its placement (which experts it
holds, an epoch) changes by control messages from the coordinator (attention node 0):

    eplb_prepare {placement, peers}  take the new placement's experts, keeping the old ones
    eplb_commit  {epoch}             the prepared placement is current: drop what it does not hold
    eplb_set     {placement, peers}  prepare + commit at once (a node rejoining after a restart)
    eplb_placement                   -> the current placement (attention nodes that missed a change)
    expert_weights {pieces}          -> tensors of held experts (another expert node gaining them)
    expert_weights_nccl {experts, nccl_id, gpu}  -> their shapes; then the tensors go over NCCL

An ffn request naming an expert this node does not hold is answered {"type": "stale"}
(the sender's placement is older): the sender fetches the placement and re-sends. Every
ffn answer carries the node's epoch.

Weights of a gained expert are copied from a live node holding it (`peers`: live expert
nodes' addresses; afkv.nodes.transfer: NCCL between nodes on two GPUs, raw tensor frames
over the control plane otherwise); only
experts no live peer can give are read from the checkpoint. Each layer holds exactly the
experts of its slots (per-layer sets). The new FFN side is built on the worker thread,
serialised with FFN compute, so a step never sees half a placement.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from afkv.eplb.stats import LoadWindow
from afkv.errors import FrameError, PeerLostError
from afkv.model.graphs import CAPTURE_LOCK
from afkv.model.model import load_ffn_side
from afkv.model.sides import FFNSide
from afkv.model.spec import ModelSpec
from afkv.nodes.placement import ExpertPlacement
from afkv.nodes.transfer import (ControlPlaneTransfer, ExpertKey, ExpertTensors, NcclTransfer, WeightTransfer,
                                 export_pieces, in_thread, nccl_export)
from afkv.transport.control import ControlConnection, ControlLimits, ControlServer, RateLimitedLog
from afkv.transport.host import HostPeer
from afkv.transport.nccl import abort_all
from afkv.transport.streams import DeviceStreams
from afkv.transport.tensors import pack_tensor, unpack_tensor

log = logging.getLogger("afkv.expert")

DATA_FRAME_BYTES = 256 * 2**20  # data-plane frames carry hidden states: allow large micro-batches
SMALL_MESSAGE_BYTES = 2**20  # every message to an expert node but "ffn"


def expert_limits(spec: ModelSpec, max_rows: int, peer_timeout_s: float) -> ControlLimits:
    """Limits of an expert node's port: an "ffn" message holds at most `max_rows` tokens
    (hidden states as float32, k ids and weights each), any other 1 MiB; a peer silent for
    peer_timeout_s, or that takes longer to send one frame, is dropped. Replies (weights of
    experts for another expert node) may be larger: up to DATA_FRAME_BYTES."""
    top_k = max([spec.layer_top_k(i) for i in range(spec.num_layers)] + [1])
    ffn_bytes = max_rows * (4 * spec.hidden_size + 8 * top_k) + 2**16
    return ControlLimits(max_frame_bytes=DATA_FRAME_BYTES, max_inbound_bytes=max(ffn_bytes, SMALL_MESSAGE_BYTES),
                         idle_timeout_s=peer_timeout_s, frame_timeout_s=peer_timeout_s,
                         message_bytes={"ffn": ffn_bytes}, default_message_bytes=SMALL_MESSAGE_BYTES)


def _log_failure(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("joining the NCCL communicators failed: %s", fut.exception())


def _log_export_failure(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("sending expert weights over NCCL failed: %s", fut.exception())


@dataclass
class _Pending:
    layer: int
    x: torch.Tensor  # [n, H]
    ids: torch.Tensor  # [n, k]
    weights: torch.Tensor  # [n, k]
    future: asyncio.Future = field(repr=False)


@dataclass(eq=False)
class _Link:
    """One attention node's fixed-buffer data plane on this expert node: its two peers, its
    own thread and streams (steps of several attention nodes interleave: a shared thread or
    stream could make two of them wait for each other), its buffers and captured steps."""

    attention: str
    dispatch: object  # NcclPeer or HostPeer
    combine: object
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


@dataclass(frozen=True)
class _StepShape:
    """Buffers of one fixed-buffer step: this node's capacity per micro-batch (`caps`), the
    micro-batch capacities (`mb_caps`, for `dense_layers`: layers whose dense MLP / shared
    expert this node computes for every row)."""

    caps: tuple[int, ...]
    mb_caps: tuple[int, ...]
    dense_layers: frozenset[int]


@dataclass
class ExpertStats:
    requests: int = 0
    tokens: int = 0
    batches: int = 0
    compute_s: float = 0.0
    tokens_per_expert: dict[tuple[int, int], int] = field(default_factory=dict)  # (layer, expert) -> tokens
    experts_received: int = 0  # (layer, expert) copies received from other expert nodes
    received_bytes: int = 0
    nccl_received_bytes: int = 0  # of received_bytes, those that came over NCCL (GPU to GPU)
    experts_from_checkpoint: int = 0  # gained experts no live peer could give (start-up not counted)


class ExpertNode:
    def __init__(self, spec: ModelSpec, model_dir: str | Path, placement: ExpertPlacement, index: int,
                 device: torch.device, dtype: torch.dtype, token: str | None = None, host: str = "127.0.0.1",
                 store=None, peer_timeout_s: float = 10.0, window_s: float = 60.0, max_rows: int = 8192):
        """`store`: the rendezvous; it carries the data plane's NCCL unique ids / host-peer
        nonces. Attention nodes silent (no heartbeat, no request) for `peer_timeout_s` are
        disconnected. `max_rows`: the most tokens one ffn request may carry (the attention
        nodes' max_num_batched_tokens)."""
        self.peer_timeout_s, self.max_rows = peer_timeout_s, max_rows
        self.spec, self.model_dir, self.placement, self.index = spec, str(model_dir), placement, index
        self.store = store
        self._links: dict[str, _Link] = {}  # attention node -> its fixed-buffer data plane
        self._joining: dict[str, asyncio.Future] = {}  # attention node -> its latest nccl_init, joining
        self._streams = DeviceStreams(device)
        self._gpu_events: list[tuple] = []  # (start, end) events of FFN compute, summed lazily
        self.cuda_graphs = device.type == "cuda"  # fixed-buffer steps replay CUDA graphs after one eager step
        self._peer_epochs: dict[str, int] = {}  # attention node -> placement epoch of its last step
        self._kept: dict[int, ExpertPlacement] = {}  # older placements some attention node still steps with
        self._load_copies: list[tuple] = []  # (event, host counts) copies on their way to the window
        self._loads_t = 0.0
        self._loads_lock = threading.Lock()  # device load counts: steps of several attention nodes (CPU threads)
        self._load_lock = threading.Lock()  # one placement load at a time
        self._flush_lock = threading.Lock()
        self._events_lock = threading.Lock()  # _gpu_events: appended by link threads
        self.device, self.dtype, self.token, self.host = device, dtype, token or None, host
        self.stats = ExpertStats()
        self._failures = RateLimitedLog(log)  # FFN faults, once per kind and then at most once a minute
        self.window = LoadWindow(spec.num_layers, placement.sentinel, window_s)
        self._prepared: ExpertPlacement | None = None  # an eplb_prepare waiting for its commit
        self._loaded: tuple[dict[int, frozenset[int]], frozenset[int]] = ({}, frozenset())  # per-layer experts, dense
        self._ffn: FFNSide | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._server: ControlServer | None = None
        self._pending: list[_Pending] = []
        self._drainer: asyncio.Task | None = None
        self._closed = asyncio.Event()

    @property
    def port(self) -> int:
        return self._server.port

    async def start(self, port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"afkv-expert{self.index}")
        if self.device.type == "cuda":
            await loop.run_in_executor(self._executor, torch.cuda.set_device, self.device)
        await loop.run_in_executor(self._executor, self._load, self.placement, None)
        self._server = ControlServer(self._handle, host=self.host, port=port, token=self.token,
                                     limits=expert_limits(self.spec, self.max_rows, self.peer_timeout_s))
        await self._server.start()
        return self._server.port

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def aclose(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self._server is not None:
            await self._server.aclose()
        if self._drainer is not None:
            self._drainer.cancel()
            try:
                await self._drainer
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    raise
        for link in self._links.values():
            link.executor.shutdown(wait=False, cancel_futures=True)
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, True)

    async def _handle(self, conn: ControlConnection, msg: dict) -> dict | None:
        kind = msg["type"]
        if kind == "ffn":
            return await self._ffn_request(msg)
        if kind == "step":  # fixed-buffer data plane: receive, compute and answer one whole step
            try:
                shape = _StepShape(tuple(int(c) for c in msg["caps"]), tuple(int(c) for c in msg["mb_caps"]),
                                   frozenset(int(i) for i in msg.get("dense_layers", ())))
                epoch = int(msg.get("epoch", 0))
            except (KeyError, TypeError, ValueError) as exc:
                raise FrameError(f"malformed step: {exc}") from exc
            if len(shape.caps) != len(shape.mb_caps):
                raise FrameError(f"step with {len(shape.caps)} capacities for {len(shape.mb_caps)} micro-batches")
            joining = self._joining.get(conn.peer.node_id)
            if joining is not None and not joining.done():
                # the attention node may step as soon as its own end is joined: this node's end
                # (and its new link) can still be on the way, and the old link must not take it
                done, _ = await asyncio.wait([joining], timeout=self.peer_timeout_s)
                if not done:
                    raise FrameError(f"step from {conn.peer.node_id}: its data plane is not joined after "
                                     f"{self.peer_timeout_s:.0f} s")
            link = self._links.get(conn.peer.node_id)
            if link is None:
                raise FrameError(f"step from {conn.peer.node_id} before its data plane was joined")
            ok = await asyncio.get_running_loop().run_in_executor(link.executor, self._gpu_step, link, shape, epoch)
            return {"type": "step", "epoch": self.placement.epoch, "ok": ok}
        if kind == "ffn_time":  # benchmarks: one step's FFN compute alone on this node's GPU
            seconds = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._ffn_time, [int(c) for c in msg["caps"]], int(msg.get("reps", 10)))
            return {"type": "ffn_time", "seconds": seconds}
        if kind == "nccl_init":
            from afkv.nodes.nccl_ffn import gpu_identity

            mine = gpu_identity(self.device)
            if mine and msg.get("gpu") == mine:
                raise FrameError(f"attention node {conn.peer.node_id} and expert node {self.index} are on the same GPU "
                                 f"({self.device}): NCCL needs one GPU per rank; set [deployment] attention_devices / "
                                 "expert_devices apart, or data_plane = \"messages\"")
            key = msg.get("key")
            if not isinstance(key, str):
                raise FrameError(f"nccl_init from {conn.peer.node_id} needs a str key, got {key!r:.50}")
            try:  # the attention node put the ids there before asking: no waiting
                ids = (await asyncio.to_thread(self.store.get, key, 0.0)).decode().split("\n")
            except PeerLostError as exc:
                raise FrameError(f"nccl_init from {conn.peer.node_id}: no data-plane ids under {key!r}: {exc}") from exc
            if len(ids) != 2:
                raise FrameError(f"nccl_init from {conn.peer.node_id}: {len(ids)} data-plane ids under {key!r}, not 2")
            # Answer at once, then join on the new link's own thread (it blocks until the
            # attention node joins too, never the worker); "step" messages wait for the join.
            st = self._streams
            executor = ThreadPoolExecutor(1, thread_name_prefix=f"afkv-expert{self.index}-{conn.peer.node_id}",
                                          initializer=torch.cuda.set_device if st.cuda else None,
                                          initargs=(self.device,) if st.cuda else ())
            joined = self._joining[conn.peer.node_id] = asyncio.get_running_loop().run_in_executor(
                executor, self._nccl_init, conn.peer.node_id, ids, executor)
            joined.add_done_callback(_log_failure)
            return {"type": "ok"}
        if kind == "stats":
            loop = asyncio.get_running_loop()
            if self._gpu_events:
                await loop.run_in_executor(self._executor, self._sum_gpu_events, True)
            if self._links:
                await loop.run_in_executor(self._executor, self._flush_loads, True)
            loads = await loop.run_in_executor(self._executor, self.window.total)  # [L, E]
            s = self.stats
            return {"type": "stats", "index": self.index, "requests": s.requests, "tokens": s.tokens,
                    "batches": s.batches, "compute_s": s.compute_s, "epoch": self.placement.epoch,
                    "loads": pack_tensor(loads), "window_s": self.window.window_s,
                    "experts_received": s.experts_received, "received_bytes": s.received_bytes,
                    "nccl_received_bytes": s.nccl_received_bytes,
                    "experts_from_checkpoint": s.experts_from_checkpoint,
                    "tokens_per_expert": [[l, e, n] for (l, e), n in s.tokens_per_expert.items()]}
        if kind in ("eplb_prepare", "eplb_commit", "eplb_set"):
            return await self._eplb(kind, msg)
        if kind == "eplb_placement":
            return {"type": "placement", "placement": self.placement.to_msg()}
        if kind == "expert_weights":
            try:
                pieces, max_bytes = list(msg["pieces"]), min(int(msg["max_bytes"]), DATA_FRAME_BYTES // 2)
            except (KeyError, TypeError, ValueError) as exc:
                raise FrameError(f"malformed expert_weights request: {exc}") from exc
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, export_pieces, self._held_weights, pieces, max_bytes)
        if kind == "expert_weights_nccl":
            return await self._export_nccl(msg)
        if kind == "shutdown":
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.aclose()))
            return {"type": "bye"}
        if kind == "heartbeat":
            return None
        raise FrameError(f"expert node: unknown message type {kind!r}")

    async def _ffn_request(self, msg: dict) -> dict:
        try:
            layer = msg["layer"]
            x = unpack_tensor(msg["x"])
            ids = unpack_tensor(msg["ids"])
            weights = unpack_tensor(msg["w"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FrameError(f"malformed ffn request: {exc}") from exc
        self._check_ffn(layer, x, ids, weights)
        ids = ids.to(torch.int64)
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(layer, x, ids, weights, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        result = await future
        if result is None:  # names an expert this node does not hold: the sender's placement is old
            return {"type": "stale", "epoch": self.placement.epoch}
        y, compute_s = result
        return {"type": "ffn_out", "y": pack_tensor(y), "compute_s": compute_s, "epoch": self.placement.epoch}

    def _check_ffn(self, layer: object, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """FrameError naming what is wrong, unless an ffn request can join a batch: a layer
        index, x [n, H] floating, ids [n, k] integer in [0, sentinel] (k: the layer's top-k
        where it routes), weights [n, k] floating."""
        spec = self.spec
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < spec.num_layers:
            raise FrameError(f"ffn request for layer {layer!r:.30}: this model has {spec.num_layers}")
        k = spec.layer_top_k(layer) if spec.layer_has_router(layer) else None
        ok = (x.ndim == 2 and x.shape[1] == spec.hidden_size and x.is_floating_point()
              and ids.ndim == 2 and ids.shape[0] == x.shape[0] and (k is None or ids.shape[1] == k)
              and not ids.is_floating_point() and ids.dtype is not torch.bool
              and weights.shape == ids.shape and weights.is_floating_point())
        if not ok:
            raise FrameError(f"ffn request with bad shapes or dtypes: layer {layer}, x {tuple(x.shape)} {x.dtype}, ids "
                             f"{tuple(ids.shape)} {ids.dtype}, w {tuple(weights.shape)} {weights.dtype} (hidden size "
                             f"{spec.hidden_size}, top-k {k})")
        if k is not None and ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) <= self.placement.sentinel):
            raise FrameError(f"ffn request with expert ids outside [0, {self.placement.sentinel}]")

    # ---- placement changes (EPLB) --------------------------------------------------------------
    async def _eplb(self, kind: str, msg: dict) -> dict:
        loop = asyncio.get_running_loop()
        try:
            if kind == "eplb_commit":
                epoch = int(msg["epoch"])
                new = self._prepared
                if new is None or new.epoch != epoch:
                    raise FrameError(f"eplb_commit of epoch {epoch}, but the prepared epoch is "
                                     f"{None if new is None else new.epoch}")
            else:
                new = ExpertPlacement.from_msg(msg["placement"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FrameError(f"malformed {kind}: {exc}") from exc
        if new.num_nodes != self.placement.num_nodes or new.num_layers != self.spec.num_layers:
            raise FrameError(f"{kind}: placement for {new.num_nodes} nodes / {new.num_layers} layers, this "
                             f"deployment has {self.placement.num_nodes} / {self.spec.num_layers}")
        try:
            peers = {int(j): (str(h), int(p)) for j, h, p in msg.get("peers", ()) if int(j) != self.index}
        except (TypeError, ValueError) as exc:
            raise FrameError(f"malformed peers of {kind}: {exc}") from exc
        if kind == "eplb_prepare":
            if new.epoch <= self.placement.epoch:
                raise FrameError(f"eplb_prepare of epoch {new.epoch}, not newer than {self.placement.epoch}")
            received = await self._receive(new, peers)
            await loop.run_in_executor(self._executor, self._load, new, [self.placement, *self._kept.values()],
                                       received)
            self._prepared = new
        elif new.epoch >= self.placement.epoch:  # commit, or set: never go back to an older placement
            received = await self._receive(new, peers) if kind == "eplb_set" else {}
            await loop.run_in_executor(self._executor, self._switch, new, received)
        return {"type": "ok", "epoch": self.placement.epoch}

    def _switch(self, new: ExpertPlacement, received: dict[ExpertKey, ExpertTensors]) -> None:
        """Worker thread: make `new` current. Attention nodes on the fixed-buffer data plane
        may still step with the old placement (they learn the epoch from a step answer):
        its experts are kept until each of them has stepped with a newer one."""
        if self._links and new.epoch > self.placement.epoch:
            self._kept[self.placement.epoch] = self.placement
        self.placement, self._prepared = new, None
        self._retire_kept(received)

    def _retire_kept(self, received: dict[ExpertKey, ExpertTensors] | None = None) -> None:
        """Worker thread: drop kept placements no attention node steps with any more; load."""
        oldest = min((self._peer_epochs.get(a, -1) for a in self._links), default=self.placement.epoch)
        self._kept = {e: p for e, p in self._kept.items() if e >= oldest}
        self._load(self.placement, list(self._kept.values()), received)

    def _transfer(self, peers: dict[int, tuple[str, int]]) -> WeightTransfer:
        frames = ControlPlaneTransfer(peers, f"expert{self.index}", self.token, self._executor, self.device,
                                      self.peer_timeout_s)
        if self.device.type != "cuda":
            return frames
        from afkv.nodes.nccl_ffn import gpu_identity

        return NcclTransfer(peers, f"expert{self.index}", self.token, self.device, gpu_identity(self.device),
                            self.peer_timeout_s, fallback=frames)

    async def _export_nccl(self, msg: dict) -> dict:
        """Holding node: list the asked experts it holds, then send them over NCCL from a thread
        of its own (the answer goes first: the gaining node joins after reading it)."""
        from afkv.nodes.nccl_ffn import gpu_identity

        try:
            keys = [(int(l), int(e)) for l, e in msg["experts"]]
            unique_id, gpu = str(msg["nccl_id"]), str(msg.get("gpu", ""))
        except (KeyError, TypeError, ValueError) as exc:
            raise FrameError(f"malformed expert_weights_nccl request: {exc}") from exc
        if self.device.type != "cuda":
            return {"type": "unsupported", "reason": f"expert node {self.index} is not on a GPU"}
        if gpu == gpu_identity(self.device):
            return {"type": "unsupported", "reason": f"expert node {self.index} is on the same GPU ({self.device})"}

        def collect():
            held, missing = [], []
            for k in keys:
                try:
                    held.append((k, self._held_weights(*k)))
                except KeyError:
                    missing.append(list(k))
            return held, missing

        held, missing = await asyncio.get_running_loop().run_in_executor(self._executor, collect)
        if held:
            sending = in_thread(nccl_export, unique_id, [t for _, pair in held for t in pair], self.device,
                                self.peer_timeout_s, name=f"afkv-expert{self.index}-weights")
            sending.add_done_callback(_log_export_failure)
        dtype = str(held[0][1][0].dtype).removeprefix("torch.") if held else "float32"
        return {"type": "expert_weights_nccl", "dtype": dtype, "missing": missing,
                "experts": [[l, e, list(gu.shape), list(dn.shape)] for (l, e), (gu, dn) in held]}

    async def _receive(self, new: ExpertPlacement, peers: dict[int, tuple[str, int]]) -> dict[ExpertKey, ExpertTensors]:
        """Tensors of the routed experts `new` gives this node and it lacks, from live peers
        holding them (by the current placement, then by `new`); what none can give is left
        to the checkpoint."""
        held = self._loaded[0]
        gained = [(layer, e) for layer, ids in enumerate(new.held(self.index)) if self.spec.sparse_layers[layer]
                  for e in sorted(ids - held.get(layer, frozenset()))]
        if not gained or not peers:
            return {}

        def holders(p: ExpertPlacement, key: ExpertKey) -> list[int]:
            return [int(j) for j in p.replica_nodes[key] if int(j) in peers] if key[1] < p.sentinel else []

        candidates = {k: list(dict.fromkeys(holders(self.placement, k) + holders(new, k))) for k in gained}
        transfer = self._transfer(peers)
        received: dict[ExpertKey, ExpertTensors] = {}
        try:
            await self._fetch_all(transfer, candidates, received)
        finally:
            self.stats.nccl_received_bytes += getattr(transfer, "nccl_bytes", 0)
        self.stats.experts_received += len(received)
        self.stats.received_bytes += sum(t.numel() * t.element_size() for pair in received.values() for t in pair)
        log.info("expert node %d: received %d of %d gained experts from peers", self.index, len(received),
                 len(gained))
        return received

    async def _fetch_all(self, transfer: WeightTransfer, candidates: dict[ExpertKey, list[int]],
                         received: dict[ExpertKey, ExpertTensors]) -> None:
        """Fetch each key from its first candidate source; a lost source or one lacking the key
        is dropped from that key's candidates and the next one is asked."""
        while True:
            by_source: dict[int, list[ExpertKey]] = {}
            for key, sources in candidates.items():
                if key not in received and sources:
                    by_source.setdefault(sources[0], []).append(key)
            if not by_source:
                break
            results = await asyncio.gather(*(transfer.fetch(j, keys) for j, keys in by_source.items()),
                                           return_exceptions=True)
            for (j, keys), r in zip(by_source.items(), results):
                if isinstance(r, PeerLostError):
                    log.warning("expert node %d: no weights from expert node %d: %s", self.index, j, r)
                    for sources in candidates.values():
                        if j in sources:
                            sources.remove(j)
                    continue
                if isinstance(r, BaseException):
                    raise r
                got, missing = r
                received |= got
                for key in missing:
                    candidates[key].remove(j)

    def _held_weights(self, layer: int, expert: int) -> ExpertTensors:
        """Worker thread: a held routed expert's tensors (KeyError when not held)."""
        if not 0 <= layer < self.spec.num_layers or not self.spec.sparse_layers[layer]:
            raise KeyError((layer, expert))
        return self._ffn.expert_weights(layer, expert)

    def _load(self, placement: ExpertPlacement, keep: ExpertPlacement | list[ExpertPlacement] | None,
              received: dict[ExpertKey, ExpertTensors] | None = None) -> None:
        """Worker thread (or a link's thread): hold what `placement` gives this node (plus what
        `keep` gives it), per layer. Experts held now and those `received` are reused; the rest
        are read from the checkpoint. Steps already running keep the FFN side they started with."""
        with self._load_lock:
            self._load_locked(placement, keep, received)

    def _load_locked(self, placement: ExpertPlacement, keep: ExpertPlacement | list[ExpertPlacement] | None,
                     received: dict[ExpertKey, ExpertTensors] | None) -> None:
        per_layer = placement.held(self.index)
        dense = placement.dense_layers_of(self.index)
        for other in [keep] if isinstance(keep, ExpertPlacement) else keep or []:
            per_layer = tuple(a | b for a, b in zip(per_layer, other.held(self.index)))
            dense = dense | other.dense_layers_of(self.index)
        experts = {layer: ids for layer, ids in enumerate(per_layer) if ids}
        if self._ffn is not None and (experts, dense) == self._loaded:
            return
        t0 = time.perf_counter()
        tensors = dict(received or {})
        read = 0
        for layer, ids in experts.items():
            if not self.spec.sparse_layers[layer]:
                continue
            for e in ids:
                if (layer, e) not in tensors and self._ffn is not None and e in self._ffn.experts[layer]:
                    tensors[(layer, e)] = self._ffn.expert_weights(layer, e)
                elif (layer, e) not in tensors:
                    read += 1
        self._ffn = load_ffn_side(self.spec, self.model_dir, self.device, self.dtype, experts, dense, tensors)
        if self._loaded[0] or self._loaded[1]:  # not the start-up load
            self.stats.experts_from_checkpoint += read
        self._loaded = (experts, dense)
        log.info("expert node %d (epoch %d): %d (layer, expert) pairs, dense/shared layers %s, %d read from the "
                 "checkpoint, %d received, in %.2f s", self.index, placement.epoch,
                 sum(len(ids) for ids in experts.values()), sorted(dense), read, len(received or {}),
                 time.perf_counter() - t0)

    def _holds(self, p: _Pending) -> bool:
        """Worker thread: whether every pair of `p` names an expert (or dense part) held here."""
        if not self.spec.layer_has_router(p.layer):
            return p.layer in self._loaded[1]
        ids = p.ids[p.ids != self.placement.sentinel]
        held = self._ffn.experts[p.layer]
        return all(int(e) in held for e in ids.unique())

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                results = await loop.run_in_executor(self._executor, self._compute, batch)
            except Exception as exc:  # a fault in the FFN: find whose, fail only that request, keep serving
                self._failures(("ffn", type(exc).__name__), logging.ERROR, "expert node %d: FFN failed on a batch of "
                               "%d requests (each is computed alone now): %s", self.index, len(batch), exc,
                               exc_info=exc)
                results = []
                for p in batch:
                    try:
                        results.extend(await loop.run_in_executor(self._executor, self._compute, [p]))
                    except Exception as alone:
                        results.append(alone)
            for p, r in zip(batch, results):
                if p.future.done():
                    continue
                if isinstance(r, Exception):
                    p.future.set_exception(r)
                else:
                    p.future.set_result(r)

    @torch.inference_mode()
    def _compute(self, batch: list[_Pending]) -> list[tuple[torch.Tensor, float]]:
        """Worker thread: requests of the same layer run as one FFN call."""
        out: list[tuple[torch.Tensor, float] | None] = [None] * len(batch)  # None: stale request
        by_layer: dict[int, list[int]] = {}
        for i, p in enumerate(batch):
            if self._holds(p):
                by_layer.setdefault(p.layer, []).append(i)
        for layer, members in by_layer.items():
            t0 = time.perf_counter()
            x = torch.cat([batch[i].x for i in members]).to(self.device, self.dtype)  # [n, H]
            ids = torch.cat([batch[i].ids for i in members]).to(self.device)  # [n, k]
            w = torch.cat([batch[i].weights for i in members]).to(self.device)  # [n, k]
            y = self._ffn.forward(layer, x, ids, w).cpu()  # [n, H]
            dt = time.perf_counter() - t0
            self._count(layer, ids)
            start = 0
            for i in members:
                n = batch[i].x.shape[0]
                out[i] = (y[start:start + n], dt)
                start += n
            self.stats.batches += 1
            self.stats.compute_s += dt
        self.stats.requests += len(batch)
        self.stats.tokens += sum(batch[i].x.shape[0] for members in by_layer.values() for i in members)
        return out

    # ---- fixed-buffer data plane (NCCL on GPUs, HostPeer on CPUs) -------------------------------
    def _nccl_init(self, attention: str, ids: list[str], executor: ThreadPoolExecutor) -> None:
        """The new link's thread (`executor`): join the two communicators the attention node
        made (their ids came through the rendezvous) and make them its link."""
        try:
            old = self._links.pop(attention, None)
            if old is not None:  # the attention node joins again after a failed step: drop what is left in flight
                abort_all([old.dispatch, old.combine], timeout_s=30.0)
                old.executor.shutdown(wait=False)
            if self.device.type == "cuda":
                from afkv.transport.nccl import NcclPeer

                peers = (NcclPeer(ids[0], 1, self.device), NcclPeer(ids[1], 1, self.device))
            else:
                peers = (HostPeer(ids[0], 1, self.device, self.peer_timeout_s), HostPeer(ids[1], 1, self.device,
                                                                                      self.peer_timeout_s))
        except BaseException:
            executor.shutdown(wait=False)
            raise
        st = self._streams
        loads = torch.zeros(self.spec.num_layers, self.placement.sentinel + 1, dtype=torch.int64, device=self.device)
        self._links[attention] = _Link(attention, *peers, st.stream(), st.stream(), st.stream(), executor, loads)

    def _holds_epoch(self, epoch: int) -> bool:
        prepared = self._prepared.epoch if self._prepared is not None else None
        return epoch in (self.placement.epoch, prepared) or epoch in self._kept

    @torch.inference_mode()
    def _gpu_step(self, link: "_Link", shape: "_StepShape", epoch: int) -> bool:
        """The link's thread: one step of an attention node on the fixed-buffer data plane:
        for every layer and micro-batch, recv -> FFN -> send back, on the link's own streams (on
        CPUs the work is synchronous). On GPUs the first step of a shape runs eagerly (it warms
        up the kernels); the second is captured as a CUDA graph (thread-local capture: other
        links go on meanwhile), replayed from then on. Slots without a row name expert
        `sentinel` (held by nobody) with weight 0.
        -> whether this node holds the experts of the step's placement epoch (if not, the
        attention node computes the step again after the placements agree)."""
        self._peer_epochs[link.attention] = epoch
        if self._kept and min(self._peer_epochs.get(a, -1) for a in self._links) > min(self._kept):
            self._retire_kept()  # every attention node steps with a newer placement now
        ok = self._holds_epoch(epoch)
        if not ok:
            log.warning("expert node %d: step of %s with placement epoch %d; this node holds epoch %d",
                        self.index, link.attention, epoch, self.placement.epoch)
        ffn = self._ffn  # the whole step uses one FFN side (a placement change swaps it between steps)
        if link.ffn is not ffn:  # captured on the old weights
            link.graphs.clear()
            link.counts.clear()
            link.ffn = ffn
        self._sum_gpu_events(wait=False)
        self._flush_loads(False)
        graph = link.graphs.get(shape)
        if graph is None and self.cuda_graphs and link.counts.get(shape, 0) >= 1:
            graph = self._capture_step(link, shape, ffn)
        link.counts[shape] = link.counts.get(shape, 0) + 1
        with self._streams.use(link.compute):
            if graph is not None:
                graph.replay()  # FFN time of replayed steps: the `ffn_time` request measures it apart
            else:
                self._enqueue_step(link, shape, ffn, timed=True)
        self.stats.requests += 1
        self.stats.tokens += sum(shape.caps)
        return ok

    def _capture_step(self, link: "_Link", shape: "_StepShape", ffn: FFNSide):
        """A CUDA graph of one step's receives, FFNs and sends, or None when capture fails."""
        link.compute.synchronize()  # the eager step before must be done
        g = torch.cuda.CUDAGraph()
        try:
            # captured on the link's own compute stream (torch's default capture stream is
            # pooled: it may be another link's NCCL stream)
            with CAPTURE_LOCK, torch.cuda.graph(g, pool=link.pool, stream=link.compute,
                                                capture_error_mode="thread_local"):
                self._enqueue_step(link, shape, ffn, timed=False)
        except RuntimeError as e:
            log.warning("expert node %d: step of %s not capturable, running eagerly: %s", self.index, shape, e)
            self.cuda_graphs = False
            return None
        link.pool = g.pool()  # graphs of one link replay in order on its stream: they may share a pool
        link.graphs[shape] = g
        return g

    def _enqueue_step(self, link: "_Link", shape: "_StepShape", ffn: FFNSide, timed: bool) -> None:
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
                    with self._events_lock:
                        self._gpu_events.append((start, end))
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

    @torch.inference_mode()
    def _flush_loads(self, wait: bool) -> None:
        """Worker thread: move the device's load counts of fixed-buffer steps into the window,
        without waiting for the device (unless `wait`): a copy starts at most every half
        window bucket, and lands once its event has passed."""
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
        if not self._links or not (wait or now - self._loads_t > self.window.bucket_s / 2):
            return
        self._loads_t = now
        for link in list(self._links.values()):
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

    @torch.inference_mode()
    def _ffn_time(self, caps: list[int], reps: int) -> float:
        """Worker thread: seconds of one step's FFN compute alone (every layer and micro-batch
        at these capacities, no transfers), median of `reps` CUDA-graph replays."""
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
                self._ffn.forward(layer, x, ids, w)

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

    def _sum_gpu_events(self, wait: bool) -> None:
        """Add finished FFN timings to the stats (all of them when `wait`)."""
        with self._events_lock:
            events, self._gpu_events = self._gpu_events, []
        pending = []
        for start, end in events:
            if wait:
                end.synchronize()
            elif not end.query():
                pending.append((start, end))
                continue
            self.stats.compute_s += start.elapsed_time(end) / 1e3
            self.stats.batches += 1
        with self._events_lock:
            self._gpu_events = pending + self._gpu_events

    def _count(self, layer: int, ids: torch.Tensor) -> None:
        held = self._ffn.experts[layer]
        if not held:
            return
        width = self.window.shape[1]
        counts = torch.bincount(ids.flatten().cpu(), minlength=width + 1)[:width]  # [E] (sentinel dropped)
        self.window.add(layer, counts)
        for e in held:
            if counts[e]:
                key = (layer, e)
                self.stats.tokens_per_expert[key] = self.stats.tokens_per_expert.get(key, 0) + int(counts[e])
