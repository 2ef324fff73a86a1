"""Attention over the paged KV cache (torch reference; runs on CPU and GPU).

KV cache layout (owned by afkv.kv): kv[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim],
index 0 of dim 2 = keys, 1 = values. A sequence's tokens live in the blocks of its block table,
token t at (block_table[t // block_size], t % block_size). Attention reads exactly the
sequence's tokens: no padding, no other sequence's blocks. With KV pruning (afkv.kv.pruning)
"token t" is the sequence's t-th cached token (its slot), not its position: keys keep the
rotation of their true position, and causality by slot equals causality by position.

Quantized device tier (`[kv] device_format` fp8/int8/int4): `QuantizedKVCache` holds full blocks
as quantized rows (afkv.ops.quant) and recent tokens in full-precision staging blocks; the
`*_quantized` functions here are the torch references (the context dequantized into a scratch
buffer, then attended); afkv.ops.triton_attention reads the rows in place (afkv.ops.kernels
picks one per device). MLA latent caches use the same container with a LatentQuantSpec
(afkv.ops.mla).

Streamed contexts (afkv.kv.stream): `attention_partial` attends one part of a query's keys and
keeps its log-sum-exp; `merge_partials` combines parts of disjoint keys exactly (the device
blocks of a sequence and the blocks streamed from host memory are two such parts).

Key mass (H2O): `paged_attention(..., key_mass=m)` also adds, to each cached token's entry of
m [num_blocks, block_size] float32, the attention probability it received from this call's
queries, summed over query heads and queries (the caller sums over layers). It then computes
attention explicitly (one softmax gives both the output and the mass).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from afkv.ops.quant import LatentQuantSpec, QuantSpec, dequantize_layers


def write_kv(
    kv: torch.Tensor, layer: int, slot_blocks: torch.Tensor, slot_offsets: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Store new keys/values: k, v [T, Hkv, D] at (slot_blocks[t], slot_offsets[t]) of `layer`."""
    kv[slot_blocks, layer, 0, slot_offsets] = k.to(kv.dtype)
    kv[slot_blocks, layer, 1, slot_offsets] = v.to(kv.dtype)


def gather_kv(kv: torch.Tensor, layer: int, block_ids: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> keys, values [num_tokens, Hkv, D] of one sequence, read through its block table."""
    blocks = kv[block_ids, layer]  # [nb, 2, bs, Hkv, D]
    k = blocks[:, 0].flatten(0, 1)[:num_tokens]  # [N, Hkv, D]
    v = blocks[:, 1].flatten(0, 1)[:num_tokens]  # [N, Hkv, D]
    return k, v


def paged_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    layer: int,
    block_ids: torch.Tensor,
    context_len: int,
    sliding_window: int | None = None,
    key_mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of one sequence's new queries over its cached context.

    q [n, H, D] are the queries of slots context_len - n .. context_len - 1 (their
    keys/values are already written). Returns [n, H, D]. key_mass: see the module docstring.
    """
    n, num_heads, head_dim = q.shape
    k, v = gather_kv(kv, layer, block_ids, context_len)  # [N, Hkv, D]
    q_pos = torch.arange(context_len - n, context_len, device=q.device)  # [n]
    k_pos = torch.arange(context_len, device=q.device)  # [N]
    mask = k_pos[None, :] <= q_pos[:, None]  # [n, N]
    if sliding_window is not None:
        mask &= (q_pos[:, None] - k_pos[None, :]) < sliding_window
    if key_mass is not None:
        out, mass = _attention_and_mass(q, k, v, mask)  # [n, H, D], [N]
        bs = kv.shape[3]
        slots = (block_ids[:, None] * bs + torch.arange(bs, device=block_ids.device)).flatten()[:context_len]  # [N]
        key_mass.view(-1).index_add_(0, slots, mass)
        return out
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).to(k.dtype), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, enable_gqa=True
    )  # [H, n, D]
    return out.transpose(0, 1).to(q.dtype)


def _attention_and_mass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [n, H, D], k, v [N, Hkv, D], mask [n, N] -> output [n, H, D] and the probability mass
    each key received [N] float32 (summed over heads and queries)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    rep = num_heads // k.shape[1]
    kh = k.transpose(0, 1).repeat_interleave(rep, 0).float()  # [H, N, D]
    vh = v.transpose(0, 1).repeat_interleave(rep, 0).float()  # [H, N, D]
    logits = q.transpose(0, 1).float() @ kh.transpose(1, 2) * head_dim**-0.5  # [H, n, N]
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1)  # [H, n, N]
    out = probs @ vh  # [H, n, D]
    return out.transpose(0, 1).to(q.dtype), probs.sum((0, 1))


