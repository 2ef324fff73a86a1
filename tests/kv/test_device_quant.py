"""A quantized device tier (afkv.kv.device): sizing, staging blocks and their quantization,
prefix reuse, accounting, demotion as raw bytes, and attention over rows plus staging (the
torch reference; the Triton kernels are checked against it in tests/ops/test_triton_attention.py)."""

import pytest
import torch

from afkv.config import EngineConfig, KVConfig
from afkv.errors import ConfigError
from afkv.kv.device import DeviceQuant, staging_blocks_needed
from afkv.kv.formats import make_format
from afkv.kv.layout import KVLayout
from afkv.kv.manager import KVManager
from afkv.kv.pruning import KVPruning
from afkv.kv.tiers.config import TierConfig
from afkv.ops import attention

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)
CPU = torch.device("cpu")


def _manager(num_blocks=16, fmt="int8", fp_window=0, staging=16, tiers=None) -> KVManager:
    quant_cfg = DeviceQuant(make_format(fmt, LAYOUT), fp_window, staging)
    return KVManager(LAYOUT, num_blocks, CPU, tiers=tiers, quant=quant_cfg)


def _step(kv: KVManager, seq_id: int, tokens: list[int], start: int, end: int) -> None:
    """Grow, write the K/V of tokens start..end-1 (values from the token id and position) into
    the ids block_table names, then commit: the engine's order (schedule and flush, step, commit)."""
    assert kv.allocate(seq_id, end)
    kv.flush()  # the pass's tier copies (demotions of evicted cached blocks) run before the step
    table = kv.block_table(seq_id)
    nb = kv.pool.num_blocks
    bs = LAYOUT.block_size
    for p in range(start, end):
        block = table[p // bs]
        assert block >= nb, "new tokens are written to staging blocks"
        kv.kv[block - nb, :, :, p % bs] = _value(tokens[p], p)
    kv.commit(seq_id, tokens, end)
    kv.flush()
    kv.check_invariants()


def _value(token: int, pos: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(token * 1009 + pos)
    return torch.randn(LAYOUT.num_layers, 2, LAYOUT.num_kv_heads, LAYOUT.head_dim, generator=g)


# ---- sizing and config ------------------------------------------------------------------------
def test_device_blocks_grow_by_the_compression_ratio():
    layout = KVLayout(24, 8, 128, 16, torch.bfloat16)  # a real geometry: 1.5 MiB per block in bfloat16
    kv = KVConfig(device_memory_mib=4096)
    full, none = kv.device_tier(layout, 64, 512)
    assert none is None and full == 4096 * 2**20 // layout.block_nbytes
    for name in ("fp8", "int8", "int4"):
        cfg = KVConfig(device_memory_mib=4096, device_format=name)
        num_blocks, q = cfg.device_tier(layout, 64, 512)
        fmt = make_format(name, layout)
        staging = staging_blocks_needed(16, 0, 64, 512)
        assert q.num_staging_blocks == staging == 64 * 2 + 32 + 1
        assert num_blocks == (4096 * 2**20 - staging * layout.block_nbytes) // fmt.nbytes
        ratio = layout.block_nbytes / fmt.nbytes  # 1.97 (fp8), 1.94 (int8), 3.76 (int4)
        grown = num_blocks / full
        print(f"{name}: {num_blocks} device blocks vs {full} in bfloat16 ({grown:.2f}x; format ratio {ratio:.2f}x)")
        assert ratio * (1 - staging / full) - 0.01 <= grown <= ratio
    sizes = [KVConfig(device_memory_mib=4096, device_format=f).device_tier(layout, 64, 512)[0]
             for f in ("int8", "fp8", "int4")]
    assert full < sizes[0] < sizes[1] < sizes[2]


def test_a_window_costs_staging_blocks():
    assert staging_blocks_needed(16, 0, 4, 64) == 4 * 2 + 4 + 1  # + the graphs' scratch block
    assert staging_blocks_needed(16, 32, 4, 64) == 4 * 4 + 4 + 1
    assert DeviceQuant(make_format("int4", LAYOUT), 5, 8).max_tail_blocks == 3  # ceil(5 / 4) + 1


@pytest.mark.parametrize("kv, key", [
    ({"device_format": "int2"}, "kv.device_format"),
    ({"device_format": "none"}, "kv.device_format"),
    ({"device_format": "int8", "device_group_size": 16}, "kv.device_group_size"),  # no such key any more
    ({"device_format": "int8", "fp_window": -1}, "kv.fp_window"),
    ({"device_format": "fp8", "pruning": {"policy": "h2o", "budget": 64}}, "kv.device_format"),
])
def test_bad_device_formats_are_rejected_with_file_and_key(tmp_path, kv, key):
    path = tmp_path / "bad.toml"
    lines = ["[kv]"] + [f"{k} = {v!r}".replace("'", '"') for k, v in kv.items() if k != "pruning"]
    if "pruning" in kv:
        lines += ["[kv.pruning]"] + [f"{k} = {v!r}".replace("'", '"') for k, v in kv["pruning"].items()]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as e:
        EngineConfig.from_toml(path)
    assert e.value.key == key and e.value.file == str(path)


def test_model_geometry_and_memory_checked_at_load():
    layout = KVLayout(2, 2, 7, 8, torch.float32)  # head_dim 7: int4 packs two channels per byte
    with pytest.raises(ConfigError) as e:
        KVConfig(block_size=8, device_format="int4").device_tier(layout, 4, 64, "x.toml")
    assert e.value.key == "kv.device_format" and e.value.file == "x.toml"
    big = KVLayout(32, 8, 128, 16, torch.float32)  # 4 MiB per block: 64 staging blocks do not fit in 64 MiB
    with pytest.raises(ConfigError) as e:
        KVConfig(device_memory_mib=64, device_format="int4").device_tier(big, 16, 512, "x.toml")
    assert e.value.key == "kv.device_memory_mib" and "staging" in str(e.value)


# ---- staging blocks and quantization ------------------------------------------------------------
def test_blocks_are_quantized_when_they_fill_and_leave_the_window():
    kv = _manager(fp_window=5)
    nb, bs = kv.pool.num_blocks, LAYOUT.block_size
    tokens = list(range(100, 120))
    kv.match_prefix(0, tokens)
    _step(kv, 0, tokens, 0, 6)  # 6 tokens: block 0 full but within the 5-token window
    assert all(b >= nb for b in kv.block_table(0))
    _step(kv, 0, tokens, 6, 9)  # 9 tokens: block 0 ends 5 tokens before the end -> quantized
    table = kv.block_table(0)
    assert table[0] < nb and all(b >= nb for b in table[1:])
    for n in range(10, 20):
        _step(kv, 0, tokens, n - 1, n)
        table = kv.block_table(0)
        num_rows = sum(b < nb for b in table)
        assert num_rows == max(0, n - 5) // bs  # full blocks outside the window
        assert len(table) - num_rows <= kv.quant.max_tail_blocks
    # the rows hold the written tokens, quantized: within the format's error of the originals
    rows = kv.blocks[torch.tensor(table[:num_rows])]
    out = torch.empty(num_rows, *LAYOUT.block_shape)
    kv.quant.format.decode(rows, out)
    expect = torch.stack([torch.stack([_value(tokens[b * bs + o], b * bs + o) for o in range(bs)], 2)
                          for b in range(num_rows)])  # [n, L, 2, bs, H, D]
    assert (out - expect).abs().max() < 0.05
    kv.free(0)
    kv.flush()
    kv.check_invariants()
    assert kv.num_free_staging_blocks == kv.quant.num_staging_blocks  # every staging slot back


def test_prefix_reuse_shares_rows_and_staging_blocks_and_frees_exactly():
    kv = _manager(fp_window=4)
    nb = kv.pool.num_blocks
    a = list(range(1, 15))  # 3 full blocks + 2
    kv.match_prefix(0, a)
    _step(kv, 0, a, 0, 14)
    table_a = kv.block_table(0)
    assert sum(b < nb for b in table_a) == 2  # block 2 (tokens 8..11) is in the window
    b = a[:12] + [90, 91, 92, 93]
    assert kv.match_prefix(1, b) == 12  # blocks 0, 1 (rows) and 2 (staging, shared)
    assert kv.block_table(1) == table_a[:3]
    _step(kv, 1, b, 12, 16)  # b's window leaves its block 2: quantized for both (a common prefix)
    assert kv.block_table(0)[2] < nb and kv.block_table(1)[2] == kv.block_table(0)[2]
    kv.free(0)
    kv.free(1)
    kv.flush()
    kv.check_invariants()
    assert kv.pool.num_free_blocks == nb and kv.num_free_staging_blocks == kv.quant.num_staging_blocks
    c = a[:12] + [7]
    assert kv.match_prefix(2, c) == 12  # cached rows found again
    assert all(x < nb for x in kv.block_table(2))


def test_a_row_brought_up_after_a_staging_block_keeps_rows_first(tmp_path):
    """A prefix whose first block is in another sequence's window (staging) and whose next
    block comes back from host memory: the staging block is quantized at match time."""
    fmt = make_format("int8", LAYOUT)
    kv = _manager(num_blocks=4, fp_window=8, tiers=TierConfig(fmt, 8))
    nb = kv.pool.num_blocks
    a = list(range(1, 10))  # 2 full blocks + 1
    kv.match_prefix(0, a)
    _step(kv, 0, a, 0, 9)
    kv.free(0)  # blocks 0 and 1 quantized (registered), then cached
    other = list(range(50, 63))
    kv.match_prefix(1, other)
    _step(kv, 1, other, 0, 13)  # takes all 4 blocks: a's cached blocks demoted to host
    kv.free(1)
    kv.drain()
    d = a[:4] + [70, 71, 72, 73, 74]  # holds a's block 0 only, in its window
    kv.match_prefix(2, d)
    assert kv.block_table(2)[0] < nb  # promoted from host: a row
    kv.free(2)
    kv.drain()
    kv.check_invariants()


def test_preempted_and_cancelled_sequences_leak_nothing():
    kv = _manager(num_blocks=6, staging=6)
    seqs = {s: [s * 100 + t for t in range(11)] for s in range(3)}
    for s, toks in seqs.items():
        kv.match_prefix(s, toks)
    _step(kv, 0, seqs[0], 0, 11)  # 3 blocks
    _step(kv, 1, seqs[1], 0, 11)  # 3 blocks: pool full
    assert not kv.can_allocate(2, 4) and not kv.allocate(2, 4)
    kv.free(1)  # preempted: its full blocks stay cached (quantized), its partial block's slot is freed
    assert kv.allocate(2, 11)
    kv.free(0)
    kv.free(2)  # cancelled before its step ran
    kv.flush()
    kv.check_invariants()
    assert kv.pool.num_free_blocks == 6 and kv.num_free_staging_blocks == 6


def test_staging_pool_short_is_no_room_now():
    kv = _manager(num_blocks=16, staging=2)
    kv.match_prefix(0, list(range(20)))
    assert not kv.can_allocate(0, 12) and not kv.allocate(0, 12)
    assert kv.block_table(0) == [] and kv.pool.num_free_blocks == 16
    assert kv.allocate(0, 8)
    kv.check_invariants()


def test_graph_scratch_block_is_a_reserved_staging_block():
    kv = _manager(num_blocks=8, staging=3)
    scratch = kv.reserve_scratch_block()
    assert scratch >= kv.pool.num_blocks and kv.num_free_staging_blocks == 2
    kv.match_prefix(0, list(range(20)))
    assert kv.allocate(0, 8) and not kv.allocate(0, 12)  # two staging blocks left for sequences
    assert scratch not in kv.block_table(0)
    kv.check_invariants()
    kv.free(0)
    kv.flush()
    kv.check_invariants()
    assert kv.num_free_staging_blocks == 2  # the scratch block is never freed


def test_h2o_requests_run_unpruned_on_a_quantized_device_tier():
    kv = _manager()
    kv.match_prefix(0, list(range(9)), KVPruning("h2o", budget=8))
    assert kv.prune(0, 9) == 0 and kv.metrics.counters["pruning_unsupported"] == 1


# ---- demotion and promotion as raw bytes ----------------------------------------------------------
@pytest.mark.parametrize("name", ["fp8", "int8", "int4"])
def test_demotion_to_the_same_format_moves_the_bytes_unchanged(name):
    fmt = make_format(name, LAYOUT)
    kv = _manager(num_blocks=3, fmt=name, tiers=TierConfig(fmt, 8))
    a = list(range(1, 10))
    kv.match_prefix(0, a)
    _step(kv, 0, a, 0, 9)
    kv.free(0)
    kv.drain()
    hashes = [kv.pool.block_hash(b) for b in range(3) if kv.pool.block_hash(b) is not None]
    assert len(hashes) == 2
    before = {h: kv.blocks[kv.pool.lookup(h)].clone() for h in hashes}
    other = list(range(40, 52))
    kv.match_prefix(1, other)
    _step(kv, 1, other, 0, 12)  # reuses every device block: both of a's blocks are demoted
    kv.drain()
    assert kv.metrics.counters["demotions"] == 2
    for h, row in before.items():
        assert torch.equal(kv.tiers.host.buf[kv.tiers.host.lookup(h)], row)
    kv.free(1)
    assert kv.match_prefix(2, a) == 8  # promoted back, byte for byte
    kv.drain()
    for h, row in before.items():
        assert torch.equal(kv.blocks[kv.pool.lookup(h)], row)
    kv.check_invariants()


def test_demotion_to_another_format_converts():
    kv = _manager(num_blocks=3, fmt="int4", tiers=TierConfig(make_format("none", LAYOUT), 8))
    a = list(range(1, 10))
    kv.match_prefix(0, a)
    _step(kv, 0, a, 0, 9)
    kv.free(0)
    kv.flush()
    block = next(b for b in range(3) if kv.pool.block_hash(b) is not None)
    want = torch.empty(1, *LAYOUT.block_shape)
    kv.quant.format.decode(kv.blocks[block : block + 1], want)  # the int4 block, dequantized
    h = kv.pool.block_hash(block)
    other = list(range(40, 52))
    kv.match_prefix(1, other)
    _step(kv, 1, other, 0, 12)
    kv.drain()
    got = kv.tiers.host.buf[kv.tiers.host.lookup(h)].view(torch.float32).view(LAYOUT.block_shape)
    assert torch.equal(got, want[0])


# ---- attention over rows plus staging -------------------------------------------------------------
def _cache_and_reference(fmt_name: str, seed: int = 0):
    """A cache of 6 rows + 4 staging blocks, and the same blocks as full precision (rows dequantized)."""
    g = torch.Generator().manual_seed(seed)
    fmt = make_format(fmt_name, LAYOUT)
    full = torch.randn(10, *LAYOUT.block_shape, generator=g)  # ids 0..5 rows, 6..9 staging 0..3
    rows = fmt.encode(full[:6])
    deq = torch.empty(6, *LAYOUT.block_shape)
    fmt.decode(rows, deq)
    cache = attention.QuantizedKVCache(rows, full[6:].clone(), fmt.spec, max_tail_blocks=2)
    return cache, torch.cat([deq, full[6:]]), full


@pytest.mark.parametrize("fmt_name", ["fp8", "int8", "int4"])
def test_attention_reads_rows_and_staging_like_the_dequantized_cache(fmt_name):
    cache, ref_kv, _ = _cache_and_reference(fmt_name)
    g = torch.Generator().manual_seed(1)
    tables = torch.tensor([[0, 3, 6, 0], [5, 1, 2, 7]])  # row 0: 2 rows + staging 0, padded; row 1: 3 rows + staging 1
    lens = torch.tensor([10, 15])
    q = torch.randn(2, 4, 8, generator=g)  # [B, Hq, D] (GQA: 4 query heads on 2 kv heads)
    for layer in range(2):
        got = attention.paged_decode_attention_quantized(q, cache, layer, tables, lens)
        want = attention.paged_decode_attention(q, ref_kv, layer, tables, lens)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        qc = torch.randn(3, 4, 8, generator=g)
        got = attention.paged_attention_quantized(qc, cache, layer, tables[1], 15)
        want = attention.paged_attention(qc, ref_kv, layer, tables[1], 15)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
