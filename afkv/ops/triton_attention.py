"""Triton kernels for attention over the paged KV cache, behind the API of the torch references.

    paged_decode_attention          one query per sequence over the cache      (ref: afkv.ops.attention)
    paged_decode_attention_quant    the same over serialised int8/int4 blocks  (ref: afkv.ops.quant)
    paged_prefill_attention         one sequence's chunk of new queries, causal (ref: attention.paged_attention)
    paged_prefill_attention_varlen  the same for several sequences at once
    bench_decode                    kernel vs torch reference, achieved KV bytes/s

Callers check `available()` and fall back to the torch references where it is False. The
functions themselves run their kernels on whatever device the tensors are on: CPU tensors
run under Triton's interpreter (TRITON_INTERPRET=1 in the environment before this module is
imported: the kernels are defined at import), which is how the CPU tests check them.
Importing this module never needs triton; without it the kernels are not defined.

Decode is flash-decoding. Grid (B, Hkv, num_splits): each program takes one kv head of one
sequence and one contiguous chunk of that sequence's attended range [start, context_len)
(start > 0 only with a sliding window), loads each K/V tile once for the whole query group
(GQA) and keeps an online softmax in float32; a reduce kernel merges the chunks' partial
(log-sum-exp, output). Chunks are cut per sequence from its own length, so sequences of
different lengths keep every program's work about equal. The grid and num_splits depend only
on shapes (B, Hkv, max blocks per sequence) and the device's SM count, never on tensor
values, so a decode step that calls this is CUDA-graph capturable; only blocks holding
attended tokens are read (never the padding of a block table), and a row with context_len 0
reads nothing and yields zeros.

Matrix products run on tl.dot (tensor cores): the query group is padded to 16 rows (tl.dot
needs M >= 16), which costs nothing in a kernel bound by memory. 16-bit caches multiply in
their dtype with float32 accumulation, like flash attention (probabilities are rounded to
the cache dtype before P @ V); float32 caches multiply in IEEE float32.
"""

from __future__ import annotations

import functools
import time

import torch

from afkv.errors import ConfigError
from afkv.ops import attention, quant
from afkv.ops.quant import QuantSpec

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU CI: callers use the torch references
    triton = None

_LOG2E = 1.4426950408889634
_MIN_GROUP_ROWS = 16  # tl.dot needs M >= 16
_PROGRAMS_PER_SM = 4  # decode: split until B * Hkv * num_splits reaches this many programs per SM
_MAX_SPLITS = 64
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def available() -> bool:
    """True when triton imports and torch sees a CUDA device."""
    return triton is not None and torch.cuda.is_available()


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.cache
def _sm_count(device_index: int | None) -> int:
    if device_index is None:  # CPU (interpreter): small, so tests see several splits
        return 1
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_index(t: torch.Tensor) -> int | None:
    if not t.is_cuda:
        return None
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _decode_block_n(head_dim: int, itemsize: int) -> int:
    """Tokens per K/V tile of the decode kernels."""
    return 64 if head_dim * itemsize <= 256 else 32


