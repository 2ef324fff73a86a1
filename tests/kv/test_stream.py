"""The stream store and ring (afkv.kv.stream) and the partial attention they feed
(afkv.ops.attention): placement, spilled bytes, the layer-by-layer ring, the log-sum-exp merge.
The engine-level oracles are in tests/engine/test_stream.py."""

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from afkv.errors import TierAccountingError, TierError
from afkv.kv.formats import make_format
from afkv.kv.layout import KVLayout
from afkv.kv.manager import KVManager
from afkv.kv.stream import StreamConfig, runs
from afkv.kv.tiers.disk import HEADER_NBYTES
from afkv.ops import attention as A

LAYOUT = KVLayout(num_layers=5, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)


def _manager(fmt: str = "none", num_blocks: int = 32, store_blocks: int = 16, ahead: int = 2, window: int = 6,
             disk: Path | None = None, disk_blocks: int = 0):
    cfg = StreamConfig(make_format(fmt, LAYOUT), store_blocks, num_sink_tokens=4, window=window, ahead=ahead,
                       disk_blocks=disk_blocks, disk_path=disk)
    return KVManager(LAYOUT, num_blocks, torch.device("cpu"), stream=cfg)


def _grow(kv: KVManager, seq_id: int, num_slots: int) -> None:
    """Allocate num_slots device slots (as computed) and fill them with random KV."""
    assert kv.allocate(seq_id, num_slots)
    table = kv.block_table(seq_id)
    kv.kv[table] = torch.randn(len(table), *LAYOUT.block_shape)


def test_placement_keeps_sinks_and_window_and_streams_the_middle():
    kv = _manager()
    kv.match_prefix(1, [])
    _grow(kv, 1, 40)  # 10 blocks: sink block 0, window = the last 6 slots (blocks 8, 9)
    table = list(kv.block_table(1))
    before = kv.kv[table].clone()
    assert kv.place(1, 40) == 7 * 4  # blocks 1 .. 7 (block 8 holds slot 34, in the window)
    assert kv.block_table(1) == [table[0], table[8], table[9]]
    assert kv.num_dropped(1) == 28
    assert kv.pool.num_free_blocks == 32 - 3
    kv.flush()  # the spill copy (inline: no worker)
    ids = kv.streamed_blocks(1)
    assert ids == list(range(7))
    for layer in range(LAYOUT.num_layers):
        assert torch.equal(kv.stream.buf[layer, ids].view(torch.float32).view(7, *LAYOUT.block_shape[1:]),
                           before[1:8, layer])
    assert kv.place(1, 12) == 0  # nothing more until the window moves on
    kv.check_invariants()
    kv.free(1)
    kv.check_invariants()
    assert kv.stream.num_free_blocks == 16 and kv.pool.num_free_blocks == 32


@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4"])
def test_quantized_store_holds_each_layer_as_its_row_section(fmt):
    kv = _manager(fmt)
    kv.match_prefix(1, [])
    _grow(kv, 1, 40)
    table = list(kv.block_table(1))
    f = kv.stream.format
    rows = f.encode(kv.kv[table[1:8]])  # what a host tier would store
    want = torch.empty(7, *LAYOUT.block_shape)
    f.decode(rows, want)
    kv.place(1, 40)
    kv.flush()
    ids = kv.streamed_blocks(1)
    for layer in range(LAYOUT.num_layers):
        assert torch.equal(f.decode_layer(kv.stream.buf[layer, ids]), want[:, layer])
    assert kv.stream.usage()[0].block_nbytes == f.nbytes < LAYOUT.block_nbytes


@pytest.mark.parametrize("fmt", ["none", "fp8", "int8", "int4"])
def test_streamed_blocks_are_the_formats_sections_read_as_attention_takes_them(fmt):
    """Spilled, then streamed through the ring: each layer's sections are the rows the format
    encodes, and `cache` those sections as a one-layer cache for the attention kernels (the
    model dtype's blocks, or the quantized rows themselves)."""
    kv = _manager(fmt)
    kv.match_prefix(1, [])
    _grow(kv, 1, 40)
    table = list(kv.block_table(1))
    f = kv.stream.format
    rows = f.encode(kv.kv[table[1:8]]).view(7, LAYOUT.num_layers, f.layer_nbytes)  # [7, L, lnb]
    kv.place(1, 40)
    kv.flush()
    step = kv.stream_ring.begin(kv.streamed_blocks(1))
    for layer in range(LAYOUT.num_layers):
        sections = rows[:, layer].contiguous()
        assert torch.equal(step.layer(layer), sections)
        cache = step.cache(layer)
        if fmt == "none":
            assert torch.equal(cache[:, 0], f.decode_layer(sections))
        else:
            assert torch.equal(cache.blocks, sections) and cache.spec.num_layers == 1
    kv.free(1)
    kv.check_invariants()


