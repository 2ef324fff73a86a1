"""Kernel selection: the one place that decides which implementation each op of a decoder
layer runs on a device. The model's sides take a `Kernels` when they are built and never
choose again.

    CUDA with triton   the Triton kernels: fused small ops (triton_fused), paged attention over
                       the device cache or a quantized device tier (triton_attention), MLA over
                       latents (triton_mla), the fused MoE (triton_moe; AFKV_MOE_KERNEL=grouped
                       keeps torch's grouped GEMMs, a tuning switch)
    otherwise          the torch references (afkv.ops.attention, afkv.ops.mla, afkv.ops.layers)

The Triton attention kernels read only each row's context, with grids that depend on shapes
only: a decode step built on them can be captured in a CUDA graph (`graph_safe`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from afkv.ops import attention, mla


@dataclass(frozen=True)
class Kernels:
    fused: ModuleType | None  # afkv.ops.triton_fused, or None: the torch compositions
    moe: ModuleType | None  # afkv.ops.triton_moe, or None: torch grouped GEMMs / per-expert loops
    decode: Callable  # (q, kv, layer, block_tables, context_lens, window) -> [B, H, D]
    prefill: Callable  # (q, kv, layer, block_ids, context_len, window) -> [n, H, D]
    decode_quantized: Callable  # the same over a QuantizedKVCache
    prefill_quantized: Callable
    decode_partial: Callable  # (q, kv, layer, block_tables, context_lens) -> Partial: decode with its log-sum-exp
    decode_partial_quantized: Callable  # the same over a QuantizedKVCache
    prefill_partial: Callable  # (q, kv, layer, block_ids, context_len, causal) -> Partial: prefill with its log-sum-exp
    prefill_partial_quantized: Callable  # the same over a QuantizedKVCache
    mla_decode: Callable  # (q_abs, cache, layer, block_tables, context_lens, scale, r) -> [B, H, r]
    mla_prefill: Callable  # (q_abs, cache, layer, block_ids, context_len, scale, r) -> [n, H, r], causal
    graph_safe: bool  # every attention kernel reads only each row's context, with shape-only grids

    def attention_for(self, kv) -> tuple[Callable, Callable]:
        """(decode, prefill) over `kv`: the device cache or a quantized device tier."""
        if isinstance(kv, attention.QuantizedKVCache):
            return self.decode_quantized, self.prefill_quantized
        return self.decode, self.prefill

    def partial_for(self, kv) -> Callable:
        """decode_partial over `kv`: the device cache (or a streamed ring slot) or quantized rows."""
        if isinstance(kv, attention.QuantizedKVCache):
            return self.decode_partial_quantized
        return self.decode_partial

    def prefill_partial_for(self, kv) -> Callable:
        """prefill_partial over `kv`: the device cache (or a streamed ring slot) or quantized rows."""
        if isinstance(kv, attention.QuantizedKVCache):
            return self.prefill_partial_quantized
        return self.prefill_partial


def torch_kernels() -> Kernels:
    """The torch references (every device)."""
    return Kernels(None, None, attention.paged_decode_attention, attention.paged_attention,
                   attention.paged_decode_attention_quantized, attention.paged_attention_quantized,
                   attention.paged_decode_partial, attention.paged_decode_partial_quantized,
                   attention.paged_attention_partial, attention.paged_attention_partial_quantized,
                   mla.mla_decode_attention, mla.mla_attention, graph_safe=False)


def select_kernels(device: torch.device) -> Kernels:
    """The kernels for `device`: Triton on CUDA where triton is installed, else torch's."""
    if device.type != "cuda":
        return torch_kernels()
    from afkv.ops import triton_attention, triton_fused, triton_mla, triton_moe  # import triton: GPU machines

    if not triton_attention.available():
        return torch_kernels()
    use_moe = triton_moe.available() and os.environ.get("AFKV_MOE_KERNEL", "auto") != "grouped"
    return Kernels(
        fused=triton_fused if triton_fused.available() else None,
        moe=triton_moe if use_moe else None,
        decode=triton_attention.paged_decode_attention,
        prefill=triton_attention.paged_prefill_attention,
        decode_quantized=triton_attention.paged_decode_attention_quantized,
        prefill_quantized=triton_attention.paged_prefill_attention_quantized,
        decode_partial=triton_attention.paged_decode_partial,
        decode_partial_quantized=triton_attention.paged_decode_partial_quantized,
        prefill_partial=triton_attention.paged_prefill_partial,
        prefill_partial_quantized=triton_attention.paged_prefill_partial_quantized,
        mla_decode=triton_mla.paged_mla_decode,
        mla_prefill=triton_mla.paged_mla_prefill,
        graph_safe=True,
    )