def num_decode_splits(batch: int, num_kv_heads: int, max_tokens: int, block_n: int, device_index: int | None) -> int:
    """Chunks each sequence is cut into: enough programs to fill the device, at most one
    tile of `block_n` tokens per chunk of the longest possible sequence. Shapes only."""
    max_splits = max(1, -(-max_tokens // block_n))
    want = -(-_PROGRAMS_PER_SM * _sm_count(device_index) // max(1, batch * num_kv_heads))
    return max(1, min(want, max_splits, _MAX_SPLITS))


# ----------------------------------------------------------------------------------------------
# Kernels (defined only where triton imports).


if triton is not None:
    @triton.jit
    def _attend_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, IEEE: tl.constexpr):
        """Online-softmax step. q [M, D] (products run in q's dtype: IEEE float32 when IEEE),
        k, v [N, D], valid [M, N] -> running max m_i [M] (log2 units), sum l_i [M],
        unnormalised output acc [M, D]."""
        k = k.to(q.dtype)
        v = v.to(q.dtype)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [M, N]
        else:
            s = tl.dot(q, tl.trans(k))  # [M, N]
        s = tl.where(valid, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # [M]
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing attended yet
        p = tl.exp2(s - m_ref[:, None])  # [M, N]
        alpha = tl.exp2(m_i - m_ref)  # [M]
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            pv = tl.dot(p.to(q.dtype), v, input_precision="ieee")  # [M, D]
        else:
            pv = tl.dot(p.to(q.dtype), v)  # [M, D]
        acc = acc * alpha[:, None] + pv
        return m_new, l_i, acc

    @triton.jit
    def _store_partial(
        out_ptr, mid_o_ptr, mid_lse_ptr, m_i, l_i, acc, b, heads, hmask, offs_d, dmask,
        stride_ob, stride_oh, num_heads, part, NUM_PARTS: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):  # fmt: skip
        """Write one program's result: the final output when there is one part, else the
        normalised partial output and its log-sum-exp (log2 units; -inf when empty)."""
        has = l_i > 0.0
        o = acc / tl.where(has, l_i, 1.0)[:, None]  # [M, D]
        mask = hmask[:, None] & dmask[None, :]
        if NUM_PARTS == 1:
            ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
            tl.store(ptrs, o.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            row = (b * num_heads + heads) * NUM_PARTS + part  # [M]
            tl.store(mid_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=mask)
            lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
            tl.store(mid_lse_ptr + row, lse, mask=hmask)

    @triton.jit
    def _chunk_bounds(start, end, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
        """[lo, hi) of chunk `split` of [start, end): whole tiles, the last chunk shorter."""
        span = end - start
        chunk = tl.cdiv(tl.cdiv(span, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = start + split * chunk
        hi = tl.minimum(lo + chunk, end)
        return lo, hi

    @triton.jit
    def _load_query_group(q_ptr, b, kvh, stride_qb, stride_qh, GROUP: tl.constexpr,
                         GROUP_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
        offs_g = tl.arange(0, GROUP_ROWS)
        offs_d = tl.arange(0, BLOCK_D)
        heads = kvh * GROUP + offs_g  # [G]
        hmask = offs_g < GROUP
        dmask = offs_d < HEAD_DIM
        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=hmask[:, None] & dmask[None, :],
            other=0.0,
        )  # [G, D]
        return q, heads, hmask, offs_d, dmask

    @triton.jit
    def _decode_kernel(
        q_ptr, k_ptr, v_ptr, block_tables_ptr, context_lens_ptr, out_ptr, mid_o_ptr, mid_lse_ptr,
        stride_qb, stride_qh, stride_ob, stride_oh,
        stride_kv_block, stride_kv_tok, stride_kv_head, stride_bt,
        num_heads, max_tokens, window, qk_scale,
        GROUP: tl.constexpr, GROUP_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
        HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        q, heads, hmask, offs_d, dmask = _load_query_group(
            q_ptr, b, kvh, stride_qb, stride_qh, GROUP, GROUP_ROWS, HEAD_DIM, BLOCK_D
        )
        q = q.to(k_ptr.dtype.element_ty)  # the reference attends in the cache's dtype
        if IEEE:
            q = q.to(tl.float32)
        end = tl.minimum(tl.load(context_lens_ptr + b), max_tokens)
        start = end * 0
        if HAS_WINDOW:
            start = tl.maximum(end - window, 0)
        lo, hi = _chunk_bounds(start, end, split, NUM_SPLITS, BLOCK_N)
        m_i = tl.full([GROUP_ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_ROWS], tl.float32)
        acc = tl.zeros([GROUP_ROWS, BLOCK_D], tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        head_off = kvh * stride_kv_head
        for t0 in range(lo, hi, BLOCK_N):
            tok = t0 + offs_n  # [N]
            tmask = tok < hi
            block_ids = tl.load(block_tables_ptr + b * stride_bt + tok // BLOCK_SIZE, mask=tmask, other=0)
            rows = block_ids.to(tl.int64) * stride_kv_block + (tok % BLOCK_SIZE) * stride_kv_tok + head_off  # [N]
            kv_mask = tmask[:, None] & dmask[None, :]
            k = tl.load(k_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [N, D]
            v = tl.load(v_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [N, D]
            valid = hmask[:, None] & tmask[None, :]
            m_i, l_i, acc = _attend_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, IEEE)
        _store_partial(
            out_ptr, mid_o_ptr, mid_lse_ptr, m_i, l_i, acc, b, heads, hmask, offs_d, dmask,
            stride_ob, stride_oh, num_heads, split, NUM_SPLITS, HEAD_DIM,
        )  # fmt: skip

    @triton.jit
    def _load_quant_tile(
        u8_ptr, f32_ptr, block_ids, tok_in_block, kvh, tmask, offs_d, dmask,
        nbytes, nbytes_f32, off_scale_f32, off_zero_f32, off_data, is_key: tl.constexpr,
        NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
    ):  # fmt: skip
        """Dequantized keys (is_key) or values [N, D] float32 of one tile of tokens."""
        mask = tmask[:, None] & dmask[None, :]
        packed: tl.constexpr = HEAD_DIM * BITS // 8
        base = block_ids.to(tl.int64)  # [N]
        data_rows = base * nbytes + off_data + (tok_in_block * NUM_KV_HEADS + kvh) * packed  # [N]
        if BITS == 8:
            codes = tl.load(u8_ptr + data_rows[:, None] + offs_d[None, :], mask=mask, other=0).to(tl.float32)
        else:
            byte = tl.load(u8_ptr + data_rows[:, None] + (offs_d // 2)[None, :], mask=mask, other=0).to(tl.int32)
            codes = ((byte >> ((offs_d % 2) * 4)[None, :]) & 15).to(tl.float32)  # element 2j: low nibble
        if is_key:  # per channel, groups of GROUP_SIZE tokens: [bs // G, H, D]
            group_rows = ((tok_in_block // GROUP_SIZE) * NUM_KV_HEADS + kvh) * HEAD_DIM  # [N]
            cols = offs_d
        else:  # per token, groups of GROUP_SIZE channels: [bs, H, D // G]
            group_rows = (tok_in_block * NUM_KV_HEADS + kvh) * (HEAD_DIM // GROUP_SIZE)
            cols = offs_d // GROUP_SIZE
        f_rows = base * nbytes_f32 + group_rows  # [N]
        idx = f_rows[:, None] + cols[None, :]  # [N, D]
        scale = tl.load(f32_ptr + off_scale_f32 + idx, mask=mask, other=0.0)
        zero = tl.load(f32_ptr + off_zero_f32 + idx, mask=mask, other=0.0)
        return codes * scale + zero

    @triton.jit
    def _decode_quant_kernel(
        q_ptr, u8_ptr, f32_ptr, block_tables_ptr, seq_lens_ptr, tail_ptr, tail_lens_ptr,
        out_ptr, mid_o_ptr, mid_lse_ptr,
        stride_qb, stride_qh, stride_ob, stride_oh, stride_bt,
        stride_tail_b, stride_tail_kv, stride_tail_tok, stride_tail_head,
        num_heads, max_tokens, max_tail, qk_scale,
        nbytes, nbytes_f32, off_k_scale, off_k_zero, off_v_scale, off_v_zero, off_k_data, off_v_data,
        NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_ROWS: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
        NUM_SPLITS: tl.constexpr, HAS_TAIL: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        part = tl.program_id(2)  # 0 .. NUM_SPLITS - 1: chunks of the quantized blocks; NUM_SPLITS: the tail
        q, heads, hmask, offs_d, dmask = _load_query_group(
            q_ptr, b, kvh, stride_qb, stride_qh, GROUP, GROUP_ROWS, HEAD_DIM, BLOCK_D
        )
        if IEEE:
            q = q.to(tl.float32)
        end = tl.minimum(tl.load(seq_lens_ptr + b), max_tokens)
        lo, hi = _chunk_bounds(end * 0, end, part, NUM_SPLITS, BLOCK_N)
        hi = tl.where(part < NUM_SPLITS, hi, lo)  # the tail's program reads no block
        m_i = tl.full([GROUP_ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_ROWS], tl.float32)
        acc = tl.zeros([GROUP_ROWS, BLOCK_D], tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        for t0 in range(lo, hi, BLOCK_N):
            tok = t0 + offs_n  # [N]
            tmask = tok < hi
            block_ids = tl.load(block_tables_ptr + b * stride_bt + tok // BLOCK_SIZE, mask=tmask, other=0)
            tok_in_block = tok % BLOCK_SIZE
            k = _load_quant_tile(
                u8_ptr, f32_ptr, block_ids, tok_in_block, kvh, tmask, offs_d, dmask, nbytes, nbytes_f32,
                off_k_scale, off_k_zero, off_k_data, True, NUM_KV_HEADS, HEAD_DIM, BITS, GROUP_SIZE,
            )  # fmt: skip
            v = _load_quant_tile(
                u8_ptr, f32_ptr, block_ids, tok_in_block, kvh, tmask, offs_d, dmask, nbytes, nbytes_f32,
                off_v_scale, off_v_zero, off_v_data, False, NUM_KV_HEADS, HEAD_DIM, BITS, GROUP_SIZE,
            )  # fmt: skip
            valid = hmask[:, None] & tmask[None, :]
            m_i, l_i, acc = _attend_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, IEEE)
        if HAS_TAIL:
            tail_len = tl.minimum(tl.load(tail_lens_ptr + b), max_tail)
            tail_len = tl.where(part == NUM_SPLITS, tail_len, 0)
            base = tail_ptr + b * stride_tail_b + kvh * stride_tail_head
            for t0 in range(0, tail_len, BLOCK_N):
                tok = t0 + offs_n
                tmask = tok < tail_len
                ptrs = base + tok[:, None] * stride_tail_tok + offs_d[None, :]
                kv_mask = tmask[:, None] & dmask[None, :]
                k = tl.load(ptrs, mask=kv_mask, other=0.0)  # [N, D]
                v = tl.load(ptrs + stride_tail_kv, mask=kv_mask, other=0.0)  # [N, D]
                valid = hmask[:, None] & tmask[None, :]
                m_i, l_i, acc = _attend_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, IEEE)
        _store_partial(
            out_ptr, mid_o_ptr, mid_lse_ptr, m_i, l_i, acc, b, heads, hmask, offs_d, dmask,
            stride_ob, stride_oh, num_heads, part, NUM_SPLITS + HAS_TAIL, HEAD_DIM,
        )  # fmt: skip

    @triton.jit
    def _reduce_kernel(
        mid_o_ptr, mid_lse_ptr, out_ptr, stride_ob, stride_oh, num_heads,
        NUM_PARTS: tl.constexpr, PARTS_P2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Merge the parts of one (sequence, head): weights 2^(lse - max); zeros when all are empty."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_s = tl.arange(0, PARTS_P2)
        offs_d = tl.arange(0, BLOCK_D)
        smask = offs_s < NUM_PARTS
        dmask = offs_d < HEAD_DIM
        row = (b * num_heads + h) * NUM_PARTS + offs_s  # [S]
        lse = tl.load(mid_lse_ptr + row, mask=smask, other=float("-inf"))  # [S]
        m = tl.max(lse, 0)
        m = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp2(lse - m)  # [S]
        mask = smask[:, None] & dmask[None, :]
        o = tl.load(mid_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)  # [S, D]
        den = tl.sum(w, 0)
        res = tl.sum(w[:, None] * o, 0) / tl.where(den > 0.0, den, 1.0)  # [D]
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, res.to(out_ptr.dtype.element_ty), mask=dmask)

    @triton.jit
    def _prefill_kernel(
        q_ptr, k_ptr, v_ptr, block_tables_ptr, cu_seqlens_ptr, context_lens_ptr, out_ptr,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kv_block, stride_kv_tok, stride_kv_head, stride_bt,
        max_tokens, window, qk_scale,
        GROUP: tl.constexpr, TOKENS_M: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """Rows of a tile are (query token, head of the group) pairs, token-major: TOKENS_M
        tokens x GROUP heads, so one K/V tile serves the whole group."""
        tile = tl.program_id(0)
        kvh = tl.program_id(1)
        b = tl.program_id(2)
        q_start = tl.load(cu_seqlens_ptr + b)
        n = tl.load(cu_seqlens_ptr + b + 1) - q_start  # new queries of this sequence
        ctx = tl.minimum(tl.load(context_lens_ptr + b), max_tokens)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_DIM
        tok_q = tile * TOKENS_M + offs_m // GROUP  # [M] index among the new queries
        heads = kvh * GROUP + offs_m % GROUP  # [M]
        rmask = (offs_m < TOKENS_M * GROUP) & (tok_q < n)
        q_pos = ctx - n + tok_q  # [M]
        q = tl.load(
            q_ptr + (q_start + tok_q)[:, None].to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
            mask=rmask[:, None] & dmask[None, :],
            other=0.0,
        )  # [M, D]
        q = q.to(k_ptr.dtype.element_ty)
        if IEEE:
            q = q.to(tl.float32)
        first = ctx - n + tile * TOKENS_M  # position of the tile's first query
        hi = tl.minimum(first + TOKENS_M, ctx)  # keys [lo, hi) can be attended by the tile
        lo = first * 0
        if HAS_WINDOW:
            lo = tl.maximum(first - window + 1, 0)
        hi = tl.where(tile * TOKENS_M < n, hi, lo)  # tiles past this sequence's queries: nothing
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        head_off = kvh * stride_kv_head
        for t0 in range(lo, hi, BLOCK_N):
            tok = t0 + offs_n  # [N] key positions
            tmask = tok < hi
            block_ids = tl.load(block_tables_ptr + b * stride_bt + tok // BLOCK_SIZE, mask=tmask, other=0)
            rows = block_ids.to(tl.int64) * stride_kv_block + (tok % BLOCK_SIZE) * stride_kv_tok + head_off
            kv_mask = tmask[:, None] & dmask[None, :]
            k = tl.load(k_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            valid = rmask[:, None] & tmask[None, :] & (tok[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                valid = valid & (q_pos[:, None] - tok[None, :] < window)
            m_i, l_i, acc = _attend_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, IEEE)
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        rows = (q_start + tok_q).to(tl.int64) * stride_ot + heads * stride_oh  # [M]
        ptrs = out_ptr + rows[:, None] + offs_d[None, :]
        tl.store(ptrs, o.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


def _ieee(dtype: torch.dtype, device: torch.device) -> bool:
    """Multiply in IEEE float32 rather than in `dtype`? For float32, and always under Triton's
    CPU interpreter, whose tl.dot cannot multiply 16-bit floats."""
    return device.type != "cuda" or dtype == torch.float32


def _group_rows(group: int) -> int:
    return max(_MIN_GROUP_ROWS, _next_pow2(group))


def _check_cache(kv: torch.Tensor, layer: int, q: torch.Tensor) -> None:
    if kv.dim() != 6 or kv.shape[2] != 2:
        raise ConfigError(f"kv must be [num_blocks, num_layers, 2, block_size, Hkv, D], got shape {tuple(kv.shape)}")
    if kv.dtype not in _FLOAT_DTYPES or q.dtype not in _FLOAT_DTYPES:
        raise ConfigError(f"kv and q must be float32, float16 or bfloat16, got {kv.dtype} and {q.dtype}")
    if not 0 <= layer < kv.shape[1]:
        raise ConfigError(f"layer {layer} out of range for {kv.shape[1]} layers", key="layer")
    if kv.stride(-1) != 1:
        raise ConfigError("kv must be contiguous along head_dim")
    num_kv_heads, head_dim = kv.shape[-2:]
    if q.shape[-1] != head_dim or q.shape[-2] % num_kv_heads:
        raise ConfigError(
            f"queries [..., H, D] = {tuple(q.shape)} do not fit kv heads {num_kv_heads} of head_dim {head_dim}"
        )
    if q.device != kv.device:
        raise ConfigError(f"q on {q.device} but kv on {kv.device}")


def _merge(mid_o: torch.Tensor, mid_lse: torch.Tensor, out: torch.Tensor, num_parts: int) -> None:
    batch, num_heads, head_dim = out.shape
    _reduce_kernel[(batch, num_heads)](
        mid_o, mid_lse, out, out.stride(0), out.stride(1), num_heads,
        NUM_PARTS=num_parts, PARTS_P2=_next_pow2(num_parts), HEAD_DIM=head_dim, BLOCK_D=_next_pow2(head_dim),
        num_warps=4,
    )  # fmt: skip


def _partials(batch: int, num_heads: int, num_parts: int, head_dim: int, device: torch.device):
    """Scratch of split-K: partial outputs [B, H, P, D] and log-sum-exps [B, H, P], float32
    (tiny placeholders when there is one part: the kernel then writes the output itself)."""
    if num_parts == 1:
        empty = torch.empty(1, dtype=torch.float32, device=device)
        return empty, empty
    mid_o = torch.empty(batch, num_heads, num_parts, head_dim, dtype=torch.float32, device=device)
    mid_lse = torch.empty(batch, num_heads, num_parts, dtype=torch.float32, device=device)
    return mid_o, mid_lse


def paged_decode_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    sliding_window: int | None = None,
    scale: float | None = None,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """As afkv.ops.attention.paged_decode_attention: q [B, H, D], kv [num_blocks, L, 2, bs,
    Hkv, D], block_tables int [B, nb] (padding never read), context_lens int [B] on q's device
    -> [B, H, D] of q.dtype (zeros where context_len is 0). context_len is clamped to nb * bs.
    `scale` defaults to D**-0.5; `num_splits` overrides the split-K heuristic (tests)."""
    _check_cache(kv, layer, q)
    batch, num_heads, head_dim = q.shape
    _, _, _, block_size, num_kv_heads, _ = kv.shape
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or tuple(context_lens.shape) != (batch,):
        raise ConfigError(
            f"block_tables must be [{batch}, nb] and context_lens [{batch}], "
            f"got {tuple(block_tables.shape)} and {tuple(context_lens.shape)}"
        )
    out = torch.empty(batch, num_heads, head_dim, dtype=q.dtype, device=q.device)  # [B, H, D]
    max_blocks = block_tables.shape[1]
    if batch == 0 or max_blocks == 0:
        return out.zero_()
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    k_cache = kv[:, layer, 0]  # [num_blocks, bs, Hkv, D]
    v_cache = kv[:, layer, 1]
    group = num_heads // num_kv_heads
    block_n = _decode_block_n(head_dim, kv.element_size())
    max_tokens = max_blocks * block_size
    if num_splits is None:
        num_splits = num_decode_splits(batch, num_kv_heads, max_tokens, block_n, _device_index(q))
    mid_o, mid_lse = _partials(batch, num_heads, num_splits, head_dim, q.device)
    scale = head_dim**-0.5 if scale is None else scale
    ieee = _ieee(kv.dtype, q.device)
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, mid_o, mid_lse,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        num_heads, max_tokens, sliding_window or 0, scale * _LOG2E,
        GROUP=group, GROUP_ROWS=_group_rows(group), HEAD_DIM=head_dim, BLOCK_D=_next_pow2(head_dim),
        BLOCK_SIZE=block_size, BLOCK_N=block_n, NUM_SPLITS=num_splits,
        HAS_WINDOW=sliding_window is not None, IEEE=ieee,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    if num_splits > 1:
        _merge(mid_o, mid_lse, out, num_splits)
    return out


def paged_decode_attention_quant(
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
    tail_kv: torch.Tensor | None = None,
    tail_lens: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """As afkv.ops.quant.paged_decode_attention: q [B, Hq, D] over serialised int8/int4 blocks
    uint8 [num_blocks, packed_nbytes] through block_tables int [B, nb]; sequence b attends to
    its seq_lens[b] quantized tokens -> [B, Hq, D] of q.dtype (zeros for an empty sequence).

    Optional full-precision tail (the last, partial block kept in float): tail_kv float
    [B, 2, T, Hkv, D] (index 0 = keys, 1 = values) and tail_lens int [B]: sequence b then
    attends to its seq_lens[b] quantized tokens followed by tail_kv[b, :, :tail_lens[b]],
    merged by log-sum-exp. Keys and values are dequantized in float32; products run in q's
    dtype on CUDA when q is 16-bit (float32 otherwise), with float32 accumulation."""
    quant.check_decode_attention_input(
        q, blocks, block_tables, seq_lens, layer, spec, num_layers, block_size, num_kv_heads
    )
    batch, num_heads, head_dim = q.shape
    has_tail = tail_kv is not None
    if has_tail != (tail_lens is not None):
        raise ConfigError("tail_kv and tail_lens go together")
    if has_tail and (
        tail_kv.dim() != 5
        or tuple(tail_kv.shape[:2]) != (batch, 2)
        or tuple(tail_kv.shape[3:]) != (num_kv_heads, head_dim)
        or tail_kv.dtype not in _FLOAT_DTYPES
        or tuple(tail_lens.shape) != (batch,)
    ):
        raise ConfigError(
            f"tail_kv must be float [{batch}, 2, T, {num_kv_heads}, {head_dim}] and tail_lens [{batch}], "
            f"got {tail_kv.dtype} {tuple(tail_kv.shape)} and {tuple(tail_lens.shape)}"
        )
    out = torch.empty(batch, num_heads, head_dim, dtype=q.dtype, device=q.device)  # [B, H, D]
    max_blocks = block_tables.shape[1]
    if batch == 0:
        return out
    if not blocks.is_contiguous() or blocks.data_ptr() % 16:  # float32 sections are read as float32
        blocks = blocks.clone(memory_format=torch.contiguous_format)
    blocks_f32 = blocks.view(torch.float32)  # [num_blocks, packed_nbytes // 4], same memory
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    offsets = {}
    for name, dtype, shape, offset in quant.block_sections(spec, num_layers, block_size, num_kv_heads, head_dim):
        offsets[name] = offset + layer * quant.section_nbytes(dtype, shape) // num_layers  # bytes
    if has_tail:
        tail_kv = tail_kv if tail_kv.stride(-1) == 1 else tail_kv.contiguous()
        tail_args = (tail_kv, tail_lens, tail_kv.stride(0), tail_kv.stride(1), tail_kv.stride(2), tail_kv.stride(3))
        max_tail = tail_kv.shape[2]
    else:
        tail_args = (blocks_f32, seq_lens, 0, 0, 0, 0)  # never read
        max_tail = 0
    group = num_heads // num_kv_heads
    block_n = _decode_block_n(head_dim, 2)
    max_tokens = max_blocks * block_size
    if num_splits is None:
        num_splits = num_decode_splits(batch, num_kv_heads, max_tokens, block_n, _device_index(q))
    num_parts = num_splits + has_tail
    mid_o, mid_lse = _partials(batch, num_heads, num_parts, head_dim, q.device)
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    ieee = _ieee(q.dtype, q.device)
    _decode_quant_kernel[(batch, num_kv_heads, num_parts)](
        q, blocks, blocks_f32, block_tables, seq_lens, *tail_args[:2], out, mid_o, mid_lse,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), *tail_args[2:],
        num_heads, max_tokens, max_tail, scale * _LOG2E,
        blocks.shape[1], blocks.shape[1] // 4, offsets["k_scale"] // 4, offsets["k_zero"] // 4,
        offsets["v_scale"] // 4, offsets["v_zero"] // 4, offsets["k_data"], offsets["v_data"],
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_ROWS=_group_rows(group), HEAD_DIM=head_dim,
        BLOCK_D=_next_pow2(head_dim), BLOCK_SIZE=block_size, BITS=spec.bits, GROUP_SIZE=spec.group_size,
        BLOCK_N=block_n, NUM_SPLITS=num_splits, HAS_TAIL=has_tail, IEEE=ieee,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    if num_parts > 1:
        _merge(mid_o, mid_lse, out, num_parts)
    return out


def _prefill_tiles(group: int) -> tuple[int, int]:
    """-> (rows per tile, query tokens per tile): rows = tokens x the query group."""
    block_m = max(64, _next_pow2(group))
    return block_m, block_m // group


def paged_prefill_attention_varlen(
    q: torch.Tensor,
    kv: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    max_q_len: int,
    sliding_window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention of several sequences' new queries over their cached contexts.

    q [T, H, D]: the new queries of all sequences, packed; sequence b owns rows
    cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 (cu_seqlens_q int [B + 1], from 0), which are
    its positions context_lens[b] - n_b .. context_lens[b] - 1 (their keys/values already
    written). block_tables int [B, nb]; max_q_len >= every n_b (it sizes the grid).
    -> [T, H, D] of q.dtype; sequence b's rows equal attention.paged_attention(q_b, kv, layer,
    block_tables[b], context_lens[b], sliding_window)."""
    _check_cache(kv, layer, q)
    num_tokens, num_heads, head_dim = q.shape
    _, _, _, block_size, num_kv_heads, _ = kv.shape
    batch = block_tables.shape[0]
    if block_tables.dim() != 2 or tuple(cu_seqlens_q.shape) != (batch + 1,) or tuple(context_lens.shape) != (batch,):
        raise ConfigError(
            f"block_tables must be [B, nb], cu_seqlens_q [B + 1] and context_lens [B], got "
            f"{tuple(block_tables.shape)}, {tuple(cu_seqlens_q.shape)} and {tuple(context_lens.shape)}"
        )
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)  # [T, H, D]
    if num_tokens == 0 or batch == 0 or max_q_len <= 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    k_cache = kv[:, layer, 0]  # [num_blocks, bs, Hkv, D]
    v_cache = kv[:, layer, 1]
    group = num_heads // num_kv_heads
    block_m, tokens_m = _prefill_tiles(group)
    block_n = 64 if head_dim * kv.element_size() <= 256 else 32
    scale = head_dim**-0.5 if scale is None else scale
    ieee = _ieee(kv.dtype, q.device)
    grid = (-(-max_q_len // tokens_m), num_kv_heads, batch)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        block_tables.shape[1] * block_size, sliding_window or 0, scale * _LOG2E,
        GROUP=group, TOKENS_M=tokens_m, BLOCK_M=block_m, HEAD_DIM=head_dim, BLOCK_D=_next_pow2(head_dim),
        BLOCK_SIZE=block_size, BLOCK_N=block_n, HAS_WINDOW=sliding_window is not None,
        IEEE=ieee, num_warps=4, num_stages=2,
    )  # fmt: skip
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    layer: int,
    block_ids: torch.Tensor,
    context_len: int,
    sliding_window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """As afkv.ops.attention.paged_attention: q [n, H, D], the queries of positions
    context_len - n .. context_len - 1 of one sequence whose block table is block_ids int
    [nb] -> [n, H, D] of q.dtype."""
    n = q.shape[0]
    if not n <= context_len <= block_ids.shape[0] * kv.shape[3]:
        raise ConfigError(f"{n} new queries, context_len {context_len} and {block_ids.shape[0]} blocks do not fit")
    cu_seqlens_q = torch.tensor([0, n], dtype=torch.int64, device=q.device)
    context_lens = torch.tensor([context_len], dtype=torch.int64, device=q.device)
    return paged_prefill_attention_varlen(
        q, kv, layer, block_ids[None], cu_seqlens_q, context_lens, n, sliding_window, scale
    )


# ----------------------------------------------------------------------------------------------
# Micro-benchmark (GPU)

_L2_FLUSH_NBYTES = 256 << 20  # KV of all benchmarked layers together: several times the L2 (H200: 50 MB)
REAL_SHAPES = {  # name -> (num_heads, num_kv_heads, head_dim)
    "qwen3-30b-a3b": (32, 4, 128),
    "mixtral-8x7b": (32, 8, 128),
}


def _time_s(fn, iters: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of fn(i), by CUDA events around `iters` calls (a wall clock on the CPU)."""
    for i in range(warmup):
        fn(i)
    if device.type != "cuda":
        t0 = time.perf_counter()
        for i in range(iters):
            fn(i)
        return (time.perf_counter() - t0) / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for i in range(iters):
        fn(i)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def bench_decode(
    batch: int,
    context_len: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int = 128,
    *,
    block_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    bits: int | None = None,
    group_size: int = 16,
    iters: int = 20,
    warmup: int = 3,
    seed: int = 0,
    device: torch.device | str = "cuda",
) -> dict:
    """Time the decode kernel against its baseline on one shape (every sequence at
    `context_len`, blocks scattered at random) on the current CUDA device.

    bits None: a `dtype` cache, baseline the torch reference (afkv.ops.attention). bits 8 / 4:
    serialised KIVI blocks (QuantSpec(bits, group_size)), baseline the CUDA kernel of
    afkv.ops.native where CuPy is there, else the torch reference of afkv.ops.quant. Calls
    cycle through enough layers that their KV exceeds the L2 cache, so reads come from HBM.
    kv_bytes = sum over sequences of context_len * 2 * Hkv * D * itemsize (the float
    cache's bytes; for quantized blocks, their own bytes are in kv_read_bytes).
    -> dict of the shape, seconds per call and bytes/s of both. (On a CPU device the kernels
    run under the interpreter and the times mean nothing: that is for tests.)"""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks_per_seq = -(-context_len // block_size)
    num_blocks = batch * blocks_per_seq
    raw_token_nbytes = 2 * num_kv_heads * head_dim * dtype.itemsize
    kv_bytes = batch * context_len * raw_token_nbytes
    if bits is None:
        layer_nbytes = num_blocks * block_size * raw_token_nbytes
        read_bytes = kv_bytes
    else:
        spec = QuantSpec(bits, group_size)
        layer_nbytes = num_blocks * quant.packed_nbytes(spec, 1, block_size, num_kv_heads, head_dim)
        read_bytes = batch * context_len * layer_nbytes // (num_blocks * block_size)
    num_layers = max(1, min(48, -(-_L2_FLUSH_NBYTES // layer_nbytes)))
    tables = torch.randperm(num_blocks, generator=gen, device=device).reshape(batch, blocks_per_seq)  # [B, nb]
    lens = torch.full((batch,), context_len, dtype=torch.int64, device=device)  # [B]
    q = torch.randn(batch, num_heads, head_dim, generator=gen, device=device).to(dtype)  # [B, H, D]
    if bits is None:
        kv = torch.randn(
            num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim, generator=gen, device=device
        ).to(dtype)  # [nbk, L, 2, bs, Hkv, D]
        baseline = "torch"

        def kernel(i: int) -> torch.Tensor:
            return paged_decode_attention(q, kv, i % num_layers, tables, lens)

        def reference(i: int) -> torch.Tensor:
            return attention.paged_decode_attention(q, kv, i % num_layers, tables, lens)
    else:
        from afkv.ops import native

        kv = torch.randn(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim, generator=gen, device=device)
        blocks = quant.to_bytes(quant.quantize_block(kv, spec))  # [nbk, packed_nbytes]
        del kv
        geometry = dict(spec=spec, num_layers=num_layers, block_size=block_size, num_kv_heads=num_kv_heads)
        use_native = device.type == "cuda" and native.available()
        base = native if use_native else quant
        baseline = "native" if use_native else "torch"

        def kernel(i: int) -> torch.Tensor:
            return paged_decode_attention_quant(q, blocks, tables, lens, layer=i % num_layers, **geometry)

        def reference(i: int) -> torch.Tensor:
            return base.paged_decode_attention(q, blocks, tables, lens, layer=i % num_layers, **geometry)

    kernel_s = _time_s(kernel, iters, warmup, device)
    reference_s = _time_s(reference, max(1, iters // 4), 1, device)
    block_n = _decode_block_n(head_dim, 2 if bits is not None else dtype.itemsize)
    return {
        "batch": batch,
        "context_len": context_len,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "block_size": block_size,
        "dtype": str(dtype).removeprefix("torch."),
        "bits": bits,
        "num_splits": num_decode_splits(batch, num_kv_heads, blocks_per_seq * block_size, block_n, _device_index(q)),
        "kv_bytes": kv_bytes,
        "kv_read_bytes": read_bytes,
        "kernel_s": kernel_s,
        "reference_s": reference_s,
        "baseline": baseline,
        "kernel_bytes_per_s": read_bytes / kernel_s,
        "reference_bytes_per_s": read_bytes / reference_s,
        "speedup": reference_s / kernel_s,
    }


def main(argv: list[str] | None = None) -> None:
    """python -m afkv.ops.triton_attention: the decode kernel vs its baseline on the real shapes."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--bits", type=int, nargs="+", default=[0], help="0 = bf16 cache; 8, 4 = KIVI blocks")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if not available():
        raise SystemExit("needs triton and a CUDA device")
    rows = []
    print(f"{torch.cuda.get_device_name()}  triton {triton.__version__}  torch {torch.__version__}")
    print(
        f"{'model':<15}{'kv':>5}{'batch':>6}{'ctx':>6}{'splits':>7}{'kernel us':>11}{'GB/s':>8}"
        f"{'baseline':>9}{'base us':>10}{'GB/s':>8}{'speedup':>9}"
    )
    for bits in args.bits:
        for name, (num_heads, num_kv_heads, head_dim) in REAL_SHAPES.items():
            for batch in args.batches:
                row = bench_decode(
                    batch, args.context, num_heads, num_kv_heads, head_dim,
                    block_size=args.block_size, bits=bits or None, iters=args.iters,
                )  # fmt: skip
                row["model"] = name
                rows.append(row)
                print(
                    f"{name:<15}{(f'int{bits}' if bits else 'bf16'):>5}{batch:>6}{args.context:>6}"
                    f"{row['num_splits']:>7}{row['kernel_s'] * 1e6:>11.1f}{row['kernel_bytes_per_s'] / 1e9:>8.0f}"
                    f"{row['baseline']:>9}{row['reference_s'] * 1e6:>10.1f}{row['reference_bytes_per_s'] / 1e9:>8.0f}"
                    f"{row['speedup']:>9.2f}"
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
