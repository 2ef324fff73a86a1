"""Synthetic skewed expert popularity (Zipf), for tests and benchmarks.

The expert of popularity rank i (0-based) gets probability proportional to
1 / (i + 1) ** exponent; which expert holds which rank is a random permutation
drawn from the seed. exponent 0 is uniform; larger exponents are more skewed.
"""

from __future__ import annotations

import torch


def zipf_loads(
    num_layers: int, num_experts: int, exponent: float, total_tokens: float, seed: int
) -> torch.Tensor:
    """Expected tokens per expert: each layer's row sums to total_tokens. -> [layers, experts] float64

    Each layer draws its own permutation, so hot experts differ between layers.
    """
    _check_zipf_args(num_experts, exponent)
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    if not total_tokens >= 0:
        raise ValueError(f"total_tokens must be >= 0, got {total_tokens}")
    generator = torch.Generator().manual_seed(seed)
    probs = _zipf_probs(num_experts, exponent)  # [E] by rank
    draws = torch.rand(num_layers, num_experts, generator=generator, dtype=torch.float64)  # [L, E]
    ranks = draws.argsort(1)  # [L, E] popularity rank of each expert
    return total_tokens * probs[ranks]  # [L, E]


def zipf_router_bias(num_experts: int, exponent: float, seed: int) -> torch.Tensor:
    """Log Zipf probabilities of the experts, permuted by seed. -> [experts] float32

    softmax(bias) is the Zipf distribution; adding the bias to router logits
    skews which experts a synthetic router picks.
    """
    _check_zipf_args(num_experts, exponent)
    generator = torch.Generator().manual_seed(seed)
    ranks = torch.randperm(num_experts, generator=generator)  # [E] popularity rank of each expert
    return _zipf_probs(num_experts, exponent)[ranks].log().float()  # [E]


def _zipf_probs(num_experts: int, exponent: float) -> torch.Tensor:
    weights = torch.arange(1, num_experts + 1, dtype=torch.float64).pow(-exponent)  # [E]
    return weights / weights.sum()


def _check_zipf_args(num_experts: int, exponent: float) -> None:
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if not exponent >= 0:
        raise ValueError(f"exponent must be >= 0, got {exponent}")
