"""Which expert node runs what: routed experts (with replicas), shared experts, dense MLPs.

An ExpertPlacement says, per MoE layer, which expert nodes hold a replica of each logical
expert (`replica_nodes` [L, E, R], -1 padded; `num_replicas` [L, E]). The shared expert
and the dense MLP of layer l live on one node, `dense_node[l]` (not replicated).

- `contiguous_placement`: no replicas, node j holds experts [j*E/N, (j+1)*E/N) of every
  layer (the placement without EPLB).
- `eplb_placement`: built from `afkv.eplb.rebalance` output (phy2log per node's slots); a
  hot expert may live on several nodes, and the replicas of one expert are spread over
  distinct nodes where slots allow, so that losing one node leaves a replica elsewhere.

Dispatch is written once, in afkv.nodes.dispatch, over `live_tables` (the replicas of each
expert on live nodes): each (token, expert) pair goes to one live replica of its expert, and a
token needing an expert with none ends with `unavailable_error`. `sentinel` is an expert id
held by nobody: it marks the pairs a node must not compute.

An ExpertPlacement is immutable; `epoch` orders the placements of one deployment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from afkv.errors import ExpertUnavailableError
from afkv.model.spec import ModelSpec
from afkv.transport.tensors import pack_tensor, unpack_tensor


@dataclass(frozen=True, eq=False)
class ExpertPlacement:
    num_nodes: int
    replica_nodes: torch.Tensor  # [L, E_max, R] int64: node of each replica of each routed expert, -1 padded
    num_replicas: torch.Tensor  # [L, E_max] int64 (0 where a layer has fewer experts or no router)
    dense_node: tuple[int, ...]  # per layer: node holding the dense MLP / shared expert
    has_router: tuple[bool, ...]  # per layer: routed experts exist (else a dense MLP)
    has_shared: tuple[bool, ...]  # per layer: a shared expert sees every token
    epoch: int = 0
    _live: dict = field(default_factory=dict, repr=False, compare=False)  # dead nodes -> per-layer live tables

    @property
    def num_layers(self) -> int:
        return len(self.has_router)

    @property
    def sentinel(self) -> int:
        """An expert id held by no node: marks pairs a node must not compute."""
        return self.replica_nodes.shape[1]

    @property
    def max_replicas(self) -> int:
        return int(self.num_replicas.max()) if self.num_replicas.numel() else 0

    def held(self, node: int) -> tuple[frozenset[int], ...]:
        """Per layer: logical expert ids of which `node` holds a replica."""
        out = []
        for layer in range(self.num_layers):
            hit = (self.replica_nodes[layer] == node).any(-1)  # [E_max]
            out.append(frozenset(int(e) for e in hit.nonzero().flatten()))
        return tuple(out)

    def dense_layers_of(self, node: int) -> frozenset[int]:
        return frozenset(i for i, n in enumerate(self.dense_node) if n == node)

    def node_loads(self, loads: torch.Tensor) -> torch.Tensor:
        """Tokens each node serves when an expert's load splits evenly over its replicas.
        loads [L, E] -> [L, nodes] float64 (dense work not counted)."""
        loads = loads.to(torch.float64)
        e = loads.shape[1]
        share = loads / self.num_replicas[:, :e].clamp_min(1)  # [L, E]
        out = torch.zeros(self.num_layers, self.num_nodes, dtype=torch.float64)
        for r in range(self.replica_nodes.shape[2]):
            nodes = self.replica_nodes[:, :e, r]  # [L, E]
            ok = nodes >= 0
            out.scatter_add_(1, nodes.clamp_min(0), torch.where(ok, share, 0.0))
        return out

    def covered(self, dead: frozenset[int]) -> bool:
        """Whether every routed expert and dense part still has a live node when `dead` are lost."""
        if any(self.dense_node[i] in dead for i in range(self.num_layers)
               if self.has_shared[i] or not self.has_router[i]):
            return False
        return all(bool((counts[:-1] > 0)[self.num_replicas[layer] > 0].all())
                   for layer, (_, counts) in enumerate(self.live_tables(dead)))

    def live_tables(self, dead: frozenset[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (replica nodes [E + 1, R] with dead ones removed, live counts [E + 1]); the
        last row is the sentinel's (no node). The tables afkv.nodes.dispatch routes with."""
        tables = self._live.get(dead)
        if tables is None:
            tables = []
            for layer in range(self.num_layers):
                nodes = self.replica_nodes[layer]  # [E, R]
                alive = (nodes >= 0) & ~torch.isin(nodes, torch.tensor(sorted(dead), dtype=torch.int64))
                order = torch.sort((~alive).to(torch.int8), dim=1, stable=True).indices  # live replicas first
                live = torch.where(alive, nodes, -1).gather(1, order)  # [E, R]
                live = torch.cat([live, torch.full((1, live.shape[1]), -1, dtype=torch.int64)])  # [E + 1, R]
                counts = torch.cat([alive.sum(1), torch.zeros(1, dtype=torch.int64)])  # [E + 1]
                tables.append((live, counts))
            self._live[dead] = tables
        return tables

    def unavailable_error(self, layer: int, expert: int | None) -> ExpertUnavailableError:
        """What a token needing routed `expert` of `layer` (None: the layer's dense MLP / shared
        expert) gets when none of its nodes is live."""
        if expert is None:
            node = self.dense_node[layer]
            return ExpertUnavailableError(
                f"the dense MLP / shared expert of layer {layer} lives only on expert node {node}, lost",
                layer=layer, expert=None, nodes=(node,))
        holders = tuple(int(n) for n in self.replica_nodes[layer, expert] if n >= 0)
        return ExpertUnavailableError(
            f"expert {expert} of layer {layer} has no live replica (held by expert node(s) "
            f"{', '.join(map(str, holders))}, lost)", layer=layer, expert=expert, nodes=holders)

    # ---- wire format -----------------------------------------------------------------------
    def to_msg(self) -> dict:
        return {"num_nodes": self.num_nodes, "epoch": self.epoch, "replica_nodes": pack_tensor(self.replica_nodes),
                "num_replicas": pack_tensor(self.num_replicas), "dense_node": list(self.dense_node),
                "has_router": list(self.has_router), "has_shared": list(self.has_shared)}

    @classmethod
    def from_msg(cls, msg: dict) -> "ExpertPlacement":
        return cls(int(msg["num_nodes"]), unpack_tensor(msg["replica_nodes"]).long(),
                   unpack_tensor(msg["num_replicas"]).long(), tuple(int(n) for n in msg["dense_node"]),
                   tuple(bool(b) for b in msg["has_router"]), tuple(bool(b) for b in msg["has_shared"]),
                   int(msg["epoch"]))


