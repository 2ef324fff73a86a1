"""Balancer: load statistics and live rebalancing of the expert nodes (EPLB runtime).

The coordinator is attention node 0 (the Engine with attention_rank 0): only it changes
the placement, so epochs never fork. Any attention node may read the load statistics.

    loads()      every live expert node's sliding-window counts, summed -> [L, E]
    rebalance()  1. loads -> afkv.eplb.rebalance over the live nodes' slots -> new placement
                    (epoch + 1; replicas of one expert spread over distinct nodes); with
                    group-limited routing (DeepSeek-V3: 8 groups, 4 per token) and expert
                    nodes on several hosts, EPLB's hierarchical policy packs whole expert
                    groups onto hosts (`host_order`), so a token's experts span few hosts
                 2. eplb_prepare to every live node, with the live nodes' addresses: it
                    copies the experts it gains from a live node holding them (the
                    checkpoint only when none can) and keeps the old ones, so both
                    placements are served meanwhile
                 3. switch: this attention node adopts the placement on its model worker
                    thread, i.e. between two steps (no step sees two placements)
                 4. eplb_commit: nodes drop what the new placement does not give them.
                    Other attention nodes learn the new epoch from the next answer (or a
                    "stale" answer) and fetch it; no request is dropped, outputs do not change.

Weights move between expert nodes through afkv.nodes.transfer (raw tensor frames over the
control plane on CPUs; the same request with NCCL moving the bytes on GPUs).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import torch

from afkv.config import EplbConfig
from afkv.eplb import rebalance
from afkv.errors import AfkvError, EngineError, PeerLostError
from afkv.model.spec import ModelSpec
from afkv.nodes.placement import eplb_placement, num_slots_per_node
from afkv.nodes.links import ExpertLinks
from afkv.transport.tensors import unpack_tensor

log = logging.getLogger("afkv.balancer")


@dataclass(frozen=True)
class RebalanceReport:
    epoch: int  # the placement now in use
    nodes: tuple[int, ...]  # the live expert nodes it places experts on
    balancedness_before: float  # max / mean tokens per expert node, measured over the window
    balancedness_after: float  # the same loads under the new placement (replicas share evenly)
    replicas_added: int  # (layer, expert, node) replicas a node did not hold before
    duration_s: float


def node_balancedness(node_loads: torch.Tensor) -> float:
    """node_loads [L, N] -> sum over layers of the heaviest node / sum of the mean node (1.0 is even)."""
    node_loads = node_loads.to(torch.float64)
    mean = node_loads.mean(-1).sum()
    return float(node_loads.amax(-1).sum() / mean) if mean > 0 else 1.0


def host_order(live: list[int], hosts: dict[int, str]) -> tuple[list[int], int]:
    """The live expert nodes ordered host by host, and the number of hosts: EPLB's nodes, each
    a run of consecutive "GPUs" (expert nodes). Hosts holding unequal numbers of live nodes
    cannot be EPLB nodes: then (live, 1), one node (the global policy)."""
    by_host: dict[str, list[int]] = {}
    for j in live:
        by_host.setdefault(hosts[j], []).append(j)
    if len({len(nodes) for nodes in by_host.values()}) != 1:
        return list(live), 1
    return [j for host in sorted(by_host) for j in by_host[host]], len(by_host)


class Balancer:
    def __init__(self, links: ExpertLinks, spec: ModelSpec, cfg: EplbConfig):
        self.links, self.spec, self.cfg = links, spec, cfg
        self._lock = asyncio.Lock()  # one rebalance at a time
        self._periodic: asyncio.Task | None = None
        self.last_report: RebalanceReport | None = None

    def _live(self) -> list[int]:
        dead = set(self.links.dead)
        return [j for j in range(self.links.num_nodes) if j not in dead]

    async def node_loads(self, nodes: list[int] | None = None) -> dict[int, torch.Tensor]:
        """node -> its window counts [L, E] int64 (nodes that do not answer are left out)."""
        nodes = self._live() if nodes is None else nodes
        replies = await asyncio.gather(*(self.links.request(j, {"type": "stats"}) for j in nodes),
                                       return_exceptions=True)
        out = {}
        for j, r in zip(nodes, replies):
            if isinstance(r, PeerLostError):
                log.warning("expert node %d gave no load statistics: %s", j, r)
                continue
            if isinstance(r, BaseException):
                raise r
            out[j] = unpack_tensor(r["loads"])
        return out

    async def loads(self) -> torch.Tensor:
        """Tokens per (layer, logical expert) over the window, summed over live nodes. -> [L, E] int64"""
        per_node = await self.node_loads()
        if not per_node:
            raise PeerLostError("no expert node answered for load statistics")
        return torch.stack(list(per_node.values())).sum(0)

    async def rebalance(self) -> RebalanceReport:
        async with self._lock:
            return await self._rebalance()

    async def _rebalance(self) -> RebalanceReport:
        t0 = time.perf_counter()
        links, spec = self.links, self.spec
        old = links.placement
        live = self._live()
        per_node_loads = await self.node_loads(live)
        live = [j for j in live if j in per_node_loads]
        if not live:
            raise PeerLostError("no live expert node to place experts on")
        addresses = {j: await links.address(j) for j in live}
        live, num_hosts = host_order(live, {j: host for j, (host, _) in addresses.items()})
        loads = torch.stack([per_node_loads[j] for j in live]).sum(0).to(torch.float64)  # [L, E]
        per_node = num_slots_per_node(spec, old.num_nodes, self.cfg.slots_per_node)
        num_experts = loads.shape[1]
        if per_node * len(live) < num_experts:
            raise EngineError(f"{len(live)} live expert node(s) x {per_node} slots cannot hold {num_experts} experts")
        # hierarchical when the hosts divide the groups (afkv.eplb falls back to global otherwise)
        placed = rebalance(loads, per_node * len(live), spec.num_expert_groups, num_hosts, len(live))
        phy2log = placed.phy2log  # [L, S]
        new = eplb_placement(spec, old.num_nodes, phy2log, live, epoch=old.epoch + 1)
        router = torch.tensor(old.has_router)
        measured = torch.stack([per_node_loads[j].sum(-1) for j in live], -1)[router]  # [L_moe, N_live]
        after = new.node_loads(loads)[router][:, live]  # [L_moe, N_live]
        added = sum(len(n - o) for j in live for n, o in zip(new.held(j), old.held(j)))

        peers = [[j, *addresses[j]] for j in live]
        msg = {"type": "eplb_prepare", "placement": new.to_msg(), "peers": peers}
        await links.request_all(msg, live)  # a node lost here aborts: nodes keep serving the old placement too
        await links.switch(new)  # between two steps
        commits = await asyncio.gather(*(links.request(j, {"type": "eplb_commit", "epoch": new.epoch})
                                         for j in live), return_exceptions=True)
        for j, c in zip(live, commits):
            if isinstance(c, BaseException):  # it rejoins later with eplb_set
                log.warning("expert node %d missed the commit of epoch %d: %s", j, new.epoch, c)
        report = RebalanceReport(new.epoch, tuple(live), node_balancedness(measured), node_balancedness(after),
                                 added, time.perf_counter() - t0)
        log.info("rebalanced: %s", report)
        self.last_report = report
        return report

    def start_periodic(self) -> None:
        if self.cfg.rebalance_interval_s > 0 and self._periodic is None:
            self._periodic = asyncio.create_task(self._run_periodic(), name="afkv-eplb-rebalance")

    async def _run_periodic(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.rebalance_interval_s)
            try:
                await self.rebalance()
            except AfkvError as exc:  # a fault of this round; serving goes on, the next round retries
                log.warning("periodic rebalance failed: %s", exc)

    async def aclose(self) -> None:
        if self._periodic is not None:
            self._periodic.cancel()
            try:
                await self._periodic
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    raise
            self._periodic = None
