"""afkv.ops.triton_attention against the torch references (afkv.ops.attention, afkv.ops.quant).

Skipped without triton (the CPU CI has none). With triton and no GPU, the kernels run on CPU
tensors under Triton's interpreter (TRITON_INTERPRET=1, set here before the module is
imported); with a GPU they run compiled on CUDA (marked gpu), where a few larger shapes and a
CUDA-graph capture are checked too.

Tolerances (max abs diff, plus rtol on the reference): float32 caches 2e-5 (IEEE float32
products, only the summation order differs); 16-bit caches and queries 3e-2 + 2e-2 * |ref|,
a few units in the last place of bfloat16 at the outputs' magnitude (random normal data: outputs
are averages of values ~N(0, 1); products in bfloat16, probabilities rounded to bfloat16
before P @ V, like flash attention, where the reference rounds only at the end).
"""

from __future__ import annotations

import os

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernels are defined (at import)
pytest.importorskip("triton")

from afkv.ops import attention, quant  # noqa: E402
from afkv.ops import triton_attention as ta  # noqa: E402
from afkv.ops.quant import QuantSpec  # noqa: E402

if not _CUDA and not type(ta._decode_kernel).__name__.startswith("Interpreted"):
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1 was set: run with TRITON_INTERPRET=1", allow_module_level=True
    )

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(_CUDA, reason="the interpreter runs only where CUDA is absent")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not _CUDA, reason="needs a CUDA GPU")]),
]

_BAD_BLOCK = 1 << 40  # block tables' padding: reading it would fault (GPU) or fail (interpreter)


def _tol(dtype: torch.dtype) -> dict:
    if dtype == torch.float32:
        return dict(atol=2e-5, rtol=2e-5)
    return dict(atol=3e-2, rtol=2e-2)


def _assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), **_tol(dtype))


def _cache(num_blocks, num_layers, block_size, num_kv_heads, head_dim, dtype, device, gen):
    shape = (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)
    return torch.randn(shape, generator=gen).to(dtype).to(device)  # [nbk, L, 2, bs, Hkv, D]


