"""Launch helpers shared by the Triton kernel modules (shapes and device facts only; no triton
import, so the CPU CI imports it too)."""

from __future__ import annotations

import functools

import torch


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, n - 1).bit_length()


@functools.cache
def sm_count(device_index: int | None) -> int:
    """Streaming multiprocessors of a CUDA device; 1 for None (the CPU interpreter: small, so
    tests see several splits)."""
    if device_index is None:
        return 1
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_index(t: torch.Tensor) -> int | None:
    """The CUDA device index of a tensor; None for a CPU tensor."""
    if not t.is_cuda:
        return None
    return t.device.index if t.device.index is not None else torch.cuda.current_device()
