"""Copying routed experts' weights between expert nodes (EPLB: a node gains an expert).

An expert is two tensors, gate_up [2I, H] and down [H, I] (FFNSide.expert_weights). When a
new placement gives a node an expert it lacks, the node asks a node holding it for the
tensors instead of reading the checkpoint (`ExpertNode._receive` picks the sources, and
reads the checkpoint only for experts no live node can give).

    WeightTransfer        the interface: fetch(source, keys) on the gaining node
    ControlPlaneTransfer  CPU implementation: raw tensor frames over the control plane

Wire format (ControlPlaneTransfer), one request per frame budget:

    gaining node --{"type": "expert_weights", "pieces": [[layer, expert, name, row0], ...],
                    "max_bytes": n}--> holding node
    gaining node <--{"type": "expert_weights", "missing": [[layer, expert], ...],
                     "pieces": [[layer, expert, name, row0, total_rows, tensor], ...]}--

A piece is rows [row0, row0 + r) of one tensor (`name` "gate_up" or "down"), packed with
afkv.transport.tensors (raw bytes, any dtype). The holder fills its answer up to
`max_bytes` (always at least one row), so no frame exceeds the limit whatever an expert's
size; the gaining node asks again from the first row it lacks. Experts the holder does not
hold are named in `missing`.

    NcclTransfer          GPUs: the request on the control plane, the bytes over NCCL

NcclTransfer (both nodes on GPUs, different GPUs):

    gaining node --{"type": "expert_weights_nccl", "experts": [[layer, expert], ...],
                    "nccl_id": a fresh NCCL unique id, "gpu": identity}--> holding node
    gaining node <--{"type": "expert_weights_nccl", "dtype": d, "experts": [[layer, expert,
                     gate_up shape, down shape], ...], "missing": [[layer, expert], ...]}--
    then both join the two-rank communicator of that id (holder rank 1): the holder sends the
    listed tensors from its device memory in that order, the gaining node receives them into
    new tensors on its device; each side waits at most timeout_s, then aborts. Nothing
    is joined when the holder lists no expert.

A holder on the same GPU (NCCL refuses two ranks of one communicator on one GPU) or not on a
GPU answers {"type": "unsupported", "reason": ...}; that source goes over the control plane.
Fetches of one gaining node run one at a time, so a holder joins a communicator only when
its peer joins too (no chain of nodes waiting on each other's joins).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Protocol

import torch

from afkv.errors import FrameError, PeerLostError, TransportError
from afkv.transport.control import ControlClient, ControlLimits
from afkv.transport.streams import transient_stream
from afkv.transport.tensors import DTYPES, pack_tensor, unpack_tensor

log = logging.getLogger("afkv.transfer")

ExpertKey = tuple[int, int]  # (layer, logical expert)
ExpertTensors = tuple[torch.Tensor, torch.Tensor]  # gate_up [2I, H], down [H, I]
NAMES = ("gate_up", "down")
TRANSFER_FRAME_BYTES = 32 * 2**20  # bytes of tensor data per answer
_conn_ids = itertools.count()


class WeightTransfer(Protocol):
    async def fetch(self, source: int, keys: list[ExpertKey]) -> tuple[dict[ExpertKey, ExpertTensors], list[ExpertKey]]:
        """Tensors of `keys` from expert node `source` -> (received, keys `source` does not hold).
        PeerLostError when `source` cannot be reached or fails during the transfer."""
        ...


def export_pieces(weights: Callable[[int, int], ExpertTensors], pieces: list, max_bytes: int) -> dict:
    """Holding node, worker thread: answer an expert_weights request. `weights(layer, expert)`
    returns a held expert's tensors, KeyError when it is not held."""
    missing: list[list[int]] = []
    out: list[list] = []
    budget = max_bytes
    for layer, expert, name, row0 in pieces:
        if budget <= 0:
            break
        if name not in NAMES:
            raise FrameError(f"expert_weights: unknown tensor {name!r} (expected one of {NAMES})")
        try:
            t = weights(int(layer), int(expert))[NAMES.index(name)]  # [rows, cols]
        except (KeyError, IndexError):
            if [layer, expert] not in missing:
                missing.append([layer, expert])
            continue
        total = t.shape[0]
        row0 = int(row0)
        if not 0 <= row0 < total:
            raise FrameError(f"expert_weights: row {row0} of {name} of expert {expert} layer {layer} "
                             f"outside [0, {total})")
        row_bytes = t[0].numel() * t.element_size()
        rows = max(1, min(total - row0, budget // max(row_bytes, 1)))
        out.append([layer, expert, name, row0, total, pack_tensor(t[row0:row0 + rows])])
        budget -= rows * row_bytes
    return {"type": "expert_weights", "missing": missing, "pieces": out}


class ControlPlaneTransfer:
    """WeightTransfer over control connections to the holding nodes (CPU data plane).

    `peers`: expert node -> control address; `executor`: the node's worker thread, where
    received bytes become tensors (no torch work on the event loop)."""

    def __init__(self, peers: dict[int, tuple[str, int]], node_id: str, token: str | None, executor: Executor,
                 device: torch.device, timeout_s: float, max_bytes: int = TRANSFER_FRAME_BYTES):
        self.peers, self.node_id, self.token, self.executor = peers, node_id, token, executor
        self.device, self.timeout_s, self.max_bytes = device, timeout_s, max_bytes

    async def fetch(self, source: int, keys: list[ExpertKey]) -> tuple[dict[ExpertKey, ExpertTensors], list[ExpertKey]]:
        if source not in self.peers:
            raise PeerLostError(f"no address for expert node {source}")
        host, port = self.peers[source]
        chunks: dict[tuple[int, int, str], list[dict]] = {}  # (layer, expert, name) -> packed row blocks, in order
        next_row = {(l, e, n): 0 for l, e in keys for n in NAMES}
        total: dict[tuple[int, int, str], int] = {}
        missing: set[ExpertKey] = set()
        try:
            client = await ControlClient.connect(
                host, port, token=self.token, role="expert", node_id=f"{self.node_id}-weights{next(_conn_ids)}",
                timeout_s=self.timeout_s, limits=ControlLimits(max_frame_bytes=self.max_bytes + 2**20))
        except TransportError as exc:
            raise PeerLostError(f"expert node {source} unreachable for weights: {exc}") from exc
        try:
            while True:
                want = [[l, e, n, r] for (l, e, n), r in next_row.items()
                        if (l, e) not in missing and r < total.get((l, e, n), r + 1)]
                if not want:
                    break
                try:
                    reply = await client.request({"type": "expert_weights", "pieces": want,
                                                  "max_bytes": self.max_bytes}, self.timeout_s)
                except TransportError as exc:
                    raise PeerLostError(f"expert node {source} failed while sending weights: {exc}") from exc
                missing.update((int(l), int(e)) for l, e in reply["missing"])
                if not reply["pieces"] and not reply["missing"]:
                    raise FrameError(f"expert node {source} answered an expert_weights request with nothing")
                for l, e, n, row0, rows_total, packed in reply["pieces"]:
                    key = (int(l), int(e), str(n))
                    if key not in next_row or int(row0) != next_row[key]:
                        raise FrameError(f"expert node {source} sent rows from {row0} of {key}, "
                                         f"expected {next_row.get(key)}")
                    total[key] = int(rows_total)
                    chunks.setdefault(key, []).append(packed)
                    next_row[key] += int(packed["shape"][0])
        finally:
            await client.aclose()
        done = [k for k in keys if k not in missing]
        loop = asyncio.get_running_loop()
        tensors = await loop.run_in_executor(self.executor, self._assemble, chunks, done)
        return tensors, [k for k in keys if k in missing]

    def _assemble(self, chunks: dict[tuple[int, int, str], list[dict]], keys: list[ExpertKey]) -> dict[ExpertKey, ExpertTensors]:
        """Worker thread: row blocks -> whole tensors on this node's device."""
        out = {}
        for layer, expert in keys:
            gate_up, down = (torch.cat([unpack_tensor(c) for c in chunks[(layer, expert, n)]]).to(self.device)
                             for n in NAMES)
            out[(layer, expert)] = (gate_up, down)  # [2I, H], [H, I]
        return out


# ---- NCCL (GPUs) ---------------------------------------------------------------------------------
_GROUP_OPS = 64  # sends / receives issued per NCCL group


def in_thread(fn: Callable, *args, name: str = "afkv-weights") -> asyncio.Future:
    """Run fn(*args) on a new daemon thread -> a future of this loop. A thread stuck in NCCL
    communicator creation (its peer died before joining) cannot be stopped; it must not hold
    a pool's worker."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def settle(result, exc):
        if fut.done():  # the waiter gave up (cancelled)
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)

    def run():
        try:
            result, exc = fn(*args), None
        except BaseException as e:  # handed to the awaiting coroutine
            result, exc = None, e
        try:
            loop.call_soon_threadsafe(settle, result, exc)
        except RuntimeError:  # the loop closed meanwhile: nobody waits for it
            pass

    threading.Thread(target=run, name=name, daemon=True).start()
    return fut


def _nccl_move(unique_id: str, rank: int, tensors: list[torch.Tensor], device: torch.device, timeout_s: float,
               what: str) -> None:
    """Join a two-rank communicator and send (rank 1) or receive (rank 0) `tensors` in order on
    a stream of its own; wait at most timeout_s for the bytes, then abort."""
    from afkv.transport.nccl import NcclPeer

    with torch.cuda.device(device):
        if rank == 1:
            torch.cuda.synchronize(device)  # a just-loaded expert's copies may still be queued
        peer = NcclPeer(unique_id, rank, device)
        try:
            with transient_stream(device) as stream:
                move = peer.send if rank == 1 else peer.recv
                for i in range(0, len(tensors), _GROUP_OPS):
                    with peer.group():
                        for t in tensors[i:i + _GROUP_OPS]:
                            move(t, stream)
                done = torch.cuda.Event()
                done.record(stream)
                deadline = time.monotonic() + timeout_s
                while not done.query():
                    if time.monotonic() > deadline:
                        peer.abort()
                        raise PeerLostError(f"{what}: no progress within {timeout_s:.0f} s; communicator aborted")
                    time.sleep(0.0005)
        finally:
            peer.close()


def nccl_export(unique_id: str, tensors: list[torch.Tensor], device: torch.device, timeout_s: float) -> None:
    """Holding node, a thread of its own: send `tensors` to the node that made `unique_id`."""
    _nccl_move(unique_id, 1, [t.contiguous() for t in tensors], device, timeout_s, "sending expert weights")


def nccl_import(unique_id: str, listed: list[tuple[ExpertKey, list[int], list[int]]], dtype: torch.dtype,
                device: torch.device, timeout_s: float, what: str) -> dict[ExpertKey, ExpertTensors]:
    """Gaining node, a thread of its own: receive the `listed` experts (key, gate_up shape, down
    shape) into new tensors on `device`."""
    with torch.cuda.device(device):
        out = {k: (torch.empty(gu, dtype=dtype, device=device), torch.empty(dn, dtype=dtype, device=device))
               for k, gu, dn in listed}
    _nccl_move(unique_id, 0, [t for k, _, _ in listed for t in out[k]], device, timeout_s, what)
    return out


class NcclTransfer:
    """WeightTransfer over NCCL between expert nodes on different GPUs (the holder sends from
    its device memory, no host copy). Sources that answer "unsupported" go over `fallback`.
    `nccl_bytes`: bytes received over NCCL so far."""

    def __init__(self, peers: dict[int, tuple[str, int]], node_id: str, token: str | None, device: torch.device,
                 gpu: str, timeout_s: float, fallback: WeightTransfer):
        self.peers, self.node_id, self.token = peers, node_id, token
        self.device, self.gpu, self.timeout_s, self.fallback = device, gpu, timeout_s, fallback
        self.nccl_bytes = 0
        self._lock = asyncio.Lock()

    async def fetch(self, source: int, keys: list[ExpertKey]) -> tuple[dict[ExpertKey, ExpertTensors], list[ExpertKey]]:
        if source not in self.peers:
            raise PeerLostError(f"no address for expert node {source}")
        async with self._lock:
            got = await self._fetch(source, keys)
        if got is None:
            return await self.fallback.fetch(source, keys)
        return got

    async def _fetch(self, source: int, keys: list[ExpertKey]):
        from afkv.transport.nccl import new_unique_id

        host, port = self.peers[source]
        unique_id = await asyncio.to_thread(new_unique_id) if self.device.type == "cuda" else ""
        try:
            client = await ControlClient.connect(host, port, token=self.token, role="expert",
                                                 node_id=f"{self.node_id}-weights{next(_conn_ids)}",
                                                 timeout_s=self.timeout_s)
        except TransportError as exc:
            raise PeerLostError(f"expert node {source} unreachable for weights: {exc}") from exc
        try:
            reply = await client.request({"type": "expert_weights_nccl", "experts": [list(k) for k in keys],
                                          "nccl_id": unique_id, "gpu": self.gpu}, self.timeout_s)
        except TransportError as exc:
            raise PeerLostError(f"expert node {source} failed to answer for weights: {exc}") from exc
        finally:
            await client.aclose()
        if reply.get("type") == "unsupported":
            log.info("%s: weights from expert node %d over the control plane (%s)", self.node_id, source,
                     reply.get("reason"))
            return None
        try:
            dtype = DTYPES[reply["dtype"]]
            listed = [((int(l), int(e)), [int(d) for d in gu], [int(d) for d in dn])
                      for l, e, gu, dn in reply["experts"]]
            missing = [(int(l), int(e)) for l, e in reply["missing"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise FrameError(f"malformed expert_weights_nccl answer from expert node {source}: {exc}") from exc
        if any(k not in keys for k, _, _ in listed):
            raise FrameError(f"expert node {source} listed experts that were not asked for")
        if not listed:
            return {}, missing
        receiving = in_thread(nccl_import, unique_id, listed, dtype, self.device, self.timeout_s,
                              f"weights from expert node {source}")
        try:
            out = await asyncio.wait_for(asyncio.shield(receiving), self.timeout_s * 2)
        except asyncio.TimeoutError as exc:  # stuck joining: the holder died before it joined
            raise PeerLostError(f"expert node {source} did not join the weights communicator within "
                                f"{self.timeout_s * 2:.0f} s") from exc
        self.nccl_bytes += sum(t.numel() * t.element_size() for pair in out.values() for t in pair)
        return out, missing
