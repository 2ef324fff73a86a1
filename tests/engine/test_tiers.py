"""The engine with KV tiers below the device (tiny random checkpoints, token-id prompts).

The device tier is made tiny so that the workload's KV (about 10x the device tier) keeps
moving device -> host -> disk and back; greedy tokens must equal the all-in-memory run's.
"""

import asyncio
import errno
import stat
from pathlib import Path

import pytest
import torch

from afkv import Engine, EngineConfig, SamplingParams
from afkv.errors import ConfigError, TierError
from afkv.kv.tiers import stack as stack_mod
from tests.helpers import random_prompt

BS = 4
DEVICE_BLOCKS = 16  # 64 tokens on the device tier
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


def _cfg(num_blocks=DEVICE_BLOCKS, **kv) -> EngineConfig:
    return EngineConfig.from_dict({
        "kv": {"block_size": BS, "num_blocks": num_blocks, **kv},
        "scheduler": {"max_num_batched_tokens": 32, "max_num_seqs": 4},
    })


def _tiered(tmp_path, **kv) -> EngineConfig:
    opts = {"host_num_blocks": 12, "disk_path": str(tmp_path / "spill"), "disk_num_blocks": 400, "io_threads": 2}
    return _cfg(**(opts | kv))


def _workload(n=10):
    """Prompts sharing a 24-token system prefix, plus distinct ones (about 10x the device tier
    with their outputs, over two rounds)."""
    system = random_prompt(24, 256, seed=100)
    return [system + random_prompt(5 + i, 256, seed=i) if i % 3 else random_prompt(30, 256, seed=50 + i)
            for i in range(n)]


async def _rounds(engine: Engine, prompts, params=GREEDY, rounds=2):
    out = []
    for _ in range(rounds):
        out.append([r.token_ids for r in await asyncio.gather(*(engine.complete(p, params) for p in prompts))])
    return out


async def _idle(engine: Engine) -> None:
    async with asyncio.timeout(10):
        while engine.stats().num_running or engine.stats().num_waiting or engine.kv_manager.num_sequences:
            await asyncio.sleep(0.01)


async def _check_clean(engine: Engine) -> None:
    await _idle(engine)
    kv = engine.kv_manager
    await kv.aclose()
    kv.check_invariants()
    assert kv.num_sequences == 0 and kv.pool.num_free_blocks == kv.pool.num_blocks


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """Greedy tokens of the workload with every block in device memory."""
    async def run():
        async with Engine(tiny_dir["llama"], _cfg(num_blocks=1024)) as e:
            return await _rounds(e, _workload())
    return asyncio.run(run())


async def test_greedy_tokens_equal_all_in_memory_through_host_and_disk(tiny_dir, tmp_path, reference):
    async with Engine(tiny_dir["llama"], _tiered(tmp_path)) as engine:
        got = await _rounds(engine, _workload())
        m = engine.kv_metrics()
        stats = engine.stats()
        await _check_clean(engine)
    assert got == reference
    c, hits = m.counters, m.hit_blocks
    total_blocks = sum(len(p) + GREEDY.max_tokens for p in _workload()) * 2 // BS
    assert total_blocks >= 10 * DEVICE_BLOCKS
    assert c["demotions"] > 0 and c["promotions"] > 0 and c["spills"] > 0 and c["fetches"] > 0
    assert hits["host"] > 0 and hits["disk"] > 0
    assert c["bytes_device_to_host"] == c["demotions"] * m.tiers[1].block_nbytes
    assert stats.num_preemptions > 0  # preempted sequences came back through the tiers
    assert [t.name for t in m.tiers] == ["device", "host", "disk"]
    assert m.latency["spill"].count == c["spills"] and m.latency["prefetch"].count == c["fetches"]


async def test_host_tier_alone_and_fifo(tiny_dir, reference):
    async with Engine(tiny_dir["llama"], _cfg(host_num_blocks=40, eviction="fifo")) as engine:
        got = await _rounds(engine, _workload())
        m = engine.kv_metrics()
        await _check_clean(engine)
    assert got == reference
    assert m.hit_blocks["host"] > 0 and [t.name for t in m.tiers] == ["device", "host"]


@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4"])
async def test_quantized_tiers_serve_every_request(tiny_dir, tmp_path, fmt, reference):
    async with Engine(tiny_dir["llama"], _tiered(tmp_path, spill_format=fmt)) as engine:
        got = await _rounds(engine, _workload())
        m = engine.kv_metrics()
        await _check_clean(engine)
    assert all(len(t) == GREEDY.max_tokens for r in got for t in r)
    assert m.hit_blocks["host"] + m.hit_blocks["disk"] > 0
    assert m.tiers[1].format == fmt and m.tiers[1].block_nbytes < m.tiers[0].block_nbytes
    same = sum(a == b for ra, rb in zip(got, reference) for a, b in zip(ra, rb))
    assert same >= len(reference[0]) // 2  # requests computed without quantized blocks match exactly


