"""The tiers below the device: formats, host tier, disk tier files, and the manager moving
blocks through them (no engine: copies run inline or on a one-thread executor)."""

import hashlib
import os
import stat
from concurrent.futures import ThreadPoolExecutor

import msgpack
import numpy as np
import pytest
import torch

from afkv.errors import CorruptBlockError, TierError
from afkv.kv.block_pool import chain_hash
from afkv.kv.formats import QuantFormat, RawFormat, make_format
from afkv.kv.layout import KVLayout
from afkv.kv.manager import KVManager
from afkv.kv.tiers import disk as disk_mod
from afkv.kv.tiers.config import TierConfig
from afkv.kv.tiers.disk import DiskTier, block_file_name, read_block, write_block
from afkv.kv.tiers.fileio import PosixFileIO
from afkv.kv.tiers.host import HostTier
from afkv.ops import quant

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)


def _h(i: int) -> bytes:
    return chain_hash(None, [i])


# ---- formats --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["none", "fp8", "int8", "int4"])
def test_format_round_trip_and_bounds(name):
    """Each format's rows decode to the blocks within its error (tests/ops/test_quant.py checks
    the exact bounds against an independent decoder): here, from each vector's own range."""
    fmt = make_format(name, LAYOUT)
    blocks = torch.randn(3, *LAYOUT.block_shape) * 3  # [3, L, 2, bs, H, D]
    rows = fmt.encode(blocks)
    assert rows.dtype == torch.uint8 and rows.shape == (3, fmt.nbytes)
    out = torch.empty_like(blocks)
    fmt.decode(rows, out)
    if name == "none":
        assert fmt.nbytes == LAYOUT.block_nbytes
        assert torch.equal(out, blocks)
        return
    assert fmt.nbytes < LAYOUT.block_nbytes
    err = (out - blocks).abs()
    if name == "fp8":
        assert (err <= blocks.abs() / 16 + 1e-3).all()
        return
    rotated = blocks @ quant.hadamard(LAYOUT.head_dim)  # int8 / int4 quantize the rotated vectors
    step = (rotated.amax(-1, keepdim=True) - rotated.amin(-1, keepdim=True)) / fmt.spec.qmax  # [3, L, 2, bs, H, 1]
    assert (err <= step / 2 * 1.01 + 1e-3).all()


def test_format_digests_name_format_version_and_geometry():
    """Rows of another format, geometry, model dtype or row version never decode as this one."""
    other = KVLayout(2, 2, 8, 8, torch.float32)
    half = KVLayout(2, 2, 8, 4, torch.bfloat16)
    formats = [RawFormat(LAYOUT), RawFormat(other), RawFormat(half)]
    formats += [make_format(n, lay) for n in ("fp8", "int8", "int4") for lay in (LAYOUT, other, half)]
    assert len({f.digest for f in formats}) == len(formats)
    assert isinstance(make_format("int4", LAYOUT), QuantFormat)
    old_kivi = hashlib.blake2b(f"int8|g4|{LAYOUT.block_shape}|{LAYOUT.dtype}".encode(), digest_size=16).digest()
    assert make_format("int8", LAYOUT).digest != old_kivi  # the 2026-11 KIVI rows


# ---- host tier --------------------------------------------------------------------------------
def test_host_tier_lru_eviction_skips_pinned_and_loading():
    host = HostTier(RawFormat(LAYOUT), 3, "lru", pin_memory=False)
    for i in range(3):
        assert host.reserve(_h(i), loading=False)[1] is None
    host.touch(_h(0))  # order now 1, 2, 0
    host.pin(_h(1))
    slot, evicted = host.reserve(_h(3), loading=True)
    assert evicted == _h(2)
    assert host.lookup(_h(3)) is None and host.is_loading(_h(3))  # not readable while loading
    assert host.reserve(_h(4), loading=False)[1] == _h(0)
    assert host.reserve(_h(5), loading=False)[1] == _h(4)  # 1 pinned, 3 loading: 4 is the only candidate
    host.pin(_h(5))
    assert host.reserve(_h(6), loading=False) is None  # nothing evictable: no change
    assert _h(5) in host and _h(6) not in host
    host.check_invariants()


