"""The fixed-buffer data plane (RemoteFFN and the expert node's step loop, the GPU code path)
on the CPU, over host peers: expert nodes as processes on loopback.

Capacity overflow and retry, and node loss, must give the colocated engine's greedy tokens
(every topology: tests/nodes/test_disaggregated.py; replicas and live rebalance:
tests/nodes/test_eplb_runtime.py).
"""

import asyncio

import pytest

from afkv import Engine, SamplingParams
from afkv.errors import RequestFailedError
from afkv.serve.launch import Deployment
from tests.helpers import random_prompt
from tests.nodes.test_disaggregated import _attached_config, _colocated, _write_config

PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)


def _fixed(tmp_path, attention, experts, extra="", **kw):
    """A CPU deployment (on a GPU machine too: host peers on the CPU)."""
    path = _write_config(tmp_path, attention, experts, extra=extra, **kw)
    path.write_text('[model]\ndevice = "cpu"\n' + path.read_text())
    return path


def _prompts(model, n=5):
    vocab = 256 if model else 49152
    return [random_prompt(4 + 5 * i, vocab, seed=i) for i in range(n)]


async def test_overflow_is_computed_again_with_more_room(tiny_dir, tmp_path):
    """dispatch_capacity far below what routing needs: steps overflow, are computed again
    with grown capacities, and the tokens do not change."""
    model = str(tiny_dir["mixtral"])
    path = _fixed(tmp_path, 1, 2, extra="dispatch_capacity = 0.125\n")
    prompts = _prompts(model, 6)
    with Deployment(path, model, start_attention=False) as dep:
        cfg = _attached_config(path, dep)
        expected = await _colocated(model, cfg, prompts, PARAMS)
        async with Engine(model, cfg, progress=False) as engine:
            got = [r.token_ids for r in await asyncio.gather(*(engine.complete(p, PARAMS) for p in prompts))]
            assert got == expected
            ffn = engine._remote
            assert ffn.overflows > 0 and engine.stats().num_step_retries >= ffn.overflows
            kv = engine.kv_manager
            assert kv.num_sequences == 0 and kv.pool.num_free_blocks == kv.pool.num_blocks


async def test_fixed_plane_expert_death_fails_then_recovers(tiny_dir, tmp_path):
    model = str(tiny_dir["mixtral"])
    path = _fixed(tmp_path, 1, 2, timeout_s=3.0)
    prompts = _prompts(model, 3)
    with Deployment(path, model, start_attention=False) as dep:
        cfg = _attached_config(path, dep)
        expected = await _colocated(model, cfg, prompts, PARAMS)
        async with Engine(model, cfg, progress=False) as engine:
            assert [r.token_ids for r in await asyncio.gather(*(engine.complete(p, PARAMS) for p in prompts))] \
                == expected
            dep.kill_node(dep.expert_rank(1))
            with pytest.raises(RequestFailedError, match="expert"):
                async with asyncio.timeout(30):
                    await engine.complete(prompts[0], PARAMS)
            dep.start_node(dep.expert_rank(1))
            dep.wait_ready("expert", 2)
            control = engine._links
            async with asyncio.timeout(30):  # the control plane's probe brings the node back
                while control.dead:
                    await asyncio.sleep(0.1)
            before = (await control.request_all({"type": "stats"}, [1]))[0]["tokens"]
            got = [r.token_ids for r in await asyncio.gather(*(engine.complete(p, PARAMS) for p in prompts))]
            assert got == expected
            assert (await control.request_all({"type": "stats"}, [1]))[0]["tokens"] > before  # it serves again
            kv = engine.kv_manager
            assert kv.num_sequences == 0 and kv.pool.num_free_blocks == kv.pool.num_blocks
