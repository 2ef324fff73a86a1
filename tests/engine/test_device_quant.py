"""The engine with a quantized device tier ([kv] device_format int8 / int4): greedy tokens and
logprobs against the unquantized run on the tiny models, prefix reuse, preemption and
cancellation without leaks, and the default model's perplexity (issue 3's targets).

Bounds, on the logprob error: per step, the largest |logprob difference| over the tokens in both
top-5 sets, at every step whose context still equals the reference's. Measured on the tiny random
models (block 4, group 4, fp_window 0, 16 new tokens; the test prints the figures): int8 95th
percentile <= 0.004 and max 0.13, int4 95th percentile <= 0.2 and max 0.33. The maxima are single
steps where a router's top-k flips (an MoE family's discontinuity, not the KV error growing).
Asserted: int8 p95 <= 0.01, max <= 0.25, every greedy token equal; int4 p95 <= 0.3, max <= 0.6.
"""

import asyncio
import math

import pytest

from afkv.config import EngineConfig
from afkv.engine.engine import Engine
from afkv.engine.params import SamplingParams

from tests.kv.test_kv_quant_perplexity import TEXT

PROMPTS = [[1, 5, 9, 33, 17], [2, 5, 9, 33, 17, 2, 8], [7, 100, 3, 44, 12, 60, 61, 62, 63, 9, 8]]
BOUNDS = {"int8": (0.01, 0.25), "int4": (0.3, 0.6)}  # (95th percentile, max) of the logprob error


def _config(fmt: str, **kv) -> EngineConfig:
    return EngineConfig.from_dict({"kv": {"block_size": 4, "device_format": fmt, "device_group_size": 4, **kv},
                                   "scheduler": {"max_num_seqs": 4, "max_num_batched_tokens": 8}})


async def _generate(model_dir, cfg: EngineConfig, prompts, max_tokens=16):
    async with Engine(model_dir, cfg, progress=False) as engine:
        params = SamplingParams(max_tokens=max_tokens, logprobs=5, ignore_eos=True)
        out = await asyncio.gather(*(engine.complete(p, params) for p in prompts))
        kv = engine.kv_manager
        kv.check_invariants()
        assert kv.pool.num_free_blocks == kv.pool.num_blocks  # everything released (cached blocks are free)
        if kv.quant is not None:
            assert kv.num_free_staging_blocks == kv.quant.num_staging_blocks
            assert kv.metrics.counters["quantized_blocks"] > 0
        return out


def _logprob_errors(ref, got) -> list[float]:
    """Per step of every generation, while its context equals the reference's: the largest
    |logprob difference| over the tokens in both top-5 sets."""
    errors = []
    for r, g in zip(ref, got):
        for i, (rt, gt) in enumerate(zip(r.top_logprobs, g.top_logprobs)):
            if r.token_ids[:i] != g.token_ids[:i]:
                break  # different contexts from here on
            errors.append(max(abs(rt[tok] - gt[tok]) for tok in rt.keys() & gt.keys()))
    return errors


def _p95(errors: list[float]) -> float:
    return sorted(errors)[math.ceil(0.95 * len(errors)) - 1]


@pytest.mark.parametrize("family", ["llama", "mixtral", "qwen2_moe", "qwen3_moe"])
def test_quantized_device_blocks_against_the_unquantized_run(tiny_dir, family):
    ref = asyncio.run(_generate(tiny_dir[family], _config("auto"), PROMPTS))
    for fmt in ("int8", "int4"):
        got = asyncio.run(_generate(tiny_dir[family], _config(fmt), PROMPTS))
        errors = _logprob_errors(ref, got)
        same = sum(r.token_ids == g.token_ids for r, g in zip(ref, got))
        print(f"{family} {fmt}: |logprob error| p95 {_p95(errors):.4f}, max {max(errors):.4f} over {len(errors)} "
              f"steps; {same}/{len(PROMPTS)} generations identical")
        assert len(errors) >= 16 and max(errors) > 0  # compared, and the rows were read
        assert _p95(errors) <= BOUNDS[fmt][0] and max(errors) <= BOUNDS[fmt][1]
        if fmt == "int8":
            assert same == len(PROMPTS)


