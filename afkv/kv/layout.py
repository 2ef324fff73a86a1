"""Block layouts: what one KV block holds, as a frozen geometry (no tensors).

    KVLayout      keys and values per (token, kv head): [num_layers, 2, block_size, Hkv, D]
    LatentLayout  one MLA latent per token (DeepSeek-V2/V3: the compressed KV and the rotary
                  key, kv_lora_rank + rope_dim values), no heads: [num_layers, block_size, r + dr]

Both give `block_shape`, `block_nbytes`, `block_size`, `num_layers`, `dtype` and
`num_blocks_for`: the pool, the tiers, the transfers and the checksums see a block as
`block_shape` values of `dtype` (or as a format's row of bytes, afkv.kv.formats) and never
look inside. `layout_for` picks the layout of a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from afkv.model.spec import ModelSpec


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int  # tokens per block
    dtype: torch.dtype

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_nbytes(self) -> int:
        return _numel(self.block_shape) * self.dtype.itemsize

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


@dataclass(frozen=True)
class LatentLayout:
    """MLA: per token and layer one latent of kv_lora_rank + rope_dim values (no heads, no
    separate keys and values: every query head reads the same latent)."""

    num_layers: int
    kv_lora_rank: int
    rope_dim: int
    block_size: int  # tokens per block
    dtype: torch.dtype

    @property
    def latent_dim(self) -> int:
        return self.kv_lora_rank + self.rope_dim

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (self.num_layers, self.block_size, self.latent_dim)

    @property
    def block_nbytes(self) -> int:
        return _numel(self.block_shape) * self.dtype.itemsize

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


Layout = KVLayout | LatentLayout


def layout_for(spec: ModelSpec, block_size: int, dtype: torch.dtype) -> Layout:
    """The block layout of a model's KV cache: latents for MLA models, else keys and values."""
    if spec.mla is not None:
        return LatentLayout(spec.num_layers, spec.mla.kv_lora_rank, spec.mla.qk_rope_head_dim, block_size, dtype)
    return KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, block_size, dtype)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
