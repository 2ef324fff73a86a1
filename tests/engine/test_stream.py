"""Contexts larger than the device tier ([kv] stream_*, afkv.kv.stream): the middle of a long
sequence lives in the stream store (host memory) and attention streams it layer by layer.

Oracles: the all-device run of the same engine (greedy tokens equal, logprobs within float32
rounding: the streamed part is merged by log-sum-exp instead of one softmax), transformers for
the default (dense) model, and for quantized host blocks the unquantized streamed run within the
format's bounds. Bounds on the |logprob error| (tests/engine/test_device_quant.py's measure), from
these 400-token contexts on the tiny random models (p95 / max, mixtral and qwen3_moe): streamed
fp8 0.080 / 0.147, int8 0.018 / 0.136, int4 0.190 / 0.256; a quantized *device* tier on the same
prompts: fp8 0.043 / 0.149, int8 0.012 / 0.014, int4 0.213 / 0.233 (long contexts sum more
quantized keys than test_device_quant's short prompts; the maxima are router flips)."""

import asyncio
import os

import pytest
import torch

from afkv.config import EngineConfig
from afkv.engine.engine import Engine
from afkv.engine.params import SamplingParams
from afkv.errors import ConfigError, PromptTooLongError, RequestFailedError
from tests.helpers import hf_greedy, hf_model, random_prompt

BS = 4
# the device tier: sinks (1 block) + window (2 blocks + the partial one) + a chunk of 16 tokens
# (4 blocks) + a spare = 10 blocks = 40 tokens; the sequences below hold 10x that.
DEVICE_BLOCKS = 10
STREAM = {"stream_num_blocks": 256, "stream_sink_tokens": 4, "stream_window": 8}
BOUNDS = {"fp8": (0.2, 0.3), "int8": (0.04, 0.25), "int4": (0.3, 0.6)}  # (95th percentile, max) |logprob error|


def _config(**kv) -> EngineConfig:
    return EngineConfig.from_dict({"kv": {"block_size": BS, **kv},
                                   "scheduler": {"max_num_seqs": 2, "max_num_batched_tokens": 16}})


async def _generate(model_dir, cfg: EngineConfig, prompts, max_tokens=8, check=None):
    async with Engine(model_dir, cfg, progress=False) as engine:
        params = SamplingParams(max_tokens=max_tokens, logprobs=5, ignore_eos=True)
        out = await asyncio.gather(*(engine.complete(p, params) for p in prompts))
        kv = engine.kv_manager
        kv.check_invariants()
        assert kv.pool.num_free_blocks == kv.pool.num_blocks  # everything released
        assert kv.stream.num_free_blocks == (kv.stream.config.total_blocks if kv.stream.config else 0)
        if check is not None:
            check(engine)
        return out


def _streamed(engine) -> None:
    c = engine.kv_manager.metrics.counters
    assert c["stream_spills"] > 0 and c["streamed_steps"] > 0 and c["bytes_streamed"] > 0


def _logprob_errors(ref, got) -> list[float]:
    errors = []
    for r, g in zip(ref, got):
        for i, (rt, gt) in enumerate(zip(r.top_logprobs, g.top_logprobs)):
            if r.token_ids[:i] != g.token_ids[:i]:
                break
            errors.append(max(abs(rt[tok] - gt[tok]) for tok in rt.keys() & gt.keys()))
    return errors


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_streamed_sequences_equal_the_all_device_run(tiny_dir, family):
    """Two sequences of 400+ tokens (10x the device tier each): every format of host blocks."""
    prompts = [random_prompt(400, 200, 1), random_prompt(420, 200, 2)]
    ref = asyncio.run(_generate(tiny_dir[family], _config(num_blocks=512), prompts))
    got = asyncio.run(_generate(tiny_dir[family], _config(num_blocks=2 * DEVICE_BLOCKS, **STREAM),
                                prompts, check=_streamed))
    assert [r.token_ids for r in got] == [r.token_ids for r in ref]
    assert max(_logprob_errors(ref, got)) < 1e-4
    for fmt in ("fp8", "int8", "int4"):
        quant = asyncio.run(_generate(tiny_dir[family], _config(num_blocks=2 * DEVICE_BLOCKS, **STREAM, spill_format=fmt),
                                      prompts, check=_streamed))
        errors = _logprob_errors(got, quant)
        p95 = sorted(errors)[int(0.95 * (len(errors) - 1))]
        print(f"{family} {fmt}: |logprob error| p95 {p95:.4f} max {max(errors):.4f} over {len(errors)} steps")
        assert len(errors) >= 8 and max(errors) > 0  # the quantized middle was read
        assert p95 <= BOUNDS[fmt][0] and max(errors) <= BOUNDS[fmt][1]


