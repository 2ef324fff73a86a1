"""KV pruning in the engine: StreamingLLM and H2O per request and per config (tiny random
checkpoints), and the quality cost on the default model's perplexity."""

import asyncio
import math

import pytest

from afkv import Engine, EngineConfig, SamplingParams
from afkv.engine.params import KVPruning
from afkv.errors import InvalidSamplingParamsError
from tests.helpers import PPL_REL_TOL_FLOAT32, hf_perplexity, random_prompt
from tests.kv.test_kv_quant_perplexity import TEXT

BS = 4
BUDGET = 64
STREAMING = KVPruning("streaming", num_sink_tokens=4, window=BUDGET - 4)
H2O = KVPruning("h2o", num_sink_tokens=4, window=16, budget=BUDGET)
WIDE_STREAMING = KVPruning("streaming", num_sink_tokens=4, window=1000)
WIDE_H2O = KVPruning("h2o", num_sink_tokens=4, window=16, budget=1000)


def _cfg(num_blocks=256, pruning=None, max_num_batched_tokens=32, max_num_seqs=8) -> EngineConfig:
    kv = {"block_size": BS, "num_blocks": num_blocks}
    if pruning is not None:
        kv["pruning"] = pruning
    return EngineConfig.from_dict({"kv": kv, "scheduler": {"max_num_batched_tokens": max_num_batched_tokens,
                                                           "max_num_seqs": max_num_seqs}})


def _greedy(n: int, pruning: KVPruning | None = None) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True, pruning=pruning)


async def _check_clean(engine: Engine) -> None:
    async with asyncio.timeout(10):
        while engine.stats().num_running or engine.stats().num_waiting or engine.kv_manager.num_sequences:
            await asyncio.sleep(0.01)
    kv = engine.kv_manager
    await kv.aclose()  # waits for pruning copies in flight
    kv.check_invariants()
    assert kv.pool.num_free_blocks == kv.pool.num_blocks  # every block back, none leaked
    assert all(kv.pool.ref_count(b) == 0 for b in range(kv.pool.num_blocks))


PROMPTS = [random_prompt(n, 256, seed=n) for n in (9, 23, 40)]


async def test_pruning_with_room_for_every_token_gives_the_unpruned_tokens(tiny_dir):
    async with Engine(tiny_dir["llama"], _cfg()) as engine:
        ref = [(await engine.complete(p, _greedy(30))).token_ids for p in PROMPTS]
        for spec in (WIDE_STREAMING, WIDE_H2O):
            got = await asyncio.gather(*(engine.complete(p, _greedy(30, spec)) for p in PROMPTS))
            assert [c.token_ids for c in got] == ref, spec.policy
        assert engine.kv_metrics().counters.get("pruned_tokens", 0) == 0
        await _check_clean(engine)
    pruning = {"policy": "streaming", "num_sink_tokens": 4, "window": 1000}
    async with Engine(tiny_dir["llama"], _cfg(pruning=pruning)) as engine:  # the config's default
        got = await asyncio.gather(*(engine.complete(p, _greedy(30)) for p in PROMPTS))
        assert [c.token_ids for c in got] == ref


@pytest.mark.parametrize("spec", [STREAMING, H2O], ids=["streaming", "h2o"])
async def test_a_long_generation_stays_within_its_budget_and_frees_every_block(tiny_dir, spec):
    """300 new tokens with a 64-token budget: the table stays near 64 / 4 blocks (unpruned it
    would reach 80), and every block is back in the pool afterwards."""
    async with Engine(tiny_dir["llama"], _cfg()) as engine:
        kv = engine.kv_manager
        most = 0
        tokens = []
        async for chunk in engine.generate(random_prompt(20, 256, seed=1), _greedy(300, spec)):
            tokens += chunk.token_ids
            if kv.has(chunk.request_id):
                most = max(most, len(kv.block_table(chunk.request_id)))
        assert len(tokens) == 300
        # streaming: 1 sink block + 15 window blocks + 1 partial + 1 new; h2o: (64 + 4 - 1) slots + 1 new
        print(f"{spec.policy}: at most {most} blocks")
        assert most <= BUDGET // BS + 2, most
        pruned = engine.kv_metrics().counters["pruned_tokens"]
        assert 320 - pruned <= BUDGET + 2 * BS
        await _check_clean(engine)


