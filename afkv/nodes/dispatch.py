"""The routing rule: which expert node computes which row, planned on the device.

Written once, here; the attention node's data plane (afkv.nodes.remote_ffn) is its one user.
The attention node sends each expert node only the rows (tokens) it has work for, into a
buffer of a fixed capacity per (micro-batch, peer), so that no count is exchanged and a
step keeps static shapes (CUDA graphs):

1. `assign`: every (token, expert) pair goes to one live replica of its expert, the n-th
   pair of an expert (row-major) to replica (n + offset) % live replicas
   (afkv.eplb.split_among_replicas). `offset` is a device scalar bumped every step, so a
   graph replay spreads pairs like an eager step.
2. `pack`: per peer, the rows with a pair for it (every row for the node holding the
   layer's dense MLP / shared expert), in row order, fill its buffer: x rows, expert ids
   (ids of pairs given to other peers become `sentinel`, held by nobody) and weights (0
   there). Slots past the peer's rows name row `n` (none) and carry only the sentinel.
3. The expert nodes return partial sums per slot; `combine` adds them up per row, peer by
   peer in peer order (each row once per peer: the sum is deterministic).

A peer with more rows than its capacity overflows: the rows past it are not sent, and the
step must be computed again with more room (RemoteFFN raises StepRetryError at the end of
the step). `pack` returns how many rows each peer needed, so capacities follow the
workload. A row needing an expert (or a dense part) without a live node gets a nonzero
`lost_code` naming the first such (layer, expert); `lost_error` turns it into the error
its request ends with.

Capacities (`capacity`, `row_shares`, `peer_capacity`): a micro-batch's capacity is the next
power of two of its tokens; a peer's is the share of rows it needs under uniform routing
plus four standard deviations, or a fixed share of the micro-batch.
"""

from __future__ import annotations

import math

import torch

from afkv.eplb import split_among_replicas
from afkv.errors import ExpertUnavailableError
from afkv.nodes.placement import ExpertPlacement

MIN_CAPACITY = 16
CAP_ALIGN = 8