def _on_disk(engine) -> None:
    _streamed(engine)
    assert engine.kv_manager.metrics.counters["stream_disk_spills"] > 0


def _disk(path, store_blocks: int = 16) -> dict:
    """A store of store_blocks over a disk of 256 blocks under `path`."""
    return STREAM | {"stream_num_blocks": store_blocks, "stream_disk_num_blocks": 256, "stream_disk_path": str(path)}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_sequences_past_device_and_store_stream_from_disk_like_the_all_device_run(tiny_dir, tmp_path, family):
    """Two sequences of 400+ tokens on a 40-token device tier and a 16-block store: most of
    their middles are block files, read back layer by layer every step."""
    prompts = [random_prompt(400, 200, 1), random_prompt(420, 200, 2)]
    ref = asyncio.run(_generate(tiny_dir[family], _config(num_blocks=512), prompts))
    got = asyncio.run(_generate(tiny_dir[family], _config(num_blocks=2 * DEVICE_BLOCKS, **_disk(tmp_path)), prompts,
                                check=_on_disk))
    assert [r.token_ids for r in got] == [r.token_ids for r in ref]
    assert max(_logprob_errors(ref, got)) < 1e-4
    assert list(tmp_path.iterdir()) == []  # the engine's disk directory went with it


async def _all_freed_and_serving(engine) -> None:
    """No sequence left, every device and store block free, and the engine still answers."""
    kv = engine.kv_manager
    kv.check_invariants()
    assert kv.num_sequences == 0
    assert kv.pool.num_free_blocks == kv.pool.num_blocks
    assert kv.stream.num_free_blocks == kv.stream.config.total_blocks
    out = await engine.complete([5, 6, 7], SamplingParams(max_tokens=2))  # still serving
    assert len(out.token_ids) == 2


async def _flip_a_disk_block(kv) -> str | None:
    """Flip a byte of the file of a streamed disk block (once its write landed) -> its name, or
    None while no streamed block is on disk."""
    disk = [i for ids in kv.stream._ids.values() for i in ids if i >= kv.stream.config.num_blocks]
    if not disk:
        return None
    await asyncio.wrap_future(kv.stream.disk.io.submit(lambda: None))  # its file is written
    name = kv.stream.disk.file(disk[0])
    fd = os.open(name, os.O_RDWR)
    os.pwrite(fd, bytes([os.pread(fd, 1, 100)[0] ^ 0xFF]), 100)
    os.close(fd)
    return str(name)


def test_a_corrupt_disk_block_is_recomputed_and_gives_the_same_tokens(tiny_dir, tmp_path):
    """A byte of a streamed block file flipped between decode steps: the next step finds it,
    the sequence computes its KV again from its tokens (its blocks freed, then spilled anew) and
    its greedy tokens equal the uncorrupted run's; a short request beside it goes on; afterwards
    every device, store and disk block is free and the engine serves on."""
    prompt, params = random_prompt(200, 200, 10), SamplingParams(max_tokens=12, ignore_eos=True)
    cfg = _config(num_blocks=2 * DEVICE_BLOCKS, **_disk(tmp_path))

    async def main(corrupt: bool):
        async with Engine(tiny_dir["qwen3_moe"], cfg, progress=False) as engine:
            kv = engine.kv_manager
            other = asyncio.create_task(engine.complete(random_prompt(10, 200, 11), SamplingParams(max_tokens=4)))
            tokens, flipped = [], []
            async for chunk in engine.generate(prompt, params):
                tokens += chunk.token_ids
                if corrupt and not flipped and kv.metrics.counters["streamed_steps"] >= 2:
                    flipped += filter(None, [await _flip_a_disk_block(kv)])
            assert len((await other).token_ids) == 4
            c = kv.metrics.counters
            assert c["stream_disk_spills"] > 0
            assert c["corrupt_blocks"] == (1 if corrupt else 0) and bool(flipped) == corrupt
            assert engine.stats().num_preemptions == 0  # a recompute is not a preemption
            await _all_freed_and_serving(engine)
            return tokens

    ref = asyncio.run(main(corrupt=False))
    assert asyncio.run(main(corrupt=True)) == ref and len(ref) == 12


