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
[BLOCK_N, dr] rotary keys) and computes every head's scores and P @ c for all BLOCK_H heads
with that one load. The latent is cut into C chunks of `rank_chunk` values and both products
run as batched tl.dot over the chunks ([C, H, chunk] x [C, chunk, N] -> scores summed over C;
[C, H, N] x [C, N, chunk] -> the output in chunks): independent chains of short products
(a 512-deep dot per head block is one long dependent chain of tensor-core steps), one chunk
per warp. The head blocks of a (row, split) are consecutive programs, so with more heads than
BLOCK_H (V3's 128) a tile is read from HBM by the first of them and from L2 by the rest.
Split-K cuts each row's context into chunks of whole tiles (the split count is a runtime
argument: one compile per launch shape), and afkv.ops.triton_attention's reduce kernel merges
the partial (log-sum-exp, output) pairs; the grid depends on shapes only (CUDA-graph
capturable), and only attended tokens are read. When a tile lies in one cache block
(BLOCK_SIZE a multiple of BLOCK_N) its block id is read once.

Two kernels, chosen by MLATile.flat (afkv bench kernels mla --tune 1 times both):

  chunked (_mla_decode_kernel) as above: 3-D batched products, which Triton lowers to
      mma.sync on sm_90 (no wgmma), quantized rows multiplied as codes (below);
  flat (_mla_flat_kernel), FlashMLA's structure: two 2-D products per tile over the whole
      latent (scores q [H, r] @ c^T, output P @ c [N, r]) that both read one copy of the tile
      in shared memory; raw latents go there straight from HBM by cp.async, pipelined
      (nothing between the load and the products); with 64 heads and 8 or 16 warps the
      products are wgmma rows of 64 with the [64, 512] float32 accumulator split over 2 or 4
      warp groups (V3: two programs per row instead of four or eight). Quantized rows are
      dequantized to the model dtype first (as afkv.ops.quant does); their tiles in staging
      blocks are taken in a second pass (see the kernel).

