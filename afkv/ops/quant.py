"""KIVI-style group-wise KV quantization: the torch reference (CPU and GPU).

afkv.ops.native runs the same format through the CUDA kernels of native/kv_quant.cu and
produces the same bytes; this module is the definition of the format.

Arithmetic (one group, b = spec.bits, qmax = 2**b - 1, all in float32):

    zero  = min(x)                          asymmetric: zero is the group minimum
    scale = (max(x) - zero) / qmax          IEEE division
    q     = clamp(rint((x - zero) / s), 0, qmax)   s = scale, or 1 where scale == 0
    x'    = q * scale + zero                a multiply, then an add (no fused multiply-add)

rint rounds half to even. So |x - x'| <= scale / 2 up to float32 rounding, and a constant
group (scale 0) comes back exactly. Inputs must be finite and their range must fit float32
(NaN/inf give unspecified codes).

Groups:
    keys   k [..., T, H, D]: per channel (h, d); a group is `group_size` consecutive tokens.
           scale, zero: float32 [..., T // group_size, H, D]
    values v [..., T, H, D]: per token; a group is `group_size` consecutive channels of D.
           scale, zero: float32 [..., T, H, D // group_size]
    data (both): uint8 [..., T, H, D] for int8; [..., T, H, D // 2] for int4, packed along
           head_dim: element 2j in the low nibble of byte j, element 2j+1 in the high nibble.

Scales and zero points are float32 (not float16): the error bound above holds without a
float16 rounding term, values beyond float16's range quantize, and kernels can match this
reference bit for bit. The cost is
8 bytes per group (int4, group 32: 6 bits per element instead of 5 with float16).

A block [num_layers, 2, block_size, H, D] (index 0 = K, 1 = V) serialises to ONE contiguous
uint8 buffer of `packed_nbytes(...)` bytes, sections in this order, each C-contiguous:

    k_scale f32 [L, bs // G, H, D] | k_zero f32 [L, bs // G, H, D]
    v_scale f32 [L, bs, H, D // G] | v_zero f32 [L, bs, H, D // G]
    k_data  u8  [L, bs, H, Dp]     | v_data u8  [L, bs, H, Dp]     | zero padding to 16 bytes

(Dp = D for int8, D // 2 for int4; float32 in the machine's byte order, little-endian on every
platform afkv runs on). Float sections come first so every one starts 4-byte aligned; the
padding keeps each block of an array [num_blocks, packed_nbytes] 16-byte aligned. Block
functions also take leading batch dims: block [*, L, 2, bs, H, D] <-> bytes [*, packed_nbytes].

paged_decode_attention is the reference of the decode kernel that attends directly over such
serialised blocks, [num_blocks, packed_nbytes], through a block table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from afkv.errors import ConfigError, CorruptBlockError

_BLOCK_ALIGN = 16  # bytes; every serialised block is padded to a multiple of this


@dataclass(frozen=True)
class QuantSpec:
    """How one KV tier quantizes: `bits` (8 or 4) and `group_size` (tokens for keys, channels
    of head_dim for values)."""

    bits: int
    group_size: int

    def __post_init__(self) -> None:
        if self.bits not in (8, 4):
            raise ConfigError(f"quantization bits must be 8 or 4, got {self.bits}", key="bits")
        if self.group_size <= 0:
            raise ConfigError(f"group_size must be > 0, got {self.group_size}", key="group_size")
        if self.bits == 4 and self.group_size % 2:
            raise ConfigError(
                f"int4 packs two channels per byte, so group_size must be even, got {self.group_size}",
                key="group_size",
            )

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def packed_dim(self, head_dim: int) -> int:
        """Bytes of data per (token, head)."""
        return head_dim * self.bits // 8

    def validate(self, block_size: int, head_dim: int) -> None:
        """Raise ConfigError unless this spec can quantize blocks of `block_size` tokens with
        heads of `head_dim` channels."""
        self.validate_tokens(block_size, what="block_size")
        self.validate_head_dim(head_dim)

    def validate_tokens(self, num_tokens: int, what: str = "num_tokens") -> None:
        if num_tokens % self.group_size:
            raise ConfigError(
                f"group_size {self.group_size} must divide {what} {num_tokens} "
                "(key groups run along tokens)",
                key="group_size",
            )

    def validate_head_dim(self, head_dim: int) -> None:
        if head_dim % self.group_size:
            raise ConfigError(
                f"group_size {self.group_size} must divide head_dim {head_dim} "
                "(value groups run along head_dim)",
                key="group_size",
            )
        self.validate_packing(head_dim)

    def validate_packing(self, head_dim: int) -> None:
        if self.bits == 4 and head_dim % 2:
            raise ConfigError(f"int4 packs two channels per byte: head_dim {head_dim} must be even", key="head_dim")


@dataclass(frozen=True)
class QuantizedTensor:
    """Quantized keys or values (which one is the caller's to remember): data uint8, scale and
    zero float32, shapes as in the module docstring."""

    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scale.nbytes + self.zero.nbytes


@dataclass(frozen=True)
class QuantizedBlock:
    """One block (or a batch of blocks, leading dims) quantized: keys and values."""

    keys: QuantizedTensor  # data [*, L, bs, H, Dp], scale/zero [*, L, bs // G, H, D]
    values: QuantizedTensor  # data [*, L, bs, H, Dp], scale/zero [*, L, bs, H, D // G]

    @property
    def spec(self) -> QuantSpec:
        return self.keys.spec

    @property
    def nbytes(self) -> int:
        """Bytes of all sections, without the serialisation padding (see packed_nbytes)."""
        return self.keys.nbytes + self.values.nbytes


def check_kv_input(x: torch.Tensor, what: str) -> tuple[int, int, int]:
    """-> (T, H, D) of a float tensor [..., T, H, D]; ConfigError otherwise."""
    if x.dim() < 3:
        raise ConfigError(f"{what} must be [..., T, H, D], got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ConfigError(f"{what} must be a floating-point tensor, got {x.dtype}")
    num_tokens, num_heads, head_dim = x.shape[-3:]
    return num_tokens, num_heads, head_dim


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """float32 x, scale, zero (broadcastable) -> uint8 codes in [0, qmax]."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round((x - zero) / safe).clamp_(0, spec.qmax).to(torch.uint8)


def _scale(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    # Divide by a tensor on lo's device, not a Python number: CUDA torch turns division by a
    # CPU scalar into a multiply by its reciprocal, which would break bit equality with the kernels.
    return (hi - lo) / lo.new_full((), float(spec.qmax))


def _pack(codes: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """uint8 codes [..., n] -> data [..., n * bits // 8] (int4: pairs along the last dim)."""
    if spec.bits == 8:
        return codes
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack(data: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """data [..., n * bits // 8] -> uint8 codes [..., n]."""
    if spec.bits == 8:
        return data
    return torch.stack((data & 0xF, data >> 4), dim=-1).flatten(-2)


def _dequant(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale + zero  # two roundings, like the kernels' __fmul_rn/__fadd_rn


def check_out(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    if out is None:
        return
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device:
        raise ConfigError(
            f"out must be {dtype} {shape} on {device}, got {out.dtype} {tuple(out.shape)} on {out.device}"
        )


def _finish(x: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    x = x.reshape(shape)
    if out is None:
        return x.to(dtype)
    return out.copy_(x)


def quantize_keys(k: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """k [..., T, H, D] -> per-channel codes, groups of group_size tokens."""
    num_tokens, num_heads, head_dim = check_kv_input(k, "keys")
    spec.validate_tokens(num_tokens)
    spec.validate_packing(head_dim)
    lead = k.shape[:-3]
    g = spec.group_size
    x = k.reshape(-1, g, num_heads * head_dim).float()  # [M, G, C], M = prod(lead) * T // G
    zero = x.amin(dim=1)  # [M, C]
    scale = _scale(zero, x.amax(dim=1), spec)  # [M, C]
    codes = _codes(x, scale[:, None], zero[:, None], spec)  # [M, G, C]
    data = _pack(codes, spec).reshape(*lead, num_tokens, num_heads, spec.packed_dim(head_dim))
    group_shape = (*lead, num_tokens // g, num_heads, head_dim)
    return QuantizedTensor(data, scale.reshape(group_shape), zero.reshape(group_shape), spec)


def quantize_values(v: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """v [..., T, H, D] -> per-token codes, groups of group_size channels along D."""
    num_tokens, num_heads, head_dim = check_kv_input(v, "values")
    spec.validate_head_dim(head_dim)
    lead = v.shape[:-3]
    g = spec.group_size
    x = v.reshape(-1, head_dim // g, g).float()  # [R, D // G, G], R = prod(lead) * T * H
    zero = x.amin(dim=-1)  # [R, D // G]
    scale = _scale(zero, x.amax(dim=-1), spec)  # [R, D // G]
    codes = _codes(x, scale[..., None], zero[..., None], spec).flatten(-2)  # [R, D]
    data = _pack(codes, spec).reshape(*lead, num_tokens, num_heads, spec.packed_dim(head_dim))
    group_shape = (*lead, num_tokens, num_heads, head_dim // g)
    return QuantizedTensor(data, scale.reshape(group_shape), zero.reshape(group_shape), spec)


def key_shape(q: QuantizedTensor) -> tuple[int, ...]:
    """Shape [..., T, H, D] of the keys that `q` came from."""
    *lead, num_groups, num_heads, head_dim = q.scale.shape
    return (*lead, num_groups * q.spec.group_size, num_heads, head_dim)


def value_shape(q: QuantizedTensor) -> tuple[int, ...]:
    """Shape [..., T, H, D] of the values that `q` came from."""
    *lead, num_tokens, num_heads, num_groups = q.scale.shape
    return (*lead, num_tokens, num_heads, num_groups * q.spec.group_size)


def dequantize_keys(q: QuantizedTensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """-> keys [..., T, H, D] of `dtype`, written into `out` when given."""
    shape = key_shape(q)
    check_out(out, shape, dtype, q.data.device)
    g, channels = q.spec.group_size, shape[-2] * shape[-1]
    codes = _unpack(q.data, q.spec).reshape(-1, g, channels)  # [M, G, C]
    x = _dequant(codes, q.scale.reshape(-1, 1, channels), q.zero.reshape(-1, 1, channels))  # [M, G, C]
    return _finish(x, shape, dtype, out)


def dequantize_values(q: QuantizedTensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """-> values [..., T, H, D] of `dtype`, written into `out` when given."""
    shape = value_shape(q)
    check_out(out, shape, dtype, q.data.device)
    g, head_dim = q.spec.group_size, shape[-1]
    codes = _unpack(q.data, q.spec).reshape(-1, head_dim // g, g)  # [R, D // G, G]
    x = _dequant(codes, q.scale.reshape(-1, head_dim // g, 1), q.zero.reshape(-1, head_dim // g, 1))
    return _finish(x, shape, dtype, out)


def check_block_input(block: torch.Tensor) -> None:
    if block.dim() < 5 or block.shape[-4] != 2:
        raise ConfigError(f"a KV block must be [*, num_layers, 2, block_size, H, D], got shape {tuple(block.shape)}")


def quantize_block(block: torch.Tensor, spec: QuantSpec) -> QuantizedBlock:
    """block [*, L, 2, bs, H, D] -> QuantizedBlock."""
    check_block_input(block)
    return QuantizedBlock(
        keys=quantize_keys(block[..., 0, :, :, :], spec),  # [*, L, bs, H, D]
        values=quantize_values(block[..., 1, :, :, :], spec),
    )


def block_shape(qb: QuantizedBlock) -> tuple[int, ...]:
    """Shape [*, L, 2, bs, H, D] of the block that `qb` came from."""
    *lead, num_tokens, num_heads, head_dim = value_shape(qb.values)
    return (*lead, 2, num_tokens, num_heads, head_dim)


def dequantize_block(qb: QuantizedBlock, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """-> block [*, L, 2, bs, H, D] of `dtype`, written into `out` when given (for instance
    `kv[block_id]` of the device cache)."""
    shape = block_shape(qb)
    check_out(out, shape, dtype, qb.values.data.device)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=qb.values.data.device)
    dequantize_keys(qb.keys, dtype, out=out[..., 0, :, :, :])
    dequantize_values(qb.values, dtype, out=out[..., 1, :, :, :])
    return out


def block_sections(
    spec: QuantSpec, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int
) -> list[tuple[str, torch.dtype, tuple[int, ...], int]]:
    """(name, dtype, shape, byte offset) of each section of a serialised block, in byte order.
    Every shape starts with num_layers, so layer l of a section starts at
    offset + l * (section bytes // num_layers)."""
    g = spec.group_size
    k_groups = (num_layers, block_size // g, num_kv_heads, head_dim)
    v_groups = (num_layers, block_size, num_kv_heads, head_dim // g)
    data = (num_layers, block_size, num_kv_heads, spec.packed_dim(head_dim))
    layout = [
        ("k_scale", torch.float32, k_groups),
        ("k_zero", torch.float32, k_groups),
        ("v_scale", torch.float32, v_groups),
        ("v_zero", torch.float32, v_groups),
        ("k_data", torch.uint8, data),
        ("v_data", torch.uint8, data),
    ]
    sections = []
    offset = 0
    for name, dtype, shape in layout:
        sections.append((name, dtype, shape, offset))
        offset += section_nbytes(dtype, shape)
    return sections


def section_nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtype.itemsize


def packed_nbytes(spec: QuantSpec, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int) -> int:
    """Bytes of one serialised block (to_bytes), padding included."""
    spec.validate(block_size, head_dim)
    *_, (_, dtype, shape, offset) = block_sections(spec, num_layers, block_size, num_kv_heads, head_dim)
    raw = offset + section_nbytes(dtype, shape)
    return -(-raw // _BLOCK_ALIGN) * _BLOCK_ALIGN


def to_bytes(qb: QuantizedBlock, out: torch.Tensor | None = None) -> torch.Tensor:
    """QuantizedBlock -> uint8 [*, packed_nbytes]: one contiguous buffer per block (format in
    the module docstring). Writes into `out` (for instance a tier's storage slot) when given."""
    *lead, num_layers, _, block_size, num_kv_heads, head_dim = block_shape(qb)
    nbytes = packed_nbytes(qb.spec, num_layers, block_size, num_kv_heads, head_dim)
    device = qb.values.data.device
    check_out(out, (*lead, nbytes), torch.uint8, device)
    if out is None:
        out = torch.empty((*lead, nbytes), dtype=torch.uint8, device=device)
    parts = (qb.keys.scale, qb.keys.zero, qb.values.scale, qb.values.zero, qb.keys.data, qb.values.data)
    offset = 0
    for part in parts:
        flat = part.reshape(*lead, -1).contiguous().view(torch.uint8)  # [*, section bytes]
        out[..., offset : offset + flat.shape[-1]].copy_(flat)
        offset += flat.shape[-1]
    out[..., offset:].zero_()
    return out


def from_bytes(
    buf: torch.Tensor, spec: QuantSpec, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int
) -> QuantizedBlock:
    """uint8 [*, packed_nbytes] -> QuantizedBlock whose tensors are views into `buf` (no copy
    when buf is contiguous in its last dim and 4-byte aligned). CorruptBlockError if the
    buffer cannot be a block of this shape."""
    nbytes = packed_nbytes(spec, num_layers, block_size, num_kv_heads, head_dim)
    if buf.dtype != torch.uint8 or buf.dim() < 1 or buf.shape[-1] != nbytes:
        raise CorruptBlockError(
            f"a serialised block of this shape is uint8 [*, {nbytes}], got {buf.dtype} {tuple(buf.shape)}"
        )
    aligned = buf.stride(-1) == 1 and buf.storage_offset() % 4 == 0 and all(s % 4 == 0 for s in buf.stride()[:-1])
    if not aligned:
        buf = buf.clone(memory_format=torch.contiguous_format)
    lead = buf.shape[:-1]
    views = {}
    for name, dtype, shape, offset in block_sections(spec, num_layers, block_size, num_kv_heads, head_dim):
        size = section_nbytes(dtype, shape)
        views[name] = buf[..., offset : offset + size].view(dtype).reshape(*lead, *shape)
    return QuantizedBlock(
        keys=QuantizedTensor(views["k_data"], views["k_scale"], views["k_zero"], spec),
        values=QuantizedTensor(views["v_data"], views["v_scale"], views["v_zero"], spec),
    )


def layer_of(q: QuantizedTensor, layer: int) -> QuantizedTensor:
    """Layer `layer` of quantized block keys or values [*, L, ...] -> [*, ...]."""
    return QuantizedTensor(q.data[..., layer, :, :, :], q.scale[..., layer, :, :, :], q.zero[..., layer, :, :, :], q.spec)


def check_decode_attention_input(
    q: torch.Tensor,
    blocks: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    layer: int,
    spec: QuantSpec,
    num_layers: int,
    block_size: int,
    num_kv_heads: int,
) -> None:
    if q.dim() != 3 or not q.dtype.is_floating_point:
        raise ConfigError(f"decode queries must be float [B, Hq, D], got {q.dtype} {tuple(q.shape)}")
    batch, num_q_heads, head_dim = q.shape
    if num_q_heads % num_kv_heads:
        raise ConfigError(f"num_kv_heads {num_kv_heads} must divide the {num_q_heads} query heads", key="num_kv_heads")
    if not 0 <= layer < num_layers:
        raise ConfigError(f"layer {layer} out of range for {num_layers} layers", key="layer")
    nbytes = packed_nbytes(spec, num_layers, block_size, num_kv_heads, head_dim)
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != nbytes:
        raise ConfigError(f"blocks must be uint8 [num_blocks, {nbytes}], got {blocks.dtype} {tuple(blocks.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or seq_lens.shape != (batch,):
        raise ConfigError(
            f"block_tables must be [{batch}, max_blocks] and seq_lens [{batch}], "
            f"got {tuple(block_tables.shape)} and {tuple(seq_lens.shape)}"
        )


def paged_decode_attention(
    q: torch.Tensor,
    blocks: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    layer: int,
    spec: QuantSpec,
    num_layers: int,
    block_size: int,
    num_kv_heads: int,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Attention of one new query token per sequence over quantized paged blocks.

    q [B, Hq, D]; blocks uint8 [num_blocks, packed_nbytes], each row one serialised block;
    block_tables int [B, max_blocks]; seq_lens int [B]: sequence b attends to its tokens
    0 .. seq_lens[b] - 1, token t at (block_tables[b, t // block_size], t % block_size).
    Grouped-query: query head h reads kv head h // (Hq // num_kv_heads). Keys and values are
    dequantized to float32 and attention runs in float32. -> [B, Hq, D] of q.dtype; a sequence
    of length 0 gets zeros.
    """
    check_decode_attention_input(q, blocks, block_tables, seq_lens, layer, spec, num_layers, block_size, num_kv_heads)
    batch, num_q_heads, head_dim = q.shape
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros(batch, num_q_heads, head_dim, dtype=torch.float32, device=q.device)  # [B, Hq, D]
    for b, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            continue
        block_ids = block_tables[b, : -(-seq_len // block_size)].long()  # [nb]
        qb = from_bytes(blocks[block_ids], spec, num_layers, block_size, num_kv_heads, head_dim)
        k = dequantize_keys(layer_of(qb.keys, layer), torch.float32).flatten(0, 1)[:seq_len]  # [N, Hkv, D]
        v = dequantize_values(layer_of(qb.values, layer), torch.float32).flatten(0, 1)[:seq_len]  # [N, Hkv, D]
        k = k.repeat_interleave(num_q_heads // num_kv_heads, dim=1)  # [N, Hq, D]
        v = v.repeat_interleave(num_q_heads // num_kv_heads, dim=1)  # [N, Hq, D]
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale  # [Hq, N]
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(dim=-1), v)  # [Hq, D]
    return out.to(q.dtype)
