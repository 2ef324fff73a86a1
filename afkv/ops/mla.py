"""Multi-head latent attention (DeepSeek-V2/V3) over the paged latent cache: the torch
reference (CPU and GPU) of afkv.ops.triton_mla.

Latent cache (owned by afkv.kv, LatentLayout): cache[num_blocks, num_layers, block_size, r + dr],
per token and layer the RMS-normed compressed KV c (r = kv_lora_rank values) and the rotated
shared key k_pe (dr values). A sequence's token t lives at (block_table[t // bs], t % bs). A
quantized device tier (`QuantizedKVCache` whose spec is a LatentQuantSpec) holds full blocks as
quantized latent rows (afkv.ops.quant) and recent tokens in staging blocks of the model dtype:
id < num_blocks names a row, num_blocks + s staging block s.

Head h's key and value are k_h = [W_UK[h] c, k_pe] and v_h = W_UV[h] c. With the query's
parts q_nope (dn) and q_pe (dr),

    q_h . k_h = (W_UK[h]^T q_nope) . c + q_pe . k_pe = q_abs . latent,   q_abs = [W_UK[h]^T q_nope, q_pe]
    sum_t p_t v_h,t = W_UV[h] (sum_t p_t c_t)

so attention runs as multi-query attention of r + dr wide keys (the latents) and r wide
values (their first r values), every head reading the same cache (weight absorption). The
caller absorbs the queries (q_abs) and projects the r-wide outputs through W_UV. Or, for long
prefill chunks, it expands K and V per head from the chunk's context (`mla_expanded_attention`):
that costs N x H x r x (dn + dv) multiply-adds once instead of n x N x H x (r - dn - dv + r)
more per query, so it is cheaper when n exceeds r (dn + dv) / (2 r - dn - dv) queries (171 at
DeepSeek's shapes): `expand_threshold`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from afkv.ops.attention import QuantizedKVCache
from afkv.ops.quant import dequantize_latent_layers


def expand_threshold(kv_lora_rank: int, nope_dim: int, v_dim: int) -> int:
    """Chunk length from which expanding K/V per head costs fewer multiply-adds than absorbing
    (see the module docstring)."""
    r = kv_lora_rank
    denominator = 2 * r - nope_dim - v_dim
    if denominator <= 0:
        return 1
    return -(-r * (nope_dim + v_dim) // denominator)


def write_latent(cache: torch.Tensor, layer: int, slot_blocks: torch.Tensor, slot_offsets: torch.Tensor,
                 latent: torch.Tensor) -> None:
    """Store new latents [T, r + dr] at (slot_blocks[t], slot_offsets[t]) of `layer`."""
    cache[slot_blocks, layer, slot_offsets] = latent.to(cache.dtype)


def gather_latents(cache: torch.Tensor | QuantizedKVCache, layer: int, block_ids: torch.Tensor) -> torch.Tensor:
    """Layer `layer` of the blocks block_ids [*] -> [*, bs, r + dr] (quantized rows dequantized
    into the staging dtype, staging blocks copied; no host synchronisation)."""
    if not isinstance(cache, QuantizedKVCache):
        return cache[block_ids, layer]
    nb, dtype = cache.num_blocks, cache.staging.dtype
    flat = block_ids.reshape(-1)  # [n]
    deq = dequantize_latent_layers(cache.blocks[flat.clamp(max=nb - 1)], cache.spec, dtype, layer)  # [n, bs, Dl]
    fp = cache.staging[(flat - nb).clamp(min=0), layer]  # [n, bs, Dl]
    out = torch.where((flat < nb).view(-1, 1, 1), deq, fp)
    return out.view(*block_ids.shape, *out.shape[1:])


def _attend(q: torch.Tensor, latents: torch.Tensor, mask: torch.Tensor, scale: float, kv_lora_rank: int) -> torch.Tensor:
    """q [..., M, H, Dl], latents [..., N, Dl], mask [..., M, N] -> [..., M, H, r] in float32."""
    lat = latents.float()
    scores = torch.einsum("...mhd,...nd->...mhn", q.float(), lat) * scale  # [..., M, H, N]
    scores = scores.masked_fill(~mask[..., :, None, :], float("-inf"))
    probs = torch.softmax(scores, -1)
    probs = torch.nan_to_num(probs)  # a row with nothing to attend (context 0) yields zeros
    return torch.einsum("...mhn,...nr->...mhr", probs, lat[..., :kv_lora_rank])  # [..., M, H, r]


def mla_attention(q: torch.Tensor, cache: torch.Tensor | QuantizedKVCache, layer: int, block_ids: torch.Tensor,
                  context_len: int, scale: float, kv_lora_rank: int) -> torch.Tensor:
    """Causal absorbed attention of one sequence's new queries over its cached latents.
    q [n, H, r + dr] are the absorbed queries of slots context_len - n .. context_len - 1
    (their latents already written) -> [n, H, r] of q.dtype."""
    n = q.shape[0]
    lat = gather_latents(cache, layer, block_ids).flatten(0, 1)[:context_len]  # [N, Dl]
    q_pos = torch.arange(context_len - n, context_len, device=q.device)  # [n]
    k_pos = torch.arange(context_len, device=q.device)  # [N]
    mask = k_pos[None, :] <= q_pos[:, None]  # [n, N]
    return _attend(q, lat, mask, scale, kv_lora_rank).to(q.dtype)


def mla_decode_attention(q: torch.Tensor, cache: torch.Tensor | QuantizedKVCache, layer: int,
                         block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                         kv_lora_rank: int) -> torch.Tensor:
    """One absorbed query per sequence, all sequences at once: q [B, H, r + dr]; block_tables
    [B, nb] (padded with any valid id); context_lens [B] (the query is token context_len - 1)
    -> [B, H, r] of q.dtype (zeros where context_len is 0)."""
    lat = gather_latents(cache, layer, block_tables).flatten(1, 2)  # [B, N, Dl]
    k_pos = torch.arange(lat.shape[1], device=q.device)  # [N]
    mask = (k_pos[None, :] < context_lens[:, None])[:, None, :]  # [B, 1, N]
    lat = torch.where(mask.transpose(1, 2), lat, torch.zeros((), dtype=lat.dtype, device=lat.device))  # past the
    # context: whatever the block held, zeroed (a masked NaN would still give NaN)
    return _attend(q[:, None], lat, mask, scale, kv_lora_rank)[:, 0].to(q.dtype)


def mla_expanded_attention(q: torch.Tensor, cache: torch.Tensor | QuantizedKVCache, layer: int,
                           block_ids: torch.Tensor, context_len: int, scale: float, w_uk: torch.Tensor,
                           w_uv: torch.Tensor) -> torch.Tensor:
    """Causal attention of one sequence's new queries with K and V expanded per head from its
    cached latents: q [n, H, dn + dr] (q_nope, rotated q_pe), w_uk [H, dn, r], w_uv [H, dv, r]
    -> [n, H, dv] of q.dtype. Runs torch's scaled_dot_product_attention in q's dtype."""
    n, num_heads, _ = q.shape
    r = w_uk.shape[-1]
    lat = gather_latents(cache, layer, block_ids).flatten(0, 1)[:context_len].to(q.dtype)  # [N, Dl]
    c, k_pe = lat[:, :r], lat[:, r:]
    k_nope = torch.einsum("nr,hdr->hnd", c, w_uk)  # [H, N, dn]
    v = torch.einsum("nr,hdr->hnd", c, w_uv)  # [H, N, dv]
    k = torch.cat([k_nope, k_pe[None].expand(num_heads, -1, -1)], -1)  # [H, N, dn + dr]
    q_pos = torch.arange(context_len - n, context_len, device=q.device)  # [n]
    mask = torch.arange(context_len, device=q.device)[None, :] <= q_pos[:, None]  # [n, N]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=scale)  # [H, n, dv]
    return out.transpose(0, 1)