def test_a_full_store_streams_what_fits_and_the_rest_stays_on_the_device():
    kv = _manager(store_blocks=3)
    kv.match_prefix(1, [])
    _grow(kv, 1, 40)
    assert kv.place(1, 40) == 12
    assert len(kv.block_table(1)) == 7
    assert kv.metrics.counters["stream_store_full"] == 1
    kv.check_invariants()


def test_a_freed_sequence_drops_its_queued_spills_and_a_new_one_reuses_the_ids():
    kv = _manager()
    for seq in (1, 2):
        kv.match_prefix(seq, [])
        _grow(kv, seq, 40)
    kv.place(1, 40)
    kv.free(1)  # before the flush: its spills must not land on ids seq 2 gets now
    kv.place(2, 40)
    table2 = kv.streamed_blocks(2)
    assert table2 == list(range(7))
    kv.flush()
    kv.check_invariants()


@pytest.mark.parametrize("ahead", [1, 2, 4])
def test_the_ring_hands_each_layer_its_own_sections(ahead):
    kv = _manager(ahead=ahead)
    kv.stream.buf.copy_(torch.randint(0, 255, kv.stream.buf.shape, dtype=torch.uint8))
    ids = [5, 6, 7, 2, 9, 10]  # runs (5-7), (2), (9-10)
    assert runs(ids) == [(0, 5, 3), (3, 2, 1), (4, 9, 2)]
    step = kv.stream_ring.begin(ids)
    for layer in range(LAYOUT.num_layers):
        for _ in range(2):  # one call per micro-batch
            assert torch.equal(step.layer(layer), kv.stream.buf[layer, ids])
    with pytest.raises(TierAccountingError):
        kv.stream_ring.begin(ids).layer(1)  # layers in order


def _streamed_rows(kv: KVManager, seq_id: int, num_slots: int) -> torch.Tensor:
    """Place the sequence's middle and flush: -> the host-format rows of the streamed device
    blocks uint8 [n, L, lnb], in store-id order of the sequence."""
    fmt = kv.stream.format
    table = list(kv.block_table(seq_id))
    kv.place(seq_id, num_slots)
    moved = [b for b in table if b not in kv.block_table(seq_id)]
    rows = fmt.encode(kv.kv[moved]).view(len(moved), LAYOUT.num_layers, fmt.layer_nbytes)
    kv.flush()
    kv.drain()
    kv.stream.disk.io.submit(lambda: None).result()  # the files are written (the I/O thread is FIFO)
    return rows


@pytest.mark.parametrize("fmt", ["none", "int4"])
def test_blocks_past_the_store_stream_from_disk_with_the_stores_sections(tmp_path, fmt):
    """A store of 3 blocks over a disk of 16: the sequence's middle (7 blocks) is 3 host ids then disk ids;
    every layer of a step reads both, each block's own sections; the disk files go at close."""
    kv = _manager(fmt, store_blocks=3, disk=tmp_path, disk_blocks=16)
    kv.match_prefix(1, [])
    _grow(kv, 1, 40)
    rows = _streamed_rows(kv, 1, 40)  # [7, L, lnb]
    ids = kv.streamed_blocks(1)
    assert ids == list(range(7)) and kv.metrics.counters["stream_disk_spills"] == 4
    assert sorted(os.listdir(kv.stream.disk.path)) == sorted(kv.stream.disk.file(i).name for i in range(3, 7))
    for order in (ids, ids[::-1]):  # runs of host and disk ids at any staging positions
        step = kv.stream_ring.begin(order)
        for layer in range(LAYOUT.num_layers):
            assert torch.equal(step.layer(layer), rows[[ids.index(i) for i in order], layer])
        assert step.corrupt == {}
    kv.check_invariants()
    kv.free(1)
    kv.check_invariants()
    assert kv.stream.num_free_blocks == 19
    kv.close()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["first layer", "last layer", "header", "gone"])
