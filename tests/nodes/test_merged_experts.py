"""Merged expert batching (`[deployment] expert_batching = "merged"`) on the CPU: an expert node
runs one FFN call per layer and micro-batch slot over every attention node's rows.

Every attention node must still get the colocated engine's greedy tokens; the expert node's
counters show the merging (afkv.nodes.expert_stats); an idle attention node delays the others
by the gather bound at most once; an attention node whose data plane fails mid-run does not
take the other's steps with it.
"""

import asyncio
import dataclasses
import threading
import time

import pytest

from afkv import Engine, EngineConfig, SamplingParams
from afkv.errors import ConfigError, RequestFailedError
from afkv.serve.launch import Deployment
from afkv.transport.tensors import unpack_tensor
from tests.helpers import random_prompt

PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)


def _write_config(tmp_path, attention, experts, batching="merged", timeout_s=10.0):
    path = tmp_path / f"merged-{attention}a{experts}f.toml"
    path.write_text(f"""
[kv]
block_size = 4
num_blocks = 256
[scheduler]
max_num_batched_tokens = 24
[deployment]
attention_nodes = {attention}
expert_nodes = {experts}
micro_batches = 2
port = 0
expert_timeout_s = {timeout_s}
expert_batching = "{batching}"
""")
    return path


async def _colocated(model, cfg: EngineConfig, prompts, params=PARAMS):
    async with Engine(model, dataclasses.replace(cfg, deployment=None), progress=False) as e:
        return [r.token_ids for r in await asyncio.gather(*(e.complete(p, params) for p in prompts))]


async def _expert_stats(engine) -> list[dict]:
    return await engine._links.request_all({"type": "stats"})


def _delta(after: list[dict], before: list[dict], key: str) -> list[int]:
    return [a[key] - b[key] for a, b in zip(after, before)]


async def _started(model, cfg, attention):
    engines = [Engine(model, cfg, progress=False, attention_rank=i) for i in range(attention)]
    for e in engines:
        await e.start()
    return engines


@pytest.mark.parametrize("attention,experts", [(2, 1), (2, 2)], ids=["2A1F", "2A2F"])
async def test_merged_matches_colocated_with_one_ffn_per_layer_and_slot(tiny_dir, attention, experts, tmp_path):
    model = str(tiny_dir["mixtral"])
    path = _write_config(tmp_path, attention, experts)
    prompts = [random_prompt(3 + 7 * i, 256, seed=i) for i in range(4)]
    with Deployment(path, model, start_attention=False) as dep:
        cfg = dep.attached_config()
        assert cfg.deployment.expert_batching == "merged"
        expected = await _colocated(model, cfg, prompts)
        engines = await _started(model, cfg, attention)
        try:
            num_layers = engines[0].spec.num_layers  # every layer of the tiny Mixtral is routed
            for m in (1, 2):
                for e in engines:
                    e.set_micro_batches(m)
                before = await _expert_stats(engines[0])
                # every attention node runs its own batch, all at the same time
                async with asyncio.timeout(120):
                    results = await asyncio.gather(*(
                        asyncio.gather(*(e.complete(p, PARAMS) for p in prompts)) for e in engines))
                for per_engine in results:
                    assert [r.token_ids for r in per_engine] == expected, f"m={m}"
                after = await _expert_stats(engines[0])
                for bundles, links, launches, steps in zip(
                        _delta(after, before, "bundles"), _delta(after, before, "bundle_links"),
                        _delta(after, before, "ffn_launches"), _delta(after, before, "requests")):
                    assert links == steps >= 2 * 12  # every step of both attention nodes was run
                    assert links > bundles  # steps of both attention nodes shared runs
                    # one FFN call per (layer, slot) and run, not one per attention node
                    assert launches <= num_layers * m * bundles
                    if m == 1 and experts == 1:  # every run has exactly one slot with rows per layer
                        assert launches == num_layers * bundles
            timings = engines[0].layer_timings()
            assert timings["expert_s"] > 0  # merged FFN time is reported to each member
            # EPLB load counts: every (token, expert) pair once, however the runs merged it
            loads = sum(int(unpack_tensor(s["loads"]).sum()) for s in await _expert_stats(engines[0]))
            stats = [e.stats() for e in engines]
            requests = 2 * len(prompts)  # per attention node: both m
            rows = sum(st.num_prompt_tokens - st.num_cached_prompt_tokens + st.num_generated_tokens - requests
                       for st in stats)  # prefill rows (less the prefix-cached ones) + decode rows
            if not any(st.num_step_retries for st in stats):  # a retried step's pairs count again
                assert loads == rows * 2 * num_layers  # top-2 routing, every layer
        finally:
            for e in engines:
                await e.aclose()


