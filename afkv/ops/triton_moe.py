"""Fused Triton kernels for the routed experts of a MoE layer, behind the semantics of the torch
paths they replace (afkv.model.sides.FFNSide._grouped; afkv.ops.fp8.moe_mlp_reference for
FP8 expert weights).

    moe_mlp         y[t] = sum over t's held selections of w * down_e(silu(gate_e x_t) * up_e x_t)
    default_config  block sizes for a shape (depends only on shapes)

Callers check `available()` (and `fp8_available()` for FP8 weights) and fall back to the torch
paths where it is False. moe_mlp runs its kernels on whatever device the tensors are on: CPU
tensors run under Triton's interpreter (TRITON_INTERPRET=1 in the environment before this
module is imported), which is how the CPU tests check it. Importing this module never needs
triton. Benchmarks: afkv.bench.kernels (`afkv bench kernels moe`).

Four launches (five with fp8_mode "once", six where its gate_up BLOCK_N is not a multiple of
128), every grid sized by shapes only (no host synchronisation: the whole call can be
captured in a CUDA graph; compile it once outside the capture):

  align    one kernel: the (token, selection) pairs sorted by held expert into row blocks of
           BLOCK_M rows, each block one expert's rows (an expert's last block padded with the
           sentinel pair P = T*k). Expert e takes ceil(count_e / BLOCK_M) blocks, so the blocks
           number at most ceil(P / BLOCK_M) + min(E_h, P): the GEMM grids are sized by that
           bound; blocks past the real ones name expert E_h and their programs exit at once.
           Each program histograms every pair's expert (redundantly: no global barrier, no
           atomics), then places its own chunk of pairs (a sort by expert within the chunk)
           and writes its share of the block -> expert table and padding slots.
  gate_up  per program one BLOCK_M x BLOCK_N tile of one expert's rows, looping over K:
           x rows [BM, H] @ the gate tile and the matching up tile (columns n and n + I of
           gate_up^T) -> silu(gate) * up, written as [rows, I] activations in the dtype of x
           (the [rows, 2I] intermediate is never written)
  down     activations [BM, I] @ down^T tile, times the routing weight, written per selection
           [P, H] (split-K: one slice of [S, P, H] per K split), in float32 when split or when
           x is float32, else in the dtype of x
  combine  y[t] = the sum of t's held selections (and splits) in a fixed order, in float32,
           rounded once to the dtype of x. No atomics: results equal run to run. Unheld and
           padding selections are never read. (BlockConfig.atomic_combine, a candidate: the
           down GEMM adds its weighted outputs into a float32 [T, H] with atomic adds instead,
           no [S, P, H] outputs and no combine pass; a cast to x's dtype follows.)

Tiles: the GEMM programs are ordered in groups of GROUP_M row blocks (the row blocks of a
group share an expert's weight tiles while they sit in L2). Few rows per expert (decode): the
step is bound by reading the weights, so N is split finely (and the down GEMM's K when that
leaves too few programs) until every SM streams its share; many rows: 128-row tiles with wide
N, as a dense GEMM (default_config).

FP8 weights (e4m3, one float32 scale per 128 x 128 block, afkv.ops.fp8): BLOCK_K is 128; the
activations are quantized per row and 128-column group (amax / 448) and the fp8 x fp8 products
of one K block are promoted to float32 times the two scales (DeepSeek-V3's recipe). Where the
quantization happens is BlockConfig.fp8_mode (FP8_MODES): "tile" (each program quantizes its A
tile in registers at every K step), "once" (one launch quantizes x; gate_up's epilogue writes
its output as fp8 with scales, so the K loops only load fp8 tiles and their [BM] scales), or
"dequant" (no activation quantization: the fp8 weight tile is scaled to x's dtype in registers
for 16-bit MMAs). Compiled for CUDA this needs fp8 tensor cores (compute capability >= 8.9).

Rounding (16-bit x): products in float32, the activations rounded once to the dtype of x (as
the torch path rounds them), each selection's weighted output rounded to the dtype of x (as
the torch path does), the sum over selections in float32, rounded once to the dtype of x.
float32 x: IEEE float32 dots and float32 throughout.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from afkv.errors import ConfigError
from afkv.ops.launch import next_pow2, sm_count
from afkv.ops.fp8 import AMAX_EPS, BLOCK as FP8_BLOCK, FP8, FP8_MAX, scale_shape

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU CI: callers use the torch grouped path
    triton = None

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PROGRAMS_PER_SM = 4  # weight-bound tiles: split N (then K) until a GEMM has this many programs per SM
_MAX_SPLIT_K = 8
_ALIGN_CHUNK = 1024  # pairs placed per align program
_ALIGN_BLOCKS = 16  # blocks per step of an align program's share of the block table
# FP8 weights: how the GEMMs meet them (BlockConfig.fp8_mode; the kernels' FP8_MODE constant is the index)
#   tile     the A tile quantized in registers at every K step (per row and 128-column group)
#   once     the activations quantized once per call, to fp8 with per-row, per-128-column-group
#            scales: x by one launch, the down GEMM's input by gate_up's epilogue (by that launch
#            again where gate_up's BLOCK_N is not a multiple of 128); the K loops run fp8 MMAs
#            and one scale multiply per 128-long K block
#   dequant  the weight tile dequantized to x's dtype in registers, 16-bit MMAs, activations
#            not quantized (half the weight bytes at 16-bit MMA speed)
FP8_MODES = ("tile", "once", "dequant")
_QUANT_ROWS = 32  # rows per program of the activation quantization


@functools.cache
def available() -> bool:
    """True when triton imports and torch sees a CUDA device."""
    return triton is not None and torch.cuda.is_available()


@functools.cache
def fp8_available(device: torch.device) -> bool:
    """available() and `device` has fp8 tensor cores (compute capability >= 8.9)."""
    return available() and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)




@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes of the two GEMMs (every field a compile-time constant of the kernels)."""

    block_m: int  # rows of one expert per program (tl.dot needs >= 16)
    gate_up_block_n: int  # activation columns per gate_up program (reads 2 x this many weight rows)
    down_block_n: int  # output columns per down program
    block_k: int  # 128 for FP8 weights (one scale block per K step)
    split_k: int  # down GEMM: K slices, each summed by the combine
    group_m: int = 8  # row blocks per program group (L2 reuse of weight tiles)
    num_warps: int = 4
    num_stages: int = 4
    fp8_mode: str = "tile"  # FP8 weights only: one of FP8_MODES
    # the down GEMM adds each selection's weighted output into a float32 [T, H] with atomics (no
    # [S, P, H] per-selection outputs, no combine pass; sums in float32 in no fixed order: results
    # may differ run to run in the last bits)
    atomic_combine: bool = False

    def __post_init__(self):
        for name in ("block_m", "gate_up_block_n", "down_block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ConfigError(f"BlockConfig.{name} must be a power of two >= 16, got {v}")
        for name in ("split_k", "group_m", "num_warps", "num_stages"):
            if getattr(self, name) < 1:
                raise ConfigError(f"BlockConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.fp8_mode not in FP8_MODES:
            raise ConfigError(f"BlockConfig.fp8_mode must be one of {', '.join(FP8_MODES)}, got {self.fp8_mode!r}")


def _rows_per_expert(num_pairs: int, num_held: int) -> int:
    """Rows per touched expert where the selections spread evenly (> 64: the compute regime)."""
    return _cdiv(num_pairs, max(1, min(num_held, num_pairs)))


def default_config(
    num_pairs: int, num_held: int, hidden: int, inter: int, sm_count: int, fp8: bool = False,
    fp8_mode: str = "tile",
) -> BlockConfig:
    """Block sizes for num_pairs = T*k selections over num_held experts of [2I, H] / [H, I]
    (shapes only: the same config for every routing, as a CUDA graph needs). Assumes the
    selections spread evenly over min(num_held, num_pairs) experts: rows = pairs per touched
    expert picks the regime (measured on H100 / H200: afkv/bench/RESULTS.md). FP8 weights: the
    tiles of fp8_mode "tile" for every mode, except: "once" and "dequant" with 64-row tiles
    where "tile" has 128 (gate_up's two 128 x 128 float32 accumulators with the two products of
    a K block promoted into them, or the dequantized weight tiles, exceed 255 registers per
    thread at 8 warps: sm_90 cubin, 8-536 bytes spilled), and with 8 warps where gate_up's tile
    is 64 x 128 or larger (4 warps spill 136-384 bytes there). Not measured on a GPU yet."""
    rows = _rows_per_expert(num_pairs, num_held)
    active = max(1, min(num_held, num_pairs))
    if not fp8:
        fp8_mode = "tile"
    if rows > 64:  # compute-bound: dense-GEMM tiles
        return BlockConfig(block_m=128 if fp8_mode == "tile" else 64, gate_up_block_n=128, down_block_n=128,
                           block_k=128 if fp8 else 64, split_k=1, group_m=8, num_warps=8,
                           num_stages=3 if fp8 else 4, fp8_mode=fp8_mode)
    block_m = min(64, max(16, next_pow2(rows)))
    row_blocks = active * _cdiv(rows, block_m)
    target = _PROGRAMS_PER_SM * sm_count
    widest = 128 if fp8 else 64  # fp8 tiles read half the bytes per column: twice the columns

    def block_n(n: int) -> int:
        bn = widest
        while bn > 16 and _cdiv(n, bn) * row_blocks < target:
            bn //= 2
        return bn

    block_k = 128 if fp8 else min(128, max(16, next_pow2(min(hidden, inter))))
    down_n = block_n(hidden)
    gate_up_n = block_n(inter)
    split_k = 1
    while (
        split_k < _MAX_SPLIT_K
        and _cdiv(hidden, down_n) * row_blocks * split_k < target
        and inter >= 2 * split_k * block_k * 4  # keep >= 4 K steps per split
    ):
        split_k *= 2
    return BlockConfig(
        block_m=block_m,
        gate_up_block_n=gate_up_n,
        down_block_n=down_n,
        block_k=block_k,
        split_k=split_k,
        group_m=8,
        num_warps=8 if fp8_mode != "tile" and block_m * gate_up_n >= 64 * 128 else 4,
        num_stages=4 if block_m <= 32 else 3,
        fp8_mode=fp8_mode,
    )


def candidate_configs(
    num_pairs: int, num_held: int, hidden: int, inter: int, sm_count: int, fp8: bool = False,
    fp8_mode: str = "tile",
) -> list[BlockConfig]:
    """Tile configs a tuner times around default_config at one point (`afkv bench kernels moe
    --tune`), the default first; some may not fit a GPU's shared memory (triton raises
    OutOfResources at the launch). The compute regime (over 64 rows per expert) adds 128- and
    64-row variants of the default and, for 16-bit weights, 256-wide down tiles with 4 stages,
    64-row tiles with 4 warps and a wider GEMM grouping, and BLOCK_K 128 (half the K steps: at
    Qwen3's K = 768 the down GEMM has 6, where pipeline fill weighs); fp8 mode "once" adds gate_up tiles of 128 columns where the default's are narrower
    (its epilogue then quantizes the down GEMM's input: one launch less); and the default tiles
    with atomic_combine (no per-selection outputs written and read back, no combine launch)."""
    d = default_config(num_pairs, num_held, hidden, inter, sm_count, fp8, fp8_mode)
    bk, mode = d.block_k, d.fp8_mode
    if _rows_per_expert(num_pairs, num_held) > 64:  # the compute regime
        st = 2 if mode == "dequant" else 3
        alts = [BlockConfig(128, 64, 256, bk, 1, 8, 8, st, fp8_mode=mode),
                BlockConfig(128, 128, 256, bk, 1, 8, 8, st, fp8_mode=mode),
                BlockConfig(64, 128, 128, bk, 1, 8, 4, st + 1, fp8_mode=mode),
                BlockConfig(128, 128, 128, bk, 1, 16, 8, st, fp8_mode=mode),
                BlockConfig(64, 128, 128, bk, 1, 8, 8, st, fp8_mode=mode)]
        if mode == "once":  # the tiles of "tile" (their gate_up spills registers on sm_90)
            alts.append(BlockConfig(128, 128, 128, bk, 1, 8, 8, st, fp8_mode=mode))
        if not fp8:
            alts += [BlockConfig(128, 128, 256, bk, 1, 8, 8, 4), BlockConfig(64, 128, 256, bk, 1, 16, 4, 4),
                     BlockConfig(128, 128, 128, 128, 1, 8, 8, 2)]
    else:
        alts = [BlockConfig(d.block_m, min(128, 2 * d.gate_up_block_n), min(256, 2 * d.down_block_n), bk, d.split_k,
                            8, 4, 4, fp8_mode=mode),
                BlockConfig(d.block_m, d.gate_up_block_n, d.down_block_n, bk, d.split_k, 8, 4, 5, fp8_mode=mode),
                BlockConfig(min(128, 2 * d.block_m), d.gate_up_block_n, d.down_block_n, bk, d.split_k, 8, 8, 3,
                            fp8_mode=mode)]
    if mode == "once" and d.gate_up_block_n < FP8_BLOCK <= inter:
        alts.append(dataclasses.replace(d, gate_up_block_n=FP8_BLOCK))
    alts.append(dataclasses.replace(d, atomic_combine=True))
    out = [d]
    for c in alts:
        if c not in out:
            out.append(c)
    return out


# ----------------------------------------------------------------------------------------------
# Kernels (defined only where triton imports).


if triton is not None:
    _AMAX_EPS = tl.constexpr(AMAX_EPS)
    _FP8_MAX = tl.constexpr(FP8_MAX)

    @triton.jit
    def _dot(a, b, acc, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _round_e4m3(v):
        """float32 v, |v| <= 448 -> v rounded to the e4m3 grid (nearest, ties to even), in float32.
        For the interpreter, whose float32 -> fp8 cast loses the carry into the exponent
        (7.9998 -> 4.0); compiled code lets the hardware cast round (cvt.rn.satfinite)."""
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFFF + ((bits >> 20) & 1))) & 0xFFF00000  # 3 mantissa bits
        normal = bits.to(tl.float32, bitcast=True)
        sub = ((v * 512.0 + 12582912.0) - 12582912.0) / 512.0  # multiples of 2^-9 (subnormals)
        return tl.where(tl.abs(v) < 0.015625, sub, normal)

    @triton.jit
    def _to_e4m3(v, EXACT_CAST: tl.constexpr):
        """float32 v (already divided by its scale) -> fp8, saturated at +-448."""
        v = tl.minimum(tl.maximum(v, -_FP8_MAX), _FP8_MAX)
        if EXACT_CAST:
            v = _round_e4m3(v)
        return v.to(tl.float8e4nv)

    @triton.jit
    def _quantize_rows(a, EXACT_CAST: tl.constexpr):
        """a [BM, 128] float32 -> (fp8 [BM, 128], scales [BM] float32): per row, amax / 448."""
        scale = tl.maximum(tl.max(tl.abs(a), 1), _AMAX_EPS) / _FP8_MAX  # [BM]
        return _to_e4m3(a / scale[:, None], EXACT_CAST), scale

    @triton.jit
    def _quantize_groups(a, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EXACT_CAST: tl.constexpr):
        """a [BM, BN] float32, BN a multiple of 128 -> (fp8 [BM, BN], scales [BM, BN / 128] float32):
        per row and 128-column group, amax / 448."""
        groups = tl.reshape(a, (BLOCK_M, BLOCK_N // 128, 128))  # [BM, G, 128]
        scale = tl.maximum(tl.max(tl.abs(groups), 2), _AMAX_EPS) / _FP8_MAX  # [BM, G]
        v = tl.reshape(groups / scale[:, :, None], (BLOCK_M, BLOCK_N))
        return _to_e4m3(v, EXACT_CAST), scale

    @triton.jit
    def _quantize_kernel(
        src_ptr, dst_ptr, scale_ptr, block_expert_ptr,
        num_rows, num_cols, num_held, stride_src, stride_dst, stride_scale,
        BLOCK_R: tl.constexpr, BY_BLOCK: tl.constexpr, EXACT_CAST: tl.constexpr,
    ):  # fmt: skip
        """Program (r, g): rows [r * BLOCK_R, ...) x columns [g * 128, ...) of src -> fp8 dst and
        scale[row, g] = the row's amax / 448 over the group. BY_BLOCK: the rows are the sorted
        layout's row blocks (BLOCK_R = BLOCK_M); blocks past the real ones are skipped."""
        r = tl.program_id(0)
        g = tl.program_id(1)
        if BY_BLOCK:
            if tl.load(block_expert_ptr + r) >= num_held:
                return
        rows = r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
        cols = g * 128 + tl.arange(0, 128)  # [128]
        r_mask = rows < num_rows
        mask = r_mask[:, None] & (cols < num_cols)[None, :]
        a = tl.load(src_ptr + rows[:, None] * stride_src + cols[None, :], mask=mask, other=0.0)  # [BR, 128]
        q, scale = _quantize_rows(a.to(tl.float32), EXACT_CAST)
        tl.store(dst_ptr + rows[:, None] * stride_dst + cols[None, :], q, mask=mask)
        tl.store(scale_ptr + rows * stride_scale + g, scale, mask=r_mask)

    @triton.jit
    def _tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
        """Program id -> (row block, column tile), GROUP_M row blocks at a time."""
        width = GROUP_M * num_n
        first_m = (pid // width) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (pid % width) % size_m, (pid % width) // size_m

    @triton.jit
    def _held_expert(ids_ptr, local_ptr, p, mask, num_held, num_experts):
        """Stack index of pair p's expert; num_held when not held, padding, out of range or masked."""
        ids = tl.load(ids_ptr + p, mask=mask, other=num_experts)
        ok = mask & (ids >= 0) & (ids <= num_experts)
        e = tl.load(local_ptr + ids, mask=ok, other=num_held).to(tl.int32)
        return tl.where((e >= 0) & (e < num_held), e, num_held)

    @triton.jit
    def _align_kernel(
        ids_ptr, local_ptr, pairs_ptr, block_expert_ptr,
        num_pairs, num_held, num_experts, max_blocks, blocks_per_program,
        BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr,
    ):  # fmt: skip
        """Program c: pairs [c * CHUNK, (c + 1) * CHUNK) and blocks [c * bpp, (c + 1) * bpp).
        Bins of the histograms: stack index, num_held = not held (BLOCK_E > num_held)."""
        c = tl.program_id(0)
        offs = tl.arange(0, CHUNK)
        bins = tl.arange(0, BLOCK_E)
        mine = c * CHUNK
        counts = tl.zeros([BLOCK_E], tl.int32)  # pairs per expert
        before = tl.zeros([BLOCK_E], tl.int32)  # ... in the chunks before this program's
        for start in range(0, num_pairs, CHUNK):
            p = start + offs
            h = tl.histogram(_held_expert(ids_ptr, local_ptr, p, p < num_pairs, num_held, num_experts), BLOCK_E)
            counts += h
            before += h * (start < mine).to(tl.int32)
        held = bins < num_held
        counts = tl.where(held, counts, 0)
        blocks = (counts + BLOCK_M - 1) // BLOCK_M  # [E] row blocks per expert
        block_end = tl.cumsum(blocks, 0)
        slot_start = (block_end - blocks) * BLOCK_M  # [E] first slot of each expert
        total = tl.sum(blocks, 0)
        # this program's pairs: sorted by expert (pair order within one), then placed
        p = mine + offs
        e = _held_expert(ids_ptr, local_ptr, p, p < num_pairs, num_held, num_experts)  # [CHUNK]
        chunk = tl.histogram(e, BLOCK_E)
        chunk_first = tl.cumsum(chunk, 0) - chunk  # [E] first sorted position of each expert
        keys = tl.sort(e * CHUNK + offs)
        e_s = keys // CHUNK
        base = slot_start + before - chunk_first  # [E]: slot = base[e] + sorted position
        slots = tl.gather(base, e_s, 0) + offs
        tl.store(pairs_ptr + slots, mine + keys % CHUNK, mask=e_s < num_held)
        # this program's blocks: the expert of each, the sentinel in each padding slot
        rows = tl.arange(0, BLOCK_M)
        first_block = c * blocks_per_program
        last_block = tl.minimum(first_block + blocks_per_program, max_blocks)
        for b0 in range(first_block, last_block, BLOCK_B):
            b = b0 + tl.arange(0, BLOCK_B)  # [BB]
            be = tl.sum((block_end[None, :] <= b[:, None]).to(tl.int32), 1)  # [BB] experts ending at or before b
            be = tl.minimum(be, num_held)
            tl.store(block_expert_ptr + b, be, mask=b < last_block)
            end = tl.gather(slot_start + counts, be, 0)  # [BB] slot after the expert's last pair
            s = b[:, None] * BLOCK_M + rows[None, :]  # [BB, BM]
            pad = (s >= end[:, None]) & ((b < total) & (b < last_block))[:, None]
            tl.store(pairs_ptr + s, tl.full([BLOCK_B, BLOCK_M], 0, tl.int32) + num_pairs, mask=pad)

    @triton.jit
    def _gate_up_kernel(
        x_ptr, xs_ptr, w_ptr, ws_ptr, act_ptr, act_s_ptr, pairs_ptr, block_expert_ptr,
        num_pairs, num_held, hidden, inter, num_blocks, up_scale_row,
        stride_x, stride_xs, stride_we, stride_wn, stride_se, stride_sn, stride_act, stride_act_s,
        TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr, FP8: tl.constexpr,
        FP8_MODE: tl.constexpr, QUANT_OUT: tl.constexpr, EXACT_CAST: tl.constexpr,
    ):  # fmt: skip
        """Program -> (row block b, activation columns j * BLOCK_N ...):
        act[rows, n] = silu(x[rows] @ gate[n]^T) * (x[rows] @ up[n]^T).
        FP8_MODE 1 (once): x is fp8 with scales xs [T, H / 128]; QUANT_OUT: act is written as fp8
        with scales act_s [slots, I / 128] (BLOCK_N a multiple of 128)."""
        b, j = _tile(tl.program_id(0), num_blocks, tl.cdiv(inter, BLOCK_N), GROUP_M)
        e = tl.load(block_expert_ptr + b)
        if e >= num_held:  # past the real blocks
            return
        rows = b.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] slots of the sorted layout
        pairs = tl.load(pairs_ptr + rows)  # [BM] (token, selection) pair; num_pairs = padding
        valid = pairs < num_pairs
        tokens = (pairs // TOP_K).to(tl.int64)  # [BM]
        n = j * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        n_mask = n < inter
        kk = tl.arange(0, BLOCK_K)  # [BK]
        x_ptrs = x_ptr + tokens[:, None] * stride_x + kk[None, :]  # [BM, BK]
        xs_ptrs = xs_ptr + tokens * stride_xs  # [BM] FP8_MODE 1: the rows' group scales
        g_ptrs = w_ptr + e.to(tl.int64) * stride_we + n.to(tl.int64)[None, :] * stride_wn + kk[:, None]  # [BK, BN]
        u_ptrs = g_ptrs + inter.to(tl.int64) * stride_wn  # the up rows follow the gate rows
        gs_ptrs = ws_ptr + e.to(tl.int64) * stride_se + (n // 128) * stride_sn  # [BN] FP8: scale rows
        us_ptrs = gs_ptrs + up_scale_row * stride_sn
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            if EVEN_K:
                a = tl.load(x_ptrs, mask=valid[:, None], other=0.0)  # [BM, BK]
                g = tl.load(g_ptrs, mask=n_mask[None, :], other=0.0)  # [BK, BN]
                u = tl.load(u_ptrs, mask=n_mask[None, :], other=0.0)
            else:
                k_mask = (k0 + kk) < hidden
                a = tl.load(x_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
                g = tl.load(g_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                u = tl.load(u_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if FP8:
                g_s = tl.load(gs_ptrs + k0 // 128, mask=n_mask, other=0.0)  # [BN]
                u_s = tl.load(us_ptrs + k0 // 128, mask=n_mask, other=0.0)
                if FP8_MODE == 2:  # dequant: weights to x's dtype, 16-bit MMAs
                    g = (g.to(tl.float32) * g_s[None, :]).to(a.dtype)
                    u = (u.to(tl.float32) * u_s[None, :]).to(a.dtype)
                    acc_g = _dot(a, g, acc_g, IEEE)
                    acc_u = _dot(a, u, acc_u, IEEE)
                else:
                    if FP8_MODE == 1:  # a: fp8 already
                        aq = a
                        a_s = tl.load(xs_ptrs + k0 // 128, mask=valid, other=0.0)  # [BM]
                    else:
                        aq, a_s = _quantize_rows(a.to(tl.float32), EXACT_CAST)  # [BM, BK] fp8, [BM]
                    acc_g += tl.dot(aq, g) * (a_s[:, None] * g_s[None, :])
                    acc_u += tl.dot(aq, u) * (a_s[:, None] * u_s[None, :])
            else:
                acc_g = _dot(a, g, acc_g, IEEE)
                acc_u = _dot(a, u, acc_u, IEEE)
            x_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # [BM, BN] float32; padding rows and columns: 0
        act_ptrs = act_ptr + rows[:, None] * stride_act + n[None, :]
        if QUANT_OUT:
            q, q_s = _quantize_groups(act, BLOCK_M, BLOCK_N, EXACT_CAST)  # [BM, BN] fp8, [BM, BN / 128]
            tl.store(act_ptrs, q, mask=n_mask[None, :])
            grp = j * (BLOCK_N // 128) + tl.arange(0, BLOCK_N // 128)  # [BN / 128]
            tl.store(act_s_ptr + rows[:, None] * stride_act_s + grp[None, :], q_s,
                     mask=(grp * 128 < inter)[None, :])
        else:
            tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=n_mask[None, :])

    @triton.jit
    def _down_kernel(
        act_ptr, act_s_ptr, w_ptr, ws_ptr, out_ptr, pairs_ptr, block_expert_ptr, weights_ptr,
        num_pairs, num_held, hidden, inter, k_per_split, num_blocks,
        stride_act, stride_act_s, stride_we, stride_wn, stride_se, stride_sn, stride_out_split, stride_out,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        EVEN_K: tl.constexpr, IEEE: tl.constexpr, FP8: tl.constexpr, FP8_MODE: tl.constexpr,
        EXACT_CAST: tl.constexpr, ATOMIC: tl.constexpr, TOP_K: tl.constexpr,
    ):  # fmt: skip
        """Program (-> row block b, output columns j * BLOCK_N ...; K slice s):
        out[s, pair, n] = weight[pair] * act[rows, K_s] @ down[n, K_s]^T.
        FP8_MODE 1 (once): act is fp8 with scales act_s [slots, I / 128].
        ATOMIC: out is float32 [T, H]: out[pair // TOP_K, n] += the same, atomically."""
        b, j = _tile(tl.program_id(0), num_blocks, tl.cdiv(hidden, BLOCK_N), GROUP_M)
        e = tl.load(block_expert_ptr + b)
        if e >= num_held:
            return
        rows = b.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        pairs = tl.load(pairs_ptr + rows)  # [BM]
        valid = pairs < num_pairs
        n = j * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        n_mask = n < hidden
        k_start = tl.program_id(1) * k_per_split
        kk = k_start + tl.arange(0, BLOCK_K)  # [BK]
        a_ptrs = act_ptr + rows[:, None] * stride_act + kk[None, :]  # [BM, BK]; padding rows hold 0
        w_ptrs = w_ptr + e.to(tl.int64) * stride_we + n.to(tl.int64)[None, :] * stride_wn + kk[:, None]  # [BK, BN]
        s_ptrs = ws_ptr + e.to(tl.int64) * stride_se + (n // 128) * stride_sn + k_start // 128  # [BN] FP8
        as_ptrs = act_s_ptr + rows * stride_act_s + k_start // 128  # [BM] FP8_MODE 1
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_per_split, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                w = tl.load(w_ptrs, mask=n_mask[None, :], other=0.0)
            else:
                k_mask = (kk + k0) < inter
                a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if FP8:
                w_s = tl.load(s_ptrs + k0 // 128, mask=n_mask & (k_start + k0 < inter), other=0.0)  # [BN]
                if FP8_MODE == 2:  # dequant
                    acc = _dot(a, (w.to(tl.float32) * w_s[None, :]).to(a.dtype), acc, IEEE)
                else:
                    if FP8_MODE == 1:
                        aq = a
                        a_s = tl.load(as_ptrs + k0 // 128, mask=k_start + k0 < inter, other=0.0)  # [BM]
                    else:
                        aq, a_s = _quantize_rows(a.to(tl.float32), EXACT_CAST)
                    acc += tl.dot(aq, w) * (a_s[:, None] * w_s[None, :])
            else:
                acc = _dot(a, w, acc, IEEE)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        weight = tl.load(weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)  # [BM]
        acc = acc * weight[:, None]
        if ATOMIC:
            tokens = (pairs // TOP_K).to(tl.int64)  # [BM]
            tl.atomic_add(out_ptr + tokens[:, None] * stride_out + n[None, :], acc,
                          mask=valid[:, None] & n_mask[None, :], sem="relaxed")
        else:
            out_ptrs = out_ptr + tl.program_id(1).to(tl.int64) * stride_out_split
            out_ptrs += pairs.to(tl.int64)[:, None] * stride_out + n[None, :]
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])

    @triton.jit
    def _combine_kernel(
        out_ptr, y_ptr, ids_ptr, local_ptr,
        hidden, num_held, num_experts, stride_out_split, stride_out, stride_y,
        TOP_K: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_H: tl.constexpr,
    ):  # fmt: skip
        """Program (t, j): y[t, j * BLOCK_H ...] = sum over t's held selections and the K splits."""
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        h_mask = h < hidden
        acc = tl.zeros([BLOCK_H], tl.float32)
        for sel in tl.static_range(TOP_K):
            p = t * TOP_K + sel
            ids = tl.load(ids_ptr + p)
            ok = (ids >= 0) & (ids <= num_experts)
            e = tl.load(local_ptr + tl.where(ok, ids, num_experts))
            held = ok & (e >= 0) & (e < num_held)
            for s in tl.static_range(SPLIT_K):
                v = tl.load(out_ptr + s * stride_out_split + p * stride_out + h, mask=h_mask & held, other=0.0)
                acc += v.to(tl.float32)
        tl.store(y_ptr + t * stride_y + h, acc.to(y_ptr.dtype.element_ty), mask=h_mask)


# ----------------------------------------------------------------------------------------------
# Host side


def _interpreted(x: torch.Tensor) -> bool:
    """The kernels run under Triton's interpreter (CPU tensors): its float32 -> fp8 cast is wrong,
    so they round to the e4m3 grid themselves (EXACT_CAST)."""
    return not x.is_cuda


def _max_blocks(num_pairs: int, num_held: int, block_m: int) -> int:
    """Bound on sum over experts of ceil(count_e / block_m) for any routing of num_pairs rows."""
    return _cdiv(num_pairs, block_m) + min(num_held, num_pairs)


def _align(
    local: torch.Tensor, topk_ids: torch.Tensor, num_held: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the (token, selection) pairs by held expert into row blocks of block_m rows, in one
    launch, without a host synchronisation. -> pairs [max_blocks * block_m] int32: the pair
    index in each slot of the real blocks (P in padding slots; slots of the blocks past the
    real ones are not written), block_expert [max_blocks] int32: the expert of each block,
    num_held past the real blocks."""
    ids = topk_ids.reshape(-1)
    if ids.stride(0) != 1:
        ids = ids.contiguous()
    num_pairs = ids.numel()
    max_blocks = _max_blocks(num_pairs, num_held, block_m)
    pairs = torch.empty(max_blocks * block_m, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=ids.device)
    chunk = min(_ALIGN_CHUNK, max(16, next_pow2(num_pairs)))
    programs = _cdiv(num_pairs, chunk)
    _align_kernel[(programs,)](
        ids, local, pairs, block_expert,
        num_pairs, num_held, local.numel() - 1, max_blocks, _cdiv(max_blocks, programs),
        BLOCK_M=block_m, CHUNK=chunk, BLOCK_E=next_pow2(num_held + 1), BLOCK_B=_ALIGN_BLOCKS, num_warps=4,
    )  # fmt: skip
    return pairs, block_expert


def _quantize(
    src: torch.Tensor, exact_cast: bool, block_expert: torch.Tensor | None = None, num_held: int = 0,
    block_m: int = 0, out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """src [R, C] -> (fp8 [R, C], float32 scales [R, ceil(C/128)]): each row's 128-column groups
    scaled by amax / 448 (afkv.ops.fp8.quantize_groups), one launch. With block_expert: src is
    the sorted layout's [slots, C], quantized by row blocks of block_m, the blocks past the real
    ones skipped. `out`: the (fp8, scales) tensors to write."""
    rows, cols = src.shape
    q, scale = out if out is not None else (
        torch.empty(rows, cols, dtype=FP8, device=src.device),
        torch.empty(rows, _cdiv(cols, FP8_BLOCK), dtype=torch.float32, device=src.device))
    by_block = block_expert is not None
    block_r = block_m if by_block else min(_QUANT_ROWS, next_pow2(rows))
    _quantize_kernel[(_cdiv(rows, block_r), _cdiv(cols, FP8_BLOCK))](
        src, q, scale, block_expert if by_block else scale,
        rows, cols, num_held, src.stride(0), q.stride(0), scale.stride(0),
        BLOCK_R=block_r, BY_BLOCK=by_block, EXACT_CAST=exact_cast, num_warps=4,
    )  # fmt: skip
    return q, scale


def _check_fp8(gate_up, down, gate_up_scale, down_scale, num_held: int, hidden: int, inter: int) -> None:
    if down.dtype != FP8 or gate_up_scale is None or down_scale is None:
        raise ConfigError("fp8 expert weights need fp8 gate_up and down and both scale tensors")
    want_gu = (num_held, 2 * _cdiv(inter, FP8_BLOCK), _cdiv(hidden, FP8_BLOCK))
    want_dn = (num_held, *scale_shape(hidden, inter))
    if tuple(gate_up_scale.shape) != want_gu or tuple(down_scale.shape) != want_dn:
        raise ConfigError(f"fp8 scales must be {want_gu} / {want_dn}, got {tuple(gate_up_scale.shape)} / "
                          f"{tuple(down_scale.shape)}")
    if gate_up_scale.dtype != torch.float32 or down_scale.dtype != torch.float32:
        raise ConfigError("fp8 scales must be float32")
    if gate_up_scale.stride(-1) != 1 or down_scale.stride(-1) != 1:
        raise ConfigError("fp8 scales need a unit stride on their last dim")


def moe_mlp(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    local: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
    config: BlockConfig | None = None,
) -> torch.Tensor:
    """x [T, H], topk_ids [T, k] (logical expert ids; E marks padding), topk_weights [T, k],
    local [E + 1] int64 (logical id -> index in the stack, E_h when not held), gate_up
    [E_h, 2I, H] (gate rows, then up rows), down [E_h, H, I] -> y [T, H] in the dtype of x:
    y[t] = sum over t's selections of a held expert of weight * down_e(silu(gate_e x_t) * up_e x_t).
    Weights in the dtype of x, or fp8 (e4m3) with float32 block scales gate_up_scale
    [E_h, 2 ceil(I/128), ceil(H/128)] (gate blocks, then up blocks) and down_scale
    [E_h, ceil(H/128), ceil(I/128)] (afkv.ops.fp8). `config` overrides default_config (tuning)."""
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    num_held, two_inter, w_hidden = gate_up.shape
    inter = two_inter // 2
    fp8 = gate_up.dtype == FP8
    if x.dtype not in _FLOAT_DTYPES:
        raise ConfigError(f"moe_mlp takes float32, float16 or bfloat16 x, got {x.dtype}")
    if two_inter % 2 or w_hidden != hidden or tuple(down.shape) != (num_held, hidden, inter):
        raise ConfigError(f"gate_up {tuple(gate_up.shape)} / down {tuple(down.shape)} do not fit hidden {hidden}")
    if fp8:
        _check_fp8(gate_up, down, gate_up_scale, down_scale, num_held, hidden, inter)
    elif gate_up.dtype != x.dtype or down.dtype != x.dtype:
        raise ConfigError(f"expert weights must be {x.dtype} or fp8, got {gate_up.dtype} / {down.dtype}")
    if topk_ids.shape != (num_tokens, top_k) or topk_weights.shape != (num_tokens, top_k):
        raise ConfigError(f"topk_ids {tuple(topk_ids.shape)} / weights {tuple(topk_weights.shape)} are not [T, k]")
    if gate_up.stride(-1) != 1 or down.stride(-1) != 1:
        raise ConfigError("expert weights need a unit stride on their last dim")
    num_pairs = num_tokens * top_k
    if num_pairs == 0 or num_held == 0 or inter == 0:
        return torch.zeros_like(x)
    if x.stride(-1) != 1:
        x = x.contiguous()
    weights = topk_weights.reshape(-1)  # [P]
    if weights.stride(0) != 1:
        weights = weights.contiguous()
    device_index = None
    if x.is_cuda:
        device_index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    cfg = config or default_config(num_pairs, num_held, hidden, inter, sm_count(device_index), fp8)
    if fp8 and cfg.block_k != FP8_BLOCK:
        raise ConfigError(f"fp8 expert weights need block_k {FP8_BLOCK}, got {cfg.block_k}")
    ieee = x.dtype == torch.float32
    exact_cast = _interpreted(x)
    scales = (gate_up_scale, down_scale) if fp8 else (gate_up, down)  # unused pointers without FP8
    mode = FP8_MODES.index(cfg.fp8_mode) if fp8 else 0
    pairs, block_expert = _align(local, topk_ids, num_held, cfg.block_m)  # [slots], [max_blocks]
    max_blocks = block_expert.shape[0]
    slots = max_blocks * cfg.block_m
    a, a_s = x, scales[0]  # gate_up's A operand and (FP8_MODE once) its scales; unused pointer otherwise
    if mode == 1:
        a, a_s = _quantize(x, exact_cast)  # [T, H] fp8, [T, H / 128]
    quant_out = mode == 1 and cfg.gate_up_block_n % FP8_BLOCK == 0  # gate_up writes the down GEMM's fp8 input
    act = torch.empty(slots, inter, dtype=FP8 if quant_out else x.dtype, device=x.device)  # [slots, I]
    act_s = (torch.empty(slots, _cdiv(inter, FP8_BLOCK), dtype=torch.float32, device=x.device)  # [slots, I / 128]
             if mode == 1 else scales[1])
    _gate_up_kernel[(max_blocks * _cdiv(inter, cfg.gate_up_block_n),)](
        a, a_s, gate_up, scales[0], act, act_s, pairs, block_expert,
        num_pairs, num_held, hidden, inter, max_blocks, _cdiv(inter, FP8_BLOCK),
        a.stride(0), a_s.stride(0), gate_up.stride(0), gate_up.stride(1), scales[0].stride(0), scales[0].stride(1),
        act.stride(0), act_s.stride(0),
        TOP_K=top_k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.gate_up_block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        EVEN_K=hidden % cfg.block_k == 0, IEEE=ieee, FP8=fp8, FP8_MODE=mode, QUANT_OUT=quant_out,
        EXACT_CAST=exact_cast, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if mode == 1 and not quant_out:  # gate_up's tiles split the 128-column groups: quantize its output apart
        act = _quantize(act, exact_cast, block_expert, num_held, cfg.block_m, out=(
            torch.empty(slots, inter, dtype=FP8, device=x.device), act_s))[0]
    k_per_split = _cdiv(_cdiv(inter, cfg.split_k), cfg.block_k) * cfg.block_k
    if cfg.atomic_combine:
        out = torch.zeros(1, num_tokens, hidden, dtype=torch.float32, device=x.device)  # [1, T, H] the sums
    else:
        out_dtype = torch.float32 if cfg.split_k > 1 else x.dtype
        out = torch.empty(cfg.split_k, num_pairs, hidden, dtype=out_dtype, device=x.device)  # [S, P, H]
    _down_kernel[(max_blocks * _cdiv(hidden, cfg.down_block_n), cfg.split_k)](
        act, act_s, down, scales[1], out, pairs, block_expert, weights,
        num_pairs, num_held, hidden, inter, k_per_split, max_blocks,
        act.stride(0), act_s.stride(0), down.stride(0), down.stride(1), scales[1].stride(0), scales[1].stride(1),
        out.stride(0), out.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.down_block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        EVEN_K=inter == cfg.split_k * k_per_split, IEEE=ieee, FP8=fp8, FP8_MODE=mode, EXACT_CAST=exact_cast,
        ATOMIC=cfg.atomic_combine, TOP_K=top_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if cfg.atomic_combine:
        return out[0].to(x.dtype)  # [T, H]
    y = torch.empty_like(x)  # [T, H]
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    block_h = min(1024, next_pow2(hidden))
    _combine_kernel[(num_tokens, _cdiv(hidden, block_h))](
        out, y, ids, local,
        hidden, num_held, local.numel() - 1, out.stride(0), out.stride(1), y.stride(0),
        TOP_K=top_k, SPLIT_K=cfg.split_k, BLOCK_H=block_h, num_warps=4,
    )  # fmt: skip
    return y
