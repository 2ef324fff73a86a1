"""The two greedy steps of expert placement, for one layer at a time.

Both work on plain Python lists: a layer has at most a few hundred experts,
and these run off the serving path, when a new placement is computed.
Ties are broken by the lowest index, so equal inputs give equal outputs.
"""

from __future__ import annotations

import heapq


def pack_equal_counts(weights: list[float], num_packs: int) -> list[int]:
    """Assign items to packs, each pack getting exactly len(weights) / num_packs items.

    Greedy longest-processing-time: heaviest item first, each to the lightest
    pack that still has room. Returns the pack id of each item.
    """
    assert num_packs > 0 and len(weights) % num_packs == 0
    items_per_pack = len(weights) // num_packs
    pack_ids = [-1] * len(weights)
    pack_loads = [0.0] * num_packs
    pack_sizes = [0] * num_packs
    for item in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        open_packs = (p for p in range(num_packs) if pack_sizes[p] < items_per_pack)
        pack = min(open_packs, key=lambda p: (pack_loads[p], p))
        pack_ids[item] = pack
        pack_loads[pack] += weights[item]
        pack_sizes[pack] += 1
    return pack_ids


def replica_counts(weights: list[float], num_slots: int, num_gpus: int) -> list[int]:
    """Give every expert one slot, then each spare slot to the expert whose
    load per replica is highest at that moment. Returns replicas per expert.

    The replicas are later packed onto num_gpus GPUs. An expert with more
    replicas than GPUs must have two on one GPU, which relieves nothing, so
    experts below num_gpus replicas are served first; the cap lifts only when
    every expert has reached it. Without the cap binding, this greedy choice
    minimises the heaviest load per replica over all ways of spreading the slots.
    """
    assert num_slots >= len(weights) > 0 and num_gpus > 0
    counts = [1] * len(weights)
    heap = [(1 >= num_gpus, -w, e) for e, w in enumerate(weights)]  # (capped, -load per replica, expert)
    heapq.heapify(heap)
    for _ in range(num_slots - len(weights)):
        _, _, expert = heapq.heappop(heap)
        counts[expert] += 1
        heapq.heappush(heap, (counts[expert] >= num_gpus, -weights[expert] / counts[expert], expert))
    return counts
