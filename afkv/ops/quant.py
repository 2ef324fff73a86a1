"""Compact KV rows: the torch reference (CPU and GPU) of the quantized block formats.

A block [num_layers, 2, block_size, H, D] (index 0 = K, 1 = V) is stored as ONE uint8 row.
Every (token, kv head) vector x of D channels of K or of V is quantized on its own (one
scale, and for the integer formats one zero point, per vector: LMDeploy's granularity), with
scale data in a 16-bit float dtype (the model's when it is 16-bit, else bfloat16):

    fp8   e4m3 codes, symmetric:  s = max|x| / 448 rounded up;  c = e4m3(x / s);  x' = c * s
    int8  uint8 codes, asymmetric, over the Hadamard-rotated vector x_r = x @ H (H: the +-1
          Sylvester Hadamard matrix of order p, the largest power of two dividing D, block
          diagonal when p < D; H @ H = p * I): z = min(x_r) rounded down;
          s = (max(x_r) - z) / 255 rounded up; c = clamp(rint((x_r - z) / s), 0, 255);
          x' = (c * s + z) @ H / p
    int4  the same with 15 levels

"Rounded up / down" is to the scale dtype, so |x / s| <= 448 and (x - z) / s lies in
[0, qmax] up to float32 rounding. Bounds per channel: fp8 |x - x'| <= max(|x| / 16,
s / 1024) (half a unit of e4m3's 3-bit mantissa, or of its smallest subnormal); int8 and
int4 |x - x'| <= s / 2 (s of the rotated vector: a rotated error e_r maps back to
e_r @ H / p, which is no larger per channel). Zeros come back exactly. The rotation spreads
the outlier channels of keys over all channels, so one scale per vector serves 8 and 4 bits
(QuaRot/SpinQuant's finding; measured in tests/kv/test_kv_quant_perplexity.py and
tests/engine/test_device_quant.py); fp8, a floating format, keeps its relative precision
without it. The rotation is a fast Walsh-Hadamard transform (`rotate`): each vector's bits
depend on that vector alone. Arithmetic is float32; rint rounds half to even; inputs must be
finite and fit the scale dtype.

Row layout: num_layers sections of `layer_nbytes` bytes, one per layer, each

    k_codes u8 [H, bs, C] | v_codes u8 [H, bs, C] | k_scale [H, bs] | v_scale [H, bs]
    | k_zero [H, bs] | v_zero [H, bs] (int8, int4 only) | zero padding to 16 bytes

(C = D, or D // 2 for int4: byte j holds channel j in its low nibble and channel D/2 + j in
its high nibble; scale data in the scale dtype). So one layer's keys (and values) of one kv
head of one block are one contiguous run of bs * C bytes: a kernel reads them coalesced.
Bytes per (token, kv head) at D = 128, bfloat16 (512 unquantized): fp8 260 (0.51x),
int8 264 (0.52x), int4 136 (0.27x), at any block size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from afkv.errors import ConfigError, CorruptBlockError

FORMATS = ("fp8", "int8", "int4")
FP8_MAX = 448.0  # largest finite float8 e4m3fn
_ALIGN = 16  # bytes: every layer section (so every row) is padded to a multiple of this


def scale_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Scale data of a model in `dtype`: that dtype when it is 16-bit, else bfloat16."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


@dataclass(frozen=True)
class QuantSpec:
    """One quantized row format: its kind and the block geometry it stores."""

    kind: str  # fp8 | int8 | int4
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    scale_dtype: torch.dtype  # float16 | bfloat16

    def __post_init__(self) -> None:
        if self.kind not in FORMATS:
            raise ConfigError(f"quantized format must be one of {', '.join(FORMATS)}, got {self.kind!r}", key="format")
        if self.scale_dtype not in (torch.float16, torch.bfloat16):
            raise ConfigError(f"scale data must be float16 or bfloat16, got {self.scale_dtype}")
        if self.kind == "int4" and self.head_dim % 2:
            raise ConfigError(f"int4 packs two channels per byte: head_dim {self.head_dim} must be even",
                              key="head_dim")

    @property
    def qmax(self) -> int:
        return {"fp8": 0, "int8": 255, "int4": 15}[self.kind]

    @property
    def has_zero(self) -> bool:
        return self.kind != "fp8"

    @property
    def rotated(self) -> bool:
        return self.kind != "fp8"

    @property
    def code_dim(self) -> int:
        """Code bytes per (token, head) of K (or of V)."""
        return self.head_dim // 2 if self.kind == "int4" else self.head_dim

    @property
    def hadamard_order(self) -> int:
        """p: the largest power of two dividing head_dim (the rotation's blocks)."""
        return self.head_dim & -self.head_dim

    def offsets(self) -> dict[str, int]:
        """Byte offset of each section inside a layer section."""
        codes = self.num_kv_heads * self.block_size * self.code_dim
        meta = self.num_kv_heads * self.block_size * 2
        names = ["k_scale", "v_scale"] + (["k_zero", "v_zero"] if self.has_zero else [])
        out = {"k_codes": 0, "v_codes": codes}
        out |= {name: 2 * codes + i * meta for i, name in enumerate(names)}
        return out

    @property
    def layer_nbytes(self) -> int:
        num_meta = 4 if self.has_zero else 2
        raw = 2 * self.num_kv_heads * self.block_size * self.code_dim + num_meta * self.num_kv_heads * self.block_size * 2
        return -(-raw // _ALIGN) * _ALIGN

    @property
    def row_nbytes(self) -> int:
        return self.num_layers * self.layer_nbytes

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)


@functools.cache
def _hadamard_cached(head_dim: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    p = head_dim & -head_dim
    h = torch.ones(1, 1)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)  # Sylvester
    return torch.block_diag(*[h] * (head_dim // p)).to(device=device, dtype=dtype)  # [D, D]


def hadamard(head_dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The int8 / int4 rotation: +-1 [D, D], symmetric, H @ H = p * I (p = hadamard_order)."""
    return _hadamard_cached(head_dim, str(device), dtype)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] -> x @ hadamard(D), by the fast Walsh-Hadamard transform: log2(p) rounds of
    sums and differences in x's dtype, so each output depends only on its own vector (the same
    bits whatever the batch: a block quantizes to the same row alone or with others)."""
    d = x.shape[-1]
    p = d & -d
    lead = (*x.shape[:-1], d // p)
    y = x
    h = 1
    while h < p:
        y = y.reshape(*lead, p // (2 * h), 2, h)  # pairs (j, j + h) inside blocks of 2h
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(x.shape)


def _round16(x: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """float32 x -> the nearest value of `dtype` on the side `up` (toward +inf) or down, as float32."""
    r = x.to(dtype)
    if up:
        r = torch.where(r.float() < x, torch.nextafter(r, torch.full_like(r, float("inf"))), r)
    else:
        r = torch.where(r.float() > x, torch.nextafter(r, torch.full_like(r, float("-inf"))), r)
    return r


def _divisor(value: float, like: torch.Tensor) -> torch.Tensor:
    """`value` as a 0-dim float32 tensor on `like`'s device. Divide by this, not by a Python
    number: torch's CUDA kernels turn a division by a scalar into a product with its rounded
    reciprocal (x / 448 and x * (1 / 448) differ in the last bit), the CPU's divide; by a
    tensor both divide, correctly rounded, so a block quantizes to the same bytes anywhere."""
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def _quantize_vectors(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """float32 x [..., D] (rotated already for int8 / int4) -> codes uint8 [..., C], scale and zero
    [...] in the scale dtype (zero None for fp8)."""
    sd = spec.scale_dtype
    if spec.kind == "fp8":
        scale = _round16(x.abs().amax(-1) / _divisor(FP8_MAX, x), sd, up=True)  # [...]
        safe = torch.where(scale > 0, scale, torch.ones_like(scale)).float()
        codes = (x / safe[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
        return codes, scale, None
    zero = _round16(x.amin(-1), sd, up=False)  # [...]
    scale = _round16((x.amax(-1) - zero.float()) / _divisor(spec.qmax, x), sd, up=True)  # [...]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).float()
    codes = torch.round((x - zero.float()[..., None]) / safe[..., None]).clamp_(0, spec.qmax).to(torch.uint8)
    if spec.kind == "int4":
        half = spec.head_dim // 2
        codes = codes[..., :half] | (codes[..., half:] << 4)  # [..., D / 2]
    return codes, scale, zero


def _dequantize_vectors(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                        spec: QuantSpec) -> torch.Tensor:
    """codes [..., C], scale/zero [...] -> float32 [..., D] (still rotated for int8 / int4)."""
    if spec.kind == "fp8":
        return codes.view(torch.float8_e4m3fn).float() * scale.float()[..., None]
    if spec.kind == "int4":
        codes = torch.cat((codes & 0xF, codes >> 4), -1)  # [..., D]
    return codes.float() * scale.float()[..., None] + zero.float()[..., None]


def _layer_views(rows: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """rows uint8 [n, row_nbytes] -> views of every section: codes [n, L, 2, H, bs, C] (K, V),
    scale / zero [n, L, 2, H, bs]. No copy (rows must be contiguous)."""
    n, lay = rows.shape[0], rows.view(rows.shape[0], spec.num_layers, spec.layer_nbytes)
    h, bs, c = spec.num_kv_heads, spec.block_size, spec.code_dim
    off = spec.offsets()
    codes_n = 2 * h * bs * c
    views = {"codes": lay[:, :, :codes_n].view(n, spec.num_layers, 2, h, bs, c)}
    meta_n = 2 * h * bs * 2
    views["scale"] = lay[:, :, off["k_scale"] : off["k_scale"] + meta_n].view(spec.scale_dtype).view(
        n, spec.num_layers, 2, h, bs)
    if spec.has_zero:
        views["zero"] = lay[:, :, off["k_zero"] : off["k_zero"] + meta_n].view(spec.scale_dtype).view(
            n, spec.num_layers, 2, h, bs)
    return views


def check_rows(rows: torch.Tensor, spec: QuantSpec) -> None:
    if rows.dtype != torch.uint8 or rows.dim() != 2 or rows.shape[1] != spec.row_nbytes:
        raise CorruptBlockError(
            f"{spec.kind} rows of this geometry are uint8 [n, {spec.row_nbytes}], got {rows.dtype} {tuple(rows.shape)}"
        )


def quantize_rows(blocks: torch.Tensor, spec: QuantSpec, out: torch.Tensor | None = None) -> torch.Tensor:
    """blocks [n, L, 2, bs, H, D] (float) -> rows uint8 [n, row_nbytes] on the blocks' device,
    written into `out` when given."""
    if blocks.dim() != 6 or tuple(blocks.shape[1:]) != spec.block_shape or not blocks.dtype.is_floating_point:
        raise ConfigError(f"blocks must be float [n, {', '.join(map(str, spec.block_shape))}], "
                          f"got {blocks.dtype} {tuple(blocks.shape)}")
    n = blocks.shape[0]
    if out is None:
        out = torch.empty((n, spec.row_nbytes), dtype=torch.uint8, device=blocks.device)
    check_rows(out, spec)
    x = blocks.float().permute(0, 1, 2, 4, 3, 5)  # [n, L, 2, H, bs, D]
    if spec.rotated:
        x = rotate(x)
    codes, scale, zero = _quantize_vectors(x, spec)
    if not out.is_contiguous():
        raise ConfigError("out must be contiguous")
    out.view(n, spec.num_layers, spec.layer_nbytes).zero_()  # the padding
    views = _layer_views(out, spec)
    views["codes"].copy_(codes)
    views["scale"].copy_(scale)
    if zero is not None:
        views["zero"].copy_(zero)
    return out


def dequantize_layers(rows: torch.Tensor, spec: QuantSpec, dtype: torch.dtype,
                      layers: slice | int = slice(None)) -> torch.Tensor:
    """rows uint8 [n, row_nbytes] -> K/V of `layers` [n, l, 2, bs, H, D] ([n, 2, bs, H, D]
    for one layer) in `dtype` (int8, int4: rotated back)."""
    check_rows(rows, spec)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    views = _layer_views(rows, spec)
    pick = (slice(None), layers)
    x = _dequantize_vectors(views["codes"][pick], views["scale"][pick],
                            views["zero"][pick] if spec.has_zero else None, spec)  # [n, (l,) 2, H, bs, D]
    if spec.rotated:
        x = rotate(x) / spec.hadamard_order
    return x.transpose(-3, -2).to(dtype)  # [n, (l,) 2, bs, H, D]


def dequantize_rows(rows: torch.Tensor, spec: QuantSpec, dtype: torch.dtype,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """rows uint8 [n, row_nbytes] -> blocks [n, L, 2, bs, H, D] of `dtype` (into `out` when given)."""
    x = dequantize_layers(rows, spec, dtype)
    if out is None:
        return x
    if tuple(out.shape) != tuple(x.shape) or out.dtype != dtype:
        raise ConfigError(f"out must be {dtype} {tuple(x.shape)}, got {out.dtype} {tuple(out.shape)}")
    return out.copy_(x)


# ---- MLA latents (DeepSeek-V2/V3) -------------------------------------------------------------
#
# A latent block [num_layers, block_size, r + dr] holds, per token and layer, the compressed KV
# (r values) and the rotated shared key (dr values). A quantized latent row keeps FlashMLA's
# split: the compressed part as codes with one scale (and, for int8, one zero point) per token
# and group of LATENT_GROUP values, the rotary part unquantized in the scale dtype (its products
# with the query's rotary part are what positions hang on). Per layer:
#
#     codes u8 [bs, r] | scale [bs, G] | zero [bs, G] (int8) | rope [bs, dr] | padding to 16 bytes
#
# (G = ceil(r / LATENT_GROUP); scale data and rope in the 16-bit scale dtype). Bytes per token
# and layer at r = 512, dr = 64, bfloat16 (1152 unquantized): fp8 648 (0.56x; FlashMLA's float32
# scales: 656), int8 656 (0.57x). No rotation: the kernels dequantize a tile in registers (value
# = code x scale + zero) and multiply in the model dtype. int4 is refused: on the real-weight
# proxy of tests/model/test_deepseek_serving.py (SmolLM2-135M's RMS-normed attention inputs
# quantized this way) it cost +37% perplexity (fp8 +0.09%, int8 -0.2%); with a Hadamard
# rotation per 64 values +1.7%, which would need the rotation inside the kernel.

LATENT_FORMATS = ("fp8", "int8")
LATENT_GROUP = 128


@dataclass(frozen=True)
class LatentQuantSpec:
    """One quantized latent row format: its kind and the latent block geometry it stores."""

    kind: str  # fp8 | int8
    num_layers: int
    block_size: int
    kv_lora_rank: int  # r: the quantized part
    rope_dim: int  # dr: kept in the scale dtype
    scale_dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.kind == "int4":
            raise ConfigError("int4 does not hold accuracy for MLA latents (+37% perplexity on the real-weight "
                              "proxy, fp8 +0.09%, int8 -0.2%): use fp8 or int8", key="format")
        if self.kind not in LATENT_FORMATS:
            raise ConfigError(f"quantized latent format must be one of {', '.join(LATENT_FORMATS)}, got {self.kind!r}",
                              key="format")
        if self.scale_dtype not in (torch.float16, torch.bfloat16):
            raise ConfigError(f"scale data must be float16 or bfloat16, got {self.scale_dtype}")

    @property
    def qmax(self) -> int:
        return {"fp8": 0, "int8": 255}[self.kind]

    @property
    def has_zero(self) -> bool:
        return self.kind == "int8"

    @property
    def group_size(self) -> int:
        return min(LATENT_GROUP, self.kv_lora_rank)

    @property
    def num_groups(self) -> int:
        return -(-self.kv_lora_rank // self.group_size)

    def offsets(self) -> dict[str, int]:
        """Byte offset of each section inside a layer section (all even: 16-bit aligned)."""
        bs = self.block_size
        codes = -(-bs * self.kv_lora_rank // 2) * 2
        meta = bs * self.num_groups * 2
        out = {"codes": 0, "scale": codes}
        out["zero"] = codes + meta
        out["rope"] = codes + meta * (2 if self.has_zero else 1)
        return out

    @property
    def layer_nbytes(self) -> int:
        raw = self.offsets()["rope"] + self.block_size * self.rope_dim * 2
        return -(-raw // _ALIGN) * _ALIGN

    @property
    def row_nbytes(self) -> int:
        return self.num_layers * self.layer_nbytes

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (self.num_layers, self.block_size, self.kv_lora_rank + self.rope_dim)


def _latent_views(rows: torch.Tensor, spec: LatentQuantSpec) -> dict[str, torch.Tensor]:
    """rows uint8 [n, row_nbytes] -> views: codes [n, L, bs, r], scale / zero [n, L, bs, G],
    rope [n, L, bs, dr]. No copy (rows must be contiguous)."""
    n, bs, g = rows.shape[0], spec.block_size, spec.num_groups
    lay = rows.view(n, spec.num_layers, spec.layer_nbytes)
    off = spec.offsets()

    def section(name: str, count: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        nbytes = count * dtype.itemsize
        return lay[:, :, off[name] : off[name] + nbytes].view(dtype).view(n, spec.num_layers, *shape)

    views = {"codes": section("codes", bs * spec.kv_lora_rank, torch.uint8, (bs, spec.kv_lora_rank)),
             "scale": section("scale", bs * g, spec.scale_dtype, (bs, g)),
             "rope": section("rope", bs * spec.rope_dim, spec.scale_dtype, (bs, spec.rope_dim))}
    if spec.has_zero:
        views["zero"] = section("zero", bs * g, spec.scale_dtype, (bs, g))
    return views


def _grouped(x: torch.Tensor, spec: LatentQuantSpec) -> torch.Tensor:
    """x [..., r] -> [..., G, group]; a partial last group is padded with its last value (which
    changes neither its largest magnitude nor its range)."""
    pad = spec.num_groups * spec.group_size - x.shape[-1]
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], -1)
    return x.unflatten(-1, (spec.num_groups, spec.group_size))


def check_latent_rows(rows: torch.Tensor, spec: LatentQuantSpec) -> None:
    if rows.dtype != torch.uint8 or rows.dim() != 2 or rows.shape[1] != spec.row_nbytes:
        raise CorruptBlockError(f"{spec.kind} latent rows of this geometry are uint8 [n, {spec.row_nbytes}], "
                                f"got {rows.dtype} {tuple(rows.shape)}")


def quantize_latent_rows(blocks: torch.Tensor, spec: LatentQuantSpec, out: torch.Tensor | None = None) -> torch.Tensor:
    """blocks [n, L, bs, r + dr] (float) -> rows uint8 [n, row_nbytes] on the blocks' device,
    written into `out` when given. Bounds per value as for the KV formats: fp8 |x - x'| <=
    max(|x| / 16, s / 1024), int8 |x - x'| <= s / 2 (s the value's group scale); the rotary
    part is rounded to the scale dtype."""
    if blocks.dim() != 4 or tuple(blocks.shape[1:]) != spec.block_shape or not blocks.dtype.is_floating_point:
        raise ConfigError(f"latent blocks must be float [n, {', '.join(map(str, spec.block_shape))}], "
                          f"got {blocks.dtype} {tuple(blocks.shape)}")
    n, r, sd = blocks.shape[0], spec.kv_lora_rank, spec.scale_dtype
    if out is None:
        out = torch.empty((n, spec.row_nbytes), dtype=torch.uint8, device=blocks.device)
    check_latent_rows(out, spec)
    if not out.is_contiguous():
        raise ConfigError("out must be contiguous")
    x = _grouped(blocks[..., :r].float(), spec)  # [n, L, bs, G, g]
    if spec.kind == "fp8":
        scale = _round16(x.abs().amax(-1) / FP8_MAX, sd, up=True)  # [n, L, bs, G]
        safe = torch.where(scale > 0, scale, torch.ones_like(scale)).float()
        codes = (x / safe[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
        zero = None
    else:
        zero = _round16(x.amin(-1), sd, up=False)
        scale = _round16((x.amax(-1) - zero.float()) / spec.qmax, sd, up=True)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale)).float()
        codes = torch.round((x - zero.float()[..., None]) / safe[..., None]).clamp_(0, spec.qmax).to(torch.uint8)
    codes = codes.flatten(-2)[..., :r]  # [n, L, bs, r]
    out.view(n, spec.num_layers, spec.layer_nbytes).zero_()  # the padding
    views = _latent_views(out, spec)
    views["codes"].copy_(codes)
    views["scale"].copy_(scale)
    if zero is not None:
        views["zero"].copy_(zero)
    views["rope"].copy_(blocks[..., r:].to(sd))
    return out


def dequantize_latent_layers(rows: torch.Tensor, spec: LatentQuantSpec, dtype: torch.dtype,
                             layers: slice | int = slice(None)) -> torch.Tensor:
    """rows uint8 [n, row_nbytes] -> latents of `layers` [n, l, bs, r + dr] ([n, bs, r + dr] for
    one layer) in `dtype`."""
    check_latent_rows(rows, spec)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    views = _latent_views(rows, spec)
    pick = (slice(None), layers)
    codes, scale = views["codes"][pick], views["scale"][pick].float()  # [n, (l,) bs, r], [n, (l,) bs, G]
    values = codes.view(torch.float8_e4m3fn).float() if spec.kind == "fp8" else codes.float()
    g = _grouped(values, spec) * scale[..., None]  # [..., G, group]
    if spec.has_zero:
        g = g + views["zero"][pick].float()[..., None]
    c = g.flatten(-2)[..., : spec.kv_lora_rank]
    return torch.cat([c, views["rope"][pick].float()], -1).to(dtype)


def dequantize_latent_rows(rows: torch.Tensor, spec: LatentQuantSpec, dtype: torch.dtype,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """rows uint8 [n, row_nbytes] -> blocks [n, L, bs, r + dr] of `dtype` (into `out` when given)."""
    x = dequantize_latent_layers(rows, spec, dtype)
    if out is None:
        return x
    if tuple(out.shape) != tuple(x.shape) or out.dtype != dtype:
        raise ConfigError(f"out must be {dtype} {tuple(x.shape)}, got {out.dtype} {tuple(out.shape)}")
    return out.copy_(x)
