"""Where each expert replica lives: the Placement record and the policy that makes it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from afkv.eplb.packing import pack_equal_counts, replica_counts


@dataclass(frozen=True, eq=False)
class Placement:
    """Experts to slots for every MoE layer; slot s lives on GPU s // slots_per_gpu.

    Invariants (rebalance and naive_placement produce them; tests check them):
    - phy2log[l, s] is the logical expert held by slot s.
    - logcnt[l, e] >= 1 replicas of expert e; logcnt[l].sum() == num_slots.
    - log2phy[l, e, r] for r < logcnt[l, e] are the slots of expert e, in
      ascending order; the rest of the row is -1 (padding, nothing else).
    """

    phy2log: torch.Tensor  # [layers, slots] int64
    log2phy: torch.Tensor  # [layers, experts, max_replicas] int64
    logcnt: torch.Tensor  # [layers, experts] int64
    num_gpus: int

    def __post_init__(self) -> None:
        for name in ("phy2log", "log2phy", "logcnt"):
            if getattr(self, name).dtype != torch.int64:
                raise ValueError(f"Placement.{name} must be int64, got {getattr(self, name).dtype}")
        if self.phy2log.dim() != 2 or self.logcnt.dim() != 2 or self.log2phy.dim() != 3:
            raise ValueError("Placement tensors must be phy2log [L, S], log2phy [L, E, R], logcnt [L, E]")
        if self.log2phy.shape[:2] != self.logcnt.shape or self.phy2log.shape[0] != self.logcnt.shape[0]:
            raise ValueError(
                f"Placement shapes disagree: phy2log {tuple(self.phy2log.shape)}, "
                f"log2phy {tuple(self.log2phy.shape)}, logcnt {tuple(self.logcnt.shape)}"
            )
        _check_positive_int("num_gpus", self.num_gpus)
        if self.num_slots % self.num_gpus != 0:
            raise ValueError(f"num_slots ({self.num_slots}) must be divisible by num_gpus ({self.num_gpus})")

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_slots(self) -> int:
        return self.phy2log.shape[1]

    @property
    def num_experts(self) -> int:
        return self.logcnt.shape[1]

    @property
    def max_replicas(self) -> int:
        return self.log2phy.shape[2]

    @property
    def slots_per_gpu(self) -> int:
        return self.num_slots // self.num_gpus


def rebalance(
    loads: torch.Tensor, num_slots: int, num_groups: int, num_nodes: int, num_gpus: int
) -> Placement:
    """Place experts (with replicas) on num_slots slots so that GPUs carry even load.

    loads: [layers, experts] tokens routed to each logical expert (any real dtype).
    Experts come in num_groups groups of consecutive ids. When num_nodes divides
    num_groups the policy is hierarchical:
      1. pack whole groups onto nodes, balancing group load, equal groups per node;
      2. within each node, give spare slots to the expert with the highest
         load per replica, until the node's num_slots / num_nodes slots are used
         (an expert gets more replicas than the node has GPUs only when every
         expert has one per GPU: a second replica on one GPU relieves nothing);
      3. pack the node's replicas onto its GPUs, balancing load, equal slots per GPU.
    Otherwise the policy is global: the same steps with one group and one node.
    log2phy is padded to num_slots - num_experts + 1 replicas, the most any
    expert can get, so its shape depends only on the arguments.
    """
    for name, value in (
        ("num_slots", num_slots),
        ("num_groups", num_groups),
        ("num_nodes", num_nodes),
        ("num_gpus", num_gpus),
    ):
        _check_positive_int(name, value)
    _check_loads(loads)
    num_layers, num_experts = loads.shape
    if num_gpus % num_nodes != 0:
        raise ValueError(f"num_gpus ({num_gpus}) must be divisible by num_nodes ({num_nodes})")
    if num_slots % num_gpus != 0:
        raise ValueError(f"num_slots ({num_slots}) must be divisible by num_gpus ({num_gpus})")
    if num_experts % num_groups != 0:
        raise ValueError(f"loads has {num_experts} experts, not divisible by num_groups ({num_groups})")
    if num_slots < num_experts:
        raise ValueError(f"num_slots ({num_slots}) must be at least the {num_experts} experts of loads")
    if num_groups % num_nodes != 0:
        num_groups, num_nodes = 1, 1

    rows = loads.detach().to("cpu", torch.float64).tolist()
    phy2log = torch.tensor(
        [_place_layer(row, num_slots, num_groups, num_nodes, num_gpus) for row in rows],
        dtype=torch.int64,
    ).reshape(num_layers, num_slots)  # [L, S]
    return _to_device(_placement_from_phy2log(phy2log, num_experts, num_gpus), loads.device)


def naive_placement(num_experts: int, num_layers: int, *, num_gpus: int) -> Placement:
    """Expert e in slot e of every layer, no replicas: the placement without EPLB."""
    _check_positive_int("num_experts", num_experts)
    _check_positive_int("num_gpus", num_gpus)
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    if num_experts % num_gpus != 0:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by num_gpus ({num_gpus})")
    phy2log = torch.arange(num_experts, dtype=torch.int64).expand(num_layers, -1).contiguous()  # [L, E]
    return _placement_from_phy2log(phy2log, num_experts, num_gpus)


def gpu_loads(loads: torch.Tensor, placement: Placement) -> torch.Tensor:
    """Tokens each GPU serves, each expert's load split evenly over its replicas. -> [layers, gpus] float64"""
    _check_loads(loads)
    if tuple(loads.shape) != (placement.num_layers, placement.num_experts):
        raise ValueError(
            f"loads has shape {tuple(loads.shape)}, the placement needs "
            f"({placement.num_layers}, {placement.num_experts})"
        )
    loads = loads.to(placement.logcnt.device, torch.float64)
    replica_loads = loads / placement.logcnt  # [L, E]
    slot_loads = replica_loads.gather(1, placement.phy2log)  # [L, S]
    per_gpu = slot_loads.reshape(
        placement.num_layers, placement.num_gpus, placement.slots_per_gpu
    )  # [L, P, S/P]
    return per_gpu.sum(-1)  # [L, P]


