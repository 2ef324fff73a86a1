"""ExpertNode: one expert node of a deployment.

Holds its shard of the routed experts of every MoE layer plus the dense MLPs / shared
experts of the layers placed on it, and serves every attention node. The node is a control
server and a table of handlers; each concern is its own object:

    Holdings     (afkv.nodes.holdings)     placements, held experts, the FFN side; EPLB changes
    ExpertPlane  (afkv.nodes.expert_plane) the fixed-buffer data plane: one link per attention node;
                                           steps alone or merged over attention nodes (expert_batching)
    ExpertStats  (afkv.nodes.expert_stats) counters
    transfer     (afkv.nodes.transfer)     expert weights to and from other expert nodes

Messages (`_handlers`; any other type is refused with FrameError):

    identity              -> {gpu}: this node's GPU identity (the data plane's peer kind follows)
    nccl_init             {key, attention, gpu}: join that attention node's data plane
    step                  {caps, mb_caps, dense_layers, epoch} -> {epoch, ok, compute_s}: one step
                          (merged: answered with the other steps of its bundle)
    ffn_time              {caps, reps} -> {seconds}: one step's FFN compute alone (benchmarks, GPU)
    stats                 -> counters, the load window [L, E], the placement epoch, joined links
    eplb_prepare / eplb_commit / eplb_set {placement, peers | epoch}: placement changes
    eplb_placement        -> the current placement (attention nodes that missed a change)
    expert_weights        {pieces, max_bytes} -> tensors of held experts (another expert node gaining them)
    expert_weights_nccl   {experts, nccl_id, gpu} -> their shapes; then the tensors go over NCCL
    shutdown, heartbeat

A control connection that ends (its attention node died, hung past the heartbeat timeout, or
will join again) drops that attention node's data plane (ExpertPlane.forget).

Threads and locks, the one discipline of this node:

    event loop      the control server and every handler; owns ExpertPlane's link table
    worker          (afkv-expertN) loads of the FFN side, weight exports, stats flushes, ffn_time
    link threads    one per attention node: its joins, and its steps on the link's own streams
                    (per_attention_node)
    lanes           (expert_batching = "merged") a pool of threads with their streams: each
                    bundle of steps runs on one (ExpertPlane's docstring says which)
    locks           Holdings._lock (placement state, held briefly) and Holdings._load_lock (one
                    load at a time); ExpertPlane._loads_lock (device load counts) and _flush_lock
                    (copies to the window); ExpertStats._lock (counters); afkv.model.graphs'
                    CAPTURE_LOCK (one CUDA graph capture per process). Only two nest, always in
                    this order: _load_lock -> Holdings._lock, _flush_lock -> _loads_lock, and
                    CAPTURE_LOCK -> _loads_lock (a captured step counts loads). No lock is held
                    across an await.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from afkv.errors import FrameError
from afkv.model.spec import ModelSpec
from afkv.nodes.expert_plane import ExpertPlane
from afkv.nodes.expert_stats import ExpertStats
from afkv.nodes.holdings import MAX_REPLY_BYTES, Holdings
from afkv.nodes.placement import ExpertPlacement
from afkv.nodes.transfer import export_pieces
from afkv.transport.control import ControlConnection, ControlLimits, ControlServer
from afkv.transport.peer import gpu_identity
from afkv.transport.tensors import pack_tensor

log = logging.getLogger("afkv.expert")

MAX_MESSAGE_BYTES = 2**20  # every message to an expert node


def expert_limits(peer_timeout_s: float) -> ControlLimits:
    """Limits of an expert node's port: a message of at most 1 MiB; a peer silent for
    peer_timeout_s, or that takes longer to send one frame, is dropped. Replies (weights of
    experts for another expert node) may be larger: up to MAX_REPLY_BYTES."""
    return ControlLimits(max_frame_bytes=MAX_REPLY_BYTES, max_inbound_bytes=MAX_MESSAGE_BYTES,
                         idle_timeout_s=peer_timeout_s, frame_timeout_s=peer_timeout_s)


Handler = Callable[[ControlConnection, dict], Awaitable[dict | None]]


class ExpertNode:
    def __init__(self, spec: ModelSpec, model_dir: str | Path, placement: ExpertPlacement, index: int,
                 device: torch.device, dtype: torch.dtype, token: str | None = None, host: str = "127.0.0.1",
                 store=None, peer_timeout_s: float = 10.0, window_s: float = 60.0,
                 expert_batching: str = "per_attention_node"):
        """`store`: the rendezvous; it carries the data plane's peer ids. Attention nodes
        silent (no heartbeat, no request) for `peer_timeout_s` are disconnected.
        `expert_batching`: each attention node's steps alone, or merged bundles (ExpertPlane)."""
        self.spec, self.index, self.device = spec, index, device
        self.token, self.host, self.peer_timeout_s = token or None, host, peer_timeout_s
        self.stats = ExpertStats()
        self.holdings = Holdings(spec, model_dir, placement, index, device, dtype, self.stats, self.token,
                                 peer_timeout_s)
        self.plane = ExpertPlane(spec, index, device, dtype, self.holdings, self.stats, store, peer_timeout_s,
                                 window_s, expert_batching)
        self._executor: ThreadPoolExecutor | None = None
        self._server: ControlServer | None = None
        self._closed = asyncio.Event()
        self._handlers: dict[str, Handler] = {
            "identity": self._identity,
            "nccl_init": lambda conn, msg: self.plane.join(conn.peer.node_id, msg),
            "step": lambda conn, msg: self.plane.step(conn.peer.node_id, msg),
            "ffn_time": self._ffn_time,
            "stats": self._stats,
            "eplb_prepare": self._eplb,
            "eplb_commit": self._eplb,
            "eplb_set": self._eplb,
            "eplb_placement": self._placement,
            "expert_weights": self._expert_weights,
            "expert_weights_nccl": lambda conn, msg: self.holdings.export_nccl(msg),
            "shutdown": self._shutdown,
            "heartbeat": self._heartbeat,
        }

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def placement(self) -> ExpertPlacement:
        return self.holdings.placement

    async def start(self, port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"afkv-expert{self.index}")
        self.holdings.executor = self._executor
        if self.device.type == "cuda":
            await loop.run_in_executor(self._executor, torch.cuda.set_device, self.device)
        await loop.run_in_executor(self._executor, self.holdings.load)
        self._server = ControlServer(self._handle, host=self.host, port=port, token=self.token,
                                     limits=expert_limits(self.peer_timeout_s), on_lost=self.plane.forget)
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
        self.plane.close()
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, True)

    async def _handle(self, conn: ControlConnection, msg: dict) -> dict | None:
        handler = self._handlers.get(msg["type"])
        if handler is None:
            raise FrameError(f"expert node: unknown message type {msg['type']!r}")
        return await handler(conn, msg)

    # ---- handlers (event loop) -----------------------------------------------------------------
    async def _identity(self, conn: ControlConnection, msg: dict) -> dict:
        return {"type": "identity", "index": self.index, "gpu": gpu_identity(self.device)}

    async def _ffn_time(self, conn: ControlConnection, msg: dict) -> dict:
        try:
            caps, reps = [int(c) for c in msg["caps"]], int(msg.get("reps", 10))
        except (KeyError, TypeError, ValueError) as exc:
            raise FrameError(f"malformed ffn_time: {exc}") from exc
        seconds = await asyncio.get_running_loop().run_in_executor(self._executor, self.plane.ffn_time, caps, reps)
        return {"type": "ffn_time", "seconds": seconds}

    async def _stats(self, conn: ControlConnection, msg: dict) -> dict:
        loop = asyncio.get_running_loop()
        if self.stats.has_pending():
            await loop.run_in_executor(self._executor, self.stats.settle, True)
        if self.plane.linked:
            await loop.run_in_executor(self._executor, self.plane.flush_loads, True)
        loads = await loop.run_in_executor(self._executor, self.plane.window.total)  # [L, E]
        return {"type": "stats", "index": self.index, "epoch": self.placement.epoch, "loads": pack_tensor(loads),
                "window_s": self.plane.window.window_s, "links": self.plane.num_links, **self.stats.snapshot()}

    async def _eplb(self, conn: ControlConnection, msg: dict) -> dict:
        return await self.holdings.on_eplb(msg["type"], msg)

    async def _placement(self, conn: ControlConnection, msg: dict) -> dict:
        return {"type": "placement", "placement": self.placement.to_msg()}

    async def _expert_weights(self, conn: ControlConnection, msg: dict) -> dict:
        try:
            pieces, max_bytes = list(msg["pieces"]), min(int(msg["max_bytes"]), MAX_REPLY_BYTES // 2)
        except (KeyError, TypeError, ValueError) as exc:
            raise FrameError(f"malformed expert_weights request: {exc}") from exc
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, export_pieces, self.holdings.held_weights, pieces, max_bytes)

    async def _shutdown(self, conn: ControlConnection, msg: dict) -> dict:
        asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.aclose()))
        return {"type": "bye"}

    async def _heartbeat(self, conn: ControlConnection, msg: dict) -> None:
        return None
