"""afkv.ops.triton_mla (paged MLA decode over latents) against the torch references
(afkv.ops.mla).

Skipped without triton. Without a GPU the kernel runs on CPU tensors under Triton's
interpreter (TRITON_INTERPRET=1, set before triton is imported; IEEE float32 products); with
a GPU it runs compiled (marked gpu), where DeepSeek's real shapes (r = 512, dr = 64, 16 and 128
heads, long contexts) and a CUDA-graph capture are checked too.

Tolerances: float32 caches 2e-5 (summation order only). 16-bit caches against float32
attention over the same latents: 3e-2 + 2e-2 * |ref| (products in bfloat16, probabilities
rounded to bfloat16 before P @ c, as flash attention does). Quantized tiers against the
reference over the same rows (both dequantize to the staging dtype), with the same tolerances.
"""

from __future__ import annotations

import os

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernels are defined (at import)
pytest.importorskip("triton")

from afkv.errors import ConfigError  # noqa: E402
from afkv.ops import mla, quant  # noqa: E402
from afkv.ops import triton_mla as tm  # noqa: E402
from afkv.ops.attention import QuantizedKVCache  # noqa: E402

if not _CUDA and not type(tm._mla_decode_kernel).__name__.startswith("Interpreted"):
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: run with TRITON_INTERPRET=1",
                allow_module_level=True)

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(_CUDA, reason="the interpreter runs only where CUDA is absent")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not _CUDA, reason="needs a CUDA GPU")]),
]
_BAD_BLOCK = 1 << 40  # block tables' padding: reading it would fault (GPU) or fail (interpreter)


def _tol(dtype: torch.dtype) -> dict:
    return dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)