async def test_damaged_spill_files_are_recomputed(tiny_dir, tmp_path, reference):
    """Between the rounds every spill file is damaged (a flipped byte, truncated, or deleted);
    and during the second round more files are damaged while requests run."""
    prompts = _workload()
    spill = tmp_path / "spill"
    async with Engine(tiny_dir["llama"], _tiered(tmp_path, host_num_blocks=8)) as engine:
        first = await _rounds(engine, prompts, rounds=1)
        # push everything of round one out of device and host memory
        await asyncio.gather(*(engine.complete(random_prompt(40, 256, seed=900 + i), GREEDY) for i in range(6)))
        await _idle(engine)
        engine.kv_manager.drain()
        for i, path in enumerate(sorted(spill.glob("*.kvb"))):
            _damage(path, i % 3)

        async def vandal():
            for i in range(20):
                await asyncio.sleep(0.005)
                for path in sorted(spill.glob("*.kvb"))[i::7]:
                    _damage(path, i % 3)

        second, _ = await asyncio.gather(_rounds(engine, prompts, rounds=1), vandal())
        m = engine.kv_metrics()
        await _check_clean(engine)
    assert first + second == reference
    assert m.counters["corrupt_blocks"] > 0 and m.counters["missing_blocks"] > 0
    assert m.hit_blocks["disk"] > 0


