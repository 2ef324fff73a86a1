"""Block formats: how a tier stores one KV block as one row of bytes.

    RawFormat    the device dtype's bytes, unchanged (exact)
    KiviFormat   KIVI int8 / int4 (afkv.ops.quant): keys per channel, values per token,
                 group-wise float32 scales and zero points; the CUDA kernels of afkv.ops.native
                 when the blocks are on a GPU, the torch reference otherwise

A format sees blocks as a tensor [n, *layout.block_shape] and stores each as one uint8 row
of `nbytes`, so a block moves between tiers as one transfer. It is the only code that knows
what an attention layer caches: a new attention type (MLA latents) adds a format here, not a
tier or a manager. `digest` names the format and geometry: a stored row is only ever
decoded by a format with the same digest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from afkv.kv.layout import KVLayout
from afkv.ops import native, quant
from afkv.ops.quant import QuantSpec

FORMAT_NAMES = ("none", "int8", "int4")


@dataclass(frozen=True)
class RawFormat:
    layout: KVLayout

    @property
    def name(self) -> str:
        return "none"

    @property
    def nbytes(self) -> int:
        return self.layout.block_nbytes

    @property
    def digest(self) -> bytes:
        return _digest(f"none|{self.layout.block_shape}|{self.layout.dtype}")

    def encode(self, blocks: torch.Tensor) -> torch.Tensor:
        """blocks [n, *block_shape] -> uint8 [n, nbytes] on the blocks' device."""
        return blocks.reshape(blocks.shape[0], -1).contiguous().view(torch.uint8)  # [n, nbytes]

    def decode(self, rows: torch.Tensor, out: torch.Tensor) -> None:
        """rows uint8 [n, nbytes] -> out [n, *block_shape] (same device)."""
        out.copy_(rows.contiguous().view(self.layout.dtype).view(out.shape))


@dataclass(frozen=True)
class KiviFormat:
    layout: KVLayout
    spec: QuantSpec

    def __post_init__(self) -> None:
        self.spec.validate(self.layout.block_size, self.layout.head_dim)

    @property
    def name(self) -> str:
        return f"int{self.spec.bits}"

    @property
    def nbytes(self) -> int:
        lay = self.layout
        return quant.packed_nbytes(self.spec, lay.num_layers, lay.block_size, lay.num_kv_heads, lay.head_dim)

    @property
    def digest(self) -> bytes:
        return _digest(f"{self.name}|g{self.spec.group_size}|{self.layout.block_shape}|{self.layout.dtype}")

    def encode(self, blocks: torch.Tensor) -> torch.Tensor:
        """blocks [n, *block_shape] -> uint8 [n, nbytes] on the blocks' device."""
        return quant.to_bytes(native.quantize_block(blocks, self.spec))  # [n, nbytes]

    def decode(self, rows: torch.Tensor, out: torch.Tensor) -> None:
        """rows uint8 [n, nbytes] -> out [n, *block_shape] (same device), dequantized."""
        lay = self.layout
        qb = quant.from_bytes(rows, self.spec, lay.num_layers, lay.block_size, lay.num_kv_heads, lay.head_dim)
        native.dequantize_block(qb, lay.dtype, out=out)


BlockFormat = RawFormat | KiviFormat


def make_format(name: str, group_size: int, layout: KVLayout) -> BlockFormat:
    """`name` is one of FORMAT_NAMES (validated by the config)."""
    if name == "none":
        return RawFormat(layout)
    return KiviFormat(layout, QuantSpec(8 if name == "int8" else 4, group_size))


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()