def _tables(lens: list[int], bs: int, nb: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Scrambled tables over nb blocks (the reference's padded with block 0, the kernel's with
    an id that must never be read)."""
    width = max(-(-n // bs) for n in lens)
    ref = torch.zeros(len(lens), width, dtype=torch.int64)
    bad = torch.full((len(lens), width), _BAD_BLOCK, dtype=torch.int64)
    for i, n in enumerate(lens):
        ids = torch.randperm(nb, generator=gen)[: -(-n // bs)]
        ref[i, : len(ids)] = ids
        bad[i, : len(ids)] = ids
    return ref, bad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_heads,rank,rope", [(5, 40, 6), (20, 32, 16)])  # odd heads; more than a head block
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_matches_reference(device, num_heads, rank, rope, splits):
    gen = torch.Generator().manual_seed(num_heads + splits)
    bs, layers = 4, 2
    lens = [17, 1, 0, 9, 40]  # a row with nothing cached yields zeros
    cache = torch.randn(14, layers, bs, rank + rope, generator=gen)
    ref_tables, bad_tables = _tables(lens, bs, 14, gen)
    q = torch.randn(len(lens), num_heads, rank + rope, generator=gen)
    lens_t = torch.tensor(lens)
    want = mla.mla_decode_attention(q, cache, 1, ref_tables, lens_t, 0.3, rank)
    got = tm.paged_mla_decode(q.to(device), cache.to(device), 1, bad_tables.to(device), lens_t.to(device), 0.3, rank,
                              num_splits=splits)
    torch.testing.assert_close(got.cpu(), want, **_tol(torch.float32))
    assert torch.equal(got[2].cpu(), torch.zeros(num_heads, rank))


def _quant_cache(kind: str, dtype: torch.dtype, rank: int, rope: int, bs: int, lens: list[int], device, gen,
                 num_layers: int = 2):
    """A quantized device tier: per row its blocks split between quantized rows and staging
    blocks (some rows all staging), plus tables for the reference and the kernel."""
    spec = quant.LatentQuantSpec(kind, num_layers, bs, rank, rope, quant.scale_dtype_for(dtype))
    per_row = [-(-n // bs) for n in lens]
    num_rows, num_staging = sum(per_row), sum(per_row) + 1
    rows = quant.quantize_latent_rows(torch.randn(num_rows, num_layers, bs, rank + rope, generator=gen), spec)
    staging = torch.randn(num_staging, num_layers, bs, rank + rope, generator=gen).to(dtype)
    width = max(per_row)
    ref = torch.zeros(len(lens), width, dtype=torch.int64)
    bad = torch.full((len(lens), width), _BAD_BLOCK, dtype=torch.int64)
    next_row, next_staging = 0, 0
    for i, n in enumerate(per_row):
        split = n // 2 if i % 3 else n  # a third of the rows all quantized, the others half and half
        ids = list(range(next_row, next_row + split)) + [num_rows + next_staging + j for j in range(n - split)]
        next_row += split
        next_staging += n - split
        ref[i, :n] = torch.tensor(ids)
        bad[i, :n] = torch.tensor(ids)
    cache = QuantizedKVCache(rows.to(device), staging.to(device), spec, max_tail_blocks=width)
    return cache, ref, bad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_decode_over_quantized_rows_and_staging(device, kind):
    gen = torch.Generator().manual_seed(7)
    lens = [13, 29, 5, 1]
    cache, ref_tables, bad_tables = _quant_cache(kind, torch.float32, 40, 6, 4, lens, device, gen)
    q = torch.randn(len(lens), 5, 46, generator=gen)
    lens_t = torch.tensor(lens)
    cpu_cache = QuantizedKVCache(cache.blocks.cpu(), cache.staging.cpu(), cache.spec, cache.max_tail_blocks)
    want = mla.mla_decode_attention(q, cpu_cache, 1, ref_tables, lens_t, 0.25, 40)
    got = tm.paged_mla_decode(q.to(device), cache, 1, bad_tables.to(device), lens_t.to(device), 0.25, 40, num_splits=2)
    torch.testing.assert_close(got.cpu(), want, **_tol(torch.float32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["raw", "fp8", "int8"])
@pytest.mark.parametrize("tile", [tm.MLATile(block_n=16, rank_chunk=64), tm.MLATile(block_h=32, block_n=32),
                                  tm.MLATile(block_n=16, rank_chunk=64, whole_scores=True),
                                  tm.MLATile(block_n=16, flat=True), tm.MLATile(block_h=32, block_n=32, flat=True)],
                         ids=["tile-in-block", "tiles-across-blocks", "whole-scores", "flat-in-block",
                              "flat-across-blocks"])
def test_decode_tiles_and_chunks(device, kind, tile):
    """Tiles inside one cache block (the tile's block id read once: a quantized tile or a
    staging tile, per tile) and across blocks (per token), latents in several chunks (raw:
    rank_chunk; quantized: scale groups of 128, the last one partial), more heads than a head
    block and fewer than two."""
    gen = torch.Generator().manual_seed(11)
    rank, rope, bs, heads = 160, 16, 16, 20
    lens = [70, 33, 16, 1, 0]
    if kind == "raw":
        nb = sum(-(-n // bs) for n in lens) + 2
        cache = torch.randn(nb, 2, bs, rank + rope, generator=gen)
        ref_tables, bad_tables = _tables(lens, bs, nb, gen)
        ref_cache, dev_cache = cache, cache.to(device)
    else:
        dev_cache, ref_tables, bad_tables = _quant_cache(kind, torch.float32, rank, rope, bs, lens, device, gen)
        ref_cache = QuantizedKVCache(dev_cache.blocks.cpu(), dev_cache.staging.cpu(), dev_cache.spec,
                                     dev_cache.max_tail_blocks)
    q = torch.randn(len(lens), heads, rank + rope, generator=gen)
    lens_t = torch.tensor(lens)
    want = mla.mla_decode_attention(q, ref_cache, 1, ref_tables, lens_t, 0.2, rank)
    got = tm.paged_mla_decode(q.to(device), dev_cache, 1, bad_tables.to(device), lens_t.to(device), 0.2, rank,
                              num_splits=2, tile=tile)
    torch.testing.assert_close(got.cpu(), want, **_tol(torch.float32))
    assert torch.equal(got[4].cpu(), torch.zeros(heads, rank))


_FLAT_TILES = [tm.MLATile(block_n=16, flat=True), tm.MLATile(block_h=32, block_n=32, num_warps=8, flat=True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["raw", "fp8", "int8"])
@pytest.mark.parametrize("tile", _FLAT_TILES, ids=["in-block", "across-blocks"])
def test_flat_kernel_matches_reference(device, dtype, kind, tile):
    """MLATile.flat (_mla_flat_kernel) in every cache dtype over raw latents and quantized rows
    with staging blocks (scale groups of 128, the last one partial: padded columns), split-K,
    rows with nothing cached, more heads than a head block."""
    gen = torch.Generator().manual_seed(23)
    rank, rope, bs, heads = 160, 16, 16, 20
    lens = [70, 0, 33, 16, 1]
    if kind == "raw":
        nb = sum(-(-n // bs) for n in lens) + 2
        cache = torch.randn(nb, 2, bs, rank + rope, generator=gen).to(dtype)
        ref_tables, bad_tables = _tables(lens, bs, nb, gen)
        ref_cache, dev_cache = cache.float(), cache.to(device)
    else:
        dev_cache, ref_tables, bad_tables = _quant_cache(kind, dtype, rank, rope, bs, lens, device, gen)
        ref_cache = QuantizedKVCache(dev_cache.blocks.cpu(), dev_cache.staging.cpu(), dev_cache.spec,
                                     dev_cache.max_tail_blocks)
    q = torch.randn(len(lens), heads, rank + rope, generator=gen).to(dtype)
    lens_t = torch.tensor(lens)
    want = mla.mla_decode_attention(q.float(), ref_cache, 1, ref_tables, lens_t, 0.2, rank).float()
    got = tm.paged_mla_decode(q.to(device), dev_cache, 1, bad_tables.to(device), lens_t.to(device), 0.2, rank,
                              num_splits=3, tile=tile)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float().cpu(), want, **_tol(dtype))
    assert torch.equal(got[1].cpu(), torch.zeros(heads, rank, dtype=dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tile", [None, *_FLAT_TILES], ids=["default", "flat-in-block", "flat-across-blocks"])
def test_padding_rows_leave_a_row_bit_identical(device, tile):
    """A row's output has the same bits alone and in a batch padded as a CUDA graph bucket pads
    it (rows with nothing cached, a wider table of ids never read) at the same split count."""
    gen = torch.Generator().manual_seed(29)
    rank, rope, bs = 64, 16, 16
    cache = torch.randn(8, 1, bs, rank + rope, generator=gen).to(device)
    q = torch.randn(1, 20, rank + rope, generator=gen).to(device)
    table = torch.randperm(8, generator=gen)[:5].view(1, 5).to(device)
    alone = tm.paged_mla_decode(q, cache, 0, table, torch.tensor([70], device=device), 0.2, rank, num_splits=2,
                                tile=tile)
    padded_q = torch.cat([q, torch.randn(3, 20, rank + rope, generator=gen).to(device)])
    padded_table = torch.full((4, 7), _BAD_BLOCK, dtype=torch.int64, device=device)
    padded_table[0, :5] = table[0]
    lens = torch.tensor([70, 0, 0, 0], device=device)
    padded = tm.paged_mla_decode(padded_q, cache, 0, padded_table, lens, 0.2, rank, num_splits=2, tile=tile)
    assert torch.equal(padded[0], alone[0])
    assert torch.equal(padded[1:].cpu(), torch.zeros(3, 20, rank))


def test_bad_tiles_are_refused():
    with pytest.raises(ConfigError, match="block_n"):
        tm.MLATile(block_n=24)
    with pytest.raises(ConfigError, match="rank_chunk"):
        tm.MLATile(rank_chunk=8)
    with pytest.raises(ConfigError, match="whole_scores"):
        tm.MLATile(flat=True, whole_scores=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tile", [None, tm.MLATile(flat=True)], ids=["default", "flat"])
def test_prefill_rows_are_causal(device, tile):
    """A chunk of n queries: row i sees context_len - n + 1 + i tokens (the reference's mask)."""
    gen = torch.Generator().manual_seed(3)
    cache = torch.randn(8, 1, 4, 46, generator=gen)
    table = torch.randperm(8, generator=gen)[:6]
    q = torch.randn(7, 5, 46, generator=gen)
    want = mla.mla_attention(q, cache, 0, table, 22, 0.3, 40)
    got = tm.paged_mla_prefill(q.to(device), cache.to(device), 0, table.to(device), 22, 0.3, 40, tile=tile)
    torch.testing.assert_close(got.cpu(), want, **_tol(torch.float32))


def test_bad_arguments_are_refused():
    cache = torch.zeros(4, 2, 4, 46)
    q = torch.zeros(2, 5, 46)
    tables, lens = torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, dtype=torch.int64)
    with pytest.raises(ConfigError, match="layer"):
        tm.paged_mla_decode(q, cache, 2, tables, lens, 0.3, 40)
    with pytest.raises(ConfigError, match="do not fit"):
        tm.paged_mla_decode(torch.zeros(2, 5, 44), cache, 0, tables, lens, 0.3, 40)
    with pytest.raises(ConfigError, match="block_tables"):
        tm.paged_mla_decode(q, cache, 0, tables[:1], lens, 0.3, 40)
    with pytest.raises(ConfigError, match="latent cache"):
        tm.paged_mla_decode(q, torch.zeros(4, 2, 2, 4, 46), 0, tables, lens, 0.3, 40)


def _tile_id(tile) -> str:
    if tile is None:
        return "default"
    return (f"h{tile.block_h}-n{tile.block_n}-w{tile.num_warps}-s{tile.num_stages}-c{tile.rank_chunk}"
            f"-p{tile.programs_per_sm}" + ("-whole" if tile.whole_scores else "") + ("-flat" if tile.flat else ""))


@pytest.mark.parametrize("tile", [None, *tm.CANDIDATE_TILES], ids=_tile_id)
@pytest.mark.parametrize("num_heads", [16, 128])  # V2-Lite, V3
@pytest.mark.parametrize("kind", ["raw", "fp8", "int8"])
@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs a CUDA GPU")
def test_decode_real_shapes_bf16(num_heads, kind, tile):
    """DeepSeek's shapes in bfloat16 over long random contexts, against float32 attention over
    the same latents (quantized: the same rows dequantized): the default launch and every
    candidate the tuning times (triton_mla.CANDIDATE_TILES) that applies."""
    if tile is not None and (tile.block_h > num_heads or (kind != "raw" and tile.whole_scores)):
        pytest.skip("the tuning does not time this launch here")
    gen = torch.Generator().manual_seed(num_heads)
    lens = torch.randint(1, 5000, (12,), generator=gen).tolist()
    bs = 64
    if kind == "raw":
        nb = sum(-(-n // bs) for n in lens) + 1
        cache = torch.randn(nb, 1, bs, 576, generator=gen).to(torch.bfloat16)
        ref_tables, tables = _tables(lens, bs, nb, gen)
        ref_cache, dev_cache = cache.float(), cache.cuda()
    else:
        dev_cache, ref_tables, tables = _quant_cache(kind, torch.bfloat16, 512, 64, bs, lens, "cuda", gen, num_layers=1)
        ref_cache = QuantizedKVCache(dev_cache.blocks.cpu(), dev_cache.staging.cpu().float(), dev_cache.spec, 1)
    q = (torch.randn(len(lens), num_heads, 576, generator=gen) * 0.1).to(torch.bfloat16)
    lens_t = torch.tensor(lens)
    want = mla.mla_decode_attention(q.float(), ref_cache, 0, ref_tables, lens_t, 0.1352, 512)
    got = tm.paged_mla_decode(q.cuda(), dev_cache, 0, tables.cuda(), lens_t.cuda(), 0.1352, 512, tile=tile)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.float().cpu(), want, **_tol(torch.bfloat16))


_V3_FLAT = tm.MLATile(64, 32, 8, 2, flat=True)


@pytest.mark.parametrize("magnitude", [3e4, 1e-6])  # beyond float16's largest; below its smallest normal
@pytest.mark.parametrize("kind", ["fp8", "int8"])
@pytest.mark.parametrize("tile", [None, _V3_FLAT], ids=["default", "flat"])
@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs a CUDA GPU")
def test_quantized_decode_holds_queries_of_any_magnitude(kind, magnitude, tile):
    """Quantized codes multiply in float16 with the queries scaled into its range per program
    (the chunked kernel), or dequantized to bfloat16 (the flat one): bfloat16 queries far
    outside float16's range (softmax scale 0.1 / magnitude) give float32 attention's output."""
    gen = torch.Generator().manual_seed(17)
    lens = torch.randint(1, 3000, (6,), generator=gen).tolist()
    dev_cache, ref_tables, tables = _quant_cache(kind, torch.bfloat16, 512, 64, 64, lens, "cuda", gen, num_layers=1)
    ref_cache = QuantizedKVCache(dev_cache.blocks.cpu(), dev_cache.staging.cpu().float(), dev_cache.spec, 1)
    q = (torch.randn(len(lens), 128, 576, generator=gen) * magnitude).to(torch.bfloat16)
    lens_t = torch.tensor(lens)
    want = mla.mla_decode_attention(q.float(), ref_cache, 0, ref_tables, lens_t, 0.1 / magnitude, 512)
    got = tm.paged_mla_decode(q.cuda(), dev_cache, 0, tables.cuda(), lens_t.cuda(), 0.1 / magnitude, 512, tile=tile)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float().cpu(), want, **_tol(torch.bfloat16))


@pytest.mark.parametrize("tile", [None, tm.MLATile(16, 32, 4, 2, flat=True)], ids=["default", "flat"])
@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs a CUDA GPU")
def test_decode_is_cuda_graph_capturable(tile):
    gen = torch.Generator().manual_seed(5)
    lens = [300, 40, 1, 129]
    cache = torch.randn(20, 2, 64, 576, generator=gen).to(torch.bfloat16).cuda()
    ref_tables, _ = _tables(lens, 64, 20, gen)
    tables = ref_tables.cuda()
    q = torch.randn(4, 16, 576, generator=gen).to(torch.bfloat16).cuda()
    lens_t = torch.tensor(lens, device="cuda")
    tm.paged_mla_decode(q, cache, 1, tables, lens_t, 0.13, 512, tile=tile)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tm.paged_mla_decode(q, cache, 1, tables, lens_t, 0.13, 512, tile=tile)
    new_lens = torch.tensor([0, 33, 1, 120], device="cuda")
    lens_t.copy_(new_lens)
    graph.replay()
    want = mla.mla_decode_attention(q.float().cpu(), cache.float().cpu(), 1, ref_tables, new_lens.cpu(), 0.13, 512)
    torch.testing.assert_close(out.clone()[1:].float().cpu(), want[1:], **_tol(torch.bfloat16))
    assert (out[0] == 0).all()


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_bench_tuning_checks_each_launch_against_float32_attention(fmt, monkeypatch):
    """`afkv bench kernels mla --tune 1`'s tuner on a small cache under the interpreter (a
    smoke test of its reference path: it once read `raw` before setting it): the default launch
    matches the float32 reference and is timed, a launch that cannot run is reported and left out."""
    if _CUDA:
        pytest.skip("the interpreter runs only where CUDA is absent")
    from afkv.bench import kernels

    broken = tm.MLATile(block_h=16, block_n=16, rank_chunk=128)
    monkeypatch.setattr(tm, "CANDIDATE_TILES", (broken,))
    real = tm.paged_mla_decode

    def decode(*args, tile=None, **kw):
        if tile == broken:
            raise RuntimeError("this launch does not compile")
        return real(*args, tile=tile, **kw)

    monkeypatch.setattr(tm, "paged_mla_decode", decode)
    torch.manual_seed(0)
    cache = kernels._mla_cache(fmt, 2, 1, 16, torch.device("cpu"))
    tables = torch.arange(2).view(1, 2)  # [B, nb]
    lens = torch.tensor([27])
    q = (torch.randn(1, 16, kernels.MLA_RANK + kernels.MLA_ROPE) * 0.1).to(torch.bfloat16)
    scale = (128 + kernels.MLA_ROPE) ** -0.5
    default = tm.default_tile(16, fmt != "bf16")
    calls = lambda tile: kernels._mla_calls(q, cache, tables, lens, scale, 1, tile)  # noqa: E731
    best, trials = kernels._mla_tune(default, 16, q, cache, tables, lens, scale, calls, 1, torch.device("cpu"),
                                     None, lambda *_: None)
    assert best == default
    assert [t.get("us") is not None for t in trials] == [True, False]
    assert "does not compile" in trials[1]["error"]
