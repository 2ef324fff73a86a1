"""afkv.ops.triton_fused against the torch code each kernel replaces.

Skipped without triton (the CPU CI has none). With triton and no GPU, the kernels run on CPU
tensors under Triton's interpreter (TRITON_INTERPRET=1, set here before the module is
imported); with a GPU they run compiled on CUDA (marked gpu), where a CUDA-graph capture of
each is checked too.

Tolerances. Elementwise results are compared in units in the last place (ulps) of their dtype:
16-bit results must equal the reference in all but 1 + 0.1 % of elements (both round the same
float32 values; they differ only where a float32 intermediate computed differently, a sum's
order, rsqrt, exp, lies next to a rounding boundary) and be within 2 ulps everywhere (a
1-ulp intermediate times a second rounded op); float32 results within 16 ulps (interpreter:
at most 5 measured). Rotary outputs x * cos + rotate_half(x) * sin can cancel to near zero,
where a 1-ulp difference in a term is many ulps of the result: they are compared against
the magnitude of their head, |got - want| <= eps(dtype) * max|head| for 16-bit, 8 eps for
float32 (where the q/k norm's few ulps carry through; interpreter: 1.7 eps measured). Router weights: rtol
2e-6 (float32 softmax; interpreter: 2 ulps measured); ids exactly (distinct logits).
"""

from __future__ import annotations

import os

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernels are defined (at import)
pytest.importorskip("triton")

from afkv.ops import layers  # noqa: E402
from afkv.ops import triton_fused as tf  # noqa: E402
from afkv.ops.layers import Rotary  # noqa: E402