async def test_pruned_requests_do_not_disturb_others_or_the_prefix_cache(tiny_dir):
    base = random_prompt(40, 256, seed=7)
    others = [base + random_prompt(5, 256, seed=8 + i) for i in range(2)]
    async with Engine(tiny_dir["llama"], _cfg()) as engine:
        ref = [(await engine.complete(p, _greedy(40))).token_ids for p in others]
    async with Engine(tiny_dir["llama"], _cfg()) as engine:
        # the streaming request shares base's blocks and drops some; the H2O one writes in place
        mixed = await asyncio.gather(
            engine.complete(base + [1, 2, 3], _greedy(120, KVPruning("streaming", 4, 12))),
            engine.complete(base + [4, 5, 6], _greedy(120, KVPruning("h2o", 4, 8, 24))),
            engine.complete(others[0], _greedy(40)),
        )
        assert mixed[2].token_ids == ref[0]
        after = await engine.complete(others[1], _greedy(40))  # reuses base's cached blocks
        assert after.metrics.num_cached_tokens >= 40 - BS
        assert after.token_ids == ref[1]
        await _check_clean(engine)


async def test_preemption_and_cancellation_with_pruning(tiny_dir):
    """A pool too small for the batch: pruned sequences are preempted and recomputed; a
    cancelled pruned request frees its blocks."""
    async with Engine(tiny_dir["llama"], _cfg(num_blocks=48, max_num_seqs=6)) as engine:
        specs = [STREAMING, H2O, KVPruning("streaming", 2, 20), KVPruning("h2o", 2, 8, 32), None, None]
        prompts = [random_prompt(12 + i, 256, seed=30 + i) for i in range(6)]
        lengths = [150, 150, 150, 150, 60, 60]
        done = await asyncio.gather(*(engine.complete(p, _greedy(n, s)) for p, n, s in zip(prompts, lengths, specs)))
        assert [len(c.token_ids) for c in done] == lengths
        assert engine.stats().num_preemptions > 0
        await _check_clean(engine)

        async def consume():
            async for _ in engine.generate(prompts[0], _greedy(150, H2O)):
                pass

        pruned = engine.kv_metrics().counters["pruned_tokens"]
        task = asyncio.create_task(consume())
        async with asyncio.timeout(20):
            while engine.kv_metrics().counters["pruned_tokens"] == pruned:  # cancel once it has pruned
                await asyncio.sleep(0.005)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _check_clean(engine)


async def test_bad_pruning_params_fail_alone(tiny_dir):
    async with Engine(tiny_dir["llama"], _cfg()) as engine:
        with pytest.raises(InvalidSamplingParamsError, match="pruning.budget"):
            await engine.complete([1, 2, 3], SamplingParams(max_tokens=4, pruning=KVPruning("h2o", 4, 60, 32)))
        with pytest.raises(InvalidSamplingParamsError, match="pruning.policy"):
            SamplingParams(pruning=KVPruning("lru"))
        ok = await engine.complete([1, 2, 3], _greedy(4, STREAMING))
        assert len(ok.token_ids) == 4


# ---- quality on the default model --------------------------------------------------------------
PPL_BLOCK = 16
PPL_CHUNK = 16  # prompt tokens per step: later tokens see only what pruning kept
PPL_SPECS = {
    "none": KVPruning(),
    "streaming": KVPruning("streaming", num_sink_tokens=4, window=124),
    "h2o": KVPruning("h2o", num_sink_tokens=4, window=60, budget=128),
}
PPL_BOUND = 1.03  # pruned <= 1.03 x unpruned (128-token budget, ~300-token text; measured +0.9% streaming, +0.2% h2o)


async def test_pruned_perplexity_on_the_default_model(default_model_dir):
    """Perplexity of a fixed ~300-token text through prompt logprobs, prefilled 16 tokens per
    step, so that every token past the budget is predicted from the pruned cache."""
    cfg = EngineConfig.from_dict({"kv": {"block_size": PPL_BLOCK},
                                  "scheduler": {"max_num_batched_tokens": PPL_CHUNK, "max_num_seqs": 4}})
    async with Engine(default_model_dir, cfg) as engine:
        ids = engine.tokenize(TEXT)
        assert len(ids) > 2 * 128
        ppl = {}
        for name, spec in PPL_SPECS.items():
            c = await engine.complete(ids, SamplingParams(max_tokens=1, prompt_logprobs=0, pruning=spec))
            nll = [-entry[tok] for entry, tok in zip(c.prompt_logprobs[1:], ids[1:])]
            ppl[name] = math.exp(sum(nll) / len(nll))
        pruned = engine.kv_metrics().counters["pruned_tokens"]
        await _check_clean(engine)
    print(f"perplexity: {ppl}")
    assert ppl["none"] == pytest.approx(hf_perplexity(default_model_dir, ids), rel=PPL_REL_TOL_FLOAT32)
    assert pruned > 0
    assert ppl["streaming"] > ppl["none"] and ppl["h2o"] > ppl["none"]  # pruning did drop context
    assert ppl["streaming"] <= PPL_BOUND * ppl["none"], ppl
    assert ppl["h2o"] <= PPL_BOUND * ppl["none"], ppl