def test_a_disk_that_keeps_corrupting_fails_the_request_after_its_recomputes(tiny_dir, tmp_path):
    """A block file flipped after every token: the sequence is computed again
    MAX_STREAM_RECOMPUTES times, then its request ends with an error naming the block file;
    every device, store and disk block is free; the engine serves on."""
    from afkv.engine.scheduler import MAX_STREAM_RECOMPUTES

    async def main():
        async with Engine(tiny_dir["qwen3_moe"], _config(num_blocks=2 * DEVICE_BLOCKS, **_disk(tmp_path)),
                          progress=False) as engine:
            kv = engine.kv_manager
            gen = engine.generate(random_prompt(200, 200, 10), SamplingParams(max_tokens=100, ignore_eos=True))
            flipped = []
            with pytest.raises(RequestFailedError, match="streamed KV block .* corrupt on disk") as e:
                async for _ in gen:
                    flipped += filter(None, [await _flip_a_disk_block(kv)])
            assert flipped[-1] in str(e.value) and f"computed again {MAX_STREAM_RECOMPUTES} times" in str(e.value)
            assert kv.metrics.counters["corrupt_blocks"] == MAX_STREAM_RECOMPUTES + 1
            await _all_freed_and_serving(engine)

    asyncio.run(main())


def test_default_model_streamed_equals_transformers(default_model_dir):
    """The dense default model (SmolLM2): a 300-token prompt on a 40-token device tier gives
    transformers' greedy tokens."""
    prompt = random_prompt(300, 49152, 3)
    want = hf_greedy(hf_model(default_model_dir), prompt, 6)
    [got] = asyncio.run(_generate(default_model_dir, _config(num_blocks=DEVICE_BLOCKS, **STREAM), [prompt], 6,
                                  check=_streamed))
    assert got.token_ids == want


def test_a_prompt_longer_than_the_device_tier_needs_streaming(tiny_dir):
    """Without a stream store the engine refuses it, naming the settings; with one it runs."""
    prompt = random_prompt(100, 200, 4)

    async def refused():
        async with Engine(tiny_dir["llama"], _config(num_blocks=DEVICE_BLOCKS), progress=False) as engine:
            with pytest.raises(PromptTooLongError, match="stream_memory_mib"):
                await engine.complete(prompt, SamplingParams(max_tokens=2))

    asyncio.run(refused())
    [out] = asyncio.run(_generate(tiny_dir["llama"], _config(num_blocks=DEVICE_BLOCKS, **STREAM), [prompt], 4,
                                  check=_streamed))
    assert len(out.token_ids) == 4


def test_a_request_larger_than_device_plus_store_is_refused(tiny_dir):
    async def main():
        async with Engine(tiny_dir["llama"], _config(num_blocks=DEVICE_BLOCKS, **(STREAM | {"stream_num_blocks": 20})),
                          progress=False) as engine:
            assert engine.max_model_len == (DEVICE_BLOCKS + 20) * BS
            with pytest.raises(PromptTooLongError, match="stream store"):
                await engine.complete(random_prompt(engine.max_model_len, 200, 5), SamplingParams(max_tokens=1))

    asyncio.run(main())


@pytest.mark.parametrize("disk", [False, True])
def test_cancellation_mid_stream_frees_every_block(tiny_dir, tmp_path, disk):
    """A streaming request cancelled between steps: device, store and disk blocks all free."""
    stream = _disk(tmp_path) if disk else STREAM

    async def main():
        async with Engine(tiny_dir["qwen3_moe"], _config(num_blocks=DEVICE_BLOCKS, **stream), progress=False) as engine:
            kv = engine.kv_manager
            gen = engine.generate(random_prompt(200, 200, 6), SamplingParams(max_tokens=100, ignore_eos=True))
            async for _ in gen:
                if kv.metrics.counters["streamed_steps"] >= 2 and (not disk or kv.metrics.counters["stream_disk_spills"]):
                    break
            assert kv.stream.num_free_blocks < kv.stream.config.total_blocks  # it was streaming
            if disk:
                assert any(i >= kv.stream.config.num_blocks for ids in kv.stream._ids.values() for i in ids)
            await gen.aclose()
            for _ in range(100):  # the step loop frees the aborted request's blocks (bounded wait)
                if kv.num_sequences == 0:
                    break
                await asyncio.sleep(0.05)
            await _all_freed_and_serving(engine)

    asyncio.run(main())


