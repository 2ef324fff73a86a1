"""EPLB in the runtime (CPU processes on loopback): replicas, live rebalance, node loss,
load statistics. Every served token must equal the colocated engine's greedy token."""

import asyncio
import dataclasses

import pytest
import torch

from afkv import Engine, EngineConfig, SamplingParams
from afkv.model.tiny import write_zipf_checkpoint
from afkv.eplb import zipf_router_bias
from afkv.errors import ConfigError, EngineError, ExpertUnavailableError
from afkv.nodes.dispatch import DispatchTables, pack
from afkv.nodes.balancer import host_order
from afkv.nodes.placement import contiguous_placement, eplb_placement, initial_placement, spread_replicas
from afkv.serve.launch import Deployment
from afkv.transport.tensors import pack_tensor
from tests.helpers import random_prompt

PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)


def _config(tmp_path, experts, *, slots=0, enabled=True, timeout_s=5.0, extra=""):
    path = tmp_path / f"eplb-{experts}f-{slots}.toml"
    path.write_text(f"""
[kv]
block_size = 4
num_blocks = 256
[scheduler]
max_num_batched_tokens = 24
[deployment]
attention_nodes = 1
expert_nodes = {experts}
micro_batches = 2
port = 0
expert_timeout_s = {timeout_s}
heartbeat_interval_s = 0.5
[eplb]
enabled = {str(enabled).lower()}
slots_per_node = {slots}
{extra}
""")
    return path


def _ctl(engine):
    """The attention node's links to the expert nodes (ExpertLinks)."""
    return engine._links


def _attached(path, dep):
    return dep.attached_config()


async def _colocated(model, cfg, prompts, params=PARAMS):
    cfg = dataclasses.replace(cfg, deployment=None, eplb=dataclasses.replace(cfg.eplb, enabled=False))
    async with Engine(model, cfg, progress=False) as e:
        return [r.token_ids for r in await asyncio.gather(*(e.complete(p, params) for p in prompts))]


# ---- placement (no processes) -----------------------------------------------------------------
def test_route_splits_pairs_evenly_over_live_replicas(spec):
    phy2log = torch.tensor([[0, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2]] * spec.num_layers)  # 3 nodes x 4 slots
    p = eplb_placement(spec, 3, phy2log, [0, 1, 2], epoch=1)
    assert sorted(int(n) for n in p.replica_nodes[0, 0] if n >= 0) == [0, 1, 2]  # spread: one per node
    ids = torch.tensor([[0, 1]] * 9 + [[0, 5]] * 3)  # [12, 2]: expert 0 twelve times
    cpu = torch.device("cpu")
    nodes = DispatchTables(p, cpu).assign(0, ids, 0)
    assert torch.bincount(nodes[:, 0], minlength=3).tolist() == [4, 4, 4]
    assert torch.equal(DispatchTables(p, cpu).assign(0, ids, 0), nodes)  # deterministic
    # node 0 lost: expert 0 goes to its two other replicas, evenly
    t = DispatchTables(p, cpu, frozenset({0}))
    nodes = t.assign(0, ids, 0)
    assert torch.bincount(nodes[:, 0], minlength=3).tolist() == [0, 6, 6]
    # each peer's buffer holds only its own pairs; together they are every pair exactly once
    cap, x = 12, torch.randn(12, spec.hidden_size)
    src, xb = torch.zeros(3, cap, dtype=torch.int64), torch.zeros(3, cap, spec.hidden_size)
    idsb, wb = torch.zeros(3, cap, 2, dtype=torch.int32), torch.zeros(3, cap, 2)
    pack(nodes, ids, torch.ones(12, 2), x, -1, p.sentinel, torch.full((3,), cap), src, xb, idsb, wb)
    seen = torch.zeros(12, 2, dtype=torch.int64)
    for node in range(3):
        rows = src[node][src[node] < 12]
        real = idsb[node, : rows.numel()] != p.sentinel
        seen[rows] += real.long()
        assert bool((wb[node, : rows.numel()][~real] == 0).all())
        held = p.held(node)[0]
        assert all(int(e) in held for e in idsb[node, : rows.numel()][real])
    assert bool((seen == 1).all())
    assert not bool(t.lost_code(0, ids).any())
    # expert 5 lives only on one node: the rows needing it (rows 9-11) are lost, with an error
    # naming layer, expert and node; other rows stay routable
    holder = int(p.replica_nodes[0, 5, 0])
    t = DispatchTables(p, cpu, frozenset({holder}))
    codes = t.lost_code(0, ids)
    assert codes.nonzero().flatten().tolist() == [9, 10, 11]
    exc = t.lost_error(int(codes[9]))
    assert isinstance(exc, ExpertUnavailableError) and "expert 5 of layer 0" in str(exc)
    assert exc.layer == 0 and exc.expert == 5 and exc.nodes == (holder,)
    assert p.covered(frozenset()) and not p.covered(frozenset({holder}))


