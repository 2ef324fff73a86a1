"""The fixed-buffer data plane (the GPU path: NcclFFN and the expert node's step loop) on
the CPU, over HostPeer sockets: expert nodes as processes on loopback.

Per-peer compaction, replicas, capacity overflow and retry, node loss and live rebalance
must all give the colocated engine's greedy tokens.
"""

import asyncio

import pytest

from afkv import Engine, SamplingParams
from afkv.errors import RequestFailedError
from afkv.serve.launch import Deployment
from tests.helpers import random_prompt
from tests.nodes.test_disaggregated import _attached_config, _colocated, _write_config

PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)
TOPOLOGIES = [(1, 1), (1, 2), (2, 2)]


def _fixed(tmp_path, attention, experts, extra="", **kw):
    """A CPU deployment on the fixed-buffer plane (on a GPU machine too: there `auto` would put
    every node on cuda:0, where NCCL refuses two ranks on one GPU)."""
    path = _write_config(tmp_path, attention, experts, extra='data_plane = "fixed"\n' + extra, **kw)
    path.write_text('[model]\ndevice = "cpu"\n' + path.read_text())
    return path


def _prompts(model, n=5):
    vocab = 256 if model else 49152
    return [random_prompt(4 + 5 * i, vocab, seed=i) for i in range(n)]


async def _run_all(engines, prompts, params=PARAMS):
    return await asyncio.gather(*(asyncio.gather(*(e.complete(p, params) for p in prompts)) for e in engines))


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def model(request, tiny_dir):
    return str(tiny_dir[request.param])


@pytest.mark.parametrize("attention,experts", TOPOLOGIES, ids=[f"{a}A{f}F" for a, f in TOPOLOGIES])
async def test_fixed_plane_matches_colocated(model, attention, experts, tmp_path):
    """Each expert node receives only its rows (qwen2_moe: plus the shared expert's, all rows)."""
    path = _fixed(tmp_path, attention, experts)
    prompts = _prompts(model)
    with Deployment(path, model, start_attention=False) as dep:
        cfg = _attached_config(path, dep)
        expected = await _colocated(model, cfg, prompts, PARAMS)
        engines = [Engine(model, cfg, progress=False, attention_rank=i) for i in range(attention)]
        for e in engines:
            await e.start()
        try:
            assert type(engines[0]._remote).__name__ == "NcclFFN"
            for m in (1, 2, 3):
                for e in engines:
                    e.set_micro_batches(m)
                for per_engine in await _run_all(engines, prompts):
                    assert [r.token_ids for r in per_engine] == expected, f"m={m}"
        finally:
            for e in engines:
                await e.aclose()


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
            control = engine._remote.control
            async with asyncio.timeout(30):  # the control plane's probe brings the node back
                while control.dead:
                    await asyncio.sleep(0.1)
            before = (await control.request_all({"type": "stats"}, [1]))[0]["tokens"]
            got = [r.token_ids for r in await asyncio.gather(*(engine.complete(p, PARAMS) for p in prompts))]
            assert got == expected
            assert (await control.request_all({"type": "stats"}, [1]))[0]["tokens"] > before  # it serves again
            kv = engine.kv_manager
            assert kv.num_sequences == 0 and kv.pool.num_free_blocks == kv.pool.num_blocks