def _layer_shape(spec: ModelSpec) -> tuple[list[int], tuple[int, ...], tuple[bool, ...]]:
    n = spec.num_layers
    widths = [spec.num_routed_experts(i) if spec.layer_has_router(i) else 0 for i in range(n)]
    shared = tuple(spec.sparse_layers[i] and spec.shared_expert_intermediate_size > 0 for i in range(n))
    return widths, shared, tuple(w > 0 for w in widths)


def contiguous_placement(spec: ModelSpec, num_nodes: int) -> ExpertPlacement:
    widths, shared, has_router = _layer_shape(spec)
    e_max = max(widths + [1])
    table = torch.full((spec.num_layers, e_max, 1), -1, dtype=torch.int64)
    for i, e in enumerate(widths):
        if e:
            table[i, :e, 0] = torch.arange(e) * num_nodes // e
    return ExpertPlacement(num_nodes, table, (table[..., 0] >= 0).long(),
                           tuple(i % num_nodes for i in range(spec.num_layers)), has_router, shared)


def initial_placement(spec: ModelSpec, num_nodes: int, slots_per_node: int = 0) -> ExpertPlacement:
    """The placement a deployment starts with (epoch 0; every node computes the same one):
    contiguous without spare slots, else EPLB's placement for uniform load (replicas spread)."""
    from afkv.eplb import rebalance

    per_node = num_slots_per_node(spec, num_nodes, slots_per_node)
    widths, _, _ = _layer_shape(spec)
    e = max(widths + [1])
    if per_node * num_nodes == e or not any(widths):
        return contiguous_placement(spec, num_nodes)
    uniform = torch.ones(spec.num_layers, e, dtype=torch.float64)
    phy2log = rebalance(uniform, per_node * num_nodes, 1, 1, num_nodes).phy2log
    return eplb_placement(spec, num_nodes, phy2log, list(range(num_nodes)), epoch=0)