# ---- partial attention and its log-sum-exp merge (streamed contexts: afkv.kv.stream) ----------

LOGITS_BUDGET = 2**26  # float32 logits per matmul of attention_partial (256 MiB)
MAX_KEY_CHUNK = 32768  # keys per matmul of attention_partial at most (its float32 copy of K and V)
MIN_KEY_CHUNK = 1024  # and at least


@dataclass(frozen=True)
class Partial:
    """Attention of queries over one part of their keys: the normalised output and the
    log-sum-exp of the scaled logits, float32. Parts of disjoint keys merge exactly."""

    out: torch.Tensor  # [n, H, D] float32
    lse: torch.Tensor  # [n, H] float32 (-inf where the part held no key visible to the query)


def attention_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> Partial:
    """q [n, H, D] over k, v [N, Hkv, D] (GQA: H a multiple of Hkv). causal: query i is the token
    at key index N - n + i and sees keys up to it; else every key is visible. Keys are taken a
    chunk at a time (online softmax; LOGITS_BUDGET, MAX_KEY_CHUNK), so memory does not grow with N."""
    n, num_heads, head_dim = q.shape
    num_keys, num_kv = k.shape[0], k.shape[1]
    rep = num_heads // num_kv
    qg = (q.float() * head_dim**-0.5).view(n, num_kv, rep, head_dim).permute(1, 2, 0, 3).reshape(num_kv, rep * n, head_dim)  # [Hkv, rep*n, D]
    q_idx = (torch.arange(n, device=q.device) + num_keys - n).repeat(rep)  # [rep*n] key index of each query row
    m = torch.full((num_kv, rep * n), float("-inf"), device=q.device)  # [Hkv, rep*n] running max
    s = torch.zeros((num_kv, rep * n), device=q.device)  # [Hkv, rep*n] running sum of exp
    acc = torch.zeros((num_kv, rep * n, head_dim), device=q.device)  # [Hkv, rep*n, D]
    chunk = max(MIN_KEY_CHUNK, min(MAX_KEY_CHUNK, LOGITS_BUDGET // (num_heads * n)))
    for a in range(0, num_keys, chunk):
        kc = k[a : a + chunk].float().transpose(0, 1)  # [Hkv, c, D]
        vc = v[a : a + chunk].float().transpose(0, 1)  # [Hkv, c, D]
        logits = qg @ kc.transpose(1, 2)  # [Hkv, rep*n, c]
        if causal:
            k_idx = torch.arange(a, a + kc.shape[1], device=q.device)  # [c]
            logits = logits.masked_fill(k_idx[None, None, :] > q_idx[None, :, None], float("-inf"))
        m_new = torch.maximum(m, logits.amax(-1))  # [Hkv, rep*n]
        base = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows with nothing visible yet
        p = torch.exp(logits - base[..., None])  # [Hkv, rep*n, c]
        scale = torch.exp(m - base)  # [Hkv, rep*n]
        s = s * scale + p.sum(-1)
        acc = acc * scale[..., None] + p @ vc
        m = m_new
    out = acc / torch.where(s > 0, s, torch.ones_like(s))[..., None]  # [Hkv, rep*n, D]
    lse = torch.where(s > 0, m + torch.log(s), torch.full_like(s, float("-inf")))  # [Hkv, rep*n]
    out = out.view(num_kv, rep, n, head_dim).permute(2, 0, 1, 3).reshape(n, num_heads, head_dim)  # [n, H, D]
    return Partial(out, lse.view(num_kv, rep, n).permute(2, 0, 1).reshape(n, num_heads))


def merge_partials(parts: list[Partial]) -> Partial:
    """Attention over the union of the parts' (disjoint) keys (log-sum-exp weights)."""
    lse = torch.stack([p.lse for p in parts])  # [P, n, H]
    total = torch.logsumexp(lse, 0)  # [n, H]
    safe = torch.where(torch.isinf(total), torch.zeros_like(total), total)  # no key anywhere: weights 0
    weights = torch.exp(lse - safe)  # [P, n, H]; a part with no visible key weighs 0
    out = sum(w[..., None] * p.out for w, p in zip(weights, parts))  # [n, H, D]
    return Partial(out, total)


def paged_attention_partial(q: torch.Tensor, kv: torch.Tensor, layer: int, block_ids: torch.Tensor,
                            context_len: int, causal: bool = True) -> Partial:
    """paged_attention's causal attention (no sliding window) as a Partial, to merge with other
    parts; causal False: every query sees all context_len keys (a part that precedes them all)."""
    k, v = gather_kv(kv, layer, block_ids, context_len)  # [N, Hkv, D]
    return attention_partial(q, k, v, causal)


def paged_decode_partial(q: torch.Tensor, kv: torch.Tensor, layer: int, block_tables: torch.Tensor,
                         context_lens: torch.Tensor) -> Partial:
    """paged_decode_attention (no sliding window) as a Partial: q [B, H, D] -> output [B, H, D]
    and log-sum-exp [B, H], float32 (-inf and zeros where context_len is 0)."""
    bsz, num_heads, head_dim = q.shape
    _, nb = block_tables.shape
    blocks = kv[block_tables, layer]  # [B, nb, 2, bs, Hkv, D]
    visible = torch.arange(nb * blocks.shape[3], device=q.device)[None, :] < context_lens[:, None]  # [B, N]
    blocks = torch.where(visible.view(bsz, nb, 1, -1, 1, 1), blocks, torch.zeros((), dtype=blocks.dtype,
                                                                                  device=q.device))  # as paged_decode_attention
    k = blocks[:, :, 0].flatten(1, 2).float()  # [B, N, Hkv, D]
    v = blocks[:, :, 1].flatten(1, 2).float()
    num_kv = k.shape[2]
    qg = q.float().view(bsz, num_kv, num_heads // num_kv, head_dim) * head_dim**-0.5  # [B, Hkv, rep, D]
    logits = torch.einsum("bgrd,bngd->bgrn", qg, k)  # [B, Hkv, rep, N]
    logits = logits.masked_fill(~visible[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(logits, -1)  # [B, Hkv, rep]
    probs = torch.exp(logits - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    out = torch.einsum("bgrn,bngd->bgrd", probs, v)  # [B, Hkv, rep, D]
    return Partial(out.reshape(bsz, num_heads, head_dim), lse.reshape(bsz, num_heads))


def paged_decode_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One new query per sequence, all sequences at once.

    q [B, H, D]; block_tables [B, nb] (rows padded with any valid block id); context_lens [B]
    (the query is the token at position context_len - 1). Keys past a sequence's context are
    masked out, so they take no part in its result. Returns [B, H, D]."""
    bsz, nb = block_tables.shape
    blocks = kv[block_tables, layer]  # [B, nb, 2, bs, Hkv, D]
    k_pos = torch.arange(nb * blocks.shape[3], device=q.device)  # [N]
    mask = k_pos[None, :] < context_lens[:, None]  # [B, N]
    if sliding_window is not None:
        mask &= (context_lens[:, None] - 1 - k_pos[None, :]) < sliding_window
    # slots past a row's context hold whatever their block held: zeroed, so that none is NaN (a
    # masked score of a NaN key, or a weight 0 on a NaN value, would still give NaN)
    blocks = torch.where(mask.view(bsz, nb, 1, -1, 1, 1), blocks, torch.zeros((), dtype=blocks.dtype, device=q.device))
    k = blocks[:, :, 0].flatten(1, 2)  # [B, N, Hkv, D]
    v = blocks[:, :, 1].flatten(1, 2)
    out = F.scaled_dot_product_attention(
        q[:, :, None].to(k.dtype), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :], enable_gqa=True
    )  # [B, H, 1, D]
    return out[:, :, 0].to(q.dtype)


# ---- a quantized device tier ----------------------------------------------------------------


@dataclass(frozen=True)
class QuantizedKVCache:
    """What attention reads when the device tier stores full blocks as fp8 / int8 / int4 rows
    (afkv.ops.quant) and each sequence's most recent tokens in full precision.

    Block ids of a block table name one of two places: id < num_blocks is row `id` of `blocks`
    (a full block, quantized); id = num_blocks + s is full-precision staging block `staging[s]`.
    New keys/values are always written to staging blocks. In every table the quantized blocks
    come first and the staging blocks last (afkv.kv.manager keeps it so), and a decode row has
    at most `max_tail_blocks` staging blocks: the fixed bound of the tail the decode kernel reads.
    """

    blocks: torch.Tensor  # uint8 [num_blocks, spec.row_nbytes]
    staging: torch.Tensor  # [num_staging, *block_shape] of the model dtype ([.., L, 2, bs, Hkv, D]; MLA [.., L, bs, Dl])
    spec: QuantSpec | LatentQuantSpec
    max_tail_blocks: int

    @property
    def num_blocks(self) -> int:
        return self.blocks.shape[0]

    @property
    def device(self) -> torch.device:
        return self.blocks.device


def gather_layer(cache: QuantizedKVCache, layer: int, block_ids: torch.Tensor) -> torch.Tensor:
    """Layer `layer` of the blocks block_ids [*] -> [*, 2, bs, Hkv, D] of the staging dtype:
    quantized rows dequantized, staging blocks copied (no host synchronisation). The torch
    reference's scratch buffer."""
    nb, dtype = cache.num_blocks, cache.staging.dtype
    flat = block_ids.reshape(-1)  # [n]
    deq = dequantize_layers(cache.blocks[flat.clamp(max=nb - 1)], cache.spec, dtype, layer)  # [n, 2, bs, Hkv, D]
    fp = cache.staging[(flat - nb).clamp(min=0), layer]  # [n, 2, bs, Hkv, D]
    out = torch.where((flat < nb).view(-1, 1, 1, 1, 1), deq, fp)
    return out.view(*block_ids.shape, *out.shape[1:])


def paged_attention_quantized(q: torch.Tensor, cache: QuantizedKVCache, layer: int, block_ids: torch.Tensor,
                              context_len: int, sliding_window: int | None = None) -> torch.Tensor:
    """paged_attention over a quantized device tier (the torch reference of afkv.ops.triton_attention's
    kernel): q [n, H, D] -> [n, H, D]; the sequence's blocks of this layer are dequantized into a
    scratch buffer first."""
    scratch = gather_layer(cache, layer, block_ids)[:, None]  # [nb, 1, 2, bs, Hkv, D]
    ids = torch.arange(block_ids.shape[0], device=q.device)  # [nb]
    return paged_attention(q, scratch, 0, ids, context_len, sliding_window)


def paged_decode_attention_quantized(q: torch.Tensor, cache: QuantizedKVCache, layer: int, block_tables: torch.Tensor,
                                     context_lens: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """paged_decode_attention over a quantized device tier (the torch reference of the fused
    kernel): q [B, H, D]; block_tables [B, nb] (padded with any valid id); context_lens [B] ->
    [B, H, D]; the rows are dequantized into a scratch buffer."""
    batch, width = block_tables.shape
    scratch = gather_layer(cache, layer, block_tables).flatten(0, 1)[:, None]  # [B * nb, 1, 2, bs, Hkv, D]
    ids = torch.arange(batch * width, device=q.device).view(batch, width)  # [B, nb]
    return paged_decode_attention(q, scratch, 0, ids, context_lens, sliding_window)


QUANT_PART_BLOCKS = 4096  # blocks of a part before every query dequantized at a time (the reference's scratch)


def paged_attention_partial_quantized(q: torch.Tensor, cache: QuantizedKVCache, layer: int, block_ids: torch.Tensor,
                                      context_len: int, causal: bool = True) -> Partial:
    """paged_attention_partial over a quantized cache (the torch reference of the fused kernel's
    prefill partial): the blocks are dequantized into a scratch buffer first (int8 / int4
    rotated back: the query and output stay in the model's channels). A part before every query
    (causal False: a streamed context, as long as host memory) is taken QUANT_PART_BLOCKS
    blocks at a time, their partials merged, so the scratch does not grow with it."""
    step, bs = QUANT_PART_BLOCKS, cache.spec.block_size
    if not causal and block_ids.shape[0] > step:
        return merge_partials([
            paged_attention_partial_quantized(q, cache, layer, block_ids[a : a + step],
                                              min(context_len - a * bs, step * bs), causal=False)
            for a in range(0, block_ids.shape[0], step) if a * bs < context_len])
    scratch = gather_layer(cache, layer, block_ids)[:, None]  # [nb, 1, 2, bs, Hkv, D]
    ids = torch.arange(block_ids.shape[0], device=q.device)  # [nb]
    return paged_attention_partial(q, scratch, 0, ids, context_len, causal)


def paged_decode_partial_quantized(q: torch.Tensor, cache: QuantizedKVCache, layer: int, block_tables: torch.Tensor,
                                   context_lens: torch.Tensor) -> Partial:
    """paged_decode_partial over a quantized device tier (the torch reference of the fused
    kernel's partial): the rows are dequantized into a scratch buffer first, QUANT_PART_BLOCKS
    table columns at a time (their partials merged: a streamed context's scratch stays bounded)."""
    step, bs = QUANT_PART_BLOCKS, cache.spec.block_size
    if block_tables.shape[1] > step:
        return merge_partials([
            paged_decode_partial_quantized(q, cache, layer, block_tables[:, a : a + step],
                                           (context_lens - a * bs).clamp(0, step * bs))
            for a in range(0, block_tables.shape[1], step)])
    batch, width = block_tables.shape
    scratch = gather_layer(cache, layer, block_tables).flatten(0, 1)[:, None]  # [B * nb, 1, 2, bs, Hkv, D]
    ids = torch.arange(batch * width, device=q.device).view(batch, width)  # [B, nb]
    return paged_decode_partial(q, scratch, 0, ids, context_lens)