@pytest.mark.parametrize("kv, key", [
    ({"stream_num_blocks": 8, "device_format": "int8"}, "kv.device_format"),
    ({"stream_num_blocks": 8, "pruning": {"policy": "streaming"}}, "kv.pruning.policy"),
    ({"stream_window": 0}, "kv.stream_window"),
    ({"stream_ahead": 0}, "kv.stream_ahead"),
    ({"stream_disk_num_blocks": 8, "stream_disk_path": "/tmp/x"}, "kv.stream_memory_mib"),
    ({"stream_num_blocks": 8, "stream_disk_num_blocks": 8}, "kv.stream_disk_path"),
    ({"stream_num_blocks": 8, "stream_disk_path": "/tmp/x"}, "kv.stream_disk_mib"),
    ({"stream_num_blocks": 8, "stream_disk_mib": -1, "stream_disk_path": "/tmp/x"}, "kv.stream_disk_mib"),
    ({"stream_num_blocks": 8, "spill_format": "int4", "block_size": 12}, "kv.block_size"),
])
def test_config_errors_name_the_key(kv, key):
    with pytest.raises(ConfigError) as e:
        EngineConfig.from_dict({"kv": kv})
    assert e.value.key == key


def test_metrics_show_the_bytes_streamed(tiny_dir):
    """/metrics (and `afkv run --stats`): bytes streamed and steps that streamed, the stream tier."""
    from afkv.serve.metrics import engine_samples

    async def main():
        async with Engine(tiny_dir["llama"], _config(num_blocks=DEVICE_BLOCKS, **STREAM), progress=False) as engine:
            await engine.complete(random_prompt(100, 200, 7), SamplingParams(max_tokens=3, ignore_eos=True))
            samples = {(s.name, s.labels): s.value for s in await engine_samples(engine)}
            node = (("node", "0"),)
            c = engine.kv_manager.metrics.counters
            assert samples[("kv_streamed_bytes", node)] == c["bytes_streamed"] > 0
            assert samples[("kv_streamed_steps", node)] == c["streamed_steps"] > 0
            assert samples[("kv_streamed_bytes_per_step", node)] == c["bytes_streamed"] / c["streamed_steps"]
            assert samples[("kv_spilled_bytes", node + (("to", "stream"),))] == c["bytes_device_to_stream"] > 0
            assert samples[("kv_tier_capacity_blocks", node + (("tier", "stream"),))] == 256

    asyncio.run(main())


def test_the_stream_preset_loads():
    from pathlib import Path

    from afkv.kv.layout import KVLayout

    cfg = EngineConfig.from_toml(Path(__file__).resolve().parents[2] / "configs" / "long-context-stream.toml")
    stream = cfg.kv.stream_config(KVLayout(48, 4, 128, cfg.kv.block_size, torch.bfloat16))  # Qwen3-30B-A3B's geometry
    assert stream.format.name == "int4" and stream.num_blocks * cfg.kv.block_size > 2_000_000  # tokens in 64 GiB


def test_preempted_streaming_sequences_recompute_the_same_tokens(tiny_dir):
    """Two sequences admitted together whose generations outgrow a device tier too small for both
    streaming at once (each keeps a sink block, its window and its partial block): one is
    preempted (its device and store blocks freed), recomputes, and both give the all-device run's
    tokens."""
    prompts = [random_prompt(6, 200, 8), random_prompt(7, 200, 9)]
    ref = asyncio.run(_generate(tiny_dir["qwen3_moe"], _config(num_blocks=512), prompts, 60))

    def preempted(engine):
        _streamed(engine)
        assert engine.stats().num_preemptions > 0

    got = asyncio.run(_generate(tiny_dir["qwen3_moe"], _config(num_blocks=6, **STREAM), prompts, 60, check=preempted))
    assert [r.token_ids for r in got] == [r.token_ids for r in ref]
    assert max(_logprob_errors(ref, got)) < 1e-4


def test_a_sliding_window_model_refuses_streaming(tmp_path):
    """Streaming attends every token: a model with a sliding window is refused, naming the key."""
    from afkv.model.tiny import write_tiny_checkpoint

    model_dir = write_tiny_checkpoint("mixtral", tmp_path / "swa", sliding_window=16)

    async def main():
        with pytest.raises(ConfigError) as e:
            async with Engine(model_dir, _config(num_blocks=DEVICE_BLOCKS, **STREAM), progress=False):
                pass
        assert e.value.key == "kv.stream_memory_mib" and "sliding window" in str(e.value)

    asyncio.run(main())
