"""Prefill/decode disaggregation on the CPU (afkv.nodes.handoff): prefill nodes as processes
hand KV blocks to a decode node, which decodes colocated or with expert nodes.

Every topology gives the colocated engine's greedy tokens, for prompts with and without
shared prefixes, and only the blocks the decode node lacks cross (counted on both sides)."""

import asyncio
import dataclasses

import pytest

import afkv
from afkv import Engine, SamplingParams
from afkv.serve.launch import Deployment
from tests.helpers import random_prompt

PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)
BLOCK = 4
TOPOLOGIES = [(1, 0), (2, 0), (1, 2)]  # (prefill nodes, expert nodes); one decode node


def write_config(tmp_path, prefill, experts, *, timeout_s=10.0, attention=1):
    path = tmp_path / f"pd-{prefill}p{experts}e.toml"
    path.write_text(f"""
[kv]
block_size = {BLOCK}
num_blocks = 256
[scheduler]
max_num_batched_tokens = 24
[deployment]
attention_nodes = {attention}
expert_nodes = {experts}
prefill_nodes = {prefill}
micro_batches = 2
port = 0
expert_timeout_s = {timeout_s}
prefill_timeout_s = {timeout_s}
""")
    return path


def prompts_with_shared_prefixes() -> list[list[int]]:
    base = random_prompt(18, 256, seed=100)
    return [
        random_prompt(13, 256, seed=1),  # 3 full blocks to hand off
        random_prompt(3, 256, seed=2),  # no full block: computed on the decode node
        base[:16] + random_prompt(7, 256, seed=3),  # 5 full blocks
        base[:16] + random_prompt(9, 256, seed=4),  # shares 4 of them: 2 cross
        base[:12] + random_prompt(2, 256, seed=5),  # every full block held already: nothing crosses
        random_prompt(41, 256, seed=6),  # 10 full blocks, over two prefill chunks
    ]