def num_slots_per_node(spec: ModelSpec, num_nodes: int, slots_per_node: int) -> int:
    """Slots per node and MoE layer: `slots_per_node`, or ceil(E / N) when 0."""
    widths, _, _ = _layer_shape(spec)
    e = max(widths + [1])
    need = -(-e // num_nodes)
    if slots_per_node and slots_per_node < need:
        raise ValueError(f"slots_per_node {slots_per_node} cannot hold {e} experts on {num_nodes} nodes "
                         f"(needs >= {need})")
    return slots_per_node or need


def eplb_placement(spec: ModelSpec, num_nodes: int, phy2log: torch.Tensor, nodes: list[int],
                   epoch: int) -> ExpertPlacement:
    """From rebalance's phy2log [L, S] laid out over `nodes` (slot s on nodes[s // (S / len(nodes))]).
    Layers without a router ignore their row. Replicas of one expert are first moved onto
    distinct nodes where possible (`spread_replicas`)."""
    widths, shared, has_router = _layer_shape(spec)
    e_max = max(widths + [1])
    num_layers, num_slots = phy2log.shape
    if num_layers != spec.num_layers or num_slots % len(nodes):
        raise ValueError(f"phy2log of {num_layers} layers x {num_slots} slots does not fit {spec.num_layers} layers "
                         f"on {len(nodes)} nodes")
    per_node = num_slots // len(nodes)
    phy2log = spread_replicas(phy2log, len(nodes))
    slot_node = torch.tensor(nodes, dtype=torch.int64).repeat_interleave(per_node)  # [S]
    counts = torch.zeros(num_layers, e_max, dtype=torch.int64)
    rows: list[list[list[int]]] = []
    for layer in range(num_layers):
        per_expert: list[list[int]] = [[] for _ in range(e_max)]
        if has_router[layer]:
            for s, e in enumerate(phy2log[layer].tolist()):
                per_expert[e].append(int(slot_node[s]))
        rows.append(per_expert)
        counts[layer] = torch.tensor([len(r) for r in per_expert])
    r_max = max(1, int(counts.max()))
    table = torch.full((num_layers, e_max, r_max), -1, dtype=torch.int64)
    for layer, per_expert in enumerate(rows):
        for e, holders in enumerate(per_expert):
            table[layer, e, : len(holders)] = torch.tensor(holders, dtype=torch.int64)
    dense = tuple(nodes[i % len(nodes)] for i in range(num_layers))
    return ExpertPlacement(num_nodes, table, counts, dense, has_router, shared, epoch)


def spread_replicas(phy2log: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Swap slots so that no node holds two replicas of one expert where another node could
    take one: a duplicate moves to a node without that expert, in exchange for a slot of
    that node whose expert the first node lacks. Keeps every node's slot count and every
    expert's replica count. -> new phy2log [L, S]."""
    out = phy2log.clone()
    num_layers, num_slots = out.shape
    per_node = num_slots // num_nodes
    for layer in range(num_layers):
        row = out[layer].tolist()
        for a in range(num_nodes):
            for i in range(a * per_node, (a + 1) * per_node):
                mine = row[a * per_node:(a + 1) * per_node]
                if mine.count(row[i]) < 2:
                    continue
                swapped = False
                for b in range(num_nodes):
                    theirs = row[b * per_node:(b + 1) * per_node]
                    if b == a or row[i] in theirs:
                        continue
                    for j in range(b * per_node, (b + 1) * per_node):
                        if row[j] not in mine:
                            row[i], row[j] = row[j], row[i]
                            swapped = True
                            break
                    if swapped:
                        break
        out[layer] = torch.tensor(row, dtype=out.dtype)
    return out