def test_a_full_precision_window_brings_logprobs_closer(tiny_dir):
    ref = asyncio.run(_generate(tiny_dir["llama"], _config("auto"), PROMPTS))
    none = max(_logprob_errors(ref, asyncio.run(_generate(tiny_dir["llama"], _config("int4"), PROMPTS))))
    windowed = max(_logprob_errors(ref, asyncio.run(_generate(tiny_dir["llama"], _config("int4", fp_window=64),
                                                              PROMPTS))))
    assert windowed < 1e-4 < none  # the window covers every token of these generations: nothing quantized is read


def test_prefix_reuse_reads_quantized_rows(tiny_dir):
    prompt = list(range(3, 30))

    async def run():
        async with Engine(tiny_dir["llama"], _config("int8"), progress=False) as engine:
            params = SamplingParams(max_tokens=6, logprobs=5, ignore_eos=True)
            first = await engine.complete(prompt, params)
            second = await engine.complete(prompt, params)
            engine.kv_manager.check_invariants()
            return first, second

    first, second = asyncio.run(run())
    assert first.metrics.num_cached_tokens == 0 and second.metrics.num_cached_tokens == 24
    assert max(_logprob_errors([first], [second])) <= BOUNDS["int8"][0]


def test_preemption_and_cancellation_leak_nothing(tiny_dir):
    cfg = EngineConfig.from_dict({"kv": {"block_size": 4, "num_blocks": 14, "device_format": "int4",
                                         "device_group_size": 4, "fp_window": 4},
                                  "scheduler": {"max_num_seqs": 4, "max_num_batched_tokens": 16}})

    async def run():
        async with Engine(tiny_dir["llama"], cfg, progress=False) as engine:
            params = SamplingParams(max_tokens=20, ignore_eos=True)

            async def cancelled():
                async for _ in engine.generate(list(range(40, 50)), params):
                    break  # closes the stream: the request is aborted

            done = await asyncio.gather(*(engine.complete(list(range(10 * i + 1, 10 * i + 9)), params)
                                          for i in range(3)), cancelled())
            await asyncio.sleep(0.05)  # the abort is applied at the next scheduling pass
            kv = engine.kv_manager
            kv.check_invariants()
            return done, engine.stats(), kv.num_free_staging_blocks, kv.quant.num_staging_blocks

    done, stats, free_staging, staging = asyncio.run(run())
    assert [len(c.token_ids) for c in done[:3]] == [20, 20, 20]
    assert stats.num_preemptions > 0
    assert stats.num_running == 0 and stats.num_free_blocks == stats.num_blocks
    assert free_staging == staging


def test_default_model_perplexity_with_quantized_device_blocks(default_model_dir):
    """The dense SmolLM2-135M behind the default model, prompt logprobs of a fixed text computed
    in 16-token chunks: every chunk attends to the earlier blocks as int8/int4 device rows."""

    async def perplexity(fmt: str) -> float:
        cfg = EngineConfig.from_dict({"kv": {"block_size": 16, "device_format": fmt, "device_group_size": 16},
                                      "scheduler": {"max_num_seqs": 1, "max_num_batched_tokens": 16}})
        async with Engine(default_model_dir, cfg, progress=False) as engine:  # a path: dense, no upcycling
            c = await engine.complete(TEXT, SamplingParams(max_tokens=1, prompt_logprobs=0))
            if fmt != "auto":
                assert engine.kv_manager.metrics.counters["quantized_blocks"] >= len(c.prompt_token_ids) // 16 - 1
        ids = c.prompt_token_ids
        nll = [-c.prompt_logprobs[p][ids[p]] for p in range(1, len(ids))]
        return math.exp(sum(nll) / len(nll))

    full, int8, int4 = (asyncio.run(perplexity(f)) for f in ("auto", "int8", "int4"))
    rise = {"int8": int8 / full - 1, "int4": int4 / full - 1}
    print(f"\nSmolLM2-135M device blocks, block 16, group 16, fp_window 0: perplexity full {full:.4f}, "
          f"int8 {int8:.4f} ({rise['int8']:+.3%}), int4 {int4:.4f} ({rise['int4']:+.3%})")
    assert 5 < full < 40
    assert rise["int8"] <= 0.005
    assert rise["int4"] <= 0.03
    assert int4 != full and int8 != full  # the quantized rows were read
