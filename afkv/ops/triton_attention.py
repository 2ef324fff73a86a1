"""Triton kernels for attention over the paged KV cache, behind the API of the torch references.

    paged_decode_attention             one query per sequence over the cache      (ref: afkv.ops.attention)
    paged_prefill_attention            one sequence's chunk of new queries, causal (ref: attention.paged_attention)
    paged_prefill_attention_varlen     the same for several sequences at once
    paged_decode_attention_quantized   decode over a quantized device tier: fp8 / int8 / int4 rows
                                       (afkv.ops.quant) plus full-precision staging blocks
                                       (ref: attention.paged_decode_attention_quantized)
    paged_prefill_attention_quantized  a prefill chunk over the same (ref: attention.paged_attention_quantized)
    paged_decode_partial(_quantized)   decode / prefill as a Partial: output and log-sum-exp, float32, to
    paged_prefill_partial(_quantized)  merge with other parts of the keys (streamed contexts, afkv.kv.stream);
                                       the prefill's causal or not (a part that precedes every query)
                                       (ref: attention.paged_decode_partial, attention.paged_attention_partial)

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
on the batch's power-of-two ceiling, Hkv and the device's SM count, never on tensor values,
so a decode step that calls this is CUDA-graph capturable, and a row's chunks (hence its
result, to the bit) are the same in a graph of a padded batch and wider tables as eagerly
(tests/ops: test_decode_rows_do_not_depend_on_the_batch_padding); only blocks holding
attended tokens are read (never the padding of a block table), and a row with context_len 0
reads nothing and yields zeros.

Matrix products run on tl.dot (tensor cores): the query group is padded to 16 rows (tl.dot
needs M >= 16), which costs nothing in a kernel bound by memory. 16-bit caches multiply in
their dtype with float32 accumulation, like flash attention (probabilities are rounded to
the cache dtype before P @ V); float32 caches multiply in IEEE float32.

Quantized rows are never dequantized: with one scale s_t (and zero z_t) per token, q . k_t =
s_t (q . c_t) + z_t sum(q) over the codes c_t, and sum_t p_t v_t = sum_t (p_t s_t) c_t +
sum_t p_t z_t, so the codes go into the products as they are (exact in float16) and the
scales into the scores and probabilities; int8 and int4 work on the rotated query
(q @ H) / p and rotate the output back once per program. Split-K parts take chunks of a row's quantized
blocks, one more part its staging tail. A prefill program reads its table's quantized blocks,
then its staging blocks, each in place: no dequantized copy of the context exists anywhere.
Products over codes run in float16 (the query, the probabilities times the tile-normalised
scales, and the int4 output before its rotation are rounded to float16; |q| and |V| must stay
below float16's 65504) with float32 accumulation; IEEE float32 for float32 models. The
interpreter runs the same float16 products (its tl.dot multiplies float16 as the GPU does;
only bfloat16 products over full-precision K/V run in float32 there, its bfloat16 tl.dot
being wrong), so the CPU tests check the GPU's arithmetic. The quantized decode kernel's
launch (tile, warps, stages, split-K, code conversion, register cap, how tiles load: the next
tile's scale data and codes ahead of this tile's products, codes as 32-bit words; sums over a
tile's tokens deferred) comes from a table per GPU family, QUANT_DECODE_CONFIGS, that
`afkv bench kv-quant --sweep` fills on that GPU.
tests/ops/test_sm90_compile.py compiles every launch for sm_90 without a GPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from afkv.errors import ConfigError
from afkv.ops.launch import device_index, next_pow2
from afkv.ops import attention, quant

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




@functools.cache
def _sm_count(device_index: int | None) -> int:
    if device_index is None:  # CPU (interpreter): small, so tests see several splits
        return 1
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _compiled(device: torch.device) -> bool:
    """Do the kernels run compiled for CUDA on `device`? (Else under Triton's CPU interpreter.)"""
    return device.type == "cuda"


def _device_index(t: torch.Tensor) -> int | None:
    """The CUDA device whose SMs a launch on t's device fills; None under the interpreter."""
    device = t.device
    if not _compiled(device):
        return None
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if device.type == "cuda" else 0


@functools.cache
def _gpu_family(device_index: int) -> str:
    """The key of the tuned launch tables: "sm90" for an H100 / H200."""
    major, minor = torch.cuda.get_device_capability(device_index)
    return f"sm{major}{minor}"


def _decode_block_n(head_dim: int, itemsize: int) -> int:
    """Tokens per K/V tile of the decode kernels."""
    return 64 if head_dim * itemsize <= 256 else 32


def num_decode_splits(batch: int, num_kv_heads: int, device_index: int | None,
                      programs_per_sm: int = _PROGRAMS_PER_SM) -> int:
    """Parts each sequence may be cut into: enough programs to fill the device (`programs_per_sm`
    per SM) for the batch rounded up to a power of two. Nothing else: neither the batch's exact
    size nor its table's width, so a row is cut the same way, and its result has the same bits,
    eagerly and in a CUDA graph of a padded batch (every power of two is a graph bucket) with a
    wider table; a row uses only the parts its own length fills (_chunk_bounds)."""
    want = -(-programs_per_sm * _sm_count(device_index) // max(1, next_pow2(batch) * num_kv_heads))
    return max(1, min(want, _MAX_SPLITS))


# ----------------------------------------------------------------------------------------------
# Kernels (defined only where triton imports).


if triton is not None:
    @triton.jit
    def _online_max(s, m_i):
        """Online softmax's rescaling: scores s [M, N] (log2 units, -inf where masked) and the
        running max m_i [M] -> (new max [M], p = exp2(s - max) [M, N], alpha = exp2(m_i - max)
        [M], the factor the running sums and outputs take). Rows with nothing attended yet keep
        p and alpha finite (0 and 1)."""
        m_new = tl.maximum(m_i, tl.max(s, 1))  # [M]
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        return m_new, tl.exp2(s - m_ref[:, None]), tl.exp2(m_i - m_ref)

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
        m_new, p, alpha = _online_max(s, m_i)  # [M], [M, N], [M]
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
    def _chunk_bounds(start, end, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, MIN_TILES: tl.constexpr = 1):
        """[lo, hi) of chunk `split` of [start, end): whole tiles, at least MIN_TILES of them,
        the last chunk shorter; chunks past the span are empty. From the row's span and the
        launch's constants only (the same cut in any batch)."""
        span = end - start
        chunk = tl.maximum(tl.cdiv(tl.cdiv(span, NUM_SPLITS), BLOCK_N), MIN_TILES) * BLOCK_N
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
    def _reduce_kernel(
        mid_o_ptr, mid_lse_ptr, out_ptr, lse_ptr, stride_ob, stride_oh, num_heads,
        NUM_PARTS: tl.constexpr, PARTS_P2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_LSE: tl.constexpr,
    ):  # fmt: skip
        """Merge the parts of one (sequence, head): weights 2^(lse - max); zeros when all are empty.
        HAS_LSE: also store the row's log-sum-exp [B, H] (natural log; -inf when empty)."""
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
        if HAS_LSE:
            total = tl.where(den > 0.0, (m + tl.log2(tl.where(den > 0.0, den, 1.0))) * 0.6931471805599453, float("-inf"))
            tl.store(lse_ptr + b * num_heads + h, total)

    @triton.jit
    def _prefill_kernel(
        q_ptr, k_ptr, v_ptr, block_tables_ptr, cu_seqlens_ptr, context_lens_ptr, out_ptr, lse_ptr,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_lt,
        stride_kv_block, stride_kv_tok, stride_kv_head, stride_bt,
        max_tokens, window, qk_scale,
        GROUP: tl.constexpr, TOKENS_M: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr, CAUSAL: tl.constexpr = True, HAS_LSE: tl.constexpr = False,
    ):  # fmt: skip
        """Rows of a tile are (query token, head of the group) pairs, token-major: TOKENS_M
        tokens x GROUP heads, so one K/V tile serves the whole group. CAUSAL False: every
        query sees the whole context (a part of keys that all precede the queries: no mask,
        no window); HAS_LSE: each row's log-sum-exp too (_store_prefill)."""
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
        if CAUSAL:
            hi = tl.minimum(first + TOKENS_M, ctx)  # keys [lo, hi) can be attended by the tile
        else:
            hi = ctx
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
            valid = rmask[:, None] & tmask[None, :]
            if CAUSAL:
                valid = valid & (tok[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                valid = valid & (q_pos[:, None] - tok[None, :] < window)
            m_i, l_i, acc = _attend_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, IEEE)
        _store_prefill(out_ptr, lse_ptr, m_i, l_i, acc, q_start + tok_q, heads, rmask, offs_d, dmask,
                       stride_ot, stride_oh, stride_lt, HAS_LSE)

    @triton.jit
    def _store_prefill(out_ptr, lse_ptr, m_i, l_i, acc, rows, heads, rmask, offs_d, dmask,
                       stride_ot, stride_oh, stride_lt, HAS_LSE: tl.constexpr):  # fmt: skip
        """Write a prefill tile's rows (query token `rows`, head `heads`): the normalised output
        and, with HAS_LSE, the log-sum-exp of the scaled logits (natural log, from the running
        max in log2 units; -inf where the row attended nothing, its output zeros)."""
        has = l_i > 0.0
        o = acc / tl.where(has, l_i, 1.0)[:, None]  # [M, D]
        rows = rows.to(tl.int64)
        ptrs = out_ptr + (rows * stride_ot + heads * stride_oh)[:, None] + offs_d[None, :]
        tl.store(ptrs, o.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
        if HAS_LSE:
            lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
            tl.store(lse_ptr + rows * stride_lt + heads, lse, mask=rmask)

    # ---- quantized rows (afkv.ops.quant) ----------------------------------------------------
    # KIND: 0 fp8, 1 int8, 2 int4. CVT (CUDA): codes become float16 four at a time through
    # byte permutes (exact: 0x64XX as float16 is 1024 + XX; the offset is taken off the scores
    # and outputs per token); 0 elsewhere (the interpreter): one conversion per code. Products
    # over codes run in float16, or in float32 (IEEE).

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _codes(b, KIND: tl.constexpr, HIGH: tl.constexpr, CVT: tl.constexpr, IEEE: tl.constexpr):
        """uint8 codes [N, C], or the same bytes as uint32 words [N, C / 4] (memory order,
        little-endian) -> float16 (float32 when IEEE) values [N, C], exact: fp8 the e4m3 value;
        int8 / int4 (the low nibbles, or the high ones when HIGH) the code plus an offset:
        CVT 0 converts each code (offset 0); 1 and 2 build the float16 0x64XX = 1024 + XX
        (offset 1024), 1 by two byte permutes per four codes (CUDA inline PTX), 2 by a bitwise
        or of 0x6400 (plain Triton: also under the interpreter). Words of int8 / int4 codes with
        CVT 1 or 2, of fp8 codes with CVT 1, are converted as words (_word_codes); other words
        are split into bytes first."""
        dt: tl.constexpr = tl.float32 if IEEE else tl.float16
        WORD_CODES: tl.constexpr = b.dtype == tl.uint32 and CVT != 0 and (KIND != 0 or CVT == 1)
        if b.dtype == tl.uint32 and not WORD_CODES:
            b = _bytes(b)
        if WORD_CODES:
            f = _word_codes(b, KIND, HIGH, CVT).to(dt)
        elif KIND == 0:
            f = b.to(tl.float8e4nv, bitcast=True).to(dt)
        elif CVT == 1:
            if KIND == 1:
                f = tl.inline_asm_elementwise(
                    asm="""{
                    prmt.b32 $0, $2, 0x64646464, 0x4140;
                    prmt.b32 $1, $2, 0x64646464, 0x4342;
                    }""",
                    constraints="=r,=r,r", args=[b], dtype=tl.float16, is_pure=True, pack=4,
                )  # fmt: skip
            elif HIGH:
                f = tl.inline_asm_elementwise(
                    asm="""{
                    .reg .b32 t;
                    shr.b32 t, $2, 4;
                    and.b32 t, t, 0x0F0F0F0F;
                    prmt.b32 $0, t, 0x64646464, 0x4140;
                    prmt.b32 $1, t, 0x64646464, 0x4342;
                    }""",
                    constraints="=r,=r,r", args=[b], dtype=tl.float16, is_pure=True, pack=4,
                )  # fmt: skip
            else:
                f = tl.inline_asm_elementwise(
                    asm="""{
                    .reg .b32 t;
                    and.b32 t, $2, 0x0F0F0F0F;
                    prmt.b32 $0, t, 0x64646464, 0x4140;
                    prmt.b32 $1, t, 0x64646464, 0x4342;
                    }""",
                    constraints="=r,=r,r", args=[b], dtype=tl.float16, is_pure=True, pack=4,
                )  # fmt: skip
            f = f.to(dt)
        else:
            c = b
            if KIND == 2:
                if HIGH:
                    c = b >> 4
                else:
                    c = b & 15
            if CVT == 2:
                f = (c.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True).to(dt)
            else:
                f = c.to(dt)
        return f

    @triton.jit
    def _quant_queries(q, h_ptr, offs_d, dmask, KIND: tl.constexpr, HEAD_DIM: tl.constexpr,
                       TILE_C: tl.constexpr, BLOCK_C: tl.constexpr, HP_INV: tl.constexpr,
                       IEEE: tl.constexpr):  # fmt: skip
        """Queries [M, D] -> what the code products take: (qa, qb, qsum). int8 / int4: the rotated
        query (q @ H) / p, whole [M, D] in qa (TILE_C = D) or its halves [M, D / 2] in qa, qb
        (TILE_C = D / 2: int4, or int8 in halves); fp8: qa = q. qsum [M]: the sum of the channels
        qa and qb hold (the zero points' factor)."""
        dt = tl.float32 if IEEE else tl.float16
        q = q.to(dt)
        qa = q
        qb = q
        if KIND != 0:
            offs_c = tl.arange(0, BLOCK_C)
            hmask = dmask[:, None] & (offs_c < TILE_C)[None, :]
            h_rows = h_ptr + offs_d[:, None] * HEAD_DIM
            ha = tl.load(h_rows + offs_c[None, :], mask=hmask, other=0.0)  # [D, C]: H's columns 0 .. C-1
            qa = (_dot(q, ha, IEEE) * HP_INV).to(dt)  # [M, C]
            if TILE_C < HEAD_DIM:
                hb = tl.load(h_rows + TILE_C + offs_c[None, :], mask=hmask, other=0.0)  # [D, C]: columns C ..
                qb = (_dot(q, hb, IEEE) * HP_INV).to(dt)
        qsum = tl.sum(qa.to(tl.float32), 1)
        if KIND != 0 and TILE_C < HEAD_DIM:
            qsum += tl.sum(qb.to(tl.float32), 1)
        return qa, qb, qsum

    @triton.jit
    def _tile_blocks(tab_ptr, t0, hi, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
        """[NB] int32: the row ids of the blocks of the tile of tokens t0 .. t0 + BLOCK_N - 1 (t0
        a multiple of BLOCK_SIZE); 0 for blocks at or past hi, whose table entries are not read."""
        offs_j = tl.arange(0, BLOCK_N // BLOCK_SIZE)
        bmask = t0 + offs_j * BLOCK_SIZE < hi
        return tl.load(tab_ptr + t0 // BLOCK_SIZE + offs_j, mask=bmask, other=0).to(tl.int32)

    @triton.jit
    def _quant_meta(
        rows16_ptr, blk, t0, lo, hi, kvh, layer_off, row_nbytes,
        KIND: tl.constexpr, NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr, CODE_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """The scale data of the tile of tokens t0 .. t0 + BLOCK_N - 1 held in the rows `blk`
        (_tile_blocks; tokens outside [lo, hi) are not read: a tile wholly past hi
        reads nothing): ks, vs, kz, vz [N] in the scale dtype (kz and vz: ks and vs again for fp8)."""
        num_tile_blocks: tl.constexpr = BLOCK_N // BLOCK_SIZE
        heads_tokens: tl.constexpr = NUM_KV_HEADS * BLOCK_SIZE
        offs_j = tl.arange(0, num_tile_blocks)
        offs_i = tl.arange(0, BLOCK_SIZE)
        tok = t0 + offs_j[:, None] * BLOCK_SIZE + offs_i[None, :]  # [NB, bs]
        tmask = (tok >= lo) & (tok < hi)
        base = blk.to(tl.int64) * row_nbytes + layer_off  # [NB] byte offset of this layer's section
        meta = rows16_ptr + (base // 2)[:, None] + (heads_tokens * CODE_DIM + kvh * BLOCK_SIZE + offs_i)[None, :]
        ks = tl.reshape(tl.load(meta, mask=tmask, other=0.0), [BLOCK_N])  # [N]
        vs = tl.reshape(tl.load(meta + heads_tokens, mask=tmask, other=0.0), [BLOCK_N])
        kz = ks
        vz = vs
        if KIND != 0:
            kz = tl.reshape(tl.load(meta + 2 * heads_tokens, mask=tmask, other=0.0), [BLOCK_N])
            vz = tl.reshape(tl.load(meta + 3 * heads_tokens, mask=tmask, other=0.0), [BLOCK_N])
        return ks, vs, kz, vz

    @triton.jit
    def _quant_codes(
        rows_ptr, blk, t0, lo, hi, kvh, layer_off, row_nbytes,
        KIND: tl.constexpr, NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr, CODE_DIM: tl.constexpr,
        TILE_C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr,
    ):  # fmt: skip
        """The codes of the tile at t0 held in the rows `blk` (_tile_blocks):
        (kb, vb, kb2, vb2), kb2 and vb2 the second half's of int8 in halves (else kb, vb again),
        each uint8 [N, C] or, loaded as 32-bit words (value codes when WORDS >= 1, key codes
        when WORDS == 2), uint32 [N, C / 4] (_codes takes either). Addresses are computed
        once per block of the tile."""
        HALVES: tl.constexpr = KIND == 1 and TILE_C < CODE_DIM
        num_tile_blocks: tl.constexpr = BLOCK_N // BLOCK_SIZE
        v_off: tl.constexpr = NUM_KV_HEADS * BLOCK_SIZE * CODE_DIM  # value codes follow the key codes
        offs_j = tl.arange(0, num_tile_blocks)
        offs_i = tl.arange(0, BLOCK_SIZE)
        tok = t0 + offs_j[:, None] * BLOCK_SIZE + offs_i[None, :]  # [NB, bs]
        tmask = (tok >= lo) & (tok < hi)
        base = blk.to(tl.int64) * row_nbytes + layer_off  # [NB]
        crow = base[:, None] + ((kvh * BLOCK_SIZE + offs_i) * CODE_DIM)[None, :]  # [NB, bs] byte offsets
        offs_c = tl.arange(0, BLOCK_C)
        b_ptrs = rows_ptr + crow[:, :, None] + offs_c[None, None, :]  # [NB, bs, C]
        bmask = tmask[:, :, None] & (offs_c < TILE_C)[None, None, :]
        offs_w = tl.arange(0, BLOCK_C // 4)
        words = rows_ptr.to(tl.pointer_type(tl.uint32))
        w_ptrs = words + (crow // 4)[:, :, None] + offs_w[None, None, :]  # [NB, bs, C/4]
        wmask = tmask[:, :, None] & (offs_w < TILE_C // 4)[None, None, :]
        if WORDS == 2:
            kb = tl.reshape(tl.load(w_ptrs, mask=wmask, other=0), [BLOCK_N, BLOCK_C // 4])
            kb2 = kb
            if HALVES:
                kb2 = tl.reshape(tl.load(w_ptrs + TILE_C // 4, mask=wmask, other=0), [BLOCK_N, BLOCK_C // 4])
        else:
            kb = tl.reshape(tl.load(b_ptrs, mask=bmask, other=0), [BLOCK_N, BLOCK_C])
            kb2 = kb
            if HALVES:
                kb2 = tl.reshape(tl.load(b_ptrs + TILE_C, mask=bmask, other=0), [BLOCK_N, BLOCK_C])
        if WORDS >= 1:
            vb = tl.reshape(tl.load(w_ptrs + v_off // 4, mask=wmask, other=0), [BLOCK_N, BLOCK_C // 4])
            vb2 = vb
            if HALVES:
                vb2 = tl.reshape(tl.load(w_ptrs + (v_off + TILE_C) // 4, mask=wmask, other=0), [BLOCK_N, BLOCK_C // 4])
        else:
            vb = tl.reshape(tl.load(b_ptrs + v_off, mask=bmask, other=0), [BLOCK_N, BLOCK_C])
            vb2 = vb
            if HALVES:
                vb2 = tl.reshape(tl.load(b_ptrs + v_off + TILE_C, mask=bmask, other=0), [BLOCK_N, BLOCK_C])
        return kb, vb, kb2, vb2

    @triton.jit
    def _halves(x):
        """uint32 [N, W] -> its low and high 16 bits as float16 [N, W] each (bitcasts)."""
        lo = (x & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
        hi = (x >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
        return lo, hi

    @triton.jit
    def _word_codes(w, KIND: tl.constexpr, HIGH: tl.constexpr, CVT: tl.constexpr):
        """Codes as uint32 words [N, W] -> float16 [N, 4W] in memory order: fp8 (CVT 1 only) the
        e4m3 values; int8 / int4 0x64XX = 1024 + code per byte (int4: its low nibble, or its high
        one when HIGH). From each word in place, as two float16 pairs: fp8 two conversions of
        two codes each, int8 / int4 CVT 1 bytes 0 and 1, 2 and 3 by two byte permutes (int4:
        after a mask, or a shift and a mask; CUDA inline PTX); CVT 2 bytes 0 and 2, 1 and 3 by
        a mask and an or each (plain Triton: also under the interpreter). No split of the word
        into four bytes (a register each) that the conversion then packs again (_bytes, _codes)."""
        if KIND == 0:
            p01, p23 = tl.inline_asm_elementwise(
                asm="""{
                .reg .b16 l, h;
                mov.b32 {l, h}, $2;
                cvt.rn.f16x2.e4m3x2 $0, l;
                cvt.rn.f16x2.e4m3x2 $1, h;
                }""",
                constraints="=r,=r,r", args=[w], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1,
            )  # fmt: skip
            f0, f1 = _halves(p01)
            f2, f3 = _halves(p23)
        elif CVT == 1:
            if KIND == 1:
                pre: tl.constexpr = "mov.b32 t, $2;"
            elif HIGH:
                pre: tl.constexpr = "shr.b32 t, $2, 4; and.b32 t, t, 0x0F0F0F0F;"
            else:
                pre: tl.constexpr = "and.b32 t, $2, 0x0F0F0F0F;"
            p01, p23 = tl.inline_asm_elementwise(
                asm="{ .reg .b32 t; " + pre + """
                prmt.b32 $0, t, 0x64646464, 0x4140;
                prmt.b32 $1, t, 0x64646464, 0x4342;
                }""",
                constraints="=r,=r,r", args=[w], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1,
            )  # fmt: skip
            f0, f1 = _halves(p01)
            f2, f3 = _halves(p23)
        else:
            mask: tl.constexpr = 0x000F000F if KIND == 2 else 0x00FF00FF
            c = w >> 4 if KIND == 2 and HIGH else w
            f0, f2 = _halves((c & mask) | 0x64006400)
            f1, f3 = _halves(((c >> 8) & mask) | 0x64006400)
        return tl.reshape(tl.join(tl.join(f0, f2), tl.join(f1, f3)), [w.shape[0], 4 * w.shape[1]])

    @triton.jit
    def _bytes(w):
        """uint32 words [N, W] -> their bytes [N, 4W] uint8, in memory order (little-endian)."""
        b0 = (w & 0xFF).to(tl.uint8)
        b1 = ((w >> 8) & 0xFF).to(tl.uint8)
        b2 = ((w >> 16) & 0xFF).to(tl.uint8)
        b3 = (w >> 24).to(tl.uint8)
        return tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), [w.shape[0], 4 * w.shape[1]])

    @triton.jit
    def _quant_math(
        qa, qb, qsum, kb, vb, kb2, vb2, ks, vs, kz, vz, valid, qk_scale, m_i, l_i, acc_a, acc_b, acc_z,
        KIND: tl.constexpr, CODE_DIM: tl.constexpr, TILE_C: tl.constexpr, CVT: tl.constexpr, IEEE: tl.constexpr,
        DEFER: tl.constexpr = False,
    ):  # fmt: skip
        """Online-softmax step over one tile of quantized tokens (_quant_meta's and _quant_codes'
        values; `valid` [M, N] masks the scores). Scores are s_t * (q . c_t) + z_t * sum(q) and values enter
        as p_t * s_t (scaled by the tile's largest s_t) times the codes, plus p_t * z_t: the
        codes are multiplied as they are, never dequantized. int8 and int4 work in the rotated
        domain, int4's channels in two halves (low and high nibbles), int8's whole or, when
        TILE_C < CODE_DIM, in two halves too (bytes 0 .. D/2 - 1 and D/2 .. D - 1: smaller
        tiles, fewer registers). DEFER: l_i and acc_z are [M, N], per row and token of the
        tile, summed over the tokens once after the last tile (two fewer reductions across
        warps per tile; fp8: one); else [M]."""
        HALVES: tl.constexpr = KIND == 2 or TILE_C < CODE_DIM
        ks = ks.to(tl.float32)
        vs = vs.to(tl.float32)
        off: tl.constexpr = 1024.0 if (KIND != 0 and CVT != 0) else 0.0  # what _codes adds to int codes
        if HALVES:
            s = _dot(qa, tl.trans(_codes(kb, KIND, False, CVT, IEEE)), IEEE)
            s += _dot(qb, tl.trans(_codes(kb2, KIND, True, CVT, IEEE)), IEEE)  # [M, N]
        else:
            s = _dot(qa, tl.trans(_codes(kb, KIND, False, CVT, IEEE)), IEEE)  # [M, N]
        s = s * (ks * qk_scale)[None, :]
        if KIND != 0:  # zero points, less what the codes' offset added
            s += qsum[:, None] * ((kz.to(tl.float32) - off * ks) * qk_scale)[None, :]
        s = tl.where(valid, s, float("-inf"))
        m_new, p, alpha = _online_max(s, m_i)  # [M], [M, N], [M]
        if DEFER:
            l_i = l_i * alpha[:, None] + p
        else:
            l_i = l_i * alpha + tl.sum(p, 1)
        v_max = tl.max(vs, 0)
        v_max = tl.where(v_max > 0.0, v_max, 1.0)
        pw = (p * (vs / v_max)[None, :]).to(tl.float32 if IEEE else tl.float16)  # [M, N], <= 1
        acc_a = acc_a * alpha[:, None] + _dot(pw, _codes(vb, KIND, False, CVT, IEEE), IEEE) * v_max
        if HALVES:
            acc_b = acc_b * alpha[:, None] + _dot(pw, _codes(vb2, KIND, True, CVT, IEEE), IEEE) * v_max
        if KIND != 0 and DEFER:
            z = p * vz.to(tl.float32)[None, :]  # [M, N]
            if off != 0.0:  # the offset entered through the rounded weights pw: take off exactly that
                z -= (off * v_max) * pw.to(tl.float32)
            acc_z = acc_z * alpha[:, None] + z
        elif KIND != 0:
            z = tl.sum(p * vz.to(tl.float32)[None, :], 1)
            if off != 0.0:
                z -= off * v_max * tl.sum(pw.to(tl.float32), 1)
            acc_z = acc_z * alpha + z
        return m_new, l_i, acc_a, acc_b, acc_z

    @triton.jit
    def _quant_tile(
        qa, qb, qsum, rows_ptr, rows16_ptr, tab_ptr, t0, lo, hi, valid, kvh, layer_off, row_nbytes, qk_scale,
        m_i, l_i, acc_a, acc_b, acc_z,
        KIND: tl.constexpr, NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr, CODE_DIM: tl.constexpr,
        TILE_C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, CVT: tl.constexpr, IEEE: tl.constexpr,
        WORDS: tl.constexpr = 0, DEFER: tl.constexpr = False,
    ):  # fmt: skip
        """One online-softmax step over the tile at t0: _tile_blocks, _quant_meta, _quant_codes, _quant_math."""
        blk = _tile_blocks(tab_ptr, t0, hi, BLOCK_SIZE, BLOCK_N)
        ks, vs, kz, vz = _quant_meta(rows16_ptr, blk, t0, lo, hi, kvh, layer_off, row_nbytes, KIND, NUM_KV_HEADS,
                                     BLOCK_SIZE, CODE_DIM, BLOCK_N)  # fmt: skip
        kb, vb, kb2, vb2 = _quant_codes(rows_ptr, blk, t0, lo, hi, kvh, layer_off, row_nbytes, KIND, NUM_KV_HEADS,
                                        BLOCK_SIZE, CODE_DIM, TILE_C, BLOCK_C, BLOCK_N, WORDS)  # fmt: skip
        return _quant_math(qa, qb, qsum, kb, vb, kb2, vb2, ks, vs, kz, vz, valid, qk_scale, m_i, l_i, acc_a, acc_b,
                           acc_z, KIND, CODE_DIM, TILE_C, CVT, IEEE, DEFER)  # fmt: skip

    @triton.jit
    def _quant_result(l_i, acc_a, acc_b, acc_z, h_ptr, offs_d, dmask, KIND: tl.constexpr,
                      HEAD_DIM: tl.constexpr, TILE_C: tl.constexpr, BLOCK_C: tl.constexpr,
                      HP_INV: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
        """The quantized tokens' accumulators -> an unnormalised output [M, D] in the model's
        channels (int8 / int4: rotated back), to go on with full-precision tokens."""
        if KIND == 0:
            acc = acc_a
        else:
            dt = tl.float32 if IEEE else tl.float16
            offs_c = tl.arange(0, BLOCK_C)
            hmask = (offs_c < TILE_C)[:, None] & dmask[None, :]
            ha = tl.load(h_ptr + offs_c[:, None] * HEAD_DIM + offs_d[None, :], mask=hmask, other=0.0)  # [C, D]
            norm = tl.where(l_i > 0.0, HP_INV / tl.where(l_i > 0.0, l_i, 1.0), 0.0)  # normalised: float16 holds it
            oa = ((acc_a + acc_z[:, None]) * norm[:, None]).to(dt)
            o = _dot(oa, ha, IEEE)
            if TILE_C < HEAD_DIM:
                hb = tl.load(h_ptr + (TILE_C + offs_c)[:, None] * HEAD_DIM + offs_d[None, :], mask=hmask, other=0.0)
                ob = ((acc_b + acc_z[:, None]) * norm[:, None]).to(dt)
                o += _dot(ob, hb, IEEE)
            acc = o * l_i[:, None]
        return acc

    @triton.jit
    def _staging_tile(staging_ptr, tab_ptr, tok, tmask, kvh, num_blocks, offs_d, dmask,
                      stride_sb, stride_skv, stride_stok, stride_sh, BLOCK_SIZE: tl.constexpr):  # fmt: skip
        """K, V [N, D] of tokens held in full-precision staging blocks (table id num_blocks + s)."""
        sid = tl.load(tab_ptr + tok // BLOCK_SIZE, mask=tmask, other=num_blocks) - num_blocks  # [N]
        rows = sid.to(tl.int64) * stride_sb + (tok % BLOCK_SIZE) * stride_stok + kvh * stride_sh  # [N]
        mask = tmask[:, None] & dmask[None, :]
        k = tl.load(staging_ptr + rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
        v = tl.load(staging_ptr + stride_skv + rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
        return k, v

    @triton.jit
    def _decode_quant_kernel(
        q_ptr, rows_ptr, rows16_ptr, staging_ptr, h_ptr, block_tables_ptr, context_lens_ptr,
        out_ptr, mid_o_ptr, mid_lse_ptr,
        stride_qb, stride_qh, stride_ob, stride_oh, stride_bt, stride_sb, stride_skv, stride_stok, stride_sh,
        num_blocks, row_nbytes, layer_off, num_heads, max_tokens, window, qk_scale,
        KIND: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_ROWS: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CODE_DIM: tl.constexpr, TILE_C: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N_TAIL: tl.constexpr, NUM_SPLITS: tl.constexpr,
        MAX_TAIL: tl.constexpr, TAIL_P2: tl.constexpr, HAS_WINDOW: tl.constexpr, HP_INV: tl.constexpr,
        CVT: tl.constexpr, IEEE: tl.constexpr, FP_IEEE: tl.constexpr, MIN_TILES: tl.constexpr,
        PREFETCH: tl.constexpr, WORDS: tl.constexpr, DEFER: tl.constexpr,
    ):  # fmt: skip
        """Parts 0 .. NUM_SPLITS-1 take chunks of the row's quantized tokens, part NUM_SPLITS
        its staging tail (at most MAX_TAIL blocks at the end of its table)."""
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        part = tl.program_id(2)
        q, heads, hmask, offs_d, dmask = _load_query_group(
            q_ptr, b, kvh, stride_qb, stride_qh, GROUP, GROUP_ROWS, HEAD_DIM, BLOCK_D
        )
        q = q.to(staging_ptr.dtype.element_ty)
        if FP_IEEE:
            q = q.to(tl.float32)
        tab = block_tables_ptr + b * stride_bt
        ctx = tl.minimum(tl.load(context_lens_ptr + b), max_tokens).to(tl.int32)
        start = ctx * 0
        if HAS_WINDOW:
            start = tl.maximum(ctx - window, 0)
        num_used = tl.cdiv(ctx, BLOCK_SIZE)
        offs_t = tl.arange(0, TAIL_P2)
        cols = num_used - MAX_TAIL + offs_t
        cmask = (offs_t < MAX_TAIL) & (cols >= 0)
        ids = tl.load(tab + cols, mask=cmask, other=0)
        num_staging = tl.sum((cmask & (ids >= num_blocks)).to(tl.int32), 0)
        q_end = tl.maximum(tl.minimum((num_used - num_staging) * BLOCK_SIZE, ctx), start)
        lo, hi = _chunk_bounds(start - start % BLOCK_SIZE, q_end, part, NUM_SPLITS, BLOCK_N, MIN_TILES)  # whole blocks
        hi = tl.where(part < NUM_SPLITS, hi, lo)
        m_i = tl.full([GROUP_ROWS], float("-inf"), tl.float32)
        acc_a = tl.zeros([GROUP_ROWS, BLOCK_C], tl.float32)
        acc_b = tl.zeros([GROUP_ROWS, BLOCK_C], tl.float32)
        if DEFER:
            l_i = tl.zeros([GROUP_ROWS, BLOCK_N], tl.float32)
            acc_z = tl.zeros([GROUP_ROWS, BLOCK_N], tl.float32)
        else:
            l_i = tl.zeros([GROUP_ROWS], tl.float32)
            acc_z = tl.zeros([GROUP_ROWS], tl.float32)
        qa, qb, qsum = _quant_queries(q, h_ptr, offs_d, dmask, KIND, HEAD_DIM, TILE_C, BLOCK_C, HP_INV, IEEE)
        offs_n = tl.arange(0, BLOCK_N)
        if PREFETCH:  # tile i + 1's scale data (2: codes, tile i + 2's block ids) load before tile i's products
            blk = _tile_blocks(tab, lo, hi, BLOCK_SIZE, BLOCK_N)
            ks, vs, kz, vz = _quant_meta(rows16_ptr, blk, lo, start, hi, kvh, layer_off, row_nbytes, KIND,
                                         NUM_KV_HEADS, BLOCK_SIZE, CODE_DIM, BLOCK_N)  # fmt: skip
            if PREFETCH == 2:
                nblk = _tile_blocks(tab, lo + BLOCK_N, hi, BLOCK_SIZE, BLOCK_N)
                kb, vb, kb2, vb2 = _quant_codes(rows_ptr, blk, lo, start, hi, kvh, layer_off, row_nbytes, KIND,
                                                NUM_KV_HEADS, BLOCK_SIZE, CODE_DIM, TILE_C, BLOCK_C, BLOCK_N,
                                                WORDS)  # fmt: skip
            for t0 in range(lo, hi, BLOCK_N):
                if PREFETCH == 1:  # codes: Triton's pipeliner
                    kb, vb, kb2, vb2 = _quant_codes(rows_ptr, blk, t0, start, hi, kvh, layer_off, row_nbytes, KIND,
                                                    NUM_KV_HEADS, BLOCK_SIZE, CODE_DIM, TILE_C, BLOCK_C, BLOCK_N,
                                                    WORDS)  # fmt: skip
                    nblk = _tile_blocks(tab, t0 + BLOCK_N, hi, BLOCK_SIZE, BLOCK_N)
                else:
                    nnblk = _tile_blocks(tab, t0 + 2 * BLOCK_N, hi, BLOCK_SIZE, BLOCK_N)
                nks, nvs, nkz, nvz = _quant_meta(rows16_ptr, nblk, t0 + BLOCK_N, start, hi, kvh, layer_off, row_nbytes,
                                                 KIND, NUM_KV_HEADS, BLOCK_SIZE, CODE_DIM, BLOCK_N)  # fmt: skip
                if PREFETCH == 2:
                    nkb, nvb, nkb2, nvb2 = _quant_codes(rows_ptr, nblk, t0 + BLOCK_N, start, hi, kvh, layer_off,
                                                        row_nbytes, KIND, NUM_KV_HEADS, BLOCK_SIZE, CODE_DIM, TILE_C,
                                                        BLOCK_C, BLOCK_N, WORDS)  # fmt: skip
                tok = t0 + offs_n  # [N]
                valid = hmask[:, None] & ((tok >= start) & (tok < hi))[None, :]
                m_i, l_i, acc_a, acc_b, acc_z = _quant_math(
                    qa, qb, qsum, kb, vb, kb2, vb2, ks, vs, kz, vz, valid, qk_scale, m_i, l_i, acc_a, acc_b, acc_z,
                    KIND, CODE_DIM, TILE_C, CVT, IEEE, DEFER,
                )  # fmt: skip
                ks, vs, kz, vz = nks, nvs, nkz, nvz
                if PREFETCH == 1:
                    blk = nblk
                else:
                    blk, nblk = nblk, nnblk
                    kb, vb, kb2, vb2 = nkb, nvb, nkb2, nvb2
        else:
            for t0 in range(lo, hi, BLOCK_N):
                tok = t0 + offs_n  # [N]
                valid = hmask[:, None] & ((tok >= start) & (tok < hi))[None, :]
                m_i, l_i, acc_a, acc_b, acc_z = _quant_tile(
                    qa, qb, qsum, rows_ptr, rows16_ptr, tab, t0, start, hi, valid, kvh, layer_off, row_nbytes,
                    qk_scale, m_i, l_i, acc_a, acc_b, acc_z, KIND, NUM_KV_HEADS, BLOCK_SIZE, CODE_DIM, TILE_C,
                    BLOCK_C, BLOCK_N, CVT, IEEE, WORDS, DEFER,
                )  # fmt: skip
        if DEFER:
            l_i = tl.sum(l_i, 1)
            acc_z = tl.sum(acc_z, 1)
        acc = _quant_result(l_i, acc_a, acc_b, acc_z, h_ptr, offs_d, dmask, KIND, HEAD_DIM, TILE_C, BLOCK_C,
                            HP_INV, IEEE)  # fmt: skip
        tail_end = tl.where(part == NUM_SPLITS, ctx, q_end)
        offs_m = tl.arange(0, BLOCK_N_TAIL)
        for t0 in range(q_end, tail_end, BLOCK_N_TAIL):
            tok = t0 + offs_m
            tmask = tok < tail_end
            k, v = _staging_tile(staging_ptr, tab, tok, tmask, kvh, num_blocks, offs_d, dmask,
                                 stride_sb, stride_skv, stride_stok, stride_sh, BLOCK_SIZE)  # fmt: skip
            valid = hmask[:, None] & tmask[None, :]
            m_i, l_i, acc = _attend_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, FP_IEEE)
        _store_partial(
            out_ptr, mid_o_ptr, mid_lse_ptr, m_i, l_i, acc, b, heads, hmask, offs_d, dmask,
            stride_ob, stride_oh, num_heads, part, NUM_SPLITS + 1, HEAD_DIM,
        )  # fmt: skip

    @triton.jit
    def _prefill_quant_kernel(
        q_ptr, rows_ptr, rows16_ptr, staging_ptr, h_ptr, block_tables_ptr, cu_seqlens_ptr, context_lens_ptr,
        out_ptr, lse_ptr,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_lt, stride_bt, stride_sb, stride_skv, stride_stok,
        stride_sh,
        num_blocks, row_nbytes, layer_off, max_tokens, window, qk_scale,
        KIND: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, TOKENS_M: tl.constexpr,
        BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CODE_DIM: tl.constexpr,
        TILE_C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, TABLE_CHUNK: tl.constexpr,
        HAS_WINDOW: tl.constexpr, HP_INV: tl.constexpr, CVT: tl.constexpr, IEEE: tl.constexpr, FP_IEEE: tl.constexpr,
        CAUSAL: tl.constexpr = True, HAS_LSE: tl.constexpr = False,
    ):  # fmt: skip
        """_prefill_kernel's tiles (query tokens x the group's heads) over a quantized device
        tier: first the table's quantized blocks, then its staging blocks (the chunk's own
        tokens among them), both read where they are. CAUSAL and HAS_LSE as _prefill_kernel's
        (a streamed ring slot: one-layer rows, every key before every query)."""
        tile = tl.program_id(0)
        kvh = tl.program_id(1)
        b = tl.program_id(2)
        q_start = tl.load(cu_seqlens_ptr + b)
        n = tl.load(cu_seqlens_ptr + b + 1) - q_start
        ctx = tl.minimum(tl.load(context_lens_ptr + b), max_tokens).to(tl.int32)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_DIM
        tok_q = tile * TOKENS_M + offs_m // GROUP  # [M]
        heads = kvh * GROUP + offs_m % GROUP
        rmask = (offs_m < TOKENS_M * GROUP) & (tok_q < n)
        q_pos = ctx - n + tok_q  # [M]
        q = tl.load(
            q_ptr + (q_start + tok_q)[:, None].to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
            mask=rmask[:, None] & dmask[None, :],
            other=0.0,
        )  # [M, D]
        q = q.to(staging_ptr.dtype.element_ty)
        if FP_IEEE:
            q = q.to(tl.float32)
        tab = block_tables_ptr + b * stride_bt
        first = ctx - n + tile * TOKENS_M
        if CAUSAL:
            hi = tl.minimum(first + TOKENS_M, ctx)
        else:
            hi = ctx
        lo = first * 0
        if HAS_WINDOW:
            lo = tl.maximum(first - window + 1, 0)
        hi = tl.where(tile * TOKENS_M < n, hi, lo)
        num_used = tl.cdiv(ctx, BLOCK_SIZE)
        num_staging = num_used * 0
        offs_j = tl.arange(0, TABLE_CHUNK)
        for j0 in range(0, num_used, TABLE_CHUNK):
            jmask = j0 + offs_j < num_used
            ids = tl.load(tab + j0 + offs_j, mask=jmask, other=0)
            num_staging += tl.sum((jmask & (ids >= num_blocks)).to(tl.int32), 0)
        q_end = tl.minimum((num_used - num_staging) * BLOCK_SIZE, ctx)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc_a = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
        acc_b = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
        acc_z = tl.zeros([BLOCK_M], tl.float32)
        qa, qb, qsum = _quant_queries(q, h_ptr, offs_d, dmask, KIND, HEAD_DIM, TILE_C, BLOCK_C, HP_INV, IEEE)
        offs_n = tl.arange(0, BLOCK_N)
        hi_q = tl.minimum(hi, q_end)
        for t0 in range(lo - lo % BLOCK_SIZE, hi_q, BLOCK_N):  # whole blocks
            tok = t0 + offs_n
            tmask = (tok >= lo) & (tok < hi_q)
            valid = rmask[:, None] & tmask[None, :]
            if CAUSAL:
                valid = valid & (tok[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                valid = valid & (q_pos[:, None] - tok[None, :] < window)
            m_i, l_i, acc_a, acc_b, acc_z = _quant_tile(
                qa, qb, qsum, rows_ptr, rows16_ptr, tab, t0, lo, hi_q, valid, kvh, layer_off, row_nbytes, qk_scale,
                m_i, l_i, acc_a, acc_b, acc_z, KIND, NUM_KV_HEADS, BLOCK_SIZE, CODE_DIM, TILE_C, BLOCK_C, BLOCK_N,
                CVT, IEEE,
            )  # fmt: skip
        acc = _quant_result(l_i, acc_a, acc_b, acc_z, h_ptr, offs_d, dmask, KIND, HEAD_DIM, TILE_C, BLOCK_C,
                            HP_INV, IEEE)  # fmt: skip
        for t0 in range(tl.maximum(lo, q_end), hi, BLOCK_N):
            tok = t0 + offs_n
            tmask = tok < hi
            k, v = _staging_tile(staging_ptr, tab, tok, tmask, kvh, num_blocks, offs_d, dmask,
                                 stride_sb, stride_skv, stride_stok, stride_sh, BLOCK_SIZE)  # fmt: skip
            valid = rmask[:, None] & tmask[None, :]
            if CAUSAL:
                valid = valid & (tok[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                valid = valid & (q_pos[:, None] - tok[None, :] < window)
            m_i, l_i, acc = _attend_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, FP_IEEE)
        _store_prefill(out_ptr, lse_ptr, m_i, l_i, acc, q_start + tok_q, heads, rmask, offs_d, dmask,
                       stride_ot, stride_oh, stride_lt, HAS_LSE)

def _ieee(dtype: torch.dtype, device: torch.device) -> bool:
    """Multiply full-precision K/V in IEEE float32 rather than in `dtype`? For float32, and for
    bfloat16 under Triton's CPU interpreter, whose tl.dot gets bfloat16 wrong. float16 the
    interpreter multiplies as the GPU does, so the CPU tests check the 16-bit arithmetic."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and not _compiled(device))


def _group_rows(group: int) -> int:
    return max(_MIN_GROUP_ROWS, next_pow2(group))


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


def _merge(mid_o: torch.Tensor, mid_lse: torch.Tensor, out: torch.Tensor, num_parts: int,
           lse: torch.Tensor | None = None) -> None:
    """The split-K parts -> out [B, H, D] (and, when given, each row's log-sum-exp into lse [B, H] float32)."""
    batch, num_heads, head_dim = out.shape
    _reduce_kernel[(batch, num_heads)](
        mid_o, mid_lse, out, mid_lse if lse is None else lse, out.stride(0), out.stride(1), num_heads,
        NUM_PARTS=num_parts, PARTS_P2=next_pow2(num_parts), HEAD_DIM=head_dim, BLOCK_D=next_pow2(head_dim),
        HAS_LSE=lse is not None, num_warps=4,
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
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [B, H, D]
    _decode(q, kv, layer, block_tables, context_lens, sliding_window, scale, num_splits, out, None)
    return out


def paged_decode_partial(q: torch.Tensor, kv: torch.Tensor, layer: int, block_tables: torch.Tensor,
                         context_lens: torch.Tensor, *, num_splits: int | None = None) -> attention.Partial:
    """As afkv.ops.attention.paged_decode_partial: paged_decode_attention (no sliding window) as
    a Partial (output and log-sum-exp [B, H], float32) to merge with other parts of the keys."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)  # [B, H, D]
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)  # [B, H]
    _decode(q, kv, layer, block_tables, context_lens, None, None, num_splits, out, lse)
    return attention.Partial(out, lse)


def _decode(q: torch.Tensor, kv: torch.Tensor, layer: int, block_tables: torch.Tensor, context_lens: torch.Tensor,
            sliding_window: int | None, scale: float | None, num_splits: int | None, out: torch.Tensor,
            lse: torch.Tensor | None) -> None:
    """paged_decode_attention into `out` [B, H, D]; with `lse` [B, H] float32 also each row's
    log-sum-exp (at least two split-K parts then: the reduce writes it)."""
    _check_cache(kv, layer, q)
    batch, num_heads, head_dim = q.shape
    _, _, _, block_size, num_kv_heads, _ = kv.shape
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or tuple(context_lens.shape) != (batch,):
        raise ConfigError(
            f"block_tables must be [{batch}, nb] and context_lens [{batch}], "
            f"got {tuple(block_tables.shape)} and {tuple(context_lens.shape)}"
        )
    max_blocks = block_tables.shape[1]
    if batch == 0 or max_blocks == 0:
        out.zero_()
        if lse is not None:
            lse.fill_(float("-inf"))
        return
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    context_lens = context_lens if context_lens.stride(0) == 1 else context_lens.contiguous()  # read as [B]
    k_cache = kv[:, layer, 0]  # [num_blocks, bs, Hkv, D]
    v_cache = kv[:, layer, 1]
    group = num_heads // num_kv_heads
    block_n = _decode_block_n(head_dim, kv.element_size())
    max_tokens = max_blocks * block_size
    if num_splits is None:
        num_splits = num_decode_splits(batch, num_kv_heads, device_index(q))
    if lse is not None:
        num_splits = max(2, num_splits)  # an empty part costs one program
    mid_o, mid_lse = _partials(batch, num_heads, num_splits, head_dim, q.device)
    scale = head_dim**-0.5 if scale is None else scale
    ieee = _ieee(kv.dtype, q.device)
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, mid_o, mid_lse,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        num_heads, max_tokens, sliding_window or 0, scale * _LOG2E,
        GROUP=group, GROUP_ROWS=_group_rows(group), HEAD_DIM=head_dim, BLOCK_D=next_pow2(head_dim),
        BLOCK_SIZE=block_size, BLOCK_N=block_n, NUM_SPLITS=num_splits,
        HAS_WINDOW=sliding_window is not None, IEEE=ieee,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    if num_splits > 1:
        _merge(mid_o, mid_lse, out, num_splits, lse)


def _one_sequence(n: int, context_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefill kernels' cu_seqlens [0, n] and context_lens [context_len] (int64) for one
    sequence, filled on the device: no copy from pageable host memory (on CUDA a host
    synchronisation per layer)."""
    cu_seqlens = torch.zeros(2, dtype=torch.int64, device=device)
    cu_seqlens[1:] = n
    return cu_seqlens, torch.full((1,), context_len, dtype=torch.int64, device=device)


def _prefill_tiles(group: int) -> tuple[int, int]:
    """-> (rows per tile, query tokens per tile): rows = tokens x the query group."""
    block_m = max(64, next_pow2(group))
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
    batch = block_tables.shape[0]
    if block_tables.dim() != 2 or tuple(cu_seqlens_q.shape) != (batch + 1,) or tuple(context_lens.shape) != (batch,):
        raise ConfigError(
            f"block_tables must be [B, nb], cu_seqlens_q [B + 1] and context_lens [B], got "
            f"{tuple(block_tables.shape)}, {tuple(cu_seqlens_q.shape)} and {tuple(context_lens.shape)}"
        )
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, H, D]
    _prefill(q, kv, layer, block_tables, cu_seqlens_q, context_lens, max_q_len, sliding_window, scale, out)
    return out


def _prefill(q: torch.Tensor, kv: torch.Tensor, layer: int, block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
             context_lens: torch.Tensor, max_q_len: int, sliding_window: int | None, scale: float | None,
             out: torch.Tensor, lse: torch.Tensor | None = None, causal: bool = True) -> None:
    """The prefill kernel into `out` [T, H, D] (and each row's log-sum-exp into `lse` [T, H]
    float32); causal False: every query sees its whole context (no window then)."""
    num_tokens, num_heads, head_dim = q.shape
    _, _, _, block_size, num_kv_heads, _ = kv.shape
    batch = block_tables.shape[0]
    if num_tokens == 0 or batch == 0 or max_q_len <= 0:
        if lse is not None:
            lse.fill_(float("-inf"))
            out.zero_()
        return
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
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out, out if lse is None else lse,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), 0 if lse is None else lse.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        block_tables.shape[1] * block_size, sliding_window or 0, scale * _LOG2E,
        GROUP=group, TOKENS_M=tokens_m, BLOCK_M=block_m, HEAD_DIM=head_dim, BLOCK_D=next_pow2(head_dim),
        BLOCK_SIZE=block_size, BLOCK_N=block_n, HAS_WINDOW=sliding_window is not None,
        IEEE=ieee, CAUSAL=causal, HAS_LSE=lse is not None, num_warps=4, num_stages=2,
    )  # fmt: skip


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
    cu_seqlens_q, context_lens = _one_sequence(n, context_len, q.device)
    return paged_prefill_attention_varlen(
        q, kv, layer, block_ids[None], cu_seqlens_q, context_lens, n, sliding_window, scale
    )


def paged_prefill_partial(q: torch.Tensor, kv: torch.Tensor, layer: int, block_ids: torch.Tensor, context_len: int,
                          causal: bool = True) -> attention.Partial:
    """As afkv.ops.attention.paged_attention_partial: q [n, H, D] over one sequence's context of
    context_len tokens (table block_ids int [nb]) as a Partial (output [n, H, D] and log-sum-exp
    [n, H], float32). causal: the queries are its last n tokens, as paged_prefill_attention;
    else every query sees every key (a streamed ring slot: blocks that precede all queries)."""
    _check_cache(kv, layer, q)
    n = q.shape[0]
    _check_part(n, context_len, block_ids, kv.shape[3], causal)
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)  # [n, H, D]
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)  # [n, H]
    cu_seqlens_q, context_lens = _one_sequence(n, context_len, q.device)
    _prefill(q, kv, layer, block_ids[None], cu_seqlens_q, context_lens, n, None, None, out, lse, causal)
    return attention.Partial(out, lse)


def _check_part(n: int, context_len: int, block_ids: torch.Tensor, block_size: int, causal: bool) -> None:
    """A prefill partial's n queries over context_len tokens of block_ids [nb] (causal: n <= context_len)."""
    if block_ids.dim() != 1 or not (n if causal else 0) <= context_len <= block_ids.shape[0] * block_size:
        raise ConfigError(f"{n} queries ({'causal' if causal else 'no mask'}), context_len {context_len} and "
                          f"{tuple(block_ids.shape)} blocks of {block_size} tokens do not fit")



# ---- a quantized device tier (afkv.ops.attention.QuantizedKVCache) -------------------------------

_KINDS = {"fp8": 0, "int8": 1, "int4": 2}


@dataclass(frozen=True)
class QuantDecodeConfig:
    """How the quantized decode kernel is launched (compile-time choices, shapes aside)."""

    block_n: int = 128  # tokens per tile of codes (at least one block: the kernel takes max(block_n, bs))
    num_warps: int = 4
    num_stages: int = 2
    programs_per_sm: int = _PROGRAMS_PER_SM  # split-K: chunks per row until B * Hkv * chunks fills this
    cvt: int = 2  # how int8 / int4 codes become float16 (_codes: 0 convert, 1 byte permutes, 2 or 0x6400); fp8
    # codes loaded as words: 1 converts the words by inline PTX, else they are split into bytes (_word_codes)
    max_regs: int | None = None  # registers per thread ptxas may use (None: its choice): more programs per SM
    halves: bool = False  # int8: codes in two tiles of D / 2 columns (fewer registers; moot for fp8, int4)
    min_split_tiles: int = 1  # split-K chunks of at least this many tiles (short contexts: fewer busy programs,
    # each paying the fixed cost of a program, the rotation of its queries and output, less often)
    prefetch: int = 0  # load tile i + 1's block ids and scale data (1), or also its codes and tile i + 2's block
    # ids (2; with num_stages 1), before tile i's products, into registers: Triton's pipeliner leaves the 16-bit
    # scale loads synchronous (each tile waited for one from HBM) and, with num_stages 2, issues its copies of
    # tile i + 1 after tile i's products
    words: int = 0  # codes load as bytes (0), value codes (1) or key and value codes (2) as 32-bit words,
    # converted as words (int8, int4: _word_codes) or split into bytes (fp8, cvt 0): Triton's pipeliner prefetches
    # a uint8 value tile into registers, one register per code; words it copies into shared memory (cp.async)
    deferred_sums: bool = False  # softmax denominators and zero-point terms summed over a tile's tokens once, after
    # the last tile (kept per query row and tile column): two (fp8: one) fewer reductions across warps per tile

    def __post_init__(self) -> None:
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ConfigError(f"block_n must be a power of two >= 16, got {self.block_n}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1 or self.programs_per_sm < 1:
            raise ConfigError(f"bad launch: {self}")
        if self.cvt not in (0, 1, 2):
            raise ConfigError(f"cvt must be 0, 1 or 2, got {self.cvt}")
        if self.min_split_tiles < 1:
            raise ConfigError(f"min_split_tiles must be >= 1, got {self.min_split_tiles}")
        if self.max_regs is not None and not 32 <= self.max_regs <= 255:
            raise ConfigError(f"max_regs must be in 32 .. 255, got {self.max_regs}")
        if self.prefetch not in (0, 1, 2) or self.words not in (0, 1, 2):
            raise ConfigError(f"prefetch and words must be 0, 1 or 2, got {self.prefetch} and {self.words}")


# The launch per GPU family (_gpu_family) and format, from `afkv bench kv-quant --sweep` on that
# GPU (it prints the rows to put here); "default" for any other device and the interpreter.
QUANT_DECODE_CONFIGS: dict[str, dict[str, QuantDecodeConfig]] = {
    "default": {"fp8": QuantDecodeConfig(64), "int8": QuantDecodeConfig(64, halves=True),
                "int4": QuantDecodeConfig(64)},
    # H100 80GB HBM3, 2026-12-07 (afkv/bench/RESULTS.md, session 3 call 1): the best of 56 variants
    # at 8 x 16384 and 2 x 65536 on Qwen3-30B-A3B shapes
    "sm90": {"fp8": QuantDecodeConfig(32),
             "int8": QuantDecodeConfig(64, max_regs=128, halves=True),
             "int4": QuantDecodeConfig(64, max_regs=128)},
}


# What `afkv bench kv-quant --sweep` tries per format (fields as QuantDecodeConfig's; cvt is moot
# for fp8). Registers decide how many programs an SM holds (sm_90 ptxas, 4 warps, head_dim 128:
# 4 programs at 128 or fewer), hence the capped ones; a cap spills to local memory. The H100 sweep
# of 2026-12-07 (session 3) took 88-110 us at 8 x 16384 whatever the bytes (fp8 and int8 read the
# same, int4 half): each tile waited for its scale data (16-bit loads, synchronous: Triton's
# pipeliner leaves them) after its codes, and value codes sat in registers one per code. Kept: the
# table's winners and the best of each format there; new: prefetch (scale data, block ids and, with
# 2 and no pipeliner, the codes one tile ahead) with codes loaded as 32-bit words, and deferred sums.
# Two warps (session 5): with 16 query rows (one tl.dot row tile) the warps split a tile's tokens, so
# every row max and sum, the value scales' max and the probabilities' way into P @ V cross warps
# (shared memory, barriers), and each warp reloads the whole query operand per tile for fewer tokens.
# sm_90 cubins (tests/ops/sm90_compile.py, nvdisasm), warp-instructions per token and kv head in the
# main loop: the table's 4-warp launches fp8 64, int8 67, int4 68; 2 warps, 64-token tiles, no
# spills, 248-255 registers (4 programs per SM), prefetch 1, words 2, cvt 1 (_word_codes), deferred
# sums: fp8 29, int8 32, int4 34 (44 and 41 with codes loaded as bytes, fp8 33 with words split);
# capped at 200 registers (5 programs per SM: 10 warps; 5 x 43 KiB of shared memory), no deferred
# sums: fp8 32, int8 34, int4 37, spilling 0 / 104 / 168 bytes. 1 warp and 128-token tiles spill more.
QUANT_DECODE_SWEEP = tuple(QuantDecodeConfig(*c) for c in (
    # block_n, warps, stages, programs/SM, cvt, max_regs, halves, min_split_tiles, prefetch, words, deferred_sums
    (32, 4, 2, 4, 2, None), (64, 4, 2, 4, 2, 128), (64, 4, 2, 4, 2, 128, True), (64, 4, 2, 4, 2, 128, False, 4),
    (64, 4, 3, 4, 2, 128, True), (32, 4, 3, 4, 2, 128, True),
    (32, 4, 2, 4, 2, 128, True, 1, 1, 2), (64, 4, 2, 4, 2, 128, True, 1, 1, 2), (32, 4, 3, 4, 2, 128, True, 1, 1, 2),
    (32, 4, 1, 4, 2, 128, True, 1, 2, 2), (64, 4, 2, 3, 2, 128, True, 1, 1, 2),
    (32, 4, 2, 4, 2, 128, True, 1, 1, 2, True), (32, 4, 1, 4, 2, 128, True, 1, 2, 2, True),
    (64, 2, 2, 4, 2, None, True, 1, 1, 2), (64, 2, 2, 4, 1, None, True, 1, 1, 2),
    (64, 2, 2, 4, 1, None, True, 1, 1, 2, True), (64, 2, 2, 4, 2, None, True, 1, 0, 0, True),
    (64, 2, 2, 5, 1, 200, True, 1, 1, 2),
))


def sweep_configs(kind: str) -> list[QuantDecodeConfig]:
    """QUANT_DECODE_SWEEP for format `kind`, without the duplicates cvt (fp8: only words with cvt 1
    differ) and halves (fp8, int4) make."""
    seen: dict[QuantDecodeConfig, None] = {}
    for c in QUANT_DECODE_SWEEP:
        if kind != "int8":
            c = replace(c, halves=False, cvt=c.cvt if kind != "fp8" or (c.cvt == 1 and c.words) else 2)
        seen.setdefault(c)
    return list(seen)


def quant_decode_config(kind: str, device: torch.device) -> QuantDecodeConfig:
    """The table's launch of format `kind` on `device` (shapes only: fixed per device, as CUDA
    graphs need). Under the interpreter byte permutes (inline PTX) become the or of 0x6400,
    the same arithmetic."""
    family = "default"
    if _compiled(device):
        family = _gpu_family(device.index if device.index is not None else
                             torch.cuda.current_device() if device.type == "cuda" else 0)
    config = QUANT_DECODE_CONFIGS.get(family, {}).get(kind) or QUANT_DECODE_CONFIGS["default"][kind]
    return config if _compiled(device) or config.cvt != 1 else replace(config, cvt=2)


# The prefill converts codes by the or of 0x6400 everywhere: the arithmetic the interpreter
# checks (the decode sweep checks cvt 1, the byte permutes, per GPU).
_PREFILL_CVT = 2
# Columns of the prefill's tiles of int8 / int4 codes, at least (padding columns are masked: code
# 0, query and rotation columns 0). Its dots have 64 rows, so on an H100 they are wgmma; the
# int4 prefill at head_dim 64, the one launch whose wgmma tiles were 32 columns wide (64-byte
# swizzled operands), gave all-NaN outputs on an H100 with triton 3.6 with either code
# conversion, where every launch with 64 columns or more (int8 at head_dim 64, int4 at 128, the
# same kernel) and the interpreter's same arithmetic were right. At 64 its dots have the shapes
# and layouts of int8 at head_dim 64.
_PREFILL_MIN_BLOCK_C = 64
# Below this head_dim the int4 prefill multiplies in IEEE float32 (no tensor cores): on an H100
# with triton 3.6 its 16-bit wgmma launches at head_dim 16 and 32 (8 and 16 code columns per
# half, padded to 64) gave wrong rows (up to 3.6e3 off; compute-sanitizer memcheck clean), and in
# the engine, on the tiny models, an illegal memory access further on; int8 and fp8 at the same
# head_dims, int4 at 64 and 128, the decode kernel and the interpreter were right. Real models'
# head_dims are 64 or more; the tiny test models' is 16.
_PREFILL_INT4_MIN_HEAD_DIM = 64


def _cvt(cvt: int, geometry: dict) -> int:
    """The code conversion a launch uses: `cvt`, but 0 (no offset) for products in IEEE float32,
    where the offset of 1024 would cost more than float32's rounding (a float32 model)."""
    return 0 if geometry["IEEE"] else cvt


def _words(words: int, geometry: dict) -> int:
    """The code loads a launch uses: `words` (QuantDecodeConfig), but bytes (0) where a row's codes
    of one (token, head), or int8's halves of them, are not whole 32-bit words (the same arithmetic)."""
    return words if geometry["CODE_DIM"] % 4 == 0 and geometry["TILE_C"] % 4 == 0 else 0


def _block_c(code_dim: int) -> int:
    """Columns of a tile of codes: a power of two, and >= 16 (the K of tl.dot)."""
    return max(16, next_pow2(code_dim))


def _quant_args(q: torch.Tensor, cache: attention.QuantizedKVCache, layer: int, halves: bool = False,
                ieee: bool = False) -> tuple:
    """Checks, and the arguments both quantized kernels take after q: rows, the rows as 16-bit
    scale data, this layer's staging view, the rotation, and the geometry (`halves`: int8 codes
    in two tiles of D / 2 columns, see _quant_tile; `ieee`: products over codes in IEEE float32
    whatever the model dtype)."""
    spec = cache.spec
    rows, staging = cache.blocks, cache.staging
    if q.dim() != 3 or q.dtype not in _FLOAT_DTYPES or staging.dtype not in _FLOAT_DTYPES:
        raise ConfigError(f"queries must be float [T, H, D] and staging float, got {q.dtype} {tuple(q.shape)} "
                          f"and {staging.dtype}")
    if q.shape[-1] != spec.head_dim or q.shape[-2] % spec.num_kv_heads:
        raise ConfigError(f"queries {tuple(q.shape)} do not fit {spec.num_kv_heads} kv heads of head_dim {spec.head_dim}")
    if not 0 <= layer < spec.num_layers:
        raise ConfigError(f"layer {layer} out of range for {spec.num_layers} layers", key="layer")
    quant.check_rows(rows, spec)
    if spec.block_size & (spec.block_size - 1):
        raise ConfigError(f"the quantized kernels take power-of-two block sizes, got {spec.block_size}", key="block_size")
    if not rows.is_contiguous() or rows.data_ptr() % 16 or q.device != rows.device or staging.device != rows.device:
        raise ConfigError("quantized rows must be contiguous, 16-byte aligned and on the queries' device")
    ieee = ieee or staging.dtype == torch.float32  # products over codes: float16 unless the model is float32
    dt = torch.float32 if ieee else torch.float16
    had = quant.hadamard(spec.head_dim, q.device, dt) if spec.rotated else rows  # rows: a placeholder, never read
    st = staging[:, layer]  # [num_staging, 2, bs, Hkv, D]
    if st.stride(-1) != 1:
        raise ConfigError("staging blocks must be contiguous along head_dim")
    strides = (st.stride(0), st.stride(1), st.stride(2), st.stride(3))
    tile_c = spec.head_dim // 2 if halves and spec.kind == "int8" and spec.head_dim % 2 == 0 else spec.code_dim
    geometry = dict(
        KIND=_KINDS[spec.kind], NUM_KV_HEADS=spec.num_kv_heads, HEAD_DIM=spec.head_dim,
        BLOCK_D=next_pow2(spec.head_dim), CODE_DIM=spec.code_dim, TILE_C=tile_c, BLOCK_C=_block_c(tile_c),
        BLOCK_SIZE=spec.block_size, HP_INV=1.0 / spec.hadamard_order, IEEE=ieee, FP_IEEE=_ieee(staging.dtype, q.device),
    )  # fmt: skip
    return (rows, rows.view(spec.scale_dtype), st, had), strides, geometry


def paged_decode_attention_quantized(
    q: torch.Tensor,
    cache: attention.QuantizedKVCache,
    layer: int,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    sliding_window: int | None = None,
    scale: float | None = None,
    *,
    num_splits: int | None = None,
    config: QuantDecodeConfig | None = None,
) -> torch.Tensor:
    """As afkv.ops.attention.paged_decode_attention_quantized: q [B, H, D] over a quantized
    device tier through block_tables int [B, nb] (a row's quantized blocks first, then at most
    cache.max_tail_blocks staging blocks; padding never read), context_lens int [B] -> [B, H, D]
    of q.dtype (zeros where context_len is 0). `num_splits` and `config` override the split-K
    heuristic and the launch table QUANT_DECODE_CONFIGS (tests, the kernel sweep)."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [B, H, D]
    _decode_quantized(q, cache, layer, block_tables, context_lens, sliding_window, scale, num_splits, config, out,
                      None)
    return out


def paged_decode_partial_quantized(q: torch.Tensor, cache: attention.QuantizedKVCache, layer: int,
                                   block_tables: torch.Tensor, context_lens: torch.Tensor, *,
                                   num_splits: int | None = None) -> attention.Partial:
    """As afkv.ops.attention.paged_decode_partial_quantized: the quantized decode (no sliding
    window) as a Partial (output and log-sum-exp [B, H], float32). Streamed contexts run it over
    a ring slot of one-layer rows (afkv.kv.stream): the codes are read in place, never dequantized."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)  # [B, H, D]
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)  # [B, H]
    _decode_quantized(q, cache, layer, block_tables, context_lens, None, None, num_splits, None, out, lse)
    return attention.Partial(out, lse)


def _decode_quantized(q: torch.Tensor, cache: attention.QuantizedKVCache, layer: int, block_tables: torch.Tensor,
                      context_lens: torch.Tensor, sliding_window: int | None, scale: float | None,
                      num_splits: int | None, config: QuantDecodeConfig | None, out: torch.Tensor,
                      lse: torch.Tensor | None) -> None:
    """paged_decode_attention_quantized into `out` [B, H, D] (and each row's log-sum-exp into `lse`)."""
    batch, num_heads, head_dim = q.shape
    config = config or quant_decode_config(cache.spec.kind, q.device)
    ptrs, strides, geometry = _quant_args(q, cache, layer, config.halves)
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or tuple(context_lens.shape) != (batch,):
        raise ConfigError(f"block_tables must be [{batch}, nb] and context_lens [{batch}], "
                          f"got {tuple(block_tables.shape)} and {tuple(context_lens.shape)}")
    spec = cache.spec
    max_blocks = block_tables.shape[1]
    if batch == 0 or max_blocks == 0:
        out.zero_()
        if lse is not None:
            lse.fill_(float("-inf"))
        return
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    context_lens = context_lens if context_lens.stride(0) == 1 else context_lens.contiguous()  # read as [B]
    if config.cvt == 1 and not _compiled(q.device):
        raise ConfigError("cvt 1 (inline PTX) runs only compiled for CUDA")
    block_n = max(config.block_n, spec.block_size)
    max_tokens = max_blocks * spec.block_size
    if num_splits is None:
        num_splits = num_decode_splits(batch, spec.num_kv_heads, _device_index(q), config.programs_per_sm)
    mid_o, mid_lse = _partials(batch, num_heads, num_splits + 1, head_dim, q.device)
    group = num_heads // spec.num_kv_heads
    softmax_scale = head_dim**-0.5 if scale is None else scale
    _decode_quant_kernel[(batch, spec.num_kv_heads, num_splits + 1)](
        q, *ptrs, block_tables, context_lens, out, mid_o, mid_lse,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), *strides,
        cache.num_blocks, spec.row_nbytes, layer * spec.layer_nbytes, num_heads, max_tokens, sliding_window or 0,
        softmax_scale * _LOG2E,
        GROUP=group, GROUP_ROWS=_group_rows(group), BLOCK_N=block_n,
        BLOCK_N_TAIL=_decode_block_n(head_dim, cache.staging.element_size()), NUM_SPLITS=num_splits,
        MAX_TAIL=cache.max_tail_blocks, TAIL_P2=next_pow2(cache.max_tail_blocks), MIN_TILES=config.min_split_tiles,
        HAS_WINDOW=sliding_window is not None, CVT=_cvt(config.cvt, geometry), PREFETCH=config.prefetch,
        WORDS=_words(config.words, geometry), DEFER=config.deferred_sums,
        **geometry, num_warps=config.num_warps, num_stages=config.num_stages, maxnreg=config.max_regs,
    )  # fmt: skip
    _merge(mid_o, mid_lse, out, num_splits + 1, lse)


def paged_prefill_attention_quantized(
    q: torch.Tensor,
    cache: attention.QuantizedKVCache,
    layer: int,
    block_ids: torch.Tensor,
    context_len: int,
    sliding_window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """As afkv.ops.attention.paged_attention_quantized: q [n, H, D], the queries of positions
    context_len - n .. context_len - 1 of one sequence whose table block_ids int [nb] lists its
    quantized blocks first, then its staging blocks (this chunk's own among them) -> [n, H, D]."""
    spec = cache.spec
    if block_ids.dim() != 1 or not q.shape[0] <= context_len <= block_ids.shape[0] * spec.block_size:
        raise ConfigError(f"{q.shape[0]} new queries, context_len {context_len} and {tuple(block_ids.shape)} blocks "
                          f"do not fit")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [n, H, D]
    _prefill_quantized(q, cache, layer, block_ids, context_len, sliding_window, scale, out)
    return out


def paged_prefill_partial_quantized(q: torch.Tensor, cache: attention.QuantizedKVCache, layer: int,
                                    block_ids: torch.Tensor, context_len: int, causal: bool = True) -> attention.Partial:
    """As afkv.ops.attention.paged_attention_partial_quantized: paged_prefill_partial over a
    quantized cache (causal: a device tier's chunk; else a streamed ring slot of one-layer
    rows, every key before every query): codes read in place, the query and output rotated
    in the kernel for int8 / int4, as the quantized prefill."""
    n = q.shape[0]
    _check_part(n, context_len, block_ids, cache.spec.block_size, causal)
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)  # [n, H, D]
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)  # [n, H]
    _prefill_quantized(q, cache, layer, block_ids, context_len, None, None, out, lse, causal)
    return attention.Partial(out, lse)


def _prefill_quantized(q: torch.Tensor, cache: attention.QuantizedKVCache, layer: int, block_ids: torch.Tensor,
                       context_len: int, sliding_window: int | None, scale: float | None, out: torch.Tensor,
                       lse: torch.Tensor | None = None, causal: bool = True) -> None:
    """The quantized prefill kernel into `out` [n, H, D] (and each row's log-sum-exp into `lse`
    [n, H] float32); causal False: every query sees the whole context (no window then)."""
    n, num_heads, head_dim = q.shape
    small_int4 = cache.spec.kind == "int4" and cache.spec.head_dim < _PREFILL_INT4_MIN_HEAD_DIM  # on every device: one arithmetic
    ptrs, strides, geometry = _quant_args(q, cache, layer, ieee=small_int4)
    spec = cache.spec
    if n == 0:
        return
    if block_ids.shape[0] == 0:  # nothing to attend (a part with no key)
        out.zero_()
        if lse is not None:
            lse.fill_(float("-inf"))
        return
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_ids = block_ids if block_ids.stride(-1) == 1 else block_ids.contiguous()
    cu_seqlens, context_lens = _one_sequence(n, context_len, q.device)
    group = num_heads // spec.num_kv_heads
    block_m, tokens_m = _prefill_tiles(group)
    softmax_scale = head_dim**-0.5 if scale is None else scale
    if geometry["KIND"] != _KINDS["fp8"] and not geometry["IEEE"]:  # tensor-core products over rotated codes
        geometry["BLOCK_C"] = max(geometry["BLOCK_C"], _PREFILL_MIN_BLOCK_C)
    _prefill_quant_kernel[(-(-n // tokens_m), spec.num_kv_heads, 1)](
        q, *ptrs, block_ids, cu_seqlens, context_lens, out, out if lse is None else lse,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), 0 if lse is None else lse.stride(0),
        block_ids.shape[0], *strides,
        cache.num_blocks, spec.row_nbytes, layer * spec.layer_nbytes, block_ids.shape[0] * spec.block_size,
        sliding_window or 0, softmax_scale * _LOG2E,
        GROUP=group, TOKENS_M=tokens_m, BLOCK_M=block_m, BLOCK_N=max(64, spec.block_size), TABLE_CHUNK=128,
        HAS_WINDOW=sliding_window is not None, CVT=_cvt(_PREFILL_CVT, geometry), CAUSAL=causal,
        HAS_LSE=lse is not None, **geometry, num_warps=4, num_stages=2,
    )  # fmt: skip