def balancedness(loads: torch.Tensor, placement: Placement) -> torch.Tensor:
    """Heaviest GPU load over mean GPU load per layer (1.0 is perfect). -> [layers] float64

    A layer with no load at all counts as perfectly balanced.
    """
    per_gpu = gpu_loads(loads, placement)  # [L, P]
    mean = per_gpu.mean(-1)  # [L]
    heaviest = per_gpu.amax(-1)  # [L]
    return torch.where(mean > 0, heaviest / mean.clamp_min(torch.finfo(torch.float64).tiny), 1.0)


def _place_layer(
    loads: list[float], num_slots: int, num_groups: int, num_nodes: int, num_gpus: int
) -> list[int]:
    """One layer's phy2log row: for each slot in GPU-major order, its logical expert."""
    experts_per_group = len(loads) // num_groups
    group_loads = [sum(loads[g * experts_per_group : (g + 1) * experts_per_group]) for g in range(num_groups)]
    node_of_group = pack_equal_counts(group_loads, num_nodes)
    slots_per_node = num_slots // num_nodes
    gpus_per_node = num_gpus // num_nodes

    phy2log: list[int] = []
    for node in range(num_nodes):
        experts = [
            g * experts_per_group + i
            for g in range(num_groups)
            if node_of_group[g] == node
            for i in range(experts_per_group)
        ]
        counts = replica_counts([loads[e] for e in experts], slots_per_node, gpus_per_node)
        replica_experts = [e for e, count in zip(experts, counts, strict=True) for _ in range(count)]
        replica_loads = [
            loads[e] / count for e, count in zip(experts, counts, strict=True) for _ in range(count)
        ]
        gpu_of_replica = pack_equal_counts(replica_loads, gpus_per_node)
        for gpu in range(gpus_per_node):
            phy2log.extend(
                sorted(e for e, g in zip(replica_experts, gpu_of_replica, strict=True) if g == gpu)
            )
    assert len(phy2log) == num_slots
    return phy2log


def _placement_from_phy2log(phy2log: torch.Tensor, num_experts: int, num_gpus: int) -> Placement:
    """Derive logcnt and log2phy from phy2log [L, S] (CPU, int64)."""
    num_layers, num_slots = phy2log.shape
    max_replicas = num_slots - num_experts + 1
    logcnt = torch.zeros(num_layers, num_experts, dtype=torch.int64)  # [L, E]
    logcnt.scatter_add_(1, phy2log, torch.ones_like(phy2log))
    # Rank of each slot among the slots of its expert, in ascending slot order.
    order = torch.sort(phy2log, dim=1, stable=True).indices  # [L, S] slots grouped by expert
    starts = logcnt.cumsum(1) - logcnt  # [L, E] first position of each expert in `order`
    sorted_experts = phy2log.gather(1, order)  # [L, S]
    rank = torch.arange(num_slots).expand(num_layers, -1) - starts.gather(1, sorted_experts)  # [L, S]
    log2phy = torch.full((num_layers, num_experts, max_replicas), -1, dtype=torch.int64)  # [L, E, R]
    layer_ids = torch.arange(num_layers).unsqueeze(1).expand(-1, num_slots)  # [L, S]
    log2phy[layer_ids, sorted_experts, rank] = order
    return Placement(phy2log=phy2log, log2phy=log2phy, logcnt=logcnt, num_gpus=num_gpus)


def _to_device(placement: Placement, device: torch.device) -> Placement:
    return Placement(
        phy2log=placement.phy2log.to(device),
        log2phy=placement.log2phy.to(device),
        logcnt=placement.logcnt.to(device),
        num_gpus=placement.num_gpus,
    )


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_loads(loads: object) -> None:
    if not isinstance(loads, torch.Tensor):
        raise ValueError(f"loads must be a torch.Tensor [layers, experts], got {type(loads).__name__}")
    if loads.dim() != 2 or loads.shape[1] == 0:
        raise ValueError(f"loads must be [layers, experts] with experts >= 1, got {tuple(loads.shape)}")
    if loads.dtype == torch.bool or loads.is_complex():
        raise ValueError(f"loads must be real token counts, got dtype {loads.dtype}")
    if loads.numel() and not bool(torch.isfinite(loads).all()):
        raise ValueError("loads must be finite")
    if loads.numel() and bool((loads < 0).any()):
        raise ValueError("loads must be non-negative")
