"""The async API on tiny random checkpoints (token-id prompts)."""

import asyncio
import os

import pytest
import torch

from afkv import Engine, EngineConfig, SamplingParams
from afkv.config import default_cpu_threads
from afkv.errors import (
    ConfigError,
    EmptyPromptError,
    EngineClosedError,
    InvalidSamplingParamsError,
    PromptTooLongError,
    RequestError,
    RequestFailedError,
)
from tests.helpers import hf_model, random_prompt


def _cfg(num_blocks=128, block_size=4, batched=32, max_seqs=64, max_len=0):
    return EngineConfig.from_dict({
        "kv": {"block_size": block_size, "num_blocks": num_blocks},
        "scheduler": {"max_num_batched_tokens": batched, "max_num_seqs": max_seqs, "max_model_len": max_len},
    })


def _assert_all_blocks_free(engine: Engine) -> None:
    kv = engine.kv_manager
    kv.pool.check_invariants()
    assert kv.num_sequences == 0
    assert kv.pool.num_free_blocks == kv.pool.num_blocks


async def _wait_idle(engine: Engine) -> None:
    async with asyncio.timeout(10):
        while engine.stats().num_running or engine.stats().num_waiting or engine.kv_manager.num_sequences:
            await asyncio.sleep(0.01)


GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


@pytest.fixture
async def engine(tiny_dir):
    async with Engine(tiny_dir["mixtral"], _cfg()) as e:
        yield e


async def test_16_concurrent_streams_equal_one_at_a_time(engine):
    prompts = [random_prompt(3 + 5 * i, 256, seed=i) for i in range(16)]
    params = [GREEDY if i % 2 else SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=i, ignore_eos=True)
              for i in range(16)]
    sequential = [(await engine.complete(p, sp)).token_ids for p, sp in zip(prompts, params)]

    async def stream(p, sp):
        ids = []
        async for chunk in engine.generate(p, sp):
            ids.extend(chunk.token_ids)
        return ids

    concurrent = await asyncio.gather(*(stream(p, sp) for p, sp in zip(prompts, params)))
    assert concurrent == sequential
    assert all(len(c) == 24 for c in concurrent)
    _assert_all_blocks_free(engine)


async def test_cancelling_consumers_frees_every_block(engine):
    started = asyncio.Event()

    async def consume(p):
        async for _ in engine.generate(p, SamplingParams(max_tokens=200, ignore_eos=True)):
            started.set()

    tasks = [asyncio.create_task(consume(random_prompt(20, 256, seed=i))) for i in range(6)]
    await started.wait()
    await asyncio.sleep(0.05)
    assert engine.kv_manager.num_sequences > 0
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await _wait_idle(engine)
    _assert_all_blocks_free(engine)
    # breaking out of the iterator and closing it aborts too
    gen = engine.generate(random_prompt(9, 256, seed=99), SamplingParams(max_tokens=200, ignore_eos=True))
    async for _ in gen:
        break
    await gen.aclose()
    await _wait_idle(engine)
    _assert_all_blocks_free(engine)
    assert (await engine.complete(random_prompt(5, 256, 1), GREEDY)).finish_reason == "length"


async def test_prefix_reuse_gives_the_same_tokens(engine):
    prompt = random_prompt(41, 256, seed=5)
    cold = await engine.complete(prompt, GREEDY)
    assert cold.metrics.num_cached_tokens == 0
    warm = await engine.complete(prompt, GREEDY)
    assert warm.metrics.num_cached_tokens == 40  # 10 full blocks of 4; the last token is recomputed
    assert warm.token_ids == cold.token_ids
    # a prompt that shares only a prefix reuses that prefix
    other = prompt[:22] + random_prompt(10, 256, seed=6)
    ref = None
    async with Engine(engine.model_dir, _cfg()) as fresh:
        ref = await fresh.complete(other, GREEDY)
    shared = await engine.complete(other, GREEDY)
    assert shared.metrics.num_cached_tokens == 20
    assert shared.token_ids == ref.token_ids
    # generated tokens are cached too: continuing a conversation hits prompt + output
    follow = await engine.complete(prompt + cold.token_ids + [7, 8], GREEDY)
    assert follow.metrics.num_cached_tokens >= 60
    _assert_all_blocks_free(engine)