def test_a_corrupt_disk_block_is_named_and_read_as_zeros(tmp_path, where):
    """A flipped byte anywhere in the file (or the file gone) is caught by the crc32 of its
    sections or its header checks; the other blocks of the step read right."""
    kv = _manager(store_blocks=2, disk=tmp_path, disk_blocks=16)
    kv.match_prefix(1, [])
    _grow(kv, 1, 40)
    rows = _streamed_rows(kv, 1, 40)
    ids = kv.streamed_blocks(1)
    bad = ids[3]
    name = kv.stream.disk.file(bad)
    lnb = kv.stream.format.layer_nbytes
    if where == "gone":
        name.unlink()
    else:
        offset = {"first layer": HEADER_NBYTES + 1, "last layer": HEADER_NBYTES + (LAYOUT.num_layers - 1) * lnb + 3,
                  "header": 48}[where]  # byte 48: the crc32 stored in the header
        fd = os.open(name, os.O_RDWR)
        os.pwrite(fd, bytes([os.pread(fd, 1, offset)[0] ^ 0xFF]), offset)
        os.close(fd)
    step = kv.stream_ring.begin(ids)
    for layer in range(LAYOUT.num_layers):
        got = step.layer(layer)
        good = [i for i, s in enumerate(ids) if s != bad]
        assert torch.equal(got[good], rows[good, layer])
    assert list(step.corrupt) == [bad] and str(name) in step.corrupt[bad]
    kv.free(1)
    kv.check_invariants()
    kv.close()


def test_a_stream_disk_its_file_system_cannot_hold_is_refused_naming_the_setting(tmp_path):
    with pytest.raises(TierError, match="kv.stream_disk_mib"):
        _manager(disk=tmp_path, disk_blocks=2**50)
    assert os.listdir(tmp_path) == []


def _reference(q, k, v):
    """Causal SDPA: query i at key index N - n + i."""
    n, num_keys = q.shape[0], k.shape[0]
    mask = torch.arange(num_keys)[None, :] <= (torch.arange(n) + num_keys - n)[:, None]
    return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                          enable_gqa=True).transpose(0, 1)


@pytest.mark.parametrize("n", [1, 5])
def test_partials_merged_by_log_sum_exp_equal_one_softmax(monkeypatch, n):
    """Keys split into a non-causal head part and a causal tail, each taken in several chunks."""
    monkeypatch.setattr(A, "MAX_KEY_CHUNK", 7)
    monkeypatch.setattr(A, "MIN_KEY_CHUNK", 7)
    torch.manual_seed(0)
    q, k, v = torch.randn(n, 8, 16), torch.randn(45, 2, 16), torch.randn(45, 2, 16)
    want = _reference(q, k, v)
    parts = [A.attention_partial(q, k[:13], v[:13], causal=False), A.attention_partial(q, k[13:30], v[13:30], causal=False),
             A.attention_partial(q, k[30:], v[30:], causal=True)]
    got = A.merge_partials(parts).out
    assert (got - want).abs().max() < 1e-5
    assert (A.attention_partial(q, k, v, causal=True).out - want).abs().max() < 1e-5
    empty = A.attention_partial(q, k[:0], v[:0], causal=False)  # no key: weighs nothing
    assert (A.merge_partials([empty, *parts]).out - want).abs().max() < 1e-5


def test_micro_batches_split_streamed_and_decode_rows_alike(tiny_dir):
    """The runner's step with m = 2 micro-batches (AF's ping-pong) equals m = 1 when the step
    mixes batched decode rows, a streamed decode row and a streamed prefill chunk."""
    from afkv.engine.runner import ChunkPlan, ModelRunner, SampleSpec
    from afkv.model.model import load_colocated

    model = load_colocated(tiny_dir["qwen3_moe"], torch.device("cpu"), torch.float32)
    spec = model.spec
    layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, 4, torch.float32)
    kv = KVManager(layout, 64, torch.device("cpu"),
                   stream=StreamConfig(make_format("none", layout), 32, num_sink_tokens=4, window=4, ahead=2))
    kv.kv.normal_()
    kv.stream.buf.view(torch.float32).normal_()
    greedy = SampleSpec(0.0, 0, 1.0, 0, 0, 5)
    plan = [ChunkPlan(2, (7,), 40, (10, 11, 12), greedy, num_dropped=32, streamed=tuple(range(0, 8))),  # streamed decode
            ChunkPlan(3, (8, 9, 10), 30, tuple(range(13, 18)), greedy, num_dropped=16,
                      streamed=tuple(range(8, 12))),  # streamed prefill chunk (ends the first micro-batch)
            ChunkPlan(0, (5,), 20, tuple(range(0, 6)), greedy),  # plain decode rows (batched)
            ChunkPlan(1, (6,), 12, tuple(range(6, 10)), greedy)]
    one = ModelRunner(model, kv.kv, 4, torch.device("cpu"), micro_batches=1, stream=kv.stream_ring).execute(plan)
    two = ModelRunner(model, kv.kv, 4, torch.device("cpu"), micro_batches=2, stream=kv.stream_ring).execute(plan)
    assert [r.token_id for r in one] == [r.token_id for r in two]
    for a, b in zip(one, two):
        assert abs(a.logprob - b.logprob) < 1e-5
        assert all(abs(a.top[t] - b.top[t]) < 1e-5 for t in a.top)
