"""A bad request fails alone: sampling parameters are checked with exact types and ranges,
sampling cannot overflow, and a request whose sampling fails ends while the other requests
of its step finish with unchanged tokens."""

import asyncio
import math

import pytest
import torch

from afkv import Engine, EngineConfig, SamplingParams
from afkv.errors import InvalidSamplingParamsError, RequestFailedError
from afkv.ops.sampling import sample_tokens
from tests.helpers import random_prompt

GOOD = SamplingParams(max_tokens=16, ignore_eos=True)
BAD = [
    {"logprobs": True}, {"prompt_logprobs": True}, {"top_k": True}, {"max_tokens": True},
    {"temperature": 1e-40}, {"temperature": math.nan}, {"temperature": math.inf}, {"temperature": "0.5"},
    {"top_p": math.nan}, {"top_p": True}, {"seed": "x"}, {"seed": 1.5}, {"seed": True}, {"seed": 2**70},
    {"ignore_eos": "no"}, {"ignore_eos": 1}, {"stop_token_ids": [True]}, {"stop_token_ids": 5}, {"stop": 5},
    {"stop": [b"x"]},
]


def _cfg():
    return EngineConfig.from_dict({"kv": {"block_size": 4, "num_blocks": 128},
                                   "scheduler": {"max_num_batched_tokens": 64}})


@pytest.mark.parametrize("bad", BAD, ids=lambda b: f"{next(iter(b))}={next(iter(b.values()))!r}")
def test_exact_types_and_ranges(bad):
    with pytest.raises(InvalidSamplingParamsError, match=next(iter(bad))):
        SamplingParams(**bad)


async def test_a_bad_request_beside_three_good_ones(tiny_dir):
    prompts = [random_prompt(5 + i, 256, seed=i) for i in range(4)]
    async with Engine(tiny_dir["mixtral"], _cfg(), progress=False) as engine:
        expected = [(await engine.complete(p, GOOD)).token_ids for p in prompts[:3]]
        for bad in ({"logprobs": True}, {"prompt_logprobs": True}, {"temperature": 1e-40}):
            async def bad_request():
                return await engine.complete(prompts[3], SamplingParams(max_tokens=16, **bad))

            *good, failed = await asyncio.gather(*(engine.complete(p, GOOD) for p in prompts[:3]), bad_request(),
                                                 return_exceptions=True)
            assert isinstance(failed, InvalidSamplingParamsError)
            assert [g.token_ids for g in good] == expected


async def test_a_request_whose_sampling_fails_ends_alone(tiny_dir, monkeypatch):
    """Non-finite logits for one request (injected at the sampler's input): it ends with
    RequestFailedError, the other three of the same steps finish with unchanged tokens."""
    prompts = [random_prompt(5 + i, 256, seed=i) for i in range(4)]
    async with Engine(tiny_dir["mixtral"], _cfg(), progress=False) as engine:
        expected = [(await engine.complete(p, GOOD)).token_ids for p in prompts[:3]]
        runner = engine._runner
        sample = runner._sample
        shared = []

        def poisoned(plan, logits):
            rows, r = [], 0
            for c in plan:
                r += len(c.prompt_targets)
                if c.sample is not None:
                    rows.append((c.sample.temperature, r))
                    r += 1
            if len(rows) > 1:
                shared.append(len(rows))
            for temperature, row in rows:
                if temperature == 0.8:  # the victim's
                    logits[row, 7] = math.nan
            return sample(plan, logits)

        monkeypatch.setattr(runner, "_sample", poisoned)
        results = await asyncio.gather(
            *(engine.complete(p, GOOD) for p in prompts[:3]),
            engine.complete(prompts[3], SamplingParams(max_tokens=16, temperature=0.8, seed=3, ignore_eos=True)),
            return_exceptions=True)
        assert isinstance(results[3], RequestFailedError) and "NaN" in str(results[3])
        assert [r.token_ids for r in results[:3]] == expected
        assert shared  # the victim really shared steps with the others
        kv = engine.kv_manager
        assert kv.num_sequences == 0 and kv.pool.num_free_blocks == kv.pool.num_blocks


def test_sampling_cannot_overflow():
    logits = torch.tensor([[0.0, 1e30, -1e30, 5.0], [1.0, 2.0, 3.0, 4.0], [math.nan, 0.0, 1.0, 2.0],
                           [-math.inf] * 4])
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    tokens, ok = sample_tokens(logits, [(1e-3, 0, 1.0, gens[0]), (100.0, 2, 0.5, gens[1]), (0.7, 0, 1.0, gens[2]),
                                        (0.7, 0, 1.0, gens[3])])
    assert ok.tolist() == [True, True, False, False]
    assert tokens[0] == 1 and tokens[1] in (2, 3)


async def test_a_step_loop_that_raises_fails_its_requests_instead_of_hanging(tiny_dir, monkeypatch):
    """A bug in the step path (here the scheduler raising) stops the step loop: every request it
    held ends with EngineFailedError within a bound, new requests are refused with it, the state
    says FAILED (so /health reports it), and the engine still closes."""
    from afkv.engine.engine import EngineState
    from afkv.errors import EngineFailedError

    async with Engine(tiny_dir["mixtral"], _cfg(), progress=False) as engine:
        ok = await engine.complete(random_prompt(5, 256, seed=0), GOOD)
        assert ok.token_ids
        scheduler = engine._scheduler
        calls = {"n": 0}
        schedule = scheduler.schedule

        def broken():
            calls["n"] += 1
            if calls["n"] > 2:  # a request is already running when the bug strikes
                raise AttributeError("injected bug in the scheduler")
            return schedule()

        monkeypatch.setattr(scheduler, "schedule", broken)
        pending = [engine.complete(random_prompt(5 + i, 256, seed=i), SamplingParams(max_tokens=64, ignore_eos=True))
                   for i in range(3)]
        results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), timeout=60)
        assert all(isinstance(r, EngineFailedError) for r in results), results
        assert "injected bug" in str(results[0])
        assert engine.state is EngineState.FAILED
        with pytest.raises(EngineFailedError, match="injected bug"):
            await engine.complete(random_prompt(5, 256, seed=9), GOOD)
    assert engine.state is EngineState.CLOSED
