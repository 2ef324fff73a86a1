"""Expert placement: which GPU slots hold which experts, with replicas of hot ones.

Follows the semantics of DeepSeek's EPLB (hierarchical policy when nodes divide
expert groups, global otherwise); see `rebalance`.

Slot layout (per MoE layer): num_slots physical slots, GPU-major. With
slots_per_gpu = num_slots // num_gpus, slot s lives on GPU s // slots_per_gpu,
and GPUs are numbered node-major (node n owns GPUs n*gpus_per_node ...).
A Placement holds, per layer:
    phy2log [layers, slots]                 logical expert held by each slot
    log2phy [layers, experts, max_replicas] slots of each expert, -1 padded
    logcnt  [layers, experts]               replicas of each expert (>= 1)

Layer map (modules import only downwards; afkv.errors and torch below all):
    dispatch   split_among_replicas: [T, k] expert ids -> [T, k] slot ids
       |       (uses one layer of a Placement; no import of placement)
    placement  Placement, rebalance, naive_placement, gpu_loads, balancedness
       |
    packing    the greedy steps: equal-count bin packing, replica counts
    skew       Zipf loads and router bias for tests/benchmarks (standalone)
"""

from afkv.eplb.dispatch import split_among_replicas
from afkv.eplb.placement import Placement, balancedness, gpu_loads, naive_placement, rebalance
from afkv.eplb.skew import zipf_loads, zipf_router_bias

__all__ = [
    "Placement",
    "balancedness",
    "gpu_loads",
    "naive_placement",
    "rebalance",
    "split_among_replicas",
    "zipf_loads",
    "zipf_router_bias",
]
