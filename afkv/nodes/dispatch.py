"""Per-peer dispatch of the fixed-buffer data plane, planned on the device.

The attention node sends each expert node only the rows (tokens) it has work for, into a
buffer of a fixed capacity per (micro-batch, peer), so that no count is exchanged and a
step keeps static shapes (CUDA graphs):

1. `assign`: every (token, expert) pair goes to one live replica of its expert, the n-th
   pair of an expert (row-major) to replica (n + offset) % replicas (as on the CPU data
   plane, afkv.nodes.placement). `offset` is a device scalar bumped every step, so a graph
   replay spreads pairs like an eager step.
2. `pack`: per peer, the rows with a pair for it (every row for the node holding the
   layer's dense MLP / shared expert), in row order, fill its buffer: x rows, expert ids
   (ids of pairs given to other peers become `sentinel`, held by nobody) and weights (0
   there). Slots past the peer's rows name row `n` (none) and carry only the sentinel.
3. The expert nodes return partial sums per slot; `combine` adds them up per row, peer by
   peer in peer order (each row once per peer: the sum is deterministic).

A peer with more rows than its capacity overflows: the rows past it are not sent, and the
step must be computed again with more room (NcclFFN raises StepRetryError at the end of
the step). `counts` [peers] say how many rows each peer needed, so capacities follow the
workload. A pair whose expert has no live replica marks its row `lost`.
"""

from __future__ import annotations

import torch

from afkv.eplb import split_among_replicas
from afkv.nodes.placement import ExpertPlacement


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
        live = placement._live_tables(dead)
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

    def lost_rows(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        """Rows [n] bool that need an expert (or dense part) without a live node."""
        if layer in self.dense_lost:
            return torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
        if not self.has_router[layer]:
            return torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        ids = ids.long()
        return (self.missing[layer][ids] & (ids != self.sentinel)).any(-1)


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