async def test_preemption_under_tiny_kv_keeps_tokens(tiny_dir):
    prompts = [random_prompt(10 + i, 256, seed=i) for i in range(8)]
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    async with Engine(tiny_dir["qwen3_moe"], _cfg(num_blocks=256)) as roomy:
        ref = [r.token_ids for r in await asyncio.gather(*(roomy.complete(p, params) for p in prompts))]
    async with Engine(tiny_dir["qwen3_moe"], _cfg(num_blocks=24)) as tight:
        got = [r.token_ids for r in await asyncio.gather(*(tight.complete(p, params) for p in prompts))]
        assert tight.stats().num_preemptions > 0
        _assert_all_blocks_free(tight)
    assert got == ref


async def test_logprobs_match_transformers(engine, tiny_dir):
    prompt = random_prompt(12, 256, seed=3)
    r = await engine.complete(prompt, SamplingParams(max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=2))
    ref = hf_model(tiny_dir["mixtral"])
    with torch.no_grad():
        logits = ref(torch.tensor([prompt + r.token_ids])).logits[0]
    lp = torch.log_softmax(logits, -1)  # [T, V]
    n = len(prompt)
    for i, tok in enumerate(r.token_ids):
        assert r.logprobs[i] == pytest.approx(float(lp[n - 1 + i, tok]), abs=1e-4)
        top = torch.topk(lp[n - 1 + i], 3)
        assert list(r.top_logprobs[i]) == top.indices.tolist()
    assert r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == n
    for pos in range(1, n):
        entry = r.prompt_logprobs[pos]
        assert entry[prompt[pos]] == pytest.approx(float(lp[pos - 1, prompt[pos]]), abs=1e-4)
        assert set(torch.topk(lp[pos - 1], 2).indices.tolist()) <= set(entry)


async def test_seeded_sampling_is_reproducible(engine):
    p = random_prompt(8, 256, seed=1)
    a = await engine.complete(p, SamplingParams(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True))
    b = await engine.complete(p, SamplingParams(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True))
    c = await engine.complete(p, SamplingParams(max_tokens=16, temperature=1.0, seed=8, ignore_eos=True))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    greedy = await engine.complete(p, SamplingParams(max_tokens=16, ignore_eos=True))
    top1 = await engine.complete(p, SamplingParams(max_tokens=16, temperature=1.5, top_k=1, seed=3, ignore_eos=True))
    assert top1.token_ids == greedy.token_ids


async def test_stop_token_ids_and_eos(engine):
    p = random_prompt(8, 256, seed=2)
    free = await engine.complete(p, SamplingParams(max_tokens=20, ignore_eos=True))
    stop_tok = free.token_ids[5]
    first = free.token_ids.index(stop_tok)
    r = await engine.complete(p, SamplingParams(max_tokens=20, ignore_eos=True, stop_token_ids=[stop_tok]))
    assert r.token_ids == free.token_ids[: first + 1] and r.finish_reason == "stop"


async def test_long_prompt_is_prefilled_in_chunks(engine, tiny_dir):
    prompt = random_prompt(150, 256, seed=11)  # budget is 32 tokens per step
    steps_before = engine.stats().num_steps
    r = await engine.complete(prompt, SamplingParams(max_tokens=3, ignore_eos=True))
    assert engine.stats().num_steps - steps_before >= 150 // 32 + 2
    async with Engine(tiny_dir["mixtral"], _cfg(batched=512)) as one_shot:
        assert (await one_shot.complete(prompt, SamplingParams(max_tokens=3, ignore_eos=True))).token_ids == r.token_ids