def _damage(path, how: int) -> None:
    try:
        data = path.read_bytes()
        if how == 0:
            path.write_bytes(data[:-1] + bytes([data[-1] ^ 0x55]))
        elif how == 1:
            path.write_bytes(data[: len(data) // 3])
        else:
            path.unlink()
    except FileNotFoundError:  # an I/O thread deleted or replaced it meanwhile
        return


async def test_full_disk_falls_back_and_loses_no_request(tiny_dir, tmp_path, reference, monkeypatch, caplog):
    """A file system with room for 10 block files (the tier was configured for 400)."""
    real = stack_mod.write_block

    def write_unless_full(path, *args):
        if len(list(path.glob("*.kvb"))) >= 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args)

    monkeypatch.setattr(stack_mod, "write_block", write_unless_full)
    async with Engine(tiny_dir["llama"], _tiered(tmp_path)) as engine:
        got = await _rounds(engine, _workload())
        m = engine.kv_metrics()
        await _check_clean(engine)
    assert got == reference
    assert m.counters["disk_write_errors"] > 0 and m.counters["spills"] > 10  # evicting made room again
    assert m.tiers[2].capacity_blocks <= 10  # lowered to what fits
    assert len(list((tmp_path / "spill").glob("*.kvb"))) <= 10
    assert "No space left" in caplog.text


async def test_disk_capacity_limit_evicts_lru_files(tiny_dir, tmp_path, reference):
    async with Engine(tiny_dir["llama"], _tiered(tmp_path, disk_num_blocks=12)) as engine:
        got = await _rounds(engine, _workload())
        m = engine.kv_metrics()
        await _check_clean(engine)
    assert got == reference
    assert m.counters["disk_evictions"] > 0 and m.tiers[2].num_blocks <= 12
    assert len(list((tmp_path / "spill").glob("*.kvb"))) <= 12


async def test_restart_reuses_spilled_blocks(tiny_dir, tmp_path, reference):
    prompts = _workload()
    async with Engine(tiny_dir["llama"], _tiered(tmp_path)) as engine:
        await _rounds(engine, prompts, rounds=1)
        await asyncio.gather(*(engine.complete(random_prompt(40, 256, seed=900 + i), GREEDY) for i in range(6)))
        await _check_clean(engine)  # closes the tiers: index written, directory released
    spill = tmp_path / "spill"
    assert stat.S_IMODE(spill.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in spill.iterdir())
    async with Engine(tiny_dir["llama"], _tiered(tmp_path)) as engine:
        again = await asyncio.gather(*(engine.complete(p, GREEDY) for p in prompts))
        m = engine.kv_metrics()
        await _check_clean(engine)
    assert [r.token_ids for r in again] == reference[0]
    assert m.hit_blocks["disk"] > 0 and sum(r.metrics.num_cached_tokens for r in again) > 0


async def test_prefetch_reads_ahead_for_waiting_requests(tiny_dir, tmp_path):
    prompts = [random_prompt(33, 256, seed=300 + i) for i in range(6)]
    cfg = EngineConfig.from_dict({
        "kv": {"block_size": BS, "num_blocks": DEVICE_BLOCKS, "host_num_blocks": 24, "disk_path": str(tmp_path / "s"),
               "disk_num_blocks": 200, "prefetch_depth": 3},
        "scheduler": {"max_num_batched_tokens": 64, "max_num_seqs": 1},
    })
    async with Engine(tiny_dir["llama"], cfg) as engine:
        first = [(await engine.complete(p, GREEDY)).token_ids for p in prompts]
        await asyncio.gather(*(engine.complete(random_prompt(40, 256, seed=900 + i), GREEDY) for i in range(4)))
        second = [r.token_ids for r in await asyncio.gather(*(engine.complete(p, GREEDY) for p in prompts))]
        m = engine.kv_metrics()
        await _check_clean(engine)
    assert second == first
    assert m.counters["prefetches"] > 0 and m.hit_blocks["host"] + m.hit_blocks["disk"] > 0


async def test_start_up_errors_name_the_problem(tiny_dir, tmp_path):
    afile = tmp_path / "not-a-dir"
    afile.write_text("x")
    with pytest.raises(TierError, match="cannot be used"):
        async with Engine(tiny_dir["llama"], _cfg(host_num_blocks=4, disk_path=str(afile / "s"), disk_num_blocks=4)):
            pass
    with pytest.raises(TierError, match=r"kv\.disk_capacity_mib"):
        async with Engine(tiny_dir["llama"], _cfg(host_num_blocks=4, disk_path=str(tmp_path / "s"),
                                                  disk_capacity_mib=2**40)):
            pass
    async with Engine(tiny_dir["llama"], _tiered(tmp_path)) as first:
        with pytest.raises(TierError, match="in use"):
            async with Engine(tiny_dir["llama"], _tiered(tmp_path)):
                pass
        await first.kv_manager.aclose()
    toml = tmp_path / "kv.toml"
    toml.write_text("[kv]\nblock_size = 4096\nnum_blocks = 2\nhost_memory_mib = 1\n")
    with pytest.raises(ConfigError, match=r"kv\.host_memory_mib") as e:
        async with Engine(tiny_dir["llama"], toml):
            pass
    assert str(toml) in str(e.value) and "smaller than one block" in str(e.value)


@pytest.mark.parametrize("kv, key", [
    ({"host_memory_mib": -1}, "kv.host_memory_mib"),
    ({"host_num_blocks": -2}, "kv.host_num_blocks"),
    ({"disk_capacity_mib": -5, "disk_path": "/x"}, "kv.disk_capacity_mib"),
    ({"disk_num_blocks": -1}, "kv.disk_num_blocks"),
    ({"prefetch_depth": -1}, "kv.prefetch_depth"),
    ({"io_threads": 0}, "kv.io_threads"),
    ({"spill_format": "fp4"}, "kv.spill_format"),
    ({"eviction": "random"}, "kv.eviction"),
    ({"spill_format": "int8", "spill_group_size": 16}, "kv.spill_group_size"),  # no such key any more
    ({"disk_capacity_mib": 64, "disk_path": "/x"}, "kv.host_memory_mib"),  # disk without host
    ({"host_memory_mib": 64, "disk_capacity_mib": 64}, "kv.disk_path"),
    ({"host_memory_mib": 64, "disk_path": "/x"}, "kv.disk_capacity_mib"),
    ({"host_memory_mib": "lots"}, "kv.host_memory_mib"),
])
def test_kv_config_rejects_impossible_values(tmp_path, kv, key):
    f = tmp_path / "c.toml"
    f.write_text("[kv]\n" + "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in kv.items()))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        EngineConfig.from_toml(f)
    assert str(f) in str(e.value)


@pytest.mark.parametrize("name", ["long-context.toml", "kv-host-only.toml", "kv-int8-spill.toml"])
def test_kv_presets_load(name):
    from afkv.kv.layout import KVLayout

    cfg = EngineConfig.from_toml(Path(__file__).resolve().parents[2] / "configs" / name)
    tiers = cfg.kv.tier_config(KVLayout(30, 3, 64, cfg.kv.block_size, torch.bfloat16))  # SmolLM2's geometry
    assert tiers.host_num_blocks > 0
    if tiers.disk_path is not None:
        assert "~" not in str(tiers.disk_path) and tiers.disk_num_blocks > tiers.host_num_blocks
