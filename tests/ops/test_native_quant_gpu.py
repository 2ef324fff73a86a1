"""afkv.ops.native: the CUDA kernels of native/kv_quant.cu against the torch reference
afkv.ops.quant (GPU; skipped without CuPy or CUDA).

Quantized data, scales and zeros must be bit-identical to the reference computed on the CPU;
dequantized tensors too (the kernels use the same float32 operations in the same order).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("cupy")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from afkv.ops import native, quant  # noqa: E402
from afkv.ops.quant import QuantSpec  # noqa: E402

_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_SPECS = [QuantSpec(8, 1), QuantSpec(8, 4), QuantSpec(8, 16), QuantSpec(4, 2), QuantSpec(4, 8), QuantSpec(4, 32)]
_POISON = 0xA5


@pytest.fixture(autouse=True)
def _native_available():
    assert native.available(), "CuPy and CUDA are importable but afkv.ops.native is not available"


def _poison_allocator() -> None:
    """Fill memory the caching allocator will hand out next, so outputs the kernels leave
    unwritten show up as garbage rather than as zeros."""
    junk = torch.full((64 << 20,), _POISON, dtype=torch.uint8, device="cuda")
    del junk


def _randn(shape, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(shape, generator=gen, device="cuda").mul_(3.0).to(dtype)


def _assert_same(got: quant.QuantizedTensor, want: quant.QuantizedTensor) -> None:
    for name in ("data", "scale", "zero"):
        g, w = getattr(got, name), getattr(want, name)
        assert g.shape == w.shape and g.dtype == w.dtype, name
        g, w = g.cpu(), w.cpu()
        if name == "data":
            diff = (g.int() - w.int()).abs()
            assert torch.equal(g, w), f"{name}: {int((diff > 0).sum())} bytes differ, max {int(diff.max())}"
        else:
            assert torch.equal(g, w), f"{name}: max diff {(g - w).abs().max()}"


def _key_shapes(spec):
    g = spec.group_size
    return [(g, 1, 2), (2 * g, 3, 64), (5, 2 * g, 8, 128), (2, 3, 4 * g, 2, 96)]  # [..., T, H, D]


def _value_shapes(spec):
    g = spec.group_size
    return [(1, 1, g), (7, 3, 4 * g), (5, 16, 8, 128), (2, 3, 5, 2, 2 * g)]  # [..., T, H, D]


@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
@pytest.mark.parametrize("spec", _SPECS, ids=repr)
def test_quantize_keys_matches_reference(spec, dtype):
    for i, shape in enumerate(_key_shapes(spec)):
        k = _randn(shape, dtype, seed=i)
        _poison_allocator()
        got = native.quantize_keys(k, spec)
        assert got.data.is_cuda
        _assert_same(got, quant.quantize_keys(k.cpu(), spec))
        _assert_same(got, quant.quantize_keys(k, spec))  # torch on the GPU agrees too


@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
@pytest.mark.parametrize("spec", _SPECS, ids=repr)
def test_quantize_values_matches_reference(spec, dtype):
    for i, shape in enumerate(_value_shapes(spec)):
        v = _randn(shape, dtype, seed=100 + i)
        _poison_allocator()
        got = native.quantize_values(v, spec)
        _assert_same(got, quant.quantize_values(v.cpu(), spec))
        _assert_same(got, quant.quantize_values(v, spec))


@pytest.mark.parametrize("out_dtype", _DTYPES, ids=str)
@pytest.mark.parametrize("spec", _SPECS, ids=repr)
def test_dequantize_matches_reference(spec, out_dtype):
    shape = (3, 4 * spec.group_size, 4, 8 * spec.group_size)  # [B, T, H, D]
    x = _randn(shape, torch.bfloat16, seed=7)
    for quantize, dequantize, ref in (
        (quant.quantize_keys, native.dequantize_keys, quant.dequantize_keys),
        (quant.quantize_values, native.dequantize_values, quant.dequantize_values),
    ):
        q_cpu = quantize(x.cpu(), spec)
        q_gpu = quant.QuantizedTensor(q_cpu.data.cuda(), q_cpu.scale.cuda(), q_cpu.zero.cuda(), spec)
        want = ref(q_cpu, out_dtype)
        _poison_allocator()
        got = dequantize(q_gpu, out_dtype)
        assert got.dtype == out_dtype and got.shape == shape
        assert torch.equal(got.cpu(), want), f"max diff {(got.cpu().float() - want.float()).abs().max()}"
        out = torch.full(shape, float("nan"), dtype=out_dtype, device="cuda")
        assert dequantize(q_gpu, out_dtype, out=out) is out
        assert torch.equal(out.cpu(), want)


def test_constant_groups_round_trip_exactly():
    for spec in (QuantSpec(8, 4), QuantSpec(4, 4)):
        k = _randn((2, 1, 3, 8), torch.bfloat16, seed=3).repeat_interleave(4, dim=1)  # [2, 4, 3, 8]
        qk = native.quantize_keys(k, spec)
        assert (qk.scale == 0).all()
        assert torch.equal(native.dequantize_keys(qk, torch.bfloat16), k)
        v = _randn((5, 3, 2), torch.float16, seed=4).repeat_interleave(4, dim=-1)  # [5, 3, 8]
        qv = native.quantize_values(v, spec)
        assert torch.equal(native.dequantize_values(qv, torch.float16), v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", [QuantSpec(8, 16), QuantSpec(4, 16), QuantSpec(4, 8)], ids=repr)
def test_blocks_of_a_cache_round_trip_in_place(spec, dtype):
    num_blocks, layers, bs, h, d = 6, 4, 16, 8, 128
    kv = _randn((num_blocks, layers, 2, bs, h, d), dtype, seed=11)  # the device cache
    nbytes = quant.packed_nbytes(spec, layers, bs, h, d)
    storage = torch.full((4, nbytes), _POISON, dtype=torch.uint8, device="cuda")  # a tier's slots

    qb = native.quantize_block(kv[2], spec)  # a strided view: keys and values read in place
    quant.to_bytes(qb, out=storage[1])
    want = quant.to_bytes(quant.quantize_block(kv[2].cpu(), spec))
    assert torch.equal(storage[1].cpu(), want)
    assert (storage[[0, 2, 3]] == _POISON).all()

    before = kv.clone()
    back = quant.from_bytes(storage[1], spec, layers, bs, h, d)
    native.dequantize_block(back, dtype, out=kv[4])
    assert torch.equal(kv[4].cpu(), quant.dequantize_block(quant.from_bytes(want, spec, layers, bs, h, d), dtype))
    others = [0, 1, 2, 3, 5]
    assert torch.equal(kv[others], before[others])

    # a batch of blocks, gathered by id
    ids = torch.tensor([5, 0, 3], device="cuda")
    qbs = native.quantize_block(kv[ids], spec)
    assert torch.equal(quant.to_bytes(qbs).cpu(), quant.to_bytes(quant.quantize_block(kv[ids].cpu(), spec)))
    assert torch.equal(
        native.dequantize_block(qbs, dtype).cpu(), quant.dequantize_block(quant.quantize_block(kv[ids].cpu(), spec), dtype)
    )


def test_non_contiguous_inputs_and_outputs():
    spec = QuantSpec(4, 4)
    k = _randn((8, 16, 4), torch.float16, seed=5).transpose(0, 1)  # [16, 8, 4] non-viewable as rows
    assert not k.is_contiguous()
    _assert_same(native.quantize_keys(k, spec), quant.quantize_keys(k.cpu(), spec))
    q = native.quantize_values(k, spec)
    _assert_same(q, quant.quantize_values(k.cpu(), spec))
    out = torch.full((4, 16, 8), float("nan"), dtype=torch.float16, device="cuda").transpose(0, 1)  # [16, 4, 8]
    out = out.transpose(1, 2)  # [16, 8, 4], strided
    native.dequantize_values(q, torch.float16, out=out)
    assert torch.equal(out.cpu(), quant.dequantize_values(quant.quantize_values(k.cpu(), spec), torch.float16))


def test_kernels_run_on_the_current_torch_stream():
    spec = QuantSpec(8, 16)
    x = _randn((64, 16, 8, 128), torch.bfloat16, seed=9)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            q = native.quantize_values(x, spec)
            y = native.dequantize_values(q, torch.bfloat16)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(y.cpu(), quant.dequantize_values(quant.quantize_values(x.cpu(), spec), torch.bfloat16))


@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
@pytest.mark.parametrize("spec", [QuantSpec(8, 16), QuantSpec(4, 16), QuantSpec(4, 8)], ids=repr)
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256, 320])
def test_decode_attention_matches_reference(spec, dtype, head_dim):
    layers, bs, hkv, hq, num_blocks = 3, 16, 2, 8, 40
    kv = _randn((num_blocks, layers, 2, bs, hkv, head_dim), dtype, seed=21)
    blocks = quant.to_bytes(native.quantize_block(kv, spec))  # [num_blocks, nbytes]
    seq_lens = torch.tensor([1, 16, 17, 0, 100, 255], dtype=torch.int32, device="cuda")
    gen = torch.Generator().manual_seed(0)
    block_tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:16] for _ in range(6)]).int().cuda()
    q = _randn((6, hq, head_dim), dtype, seed=22)
    for layer in (0, layers - 1):
        args = dict(layer=layer, spec=spec, num_layers=layers, block_size=bs, num_kv_heads=hkv)
        _poison_allocator()
        got = native.paged_decode_attention(q, blocks, block_tables, seq_lens, **args)
        want = quant.paged_decode_attention(q.float(), blocks, block_tables, seq_lens, **args)
        assert got.dtype == dtype and got.shape == q.shape
        assert (got[3] == 0).all()  # empty sequence
        tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