async def test_idle_attention_node_stalls_the_other_at_most_once(tiny_dir, tmp_path):
    model = str(tiny_dir["mixtral"])
    path = _write_config(tmp_path, 2, 1)
    prompts = [random_prompt(4 + 5 * i, 256, seed=10 + i) for i in range(3)]
    with Deployment(path, model, start_attention=False) as dep:
        cfg = dep.attached_config()
        expected = await _colocated(model, cfg, prompts)
        engines = await _started(model, cfg, 2)
        try:
            # both step for a while (attention node 1 becomes active), then only node 0 has requests
            async with asyncio.timeout(60):
                await asyncio.gather(*(e.complete(prompts[0], PARAMS) for e in engines))
            before = await _expert_stats(engines[0])
            async with asyncio.timeout(60):
                got = await asyncio.gather(*(engines[0].complete(p, PARAMS) for p in prompts))
            assert [r.token_ids for r in got] == expected
            after = await _expert_stats(engines[0])
            (bundles,), (timeouts,) = _delta(after, before, "bundles"), _delta(after, before, "gather_timeouts")
            assert bundles >= 12  # node 0's steps, each run alone
            assert _delta(after, before, "bundle_links") == [bundles]
            assert timeouts <= 1  # waited for the idle node once (if it was still active), not at every step
        finally:
            for e in engines:
                await e.aclose()


async def test_failed_attention_node_does_not_take_the_other_down(tiny_dir, tmp_path):
    model = str(tiny_dir["mixtral"])
    path = _write_config(tmp_path, 2, 1)
    prompts = [random_prompt(5 + 4 * i, 256, seed=20 + i) for i in range(3)]
    long = SamplingParams(max_tokens=40, ignore_eos=True)
    with Deployment(path, model, start_attention=False) as dep:
        cfg = dep.attached_config()
        expected = await _colocated(model, cfg, prompts, long)
        engines = await _started(model, cfg, 2)
        try:
            started = asyncio.Event()

            async def victim():
                try:
                    async for _ in engines[1].generate(prompts[0], long):
                        started.set()
                except RequestFailedError:
                    pass  # its step failed with its data plane: that request may fail, nothing else

            victim_task = asyncio.create_task(victim())
            survivor = asyncio.gather(*(engines[0].complete(p, long) for p in prompts))
            async with asyncio.timeout(60):
                await started.wait()
            remote = engines[1]._remote
            for peer in remote._dispatch + remote._combine:  # its data plane breaks mid-run
                peer.abort()
            async with asyncio.timeout(120):
                got = await survivor
                await victim_task
            assert [r.token_ids for r in got] == expected
            # the failed node joins again and is served again, in merged runs
            async with asyncio.timeout(120):
                again = await asyncio.gather(*(e.complete(p, long) for e in engines for p in prompts[:2]))
            assert [r.token_ids for r in again] == expected[:2] * 2
            for e in engines:
                kv = e.kv_manager
                assert kv.num_sequences == 0 and kv.pool.num_free_blocks == kv.pool.num_blocks
        finally:
            for e in engines:
                await e.aclose()


async def test_stalled_attention_node_is_dropped_from_the_run(tiny_dir, tmp_path):
    """An attention node that announced its step and then does not send its rows (its worker
    stalls) is dropped from the merged run after half the expert timeout: the other's answers
    come back in time, without a retry."""
    model = str(tiny_dir["mixtral"])
    path = _write_config(tmp_path, 2, 1, timeout_s=4.0)
    prompts = [random_prompt(5 + 4 * i, 256, seed=30 + i) for i in range(3)]
    long = SamplingParams(max_tokens=30, ignore_eos=True)
    with Deployment(path, model, start_attention=False) as dep:
        cfg = dep.attached_config()
        expected = await _colocated(model, cfg, prompts, long)
        engines = await _started(model, cfg, 2)
        try:
            peer = engines[1]._remote._dispatch[0]
            stall = threading.Event()
            send = peer.send

            def stalling_send(t, stream=None):  # attention node 1's worker thread
                if stall.is_set():
                    stall.clear()
                    time.sleep(3.0)  # past the expert node's 2 s wait for its rows
                send(t, stream)

            peer.send = stalling_send
            started = asyncio.Event()

            async def victim():
                try:
                    async for _ in engines[1].generate(prompts[0], long):
                        started.set()
                except RequestFailedError:
                    pass  # its step failed: that request may fail, nothing else

            victim_task = asyncio.create_task(victim())
            survivor = asyncio.gather(*(engines[0].complete(p, long) for p in prompts))
            async with asyncio.timeout(60):
                await started.wait()
            stall.set()
            async with asyncio.timeout(120):
                got = await survivor
                await victim_task
            assert not stall.is_set()  # the stall happened
            assert [r.token_ids for r in got] == expected
            assert engines[0].stats().num_step_retries == 0  # every answer came back ok
            async with asyncio.timeout(60):  # the stalled node joins again and is served again
                again = await engines[1].complete(prompts[1], long)
            assert again.token_ids == expected[1]
        finally:
            for e in engines:
                await e.aclose()


def test_expert_batching_is_validated():
    cfg = EngineConfig.from_dict({"deployment": {"expert_batching": "merged"}})
    assert cfg.deployment.expert_batching == "merged"
    assert EngineConfig.from_dict({"deployment": {}}).deployment.expert_batching == "per_attention_node"
    with pytest.raises(ConfigError) as exc:
        EngineConfig.from_dict({"deployment": {"expert_batching": "fused"}}, source="x.toml")
    assert exc.value.key == "deployment.expert_batching" and "fused" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        EngineConfig.from_dict({"deployment": {"expert_batching": 1}})
    assert exc.value.key == "deployment.expert_batching"
