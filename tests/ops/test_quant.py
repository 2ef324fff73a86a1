"""afkv.ops.quant: the torch reference of KIVI-style KV quantization (CPU)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from afkv.errors import ConfigError, CorruptBlockError
from afkv.ops import quant
from afkv.ops.quant import QuantSpec

_SETTINGS = settings(max_examples=40, deadline=None)
_DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


def _randn(shape, dtype, seed, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * spread).to(dtype)


# The bounds recompute scale = (max - min) / qmax per group in float64, independently of the
# code under test; eps covers float32 rounding of the subtraction, division and dequantization.
def _assert_keys_bound(k: torch.Tensor, spec: QuantSpec, deq: torch.Tensor) -> None:
    *lead, t, h, d = k.shape
    g = spec.group_size
    x = k.float().reshape(-1, t // g, g, h, d)  # [N, T/G, G, H, D]
    hi, lo = x.amax(dim=2, keepdim=True), x.amin(dim=2, keepdim=True)
    scale = (hi.double() - lo.double()) / spec.qmax
    eps = 2.0**-20 * torch.maximum(hi.abs(), lo.abs()).double()
    err = (x.double() - deq.float().reshape(x.shape).double()).abs()
    assert (err <= scale / 2 + eps).all(), float((err - scale / 2 - eps).max())


def _assert_values_bound(v: torch.Tensor, spec: QuantSpec, deq: torch.Tensor) -> None:
    d = v.shape[-1]
    g = spec.group_size
    x = v.float().reshape(-1, d // g, g)  # [R, D/G, G]
    hi, lo = x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True)
    scale = (hi.double() - lo.double()) / spec.qmax
    eps = 2.0**-20 * torch.maximum(hi.abs(), lo.abs()).double()
    err = (x.double() - deq.float().reshape(x.shape).double()).abs()
    assert (err <= scale / 2 + eps).all(), float((err - scale / 2 - eps).max())


@st.composite
def _key_case(draw):
    bits = draw(st.sampled_from([8, 4]))
    g = draw(st.sampled_from([2, 4, 8, 16]) if bits == 4 else st.sampled_from([1, 2, 3, 4, 8, 16]))
    lead = draw(st.lists(st.integers(1, 3), max_size=2))
    t = g * draw(st.integers(1, 3))
    h = draw(st.integers(1, 3))
    d = 2 * draw(st.integers(1, 12))
    return QuantSpec(bits, g), (*lead, t, h, d)


@st.composite
def _value_case(draw):
    bits = draw(st.sampled_from([8, 4]))
    g = draw(st.sampled_from([2, 4, 8, 16]) if bits == 4 else st.sampled_from([1, 2, 3, 4, 8, 16]))
    lead = draw(st.lists(st.integers(1, 3), max_size=2))
    t = draw(st.integers(1, 5))
    h = draw(st.integers(1, 3))
    d = g * draw(st.integers(1, 4))
    return QuantSpec(bits, g), (*lead, t, h, d)


@_SETTINGS
@given(_key_case(), _DTYPES, st.integers(0, 2**31), st.sampled_from([1e-3, 1.0, 300.0]))
def test_keys_round_trip_within_half_a_step(case, dtype, seed, spread):
    spec, shape = case
    k = _randn(shape, dtype, seed, spread)
    q = quant.quantize_keys(k, spec)
    *lead, t, h, d = shape
    assert q.data.dtype == torch.uint8 and q.data.shape == (*lead, t, h, d * spec.bits // 8)
    assert q.scale.dtype == q.zero.dtype == torch.float32
    assert q.scale.shape == q.zero.shape == (*lead, t // spec.group_size, h, d)
    assert q.nbytes == q.data.nbytes + q.scale.nbytes + q.zero.nbytes
    deq = quant.dequantize_keys(q, torch.float32)
    assert deq.shape == k.shape and deq.dtype == torch.float32
    _assert_keys_bound(k, spec, deq)
    assert quant.dequantize_keys(q, dtype).dtype == dtype


@_SETTINGS
@given(_value_case(), _DTYPES, st.integers(0, 2**31), st.sampled_from([1e-3, 1.0, 300.0]))
def test_values_round_trip_within_half_a_step(case, dtype, seed, spread):
    spec, shape = case
    v = _randn(shape, dtype, seed, spread)
    q = quant.quantize_values(v, spec)
    *lead, t, h, d = shape
    assert q.data.dtype == torch.uint8 and q.data.shape == (*lead, t, h, d * spec.bits // 8)
    assert q.scale.shape == q.zero.shape == (*lead, t, h, d // spec.group_size)
    deq = quant.dequantize_values(q, torch.float32)
    assert deq.shape == v.shape
    _assert_values_bound(v, spec, deq)


@pytest.mark.parametrize("bits", [8, 4])
def test_constant_groups_round_trip_exactly(bits):
    spec = QuantSpec(bits, 4)
    # keys: each channel constant over its 4-token group, different per group and channel
    k = torch.randn(2, 1, 3, 6).to(torch.bfloat16).repeat_interleave(4, dim=1)  # [2, 4, 3, 6]
    qk = quant.quantize_keys(k, spec)
    assert (qk.scale == 0).all()
    assert torch.equal(quant.dequantize_keys(qk, torch.bfloat16), k)
    # values: each 4-channel group of a token constant
    v = torch.randn(5, 3, 2).to(torch.float16).repeat_interleave(4, dim=-1)  # [5, 3, 8]
    qv = quant.quantize_values(v, spec)
    assert (qv.scale == 0).all()
    assert torch.equal(quant.dequantize_values(qv, torch.float16), v)


@pytest.mark.parametrize("bits", [8, 4])
def test_group_extremes_round_trip_exactly_and_codes_span_the_range(bits):
    spec = QuantSpec(bits, 8)
    v = torch.randn(3, 2, 16)  # [T, H, D]
    q = quant.quantize_values(v, spec)
    codes = quant._unpack(q.data, spec).reshape(3, 2, 2, 8)
    assert (codes.amin(-1) == 0).all() and (codes.amax(-1) == spec.qmax).all()
    deq = quant.dequantize_values(q, torch.float32).reshape(3, 2, 2, 8)
    x = v.reshape(3, 2, 2, 8)
    assert torch.equal(deq.amin(-1), x.amin(-1))


def test_int4_packs_low_nibble_first_along_head_dim():
    spec = QuantSpec(4, 2)
    # values: a group of 2 channels [lo, hi] quantizes to codes [0, 15] -> byte 0xF0
    v = torch.tensor([[[1.0, 2.0, 5.0, -3.0]]])  # [T=1, H=1, D=4]
    q = quant.quantize_values(v, spec)
    assert q.data.tolist() == [[[0xF0, 0x0F]]]
    # keys: channel 0 rises over the 2 tokens, channel 1 falls
    k = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]])  # [T=2, H=1, D=2]
    q = quant.quantize_keys(k, spec)
    assert q.data.tolist() == [[[0xF0]], [[0x0F]]]


def test_int4_error_is_about_16x_int8_error_on_gaussian_data():
    x = _randn((4, 64, 8, 128), torch.float32, seed=7)  # [B, T, H, D]
    errs = {}
    for bits in (8, 4):
        spec = QuantSpec(bits, 32)
        ek = quant.dequantize_keys(quant.quantize_keys(x, spec), torch.float32) - x
        ev = quant.dequantize_values(quant.quantize_values(x, spec), torch.float32) - x
        errs[bits] = (ek.pow(2).mean().sqrt().item(), ev.pow(2).mean().sqrt().item())
    for i in range(2):
        ratio = errs[4][i] / errs[8][i]
        assert 12 < ratio < 22, (errs, ratio)  # step ratio 255 / 15 = 17


def test_dequantize_writes_into_out():
    spec = QuantSpec(8, 4)
    k = torch.randn(8, 2, 4)
    q = quant.quantize_keys(k, spec)
    out = torch.full((8, 2, 4), float("nan"), dtype=torch.float16)
    res = quant.dequantize_keys(q, torch.float16, out=out)
    assert res.data_ptr() == out.data_ptr()
    assert torch.equal(out, quant.dequantize_keys(q, torch.float16))
    with pytest.raises(ConfigError):
        quant.dequantize_keys(q, torch.float32, out=out)


def _block(batch, layers, bs, h, d, dtype=torch.bfloat16, seed=0):
    return _randn((*batch, layers, 2, bs, h, d), dtype, seed)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("batch", [(), (3,)])
def test_block_bytes_round_trip(bits, batch):
    spec = QuantSpec(bits, 4)
    layers, bs, h, d = 3, 8, 2, 12
    block = _block(batch, layers, bs, h, d)
    qb = quant.quantize_block(block, spec)
    buf = quant.to_bytes(qb)
    nbytes = quant.packed_nbytes(spec, layers, bs, h, d)
    assert buf.dtype == torch.uint8 and buf.shape == (*batch, nbytes) and buf.is_contiguous()
    num_blocks = buf.numel() // nbytes
    assert qb.nbytes <= num_blocks * nbytes < qb.nbytes + 16 * num_blocks and nbytes % 16 == 0

    back = quant.from_bytes(buf, spec, layers, bs, h, d)
    assert back.keys.scale.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()  # views
    for a, b in ((qb.keys, back.keys), (qb.values, back.values)):
        for name in ("data", "scale", "zero"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    deq = quant.dequantize_block(back, torch.bfloat16)
    assert deq.shape == block.shape
    assert torch.equal(deq, quant.dequantize_block(qb, torch.bfloat16))
    assert torch.equal(deq[..., 0, :, :, :], quant.dequantize_keys(quant.quantize_keys(block[..., 0, :, :, :], spec), torch.bfloat16))
    assert torch.equal(quant.to_bytes(back), buf)


def test_block_sections_sit_where_the_format_says():
    spec = QuantSpec(8, 2)
    layers, bs, h, d = 2, 4, 1, 4
    block = _block((), layers, bs, h, d, torch.float32)
    qb = quant.quantize_block(block, spec)
    buf = quant.to_bytes(qb)
    k_groups = layers * (bs // 2) * h * d * 4
    v_groups = layers * bs * h * (d // 2) * 4
    data = layers * bs * h * d
    assert torch.equal(buf[:k_groups].view(torch.float32), qb.keys.scale.flatten())
    assert torch.equal(buf[2 * k_groups : 2 * k_groups + v_groups].view(torch.float32), qb.values.scale.flatten())
    start = 2 * k_groups + 2 * v_groups
    assert torch.equal(buf[start : start + data], qb.keys.data.flatten())
    assert torch.equal(buf[start + data : start + 2 * data], qb.values.data.flatten())
    assert (buf[start + 2 * data :] == 0).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_packed_nbytes_equals_serialised_size(bits):
    for layers, bs, h, d, g in [(1, 2, 1, 2, 2), (3, 16, 8, 128, 16), (2, 6, 3, 6, 2), (61, 64, 1, 576, 32)]:
        spec = QuantSpec(bits, g)
        block = torch.zeros(layers, 2, bs, h, d, dtype=torch.float16)
        qb = quant.quantize_block(block, spec)
        n = quant.packed_nbytes(spec, layers, bs, h, d)
        assert quant.to_bytes(qb).numel() == n
        assert qb.nbytes <= n < qb.nbytes + 16


def test_to_bytes_writes_into_a_storage_slot_and_from_bytes_reads_views():
    spec = QuantSpec(4, 4)
    layers, bs, h, d = 2, 4, 2, 8
    n = quant.packed_nbytes(spec, layers, bs, h, d)
    storage = torch.full((5, n), 0xAB, dtype=torch.uint8)  # a tier's slots
    block = _block((), layers, bs, h, d)
    qb = quant.quantize_block(block, spec)
    quant.to_bytes(qb, out=storage[3])
    assert (storage[[0, 1, 2, 4]] == 0xAB).all()
    back = quant.from_bytes(storage[3], spec, layers, bs, h, d)
    assert back.values.zero.untyped_storage().data_ptr() == storage.untyped_storage().data_ptr()
    assert torch.equal(quant.dequantize_block(back, torch.bfloat16), quant.dequantize_block(qb, torch.bfloat16))
    # a misaligned buffer still parses (copied)
    odd = torch.zeros(n + 1, dtype=torch.uint8)
    odd[1:] = storage[3]
    back = quant.from_bytes(odd[1:], spec, layers, bs, h, d)
    assert torch.equal(back.keys.scale, qb.keys.scale)


def test_dequantize_block_into_cache_slot():
    spec = QuantSpec(8, 4)
    kv = torch.zeros(4, 2, 2, 8, 2, 4, dtype=torch.float16)  # [num_blocks, L, 2, bs, H, D]
    block = _block((), 2, 8, 2, 4, torch.float16)
    qb = quant.quantize_block(block, spec)
    quant.dequantize_block(qb, torch.float16, out=kv[2])
    assert torch.equal(kv[2], quant.dequantize_block(qb, torch.float16))
    assert (kv[[0, 1, 3]] == 0).all()


def test_from_bytes_rejects_wrong_buffers():
    spec = QuantSpec(8, 4)
    n = quant.packed_nbytes(spec, 1, 4, 1, 4)
    with pytest.raises(CorruptBlockError):
        quant.from_bytes(torch.zeros(n - 16, dtype=torch.uint8), spec, 1, 4, 1, 4)
    with pytest.raises(CorruptBlockError):
        quant.from_bytes(torch.zeros(n // 4, dtype=torch.float32), spec, 1, 4, 1, 4)


def test_spec_validation_names_what_is_wrong():
    with pytest.raises(ConfigError, match="bits"):
        QuantSpec(3, 8)
    with pytest.raises(ConfigError, match="group_size"):
        QuantSpec(8, 0)
    with pytest.raises(ConfigError, match="even"):
        QuantSpec(4, 3)
    QuantSpec(8, 16).validate(block_size=32, head_dim=128)
    with pytest.raises(ConfigError, match="block_size 24") as exc:
        QuantSpec(8, 16).validate(block_size=24, head_dim=128)
    assert exc.value.key == "group_size"
    with pytest.raises(ConfigError, match="head_dim 40"):
        QuantSpec(8, 16).validate(block_size=32, head_dim=40)
    with pytest.raises(ConfigError, match="head_dim 7") as exc:
        QuantSpec(4, 2).validate_packing(7)
    assert exc.value.key == "head_dim"
    with pytest.raises(ConfigError):
        quant.packed_nbytes(QuantSpec(8, 16), 1, 8, 1, 16)


def test_quantize_rejects_bad_inputs():
    spec = QuantSpec(8, 4)
    with pytest.raises(ConfigError, match="tokens"):
        quant.quantize_keys(torch.zeros(6, 1, 4), spec)
    with pytest.raises(ConfigError, match="head_dim"):
        quant.quantize_values(torch.zeros(4, 1, 6), spec)
    with pytest.raises(ConfigError, match="even"):
        quant.quantize_keys(torch.zeros(4, 1, 3), QuantSpec(4, 2))
    with pytest.raises(ConfigError, match="floating"):
        quant.quantize_keys(torch.zeros(4, 1, 4, dtype=torch.int32), spec)
    with pytest.raises(ConfigError, match=r"\[\.\.\., T, H, D\]"):
        quant.quantize_values(torch.zeros(4, 4), spec)
    with pytest.raises(ConfigError, match="block"):
        quant.quantize_block(torch.zeros(2, 3, 4, 1, 4), spec)


def _quantized_cache(spec, num_blocks, layers, bs, h, d, seed=0):
    """-> (serialised blocks uint8 [num_blocks, nbytes], their dequantized cache
    [num_blocks, L, 2, bs, H, D] float32)."""
    kv = _randn((num_blocks, layers, 2, bs, h, d), torch.float32, seed)
    blocks = quant.to_bytes(quant.quantize_block(kv, spec))  # [num_blocks, nbytes]
    deq = quant.dequantize_block(quant.from_bytes(blocks, spec, layers, bs, h, d), torch.float32)
    return blocks, deq


@pytest.mark.parametrize("bits", [8, 4])
def test_paged_decode_attention_equals_attention_over_the_dequantized_cache(bits):
    from afkv.ops.attention import paged_attention

    spec = QuantSpec(bits, 4)
    layers, bs, hkv, hq, d = 2, 8, 2, 6, 16
    blocks, deq = _quantized_cache(spec, 12, layers, bs, hkv, d)
    seq_lens = torch.tensor([1, 8, 19, 0, 30])
    block_tables = torch.tensor([[3, 0, 0, 0], [7, 0, 0, 0], [2, 9, 4, 0], [0, 0, 0, 0], [11, 1, 5, 6]], dtype=torch.int32)
    q = _randn((5, hq, d), torch.float32, seed=1)
    for layer in range(layers):
        out = quant.paged_decode_attention(
            q, blocks, block_tables, seq_lens, layer=layer, spec=spec, num_layers=layers, block_size=bs, num_kv_heads=hkv
        )
        assert out.shape == q.shape and out.dtype == q.dtype
        for b, n in enumerate(seq_lens.tolist()):
            if n == 0:
                assert (out[b] == 0).all()
                continue
            ids = block_tables[b, : -(-n // bs)].long()
            want = paged_attention(q[b][None], deq, layer, ids, n)[0]  # [Hq, D]
            torch.testing.assert_close(out[b], want, rtol=1e-5, atol=1e-5)


def test_paged_decode_attention_rejects_bad_inputs():
    spec = QuantSpec(8, 4)
    blocks, _ = _quantized_cache(spec, 2, 1, 4, 2, 8)
    q = torch.zeros(1, 4, 8)
    args = dict(spec=spec, num_layers=1, block_size=4, num_kv_heads=2)
    tables, lens = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(ConfigError, match="layer"):
        quant.paged_decode_attention(q, blocks, tables, lens, layer=1, **args)
    with pytest.raises(ConfigError, match="num_kv_heads"):
        quant.paged_decode_attention(torch.zeros(1, 3, 8), blocks, tables, lens, layer=0, **args)
    with pytest.raises(ConfigError, match="blocks"):
        quant.paged_decode_attention(q, blocks[:, :-16], tables, lens, layer=0, **args)


def test_native_falls_back_to_the_reference_on_cpu():
    from afkv.ops import native

    spec = QuantSpec(4, 4)
    block = _block((2,), 2, 8, 2, 8)
    qb = native.quantize_block(block, spec)
    ref = quant.quantize_block(block, spec)
    assert torch.equal(quant.to_bytes(qb), quant.to_bytes(ref))
    assert torch.equal(native.dequantize_block(qb, torch.bfloat16), quant.dequantize_block(ref, torch.bfloat16))
    assert native.native_dir().joinpath("kv_quant.cu").is_file()