def expected_transfers(prompts) -> list[int]:
    """Blocks each prompt hands over when run one after the other on a fresh decode node
    (generated tokens fill blocks of their own, which no later prompt shares)."""
    from afkv.kv.block_pool import chain_hashes

    held: set[bytes] = set()
    out = []
    for p in prompts:
        hashes = list(chain_hashes(p, BLOCK, (len(p) - 1) // BLOCK))
        out.append(sum(h not in held for h in hashes))
        held.update(hashes)
    return out


async def colocated(model, cfg, prompts):
    async with Engine(model, dataclasses.replace(cfg, deployment=None), progress=False) as e:
        return [(await e.complete(p, PARAMS)).token_ids for p in prompts]


def assert_all_free(engine: Engine) -> None:
    kv = engine.kv_manager
    kv.check_invariants()
    assert kv.num_sequences == 0
    assert kv.pool.num_free_blocks == kv.pool.num_blocks - (engine._runner.graphs is not None)


@pytest.mark.parametrize("prefill,experts", TOPOLOGIES, ids=[f"{p}P1D{f'{e}E' if e else ''}" for p, e in TOPOLOGIES])
async def test_pd_matches_colocated_and_moves_only_missing_blocks(tiny_dir, tmp_path, prefill, experts):
    model = str(tiny_dir["mixtral"])
    prompts = prompts_with_shared_prefixes()
    with Deployment(write_config(tmp_path, prefill, experts), model, start_attention=False) as dep:
        cfg = dep.attached_config()
        expected = await colocated(model, cfg, prompts)
        async with Engine(model, cfg, progress=False) as decode:
            assert (decode._remote is not None) == bool(experts)
            got = []
            for p in prompts:  # one after the other: what each finds held is known
                got.append((await decode.complete(p, PARAMS)).token_ids)
            assert got == expected
            counters = decode.kv_metrics().counters
            moved = expected_transfers(prompts)
            assert counters["handoff_received_blocks"] == counters["handoff_awaited_blocks"] == sum(moved)
            assert counters["handoff_shared_blocks"] == sum((len(p) - 1) // BLOCK for p in prompts) - sum(moved)
            stats = decode.stats()  # handed-over tokens are not counted as found in the cache
            assert stats.num_cached_prompt_tokens == BLOCK * counters["handoff_shared_blocks"]
            assert_all_free(decode)
            # concurrently, with the prefixes now held: the same tokens, nothing more crosses
            again = await asyncio.gather(*(decode.complete(p, PARAMS) for p in prompts))
            assert [r.token_ids for r in again] == expected
            assert decode.kv_metrics().counters["handoff_received_blocks"] == sum(moved)
            assert_all_free(decode)


async def test_launch_serves_pd_through_attach(tiny_dir, tmp_path):
    """`afkv launch` starts every role; an attached client gets the colocated tokens and the
    hand-off's times."""
    model = str(tiny_dir["mixtral"])
    prompts = prompts_with_shared_prefixes()
    with Deployment(write_config(tmp_path, 1, 1), model) as dep:
        expected = await colocated(model, dep.attached_config(), prompts)
        async with await afkv.attach(dep.address, token=dep.token) as engine:
            got = await asyncio.gather(*(engine.complete(p, PARAMS) for p in prompts))
            assert [r.token_ids for r in got] == expected
            [kv] = await engine.kv_metrics()
            assert kv.counters["handoff_received_blocks"] > 0
            handed = [r.metrics for r in got if r.metrics.num_handoff_tokens]
            assert handed  # their hand-off's times cross the attached connection, in order:
            for m in handed:  # arrival, the prefill node's ack (carrier open), last block, first token
                assert m.arrival_s <= m.handoff_ack_s <= m.handoff_end_s <= m.first_token_s


async def test_decode_node_is_picked_by_free_kv(tiny_dir, tmp_path):
    """Two decode nodes: a request goes to the one with the most free KV (reported with every
    chunk), not in turn. A long prompt decoding on node 0 holds 76 of its 256 blocks; the short
    prompts sent while it streams all go to node 1 (in turn, every other one would go to node
    0). Routing happens as they are sent, within milliseconds of the long request's first token,
    which has 199 more steps to go."""
    model = str(tiny_dir["mixtral"])
    with Deployment(write_config(tmp_path, 1, 0, attention=2), model) as dep:
        async with await afkv.attach(dep.address, token=dep.token) as engine:
            long = engine.generate(random_prompt(301, 256, seed=7), SamplingParams(max_tokens=200, ignore_eos=True))
            await anext(long)  # on node 0: both nodes had the whole pool free, node 0 first in turn
            before = [s.num_prompt_tokens for s in await engine.stats()]
            shorts = [random_prompt(9, 256, seed=20 + k) for k in range(4)]
            await asyncio.gather(*(engine.complete(p, PARAMS) for p in shorts))
            after = [s.num_prompt_tokens for s in await engine.stats()]
            assert after[0] == before[0] and after[1] - before[1] == sum(map(len, shorts))
            assert (await anext(long)).finish_reason is None  # still decoding on node 0 meanwhile
            await long.aclose()


def test_deployment_roles_and_validation(tmp_path):
    from afkv.config import DeploymentConfig, EngineConfig
    from afkv.errors import ConfigError

    d = DeploymentConfig(attention_nodes=2, expert_nodes=1, prefill_nodes=2)
    assert d.world_size == 5
    assert [d.role(r) for r in range(5)] == [("attention", 0), ("attention", 1), ("expert", 0), ("prefill", 0),
                                            ("prefill", 1)]
    bad = {"prefill_nodes = -1": "deployment.prefill_nodes",
           'prefill_nodes = 2\nprefill_devices = ["cpu"]': "deployment.prefill_devices",
           "prefill_nodes = 2\nprefill_timeout_s = 0": "deployment.prefill_timeout_s"}
    for lines, key in bad.items():
        path = tmp_path / "bad.toml"
        path.write_text(f"[deployment]\n{lines}\n")
        with pytest.raises(ConfigError) as err:
            EngineConfig.from_toml(path)
        assert err.value.key == key and err.value.file == str(path)
    path = tmp_path / "eplb.toml"
    path.write_text("[deployment]\nexpert_nodes = 0\nprefill_nodes = 1\n[eplb]\nenabled = true\n")
    with pytest.raises(ConfigError, match="expert_nodes"):
        EngineConfig.from_toml(path)


async def test_routing_least_queued_then_prefix_affinity():
    from afkv.config import DeploymentConfig
    from afkv.nodes.handoff import PrefillLinks

    links = PrefillLinks(DeploymentConfig(expert_nodes=0, prefill_nodes=3), "decode0")
    h = (4).to_bytes(8, "little") + bytes(8)  # maps to node 4 % 3 = 1
    assert links.pick(h, set()) == 1  # all idle: the prefix's node
    links._queued[:] = [0, 100, 0]
    assert links.pick(h, set()) == 0  # busier: the least queued instead
    assert links.pick(h, {0}) == 2 and links.pick(h, {0, 1, 2}) is None


async def test_killed_prefill_processes(tiny_dir, tmp_path):
    """SIGKILL a prefill node process: the decode node's requests go to the other one (same
    tokens); with both gone, PrefillUnavailableError; no block is left held."""
    from afkv.errors import PrefillUnavailableError

    model = str(tiny_dir["mixtral"])
    prompts = prompts_with_shared_prefixes()
    with Deployment(write_config(tmp_path, 2, 0, timeout_s=5.0), model, start_attention=False) as dep:
        cfg = dep.attached_config()
        expected = await colocated(model, cfg, prompts)
        async with Engine(model, cfg, progress=False) as decode:
            assert (await decode.complete(prompts[0], PARAMS)).token_ids == expected[0]  # both nodes known
            dep.kill_node(dep.prefill_rank(0))
            got = [(await decode.complete(p, PARAMS)).token_ids for p in prompts[1:]]
            assert got == expected[1:]
            assert_all_free(decode)
            dep.kill_node(dep.prefill_rank(1))
            with pytest.raises(PrefillUnavailableError):
                async with asyncio.timeout(60):
                    await decode.complete(random_prompt(30, 256, seed=77), PARAMS)
            assert_all_free(decode)
            # a prompt whose blocks the decode node holds needs no prefill node
            assert (await decode.complete(prompts[4], PARAMS)).token_ids == expected[4]