class DispatchTables:
    """A placement's live replica tables on the device, [L, E + 1, R] (row E: the sentinel,
    held by nobody). Updated in place while shapes allow (captured graphs stay valid)."""

    def __init__(self, placement: ExpertPlacement, device: torch.device, dead: frozenset[int] = frozenset()):
        self.device = device
        self.nodes: torch.Tensor | None = None
        self.load(placement, dead)

    def load(self, placement: ExpertPlacement, dead: frozenset[int] = frozenset()) -> bool:
        """Take `placement` with `dead` nodes removed. -> False when the tables had to be
        reallocated (a graph captured on the old ones is void)."""
        live = placement.live_tables(dead)
        nodes = torch.stack([n for n, _ in live])  # [L, E + 1, R]
        counts = torch.stack([c for _, c in live])  # [L, E + 1]
        self.placement, self.dead = placement, dead
        self.num_nodes, self.sentinel = placement.num_nodes, placement.sentinel
        self.single = placement.max_replicas <= 1 and not dead
        homes = [placement.dense_node[i] if placement.has_shared[i] or not placement.has_router[i] else -1
                 for i in range(placement.num_layers)]
        self.dense_lost = frozenset(i for i, h in enumerate(homes) if h in dead)  # layers whose dense part is lost
        self.dense_home = [-1 if h in dead else h for h in homes]  # per layer: live node of the dense part, or -1
        self.has_router = placement.has_router
        if self.nodes is not None and self.nodes.shape == nodes.shape:
            self.nodes.copy_(nodes)
            self.counts.copy_(counts.clamp_min(1))
            self.missing.copy_(counts == 0)
            return True
        self.nodes = nodes.to(self.device)
        self.counts = counts.clamp_min(1).to(self.device)  # the modulo of the replica choice
        self.missing = (counts == 0).to(self.device)  # [L, E + 1]: no live replica (the sentinel included)
        return False

    def assign(self, layer: int, ids: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
        """ids [n, k] -> node of each pair [n, k] int64; -1 for sentinel pairs and pairs whose
        expert has no live replica."""
        ids = ids.long()
        if not self.has_router[layer]:
            return torch.full_like(ids, -1)
        if self.single:
            return self.nodes[layer, :, 0][ids]  # sentinel row: -1
        node = split_among_replicas(ids, self.nodes[layer], self.counts[layer], offset)
        return torch.where(self.missing[layer][ids], -1, node)

    def lost_code(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        """ids [n, k] -> [n] int64: 0 where the row's experts (and dense part) all have a live
        node, else 1 + layer * (sentinel + 1) + e: e the lowest lost expert of the row, or
        `sentinel` for the layer's dense MLP / shared expert (which every row needs)."""
        base = 1 + layer * (self.sentinel + 1)
        if layer in self.dense_lost:
            return torch.full((ids.shape[0],), base + self.sentinel, dtype=torch.int64, device=ids.device)
        if not self.has_router[layer]:
            return torch.zeros(ids.shape[0], dtype=torch.int64, device=ids.device)
        ids = ids.long()
        missing = self.missing[layer][ids] & (ids != self.sentinel)  # [n, k]
        first = torch.where(missing, ids, self.sentinel).amin(-1)  # [n]
        return torch.where(first < self.sentinel, base + first, 0)

    def lost_error(self, code: int) -> ExpertUnavailableError:
        """The error of a row whose `lost_code` is `code` (nonzero)."""
        layer, e = divmod(code - 1, self.sentinel + 1)
        return self.placement.unavailable_error(layer, None if e == self.sentinel else e)


def pack(node: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, x: torch.Tensor, dense_home: int, sentinel: int,
         caps: torch.Tensor, src: torch.Tensor, xb: torch.Tensor, idsb: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Fill every peer's buffer for one micro-batch layer.

    node [n, k] (from `assign`), ids [n, k], w [n, k], x [n, H]; caps [P] int64 (each peer's
    capacity, <= C); out: src [P, C] int64 (row of each slot, n where none), xb [P, C, H],
    idsb [P, C, k] int32, wb [P, C, k] float32. -> rows each peer needed [P] int64 (more
    than its cap: overflow)."""
    num_peers, cap = src.shape
    n = node.shape[0]
    peers = torch.arange(num_peers, device=node.device)
    mine = node[None] == peers[:, None, None]  # [P, n, k]
    need = mine.any(-1)  # [P, n]
    if dense_home >= 0:
        need[dense_home] = True
    pos = need.cumsum(1) - 1  # [P, n] slot of each needed row
    fits = need & (pos < caps[:, None])
    slot = torch.where(fits, pos, cap)  # rows not sent go to slot `cap` (dropped below)
    flat = (peers[:, None] * (cap + 1) + slot).flatten()  # [P * n]
    rows = torch.full((num_peers * (cap + 1),), n, dtype=torch.int64, device=node.device)
    rows.scatter_(0, flat, torch.arange(n, device=node.device).repeat(num_peers))
    src.copy_(rows.view(num_peers, cap + 1)[:, :cap])
    valid = src < n  # [P, C]
    at = src.clamp_max(n - 1)  # [P, C]
    torch.index_select(x, 0, at.flatten(), out=xb.view(-1, x.shape[1]))
    give = valid[..., None] & (node[at] == peers[:, None, None])  # [P, C, k]
    idsb.copy_(torch.where(give, ids[at], sentinel))
    wb.copy_(torch.where(give, w[at].float(), 0.0))
    return need.sum(1)


def combine(y: list[torch.Tensor], src: torch.Tensor, n: int) -> torch.Tensor:
    """Partial sums y[p] [C_p, H] of each peer's slots -> [n, H] per row (slots naming row n
    are dropped). Peers are added in order, each row at most once per peer."""
    out = torch.zeros(n + 1, y[0].shape[1], dtype=y[0].dtype, device=y[0].device)
    for p, yp in enumerate(y):
        out.index_add_(0, src[p, : yp.shape[0]], yp)
    return out[:n]


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
