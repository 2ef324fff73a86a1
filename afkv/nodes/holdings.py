"""Holdings: what an expert node holds (placements, experts, FFN side) and how it changes (EPLB).

The node holds exactly the experts of the placements it may be asked to compute, per layer:

    placement   the current one (its epoch answers every request)
    prepared    the next one, once eplb_prepare loaded its experts (steps may name it already)
    incoming    a placement whose experts are being loaded (prepare, or set/commit before the switch)
    kept        older placements some attention node still steps with: an attention node on
                the fixed-buffer plane learns a new epoch from a step answer, so a placement's
                experts stay until every linked attention node has stepped with a newer one

`ffn` is the FFN side built for the union of these; a load replaces it whole (steps already
running keep the one they took), so a step never sees half a placement.

Placement changes (the coordinator's messages, afkv.nodes.balancer):

    eplb_prepare {placement, peers}  load the new placement's experts beside the old ones
    eplb_commit  {epoch}             the prepared placement is current: drop what is no longer held
    eplb_set     {placement, peers}  prepare + commit at once (a node rejoining after a restart)

Weights of a gained expert are copied from a live node holding it (`peers`: live expert
nodes' addresses; afkv.nodes.transfer: NCCL between nodes on two GPUs, raw tensor frames
over the control plane otherwise); only experts no live peer can give are read from the
checkpoint.

Locks: `_lock` guards the placement state above and the attention nodes' epochs (held
briefly, never across a load); `_load_lock` makes loads one at a time. A load reads the
state when it starts, so the last load always matches the latest state. `placement` and
`ffn` are replaced, never changed: any thread may read them without a lock.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Executor
from pathlib import Path

import torch

from afkv.errors import FrameError, PeerLostError
from afkv.model.model import load_ffn_side
from afkv.model.sides import FFNSide
from afkv.model.spec import ModelSpec
from afkv.nodes.expert_stats import ExpertStats
from afkv.nodes.placement import ExpertPlacement
from afkv.nodes.transfer import (ControlPlaneTransfer, ExpertKey, ExpertTensors, NcclTransfer, WeightTransfer,
                                 in_thread, nccl_export)
from afkv.transport.peer import gpu_identity, peer_kind

log = logging.getLogger("afkv.holdings")

MAX_REPLY_BYTES = 256 * 2**20  # answers to another expert node (expert weights) may be this large


def _log_export_failure(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("sending expert weights over NCCL failed: %s", fut.exception())


class Holdings:
    def __init__(self, spec: ModelSpec, model_dir: str | Path, placement: ExpertPlacement, index: int,
                 device: torch.device, dtype: torch.dtype, stats: ExpertStats, token: str | None,
                 peer_timeout_s: float):
        self.spec, self.model_dir, self.index = spec, str(model_dir), index
        self.device, self.dtype, self.stats = device, dtype, stats
        self.token, self.peer_timeout_s = token, peer_timeout_s
        self.placement = placement
        self.ffn: FFNSide | None = None
        self.executor: Executor | None = None  # the node's worker thread (set by the node at start)
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._prepared: ExpertPlacement | None = None
        self._incoming: ExpertPlacement | None = None
        self._kept: dict[int, ExpertPlacement] = {}
        self._epochs: dict[str, int] = {}  # linked attention node -> placement epoch of its last step (-1: none yet)
        self._loaded: tuple[dict[int, frozenset[int]], frozenset[int]] = ({}, frozenset())  # per-layer experts, dense

    # ---- steps (link threads) ------------------------------------------------------------------
    def link(self, attention: str) -> None:
        """An attention node joined the fixed-buffer plane: placements are kept for it."""
        with self._lock:
            self._epochs.setdefault(attention, -1)

    def unlink(self, attention: str) -> None:
        """An attention node's data plane was dropped (its connection ended): placements are no
        longer kept for it; the next step of another node retires those they all moved past (an
        attention node that joins again steps with the current placement or is brought to it)."""
        with self._lock:
            self._epochs.pop(attention, None)

    def step_with(self, attention: str, epoch: int) -> tuple[bool, FFNSide]:
        """`attention` steps with placement `epoch`. -> (whether this node holds its experts,
        the FFN side for the whole step). Retires kept placements every attention node has
        moved past."""
        with self._lock:
            self._epochs[attention] = epoch
            retire = bool(self._kept) and min(self._epochs.values()) > min(self._kept)
        if retire:
            self._retire_kept()
        with self._lock:
            prepared = self._prepared.epoch if self._prepared is not None else None
            ok = epoch in (self.placement.epoch, prepared) or epoch in self._kept
        return ok, self.ffn

    # ---- loads (worker thread or a link's thread) ----------------------------------------------
    def load(self, received: dict[ExpertKey, ExpertTensors] | None = None) -> None:
        """Hold what the current placements give this node, per layer. Experts held now and
        those `received` are reused; the rest are read from the checkpoint."""
        with self._load_lock:
            with self._lock:
                targets = [p for p in (self._incoming, self._prepared, self.placement, *self._kept.values())
                           if p is not None]
            self._load_locked(targets, received)

    def _load_locked(self, targets: list[ExpertPlacement], received: dict[ExpertKey, ExpertTensors] | None) -> None:
        per_layer = tuple(frozenset().union(*layer) for layer in zip(*(p.held(self.index) for p in targets)))
        dense = frozenset().union(*(p.dense_layers_of(self.index) for p in targets))
        experts = {layer: ids for layer, ids in enumerate(per_layer) if ids}
        if self.ffn is not None and (experts, dense) == self._loaded:
            return
        t0 = time.perf_counter()
        tensors = dict(received or {})
        read = 0
        for layer, ids in experts.items():
            if not self.spec.sparse_layers[layer]:
                continue
            for e in ids:
                if (layer, e) not in tensors and self.ffn is not None and e in self.ffn.experts[layer]:
                    tensors[(layer, e)] = self.ffn.expert_weights(layer, e)
                elif (layer, e) not in tensors:
                    read += 1
        self.ffn = load_ffn_side(self.spec, self.model_dir, self.device, self.dtype, experts, dense, tensors)
        if self._loaded[0] or self._loaded[1]:  # not the start-up load
            self.stats.read_from_checkpoint(read)
        self._loaded = (experts, dense)
        log.info("expert node %d (epoch %d): %d (layer, expert) pairs, dense/shared layers %s, %d read from the "
                 "checkpoint, %d received, in %.2f s", self.index, targets[0].epoch,
                 sum(len(ids) for ids in experts.values()), sorted(dense), read, len(received or {}),
                 time.perf_counter() - t0)

    def prepare(self, new: ExpertPlacement, received: dict[ExpertKey, ExpertTensors]) -> None:
        """Worker thread: hold `new`'s experts beside the current ones; steps may name it after."""
        with self._lock:
            self._prepared = None
        self._load_beside(new, received)
        with self._lock:
            self._prepared = new

    def switch(self, new: ExpertPlacement, received: dict[ExpertKey, ExpertTensors]) -> None:
        """Worker thread: make `new` current. Attention nodes linked on the fixed-buffer plane
        may step with either placement meanwhile: `new` becomes current once its experts are
        held, and the old one is kept for them until they have all moved past it."""
        with self._lock:
            linked = bool(self._epochs)
            if not linked:  # nobody steps: switch at once
                self.placement, self._prepared = new, None
        if linked:
            self._load_beside(new, received)
            with self._lock:
                if new.epoch > self.placement.epoch:
                    self._kept[self.placement.epoch] = self.placement
                self.placement, self._prepared = new, None
        self._retire_kept(received)

    def _load_beside(self, new: ExpertPlacement, received: dict[ExpertKey, ExpertTensors]) -> None:
        """Load `new`'s experts while keeping every placement held now."""
        with self._lock:
            self._incoming = new
        try:
            self.load(received)
        finally:
            with self._lock:
                self._incoming = None

    def _retire_kept(self, received: dict[ExpertKey, ExpertTensors] | None = None) -> None:
        """Drop kept placements no linked attention node steps with any more; load."""
        with self._lock:
            oldest = min(self._epochs.values(), default=self.placement.epoch)
            self._kept = {e: p for e, p in self._kept.items() if e >= oldest}
        self.load(received)

    def held_weights(self, layer: int, expert: int) -> ExpertTensors:
        """A held routed expert's tensors (KeyError when not held)."""
        if not 0 <= layer < self.spec.num_layers or not self.spec.sparse_layers[layer]:
            raise KeyError((layer, expert))
        return self.ffn.expert_weights(layer, expert)

    # ---- placement messages (event loop) -------------------------------------------------------
    async def on_eplb(self, kind: str, msg: dict) -> dict:
        """eplb_prepare / eplb_commit / eplb_set (see the module docstring)."""
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
            await loop.run_in_executor(self.executor, self.prepare, new, received)
        elif new.epoch >= self.placement.epoch:  # commit, or set: never go back to an older placement
            received = await self._receive(new, peers) if kind == "eplb_set" else {}
            await loop.run_in_executor(self.executor, self.switch, new, received)
        return {"type": "ok", "epoch": self.placement.epoch}

    def _transfer(self, peers: dict[int, tuple[str, int]]) -> WeightTransfer:
        frames = ControlPlaneTransfer(peers, f"expert{self.index}", self.token, self.executor, self.device,
                                      self.peer_timeout_s)
        if self.device.type != "cuda":
            return frames
        return NcclTransfer(peers, f"expert{self.index}", self.token, self.device, gpu_identity(self.device),
                            self.peer_timeout_s, fallback=frames)

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
            nbytes = sum(t.numel() * t.element_size() for pair in received.values() for t in pair)
            self.stats.received(len(received), nbytes, getattr(transfer, "nccl_bytes", 0))
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

    async def export_nccl(self, msg: dict) -> dict:
        """Holding node: list the asked experts it holds, then send them over NCCL from a thread
        of its own (the answer goes first: the gaining node joins after reading it)."""
        try:
            keys = [(int(l), int(e)) for l, e in msg["experts"]]
            unique_id, gpu = str(msg["nccl_id"]), str(msg.get("gpu", ""))
        except (KeyError, TypeError, ValueError) as exc:
            raise FrameError(f"malformed expert_weights_nccl request: {exc}") from exc
        if self.device.type != "cuda":
            return {"type": "unsupported", "reason": f"expert node {self.index} is not on a GPU"}
        if peer_kind(gpu_identity(self.device), gpu) != "nccl":
            return {"type": "unsupported", "reason": f"expert node {self.index} is on the same GPU ({self.device})"}

        def collect():
            held, missing = [], []
            for k in keys:
                try:
                    held.append((k, self.held_weights(*k)))
                except KeyError:
                    missing.append(list(k))
            return held, missing

        held, missing = await asyncio.get_running_loop().run_in_executor(self.executor, collect)
        if held:
            sending = in_thread(nccl_export, unique_id, [t for _, pair in held for t in pair], self.device,
                                self.peer_timeout_s, name=f"afkv-expert{self.index}-weights")
            sending.add_done_callback(_log_export_failure)
        dtype = str(held[0][1][0].dtype).removeprefix("torch.") if held else "float32"
        return {"type": "expert_weights_nccl", "dtype": dtype, "missing": missing,
                "experts": [[l, e, list(gu.shape), list(dn.shape)] for (l, e), (gu, dn) in held]}
