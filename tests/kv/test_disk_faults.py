"""Disk tier start-up and close against odd spill directories: entries of the wrong kind,
a directory removed under a live engine, an index that cannot be written at close."""

import asyncio
import os
import shutil
import threading

import pytest
import torch

from afkv import Engine, EngineConfig, SamplingParams
from afkv.errors import TierError
from afkv.kv.formats import RawFormat
from afkv.kv.layout import KVLayout
from afkv.kv.tiers import stack as stack_mod
from afkv.kv.tiers.disk import DiskTier, block_file_name
from tests.helpers import random_prompt

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)
BOUND_S = 30.0


def _open(path):
    return DiskTier.open(path, RawFormat(LAYOUT), 8, "lru", "disk_num_blocks")


def _open_bounded(path):
    """DiskTier.open on a daemon thread: an open that blocks (a FIFO) fails the test instead of hanging it."""
    outcome = []

    def run():
        try:
            outcome.append(_open(path))
        except Exception as exc:
            outcome.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(BOUND_S)
    assert not t.is_alive(), "DiskTier.open blocked"
    return outcome[0]


@pytest.mark.parametrize("name", [block_file_name(b"\1" * 16), "index.msgpack", "probe.tmp", "lock"])
@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink"])
def test_entries_of_the_wrong_kind_are_named(tmp_path, name, kind):
    path = tmp_path / "spill"
    path.mkdir(mode=0o700)
    odd = path / name
    if kind == "directory":
        odd.mkdir()
    elif kind == "fifo":
        os.mkfifo(odd)
    else:
        odd.symlink_to(tmp_path / "elsewhere")
    result = _open_bounded(path)
    assert isinstance(result, TierError), result
    assert name in str(result) and "not a regular file" in str(result)
    if kind == "directory":
        odd.rmdir()
    else:
        odd.unlink()
    _open(path).close()  # usable once it is gone


def test_claim_survives_the_directory_being_removed_and_recreated(tmp_path):
    path = tmp_path / "spill"
    first = _open(path)
    shutil.rmtree(path)
    path.mkdir(mode=0o700)
    with pytest.raises(TierError, match="in use"):
        _open(path)
    first.close()
    _open(path).close()  # released with the first engine


def _cfg(tmp_path) -> EngineConfig:
    return EngineConfig.from_dict({
        "kv": {"block_size": 4, "num_blocks": 16, "host_num_blocks": 8, "disk_path": str(tmp_path / "spill"),
               "disk_num_blocks": 200},
        "scheduler": {"max_num_batched_tokens": 32, "max_num_seqs": 4},
    })


async def test_close_with_an_unwritable_index_is_typed_and_still_shuts_down(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(stack_mod, "INDEX_SAVE_INTERVAL_S", 0.0)  # the index is saved at every chance
    engine = Engine(tiny_dir["mixtral"], _cfg(tmp_path), progress=False)
    await engine.start()
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    for i in range(6):  # enough KV to spill to the disk tier
        await engine.complete(random_prompt(30, 256, seed=i), params)
    # the directory disappears (renamed away at once: spills still in flight finish there, out of the
    # engine's path); reads, spills and index saves fail from now on
    os.rename(tmp_path / "spill", tmp_path / "gone")
    for i in range(6):  # the same prompts: their spilled blocks are gone (the index changes, its save fails)
        async with asyncio.timeout(BOUND_S):  # a failed save is logged, and the engine goes on
            assert len((await engine.complete(random_prompt(30, 256, seed=i), params)).token_ids) == 8
    assert engine.kv_metrics().counters["missing_blocks"] > 0
    with pytest.raises(TierError, match="cannot write its index"):  # at close it is an error
        await engine.aclose()
    assert engine._executor._shutdown and engine._tokenize_executor._shutdown
    # the directory was released: another engine takes the path
    async with Engine(tiny_dir["mixtral"], _cfg(tmp_path), progress=False) as again:
        assert len((await again.complete([1, 2, 3], params)).token_ids) == 8
