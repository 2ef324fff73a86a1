"""afkv.ops.triton_attention against the torch references (afkv.ops.attention).

Skipped without triton (the CPU CI has none). With triton and no GPU, the kernels run on CPU
tensors under Triton's interpreter (TRITON_INTERPRET=1, set here before the module is
imported); with a GPU they run compiled on CUDA (marked gpu), where a few larger shapes and a
CUDA-graph capture are checked too.

Tolerances (max abs diff, plus rtol on the reference): float32 caches 2e-5 (IEEE float32
products, only the summation order differs); 16-bit caches and queries 3e-2 + 2e-2 * |ref|,
a few units in the last place of bfloat16 at the outputs' magnitude (random normal data: outputs
are averages of values ~N(0, 1); products in bfloat16, probabilities rounded to bfloat16
before P @ V, like flash attention, where the reference rounds only at the end). Quantized
tiers (fp8 / int8 / int4 rows plus staging blocks) against float32 attention over the
dequantized blocks, with the same tolerances (on CUDA the products over codes run in float16:
queries, and probabilities times scales, rounded to float16).
"""

from __future__ import annotations

import dataclasses
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


def test_num_splits_depends_on_the_batch_power_of_two_only(monkeypatch):
    monkeypatch.setattr(ta, "_sm_count", lambda device_index: 132)
    assert ta.num_decode_splits(1, 4, 0) == 64  # 4 programs per SM over 4 heads, at most 64 parts
    assert ta.num_decode_splits(8, 4, 0) == 17
    assert ta.num_decode_splits(5, 4, 0) == ta.num_decode_splits(8, 4, 0)  # a graph's bucket of 8 rows
    assert ta.num_decode_splits(256, 4, 0) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_checks_shapes(device):
    kv = torch.zeros(2, 1, 2, 16, 2, 64, device=device)
    q = torch.zeros(1, 3, 64, device=device)  # 3 heads over 2 kv heads
    with pytest.raises(Exception, match="kv heads"):
        ta.paged_decode_attention(q, kv, 0, torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, dtype=torch.int64))


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
# a quantized device tier: fp8 / int8 / int4 rows plus full-precision staging blocks

_QUANT_KINDS = ["fp8", "int8", "int4"]
_QUANT_DECODE_CASES = [
    # dtype, num_heads, num_kv_heads, head_dim, block_size, context_lens, staging blocks per row, window, splits
    (torch.float32, 8, 2, 64, 16, [1, 37, 0, 64, 33], 2, None, 3),
    (torch.bfloat16, 4, 4, 128, 16, [50, 16, 17], 1, None, None),
    (torch.float32, 16, 2, 64, 4, [33, 2, 9], 3, 7, 2),
    (torch.bfloat16, 8, 1, 64, 32, [0, 90, 31], 2, None, 4),
    (torch.float16, 8, 2, 128, 16, [64, 7], 1, 20, 1),
    (torch.float16, 4, 2, 16, 16, [65, 40, 3], 1, None, None),  # the tiny models' head_dim
]