def test_spread_replicas_keeps_counts_and_separates_copies():
    phy2log = torch.tensor([[0, 0, 1, 2, 3, 3, 1, 2]])  # 2 nodes x 4 slots: 0 twice on node 0, 3 twice on node 1
    out = spread_replicas(phy2log, 2)
    assert torch.equal(torch.bincount(out[0], minlength=4), torch.bincount(phy2log[0], minlength=4))
    for node in range(2):
        slots = out[0, node * 4:(node + 1) * 4].tolist()
        assert len(set(slots)) == 4


def test_initial_placement_with_spare_slots_replicates_everything_once(spec):
    p = initial_placement(spec, 2, slots_per_node=8)  # 16 slots, 8 experts: two replicas each, one per node
    assert bool((p.num_replicas == 2).all())
    assert p.held(0)[0] == p.held(1)[0] == frozenset(range(8))
    q = initial_placement(spec, 2)  # no spare slots: contiguous shards
    assert torch.equal(q.replica_nodes, contiguous_placement(spec, 2).replica_nodes)
    with pytest.raises(ValueError, match="slots_per_node 3"):
        initial_placement(spec, 2, slots_per_node=3)


def test_eplb_config_needs_a_deployment(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[eplb]\nenabled = true\n")
    with pytest.raises(ConfigError, match="eplb.enabled"):
        EngineConfig.from_toml(path)


# ---- processes ---------------------------------------------------------------------------------
async def test_load_stats_reach_the_coordinator_and_follow_the_zipf_router(zipf_dir, spec, tmp_path):
    model = str(zipf_dir)
    path = _config(tmp_path, 2)
    prompts = [random_prompt(8 + i, 256, seed=10 + i) for i in range(6)]
    with Deployment(path, model, start_attention=False) as dep:
        async with Engine(model, _attached(path, dep), progress=False) as engine:
            await asyncio.gather(*(engine.complete(p, PARAMS) for p in prompts))
            loads = await engine.expert_loads()  # [L, E], summed over both expert nodes
    # every token fed through the model (prompt + generated - the last one) picks top_k experts per layer
    fed = sum(len(p) + PARAMS.max_tokens - 1 for p in prompts)
    assert loads.shape == (spec.num_layers, spec.num_experts)
    assert loads.sum(1).tolist() == [fed * spec.top_k] * spec.num_layers
    for layer in range(spec.num_layers):
        bias = zipf_router_bias(spec.num_experts, 1.0, 1000 + layer)
        hottest, coldest = int(bias.argmax()), int(bias.argmin())
        assert loads[layer, hottest] > 2 * loads[layer, coldest], (layer, loads[layer].tolist())
        assert loads[layer, hottest] >= loads[layer].float().mean()


async def test_live_rebalance_keeps_greedy_tokens(zipf_dir, tmp_path):
    model = str(zipf_dir)
    path = _config(tmp_path, 2, slots=6)
    prompts = [random_prompt(6 + 3 * i, 256, seed=20 + i) for i in range(6)]
    long = SamplingParams(max_tokens=30, ignore_eos=True)
    with Deployment(path, model, start_attention=False) as dep:
        cfg = _attached(path, dep)
        expected = await _colocated(model, cfg, prompts, long)
        async with Engine(model, cfg, progress=False) as engine:
            warm = await asyncio.gather(*(engine.complete(p, long) for p in prompts))
            assert [w.token_ids for w in warm] == expected
            before = _ctl(engine).placement
            # rebalance while the same requests are being served again
            running = [asyncio.create_task(engine.complete(p, long)) for p in prompts]
            while engine.stats().num_generated_tokens < len(prompts) * long.max_tokens + 20:
                await asyncio.sleep(0.01)
            report = await engine.rebalance()
            got = await asyncio.gather(*running)
            assert [g.token_ids for g in got] == expected
            after = _ctl(engine).placement
            assert report.epoch == after.epoch == before.epoch + 1
            assert report.nodes == (0, 1) and report.replicas_added > 0
            assert not torch.equal(before.replica_nodes, after.replica_nodes)
            assert report.balancedness_after <= report.balancedness_before
            # the expert nodes serve the new placement; a second round still matches
            stats = await _ctl(engine).request_all({"type": "stats"})
            assert [s["epoch"] for s in stats] == [after.epoch] * 2
            # every replica gained was copied from the node holding it, none read from the checkpoint
            assert sum(s["experts_received"] for s in stats) == report.replicas_added
            assert sum(s["experts_from_checkpoint"] for s in stats) == 0
            for j, s in enumerate(stats):
                gained = sum(len(n - o) for n, o in zip(after.held(j), before.held(j)))
                assert s["experts_received"] == gained and (s["received_bytes"] > 0) == (gained > 0)
            again = await asyncio.gather(*(engine.complete(p, long) for p in prompts))
            assert [a.token_ids for a in again] == expected
            kv = engine.kv_manager
            assert kv.num_sequences == 0 and kv.pool.num_free_blocks == kv.pool.num_blocks


async def test_periodic_rebalance_and_second_attention_node_follows(zipf_dir, tmp_path):
    model = str(zipf_dir)
    path = _config(tmp_path, 2, slots=6, extra="rebalance_interval_s = 0.5")
    text = path.read_text().replace("attention_nodes = 1", "attention_nodes = 2")
    path.write_text(text)
    prompts = [random_prompt(7 + i, 256, seed=40 + i) for i in range(4)]
    with Deployment(path, model, start_attention=False) as dep:
        cfg = _attached(path, dep)
        expected = await _colocated(model, cfg, prompts)
        async with Engine(model, cfg, progress=False) as coordinator, \
                Engine(model, cfg, progress=False, attention_rank=1) as other:
            with pytest.raises(EngineError, match="only attention node 0"):
                await other.rebalance()
            for _ in range(3):
                got = await asyncio.gather(*(e.complete(p, PARAMS) for e in (coordinator, other) for p in prompts))
                assert [g.token_ids for g in got] == expected * 2
                await asyncio.sleep(0.6)
            assert _ctl(coordinator).placement.epoch >= 2  # periodic rounds happened
            # Holding the balancer's lock waits out a round in flight and keeps the next one from
            # starting, so the coordinator's epoch stands still while the other node steps.
            async with coordinator._balancer._lock:
                epoch = _ctl(coordinator).placement.epoch
                await asyncio.gather(*(other.complete(p, PARAMS) for p in prompts))
                assert _ctl(other).placement.epoch == epoch  # learnt from the expert nodes' answers


async def test_expert_node_loss_with_replicas_keeps_tokens_then_rejoins(zipf_dir, tmp_path):
    model = str(zipf_dir)
    path = _config(tmp_path, 2, slots=8)  # every expert on both nodes
    prompts = [random_prompt(6 + 2 * i, 256, seed=30 + i) for i in range(4)]
    long = SamplingParams(max_tokens=40, ignore_eos=True)
    with Deployment(path, model, start_attention=False) as dep:
        cfg = _attached(path, dep)
        expected = await _colocated(model, cfg, prompts, long)
        async with Engine(model, cfg, progress=False) as engine:
            running = [asyncio.create_task(engine.complete(p, long)) for p in prompts]
            while engine.stats().num_generated_tokens < 20:
                await asyncio.sleep(0.01)
            dep.kill_node(dep.expert_rank(1))
            async with asyncio.timeout(60):
                got = await asyncio.gather(*running)
            assert [g.token_ids for g in got] == expected
            assert _ctl(engine).dead == {1}
            # the node comes back and rejoins (background probe); tokens unchanged with it serving
            dep.start_node(dep.expert_rank(1))
            dep.wait_ready("expert", 2)
            async with asyncio.timeout(30):
                while _ctl(engine).dead:
                    await asyncio.sleep(0.1)
            before = (await _ctl(engine).request_all({"type": "stats"}, [1]))[0]["tokens"]
            again = await asyncio.gather(*(engine.complete(p, long) for p in prompts))
            assert [a.token_ids for a in again] == expected
            assert (await _ctl(engine).request_all({"type": "stats"}, [1]))[0]["tokens"] > before


async def test_expert_node_loss_without_replicas_fails_clearly_and_engine_keeps_serving(zipf_dir, tmp_path):
    model = str(zipf_dir)
    path = _config(tmp_path, 2, slots=0, timeout_s=3.0)
    prompts = [random_prompt(6 + i, 256, seed=50 + i) for i in range(3)]
    long = SamplingParams(max_tokens=400, ignore_eos=True)
    with Deployment(path, model, start_attention=False) as dep:
        cfg = _attached(path, dep)
        expected = await _colocated(model, cfg, prompts)
        async with Engine(model, cfg, progress=False) as engine:
            started = asyncio.Event()

            async def consume():
                async for _ in engine.generate(prompts[0], long):
                    started.set()

            task = asyncio.create_task(consume())
            await started.wait()
            dep.kill_node(dep.expert_rank(1))
            with pytest.raises(ExpertUnavailableError, match="no live replica|lives only on expert node 1") as info:
                async with asyncio.timeout(20):
                    await task
            assert info.value.nodes == (1,)
            with pytest.raises(ExpertUnavailableError):  # fails fast while the node is down
                async with asyncio.timeout(20):
                    await engine.complete(prompts[1], PARAMS)
            dep.start_node(dep.expert_rank(1))
            dep.wait_ready("expert", 2)
            got = await asyncio.gather(*(engine.complete(p, PARAMS) for p in prompts))
            assert [g.token_ids for g in got] == expected


@pytest.fixture(scope="module")
def node0_dir(tmp_path_factory):
    """Routers that prefer experts 0-3 (expert node 0 of two contiguous shards): many requests
    never route to experts 4-7, others often do."""
    probs = torch.tensor([1.0] * 4 + [0.02] * 4)
    bias = (probs / probs.sum()).log().repeat(3, 1)  # [L, E]
    return write_zipf_checkpoint(tmp_path_factory.mktemp("node0") / "m", seed=1, router_bias=bias, noise_std=1.0)


async def _traced(model, cfg, prompts, params):
    """Colocated greedy tokens of each prompt alone, and how many (token, expert) pairs of it
    went to experts 4-7."""
    cfg = dataclasses.replace(cfg, deployment=None, eplb=dataclasses.replace(cfg.eplb, enabled=False))
    out = []
    async with Engine(model, cfg, progress=False) as e:
        ffn = e._model.ffn
        submit, hits = ffn.submit, []

        def counting(layer, x, ids, w):
            hits.append(int((ids >= 4).sum()))
            return submit(layer, x, ids, w)

        ffn.submit = counting
        for p in prompts:
            hits.clear()
            out.append(((await e.complete(p, params)).token_ids, sum(hits)))
    return out


async def test_lost_expert_without_replica_ends_only_the_requests_routed_to_it(node0_dir, tmp_path):
    model = str(node0_dir)
    path = _config(tmp_path, 2, slots=0, timeout_s=3.0)  # node 0: experts 0-3, node 1: experts 4-7
    short = SamplingParams(max_tokens=24, ignore_eos=True)
    long = SamplingParams(max_tokens=300, ignore_eos=True)
    candidates = [random_prompt(6, 256, seed=100 + i) for i in range(12)]
    with Deployment(path, model, start_attention=False) as dep:
        cfg = _attached(path, dep)
        traced = await _traced(model, cfg, candidates, short)
        clean = [i for i, (_, hits) in enumerate(traced) if hits == 0]
        busy = sorted(range(len(traced)), key=lambda i: -traced[i][1])[:2]
        assert clean and traced[busy[-1]][1] > 20, [h for _, h in traced]
        survivor = candidates[clean[0]]
        async with Engine(model, cfg, progress=False) as engine:
            doomed = [asyncio.create_task(engine.complete(candidates[i], long)) for i in busy]
            tokens = []
            async for chunk in engine.generate(survivor, short):
                tokens += chunk.token_ids
                if len(tokens) == 3:
                    dep.kill_node(dep.expert_rank(1))
            # the request that never routed to node 1's experts finished, unchanged, although it
            # shared steps with the requests that failed
            assert tokens == traced[clean[0]][0]
            assert all(t.done() for t in doomed)
            for task in doomed:
                with pytest.raises(ExpertUnavailableError, match="no live replica") as info:
                    async with asyncio.timeout(30):
                        await task
                assert info.value.nodes == (1,) and info.value.expert >= 4
            assert _ctl(engine).dead == {1}
            # the engine keeps serving requests that need only node 0, and freed every block
            again = await engine.complete(candidates[clean[-1]], short)
            assert again.token_ids == traced[clean[-1]][0]
            kv = engine.kv_manager
            assert kv.num_sequences == 0 and kv.pool.num_free_blocks == kv.pool.num_blocks


# ---- hierarchical EPLB: expert groups per host ------------------------------------------------
class _Links:
    """The part of ExpertLinks the Balancer uses: expert nodes on the given hosts, node 0
    reporting `loads`; switch adopts the placement."""

    def __init__(self, spec, hosts: list[str], loads: torch.Tensor):
        self.placement = initial_placement(spec, len(hosts))
        self.num_nodes, self.dead, self.hosts, self.loads = len(hosts), (), hosts, loads

    async def request(self, j, msg):
        if msg["type"] == "stats":
            return {"loads": pack_tensor(self.loads if j == 0 else torch.zeros_like(self.loads))}
        return {}

    async def request_all(self, msg, nodes):
        return [{} for _ in nodes]

    async def address(self, j):
        return self.hosts[j], 9000 + j

    async def switch(self, placement):
        self.placement = placement


def test_host_order_runs_each_host_consecutively():
    assert host_order([0, 1, 2, 3], {0: "b", 1: "a", 2: "b", 3: "a"}) == ([1, 3, 0, 2], 2)
    assert host_order([0, 1, 2], {0: "a", 1: "a", 2: "b"}) == ([0, 1, 2], 1)  # unequal hosts: one EPLB node


async def test_rebalance_packs_whole_expert_groups_onto_hosts(deepseek_dir):
    """DeepSeek-V3's group-limited routing (tiny: 12 experts in 4 groups) over four expert nodes
    on two hosts: each group's experts end up on one host. The loads make group 0's three
    experts the heaviest, which the global policy puts on three nodes (both hosts)."""
    from afkv.config import EplbConfig
    from afkv.model.model import open_checkpoint
    from afkv.nodes.balancer import Balancer

    spec, reader = open_checkpoint(deepseek_dir["deepseek_v3"])
    reader.close()
    assert spec.num_expert_groups == 4
    loads = torch.ones(spec.num_layers, spec.num_experts, dtype=torch.int64)  # [L, E]
    loads[:, :3] = 100
    hosts = ["h1", "h0", "h1", "h0"]
    links = _Links(spec, hosts, loads)
    await Balancer(links, spec, EplbConfig(enabled=True)).rebalance()
    moe_layers = [layer for layer in range(spec.num_layers) if links.placement.has_router[layer]]
    assert moe_layers
    for layer in moe_layers:
        nodes = links.placement.replica_nodes[layer]  # [E, R]
        for g in range(4):
            held_by = {hosts[n] for n in nodes[3 * g : 3 * g + 3].flatten().tolist() if n >= 0}
            assert len(held_by) == 1, (layer, g, held_by)