def test_host_tier_refuses_when_everything_is_busy():
    host = HostTier(RawFormat(LAYOUT), 2, "fifo", pin_memory=False)
    host.reserve(_h(0), loading=True)
    host.reserve(_h(1), loading=False)
    host.pin(_h(1))
    assert host.reserve(_h(2), loading=False) is None
    host.finish_loading(_h(0), ok=False)  # a failed read frees its slot
    assert _h(0) not in host
    slot, evicted = host.reserve(_h(2), loading=False)
    assert evicted is None and host.lookup(_h(2)) == slot
    host.unpin(_h(1))
    host.check_invariants()


def test_fifo_ignores_reads():
    host = HostTier(RawFormat(LAYOUT), 2, "fifo", pin_memory=False)
    host.reserve(_h(0), loading=False)
    host.reserve(_h(1), loading=False)
    host.touch(_h(0))
    assert host.reserve(_h(2), loading=False)[1] == _h(0)


# ---- disk tier files ----------------------------------------------------------------------------
def _open_disk(path, num_blocks=8, fmt=None):
    return DiskTier.open(path, fmt or RawFormat(LAYOUT), num_blocks, "lru", "disk_num_blocks")


def _payload(fmt, seed):
    return np.random.default_rng(seed).integers(0, 255, fmt.nbytes, dtype=np.uint8)


