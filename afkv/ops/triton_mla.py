"""Triton paged MLA decode (DeepSeek-V2/V3) over the latent cache, behind the API of the torch
references in afkv.ops.mla:

    paged_mla_decode    absorbed queries, one per row, over each row's latents  (ref: mla.mla_decode_attention)
    paged_mla_prefill   one sequence's chunk of absorbed queries, causal        (ref: mla.mla_attention)

The cache is the latent cache [num_blocks, L, bs, r + dr] of the model dtype, or a quantized
device tier (afkv.ops.attention.QuantizedKVCache with a LatentQuantSpec: fp8 / int8 rows plus
staging blocks; a block id < num_blocks names a row, num_blocks + s staging block s,
in any order).

Flash-decoding with multi-query attention of r + dr wide keys and r wide values: grid
(head blocks, splits, rows). A program takes BLOCK_H query heads of one row and one chunk of
its context; per tile of BLOCK_N tokens it loads the latents once ([BLOCK_N, r] and the
[BLOCK_N, dr] rotary keys) and computes every head's scores (q_abs . latent: two tl.dot)
and P @ c for all BLOCK_H heads with that one load. The head blocks of a (row, split) are
consecutive programs, so with more heads than BLOCK_H (V3's 128) a tile is read from HBM by
the first of them and from L2 by the rest; V2-Lite's 16 heads are one head block. Split-K
cuts each row's context into chunks of whole tiles (enough programs to fill the device), and
afkv.ops.triton_attention's reduce kernel merges the partial (log-sum-exp, output) pairs; the
grid depends on shapes only (CUDA-graph capturable), and only attended tokens are read.

Quantized rows are dequantized in registers per tile (code x group scale + zero point; the
rotary part is stored in 16-bit), rounded to the staging dtype as the reference's scratch
buffer is, then multiplied like raw latents: decode is bound by reading the latents, and the
rows are 0.56x (fp8) or 0.57x (int8) of bfloat16's bytes. 16-bit caches multiply
in their dtype with float32 accumulation; float32 and the interpreter in IEEE float32.

A prefill chunk of n queries runs as n decode rows sharing the sequence's table, row i
attending to the first context_len - n + 1 + i tokens (causality by context length), so
chunks below the expansion threshold (afkv.ops.mla.expand_threshold) get the same kernel.

Callers check `available()`; CPU tensors run under Triton's interpreter (the CPU tests).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from afkv.errors import ConfigError
from afkv.ops import attention, quant
from afkv.ops.launch import device_index, next_pow2
from afkv.ops.triton_attention import _LOG2E, _merge, _partials, num_decode_splits

try:
    import triton
    import triton.language as tl

    from afkv.ops.triton_attention import _chunk_bounds, _store_partial
except ImportError:  # the CPU CI: callers use the torch references
    triton = None

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_KINDS = {"raw": -1, "fp8": 0, "int8": 1}


@functools.cache
def available() -> bool:
    """True when triton imports and torch sees a CUDA device."""
    return triton is not None and torch.cuda.is_available()


@dataclass(frozen=True)
class MLATile:
    """Launch shape: query heads per program, tokens per tile, warps, stages."""

    block_h: int = 16
    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 2


DEFAULT_TILE = MLATile()  # SGLang's grouped MLA decode shape; `afkv bench kernels mla --tune 1` times others


if triton is not None:
    @triton.jit
    def _latent_tile(
        cache_ptr, rows_ptr, rows16_ptr, blk, tok_in, tmask, offs_r, rmask, offs_p, pmask,
        stride_cb, stride_ct, layer_off, num_blocks, row_nbytes, layer_nbytes_off,
        RANK: tl.constexpr, ROPE: tl.constexpr, KIND: tl.constexpr, GROUP: tl.constexpr, NUM_GROUPS: tl.constexpr,
        OFF_SCALE: tl.constexpr, OFF_ZERO: tl.constexpr, OFF_ROPE: tl.constexpr,
    ):  # fmt: skip
        """Latents of a tile: c [N, R] and k_pe [N, P] in the cache's (staging) dtype; tokens
        outside tmask are zeros and not read."""
        if KIND == -1:
            base = blk * stride_cb + layer_off + tok_in * stride_ct  # [N]
            c = tl.load(cache_ptr + base[:, None] + offs_r[None, :], mask=tmask[:, None] & rmask[None, :], other=0.0)
            pe = tl.load(cache_ptr + base[:, None] + RANK + offs_p[None, :], mask=tmask[:, None] & pmask[None, :],
                         other=0.0)  # fmt: skip
        else:
            is_row = blk < num_blocks  # [N]
            fmask = tmask & (blk >= num_blocks)
            qmask = tmask & is_row
            sbase = tl.maximum(blk - num_blocks, 0) * stride_cb + layer_off + tok_in * stride_ct  # [N]
            c = tl.load(cache_ptr + sbase[:, None] + offs_r[None, :], mask=fmask[:, None] & rmask[None, :], other=0.0)
            pe = tl.load(cache_ptr + sbase[:, None] + RANK + offs_p[None, :], mask=fmask[:, None] & pmask[None, :],
                         other=0.0)  # fmt: skip
            rbase = tl.where(is_row, blk, 0) * row_nbytes + layer_nbytes_off  # [N] byte offset of the layer section
            cm = qmask[:, None] & rmask[None, :]
            b = tl.load(rows_ptr + rbase[:, None] + tok_in[:, None] * RANK + offs_r[None, :], mask=cm, other=0)
            if KIND == 0:
                code = b.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            else:
                code = b.to(tl.float32)
            meta = (rbase // 2)[:, None] + tok_in[:, None] * NUM_GROUPS + (offs_r // GROUP)[None, :]  # [N, R]
            value = code * tl.load(rows16_ptr + meta + OFF_SCALE // 2, mask=cm, other=0.0).to(tl.float32)
            if KIND != 0:
                value += tl.load(rows16_ptr + meta + OFF_ZERO // 2, mask=cm, other=0.0).to(tl.float32)
            rope = (rbase + OFF_ROPE) // 2 + tok_in * ROPE  # [N] 16-bit offset of each token's rotary key
            pe_q = tl.load(rows16_ptr + rope[:, None] + offs_p[None, :], mask=qmask[:, None] & pmask[None, :], other=0.0)
            c = tl.where(is_row[:, None], value.to(c.dtype), c)
            pe = tl.where(is_row[:, None], pe_q.to(pe.dtype), pe)
        return c, pe

    @triton.jit
    def _mla_decode_kernel(
        q_ptr, cache_ptr, rows_ptr, rows16_ptr, block_tables_ptr, context_lens_ptr, out_ptr, mid_o_ptr, mid_lse_ptr,
        stride_qb, stride_qh, stride_ob, stride_oh, stride_cb, stride_ct, layer_off, stride_bt,
        num_heads, max_tokens, qk_scale, num_blocks, row_nbytes, layer_nbytes_off,
        RANK: tl.constexpr, ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
        KIND: tl.constexpr, GROUP: tl.constexpr, NUM_GROUPS: tl.constexpr,
        OFF_SCALE: tl.constexpr, OFF_ZERO: tl.constexpr, OFF_ROPE: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        hb = tl.program_id(0)
        split = tl.program_id(1)
        b = tl.program_id(2)
        heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)  # [H]
        hmask = heads < num_heads
        offs_r = tl.arange(0, BLOCK_R)
        rmask = offs_r < RANK
        offs_p = tl.arange(0, BLOCK_P)
        pmask = offs_p < ROPE
        q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh
        q_lat = tl.load(q_rows + offs_r[None, :], mask=hmask[:, None] & rmask[None, :], other=0.0)  # [H, R]
        q_pe = tl.load(q_rows + RANK + offs_p[None, :], mask=hmask[:, None] & pmask[None, :], other=0.0)  # [H, P]
        dt = cache_ptr.dtype.element_ty
        if IEEE:
            dt = tl.float32
        q_lat = q_lat.to(dt)
        q_pe = q_pe.to(dt)
        end = tl.minimum(tl.load(context_lens_ptr + b), max_tokens)
        lo, hi = _chunk_bounds(end * 0, end, split, NUM_SPLITS, BLOCK_N)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        for t0 in range(lo, hi, BLOCK_N):
            tok = t0 + offs_n  # [N]
            tmask = tok < hi
            blk = tl.load(block_tables_ptr + b * stride_bt + tok // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
            c, pe = _latent_tile(
                cache_ptr, rows_ptr, rows16_ptr, blk, tok % BLOCK_SIZE, tmask, offs_r, rmask, offs_p, pmask,
                stride_cb, stride_ct, layer_off, num_blocks, row_nbytes, layer_nbytes_off,
                RANK, ROPE, KIND, GROUP, NUM_GROUPS, OFF_SCALE, OFF_ZERO, OFF_ROPE,
            )  # fmt: skip
            c = c.to(dt)
            pe = pe.to(dt)
            if IEEE:
                s = tl.dot(q_lat, tl.trans(c), input_precision="ieee") + tl.dot(q_pe, tl.trans(pe), input_precision="ieee")
            else:
                s = tl.dot(q_lat, tl.trans(c)) + tl.dot(q_pe, tl.trans(pe))  # [H, N]
            s = tl.where(hmask[:, None] & tmask[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # [H]
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_ref[:, None])  # [H, N]
            alpha = tl.exp2(m_i - m_ref)
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                pv = tl.dot(p.to(dt), c, input_precision="ieee")
            else:
                pv = tl.dot(p.to(dt), c)  # [H, R]
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        _store_partial(
            out_ptr, mid_o_ptr, mid_lse_ptr, m_i, l_i, acc, b, heads, hmask, offs_r, rmask,
            stride_ob, stride_oh, num_heads, split, NUM_SPLITS, RANK,
        )  # fmt: skip


def _ieee(dtype: torch.dtype, device: torch.device) -> bool:
    """IEEE float32 products for float32 caches, and under the interpreter (no 16-bit tl.dot)."""
    return device.type != "cuda" or dtype == torch.float32


def _cache_args(q: torch.Tensor, cache: torch.Tensor | attention.QuantizedKVCache, layer: int, kv_lora_rank: int):
    """Checks -> (float tensor of latents or staging, rows, rows as 16-bit, num_blocks, row
    bytes, this layer's byte offset in a row, block_size, constexpr geometry)."""
    if q.dim() != 3 or q.dtype not in _FLOAT_DTYPES:
        raise ConfigError(f"queries must be float [B, H, r + dr], got {q.dtype} {tuple(q.shape)}")
    if isinstance(cache, attention.QuantizedKVCache):
        spec = cache.spec
        if not isinstance(spec, quant.LatentQuantSpec):
            raise ConfigError("a quantized device tier of keys and values is not a latent cache")
        quant.check_latent_rows(cache.blocks, spec)
        lat, rows = cache.staging, cache.blocks
        if not rows.is_contiguous() or rows.device != q.device:
            raise ConfigError("quantized latent rows must be contiguous and on the queries' device")
        off = spec.offsets()
        geometry = dict(KIND=_KINDS[spec.kind], GROUP=spec.group_size, NUM_GROUPS=spec.num_groups,
                        OFF_SCALE=off["scale"], OFF_ZERO=off["zero"], OFF_ROPE=off["rope"])
        rows_args = (rows, rows.view(spec.scale_dtype), cache.num_blocks, spec.row_nbytes, layer * spec.layer_nbytes)
    else:
        lat = cache
        geometry = dict(KIND=-1, GROUP=1, NUM_GROUPS=1, OFF_SCALE=0, OFF_ZERO=0, OFF_ROPE=0)
        rows_args = (cache, cache, 0, 0, 0)  # the quantized-row arguments: KIND -1 compiles their reads out
    if lat.dim() != 4 or lat.dtype not in _FLOAT_DTYPES or lat.stride(-1) != 1:
        raise ConfigError(f"the latent cache must be float [num_blocks, L, bs, r + dr] with unit stride on its "
                          f"last dim, got {lat.dtype} {tuple(lat.shape)}")
    if not 0 <= layer < lat.shape[1]:
        raise ConfigError(f"layer {layer} out of range for {lat.shape[1]} layers", key="layer")
    if q.shape[-1] != lat.shape[-1] or not 0 < kv_lora_rank < lat.shape[-1]:
        raise ConfigError(f"queries {tuple(q.shape)} do not fit latents of {lat.shape[-1]} values "
                          f"(kv_lora_rank {kv_lora_rank})")
    if q.device != lat.device:
        raise ConfigError(f"q on {q.device} but the cache on {lat.device}")
    return lat, rows_args, geometry


def paged_mla_decode(
    q: torch.Tensor,
    cache: torch.Tensor | attention.QuantizedKVCache,
    layer: int,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    kv_lora_rank: int,
    *,
    num_splits: int | None = None,
    tile: MLATile | None = None,
) -> torch.Tensor:
    """As afkv.ops.mla.mla_decode_attention: absorbed queries q [B, H, r + dr], block_tables int
    [B, nb] (padding never read), context_lens int [B] on q's device -> [B, H, r] of q.dtype
    (zeros where context_len is 0; context_len clamped to nb * bs). `num_splits` and `tile`
    override the defaults (tests, the kernel sweep)."""
    lat, (rows, rows16, num_blocks, row_nbytes, layer_bytes), geometry = _cache_args(q, cache, layer, kv_lora_rank)
    batch, num_heads, width = q.shape
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or tuple(context_lens.shape) != (batch,):
        raise ConfigError(f"block_tables must be [{batch}, nb] and context_lens [{batch}], "
                          f"got {tuple(block_tables.shape)} and {tuple(context_lens.shape)}")
    out = torch.empty(batch, num_heads, kv_lora_rank, dtype=q.dtype, device=q.device)  # [B, H, r]
    max_blocks = block_tables.shape[1]
    if batch == 0 or max_blocks == 0:
        return out.zero_()
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    tile = tile or DEFAULT_TILE
    block_size = lat.shape[2]
    max_tokens = max_blocks * block_size
    head_blocks = -(-num_heads // tile.block_h)
    if num_splits is None:
        num_splits = num_decode_splits(batch, head_blocks, device_index(q))
    mid_o, mid_lse = _partials(batch, num_heads, num_splits, kv_lora_rank, q.device)
    _mla_decode_kernel[(head_blocks, num_splits, batch)](
        q, lat, rows, rows16, block_tables, context_lens, out, mid_o, mid_lse,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), lat.stride(0), lat.stride(2), layer * lat.stride(1),
        block_tables.stride(0), num_heads, max_tokens, scale * _LOG2E, num_blocks, row_nbytes, layer_bytes,
        RANK=kv_lora_rank, ROPE=width - kv_lora_rank, BLOCK_R=max(16, next_pow2(kv_lora_rank)),
        BLOCK_P=max(16, next_pow2(width - kv_lora_rank)), BLOCK_H=tile.block_h, BLOCK_SIZE=block_size,
        BLOCK_N=tile.block_n, NUM_SPLITS=num_splits, IEEE=_ieee(lat.dtype, q.device), **geometry,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip
    if num_splits > 1:
        _merge(mid_o, mid_lse, out, num_splits)
    return out


def paged_mla_prefill(
    q: torch.Tensor,
    cache: torch.Tensor | attention.QuantizedKVCache,
    layer: int,
    block_ids: torch.Tensor,
    context_len: int,
    scale: float,
    kv_lora_rank: int,
) -> torch.Tensor:
    """As afkv.ops.mla.mla_attention: absorbed queries q [n, H, r + dr] of positions context_len
    - n .. context_len - 1 of one sequence with table block_ids int [nb] -> [n, H, r]: n decode
    rows over the same table, row i attending to context_len - n + 1 + i tokens."""
    n = q.shape[0]
    if block_ids.dim() != 1 or not n <= context_len:
        raise ConfigError(f"{n} new queries, context_len {context_len} and {tuple(block_ids.shape)} blocks do not fit")
    tables = block_ids[None].expand(n, -1)  # [n, nb], one read of the table per row
    lens = torch.arange(context_len - n + 1, context_len + 1, device=q.device)  # [n]
    return paged_mla_decode(q, cache, layer, tables, lens, scale, kv_lora_rank)