def _quant_cache(kind, dtype, num_kv_heads, head_dim, block_size, context_lens, max_tail, device, gen,
                 num_layers=2):  # fmt: skip
    """A QuantizedKVCache whose rows and staging blocks are random, each row's table its
    quantized blocks then up to max_tail staging blocks (ids num_blocks + s). -> (cache, tables
    for the reference padded with 0, the same padded with an id far out of range). Rows and
    staging blocks no table uses hold NaN (0xFF bytes), so reading one shows."""
    spec = QuantSpec(kind, num_layers, block_size, num_kv_heads, head_dim, quant.scale_dtype_for(dtype))
    needed = [-(-n // block_size) for n in context_lens]
    staged = [min(n, 1 + (b % max_tail)) for b, n in enumerate(needed)]  # 1 .. max_tail staging blocks
    num_rows = sum(n - s for n, s in zip(needed, staged)) + 3
    num_staging = sum(staged) + 2
    full = torch.randn(num_rows, *spec.block_shape, generator=gen)
    rows = quant.quantize_rows(full, spec)  # [nr, row_nbytes]
    staging = torch.randn(num_staging, *spec.block_shape, generator=gen).to(dtype)
    row_perm, stage_perm = torch.randperm(num_rows, generator=gen), torch.randperm(num_staging, generator=gen)
    width = max(max(needed), 1) + 1
    ref = torch.zeros(len(context_lens), width, dtype=torch.int64)
    bad = torch.full((len(context_lens), width), _BAD_BLOCK, dtype=torch.int64)
    r = s = 0
    used_rows, used_staging = set(), set()
    for b, (n, k) in enumerate(zip(needed, staged)):
        ids = [int(row_perm[r + j]) for j in range(n - k)] + [num_rows + int(stage_perm[s + j]) for j in range(k)]
        r, s = r + n - k, s + k
        used_rows |= {i for i in ids if i < num_rows}
        used_staging |= {i - num_rows for i in ids if i >= num_rows}
        ref[b, :n] = bad[b, :n] = torch.tensor(ids, dtype=torch.int64)
    rows[[i for i in range(num_rows) if i not in used_rows]] = 0xFF
    staging[[i for i in range(num_staging) if i not in used_staging]] = float("nan")
    cache = attention.QuantizedKVCache(rows.to(device), staging.to(device), spec, max_tail_blocks=max_tail)
    return cache, ref, bad


def _quant_reference_cache(cache):
    """The same cache on the CPU, with the poison replaced (the torch reference gathers padded tables)."""
    rows, staging = cache.blocks.cpu().clone(), cache.staging.cpu().clone().nan_to_num(0.0)
    return attention.QuantizedKVCache(rows, staging, cache.spec, cache.max_tail_blocks)


def _quant_decode_reference(q, cache, layer, tables, lens, window):
    """float32 attention over the dequantized rows and staging blocks (the torch reference's scratch)."""
    ref = _quant_reference_cache(cache)
    scratch = attention.gather_layer(ref, layer, tables).float()  # [B, nb, 2, bs, Hkv, D]
    nan_free = torch.where(scratch.isnan(), 0.0, scratch)  # poisoned padding blocks are masked out anyway
    batch, width = tables.shape
    ids = torch.arange(batch * width).view(batch, width)
    return attention.paged_decode_attention(q.float().cpu(), nan_free.flatten(0, 1)[:, None], 0, ids, lens.cpu(),
                                            window).to(q.dtype)


def _quant_decode_id(c) -> str:
    return f"{str(c[0])[6:]}-h{c[1]}-kv{c[2]}-d{c[3]}-bs{c[4]}-tail{c[6]}-w{c[7]}-s{c[8]}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", _QUANT_KINDS)
@pytest.mark.parametrize("case", _QUANT_DECODE_CASES, ids=_quant_decode_id)
def test_decode_quantized_matches_reference(device, kind, case):
    dtype, num_heads, num_kv_heads, head_dim, block_size, context_lens, max_tail, window, num_splits = case
    gen = torch.Generator().manual_seed(sum(context_lens) + len(kind))
    cache, ref_tables, bad_tables = _quant_cache(kind, dtype, num_kv_heads, head_dim, block_size, context_lens,
                                                 max_tail, device, gen)
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=gen).to(dtype)  # [B, H, D]
    lens = torch.tensor(context_lens)
    want = _quant_decode_reference(q, cache, 1, ref_tables, lens, window)
    got = ta.paged_decode_attention_quantized(q.to(device), cache, 1, bad_tables.to(device), lens.to(device), window,
                                              num_splits=num_splits)
    _assert_close(got, want, dtype)
    for b, n in enumerate(context_lens):
        if n == 0:
            assert (got[b] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", _QUANT_KINDS)
@pytest.mark.parametrize("case", _QUANT_DECODE_CASES, ids=_quant_decode_id)
def test_decode_quantized_load_variants_equal_loading_in_place(device, kind, case):
    """How the kernel loads its tiles (QuantDecodeConfig: the next tile's scale data ahead,
    prefetch 1, or also its codes, 2; codes as 32-bit words, value codes 1, key and value codes 2)
    changes when and how bytes arrive, never what is computed: the same bits as in-place byte
    loads of the same tiles and splits (windows, staging tails, several tiles per chunk, head_dim
    16: 8-byte int4 rows, 4-token blocks) under the interpreter; compiled, within the tolerance.
    Deferred sums (each tile's sums over its tokens taken once at the end: another order) and,
    on CUDA, words converted by byte permutes (cvt 1) against the reference."""
    if device == "cuda" and _QUANT_DECODE_CASES.index(case) not in (2, 5):  # each case compiles 4 launches
        pytest.skip("on CUDA: 4-token blocks with a window, and head_dim 16 (the GPU tests' time)")
    dtype, num_heads, num_kv_heads, head_dim, block_size, context_lens, max_tail, window, num_splits = case
    gen = torch.Generator().manual_seed(sum(context_lens) + 3 * len(kind))
    cache, ref_tables, bad_tables = _quant_cache(kind, dtype, num_kv_heads, head_dim, block_size, context_lens,
                                                 max_tail, device, gen)
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=gen).to(dtype)  # [B, H, D]
    lens = torch.tensor(context_lens)
    want = _quant_decode_reference(q, cache, 1, ref_tables, lens, window)
    in_place = ta.QuantDecodeConfig(max(16, block_size), halves=kind == "int8")

    def decode(config):
        return ta.paged_decode_attention_quantized(q.to(device), cache, 1, bad_tables.to(device), lens.to(device),
                                                   window, num_splits=num_splits, config=config)
    got = decode(in_place)
    _assert_close(got, want, dtype)
    for fields in (dict(prefetch=1, words=1), dict(prefetch=2, words=2, num_stages=1)):
        variant = decode(dataclasses.replace(in_place, **fields))
        if device == "cpu":
            assert torch.equal(variant, got), fields
        else:  # compiled differently: the compiler may contract other products into FMAs
            _assert_close(variant, want, dtype)
    _assert_close(decode(dataclasses.replace(in_place, prefetch=2, words=2, deferred_sums=True)), want, dtype)
    if device == "cuda":  # words converted by byte permutes (inline PTX: CUDA only)
        _assert_close(decode(dataclasses.replace(in_place, prefetch=1, words=2, cvt=1)), want, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_code_words_fall_back_to_bytes_where_codes_are_not_whole_words(device, kind):
    """head_dim 20: int4's 10 code bytes per (token, head), int8's halves of 10 bytes, are not
    32-bit words; a launch asking for words loads bytes there (an unaligned word load faults)."""
    gen = torch.Generator().manual_seed(5)
    lens = [40, 7]
    cache, ref_tables, bad_tables = _quant_cache(kind, torch.float32, 2, 20, 16, lens, 1, device, gen)
    q = torch.randn(2, 4, 20, generator=gen)
    lens_t = torch.tensor(lens)
    want = _quant_decode_reference(q, cache, 1, ref_tables, lens_t, None)
    got = [ta.paged_decode_attention_quantized(q.to(device), cache, 1, bad_tables.to(device), lens_t.to(device),
                                               config=ta.QuantDecodeConfig(16, halves=True, prefetch=2, words=words))
           for words in (0, 2)]
    _assert_close(got[0], want, torch.float32)
    assert torch.equal(got[0].cpu(), got[1].cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["auto", *_QUANT_KINDS])
def test_decode_rows_do_not_depend_on_the_batch_padding(device, kind, monkeypatch):
    """What a CUDA graph of the decode step changes: the batch is padded to its bucket (rows
    of context 0 here; the graph's attend a scratch block) and the tables to the graph's width.
    Each real row's output keeps its bits (the same chunks and the same merge), whatever the
    device's SM count makes of the split. float32: no rounding of the output hides a change
    of summation order."""
    monkeypatch.setattr(ta, "_sm_count", lambda device_index: 6)  # 6 SMs: 5 and 8 rows of 2 heads split alike
    gen = torch.Generator().manual_seed(3)
    lens = [70, 300, 1, 33, 197]
    if kind == "auto":
        kv = _cache(48, 1, 16, 2, 64, torch.float32, device, gen)
        ref_tables, bad_tables = _tables(lens, 16, 48, gen)

        def decode(q, tables, lens_t):
            return ta.paged_decode_attention(q, kv, 0, tables, lens_t)
    else:
        cache, ref_tables, bad_tables = _quant_cache(kind, torch.float32, 2, 64, 16, lens, 2, device, gen)
        prefetching = ta.QuantDecodeConfig(32, num_stages=1, prefetch=2, words=2, deferred_sums=True)

        def decode(q, tables, lens_t):
            return torch.stack([ta.paged_decode_attention_quantized(q, cache, 1, tables, lens_t, config=config)
                                for config in (None, prefetching)])  # the table's launch, a prefetching one
    q = torch.randn(8, 8, 64, generator=gen).to(torch.float32)
    lens_t = torch.tensor(lens + [0, 0, 0])
    wide = torch.cat([bad_tables, torch.full((5, 7), _BAD_BLOCK)], 1)
    padded = torch.cat([wide, torch.full((3, wide.shape[1]), _BAD_BLOCK)])
    eager = decode(q[:5].to(device), bad_tables.to(device), lens_t[:5].to(device))
    graph = decode(q.to(device), padded.to(device), lens_t.to(device))
    assert torch.equal(eager.cpu(), graph[..., :5, :, :].cpu())


_QUANT_PREFILL_CASES = [
    # dtype, num_heads, num_kv_heads, head_dim, block_size, (n, context_len), window
    (torch.float32, 8, 2, 64, 16, (37, 100), None),
    (torch.float32, 4, 4, 128, 4, (5, 23), 9),
    (torch.bfloat16, 16, 2, 64, 16, (70, 70), None),
    (torch.bfloat16, 8, 1, 128, 32, (3, 129), 33),
    (torch.float16, 32, 4, 128, 16, (40, 90), None),
    (torch.float16, 4, 2, 16, 16, (24, 65), None),  # the tiny models' head_dim (16) and 32
    (torch.bfloat16, 4, 2, 16, 16, (64, 64), None),
    (torch.bfloat16, 8, 2, 32, 16, (50, 120), None),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", _QUANT_KINDS)
@pytest.mark.parametrize("case", _QUANT_PREFILL_CASES, ids=_prefill_id)
def test_prefill_quantized_matches_reference(device, kind, case):
    """A chunk's queries over quantized blocks, then staging blocks holding the chunk itself."""
    dtype, num_heads, num_kv_heads, head_dim, block_size, (n, context_len), window = case
    gen = torch.Generator().manual_seed(n * 31 + context_len)
    needed = -(-context_len // block_size)
    num_staging = needed - (context_len - n) // block_size  # the chunk's blocks (and a partial one before it)
    cache, ref_tables, bad_tables = _quant_cache(kind, dtype, num_kv_heads, head_dim, block_size, [context_len],
                                                 num_staging, device, gen)
    q = torch.randn(n, num_heads, head_dim, generator=gen).to(dtype)  # [n, H, D]
    ref = _quant_reference_cache(cache)
    want = attention.paged_attention_quantized(q, ref, 1, ref_tables[0, :needed], context_len, window)
    got = ta.paged_prefill_attention_quantized(q.to(device), cache, 1, bad_tables[0, :needed].to(device),
                                               context_len, window)
    _assert_close(got, want, dtype)


def _sweep_variants(kind: str) -> list:
    """The sweep's variants that compute differently under the interpreter (warps, stages and
    register caps only change the compiled code; cvt 1 is inline PTX: CUDA only). int8 in
    halves, prefetching, codes as words and deferred sums among them."""
    seen = {}
    for c in ta.sweep_configs(kind):
        if c.cvt != 1:
            seen.setdefault((c.block_n, c.programs_per_sm, c.cvt, c.halves, c.min_split_tiles, c.prefetch, c.words,
                             c.deferred_sums), c)
    return list(seen.values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", _QUANT_KINDS)
def test_every_sweep_variant_matches_the_reference(device, kind):
    """Every launch `afkv bench kv-quant --sweep` may put in the table computes the same
    attention (within the 16-bit tolerance): tile widths, split counts, code conversions, int8
    in halves (the interpreter); the inline-PTX conversion (CUDA)."""
    gen = torch.Generator().manual_seed(7)
    lens = [70, 1, 150, 0]
    cache, ref_tables, bad_tables = _quant_cache(kind, torch.bfloat16, 2, 64, 16, lens, 2, device, gen)
    q = torch.randn(len(lens), 8, 64, generator=gen).to(torch.bfloat16)
    lens_t = torch.tensor(lens)
    want = _quant_decode_reference(q, cache, 1, ref_tables, lens_t, None)
    if device == "cpu":
        variants = _sweep_variants(kind)
        assert len(variants) >= 5 and any(c.prefetch == 2 and c.words == 2 for c in variants)
        assert any(c.deferred_sums for c in variants)
    else:  # what only CUDA runs or compiles differently (the sweep checks every variant at its shapes, and
        # compiling all is slow): inline PTX, the loads' variants
        variants = [c for c in ta.sweep_configs(kind) if c.cvt == 1 or c.prefetch or c.words or c.deferred_sums]
    for config in variants:
        got = ta.paged_decode_attention_quantized(q.to(device), cache, 1, bad_tables.to(device), lens_t.to(device),
                                                  config=config)
        _assert_close(got, want, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
def test_quantized_kernels_check_their_inputs(device):
    gen = torch.Generator().manual_seed(1)
    cache, _, tables = _quant_cache("int8", torch.float32, 2, 64, 16, [20], 1, device, gen)
    with pytest.raises(Exception, match="kv heads"):
        ta.paged_decode_attention_quantized(torch.zeros(1, 3, 64, device=device), cache, 0, tables.to(device),
                                            torch.tensor([20], device=device))
    with pytest.raises(Exception, match="layer"):
        ta.paged_decode_attention_quantized(torch.zeros(1, 4, 64, device=device), cache, 2, tables.to(device),
                                            torch.tensor([20], device=device))


# ----------------------------------------------------------------------------------------------
# GPU only: real shapes, CUDA graphs


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


@pytest.mark.parametrize("kind", _QUANT_KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(32, 4), (32, 8)])
@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs a CUDA GPU")
def test_decode_quantized_real_shapes(kind, dtype, num_heads, num_kv_heads):
    """Real head shapes, long random contexts: the fused kernel (float16 products over codes)
    against float32 attention over the dequantized blocks, within the 16-bit tolerance."""
    gen = torch.Generator().manual_seed(num_kv_heads)
    lens = torch.randint(1, 3000, (24,), generator=gen).tolist()
    cache, ref_tables, bad_tables = _quant_cache(kind, dtype, num_kv_heads, 128, 16, lens, 2, "cuda", gen,
                                                 num_layers=1)
    q = torch.randn(len(lens), num_heads, 128, generator=gen).to(dtype)
    lens_t = torch.tensor(lens)
    want = _quant_decode_reference(q, cache, 0, ref_tables, lens_t, None)
    got = ta.paged_decode_attention_quantized(q.cuda(), cache, 0, bad_tables.cuda(), lens_t.cuda())
    _assert_close(got, want, dtype)


@pytest.mark.parametrize("kind", _QUANT_KINDS)
@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs a CUDA GPU")
def test_decode_quantized_is_cuda_graph_capturable(kind):
    gen = torch.Generator().manual_seed(5)
    lens = [300, 40, 1, 129]
    cache, ref_tables, tables = _quant_cache(kind, torch.bfloat16, 4, 128, 16, lens, 1, "cuda", gen)
    tables = ref_tables.cuda()
    q = torch.randn(4, 32, 128, generator=gen).to(torch.bfloat16).cuda()
    lens_t = torch.tensor(lens, device="cuda")
    ta.paged_decode_attention_quantized(q, cache, 1, tables, lens_t)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ta.paged_decode_attention_quantized(q, cache, 1, tables, lens_t)
    new_lens = torch.tensor([0, 33, 1, 120], device="cuda")  # still within each row's blocks, staging last
    lens_t.copy_(new_lens)
    graph.replay()
    want = _quant_decode_reference(q, cache, 1, ref_tables, new_lens.cpu(), None)
    _assert_close(out.clone()[1:], want[1:], torch.bfloat16)
    assert (out[0] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", _QUANT_KINDS)
def test_the_model_step_on_a_quantized_tier_runs_the_kernels_like_the_reference(tiny_dir, kind, device):
    """The attention side over a quantized device tier (prefill chunks through the prefill
    kernel, then a batched decode step through the decode kernel, the K/V write into staging
    blocks), against the same steps through the torch reference: CPU under the interpreter, or
    CUDA."""
    from afkv.kv.device import DeviceQuant, staging_blocks_needed
    from afkv.kv.formats import make_format
    from afkv.kv.layout import KVLayout
    from afkv.kv.manager import KVManager
    from afkv.model.model import LocalFFN, Model, attention_side, load_ffn_side, open_checkpoint
    from afkv.model.sides import SeqChunk, StepInputs
    from afkv.ops.kernels import torch_kernels

    device = torch.device(device)
    spec, reader = open_checkpoint(tiny_dir["qwen3_moe"])
    ffn = LocalFFN(load_ffn_side(spec, tiny_dir["qwen3_moe"], device, torch.float32))
    reference = torch_kernels()
    kernels = dataclasses.replace(reference, decode_quantized=ta.paged_decode_attention_quantized,
                                  prefill_quantized=ta.paged_prefill_attention_quantized)
    models = {use: Model(spec, attention_side(spec, reader, device, torch.float32, k), ffn)
              for use, k in ((True, kernels), (False, reference))}
    reader.close()
    layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, 4, torch.float32)
    prompts = {0: list(range(3, 16)), 1: list(range(40, 47))}  # 13 and 7 tokens

    def run(use_kernels: bool) -> torch.Tensor:
        model = models[use_kernels]
        quant_cfg = DeviceQuant(make_format(kind, layout), 4, staging_blocks_needed(4, 4, 2, 16))
        kv = KVManager(layout, 16, device, quant=quant_cfg)
        cache = kv.attention_cache
        t = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
        with torch.inference_mode():
            for seq_id, toks in prompts.items():
                kv.match_prefix(seq_id, toks)
                for start in range(0, len(toks), 8):  # 8-token chunks: later ones read quantized blocks
                    end = min(len(toks), start + 8)
                    assert kv.allocate(seq_id, end + 1)
                    kv.flush()
                    table = kv.block_table(seq_id)
                    pos = list(range(start, end))
                    inputs = StepInputs(t(toks[start:end]), t(pos), t([table[p // 4] for p in pos]),
                                        t([p % 4 for p in pos]),
                                        [SeqChunk(0, end - start, end, t(table[: -(-end // 4)]))])
                    model.forward(inputs, cache)
                    kv.commit(seq_id, toks, end)
            kv.flush()
            tables = [kv.block_table(s) for s in prompts]
            width = max(map(len, tables))
            n = [len(p) for p in prompts.values()]
            chunks = [SeqChunk(i, 1, n[i] + 1, t(tb + [0] * (width - len(tb)))) for i, tb in enumerate(tables)]
            inputs = StepInputs(t([5, 6]), t(n), t([tb[p // 4] for tb, p in zip(tables, n)]), t([p % 4 for p in n]),
                                chunks)
            assert inputs.decode is not None  # the batched decode path
            logits = model.attn.logits(model.forward(inputs, cache))
            assert kv.metrics.counters["quantized_blocks"] >= 2  # fp_window 4: the rest stays in staging blocks
        return logits

    _assert_close(run(True), run(False), torch.float32)


# ----------------------------------------------------------------------------------------------
# decode partials (output and log-sum-exp): streamed contexts (afkv.kv.stream) merge them


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["none", *_QUANT_KINDS])
def test_decode_partials_match_the_reference_and_merge_exactly(device, kind):
    """paged_decode_partial(_quantized): output and log-sum-exp equal the torch reference's; a
    context cut in two parts and merged equals the whole (an empty row: lse -inf, zeros). The
    quantized cache is one-layer rows, as a streamed ring slot (BlockFormat.layer_cache)."""
    from afkv.kv.formats import make_format
    from afkv.kv.layout import KVLayout

    gen = torch.Generator().manual_seed(7)
    layout = KVLayout(num_layers=1, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.bfloat16)
    fmt = make_format(kind, layout)
    blocks = torch.randn(12, *layout.block_shape, generator=gen).to(torch.bfloat16)  # [12, 1, 2, bs, Hkv, D]
    cache = fmt.layer_cache(fmt.encode(blocks).to(device))  # one-layer rows, as a ring slot
    q = torch.randn(3, 8, 64, generator=gen).to(torch.bfloat16).to(device)  # [B, H, D]
    tables = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10], [0, 1, 2, 3, 0, 0, 0, 0], [0] * 8], device=device)
    lens = torch.tensor([[128, 64, 0], [1, 1, 1]], device=device).T[:, 0]  # [3], strided: read as it is
    got_fn, ref_fn = ((ta.paged_decode_partial, attention.paged_decode_partial) if kind == "none" else
                      (ta.paged_decode_partial_quantized, attention.paged_decode_partial_quantized))
    got, want = got_fn(q, cache, 0, tables, lens), ref_fn(q, cache, 0, tables, lens)
    assert got.out.dtype == got.lse.dtype == torch.float32
    _assert_close(got.out[:2], want.out[:2], torch.bfloat16)
    torch.testing.assert_close(got.lse[:2].cpu(), want.lse[:2].cpu(), atol=2e-2, rtol=0)
    assert torch.isinf(got.lse[2]).all() and (got.lse[2] < 0).all() and (got.out[2] == 0).all()
    head = got_fn(q[:1], cache, 0, tables[:1, :3], torch.tensor([48], device=device))  # blocks 3 .. 5
    tail = got_fn(q[:1], cache, 0, tables[:1, 3:], torch.tensor([80], device=device))  # blocks 6 .. 10
    merged = attention.merge_partials([head, tail])
    torch.testing.assert_close(merged.out.cpu(), got.out[:1].cpu(), atol=2e-3, rtol=0)
    torch.testing.assert_close(merged.lse.cpu(), got.lse[:1].cpu(), atol=2e-3, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["none", "int8", "int4"])
def test_a_streamed_step_runs_the_kernels_like_the_reference(tiny_dir, kind, device):
    """The attention side's decode rows and prefill chunk of streamed sequences (device blocks +
    blocks streamed through the ring, host format `kind`) through the Triton decode and prefill
    partials, against the same step through the torch references."""
    from afkv.engine.runner import ChunkPlan, ModelRunner, SampleSpec
    from afkv.kv.formats import make_format
    from afkv.kv.layout import KVLayout
    from afkv.kv.manager import KVManager
    from afkv.kv.stream import StreamConfig
    from afkv.model.model import LocalFFN, Model, attention_side, load_ffn_side, open_checkpoint
    from afkv.ops.kernels import torch_kernels

    device = torch.device(device)
    spec, reader = open_checkpoint(tiny_dir["qwen3_moe"])
    ffn = LocalFFN(load_ffn_side(spec, tiny_dir["qwen3_moe"], device, torch.float32))
    reference = torch_kernels()
    kernels = dataclasses.replace(reference, decode=ta.paged_decode_attention, decode_partial=ta.paged_decode_partial,
                                  decode_partial_quantized=ta.paged_decode_partial_quantized,
                                  prefill_partial=ta.paged_prefill_partial,
                                  prefill_partial_quantized=ta.paged_prefill_partial_quantized)
    sides = {use: attention_side(spec, reader, device, torch.float32, k) for use, k in ((True, kernels), (False, reference))}
    reader.close()
    layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, 4, torch.float32)
    kv = KVManager(layout, 32, device, stream=StreamConfig(make_format(kind, layout), 24, num_sink_tokens=4, window=4,
                                                           ahead=2))
    gen = torch.Generator().manual_seed(3)
    kv.kv.copy_(torch.randn(kv.kv.shape, generator=gen))
    fmt = kv.stream.format
    rows = fmt.encode(torch.randn(24, *layout.block_shape, generator=gen).to(device))  # [24, nbytes]
    kv.stream.buf.copy_(rows.view(24, layout.num_layers, fmt.layer_nbytes).transpose(0, 1))
    greedy = SampleSpec(0.0, 0, 1.0, 0, 0, 5)
    plan = [ChunkPlan(0, (7,), 52, (0, 1, 2), greedy, num_dropped=44, streamed=tuple(range(0, 11))),
            ChunkPlan(1, (9,), 40, (3, 4, 5, 6), greedy, num_dropped=28, streamed=tuple(range(12, 19))),
            ChunkPlan(2, (5,), 20, tuple(range(7, 13)), greedy),  # a plain decode row beside them
            ChunkPlan(3, (8, 9, 10, 11, 12, 13), 40, tuple(range(13, 20)), greedy, num_dropped=20,
                      streamed=tuple(range(19, 24)))]  # a prefill chunk of 6 over 5 streamed blocks
    results = {}
    for use, side in sides.items():
        runner = ModelRunner(Model(spec, side, ffn), kv.kv, 4, device, stream=kv.stream_ring)
        results[use] = runner.execute(plan)
    for a, b in zip(results[True], results[False]):
        assert a.token_id == b.token_id
        assert abs(a.logprob - b.logprob) < 2e-3


# ----------------------------------------------------------------------------------------------
# prefill partials: a chunk of a streaming sequence attends its device blocks (causal) and its
# streamed ring slot (no mask) with the prefill kernels, each part's log-sum-exp kept for the merge

_PREFILL_PARTIAL_CASES = [
    # dtype, num_heads, num_kv_heads, head_dim, block_size, n, context_len (queries not a multiple of the tile)
    (torch.float32, 4, 4, 128, 16, 5, 37),
    (torch.bfloat16, 8, 2, 64, 16, 21, 70),
    (torch.float16, 12, 4, 64, 32, 19, 100),
    (torch.bfloat16, 16, 2, 128, 16, 3, 16),
]


def _assert_partial(got: attention.Partial, want: attention.Partial, dtype: torch.dtype) -> None:
    """Output as _assert_close's tolerances; log-sum-exp within 2e-2 (16-bit) or 2e-5; -inf where the reference's is."""
    assert got.out.dtype == got.lse.dtype == torch.float32 and got.lse.shape == want.lse.shape
    empty = torch.isinf(want.lse.cpu())
    assert torch.equal(torch.isinf(got.lse.cpu()), empty) and (got.lse.cpu()[empty] < 0).all()
    assert (got.out.cpu()[empty] == 0).all()
    torch.testing.assert_close(got.out.cpu(), want.out.float().cpu(), **_tol(dtype))
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.lse.cpu()[~empty], want.lse.cpu()[~empty], atol=tol, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", _PREFILL_PARTIAL_CASES,
                         ids=lambda c: f"{str(c[0])[6:]}-h{c[1]}-kv{c[2]}-d{c[3]}-bs{c[4]}-n{c[5]}-ctx{c[6]}")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "no-mask"])
def test_prefill_partials_match_the_reference(device, case, causal):
    """paged_prefill_partial: output and log-sum-exp equal attention.paged_attention_partial's
    (float32, over the same blocks), causal (the device part) or not (a streamed part); an
    empty part (context 0, or no block at all) gives lse -inf and zeros."""
    dtype, num_heads, num_kv_heads, head_dim, block_size, n, context_len = case
    gen = torch.Generator().manual_seed(n * 7 + context_len)
    needed = -(-context_len // block_size)
    kv = _cache(needed + 3, 2, block_size, num_kv_heads, head_dim, dtype, device, gen)
    block_ids = torch.randperm(needed + 3, generator=gen)[:needed].to(device)
    q = torch.randn(n, num_heads, head_dim, generator=gen).to(dtype).to(device)  # [n, H, D]
    want = attention.paged_attention_partial(q.float().cpu(), kv.float().cpu(), 1, block_ids.cpu(), context_len, causal)
    _assert_partial(ta.paged_prefill_partial(q, kv, 1, block_ids, context_len, causal), want, dtype)
    if not causal:
        for ids, ctx in ((block_ids, 0), (block_ids[:0], 0)):
            got = ta.paged_prefill_partial(q, kv, 1, ids, ctx, causal=False)
            assert torch.isinf(got.lse).all() and (got.lse < 0).all() and (got.out == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", _QUANT_KINDS)
@pytest.mark.parametrize("dtype, head_dim, n, num_blocks", [(torch.bfloat16, 64, 21, 5), (torch.float32, 128, 9, 3),
                                                             (torch.bfloat16, 128, 70, 2)])
def test_prefill_partials_over_a_streamed_ring_slot_match_the_reference(device, kind, dtype, head_dim, n, num_blocks):
    """paged_prefill_partial_quantized over one-layer rows (a ring slot: BlockFormat.layer_cache),
    no mask, the codes read in place (int8 / int4: the query and output rotated in the kernel),
    against the torch reference over the dequantized blocks; blocks named in any order; an
    empty part gives lse -inf and zeros."""
    from afkv.kv.formats import make_format
    from afkv.kv.layout import KVLayout

    gen = torch.Generator().manual_seed(head_dim + n)
    layout = KVLayout(num_layers=1, num_kv_heads=2, head_dim=head_dim, block_size=16, dtype=dtype)
    fmt = make_format(kind, layout)
    blocks = torch.randn(num_blocks + 2, *layout.block_shape, generator=gen).to(dtype)  # [nb + 2, 1, 2, bs, Hkv, D]
    cache = fmt.layer_cache(fmt.encode(blocks).to(device))
    ids = torch.randperm(num_blocks + 2, generator=gen)[:num_blocks].to(device)
    q = torch.randn(n, 8, head_dim, generator=gen).to(dtype).to(device)  # [n, H, D]
    ref = fmt.layer_cache(fmt.encode(blocks))
    want = attention.paged_attention_partial_quantized(q.float().cpu(), ref, 0, ids.cpu(), num_blocks * 16, causal=False)
    got = ta.paged_prefill_partial_quantized(q, cache, 0, ids, num_blocks * 16, causal=False)
    _assert_partial(got, want, dtype)
    empty = ta.paged_prefill_partial_quantized(q, cache, 0, ids[:0], 0, causal=False)
    assert torch.isinf(empty.lse).all() and (empty.out == 0).all()


@pytest.mark.parametrize("kind", _QUANT_KINDS)
def test_the_reference_takes_a_long_streamed_part_in_pieces(kind, monkeypatch):
    """The torch references dequantize a part before every query (a prefill chunk's) and decode
    rows' tables QUANT_PART_BLOCKS blocks at a time (their scratch bounded however long the
    streamed context): the merged pieces equal the part taken whole, with a last piece that is
    partly filled, and pieces past a decode row's context empty."""
    from afkv.kv.formats import make_format
    from afkv.kv.layout import KVLayout

    gen = torch.Generator().manual_seed(11)
    layout = KVLayout(num_layers=1, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32)
    fmt = make_format(kind, layout)
    cache = fmt.layer_cache(fmt.encode(torch.randn(9, *layout.block_shape, generator=gen)))
    ids = torch.randperm(9, generator=gen)[:7]
    q = torch.randn(5, 8, 64, generator=gen)  # [n, H, D]
    whole = attention.paged_attention_partial_quantized(q, cache, 0, ids, 7 * 16 - 5, causal=False)
    tables = torch.stack([ids, ids.flip(0)])  # [2, 7] two decode rows
    lens = torch.tensor([7 * 16 - 5, 3 * 16 + 2])  # the second row's blocks past 4 are not read
    whole_rows = attention.paged_decode_partial_quantized(q[:2], cache, 0, tables, lens)
    monkeypatch.setattr(attention, "QUANT_PART_BLOCKS", 2)
    pieces = attention.paged_attention_partial_quantized(q, cache, 0, ids, 7 * 16 - 5, causal=False)
    torch.testing.assert_close(pieces.out, whole.out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pieces.lse, whole.lse, rtol=1e-5, atol=1e-5)
    rows = attention.paged_decode_partial_quantized(q[:2], cache, 0, tables, lens)
    torch.testing.assert_close(rows.out, whole_rows.out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows.lse, whole_rows.lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", _QUANT_KINDS)
def test_causal_prefill_partials_over_a_quantized_tier_match_the_reference(device, kind):
    """paged_prefill_partial_quantized, causal, over a quantized device tier (rows, then staging
    blocks holding the chunk): the same as the torch reference's partial."""
    dtype, num_heads, num_kv_heads, head_dim, block_size, n, context_len = torch.bfloat16, 8, 2, 64, 16, 19, 75
    gen = torch.Generator().manual_seed(5)
    needed = -(-context_len // block_size)
    num_staging = needed - (context_len - n) // block_size
    cache, ref_tables, bad_tables = _quant_cache(kind, dtype, num_kv_heads, head_dim, block_size, [context_len],
                                                 num_staging, device, gen)
    q = torch.randn(n, num_heads, head_dim, generator=gen).to(dtype)  # [n, H, D]
    want = attention.paged_attention_partial_quantized(q.float(), _quant_reference_cache(cache), 1,
                                                       ref_tables[0, :needed], context_len)
    got = ta.paged_prefill_partial_quantized(q.to(device), cache, 1, bad_tables[0, :needed].to(device), context_len)
    _assert_partial(got, want, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_device_and_streamed_prefill_partials_merge_to_attention_over_both(device):
    """A chunk's two parts (its device blocks, causal; blocks before them, no mask) merged by
    log-sum-exp equal causal attention over the whole context: the identity the streamed
    prefill rests on (AttentionSide._streamed_attention)."""
    dtype, bs = torch.bfloat16, 16
    gen = torch.Generator().manual_seed(9)
    kv = _cache(8, 1, bs, 2, 64, dtype, device, gen)  # blocks 0 .. 2 the streamed part, 3 .. 7 the device part
    n, device_len = 23, 70
    q = torch.randn(n, 8, 64, generator=gen).to(dtype).to(device)
    streamed = ta.paged_prefill_partial(q, kv, 0, torch.tensor([2, 0, 1], device=device), 3 * bs, causal=False)
    own = ta.paged_prefill_partial(q, kv, 0, torch.arange(3, 8, device=device), device_len)
    got = attention.merge_partials([own, streamed]).out
    whole = torch.tensor([2, 0, 1, 3, 4, 5, 6, 7], device=device)
    want = attention.paged_attention(q.float(), kv.float(), 0, whole, 3 * bs + device_len)
    torch.testing.assert_close(got.cpu(), want.cpu(), **_tol(dtype))