def test_disk_directory_is_private_and_claimed_once(tmp_path):
    path = tmp_path / "spill"
    disk = _open_disk(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    with pytest.raises(TierError, match="in use"):
        _open_disk(path)
    fmt = disk.format
    write_block(path, fmt.digest, _h(1), _payload(fmt, 1), PosixFileIO())
    assert stat.S_IMODE((path / block_file_name(_h(1))).stat().st_mode) == 0o600
    disk.close()
    _open_disk(path).close()  # released: a new engine may take it
    os.chmod(path, 0o755)
    _open_disk(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o700  # tightened again


def test_disk_start_up_errors_are_clear(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(TierError, match="cannot be used"):
        _open_disk(afile / "spill")
    with pytest.raises(TierError, match=r"kv\.disk_num_blocks"):
        _open_disk(tmp_path / "big", num_blocks=10**12)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "header", "wrong_block"])
def test_disk_reads_verify_everything(tmp_path, damage):
    fmt, io = RawFormat(LAYOUT), PosixFileIO()
    payload = _payload(fmt, 0)
    crc = write_block(tmp_path, fmt.digest, _h(1), payload, io)
    out = np.zeros(fmt.nbytes, dtype=np.uint8)
    read_block(tmp_path, fmt.digest, _h(1), crc, out, io)
    assert np.array_equal(out, payload)
    name = tmp_path / block_file_name(_h(1))
    data = bytearray(name.read_bytes())
    if damage == "flip":
        data[disk_mod.HEADER_NBYTES + 17] ^= 0x40
        name.write_bytes(data)
    elif damage == "truncate":
        name.write_bytes(data[:-5])
    elif damage == "delete":
        name.unlink()
    elif damage == "header":
        data[0] ^= 1
        name.write_bytes(data)
    else:  # a valid file of another block under this name
        os.replace(tmp_path / block_file_name(_h(2)) if write_block(tmp_path, fmt.digest, _h(2), payload, io) else None, name)
    expected = FileNotFoundError if damage == "delete" else CorruptBlockError
    with pytest.raises(expected):
        read_block(tmp_path, fmt.digest, _h(1), crc, out, io)


def test_disk_index_restart_adopts_and_cleans(tmp_path):
    fmt, io = RawFormat(LAYOUT), PosixFileIO()
    disk = _open_disk(tmp_path, num_blocks=4)
    crcs = {}
    for i in range(3):
        assert disk.reserve(_h(i)) == []
        crcs[i] = write_block(tmp_path, fmt.digest, _h(i), _payload(fmt, i), io)
        disk.finish_write(_h(i), crcs[i])
    disk.touch(_h(0))  # order 1, 2, 0
    disk_mod.write_index(tmp_path, disk.index_bytes())
    disk.close()
    write_block(tmp_path, fmt.digest, _h(7), _payload(fmt, 7), io)  # written after the index: adopted
    (tmp_path / "x.kvb.tmp").write_bytes(b"partial")  # a crash mid-write: deleted
    other = make_format("int8", LAYOUT)
    write_block(tmp_path, other.digest, _h(8), _payload(other, 8), io)  # another format: deleted
    again = _open_disk(tmp_path, num_blocks=4)
    assert [again.lookup(_h(i)) for i in range(3)] == [crcs[0], crcs[1], crcs[2]]
    assert again.lookup(_h(7)) is not None and again.lookup(_h(8)) is None
    assert not (tmp_path / "x.kvb.tmp").exists()
    assert sorted(p.name for p in tmp_path.glob("*.kvb")) == sorted(block_file_name(_h(i)) for i in (0, 1, 2, 7))
    # full: the oldest go first (adopted files, unknown use time, then the index order)
    assert again.reserve(_h(9)) == [_h(7)]
    again.finish_write(_h(9), 0)
    assert again.reserve(_h(10)) == [_h(1)]
    again.check_invariants()
    again.close()
    index = msgpack.unpackb((tmp_path / disk_mod.INDEX_NAME).read_bytes())
    assert index["format"] == fmt.digest and len(index["entries"]) == 3


def test_disk_index_garbage_is_rebuilt_from_files(tmp_path):
    fmt, io = RawFormat(LAYOUT), PosixFileIO()
    _open_disk(tmp_path).close()
    crc = write_block(tmp_path, fmt.digest, _h(1), _payload(fmt, 1), io)
    (tmp_path / disk_mod.INDEX_NAME).write_bytes(b"\xc1garbage")
    disk = _open_disk(tmp_path)
    assert disk.lookup(_h(1)) == crc
    disk.close()


def test_disk_over_capacity_at_start_evicts(tmp_path):
    fmt, io = RawFormat(LAYOUT), PosixFileIO()
    for i in range(5):
        write_block(tmp_path, fmt.digest, _h(i), _payload(fmt, i), io)
    disk = _open_disk(tmp_path, num_blocks=2)
    assert disk.num_used == 2 and len(list(tmp_path.glob("*.kvb"))) == 2
    disk.close()


# ---- the manager moving blocks through the tiers --------------------------------------------------
def _fill(kv: torch.Tensor, block_id: int, tokens: list[int], start: int) -> None:
    """Deterministic content for a block: a function of its tokens and their positions."""
    for t, tok in enumerate(tokens):
        kv[block_id, :, :, t] = tok * 1000.0 + start + t


def _expected(tokens: list[int], start: int) -> torch.Tensor:
    out = torch.zeros(LAYOUT.block_shape)
    for t, tok in enumerate(tokens):
        out[:, :, t] = tok * 1000.0 + start + t
    return out


def _run(kv: KVManager, seq_id: int, tokens: list[int], worker=None) -> int:
    """Admit and fully compute a sequence as the engine would; -> cached tokens."""
    bs = LAYOUT.block_size
    kv.match_prefix(seq_id, tokens)
    kv.flush()
    while kv.settle(seq_id) is None:
        kv.drain()
    cached = kv.settle(seq_id)
    assert kv.allocate(seq_id, len(tokens))
    kv.flush()

    def step():
        for b in range(len(kv.block_table(seq_id))):
            if b * bs >= cached:
                _fill(kv.kv, kv.block_table(seq_id)[b], tokens[b * bs : (b + 1) * bs], b * bs)
            else:
                assert torch.equal(kv.kv[kv.block_table(seq_id)[b]], _expected(tokens[b * bs : (b + 1) * bs], b * bs))

    if worker is None:
        step()
    else:
        worker.submit(step).result()  # after the copy batch, like a model step
    kv.commit(seq_id, tokens, len(tokens))
    return cached


def _tiers(tmp_path=None, host=4, disk=64, fmt=None):
    fmt = fmt or RawFormat(LAYOUT)
    if tmp_path is None:
        return TierConfig(fmt, host)
    return TierConfig(fmt, host, disk, tmp_path / "spill", io_threads=2, disk_capacity_key="disk_num_blocks")


def test_demoted_blocks_come_back_from_host():
    kv = KVManager(LAYOUT, 4, torch.device("cpu"), tiers=_tiers(host=8))
    a = list(range(1, 14))  # 3 full blocks + 1
    assert _run(kv, 0, a) == 0
    kv.free(0)
    b = list(range(50, 63))
    assert _run(kv, 1, b) == 0  # reuses every device slot: a's 3 blocks are demoted
    kv.free(1)
    m = kv.metrics
    assert m.counters["demotions"] == 3
    assert _run(kv, 2, a) == 12  # all three from host memory, content checked in _run
    assert m.hit_blocks["host"] == 3 and m.counters["promotions"] == 3
    kv.check_invariants()
    kv.free(2)
    kv.check_invariants()
    assert kv.pool.num_free_blocks == 4


def test_blocks_spill_to_disk_and_return_through_a_worker(tmp_path):
    worker = ThreadPoolExecutor(1)
    kv = KVManager(LAYOUT, 4, torch.device("cpu"), tiers=_tiers(tmp_path, host=8), worker=worker)
    seqs = [[100 * s + i for i in range(13)] for s in range(6)]
    for s, toks in enumerate(seqs):
        _run(kv, s, toks, worker)  # demotes the 3 full blocks of the sequence before
        kv.free(s)
        kv.drain()
    m = kv.metrics
    assert m.counters["demotions"] == m.counters["spills"] == 15 and m.counters["dropped"] == 0
    assert m.counters["host_evictions"] == 15 - 8
    assert _run(kv, 10, seqs[0], worker) == 12  # from disk: loading, then settled
    assert m.hit_blocks["disk"] == 3 and m.counters["fetches"] == 3
    kv.free(10)
    kv.drain()
    kv.check_invariants()
    snap = kv.metrics_snapshot()
    assert [t.name for t in snap.tiers] == ["device", "host", "disk"]
    assert snap.counters["bytes_disk_to_host"] == m.counters["fetches"] * LAYOUT.block_nbytes
    kv.close()
    worker.shutdown()


def test_corrupt_block_ends_the_prefix_and_is_recomputed(tmp_path):
    kv = KVManager(LAYOUT, 4, torch.device("cpu"), tiers=_tiers(tmp_path, host=4))
    a = list(range(1, 14))
    _run(kv, 0, a)
    kv.free(0)
    for s in range(1, 4):  # push a's blocks out of the device pool and host memory
        _run(kv, s, [100 * s + i for i in range(13)])
        kv.free(s)
        kv.drain()
    h1 = chain_hash(chain_hash(None, a[:4]), a[4:8])  # a's second block
    name = tmp_path / "spill" / block_file_name(h1)
    data = bytearray(name.read_bytes())
    data[-1] ^= 1
    name.write_bytes(data)
    assert _run(kv, 9, a) == 4  # first block from disk; the corrupt second ends the prefix
    assert kv.metrics.counters["corrupt_blocks"] == 1
    kv.free(9)
    kv.drain()
    assert not name.exists() or kv.tiers.disk.lookup(h1) is not None  # deleted, or rewritten after recompute
    kv.check_invariants()
    kv.close()


def test_restart_reuses_the_disk_index(tmp_path):
    kv = KVManager(LAYOUT, 4, torch.device("cpu"), salt=b"model-a", tiers=_tiers(tmp_path, host=4))
    a = list(range(1, 14))
    _run(kv, 0, a)
    kv.free(0)
    for s in range(1, 3):
        _run(kv, s, [100 * s + i for i in range(13)])
        kv.free(s)
        kv.drain()
    kv.close()
    again = KVManager(LAYOUT, 4, torch.device("cpu"), salt=b"model-a", tiers=_tiers(tmp_path, host=4))
    assert _run(again, 0, a) == 12
    assert again.metrics.hit_blocks["disk"] == 3
    again.free(0)
    again.close()
    other = KVManager(LAYOUT, 4, torch.device("cpu"), salt=b"model-b", tiers=_tiers(tmp_path, host=4))
    assert _run(other, 0, a) == 0  # another model's salt: other hashes, nothing reused
    other.close()


@pytest.mark.parametrize("name", ["fp8", "int8", "int4"])
def test_quantized_tier_round_trip_is_close(name):
    fmt = make_format(name, LAYOUT)
    kv = KVManager(LAYOUT, 4, torch.device("cpu"), tiers=_tiers(host=8, fmt=fmt))
    a = list(range(1, 14))
    [b0] = kv.pool.allocate(1)
    kv.pool.release([b0])
    kv.match_prefix(0, a)
    assert kv.allocate(0, 13)
    kv.kv[kv.block_table(0)] = torch.randn(4, *LAYOUT.block_shape)
    before = kv.kv[kv.block_table(0)[:3]].clone()
    kv.commit(0, a, 13)
    kv.free(0)
    kv.match_prefix(1, list(range(50, 63)))
    assert kv.allocate(1, 13)
    kv.flush()
    kv.free(1)
    assert kv.match_prefix(2, a) == 12
    kv.flush()
    after = kv.kv[kv.block_table(2)]
    assert not torch.equal(after, before) and (after - before).abs().max() < {"fp8": 0.3, "int8": 0.05, "int4": 0.8}[name]
    assert kv.metrics.counters["bytes_device_to_host"] == 3 * fmt.nbytes < 3 * LAYOUT.block_nbytes


def test_spill_files_of_another_format_are_recomputed_not_decoded(tmp_path):
    """A disk tier written as int8, reopened as fp8 (same geometry, same hashes): nothing is
    adopted, the prefix is computed again, and the old files are deleted."""
    a = list(range(1, 14))

    def push_out(kv: KVManager) -> None:  # a's blocks out of the device and host tiers, onto disk
        for s in range(1, 3):
            _run(kv, s, [100 * s + i for i in range(13)])
            kv.free(s)
            kv.drain()
        kv.close()

    def manager(fmt_name: str) -> KVManager:
        return KVManager(LAYOUT, 4, torch.device("cpu"), tiers=_tiers(tmp_path, host=4, fmt=make_format(fmt_name, LAYOUT)))

    first = manager("int8")
    _run(first, 0, a)
    first.free(0)
    push_out(first)
    int8_files = set((tmp_path / "spill").glob("*.kvb"))
    assert len(int8_files) >= 3  # a's blocks among them
    again = manager("fp8")
    assert not set((tmp_path / "spill").glob("*.kvb")) & int8_files  # deleted at start, never read
    assert _run(again, 0, a) == 0 and again.metrics.hit_blocks["disk"] == 0
    again.free(0)
    push_out(again)
    same = manager("fp8")
    same.match_prefix(0, a)
    same.flush()
    while same.settle(0) is None:
        same.drain()
    assert same.settle(0) == 12 and same.metrics.hit_blocks["disk"] == 3  # its own format's files are reused
    same.free(0)
    same.close()