if not _CUDA and not type(tf._rms_norm_kernel).__name__.startswith("Interpreted"):
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1 was set: run with TRITON_INTERPRET=1", allow_module_level=True
    )

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(_CUDA, reason="the interpreter runs only where CUDA is absent")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not _CUDA, reason="needs a CUDA GPU")]),
]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
EPS = 1e-6


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """Float bits as int64 ordered like the values (so that neighbours differ by 1)."""
    if x.dtype == torch.float32:
        bits = x.view(torch.int32).to(torch.int64)
        return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)
    bits = x.view(torch.int16).to(torch.int64)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def _assert_ulps(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.isfinite(got).all()
    ulps = (_ordered(got.cpu()) - _ordered(want.cpu())).abs()
    if want.dtype == torch.float32:
        assert ulps.max() <= 16, f"max {int(ulps.max())} ulps"
    else:
        assert ulps.max() <= 2, f"max {int(ulps.max())} ulps"
        differ = int((ulps != 0).sum())
        assert differ <= 1 + ulps.numel() // 1000, f"{differ} of {ulps.numel()} differ"


def _assert_head_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """got, want [..., D]: each head within eps(dtype) (float32: 8 eps) of its largest magnitude."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.isfinite(got).all()
    eps = torch.finfo(want.dtype).eps * (8 if want.dtype == torch.float32 else 1)
    got, want = got.float().cpu(), want.float().cpu()
    scale = want.abs().amax(-1, keepdim=True) * eps  # [..., 1]
    assert ((got - want).abs() <= scale).all(), f"max {float(((got - want).abs() / scale).max()):.2f} x eps * |head|"


def _randn(shape, dtype, device, gen, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * scale).to(dtype).to(device)


# ----------------------------------------------------------------------------------------------
# rms_norm, add_rms_norm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens", [1, 5, 64])
@pytest.mark.parametrize("dim", [64, 2048])
def test_rms_norm(device, dtype, num_tokens, dim):
    gen = torch.Generator().manual_seed(num_tokens * 7 + dim)
    x = _randn((num_tokens, dim), dtype, device, gen, scale=3.0)
    weight = _randn(dim, dtype, device, gen, scale=0.1) + 1
    _assert_ulps(tf.rms_norm(x, weight, EPS), layers.rms_norm(x, weight, EPS))


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_views_and_mixed_dtypes(device):
    """A row-strided view, a [T, H, D] input, an 8192-wide row, a float32 weight on bfloat16 x
    (the product is promoted to float32, as in torch)."""
    gen = torch.Generator().manual_seed(1)
    big = _randn((5, 3000), torch.bfloat16, device, gen)
    x = big[:, 100:2148]  # [5, 2048], row stride 3000
    weight = _randn(2048, torch.bfloat16, device, gen) + 1
    _assert_ulps(tf.rms_norm(x, weight, EPS), layers.rms_norm(x, weight, EPS))
    heads = _randn((3, 4, 128), torch.bfloat16, device, gen)
    w128 = _randn(128, torch.bfloat16, device, gen) + 1
    _assert_ulps(tf.rms_norm(heads, w128, EPS), layers.rms_norm(heads, w128, EPS))
    wide = _randn((2, 8192), torch.float32, device, gen)
    w_wide = _randn(8192, torch.float32, device, gen)
    _assert_ulps(tf.rms_norm(wide, w_wide, EPS), layers.rms_norm(wide, w_wide, EPS))
    w32 = weight.float() + 0.001
    got, want = tf.rms_norm(x, w32, EPS), layers.rms_norm(x, w32, EPS)
    assert got.dtype == torch.float32
    _assert_ulps(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens", [1, 5, 64])
@pytest.mark.parametrize("dim", [64, 2048])
def test_add_rms_norm(device, dtype, num_tokens, dim):
    gen = torch.Generator().manual_seed(num_tokens * 5 + dim)
    h = _randn((num_tokens, dim), dtype, device, gen, scale=4.0)
    delta = _randn((num_tokens, dim), dtype, device, gen)
    weight = _randn(dim, dtype, device, gen, scale=0.1) + 1
    h_new, normed = tf.add_rms_norm(h, delta, weight, EPS)
    want_h, want_normed = tf.ref_add_rms_norm(h, delta, weight, EPS)
    assert torch.equal(h_new, want_h)  # one rounded float32 add in both
    _assert_ulps(normed, want_normed)


@pytest.mark.parametrize("device", DEVICES)
def test_norm_checks_shapes(device):
    x = torch.zeros(2, 64, device=device)
    with pytest.raises(Exception, match="norm weight"):
        tf.rms_norm(x, torch.ones(32, device=device), EPS)
    with pytest.raises(Exception, match="delta"):
        tf.add_rms_norm(x, x.half(), torch.ones(64, device=device), EPS)
    assert tf.rms_norm(torch.zeros(0, 64, device=device), torch.ones(64, device=device), EPS).shape == (0, 64)


# ----------------------------------------------------------------------------------------------
# qk_norm_rope_write

_QK_CASES = [
    # num_tokens, num_heads, num_kv_heads, head_dim, qk_norm, dtype, kv dtype
    (1, 32, 4, 128, True, torch.bfloat16, torch.bfloat16),
    (5, 32, 4, 128, False, torch.bfloat16, torch.bfloat16),
    (64, 32, 4, 128, True, torch.bfloat16, torch.bfloat16),
    (5, 4, 2, 64, True, torch.float32, torch.float32),
    (64, 4, 2, 64, False, torch.float32, torch.float32),
    (1, 4, 2, 128, True, torch.float32, torch.float32),
    (5, 32, 4, 64, True, torch.float16, torch.float16),
    (5, 4, 2, 128, True, torch.bfloat16, torch.float32),
    (5, 4, 2, 64, False, torch.float32, torch.bfloat16),
]


def _qk_id(c) -> str:
    return f"t{c[0]}-h{c[1]}-kv{c[2]}-d{c[3]}-norm{c[4]}-{str(c[5])[6:]}-cache{str(c[6])[6:]}"


def _qk_inputs(case, device, gen):
    num_tokens, num_heads, num_kv_heads, head_dim, qk_norm, dtype, kv_dtype = case
    total = num_heads + 2 * num_kv_heads
    wide = _randn((num_tokens, total * head_dim + 16), dtype, device, gen, scale=2.0)
    qkv = wide[:, 16:]  # [T, (Hq + 2 Hkv) D], row stride larger than its width
    q_norm = _randn(head_dim, dtype, device, gen, scale=0.2) + 1 if qk_norm else None
    k_norm = _randn(head_dim, dtype, device, gen, scale=0.2) + 1 if qk_norm else None
    positions = torch.randint(0, 40000, (num_tokens,), generator=gen).to(device)
    cos, sin = Rotary(head_dim, 1e6, torch.device(device)).cos_sin(positions, dtype)  # [T, D] each
    num_blocks, block_size = num_tokens // 4 + 3, 8
    kv = _randn((num_blocks, 3, 2, block_size, num_kv_heads, head_dim), kv_dtype, device, gen)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]  # distinct slots
    return qkv, q_norm, k_norm, cos, sin, kv, (slots // block_size).to(device), (slots % block_size).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", _QK_CASES, ids=_qk_id)
def test_qk_norm_rope_write(device, case):
    _, num_heads, num_kv_heads, head_dim, _, _, _ = case
    gen = torch.Generator().manual_seed(case[0] * 13 + head_dim + num_heads)
    qkv, q_norm, k_norm, cos, sin, kv, blocks, offsets = _qk_inputs(case, device, gen)
    want_kv = kv.clone()
    geometry = (num_heads, num_kv_heads, head_dim, q_norm, k_norm, EPS, cos, sin)
    got = tf.qk_norm_rope_write(qkv, *geometry, kv, 1, blocks, offsets)
    want = tf.ref_qk_norm_rope_write(qkv, *geometry, want_kv, 1, blocks, offsets)
    assert got.is_contiguous() and got.shape == (qkv.shape[0], num_heads, head_dim)
    _assert_head_close(got, want)
    written = torch.zeros(kv.shape[0], kv.shape[3], dtype=torch.bool)
    written[blocks.cpu(), offsets.cpu()] = True
    assert torch.equal(kv[:, [0, 2]], want_kv[:, [0, 2]])  # other layers untouched
    unwritten = ~written.to(device)  # [num_blocks, block_size]
    assert torch.equal(kv[:, 1].transpose(1, 2)[unwritten], want_kv[:, 1].transpose(1, 2)[unwritten])  # other slots
    assert torch.equal(kv[:, 1, 1], want_kv[:, 1, 1])  # values: copied, rounded once to the cache dtype
    _assert_head_close(kv[:, 1, 0], want_kv[:, 1, 0])  # keys: rotated


@pytest.mark.parametrize("device", DEVICES)
def test_qk_norm_rope_write_is_exact_mostly(device):
    """16-bit: the kernel rounds where torch does, so nearly every element is bit-identical."""
    case = (64, 32, 4, 128, True, torch.bfloat16, torch.bfloat16)
    qkv, q_norm, k_norm, cos, sin, kv, blocks, offsets = _qk_inputs(case, device, torch.Generator().manual_seed(4))
    want_kv = kv.clone()
    geometry = (32, 4, 128, q_norm, k_norm, EPS, cos, sin)
    got = tf.qk_norm_rope_write(qkv, *geometry, kv, 0, blocks, offsets)
    want = tf.ref_qk_norm_rope_write(qkv, *geometry, want_kv, 0, blocks, offsets)
    assert (got != want).sum() <= got.numel() // 1000
    assert (kv != want_kv).sum() <= got.numel() // 1000


@pytest.mark.parametrize("device", DEVICES)
def test_qk_norm_rope_write_checks_shapes(device):
    qkv = torch.zeros(2, 8 * 64, device=device)
    cos = torch.zeros(2, 64, device=device)
    kv = torch.zeros(2, 1, 2, 4, 2, 64, device=device)
    slots = torch.zeros(2, dtype=torch.int64, device=device)
    with pytest.raises(Exception, match="qkv must be"):
        tf.qk_norm_rope_write(qkv, 5, 2, 64, None, None, EPS, cos, cos, kv, 0, slots, slots)
    with pytest.raises(Exception, match="together"):
        tf.qk_norm_rope_write(qkv, 4, 2, 64, torch.ones(64, device=device), None, EPS, cos, cos, kv, 0, slots, slots)
    with pytest.raises(Exception, match="cos must be"):
        tf.qk_norm_rope_write(qkv, 4, 2, 64, None, None, EPS, cos.half(), cos, kv, 0, slots, slots)


# ----------------------------------------------------------------------------------------------
# route_topk


def _distinct_logits(num_tokens: int, num_experts: int, dtype, device, gen) -> torch.Tensor:
    """Each row a permutation of distinct multiples of 1/32 (exact in every float dtype for E <= 512)."""
    rows = [torch.randperm(num_experts, generator=gen) for _ in range(num_tokens)]
    return ((torch.stack(rows) - num_experts // 2).float() / 32).to(dtype).to(device)  # [T, E]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("num_tokens", [1, 5, 64])
@pytest.mark.parametrize("num_experts,top_k", [(128, 8), (8, 2), (60, 4), (512, 10), (3, 3)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_topk(device, dtype, num_tokens, num_experts, top_k, renormalize):
    gen = torch.Generator().manual_seed(num_tokens + num_experts + top_k)
    logits = _distinct_logits(num_tokens, num_experts, dtype, device, gen)
    ids, weights = tf.route_topk(logits, top_k, renormalize)
    want_ids, want_weights = layers.route_topk(logits, top_k, renormalize)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights, rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_route_topk_ties_and_nan(device):
    """Equal probabilities: lowest expert id first. A NaN row: NaN weights, ids still in range."""
    logits = torch.zeros(3, 16, device=device)
    logits[1, [3, 9, 12]] = 1.0
    logits[2, 5] = float("nan")
    ids, weights = tf.route_topk(logits, 4, False)
    assert ids[0].tolist() == [0, 1, 2, 3]
    assert ids[1].tolist() == [3, 9, 12, 0]
    torch.testing.assert_close(weights[0], torch.full((4,), 1 / 16, device=device))
    assert ((ids[2] >= 0) & (ids[2] < 16)).all() and weights[2].isnan().all()


# ----------------------------------------------------------------------------------------------
# silu_mul


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_rows,inter", [(1, 768), (5, 64), (64, 768), (8, 1536), (3, 100)])
def test_silu_mul(device, dtype, num_rows, inter):
    gen = torch.Generator().manual_seed(num_rows * 3 + inter)
    wide = _randn((num_rows, 2 * inter + 8), dtype, device, gen, scale=3.0)
    gate_up = wide[:, 8:]  # [N, 2I], row stride larger than its width
    _assert_ulps(tf.silu_mul(gate_up), tf.ref_silu_mul(gate_up))


# ----------------------------------------------------------------------------------------------
# GPU only: CUDA-graph capture of every kernel


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs a CUDA GPU")
def test_kernels_are_cuda_graph_capturable():
    gen = torch.Generator().manual_seed(9)
    case = (8, 32, 4, 128, True, torch.bfloat16, torch.bfloat16)
    qkv, q_norm, k_norm, cos, sin, kv, blocks, offsets = _qk_inputs(case, "cuda", gen)
    h = _randn((8, 2048), torch.bfloat16, "cuda", gen)
    delta = _randn((8, 2048), torch.bfloat16, "cuda", gen)
    w = _randn(2048, torch.bfloat16, "cuda", gen) + 1
    logits = _distinct_logits(8, 128, torch.bfloat16, "cuda", gen)
    gate_up = _randn((64, 1536), torch.bfloat16, "cuda", gen)
    geometry = (32, 4, 128, q_norm, k_norm, EPS, cos, sin)

    def step():
        return (
            tf.rms_norm(h, w, EPS), tf.add_rms_norm(h, delta, w, EPS),
            tf.qk_norm_rope_write(qkv, *geometry, kv, 2, blocks, offsets),
            tf.route_topk(logits, 8, True), tf.silu_mul(gate_up),
        )  # fmt: skip

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for t in (h, delta, qkv, gate_up):
        t.copy_(_randn(t.shape, t.dtype, "cuda", gen))
    logits.copy_(_distinct_logits(8, 128, torch.bfloat16, "cuda", gen))
    want_kv = kv.clone()
    graph.replay()
    normed, (h_new, normed2), q, (ids, weights), y = outs
    _assert_ulps(normed, layers.rms_norm(h, w, EPS))
    assert torch.equal(h_new, h + delta)
    _assert_ulps(normed2, layers.rms_norm(h + delta, w, EPS))
    _assert_head_close(q, tf.ref_qk_norm_rope_write(qkv, *geometry, want_kv, 2, blocks, offsets))
    _assert_head_close(kv, want_kv)
    want_ids, want_weights = layers.route_topk(logits, 8, True)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights, rtol=2e-6, atol=1e-9)
    _assert_ulps(y, tf.ref_silu_mul(gate_up))
