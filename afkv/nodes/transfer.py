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

On GPUs an NCCL implementation keeps the same request on the control plane (it names the
pieces and their shapes) and moves the bytes with a send on the holder and a recv into
preallocated tensors on the gaining node, on a communicator between the two expert nodes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Protocol

import torch

from afkv.errors import FrameError, PeerLostError, TransportError
from afkv.transport.control import ControlClient, ControlLimits
from afkv.transport.tensors import pack_tensor, unpack_tensor

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