Quantized rows (chunked kernel) are never dequantized element by element: a chunk lies in one scale group, so
its scale and zero point factor out of the products. Scores: scale x (q . codes) + zero x
sum(q) per chunk; output: (P x scale / the tile's largest scale) @ codes, times that largest,
plus sum(P x zero). The codes multiply in float16, which holds them exactly and takes them
cheaply (fp8: one cvt per two codes; int8: the bits 0x6400 | code are 1024 + code, minus
1024), with the queries scaled into float16's range by a power of two per program; the
rotary part (stored in 16 bits) multiplies in the model dtype. Staging blocks (full
precision) multiply with scale 1 and zero 0. 16-bit caches multiply in their dtype with
float32 accumulation; float32 and the interpreter in IEEE float32.

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

    from afkv.ops.triton_attention import _dot, _online_max
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
    """Launch shape: query heads per program, tokens per tile, warps, stages, the chunk of
    the latent each batch of the chunked products takes (a quantized row's chunk lies in one
    scale group: at most the group), programs per SM that split-K aims at, (raw latents only)
    scores as one product over the whole latent instead of summed chunks, and `flat`: the
    other kernel, _mla_flat_kernel (2-D products over the whole latent from one load of the
    tile, quantized rows dequantized first; rank_chunk and whole_scores do not apply)."""

    block_h: int = 16
    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 2
    rank_chunk: int = 128
    programs_per_sm: int = 2
    whole_scores: bool = False  # raw latents: the scores as one product over the whole latent (chunks: P @ c)
    flat: bool = False  # _mla_flat_kernel instead of the chunked _mla_decode_kernel

    def __post_init__(self) -> None:
        for name in ("block_h", "block_n", "rank_chunk"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ConfigError(f"MLATile.{name} must be a power of two >= 16, got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1 or self.programs_per_sm < 1:
            raise ConfigError(f"bad MLATile {self}")
        if self.flat and self.whole_scores:
            raise ConfigError("MLATile.flat takes its scores over the whole latent already: "
                              "whole_scores does not apply")


# The launch per (many query heads, quantized latents): the tuner's winners at 16 rows x 4096
# on an H100 80GB HBM3 (afkv/bench/RESULTS.md, 2026-12-07 session 4 call 1; `afkv bench kernels
# mla --tune 1`), against the earlier defaults in the same run: V3 bf16 16 heads x 64 tokens,
# scores as one product, 1.60x faster; V3 fp8 / int8 and every V2-Lite format 16 heads x 32
# tokens, 4 warps, the latent in chunks of 128: 1.43x / 1.67x, 1.20x (bf16), 1.75x / 1.70x.
# V3 (more than 16 heads): the flat kernel, 64 heads x 64 tokens, 8 warps, the tuner's winner for
# bf16, fp8 and int8 at 16 x 4096 in session 4's last call (H100): 114.5 / 129.9 / 136.8 us, 4.08x
# / 5.42x / 4.94x faster than the chunked defaults above in the same run.
# `afkv bench kernels mla --tune 1` times CANDIDATE_TILES beside them.
# Registers / spilled
# bytes on sm_90 (tests/ops/sm90_compile.py --usage, bf16, V3's 128 heads): the chunked kernel
# (mma.sync: 3-D products) 122-219 / 0 over raw latents, 203-255 / 0-624 over fp8 / int8; the
# flat one (wgmma at 64 heads, the tile cp.async'd) 128-255 / 0 over raw latents, fp8 / int8
# 255 / 280-1912 but (cuobjdump -sass) none or two reloads a tile in the main loop: the spill
# code is in the staging pass.
DEFAULT_TILES = {
    (False, False): MLATile(16, 32, 4, 2, 128, 2),
    (False, True): MLATile(16, 32, 4, 2, 128, 2),
    (True, False): MLATile(64, 64, 8, 2, 64, 2, flat=True),
    (True, True): MLATile(64, 64, 8, 2, 64, 2, flat=True),
}
CANDIDATE_TILES = tuple(MLATile(*fields) for fields in (
    # flat (_mla_flat_kernel), first (the tuning stops at its deadline): V3 in 64-head programs (wgmma
    # rows of 64, the output split over 2 or 4 warp groups), V2-Lite in one program of 16
    (64, 32, 8, 2, 64, 2, False, True), (64, 64, 8, 2, 64, 2, False, True), (64, 32, 16, 2, 64, 2, False, True),
    (64, 16, 8, 4, 64, 2, False, True), (16, 32, 4, 2, 64, 2, False, True), (16, 64, 4, 2, 64, 2, False, True),
    (16, 32, 4, 2, 128, 2), (16, 32, 8, 2, 64, 2, True), (16, 64, 8, 2, 64, 2, True),
    (32, 32, 8, 2, 64, 2, True),  # whole_scores: raw latents only
))


def default_tile(num_heads: int, quantized: bool) -> MLATile:
    """The launch for `num_heads` query heads over raw or quantized latents."""
    return DEFAULT_TILES[(num_heads > 16, quantized)]


if triton is not None:
    @triton.jit
    def _latent_tile(
        cache_ptr, rows_ptr, rows16_ptr, blk, tok_in, tmask, offs_c, cmask, offs_g, gmask, offs_p, pmask,
        stride_cb, stride_ct, layer_off, num_blocks, row_nbytes, layer_nbytes_off, DT: tl.constexpr,
        CDT: tl.constexpr, RANK: tl.constexpr, ROPE: tl.constexpr, KIND: tl.constexpr, CHUNK: tl.constexpr,
        GROUP: tl.constexpr, NUM_GROUPS: tl.constexpr,
        OFF_SCALE: tl.constexpr, OFF_ZERO: tl.constexpr, OFF_ROPE: tl.constexpr, ONE_BLOCK: tl.constexpr,
    ):  # fmt: skip
        """The latents of a tile, as chunks: c [N, C, CP] of CDT (raw values, or the codes of
        quantized rows: exact in 16 bits; a chunk lies in one scale group), each chunk's scale
        and zero point [N, C] (float32: value = c * scale + zero; 1 and 0 for raw values and
        staging blocks) and the rotary keys k_pe [N, P] of DT.
        `blk` is the tile's block id (a scalar) when ONE_BLOCK, else each token's [N]. Tokens
        outside tmask are zeros and not read."""
        cm = tmask[:, None, None] & cmask[None, :, :]  # [N, C, CP]
        pm = tmask[:, None] & pmask[None, :]  # [N, P]
        gm = tmask[:, None] & gmask[None, :]  # [N, C]
        if KIND == -1:
            base = blk * stride_cb + layer_off + tok_in * stride_ct  # [N]
            c = tl.load(cache_ptr + base[:, None, None] + offs_c[None, :, :], mask=cm, other=0.0).to(CDT)
            pe = tl.load(cache_ptr + base[:, None] + RANK + offs_p[None, :], mask=pm, other=0.0).to(DT)
            scale = tl.where(gm, 1.0, 0.0)  # [N, C]
            zero = tl.zeros_like(scale)
        else:
            is_row = blk < num_blocks
            rbase = tl.where(is_row, blk, 0) * row_nbytes + layer_nbytes_off  # byte offset of the layer section
            if ONE_BLOCK:  # scalars
                rbase2, rbase3, rmask2, rmask3 = rbase, rbase, is_row, is_row
            else:  # per token
                rbase2, rbase3, rmask2, rmask3 = rbase[:, None], rbase[:, None, None], is_row[:, None], is_row[:, None, None]
            codes = rows_ptr + rbase3 + tok_in[:, None, None] * RANK + offs_c[None, :, :]  # [N, C, CP]
            b = tl.load(codes, mask=cm & rmask3, other=0)
            if KIND == 0:
                c = b.to(tl.float8e4nv, bitcast=True).to(CDT)  # one cvt per two codes to float16
            elif CDT == tl.float16:  # 1024 + code in float16's bits, minus 1024: exact, no int -> float cvt
                c = (b.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
            else:
                c = b.to(CDT)
            meta = rbase2 // 2 + tok_in[:, None] * NUM_GROUPS + (offs_g * CHUNK // GROUP)[None, :]  # [N, C] 16-bit
            scale = tl.load(rows16_ptr + meta + OFF_SCALE // 2, mask=gm & rmask2, other=0.0).to(tl.float32)
            if KIND == 1:
                zero = tl.load(rows16_ptr + meta + OFF_ZERO // 2, mask=gm & rmask2, other=0.0).to(tl.float32)
            else:
                zero = tl.zeros_like(scale)
            rope = (rbase2 + OFF_ROPE) // 2 + tok_in[:, None] * ROPE + offs_p[None, :]  # [N, P]
            pe = tl.load(rows16_ptr + rope, mask=pm & rmask2, other=0.0).to(DT)
            sbase = tl.maximum(blk - num_blocks, 0) * stride_cb + layer_off  # staging block(s)
            if ONE_BLOCK:
                if not is_row:  # the tile is in a staging block (a sequence's newest tokens): rare
                    sb = sbase + tok_in * stride_ct  # [N]
                    c = tl.load(cache_ptr + sb[:, None, None] + offs_c[None, :, :], mask=cm, other=0.0).to(CDT)
                    pe = tl.load(cache_ptr + sb[:, None] + RANK + offs_p[None, :], mask=pm, other=0.0).to(DT)
                    scale = tl.where(gm, 1.0, 0.0)
                    zero = tl.zeros_like(scale)
            else:
                fmask = tmask & (blk >= num_blocks)  # [N]
                sb = sbase + tok_in * stride_ct  # [N]
                cf = tl.load(cache_ptr + sb[:, None, None] + offs_c[None, :, :], mask=cm & fmask[:, None, None],
                             other=0.0).to(CDT)  # fmt: skip
                pf = tl.load(cache_ptr + sb[:, None] + RANK + offs_p[None, :], mask=pm & fmask[:, None],
                             other=0.0).to(DT)  # fmt: skip
                c = tl.where(fmask[:, None, None], cf, c)
                pe = tl.where(fmask[:, None], pf, pe)
                scale = tl.where(fmask[:, None], 1.0, scale)
                zero = tl.where(fmask[:, None], 0.0, zero)
        return c, scale, zero, pe

    @triton.jit
    def _mla_decode_kernel(
        q_ptr, cache_ptr, rows_ptr, rows16_ptr, block_tables_ptr, context_lens_ptr, out_ptr, mid_o_ptr, mid_lse_ptr,
        stride_qb, stride_qh, stride_ob, stride_oh, stride_cb, stride_ct, layer_off, stride_bt,
        num_heads, max_tokens, qk_scale, num_blocks, row_nbytes, layer_nbytes_off, num_splits,
        RANK: tl.constexpr, ROPE: tl.constexpr, CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr,
        GROUP: tl.constexpr, NUM_GROUPS: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_CP: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
        KIND: tl.constexpr, OFF_SCALE: tl.constexpr, OFF_ZERO: tl.constexpr, OFF_ROPE: tl.constexpr,
        IEEE: tl.constexpr, WHOLE_SCORES: tl.constexpr,
    ):  # fmt: skip
        hb = tl.program_id(0)
        split = tl.program_id(1)
        b = tl.program_id(2)
        heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)  # [H]
        hmask = heads < num_heads
        offs_g = tl.arange(0, BLOCK_C)  # [C] chunk of the latent (inside one quantization group)
        gmask = offs_g < NUM_CHUNKS
        offs_j = tl.arange(0, BLOCK_CP)  # [CP] value within its chunk
        offs_c = offs_g[:, None] * CHUNK + offs_j[None, :]  # [C, CP] latent column
        cmask = gmask[:, None] & (offs_j < CHUNK)[None, :] & (offs_c < RANK)
        offs_p = tl.arange(0, BLOCK_P)
        pmask = offs_p < ROPE
        DT: tl.constexpr = tl.float32 if IEEE else cache_ptr.dtype.element_ty
        # quantized codes multiply in float16 (fp8 and int8 codes convert to it cheaply and exactly)
        CDT: tl.constexpr = tl.float16 if KIND >= 0 and not IEEE else DT
        q_rows = q_ptr + b * stride_qb + heads * stride_qh  # [H]
        q_lat = tl.load(q_rows[None, :, None] + offs_c[:, None, :], mask=hmask[None, :, None] & cmask[:, None, :],
                        other=0.0).to(tl.float32)  # [C, H, CP]  # fmt: skip
        q_pe = tl.load(q_rows[:, None] + RANK + offs_p[None, :], mask=hmask[:, None] & pmask[None, :],
                       other=0.0).to(DT)  # [H, P]  # fmt: skip
        q_mul = 1.0
        if CDT != DT:  # float16 products: a power of two brings the queries' largest to 2^13 (no overflow)
            q_max = tl.max(tl.max(tl.max(tl.abs(q_lat), 2), 1), 0)
            q_mul = tl.where(q_max > 0.0, tl.exp2(13.0 - tl.floor(tl.log2(tl.where(q_max > 0.0, q_max, 1.0)))), 1.0)
        q_lat = (q_lat * q_mul).to(CDT)
        q_sum = tl.sum(q_lat.to(tl.float32), 2)  # [C, H]: what a chunk's zero point adds to a score, per unit
        WHOLE: tl.constexpr = WHOLE_SCORES and KIND == -1  # raw latents: scores as one product over the latent
        if WHOLE:
            q_whole = tl.reshape(tl.permute(q_lat, (1, 0, 2)), [BLOCK_H, BLOCK_C * BLOCK_CP])  # [H, C x CP]
        end = tl.minimum(tl.load(context_lens_ptr + b), max_tokens)
        chunk_len = tl.cdiv(tl.cdiv(end, num_splits), BLOCK_N) * BLOCK_N  # whole tiles; the last split shorter
        lo = split * chunk_len
        hi = tl.minimum(lo + chunk_len, end)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_C, BLOCK_H, BLOCK_CP], tl.float32)
        acc_zero = tl.zeros([BLOCK_C, BLOCK_H], tl.float32)  # sum of p * zero point, per chunk (int8)
        offs_n = tl.arange(0, BLOCK_N)
        ONE_BLOCK: tl.constexpr = BLOCK_SIZE % BLOCK_N == 0  # a tile lies in one cache block
        for t0 in range(lo, hi, BLOCK_N):
            tok = t0 + offs_n  # [N]
            tmask = tok < hi
            if ONE_BLOCK:
                blk = tl.load(block_tables_ptr + b * stride_bt + t0 // BLOCK_SIZE).to(tl.int64)
            else:
                blk = tl.load(block_tables_ptr + b * stride_bt + tok // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
            c, scale, zero, pe = _latent_tile(
                cache_ptr, rows_ptr, rows16_ptr, blk, tok % BLOCK_SIZE, tmask, offs_c, cmask, offs_g, gmask, offs_p,
                pmask, stride_cb, stride_ct, layer_off, num_blocks, row_nbytes, layer_nbytes_off, DT, CDT,
                RANK, ROPE, KIND, CHUNK, GROUP, NUM_GROUPS, OFF_SCALE, OFF_ZERO, OFF_ROPE, ONE_BLOCK,
            )  # fmt: skip
            s = _dot(q_pe, tl.trans(pe), IEEE)  # [H, N]
            scale_t = tl.trans(scale)[:, None, :]  # [C, 1, N]
            if WHOLE:
                s += _dot(q_whole, tl.trans(tl.reshape(c, [BLOCK_N, BLOCK_C * BLOCK_CP])), IEEE)
            elif KIND == -1:
                s += tl.sum(_dot(q_lat, tl.permute(c, (1, 2, 0)), IEEE), 0)  # [C, H, N] summed over the chunks
            elif KIND == 1:
                s_c = _dot(q_lat, tl.permute(c, (1, 2, 0)), IEEE)
                s += tl.sum(s_c * scale_t + q_sum[:, :, None] * tl.trans(zero)[:, None, :], 0) / q_mul
            else:
                s += tl.sum(_dot(q_lat, tl.permute(c, (1, 2, 0)), IEEE) * scale_t, 0) / q_mul
            s = tl.where(hmask[:, None] & tmask[None, :], s * qk_scale, float("-inf"))
            m_new, p, alpha = _online_max(s, m_i)  # [H], [H, N], [H]
            l_i = l_i * alpha + tl.sum(p, 1)
            if KIND == -1:
                p_c = tl.broadcast_to(p.to(CDT)[None, :, :], [BLOCK_C, BLOCK_H, BLOCK_N])
                p_mul = tl.full([BLOCK_C, 1, 1], 1.0, tl.float32)
            else:  # the scales folded into the probabilities, over the tile's largest (float16's range)
                p_mul = tl.max(scale_t, 2)[:, :, None]  # [C, 1, 1]
                p_mul = tl.where(p_mul > 0.0, p_mul, 1.0)
                p_c = (p[None, :, :] * (scale_t / p_mul)).to(CDT)  # [C, H, N]
            pv = _dot(p_c, tl.permute(c, (1, 0, 2)), IEEE)  # [C, H, CP]
            acc = acc * alpha[None, :, None] + pv * p_mul
            if KIND == 1:
                acc_zero = acc_zero * alpha[None, :] + tl.sum(p[None, :, :] * tl.trans(zero)[:, None, :], 2)
            m_i = m_new
        has = l_i > 0.0
        o = (acc + acc_zero[:, :, None]) / tl.where(has, l_i, 1.0)[None, :, None]  # [C, H, CP]
        _store_out(
            out_ptr, mid_o_ptr, mid_lse_ptr, m_i, has, l_i, o, b, heads, hmask, heads[None, :, None],
            offs_c[:, None, :], hmask[None, :, None] & cmask[:, None, :], stride_ob, stride_oh, num_heads, split,
            num_splits, SPLIT, RANK,
        )  # fmt: skip

    @triton.jit
    def _flat_raw_tile(cache_ptr, base, tmask, col, wmask, offs_p, pmask, RANK: tl.constexpr, DT: tl.constexpr,
                       ALL_COLS: tl.constexpr):  # fmt: skip
        """Raw latents (the cache, or staging blocks) of the tokens at element offsets base [N]:
        c [N, W] (column w holds latent column col[w], where wmask) and the rotary keys k_pe
        [N, P], of DT. Nothing between the load and the products: it is pipelined into shared
        memory. Tokens outside tmask are zeros and not read."""
        cm = tmask[:, None] if ALL_COLS else tmask[:, None] & wmask[None, :]  # ALL_COLS: constant along a row
        c = tl.load(cache_ptr + base[:, None] + col[None, :], mask=cm, other=0.0).to(DT)
        pe = tl.load(cache_ptr + base[:, None] + RANK + offs_p[None, :], mask=tmask[:, None] & pmask[None, :],
                     other=0.0).to(DT)  # fmt: skip
        return c, pe

    @triton.jit
    def _flat_rows_tile(
        cache_ptr, rows_ptr, rows16_ptr, blk, tok_in, tmask, offs_g, gmask, offs_j, jmask, offs_p, pmask,
        stride_cb, stride_ct, layer_off, num_blocks, row_nbytes, layer_nbytes_off, DT: tl.constexpr,
        RANK: tl.constexpr, ROPE: tl.constexpr, KIND: tl.constexpr, GROUP: tl.constexpr, NUM_GROUPS: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_GP: tl.constexpr,
        OFF_SCALE: tl.constexpr, OFF_ZERO: tl.constexpr, OFF_ROPE: tl.constexpr, ONE_BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Quantized rows of a tile dequantized as afkv.ops.quant does (code x scale + zero, in
        DT: one rounding of the exact product) -> c [N, W] (scale group g's value j in column
        g x BLOCK_GP + j) and k_pe [N, P], of DT. `blk` as in _latent_tile. When ONE_BLOCK a
        tile in a staging block is zeros (the kernel takes those tiles in a second pass);
        otherwise each token in a staging block is read from it."""
        cols = offs_g[:, None] * GROUP + offs_j[None, :]  # [G, GP] latent column
        cm = tmask[:, None, None] & (gmask[:, None] & jmask[None, :] & (cols < RANK))[None, :, :]  # [N, G, GP]
        gm = tmask[:, None] & gmask[None, :]  # [N, G]
        pm = tmask[:, None] & pmask[None, :]  # [N, P]
        is_row = blk < num_blocks
        rbase = tl.where(is_row, blk, 0) * row_nbytes + layer_nbytes_off  # byte offset of the layer section
        if ONE_BLOCK:  # scalars
            rbase2, rbase3, rmask2, rmask3 = rbase, rbase, is_row, is_row
        else:  # per token
            rbase2, rbase3 = rbase[:, None], rbase[:, None, None]
            rmask2, rmask3 = is_row[:, None], is_row[:, None, None]
        b = tl.load(rows_ptr + rbase3 + tok_in[:, None, None] * RANK + cols[None, :, :], mask=cm & rmask3, other=0)
        if KIND == 0:
            v = b.to(tl.float8e4nv, bitcast=True).to(DT)
        else:
            v = b.to(DT)
        meta = rbase2 // 2 + tok_in[:, None] * NUM_GROUPS + offs_g[None, :]  # [N, G] 16-bit
        scale = tl.load(rows16_ptr + meta + OFF_SCALE // 2, mask=gm & rmask2, other=0.0).to(DT)
        v = v * scale[:, :, None]  # [N, G, GP]
        if KIND == 1:
            zero = tl.load(rows16_ptr + meta + OFF_ZERO // 2, mask=gm & rmask2, other=0.0).to(DT)
            v = v + tl.where(cm, zero[:, :, None], 0.0)
        rope = (rbase2 + OFF_ROPE) // 2 + tok_in[:, None] * ROPE + offs_p[None, :]  # [N, P]
        pe = tl.load(rows16_ptr + rope, mask=pm & rmask2, other=0.0).to(DT)
        if not ONE_BLOCK:
            fmask = tmask & (blk >= num_blocks)  # [N]
            sb = tl.maximum(blk - num_blocks, 0) * stride_cb + layer_off + tok_in * stride_ct  # [N]
            vf = tl.load(cache_ptr + sb[:, None, None] + cols[None, :, :], mask=cm & fmask[:, None, None],
                         other=0.0).to(DT)  # fmt: skip
            pf = tl.load(cache_ptr + sb[:, None] + RANK + offs_p[None, :], mask=pm & fmask[:, None], other=0.0).to(DT)
            v = tl.where(fmask[:, None, None], vf, v)
            pe = tl.where(fmask[:, None], pf, pe)
        return tl.reshape(v, [BLOCK_N, BLOCK_G * BLOCK_GP]), pe

    @triton.jit
    def _flat_step(q_lat, q_pe, c, pe, valid, hmask, m_i, l_i, acc, qk_scale, DT: tl.constexpr, IEEE: tl.constexpr):
        """Online softmax over one tile: q_lat [H, W], q_pe [H, P], c [N, W], k_pe [N, P], valid
        [N] -> running max m_i [H] (log2 units), sum l_i [H], unnormalised output acc [H, W]."""
        s = _dot(q_lat, tl.trans(c), IEEE) + _dot(q_pe, tl.trans(pe), IEEE)  # [H, N]
        s = tl.where(hmask[:, None] & valid[None, :], s * qk_scale, float("-inf"))
        m_new, p, alpha = _online_max(s, m_i)  # [H], [H, N], [H]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(DT), c, IEEE)  # [H, W]
        return m_new, l_i, acc

    @triton.jit
    def _mla_flat_kernel(
        q_ptr, cache_ptr, rows_ptr, rows16_ptr, block_tables_ptr, context_lens_ptr, out_ptr, mid_o_ptr, mid_lse_ptr,
        stride_qb, stride_qh, stride_ob, stride_oh, stride_cb, stride_ct, layer_off, stride_bt,
        num_heads, max_tokens, qk_scale, num_blocks, row_nbytes, layer_nbytes_off, num_splits,
        RANK: tl.constexpr, ROPE: tl.constexpr, GROUP: tl.constexpr, NUM_GROUPS: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_GP: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
        KIND: tl.constexpr, OFF_SCALE: tl.constexpr, OFF_ZERO: tl.constexpr, OFF_ROPE: tl.constexpr,
        IEEE: tl.constexpr,
    ):  # fmt: skip
        """MLATile.flat: the decode as two 2-D products per tile over the whole latent, as
        FlashMLA does: scores q [H, W] @ c^T and the output P [H, N] @ c [N, W], both from one
        load of the tile c [N, W] (raw latents: straight from HBM into shared memory, pipelined;
        quantized rows: dequantized to the model dtype first), the accumulator [H, W] float32
        (with 64 heads and 8 warps the tensor cores' 64-row products split W between warp
        groups). Columns: each scale group padded to BLOCK_GP (raw latents: one group). When a
        tile lies in one cache block, quantized rows' tiles in staging blocks are taken in a
        second pass over the table (a branch in the main loop keeps a second tile live: the
        accumulator spills on sm_90); the softmax does not depend on the order of tiles. Grid
        and split-K as _mla_decode_kernel."""
        hb = tl.program_id(0)
        split = tl.program_id(1)
        b = tl.program_id(2)
        heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)  # [H]
        hmask = heads < num_heads
        W: tl.constexpr = BLOCK_G * BLOCK_GP
        offs_w = tl.arange(0, W)  # [W] column of the tile's matrix
        if KIND == -1:  # one group: the identity
            col = offs_w
        else:
            col = (offs_w // BLOCK_GP) * GROUP + offs_w % BLOCK_GP  # [W] the latent column it holds
        wmask = (offs_w % BLOCK_GP < GROUP) & (col < RANK)
        ALL_COLS: tl.constexpr = W == RANK  # no padded column
        offs_g = tl.arange(0, BLOCK_G)
        gmask = offs_g < NUM_GROUPS
        offs_j = tl.arange(0, BLOCK_GP)
        jmask = offs_j < GROUP
        offs_p = tl.arange(0, BLOCK_P)
        pmask = offs_p < ROPE
        DT: tl.constexpr = tl.float32 if IEEE else cache_ptr.dtype.element_ty
        q_rows = q_ptr + b * stride_qb + heads * stride_qh  # [H]
        q_lat = tl.load(q_rows[:, None] + col[None, :], mask=hmask[:, None] & wmask[None, :],
                        other=0.0).to(DT)  # [H, W]  # fmt: skip
        q_pe = tl.load(q_rows[:, None] + RANK + offs_p[None, :], mask=hmask[:, None] & pmask[None, :],
                       other=0.0).to(DT)  # [H, P]  # fmt: skip
        end = tl.minimum(tl.load(context_lens_ptr + b), max_tokens)
        chunk_len = tl.cdiv(tl.cdiv(end, num_splits), BLOCK_N) * BLOCK_N  # whole tiles; the last split shorter
        lo = split * chunk_len
        hi = tl.minimum(lo + chunk_len, end)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, W], tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        ONE_BLOCK: tl.constexpr = BLOCK_SIZE % BLOCK_N == 0  # a tile lies in one cache block
        staged = 0  # ONE_BLOCK, quantized rows: tiles in staging blocks, left for the second pass
        for t0 in range(lo, hi, BLOCK_N):
            tok = t0 + offs_n  # [N]
            tmask = tok < hi
            if ONE_BLOCK:
                blk = tl.load(block_tables_ptr + b * stride_bt + t0 // BLOCK_SIZE).to(tl.int64)
                staged += (blk >= num_blocks).to(tl.int32)
            else:
                blk = tl.load(block_tables_ptr + b * stride_bt + tok // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
            if KIND == -1:
                base = blk * stride_cb + layer_off + (tok % BLOCK_SIZE) * stride_ct  # [N]
                c, pe = _flat_raw_tile(cache_ptr, base, tmask, col, wmask, offs_p, pmask, RANK, DT, ALL_COLS)
                valid = tmask
            else:
                c, pe = _flat_rows_tile(
                    cache_ptr, rows_ptr, rows16_ptr, blk, tok % BLOCK_SIZE, tmask, offs_g, gmask, offs_j, jmask,
                    offs_p, pmask, stride_cb, stride_ct, layer_off, num_blocks, row_nbytes, layer_nbytes_off, DT,
                    RANK, ROPE, KIND, GROUP, NUM_GROUPS, BLOCK_N, BLOCK_G, BLOCK_GP, OFF_SCALE, OFF_ZERO, OFF_ROPE,
                    ONE_BLOCK,
                )  # fmt: skip
                valid = tmask & (blk < num_blocks) if ONE_BLOCK else tmask  # ONE_BLOCK: staging tiles come next
            m_i, l_i, acc = _flat_step(q_lat, q_pe, c, pe, valid, hmask, m_i, l_i, acc, qk_scale, DT, IEEE)
        if KIND >= 0 and ONE_BLOCK and staged > 0:  # the tiles in staging blocks (a sequence's newest tokens: few)
            for t0 in range(lo, hi, BLOCK_N):
                blk = tl.load(block_tables_ptr + b * stride_bt + t0 // BLOCK_SIZE).to(tl.int64)
                if blk >= num_blocks:
                    tok = t0 + offs_n  # [N]
                    tmask = tok < hi
                    base = (blk - num_blocks) * stride_cb + layer_off + (tok % BLOCK_SIZE) * stride_ct  # [N]
                    c, pe = _flat_raw_tile(cache_ptr, base, tmask, col, wmask, offs_p, pmask, RANK, DT, ALL_COLS)
                    m_i, l_i, acc = _flat_step(q_lat, q_pe, c, pe, tmask, hmask, m_i, l_i, acc, qk_scale, DT, IEEE)
        has = l_i > 0.0
        o = acc / tl.where(has, l_i, 1.0)[:, None]  # [H, W]
        _store_out(out_ptr, mid_o_ptr, mid_lse_ptr, m_i, has, l_i, o, b, heads, hmask, heads[:, None], col[None, :],
                   hmask[:, None] & wmask[None, :], stride_ob, stride_oh, num_heads, split, num_splits, SPLIT, RANK)

    @triton.jit
    def _store_out(
        out_ptr, mid_o_ptr, mid_lse_ptr, m_i, has, l_i, o, b, heads, hmask, head_of, col_of, mask,
        stride_ob, stride_oh, num_heads, part, num_parts, SPLIT: tl.constexpr, RANK: tl.constexpr,
    ):  # fmt: skip
        """afkv.ops.triton_attention's _store_partial for a normalised output o of any layout
        (the chunked [C, H, CP] or the flat [H, W]): head_of, col_of and mask broadcast to o's
        shape (each value's head, latent column, and whether it is one); m_i, l_i, has [H]."""
        if not SPLIT:
            tl.store(out_ptr + b * stride_ob + head_of * stride_oh + col_of, o.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(mid_o_ptr + ((b * num_heads + head_of) * num_parts + part) * RANK + col_of, o, mask=mask)
            lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
            tl.store(mid_lse_ptr + (b * num_heads + heads) * num_parts + part, lse, mask=hmask)


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
        geometry = dict(KIND=-1, GROUP=kv_lora_rank, NUM_GROUPS=1, OFF_SCALE=0, OFF_ZERO=0, OFF_ROPE=0)
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
    tile = tile or default_tile(num_heads, geometry["KIND"] >= 0)
    block_size = lat.shape[2]
    max_tokens = max_blocks * block_size
    head_blocks = -(-num_heads // tile.block_h)
    if num_splits is None:
        num_splits = num_decode_splits(batch, head_blocks, device_index(q), tile.programs_per_sm)
    mid_o, mid_lse = _partials(batch, num_heads, num_splits, kv_lora_rank, q.device)
    args = (
        q, lat, rows, rows16, block_tables, context_lens, out, mid_o, mid_lse,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), lat.stride(0), lat.stride(2), layer * lat.stride(1),
        block_tables.stride(0), num_heads, max_tokens, scale * _LOG2E, num_blocks, row_nbytes, layer_bytes, num_splits,
    )  # fmt: skip
    launch = dict(RANK=kv_lora_rank, ROPE=width - kv_lora_rank, BLOCK_P=max(16, next_pow2(width - kv_lora_rank)),
                  BLOCK_H=tile.block_h, BLOCK_SIZE=block_size, BLOCK_N=tile.block_n, SPLIT=num_splits > 1,
                  IEEE=_ieee(lat.dtype, q.device), num_warps=tile.num_warps, num_stages=tile.num_stages)
    grid = (head_blocks, num_splits, batch)
    if tile.flat:  # columns: each scale group padded to a power of two (raw latents: one group)
        _mla_flat_kernel[grid](*args, BLOCK_G=next_pow2(geometry["NUM_GROUPS"]),
                               BLOCK_GP=max(16, next_pow2(geometry["GROUP"])), **geometry, **launch)
    else:
        chunk = min(tile.rank_chunk, geometry["GROUP"])  # the tile's; a quantized row's inside one scale group
        if geometry["KIND"] >= 0 and geometry["GROUP"] % chunk:
            chunk = geometry["GROUP"]
        geometry.update(CHUNK=chunk, NUM_CHUNKS=-(-kv_lora_rank // chunk))
        _mla_decode_kernel[grid](*args, BLOCK_C=next_pow2(geometry["NUM_CHUNKS"]), BLOCK_CP=max(16, next_pow2(chunk)),
                                 WHOLE_SCORES=tile.whole_scores, **geometry, **launch)
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
    *,
    tile: MLATile | None = None,
) -> torch.Tensor:
    """As afkv.ops.mla.mla_attention: absorbed queries q [n, H, r + dr] of positions context_len
    - n .. context_len - 1 of one sequence with table block_ids int [nb] -> [n, H, r]: n decode
    rows over the same table, row i attending to context_len - n + 1 + i tokens. `tile` as
    paged_mla_decode's."""
    n = q.shape[0]
    if block_ids.dim() != 1 or not n <= context_len:
        raise ConfigError(f"{n} new queries, context_len {context_len} and {tuple(block_ids.shape)} blocks do not fit")
    tables = block_ids[None].expand(n, -1)  # [n, nb], one read of the table per row
    lens = torch.arange(context_len - n + 1, context_len + 1, device=q.device)  # [n]
    return paged_mla_decode(q, cache, layer, tables, lens, scale, kv_lora_rank, tile=tile)
