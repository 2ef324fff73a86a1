"""Logical expert ids to physical slots, for the attention side's dispatch."""

from __future__ import annotations

import torch


def split_among_replicas(
    token_expert_ids: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    offset: int | torch.Tensor = 0,
) -> torch.Tensor:
    """Choose a slot for every (token, expert) pair of one layer.

    token_expert_ids: [T, k] logical expert ids in [0, experts).
    log2phy: [experts, max_replicas], logcnt: [experts], one layer of a Placement.
    offset: rotates which replica takes an expert's first pair (an int, or
    a 0-d int64 tensor to keep a CUDA graph reusable). Small decode batches
    send an expert one or two tokens, which would always land on replica 0;
    passing the step number or the attention rank spreads them over time.
    Returns [T, k] int64 slot ids. The pairs of an expert, taken in row-major
    order, go round-robin over its replicas (the n-th pair to replica
    (n + offset) % logcnt), so replica counts differ by at most one and the
    result depends only on the inputs. No host synchronisation: safe on the
    GPU hot path.
    """
    if token_expert_ids.dim() != 2:
        raise ValueError(f"token_expert_ids must be [tokens, top_k], got {tuple(token_expert_ids.shape)}")
    if token_expert_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"token_expert_ids must be int32 or int64, got {token_expert_ids.dtype}")
    if log2phy.dim() != 2 or logcnt.dim() != 1 or log2phy.shape[0] != logcnt.shape[0]:
        raise ValueError(
            f"log2phy must be [experts, max_replicas] and logcnt [experts] (one layer), got "
            f"{tuple(log2phy.shape)} and {tuple(logcnt.shape)}"
        )
    flat_ids = token_expert_ids.reshape(-1).long()  # [N], N = T * k
    num_pairs = flat_ids.numel()
    order = torch.sort(flat_ids, stable=True).indices  # [N] pairs grouped by expert, row-major within
    pairs_per_expert = torch.zeros(logcnt.shape[0], dtype=torch.int64, device=flat_ids.device)  # [E]
    pairs_per_expert.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
    starts = pairs_per_expert.cumsum(0) - pairs_per_expert  # [E]
    rank_sorted = torch.arange(num_pairs, device=flat_ids.device) - starts[flat_ids[order]]  # [N]
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)  # [N] n-th pair of its expert
    replica = (rank + offset) % logcnt[flat_ids]  # [N]
    return log2phy[flat_ids, replica].reshape(token_expert_ids.shape)  # [T, k]