def _tables(context_lens: list[int], block_size: int, num_blocks: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct random blocks per sequence; -> (tables for the reference, padded with block 0;
    the same tables padded with an id far out of range)."""
    needed = [-(-n // block_size) for n in context_lens]
    nb = max(max(needed), 1) + 1  # one more column than any sequence needs: always some padding
    perm = torch.randperm(num_blocks, generator=gen)
    assert sum(needed) <= num_blocks
    ref = torch.zeros(len(context_lens), nb, dtype=torch.int64)
    bad = torch.full((len(context_lens), nb), _BAD_BLOCK, dtype=torch.int64)
    start = 0
    for b, k in enumerate(needed):
        ref[b, :k] = bad[b, :k] = perm[start : start + k]
        start += k
    return ref, bad


def _poison_unused(kv: torch.Tensor, tables: torch.Tensor, context_lens: list[int], block_size: int) -> torch.Tensor:
    """A copy of kv whose blocks that no sequence needs hold NaN: reading one shows in the output."""
    used = torch.zeros(kv.shape[0], dtype=torch.bool)
    for b, n in enumerate(context_lens):
        used[tables[b, : -(-n // block_size)]] = True
    poisoned = kv.clone()
    poisoned[~used.to(kv.device)] = float("nan")
    return poisoned


# ----------------------------------------------------------------------------------------------
# decode over a float cache

_DECODE_CASES = [
    # dtype, num_heads, num_kv_heads, head_dim, block_size, context_lens, window, num_splits
    (torch.float32, 4, 4, 64, 16, [1, 17, 50, 96], None, None),
    (torch.float32, 8, 2, 128, 16, [33, 1, 64], 24, 3),
    (torch.float32, 16, 2, 64, 32, [70, 5], None, 4),
    (torch.bfloat16, 4, 4, 128, 16, [1, 17, 96], 40, 2),
    (torch.bfloat16, 8, 2, 64, 16, [100, 3, 16, 31], None, 3),
    (torch.bfloat16, 16, 2, 128, 32, [129], None, None),
    (torch.bfloat16, 8, 1, 64, 64, [1, 200], 7, 5),
    (torch.float16, 12, 4, 64, 16, [45, 2], None, 2),
]


def _decode_id(c) -> str:
    return f"{str(c[0])[6:]}-h{c[1]}-kv{c[2]}-d{c[3]}-bs{c[4]}-w{c[6]}-s{c[7]}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", _DECODE_CASES, ids=_decode_id)
def test_decode_matches_reference(device, case):
    dtype, num_heads, num_kv_heads, head_dim, block_size, context_lens, window, num_splits = case
    gen = torch.Generator().manual_seed(len(context_lens) * 1000 + num_heads)
    num_blocks = sum(-(-n // block_size) for n in context_lens) + 3
    kv = _cache(num_blocks, 2, block_size, num_kv_heads, head_dim, dtype, device, gen)
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=gen).to(dtype).to(device)  # [B, H, D]
    ref_tables, bad_tables = _tables(context_lens, block_size, num_blocks, gen)
    lens = torch.tensor(context_lens, device=device)
    want = attention.paged_decode_attention(q, kv, 1, ref_tables.to(device), lens, sliding_window=window)
    poisoned = _poison_unused(kv, ref_tables, context_lens, block_size)
    got = ta.paged_decode_attention(
        q, poisoned, 1, bad_tables.to(device), lens, sliding_window=window, num_splits=num_splits
    )
    _assert_close(got, want, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_decode_empty_rows_are_zero(device, num_splits):
    """Padding rows of a captured batch (context_len 0) read nothing and give zeros; the
    other rows are unaffected."""
    gen = torch.Generator().manual_seed(7)
    kv = _cache(6, 1, 16, 2, 64, torch.bfloat16, device, gen)
    q = torch.randn(3, 4, 64, generator=gen).to(torch.bfloat16).to(device)
    tables = torch.full((3, 4), _BAD_BLOCK, dtype=torch.int64)
    tables[1, :2] = torch.tensor([4, 2])
    lens = torch.tensor([0, 20, 0], device=device)
    got = ta.paged_decode_attention(q, kv, 0, tables.to(device), lens, num_splits=num_splits)
    assert (got[0] == 0).all() and (got[2] == 0).all()
    ref_tables = torch.tensor([[4, 2, 0, 0]], device=device)
    want = attention.paged_decode_attention(q[1:2], kv, 0, ref_tables, lens[1:2])
    _assert_close(got[1:2], want, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_custom_scale(device):
    gen = torch.Generator().manual_seed(3)
    kv = _cache(4, 1, 16, 2, 64, torch.float32, device, gen)
    q = torch.randn(1, 4, 64, generator=gen).to(device)
    tables = torch.tensor([[3, 1]], device=device)
    lens = torch.tensor([27], device=device)
    got = ta.paged_decode_attention(q, kv, 0, tables, lens, scale=0.3, num_splits=2)
    want = attention.paged_decode_attention(q * (0.3 * 64**0.5), kv, 0, tables, lens)  # SDPA's scale is D**-0.5
    _assert_close(got, want, torch.float32)


def test_num_splits_depends_on_shapes_only():
    assert ta.num_decode_splits(1, 4, 2048, 64, None) == 1
    assert ta.num_decode_splits(1, 1, 4096, 64, None) == 4
    assert ta.num_decode_splits(1, 1, 16, 64, None) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_checks_shapes(device):
    kv = torch.zeros(2, 1, 2, 16, 2, 64, device=device)
    q = torch.zeros(1, 3, 64, device=device)  # 3 heads over 2 kv heads
    with pytest.raises(Exception, match="kv heads"):
        ta.paged_decode_attention(q, kv, 0, torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, dtype=torch.int64))


# ----------------------------------------------------------------------------------------------
# decode over serialised quantized blocks

_QUANT_CASES = [
    # spec, q dtype, num_heads, num_kv_heads, head_dim, block_size, seq_lens, tail_lens, num_splits
    (QuantSpec(8, 4), torch.float32, 8, 2, 64, 16, [1, 37, 0, 64], None, 3),
    (QuantSpec(8, 16), torch.bfloat16, 4, 4, 128, 16, [50, 16], [5, 0], None),
    (QuantSpec(4, 2), torch.float32, 16, 2, 64, 16, [33, 2], [16, 1], 2),
    (QuantSpec(4, 16), torch.bfloat16, 8, 1, 64, 32, [0, 90], [3, 12], 4),
    (QuantSpec(8, 32), torch.float16, 8, 2, 128, 32, [64, 7], None, 1),
]


def _quant_reference(q, blocks, tables, seq_lens, tail_kv, tail_lens, *, spec, num_layers, layer, block_size,
                     num_kv_heads):  # fmt: skip
    """float32 attention over dequantized blocks followed by the float tail."""
    head_dim = q.shape[-1]
    shape = (spec, num_layers, block_size, num_kv_heads, head_dim)
    group = q.shape[1] // num_kv_heads
    out = torch.zeros(q.shape, dtype=torch.float32)
    for b, n in enumerate(seq_lens):
        qb = quant.from_bytes(blocks[tables[b, : -(-n // block_size)]], *shape)
        k = quant.dequantize_keys(quant.layer_of(qb.keys, layer), torch.float32).flatten(0, 1)[:n]  # [n, Hkv, D]
        v = quant.dequantize_values(quant.layer_of(qb.values, layer), torch.float32).flatten(0, 1)[:n]
        t = tail_lens[b]
        k = torch.cat([k, tail_kv[b, 0, :t].float()]).repeat_interleave(group, dim=1)  # [N, H, D]
        v = torch.cat([v, tail_kv[b, 1, :t].float()]).repeat_interleave(group, dim=1)
        if k.shape[0] == 0:
            continue
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * head_dim**-0.5  # [H, N]
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v)
    return out.to(q.dtype)


def _quant_id(c) -> str:
    return f"b{c[0].bits}g{c[0].group_size}-{str(c[1])[6:]}-h{c[2]}-kv{c[3]}-d{c[4]}-tail{c[7] is not None}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", _QUANT_CASES, ids=_quant_id)
def test_decode_quant_matches_reference(device, case):
    spec, dtype, num_heads, num_kv_heads, head_dim, block_size, seq_lens, tail_lens, num_splits = case
    num_layers, layer = 2, 1
    gen = torch.Generator().manual_seed(sum(seq_lens) + spec.bits)
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 2
    kv = torch.randn(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim, generator=gen)
    blocks = quant.to_bytes(quant.quantize_block(kv, spec))  # [num_blocks, packed_nbytes]
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(dtype)  # [B, H, D]
    ref_tables, bad_tables = _tables(seq_lens, block_size, num_blocks, gen)
    geometry = dict(layer=layer, spec=spec, num_layers=num_layers, block_size=block_size, num_kv_heads=num_kv_heads)
    if tail_lens is None:
        want = quant.paged_decode_attention(q, blocks, ref_tables, torch.tensor(seq_lens), **geometry)
        tail_kv = tail = None
    else:
        tail_kv = torch.randn(len(seq_lens), 2, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
        want = _quant_reference(q, blocks, ref_tables, seq_lens, tail_kv, tail_lens, **geometry)
        tail_kv, tail = tail_kv.to(device), torch.tensor(tail_lens, device=device)
    got = ta.paged_decode_attention_quant(
        q.to(device), blocks.to(device), bad_tables.to(device), torch.tensor(seq_lens, device=device),
        tail_kv=tail_kv, tail_lens=tail, num_splits=num_splits, **geometry,
    )  # fmt: skip
    _assert_close(got, want, dtype)


# ----------------------------------------------------------------------------------------------
# prefill

_PREFILL_CASES = [
    # dtype, num_heads, num_kv_heads, head_dim, block_size, (n, context_len), window
    (torch.float32, 4, 4, 64, 16, (5, 5), None),
    (torch.float32, 8, 2, 128, 16, (37, 100), 20),
    (torch.float32, 6, 2, 64, 32, (1, 1), None),
    (torch.bfloat16, 16, 2, 64, 16, (70, 70), None),
    (torch.bfloat16, 8, 1, 128, 16, (3, 129), 33),
    (torch.bfloat16, 4, 4, 64, 64, (65, 80), None),
]


def _prefill_id(c) -> str:
    return f"{str(c[0])[6:]}-h{c[1]}-kv{c[2]}-d{c[3]}-bs{c[4]}-n{c[5][0]}-ctx{c[5][1]}-w{c[6]}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", _PREFILL_CASES, ids=_prefill_id)
def test_prefill_matches_reference(device, case):
    dtype, num_heads, num_kv_heads, head_dim, block_size, (n, context_len), window = case
    gen = torch.Generator().manual_seed(n * 31 + context_len)
    num_blocks = -(-context_len // block_size) + 4
    kv = _cache(num_blocks, 2, block_size, num_kv_heads, head_dim, dtype, device, gen)
    block_ids = torch.randperm(num_blocks, generator=gen)[: -(-context_len // block_size)].to(device)
    q = torch.randn(n, num_heads, head_dim, generator=gen).to(dtype).to(device)  # [n, H, D]
    want = attention.paged_attention(q, kv, 1, block_ids, context_len, sliding_window=window)
    got = ta.paged_prefill_attention(q, kv, 1, block_ids, context_len, sliding_window=window)
    _assert_close(got, want, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [None, 10])
def test_prefill_varlen_matches_per_sequence_reference(device, window):
    dtype, num_heads, num_kv_heads, head_dim, block_size = torch.bfloat16, 8, 2, 64, 16
    gen = torch.Generator().manual_seed(11)
    seqs = [(4, 40), (1, 1), (19, 19), (0, 12)]  # (new queries, context_len)
    ref_tables, bad_tables = _tables([c for _, c in seqs], block_size, 12, gen)
    kv = _cache(12, 1, block_size, num_kv_heads, head_dim, dtype, device, gen)
    q = torch.randn(sum(n for n, _ in seqs), num_heads, head_dim, generator=gen).to(dtype).to(device)  # [T, H, D]
    cu = torch.tensor([0] + [sum(n for n, _ in seqs[: i + 1]) for i in range(len(seqs))], device=device)
    lens = torch.tensor([c for _, c in seqs], device=device)
    got = ta.paged_prefill_attention_varlen(
        q, kv, 0, bad_tables.to(device), cu, lens, max(n for n, _ in seqs), sliding_window=window
    )
    for b, (n, c) in enumerate(seqs):
        if n == 0:
            continue
        rows = slice(int(cu[b]), int(cu[b + 1]))
        want = attention.paged_attention(q[rows], kv, 0, ref_tables[b].to(device), c, sliding_window=window)
        _assert_close(got[rows], want, dtype)


# ----------------------------------------------------------------------------------------------
# GPU only: real shapes, CUDA graphs; the benchmark


@pytest.mark.parametrize("num_heads,num_kv_heads", [(32, 4), (32, 8)])
@pytest.mark.parametrize("batch,max_context", [(1, 2048), (64, 1000), (256, 300)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs a CUDA GPU")
def test_decode_real_shapes(num_heads, num_kv_heads, batch, max_context, dtype):
    gen = torch.Generator().manual_seed(batch)
    lens = torch.randint(1, max_context + 1, (batch,), generator=gen).tolist()
    block_size = 16
    num_blocks = sum(-(-n // block_size) for n in lens) + 1
    kv = _cache(num_blocks, 1, block_size, num_kv_heads, 128, dtype, "cuda", gen)
    q = torch.randn(batch, num_heads, 128, generator=gen).to(dtype).cuda()
    ref_tables, bad_tables = _tables(lens, block_size, num_blocks, gen)
    lens_t = torch.tensor(lens, device="cuda")
    want = attention.paged_decode_attention(q, kv, 0, ref_tables.cuda(), lens_t)
    got = ta.paged_decode_attention(q, kv, 0, bad_tables.cuda(), lens_t)
    _assert_close(got, want, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs a CUDA GPU")
def test_decode_is_cuda_graph_capturable():
    gen = torch.Generator().manual_seed(5)
    batch, nb, block_size = 8, 8, 16
    kv = _cache(batch * nb, 1, block_size, 4, 128, torch.bfloat16, "cuda", gen)
    q = torch.randn(batch, 32, 128, generator=gen).to(torch.bfloat16).cuda()
    tables = torch.arange(batch * nb, device="cuda").reshape(batch, nb)
    lens = torch.full((batch,), 5, device="cuda")
    ta.paged_decode_attention(q, kv, 0, tables, lens)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ta.paged_decode_attention(q, kv, 0, tables, lens)
    new_lens = torch.tensor([0, 1, 16, 17, 100, 128, 3, 64], device="cuda")
    lens.copy_(new_lens)
    graph.replay()
    want = attention.paged_decode_attention(q[1:], kv, 0, tables[1:], new_lens[1:])
    _assert_close(out[1:].clone(), want, torch.bfloat16)
    assert (out[0] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_bench_decode_reports(device, bits):
    """The benchmark runs (on the CPU only as a smoke test: the interpreter's times mean nothing)."""
    result = ta.bench_decode(2, 40, 8, 2, 64, bits=bits, group_size=8, iters=2, warmup=1, device=device)
    assert result["kv_bytes"] == 2 * 40 * 2 * 2 * 64 * 2
    assert result["kernel_s"] > 0 and result["reference_s"] > 0 and result["kernel_bytes_per_s"] > 0
