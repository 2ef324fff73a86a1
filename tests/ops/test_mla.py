"""MLA's torch references (afkv.ops.mla) and the quantized latent rows (afkv.ops.quant,
afkv.kv.formats): absorption against explicit per-head keys and values, the expansion
threshold, row layout and byte counts, round-trip bounds."""

import pytest
import torch

from afkv.errors import ConfigError, CorruptBlockError
from afkv.kv.formats import LatentQuantFormat, RawFormat, make_format
from afkv.kv.layout import KVLayout, LatentLayout
from afkv.ops import mla, quant
from afkv.ops.attention import QuantizedKVCache

GEN = torch.Generator().manual_seed(0)


def _rand(*shape):
    return torch.randn(*shape, generator=GEN, dtype=torch.float64).float()


def test_expand_threshold_at_deepseek_shapes():
    # expand iff N r (dn + dv) < n N (2r - dn - dv): 512 * 256 / 768 = 170.7 -> 171
    assert mla.expand_threshold(512, 128, 128) == 171
    assert mla.expand_threshold(40, 12, 10) == 16  # the tiny checkpoints
    assert mla.expand_threshold(16, 16, 16) == 1  # expansion never costs more


def test_absorbed_equals_explicit_keys_and_values():
    """q . k_h = (W_UK[h]^T q_nope) . c + q_pe . k_pe and sum p v_h = W_UV[h] sum p c: the
    absorbed reference, the expanded one and attention over explicit per-head K/V agree."""
    heads, dn, dr, dv, r, bs = 3, 8, 4, 6, 20, 4
    ctx, n = 11, 4
    cache = _rand(5, 2, bs, r + dr)  # [nb, L, bs, Dl]
    table = torch.tensor([3, 0, 4])
    w_uk, w_uv = _rand(heads, dn, r), _rand(heads, dv, r)
    q_nope, q_pe = _rand(n, heads, dn), _rand(n, heads, dr)
    scale = 0.37
    lat = cache[table, 1].flatten(0, 1)[:ctx]  # [N, Dl]
    k = torch.cat([torch.einsum("nr,hdr->nhd", lat[:, :r], w_uk), lat[:, None, r:].expand(-1, heads, -1)], -1)
    v = torch.einsum("nr,hdr->nhd", lat[:, :r], w_uv)  # [N, H, dv]
    s = torch.einsum("mhd,nhd->hmn", torch.cat([q_nope, q_pe], -1), k) * scale
    causal = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]  # [n, N]
    want = torch.einsum("hmn,nhd->mhd", torch.softmax(s.masked_fill(~causal, float("-inf")), -1), v)
    q_abs = torch.cat([torch.einsum("mhd,hdr->mhr", q_nope, w_uk), q_pe], -1)
    o_lat = mla.mla_attention(q_abs, cache, 1, table, ctx, scale, r)  # [n, H, r]
    torch.testing.assert_close(torch.einsum("mhr,hdr->mhd", o_lat, w_uv), want, rtol=1e-5, atol=1e-5)
    expanded = mla.mla_expanded_attention(torch.cat([q_nope, q_pe], -1), cache, 1, table, ctx, scale, w_uk, w_uv)
    torch.testing.assert_close(expanded, want, rtol=1e-5, atol=1e-5)
    # decode rows: the last query of the chunk, and a row with nothing cached yields zeros
    dec = mla.mla_decode_attention(q_abs[-1:].expand(2, -1, -1), cache, 1, torch.stack([table, table]),
                                   torch.tensor([ctx, 0]), scale, r)
    torch.testing.assert_close(dec[0], o_lat[-1], rtol=1e-5, atol=1e-6)
    assert torch.equal(dec[1], torch.zeros_like(dec[1]))


def test_row_layout_and_bytes_at_deepseek_shapes():
    """Bytes per token and layer at r = 512, dr = 64 (bfloat16: 1152): FlashMLA's split."""
    for kind, per_token in (("fp8", 512 + 4 * 2 + 64 * 2), ("int8", 512 + 2 * 4 * 2 + 64 * 2)):
        spec = quant.LatentQuantSpec(kind, 61, 64, 512, 64, torch.bfloat16)
        assert spec.layer_nbytes == 64 * per_token  # 16-byte aligned already at block 64
        assert spec.row_nbytes == 61 * 64 * per_token
    fp8 = make_format("fp8", LatentLayout(61, 512, 64, 64, torch.bfloat16))
    assert isinstance(fp8, LatentQuantFormat) and fp8.nbytes / fp8.layout.block_nbytes == pytest.approx(648 / 1152)
    raw = make_format("none", LatentLayout(61, 512, 64, 64, torch.bfloat16))
    assert isinstance(raw, RawFormat) and raw.nbytes == 61 * 64 * 576 * 2
    # digests: every kind and geometry its own; a latent block never decodes as K/V or vice versa
    layouts = [LatentLayout(2, 16, 8, 4, torch.float32), LatentLayout(2, 16, 8, 8, torch.float32),
               KVLayout(2, 1, 24, 4, torch.float32)]
    digests = {make_format(k, lay).digest for k in ("none", "fp8", "int8") for lay in layouts}
    assert len(digests) == 9


