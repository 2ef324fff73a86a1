"""Block formats: how a tier stores one KV block as one row of bytes.

    RawFormat          the model dtype's bytes, unchanged (exact), for any layout
    QuantFormat        fp8 / int8 / int4 rows of a KVLayout (afkv.ops.quant: one scale, and
                       zero point, per (token, kv head) in 16-bit; int4 over Hadamard-rotated vectors)
    LatentQuantFormat  fp8 / int8 rows of a LatentLayout (MLA: the compressed KV per token and
                       128-value group, the rotary key in 16-bit; afkv.ops.quant; int4 refused)

A format sees blocks as a tensor [n, *layout.block_shape] and stores each as one uint8 row
of `nbytes`, so a block moves between tiers as one transfer. Every row is num_layers sections
of `layer_nbytes`, one per layer, so one layer of a block can move (and be decoded) alone:
what streaming attention (afkv.kv.stream) copies to the device layer by layer. It is the only code that knows
what an attention layer caches and how (the attention kernels read the rows it writes through
afkv.ops.quant's layout): tiers, the manager and transfers move opaque rows, and a new
attention type adds a format here, not a tier or a manager. `digest` names the format, its
version and the geometry: a stored row is only ever decoded by a format with the same digest
(a disk file of another digest is recomputed, never read).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import torch

from afkv.kv.layout import KVLayout, LatentLayout, Layout
from afkv.ops import quant
from afkv.ops.attention import QuantizedKVCache

FORMAT_NAMES = ("none", *quant.FORMATS)
_ROW_VERSION = 2  # 1: float32 KIVI groups (2026-11); 2: per-(token, head) 16-bit scales


@dataclass(frozen=True)
class RawFormat:
    layout: Layout

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

    @property
    def layer_nbytes(self) -> int:
        return self.nbytes // self.layout.num_layers

    def decode_layer(self, sections: torch.Tensor) -> torch.Tensor:
        """One layer's sections uint8 [n, layer_nbytes] -> [n, 2, bs, Hkv, D] (a view, no copy)."""
        lay = self.layout
        return sections.view(lay.dtype).view(sections.shape[0], 2, lay.block_size, lay.num_kv_heads, lay.head_dim)

    def layer_cache(self, sections: torch.Tensor) -> torch.Tensor:
        """One layer's sections uint8 [n, layer_nbytes] -> a one-layer KV cache [n, 1, 2, bs, Hkv, D]
        that the paged attention kernels read in place (a view)."""
        return self.decode_layer(sections)[:, None]


@dataclass(frozen=True)
class QuantFormat:
    layout: KVLayout
    spec: quant.QuantSpec

    @staticmethod
    def of(kind: str, layout: KVLayout) -> QuantFormat:
        """`kind` (fp8 | int8 | int4) for blocks of `layout`, scale data in its 16-bit dtype."""
        spec = quant.QuantSpec(kind, layout.num_layers, layout.block_size, layout.num_kv_heads, layout.head_dim,
                               quant.scale_dtype_for(layout.dtype))
        return QuantFormat(layout, spec)

    @property
    def name(self) -> str:
        return self.spec.kind

    @property
    def nbytes(self) -> int:
        return self.spec.row_nbytes

    @property
    def digest(self) -> bytes:
        return _digest(f"v{_ROW_VERSION}|{self.name}|{self.spec.scale_dtype}|{self.layout.block_shape}|"
                       f"{self.layout.dtype}")

    def encode(self, blocks: torch.Tensor) -> torch.Tensor:
        """blocks [n, *block_shape] -> uint8 [n, nbytes] on the blocks' device."""
        return quant.quantize_rows(blocks, self.spec)  # [n, nbytes]

    def decode(self, rows: torch.Tensor, out: torch.Tensor) -> None:
        """rows uint8 [n, nbytes] -> out [n, *block_shape] (same device), dequantized."""
        quant.dequantize_rows(rows, self.spec, self.layout.dtype, out=out)

    @property
    def layer_nbytes(self) -> int:
        return self.spec.layer_nbytes

    def decode_layer(self, sections: torch.Tensor) -> torch.Tensor:
        """One layer's sections uint8 [n, layer_nbytes] -> [n, 2, bs, Hkv, D] in the model dtype
        (a section is a one-layer row of the same kind)."""
        one = dataclasses.replace(self.spec, num_layers=1)
        return quant.dequantize_layers(sections, one, self.layout.dtype, 0)  # [n, 2, bs, Hkv, D]

    def layer_cache(self, sections: torch.Tensor) -> QuantizedKVCache:
        """One layer's sections uint8 [n, layer_nbytes] -> a quantized cache of one-layer rows
        that the quantized decode kernel reads in place (codes never dequantized to memory); no
        staging block is ever named (its one placeholder block is never read)."""
        lay = self.layout
        placeholder = torch.empty((1, 1, 2, lay.block_size, lay.num_kv_heads, lay.head_dim), dtype=lay.dtype,
                                  device=sections.device)
        return QuantizedKVCache(sections, placeholder, dataclasses.replace(self.spec, num_layers=1), 1)


@dataclass(frozen=True)
class LatentQuantFormat:
    layout: LatentLayout
    spec: quant.LatentQuantSpec

    @staticmethod
    def of(kind: str, layout: LatentLayout) -> LatentQuantFormat:
        """`kind` (fp8 | int8) for latent blocks of `layout`, scale data in its 16-bit dtype
        (ConfigError for int4, which does not hold accuracy on latents)."""
        spec = quant.LatentQuantSpec(kind, layout.num_layers, layout.block_size, layout.kv_lora_rank, layout.rope_dim,
                                     quant.scale_dtype_for(layout.dtype))
        return LatentQuantFormat(layout, spec)

    @property
    def name(self) -> str:
        return self.spec.kind

    @property
    def nbytes(self) -> int:
        return self.spec.row_nbytes

    @property
    def digest(self) -> bytes:
        return _digest(f"latent-v1|{self.name}|{self.spec.scale_dtype}|{self.layout.block_shape}|{self.layout.dtype}")

    def encode(self, blocks: torch.Tensor) -> torch.Tensor:
        """blocks [n, L, bs, r + dr] -> uint8 [n, nbytes] on the blocks' device."""
        return quant.quantize_latent_rows(blocks, self.spec)

    def decode(self, rows: torch.Tensor, out: torch.Tensor) -> None:
        """rows uint8 [n, nbytes] -> out [n, L, bs, r + dr] (same device), dequantized."""
        quant.dequantize_latent_rows(rows, self.spec, self.layout.dtype, out=out)


BlockFormat = RawFormat | QuantFormat | LatentQuantFormat


def make_format(name: str, layout: Layout) -> BlockFormat:
    """`name` is one of FORMAT_NAMES (validated by the config)."""
    if name == "none":
        return RawFormat(layout)
    if isinstance(layout, LatentLayout):
        return LatentQuantFormat.of(name, layout)
    return QuantFormat.of(name, layout)


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()