async def test_bad_requests_are_typed_and_engine_keeps_serving(engine):
    good = random_prompt(6, 256, seed=4)
    expected = (await engine.complete(good, GREEDY)).token_ids
    cases = [
        ([], EmptyPromptError),
        ("", EmptyPromptError),
        ("text needs a tokenizer", RequestError),
        ([1, 2, 99999], RequestError),
        (random_prompt(600, 256, seed=0), PromptTooLongError),  # context 512 tokens
        (object(), RequestError),
    ]
    for prompt, exc in cases:
        with pytest.raises(exc):
            await engine.complete(prompt, GREEDY)
        assert (await engine.complete(good, GREEDY)).token_ids == expected
    for bad in ({"max_tokens": 0}, {"max_tokens": -3}, {"temperature": -1}, {"top_p": 0}, {"logprobs": 100}, {"stop": [""]}):
        with pytest.raises(InvalidSamplingParamsError):
            SamplingParams(**bad)
    _assert_all_blocks_free(engine)


async def test_step_failure_fails_its_requests_only(engine, monkeypatch):
    runner = engine._runner
    orig = runner.execute
    calls = {"n": 0}

    def flaky(plan):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        return orig(plan)

    monkeypatch.setattr(runner, "execute", flaky)
    with pytest.raises(RequestFailedError, match="injected fault"):
        await engine.complete(random_prompt(5, 256, 0), GREEDY)
    assert len((await engine.complete(random_prompt(5, 256, 0), GREEDY)).token_ids) == 24
    _assert_all_blocks_free(engine)


async def test_event_loop_stays_responsive(engine):
    ticks = 0
    done = asyncio.Event()

    async def ticker():
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    t = asyncio.create_task(ticker())
    await asyncio.gather(*(engine.complete(random_prompt(30, 256, i), SamplingParams(max_tokens=40, ignore_eos=True))
                           for i in range(8)))
    done.set()
    await t
    assert ticks > 40  # the loop ran the ticker between (and during) the model's steps


async def test_close_fails_pending_and_refuses_new(tiny_dir):
    engine = Engine(tiny_dir["llama"], _cfg())
    await engine.start()
    task = asyncio.create_task(engine.complete(random_prompt(5, 256, 0), SamplingParams(max_tokens=400, ignore_eos=True)))
    await asyncio.sleep(0.05)
    await engine.aclose()
    with pytest.raises(EngineClosedError):
        await task
    with pytest.raises(EngineClosedError):
        await engine.complete([1, 2, 3], GREEDY)
    with pytest.raises(EngineClosedError):
        await engine.start()


def test_unknown_config_key_and_bad_values(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[kv]\nblock_size = 16\nblok_count = 3\n")
    with pytest.raises(ConfigError, match=r"kv\.blok_count") as e:
        EngineConfig.from_toml(f)
    assert str(f) in str(e.value)
    f.write_text("[kv]\nblock_size = -4\n")
    with pytest.raises(ConfigError, match=r"kv\.block_size"):
        EngineConfig.from_toml(f)
    f.write_text("[kvv]\n")
    with pytest.raises(ConfigError, match="unknown section"):
        EngineConfig.from_toml(f)
    f.write_text("[scheduler]\nmax_num_seqs = 'many'\n")
    with pytest.raises(ConfigError, match=r"scheduler\.max_num_seqs"):
        EngineConfig.from_toml(f)


async def test_cpu_threads_sets_the_model_threads_intra_op_threads(tiny_dir):
    """[model] cpu_threads: on a CPU device the engine's model thread (where every step runs)
    uses that many torch intra-op threads, by default (0) all cores this process may use but
    one; a negative count is refused naming the key."""
    with pytest.raises(ConfigError, match=r"model\.cpu_threads"):
        EngineConfig.from_dict({"model": {"cpu_threads": -1}})
    loop = asyncio.get_running_loop()
    auto = max(1, len(os.sched_getaffinity(0)) - 1)
    assert default_cpu_threads() == auto
    for threads, expect in ((auto + 1, auto + 1), (0, auto)):
        cfg = EngineConfig.from_dict({"model": {"cpu_threads": threads}, "kv": {"block_size": 4, "num_blocks": 64}})
        async with Engine(tiny_dir["llama"], cfg, progress=False) as engine:
            assert (await engine.complete(random_prompt(5, 256, seed=0), GREEDY)).token_ids
            assert await loop.run_in_executor(engine._executor, torch.get_num_threads) == expect