@pytest.mark.parametrize("kind", ["fp8", "int8"])
@pytest.mark.parametrize("rank", [40, 200])  # one partial group; a full group and a partial one
def test_latent_rows_round_trip_within_bounds(kind, rank):
    dr = 6
    spec = quant.LatentQuantSpec(kind, 3, 4, rank, dr, torch.bfloat16)
    blocks = _rand(5, 3, 4, rank + dr) * torch.linspace(0.1, 4.0, rank + dr)  # channel scales apart
    blocks[1, 2, 3] = 0.0  # an all-zero latent comes back exactly
    rows = quant.quantize_latent_rows(blocks, spec)
    assert rows.shape == (5, spec.row_nbytes) and rows.dtype == torch.uint8
    back = quant.dequantize_latent_rows(rows, spec, torch.float32)
    assert torch.equal(back[1, 2, 3], torch.zeros(rank + dr))
    # the rotary part: rounded to the scale dtype only
    torch.testing.assert_close(back[..., rank:], blocks[..., rank:].to(torch.bfloat16).float(), rtol=0, atol=0)
    views = quant._latent_views(rows, spec)
    scale = views["scale"].float()  # [n, L, bs, G]
    per_value = scale.repeat_interleave(spec.group_size, -1)[..., :rank]  # [n, L, bs, r]
    err = (back[..., :rank] - blocks[..., :rank]).abs()
    if kind == "fp8":
        bound = torch.maximum(blocks[..., :rank].abs() / 16, per_value / 1024)
    else:
        bound = per_value / 2
    assert bool((err <= bound * (1 + 1e-5) + 1e-7).all()), float((err - bound).max())
    # decode through the format object into a preallocated buffer
    fmt = LatentQuantFormat.of(kind, LatentLayout(3, rank, dr, 4, torch.float32))
    out = torch.empty(5, 3, 4, rank + dr)
    fmt.decode(fmt.encode(blocks), out)
    assert torch.equal(out, back)


def test_latent_rows_errors():
    with pytest.raises(ConfigError, match="int4 does not hold accuracy"):
        make_format("int4", LatentLayout(2, 16, 8, 4, torch.float32))
    assert make_format("int4", KVLayout(2, 1, 24, 4, torch.float32)).name == "int4"  # K/V rows keep it
    spec = quant.LatentQuantSpec("int8", 1, 4, 40, 6, torch.bfloat16)
    with pytest.raises(ConfigError, match="latent blocks"):
        quant.quantize_latent_rows(torch.zeros(2, 1, 4, 40), spec)
    with pytest.raises(CorruptBlockError):
        quant.dequantize_latent_rows(torch.zeros(2, spec.row_nbytes - 16, dtype=torch.uint8), spec, torch.float32)


def test_gather_reads_rows_and_staging_blocks():
    """A quantized device tier's gather: ids below num_blocks dequantize rows, the others read
    staging blocks; the reference attention over it equals attention over the dequantized copy."""
    spec = quant.LatentQuantSpec("fp8", 2, 4, 16, 8, torch.bfloat16)
    blocks = _rand(6, 2, 4, 24)
    rows = quant.quantize_latent_rows(blocks[:4], spec)
    cache = QuantizedKVCache(rows, blocks[4:].clone(), spec, max_tail_blocks=2)
    table = torch.tensor([2, 0, 5, 4])  # rows 2 and 0, staging blocks 1 and 0
    got = mla.gather_latents(cache, 1, table)  # [4, bs, Dl]
    deq = quant.dequantize_latent_rows(rows, spec, torch.float32)
    assert torch.equal(got[:2], deq[[2, 0], 1]) and torch.equal(got[2:], blocks[[5, 4], 1])
    plain = torch.cat([deq, blocks[4:]])  # the same content as a raw cache
    q = _rand(3, 5, 24)
    torch.testing.assert_close(mla.mla_attention(q, cache, 1, table, 14, 0.3, 16),
                               mla.mla_attention(q, plain, 1, table, 14, 0.3, 16))
