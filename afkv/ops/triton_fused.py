"""Fused Triton kernels for the small ops of a decoder layer, behind the API of the torch code
they replace: one launch where the torch composition takes several.

    rms_norm            RMSNorm of each row                          (ref: afkv.ops.layers.rms_norm)
    add_rms_norm        residual add + the next RMSNorm               (ref: ref_add_rms_norm)
    qk_norm_rope_write  split qkv, q/k RMSNorm, rotary, K/V write    (ref: ref_qk_norm_rope_write)
    route_topk          softmax -> top-k (-> renormalise)             (ref: afkv.ops.layers.route_topk)
    silu_mul            silu(gate) * up of a fused gate_up output     (ref: ref_silu_mul)

Benchmarks: afkv.bench.kernels (`afkv bench kernels fused`).

Callers check `available()` and fall back to the references where it is False. The functions
run their kernels on whatever device the tensors are on: CPU tensors run under Triton's
interpreter (TRITON_INTERPRET=1 in the environment before this module is imported), which is
how the CPU tests check them. Importing this module never needs triton.

Every grid depends only on shapes, never on tensor values, and nothing syncs with the host:
the functions can be captured in a CUDA graph (compile them once outside the capture).

Rounding: each kernel computes in float32 and rounds to the tensor dtype exactly where the
torch composition does (torch's 16-bit elementwise ops compute in float32 and round the
result), so 16-bit results match bit for bit except where a float32 intermediate that the
two compute differently (a reduction's order, rsqrt, exp) lies next to a rounding boundary:
then one unit in the last place. bfloat16 is rounded by the kernels themselves (to nearest,
ties to even, on the bits), because the interpreter's float32 -> bfloat16 cast truncates.
Kernels are compiled without FMA contraction (enable_fp_fusion=False), as torch's separate
elementwise kernels compute, and exp is libdevice's expf on CUDA, as torch's.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from afkv.errors import ConfigError
from afkv.ops.launch import next_pow2
from afkv.ops.attention import write_kv
from afkv.ops.layers import Rotary
from afkv.ops.layers import rms_norm as ref_rms_norm

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # the CPU CI: callers use the torch references
    triton = None

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ROUND_NONE, _ROUND_BF16, _ROUND_FP16 = 0, 1, 2  # float32 values rounded to the dtype's grid
_MAX_NORM_DIM = 8192
_MAX_EXPERTS = 512


@functools.cache
def available() -> bool:
    """True when triton imports and torch sees a CUDA device."""
    return triton is not None and torch.cuda.is_available()



def _round_code(dtype: torch.dtype) -> int:
    if dtype not in _FLOAT_DTYPES:
        raise ConfigError(f"fused kernels take float32, float16 or bfloat16 tensors, got {dtype}")
    return {torch.bfloat16: _ROUND_BF16, torch.float16: _ROUND_FP16}.get(dtype, _ROUND_NONE)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last] with a unit stride on the last dim (a view where possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 or x2.shape[-1] == 1 else x2.contiguous()


# ----------------------------------------------------------------------------------------------
# Kernels (defined only where triton imports).


if triton is not None:

    @triton.jit
    def _round(x, ROUND: tl.constexpr):
        """float32 x rounded to bfloat16 / float16 (nearest, ties to even), kept in float32."""
        if ROUND == 1:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            return tl.where(x == x, bits.to(tl.float32, bitcast=True), x)  # NaN stays NaN
        elif ROUND == 2:
            return x.to(tl.float16).to(tl.float32)
        else:
            return x

    @triton.jit
    def _exp(x, LIBDEVICE: tl.constexpr):
        """exp in float32: compiled for CUDA, libdevice's expf (what torch calls; tl.exp is
        ex2.approx of a rounded x * log2(e), off by many ulps for large |x|); tl.exp in the
        interpreter, which has no libdevice (numpy's exp there)."""
        if LIBDEVICE:
            return libdevice.exp(x)
        else:
            return tl.exp(x)

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, delta_ptr, sum_ptr, w_ptr, out_ptr,
        stride_x, stride_delta, stride_sum, stride_out, dim, eps,
        BLOCK: tl.constexpr, HAS_DELTA: tl.constexpr, X_ROUND: tl.constexpr, OUT_ROUND: tl.constexpr,
    ):  # fmt: skip
        """One row per program: [sum = round(x + delta)], out = round(w * round(x * rsqrt(mean(x^2) + eps)))."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < dim
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
        if HAS_DELTA:
            d = tl.load(delta_ptr + row * stride_delta + offs, mask=mask, other=0.0).to(tl.float32)
            x = _round(x + d, X_ROUND)
            tl.store(sum_ptr + row * stride_sum + offs, x.to(sum_ptr.dtype.element_ty), mask=mask)
        inv = tl.rsqrt(tl.sum(x * x, 0) / dim + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = _round(_round(x * inv, X_ROUND) * w, OUT_ROUND)
        tl.store(out_ptr + row * stride_out + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _qk_norm_rope_write_kernel(
        qkv_ptr, q_norm_ptr, k_norm_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr,
        slot_blocks_ptr, slot_offsets_ptr, q_out_ptr,
        stride_qkv, stride_cos, stride_sin, stride_kv_block, stride_kv_tok, stride_kv_head, eps,
        NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, HAS_NORM: tl.constexpr,
        ROUND: tl.constexpr, KV_ROUND: tl.constexpr,
    ):  # fmt: skip
        """Program (t, j): heads j * BLOCK_HEADS ... of token t, counted over q, then k, then v
        heads (their order in qkv). Each head is loaded as its two halves [BLOCK_HEADS, D/2]."""
        HALF: tl.constexpr = HEAD_DIM // 2
        TOTAL: tl.constexpr = NUM_HEADS + 2 * NUM_KV_HEADS
        t = tl.program_id(0).to(tl.int64)
        heads = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)  # [BH]
        offs = tl.arange(0, BLOCK_HALF)
        dmask = offs < HALF
        is_q = heads < NUM_HEADS
        is_v = (heads >= NUM_HEADS + NUM_KV_HEADS) & (heads < TOTAL)
        is_k = (heads >= NUM_HEADS) & (heads < NUM_HEADS + NUM_KV_HEADS)
        mask = (heads < TOTAL)[:, None] & dmask[None, :]  # [BH, HALF]
        src = qkv_ptr + t * stride_qkv + heads[:, None] * HEAD_DIM + offs[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)  # [BH, HALF] first halves
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)  # second halves
        v1, v2 = x1, x2
        if HAS_NORM:
            inv = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / HEAD_DIM + eps)[:, None]  # [BH, 1]
            wq1 = tl.load(q_norm_ptr + offs, mask=dmask, other=0.0).to(tl.float32)[None, :]
            wq2 = tl.load(q_norm_ptr + HALF + offs, mask=dmask, other=0.0).to(tl.float32)[None, :]
            wk1 = tl.load(k_norm_ptr + offs, mask=dmask, other=0.0).to(tl.float32)[None, :]
            wk2 = tl.load(k_norm_ptr + HALF + offs, mask=dmask, other=0.0).to(tl.float32)[None, :]
            x1 = _round(_round(x1 * inv, ROUND) * tl.where(is_q[:, None], wq1, wk1), ROUND)
            x2 = _round(_round(x2 * inv, ROUND) * tl.where(is_q[:, None], wq2, wk2), ROUND)
        c1 = tl.load(cos_ptr + t * stride_cos + offs, mask=dmask, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(cos_ptr + t * stride_cos + HALF + offs, mask=dmask, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(sin_ptr + t * stride_sin + offs, mask=dmask, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(sin_ptr + t * stride_sin + HALF + offs, mask=dmask, other=0.0).to(tl.float32)[None, :]
        # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1); every product and the sum rounded
        r1 = _round(_round(x1 * c1, ROUND) + _round(-x2 * s1, ROUND), ROUND)
        r2 = _round(_round(x2 * c2, ROUND) + _round(x1 * s2, ROUND), ROUND)
        dst_q = q_out_ptr + t * (NUM_HEADS * HEAD_DIM) + heads[:, None] * HEAD_DIM + offs[None, :]
        q_mask = is_q[:, None] & dmask[None, :]
        tl.store(dst_q, r1.to(q_out_ptr.dtype.element_ty), mask=q_mask)
        tl.store(dst_q + HALF, r2.to(q_out_ptr.dtype.element_ty), mask=q_mask)
        block = tl.load(slot_blocks_ptr + t).to(tl.int64)
        slot = block * stride_kv_block + tl.load(slot_offsets_ptr + t).to(tl.int64) * stride_kv_tok
        kv_head = tl.where(is_k, heads - NUM_HEADS, heads - NUM_HEADS - NUM_KV_HEADS)  # [BH]
        kv_offs = slot + kv_head[:, None] * stride_kv_head + offs[None, :]  # [BH, HALF]
        k_mask = is_k[:, None] & dmask[None, :]
        v_mask = is_v[:, None] & dmask[None, :]
        tl.store(k_cache_ptr + kv_offs, _round(r1, KV_ROUND).to(k_cache_ptr.dtype.element_ty), mask=k_mask)
        tl.store(k_cache_ptr + kv_offs + HALF, _round(r2, KV_ROUND).to(k_cache_ptr.dtype.element_ty), mask=k_mask)
        tl.store(v_cache_ptr + kv_offs, _round(v1, KV_ROUND).to(v_cache_ptr.dtype.element_ty), mask=v_mask)
        tl.store(v_cache_ptr + kv_offs + HALF, _round(v2, KV_ROUND).to(v_cache_ptr.dtype.element_ty), mask=v_mask)

    @triton.jit
    def _route_topk_kernel(
        logits_ptr, ids_ptr, weights_ptr, stride_logits, num_experts,
        TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, RENORMALIZE: tl.constexpr,
        LIBDEVICE: tl.constexpr,
    ):  # fmt: skip
        """One token per program: float32 softmax over its experts, then TOP_K rounds of
        (max, lowest index holding it, remove it)."""
        t = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_E)
        mask = offs < num_experts
        x = tl.load(logits_ptr + t * stride_logits + offs, mask=mask, other=float("-inf")).to(tl.float32)
        e = _exp(x - tl.max(x, 0), LIBDEVICE)  # [E]
        p = e / tl.sum(e, 0)
        p = tl.where(p != p, 2.0, p)  # NaN ranks above every probability, as in torch.topk
        p = tl.where(mask, p, -1.0)  # padding is never picked
        offs_k = tl.arange(0, BLOCK_K)
        top_w = tl.zeros([BLOCK_K], tl.float32)
        top_i = tl.zeros([BLOCK_K], tl.int32)
        for j in tl.static_range(TOP_K):
            best = tl.max(p, 0)
            idx = tl.min(tl.where(p == best, offs, BLOCK_E), 0)
            top_w = tl.where(offs_k == j, best, top_w)
            top_i = tl.where(offs_k == j, idx, top_i)
            p = tl.where(offs == idx, -2.0, p)
        top_w = tl.where(top_w > 1.5, float("nan"), top_w)
        if RENORMALIZE:
            top_w = top_w / tl.sum(top_w, 0)
        kmask = offs_k < TOP_K
        tl.store(ids_ptr + t * TOP_K + offs_k, top_i.to(tl.int64), mask=kmask)
        tl.store(weights_ptr + t * TOP_K + offs_k, top_w, mask=kmask)

    @triton.jit
    def _silu_mul_kernel(
        gate_up_ptr, out_ptr, stride_gate_up, stride_out, inter,
        BLOCK: tl.constexpr, ROUND: tl.constexpr, LIBDEVICE: tl.constexpr,
    ):  # fmt: skip
        """Program (n, j): columns j * BLOCK ... of row n: round(round(silu(gate)) * up)."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < inter
        src = gate_up_ptr + row * stride_gate_up + offs
        g = tl.load(src, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
        u = tl.load(src + inter, mask=mask, other=0.0).to(tl.float32)
        y = _round(_round(g / (1.0 + _exp(-g, LIBDEVICE)), ROUND) * u, ROUND)
        tl.store(out_ptr + row * stride_out + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _norm_warps(block: int) -> int:
    return min(16, max(1, block // 512))


# ----------------------------------------------------------------------------------------------
# rms_norm, add_rms_norm


def _check_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    dim = x.shape[-1]
    _round_code(x.dtype)
    _round_code(weight.dtype)
    if tuple(weight.shape) != (dim,):
        raise ConfigError(f"norm weight must be [{dim}], got {tuple(weight.shape)}")
    if dim > _MAX_NORM_DIM:
        raise ConfigError(f"fused rms_norm takes rows of at most {_MAX_NORM_DIM}, got {dim}")
    return torch.promote_types(weight.dtype, x.dtype)


def _launch_norm(x2, delta2, sum2, weight, out2, eps: float) -> None:
    rows, dim = x2.shape
    if rows == 0:
        return
    block = next_pow2(dim)
    has_delta = delta2 is not None
    _rms_norm_kernel[(rows,)](
        x2, delta2 if has_delta else x2, sum2 if has_delta else x2, weight.contiguous(), out2,
        x2.stride(0), delta2.stride(0) if has_delta else 0, sum2.stride(0) if has_delta else 0, out2.stride(0),
        dim, eps,
        BLOCK=block, HAS_DELTA=has_delta, X_ROUND=_round_code(x2.dtype), OUT_ROUND=_round_code(out2.dtype),
        num_warps=_norm_warps(block), enable_fp_fusion=False,
    )  # fmt: skip


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As afkv.ops.layers.rms_norm: x [..., H] (H <= 8192), weight [H] -> [..., H] of the
    promoted dtype of weight and x (x's dtype when they agree)."""
    out_dtype = _check_norm(x, weight)
    x2 = _rows(x)  # [T, H]
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)  # [T, H]
    _launch_norm(x2, None, None, weight, out, eps)
    return out.view(x.shape)


def ref_add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """The torch composition add_rms_norm replaces."""
    h = h + delta
    return h, ref_rms_norm(h, weight, eps)


def add_rms_norm(
    h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next norm in one kernel: h, delta [..., H] of one dtype,
    weight [H] -> (h_new = h + delta [..., H] of h's dtype, rms_norm(h_new, weight, eps))."""
    if delta.shape != h.shape or delta.dtype != h.dtype:
        raise ConfigError(f"delta must match h: {tuple(delta.shape)} {delta.dtype} vs {tuple(h.shape)} {h.dtype}")
    out_dtype = _check_norm(h, weight)
    h2, d2 = _rows(h), _rows(delta)  # [T, H]
    h_new = torch.empty(h2.shape, dtype=h.dtype, device=h.device)  # [T, H]
    normed = torch.empty(h2.shape, dtype=out_dtype, device=h.device)  # [T, H]
    _launch_norm(h2, d2, h_new, weight, normed, eps)
    return h_new.view(h.shape), normed.view(h.shape)


# ----------------------------------------------------------------------------------------------
# qk_norm_rope_write


def ref_qk_norm_rope_write(
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv: torch.Tensor,
    layer: int,
    slot_blocks: torch.Tensor,
    slot_offsets: torch.Tensor,
) -> torch.Tensor:
    """The torch composition qk_norm_rope_write replaces (AttentionSide.attention between the
    qkv projection and the attention call)."""
    nq, nkv = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :nq].view(-1, num_heads, head_dim)  # [T, Hq, D]
    k = qkv[:, nq : nq + nkv].view(-1, num_kv_heads, head_dim)  # [T, Hkv, D]
    v = qkv[:, nq + nkv :].view(-1, num_kv_heads, head_dim)  # [T, Hkv, D]
    if q_norm is not None:
        q = ref_rms_norm(q, q_norm, eps)
        k = ref_rms_norm(k, k_norm, eps)
    q = Rotary.apply(q, cos, sin)
    k = Rotary.apply(k, cos, sin)
    write_kv(kv, layer, slot_blocks, slot_offsets, k, v)
    return q


def qk_norm_rope_write(
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv: torch.Tensor,
    layer: int,
    slot_blocks: torch.Tensor,
    slot_offsets: torch.Tensor,
) -> torch.Tensor:
    """One kernel from the qkv projection to the attention call.

    qkv [T, (Hq + 2 Hkv) * D] (q heads, k heads, v heads); q_norm, k_norm [D] (Qwen3) or both
    None; cos, sin [T, D] of qkv's dtype (Rotary.cos_sin); kv [num_blocks, num_layers, 2,
    block_size, Hkv, D]; slot_blocks, slot_offsets int [T]. Writes the rotated keys and the raw
    values of token t at kv[slot_blocks[t], layer, 0 / 1, slot_offsets[t]] (cast to kv's
    dtype) and returns the rotated queries [T, Hq, D] (contiguous, qkv's dtype). Same result as
    ref_qk_norm_rope_write (torch's rounding in qkv's dtype after every op)."""
    num_tokens = qkv.shape[0]
    total = num_heads + 2 * num_kv_heads
    if qkv.dim() != 2 or qkv.shape[1] != total * head_dim:
        raise ConfigError(
            f"qkv must be [T, {total * head_dim}] for {num_heads}/{num_kv_heads} heads of {head_dim}, "
            f"got {tuple(qkv.shape)}"
        )
    if head_dim % 2:
        raise ConfigError(f"rotary needs an even head_dim, got {head_dim}")
    round_code = _round_code(qkv.dtype)
    kv_round = _round_code(kv.dtype)
    if (q_norm is None) != (k_norm is None):
        raise ConfigError("q_norm and k_norm come together")
    for name, w in (("q_norm", q_norm), ("k_norm", k_norm)):
        if w is not None and (tuple(w.shape) != (head_dim,) or w.dtype != qkv.dtype):
            raise ConfigError(f"{name} must be [{head_dim}] of {qkv.dtype}, got {tuple(w.shape)} {w.dtype}")
    for name, c in (("cos", cos), ("sin", sin)):
        if tuple(c.shape) != (num_tokens, head_dim) or c.dtype != qkv.dtype:
            raise ConfigError(
                f"{name} must be [{num_tokens}, {head_dim}] of {qkv.dtype}, got {tuple(c.shape)} {c.dtype}"
            )
    if kv.dim() != 6 or kv.shape[2] != 2 or tuple(kv.shape[4:]) != (num_kv_heads, head_dim) or kv.stride(-1) != 1:
        raise ConfigError(
            f"kv must be [num_blocks, num_layers, 2, block_size, {num_kv_heads}, {head_dim}] with unit stride on the "
            f"last dim, got {tuple(kv.shape)}"
        )
    if tuple(slot_blocks.shape) != (num_tokens,) or tuple(slot_offsets.shape) != (num_tokens,):
        raise ConfigError(f"slot_blocks and slot_offsets must be [{num_tokens}]")
    q_out = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)  # [T, Hq, D]
    if num_tokens == 0:
        return q_out
    qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    k_cache, v_cache = kv[:, layer, 0], kv[:, layer, 1]  # [num_blocks, bs, Hkv, D]
    block_half = next_pow2(head_dim // 2)
    block_heads = min(next_pow2(total), max(1, 512 // block_half))
    has_norm = q_norm is not None
    grid = (num_tokens, -(-total // block_heads))
    _qk_norm_rope_write_kernel[grid](
        qkv, q_norm.contiguous() if has_norm else qkv, k_norm.contiguous() if has_norm else qkv, cos, sin,
        k_cache, v_cache, slot_blocks.contiguous(), slot_offsets.contiguous(), q_out,
        qkv.stride(0), cos.stride(0), sin.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), eps,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_HALF=block_half,
        BLOCK_HEADS=block_heads, HAS_NORM=has_norm, ROUND=round_code, KV_ROUND=kv_round, num_warps=4,
        enable_fp_fusion=False,
    )  # fmt: skip
    return q_out


# ----------------------------------------------------------------------------------------------
# route_topk, silu_mul


def route_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """As afkv.ops.layers.route_topk: logits [T, E] (E <= 512) -> (ids [T, k] int64, weights
    [T, k] float32), in descending order of probability; equal probabilities are taken lowest
    expert id first (torch.topk leaves their order unspecified). A row with a NaN yields NaN
    weights and ids in range."""
    num_tokens, num_experts = router_logits.shape
    _round_code(router_logits.dtype)
    if num_experts > _MAX_EXPERTS or not 1 <= top_k <= num_experts:
        raise ConfigError(f"route_topk takes 1 <= top_k <= E <= {_MAX_EXPERTS}, got top_k {top_k} of {num_experts}")
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=router_logits.device)  # [T, k]
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)  # [T, k]
    if num_tokens == 0:
        return ids, weights
    logits = _rows(router_logits)
    _route_topk_kernel[(num_tokens,)](
        logits, ids, weights, logits.stride(0), num_experts,
        TOP_K=top_k, BLOCK_E=next_pow2(num_experts), BLOCK_K=next_pow2(top_k), RENORMALIZE=renormalize,
        LIBDEVICE=logits.is_cuda,
        num_warps=4 if num_experts > 128 else 1, enable_fp_fusion=False,
    )  # fmt: skip
    return ids, weights


def ref_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """The torch composition silu_mul replaces."""
    gate, up = gate_up.chunk(2, dim=-1)  # [N, I] each
    return F.silu(gate) * up


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [N, 2I] (gate columns, then up columns) -> silu(gate) * up [N, I] of its dtype."""
    num_rows, two_inter = gate_up.shape
    if two_inter % 2:
        raise ConfigError(f"gate_up must have an even number of columns, got {two_inter}")
    inter = two_inter // 2
    out = torch.empty(num_rows, inter, dtype=gate_up.dtype, device=gate_up.device)  # [N, I]
    if num_rows == 0 or inter == 0:
        return out
    gate_up = _rows(gate_up)
    block = min(next_pow2(inter), 1024)
    _silu_mul_kernel[(num_rows, -(-inter // block))](
        gate_up, out, gate_up.stride(0), out.stride(0), inter,
        BLOCK=block, ROUND=_round_code(gate_up.dtype), LIBDEVICE=gate_up.is_cuda, num_warps=4,
        enable_fp_fusion=False,
    )  # fmt: skip
    return out
