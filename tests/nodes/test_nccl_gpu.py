"""The NCCL data plane on two GPUs: greedy tokens equal the colocated engine's (1A1F, 1A2F,
2A2F, CUDA graphs on both sides, EPLB), and a killed expert node fails its requests fast, is
joined again and serves the same tokens."""

import asyncio
import dataclasses
import time

import pytest
import torch

from afkv import Engine, EngineConfig, SamplingParams
from afkv.serve.launch import Deployment
from tests.helpers import random_prompt

pytestmark = pytest.mark.gpu


def _write_1a1f(tmp_path, dtype: str, num_blocks: int, timeout_s: float, scheduler: str = "",
                micro_batches: int | None = None):
    """A 1A1F deployment config: attention on cuda:0, the expert node on cuda:1."""
    path = tmp_path / "gpu.toml"
    m = "" if micro_batches is None else f"micro_batches = {micro_batches}\n"
    path.write_text(f"""
[model]
dtype = "{dtype}"
device = "cuda:0"
[kv]
block_size = 4
num_blocks = {num_blocks}
[scheduler]
{scheduler}
[deployment]
attention_nodes = 1
expert_nodes = 1
{m}port = 0
attention_devices = ["cuda:0"]
expert_devices = ["cuda:1"]
expert_timeout_s = {timeout_s}
""")
    return path


def test_nccl_1a1f_matches_colocated(tiny_dir, tmp_path):
    pytest.importorskip("cupy")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    model = str(tiny_dir["mixtral"])
    path = _write_1a1f(tmp_path, "float32", 256, 30.0, scheduler="max_num_batched_tokens = 24")
    prompts = [random_prompt(4 + 5 * i, 256, seed=i) for i in range(6)]
    params = SamplingParams(max_tokens=16, ignore_eos=True)

    async def run():
        cfg = EngineConfig.from_toml(path)
        colo = dataclasses.replace(cfg, deployment=None, model=dataclasses.replace(cfg.model, device="cuda:0"))
        async with Engine(model, colo, progress=False) as e:
            expected = [r.token_ids for r in await asyncio.gather(*(e.complete(p, params) for p in prompts))]
        with Deployment(path, model, start_attention=False) as dep:
            af = dataclasses.replace(cfg, deployment=dataclasses.replace(cfg.deployment, port=dep.port, token=dep.token),
                                     model=dataclasses.replace(cfg.model, device="cuda:0"))
            async with Engine(model, af, progress=False) as e:
                for m in (1, 2, 3):
                    e.set_micro_batches(m)
                    got = [r.token_ids for r in await asyncio.gather(*(e.complete(p, params) for p in prompts))]
                    assert got == expected, f"m={m}"

    asyncio.run(run())


def test_nccl_1a1f_cuda_graphs_bf16(tiny_dir, tmp_path):
    """Both sides replay CUDA graphs (bf16: grouped-GEMM experts are capturable): the tokens
    are those of the same deployment run eagerly (up to late near-tie flips, see
    tests/engine/test_graphs_gpu.py), and the step was replayed."""
    pytest.importorskip("cupy")
    pytest.importorskip("triton")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    model = str(tiny_dir["qwen3_moe"])
    path = _write_1a1f(tmp_path, "bfloat16", 512, 30.0, micro_batches=2,
                       scheduler="max_num_seqs = 16\nmax_num_batched_tokens = 64")
    prompts = [random_prompt(3 + 4 * i, 256, seed=i) for i in range(11)]
    params = [SamplingParams(max_tokens=8 + 2 * i, ignore_eos=True) for i in range(11)]

    async def run():
        cfg = EngineConfig.from_toml(path)
        out = {}
        with Deployment(path, model, start_attention=False) as dep:
            for graphs in (False, True):
                c = dataclasses.replace(cfg, deployment=dataclasses.replace(cfg.deployment, port=dep.port, token=dep.token),
                                        model=dataclasses.replace(cfg.model, cuda_graphs=graphs))
                async with Engine(model, c, progress=False) as e:
                    got = await asyncio.gather(*(e.complete(p, s) for p, s in zip(prompts, params)))
                    out[graphs] = ([r.token_ids for r in got], e._runner.graph_steps)
        return out

    out = asyncio.run(run())
    (eager, n0), (graphed, n1) = out[False], out[True]
    assert n0 == 0 and n1 > 0
    assert all(g[:4] == e[:4] for g, e in zip(graphed, eager))
    same = sum(a == b for g, e in zip(graphed, eager) for a, b in zip(g, e))
    assert same >= 0.9 * sum(map(len, eager)), f"{same} of {sum(map(len, eager))} tokens equal"


DEATH_TEST_BOUND_S = 300.0  # the whole death-and-rejoin scenario, in its own process


async def _death_and_rejoin(model: str, path: str, graphs: bool) -> None:
    from afkv.errors import RequestFailedError

    prompts = [random_prompt(6 + i, 256, seed=i) for i in range(3)]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    cfg = EngineConfig.from_toml(path)
    with Deployment(path, model, start_attention=False) as dep:
        cfg = dataclasses.replace(cfg, deployment=dataclasses.replace(cfg.deployment, port=dep.port, token=dep.token),
                                  model=dataclasses.replace(cfg.model, cuda_graphs=graphs))
        async with Engine(model, cfg, progress=False) as e:
            assert type(e._remote).__name__ == "RemoteFFN" and e._remote.graph_safe
            expected = [r.token_ids for r in await asyncio.gather(*(e.complete(p, params) for p in prompts))]
            assert (e._runner.graph_steps > 0) == graphs
            started = asyncio.Event()

            async def consume():
                async for _ in e.generate(prompts[0], SamplingParams(max_tokens=2000, ignore_eos=True)):
                    started.set()

            task = asyncio.create_task(consume())
            async with asyncio.timeout(60):
                await started.wait()
            t0 = time.monotonic()
            dep.kill_node(dep.expert_rank(0))
            with pytest.raises(RequestFailedError, match="expert"):
                async with asyncio.timeout(60):
                    await task
            assert time.monotonic() - t0 < cfg.deployment.expert_timeout_s + 15.0  # aborted, not hung
            graph_steps = e._runner.graph_steps
            dep.start_node(dep.expert_rank(0))
            dep.wait_ready("expert", 1)
            control = e._links
            async with asyncio.timeout(60):  # the control plane's probe joins the node again
                while control.dead:
                    await asyncio.sleep(0.1)
            before = (await control.request_all({"type": "stats"}, [0]))[0]["tokens"]
            async with asyncio.timeout(120):
                got = [r.token_ids for r in await asyncio.gather(*(e.complete(p, params) for p in prompts))]
            assert got == expected
            assert (await control.request_all({"type": "stats"}, [0]))[0]["tokens"] > before  # it serves again
            if graphs:  # replayed again: graphs captured on the new communicators
                assert e._runner.graph_steps > graph_steps
            kv = e.kv_manager
            assert kv.num_sequences == 0 and kv.pool.num_free_blocks == kv.pool.num_blocks - len(kv.device.scratch_blocks)


def _death_and_rejoin_process(model: str, path: str, graphs: bool) -> None:
    """The scenario's process (spawned): stack dumps while it runs long; SIGTERM unwinds it, so
    the Deployment stops its nodes."""
    import faulthandler
    import signal
    import sys

    faulthandler.dump_traceback_later(DEATH_TEST_BOUND_S / 3, repeat=True, file=sys.stderr)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
    asyncio.run(_death_and_rejoin(model, path, graphs))


@pytest.mark.parametrize("family,dtype,graphs", [("mixtral", "float32", False), ("qwen3_moe", "bfloat16", True)],
                         ids=["eager", "cuda-graphs"])
def test_nccl_expert_death_fails_fast_then_rejoins(tiny_dir, tmp_path, family, dtype, graphs):
    """A killed expert node: the step times out (communicators aborted), the requests fail with
    a RequestFailedError naming the expert node, within the timeout plus 15 s; a restarted node
    is joined again (asserted, bounded), serves (its token count grows), and the tokens are
    those of before (with CUDA graphs: replayed again on the new communicators).

    Runs in a spawned process bounded by DEATH_TEST_BOUND_S: a hang fails this test (after
    SIGTERM, which stops the nodes) instead of blocking the session."""
    pytest.importorskip("cupy")
    if graphs:
        pytest.importorskip("triton")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    import multiprocessing

    path = _write_1a1f(tmp_path, dtype, 256, 5.0, micro_batches=2)
    proc = multiprocessing.get_context("spawn").Process(
        target=_death_and_rejoin_process, args=(str(tiny_dir[family]), str(path), graphs))
    proc.start()
    proc.join(DEATH_TEST_BOUND_S)
    if proc.is_alive():
        proc.terminate()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join(30)
        pytest.fail(f"the death-and-rejoin scenario ran past {DEATH_TEST_BOUND_S:.0f} s (stack dumps in stderr)")
    assert proc.exitcode == 0, f"the scenario failed (exit code {proc.exitcode}): traceback in stderr"


def _write_gpu(tmp_path, attention: int, experts: int, extra: str = "", eplb: str = "",
               expert_devices: list[str] | None = None):
    """attention nodes on cuda:0, expert nodes on cuda:1 (every NCCL pair spans both GPUs)
    unless `expert_devices` places them."""
    path = tmp_path / f"gpu-{attention}a{experts}f.toml"
    path.write_text(f"""
[model]
dtype = "float32"
device = "cuda:0"
[kv]
block_size = 4
num_blocks = 256
[scheduler]
max_num_batched_tokens = 24
[deployment]
attention_nodes = {attention}
expert_nodes = {experts}
port = 0
attention_devices = {["cuda:0"] * attention}
expert_devices = {expert_devices or ["cuda:1"] * experts}
expert_timeout_s = 30.0
heartbeat_interval_s = 0.5
{extra}
{eplb}
""".replace("'", '"'))
    return path


def _gpu_colocated(model, cfg, prompts, params):
    async def run():
        colo = dataclasses.replace(cfg, deployment=None, eplb=dataclasses.replace(cfg.eplb, enabled=False))
        async with Engine(model, colo, progress=False) as e:
            return [r.token_ids for r in await asyncio.gather(*(e.complete(p, params) for p in prompts))]
    return asyncio.run(run())


@pytest.mark.parametrize("attention,experts,extra", [(1, 2, ""), (2, 2, ""), (1, 2, "dispatch_capacity = 0.125")],
                         ids=["1A2F", "2A2F", "1A2F-overflow"])
def test_nccl_per_peer_dispatch_matches_colocated(tiny_dir, tmp_path, attention, experts, extra):
    """Several expert nodes over NCCL: each receives only its rows (compacted on the device);
    overflowing capacities are computed again; tokens equal the colocated engine's."""
    pytest.importorskip("cupy")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    model = str(tiny_dir["mixtral"])
    path = _write_gpu(tmp_path, attention, experts, extra)
    prompts = [random_prompt(4 + 5 * i, 256, seed=i) for i in range(6)]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    cfg = EngineConfig.from_toml(path)
    expected = _gpu_colocated(model, cfg, prompts, params)

    async def run():
        with Deployment(path, model, start_attention=False) as dep:
            af = dataclasses.replace(cfg, deployment=dataclasses.replace(cfg.deployment, port=dep.port, token=dep.token))
            engines = [Engine(model, af, progress=False, attention_rank=i) for i in range(attention)]
            for e in engines:
                await e.start()
            try:
                assert type(engines[0]._remote).__name__ == "RemoteFFN" and engines[0]._remote.graph_safe
                for m in (1, 2):
                    for e in engines:
                        e.set_micro_batches(m)
                    got = await asyncio.gather(*(asyncio.gather(*(e.complete(p, params) for p in prompts))
                                                 for e in engines))
                    for per_engine in got:
                        assert [r.token_ids for r in per_engine] == expected, f"m={m}"
                return engines[0]._remote.overflows
            finally:
                for e in engines:
                    await e.aclose()

    overflows = asyncio.run(run())
    assert (overflows > 0) == bool(extra)


def _eplb_setup(tmp_path, **placing):
    """1A2F with 6 slots per expert node on a Zipf-routed checkpoint (`placing`: _write_gpu's
    extra / expert_devices) -> model, config path, config, prompts, params, colocated tokens."""
    pytest.importorskip("cupy")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from afkv.model.tiny import write_zipf_checkpoint

    model = str(write_zipf_checkpoint(tmp_path / "zipf", exponent=1.0, seed=1))
    path = _write_gpu(tmp_path, 1, 2, eplb="[eplb]\nenabled = true\nslots_per_node = 6\n", **placing)
    prompts = [random_prompt(6 + 3 * i, 256, seed=20 + i) for i in range(6)]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    cfg = EngineConfig.from_toml(path)
    return model, path, cfg, prompts, params, _gpu_colocated(model, cfg, prompts, params)


def test_nccl_eplb_replicas_and_live_rebalance(tmp_path):
    """EPLB on the NCCL data plane: replicas split on the device, a live rebalance copies
    experts between expert nodes, and the tokens stay those of the colocated engine."""
    model, path, cfg, prompts, params, expected = _eplb_setup(tmp_path)

    async def run():
        with Deployment(path, model, start_attention=False) as dep:
            af = dataclasses.replace(cfg, deployment=dataclasses.replace(cfg.deployment, port=dep.port, token=dep.token))
            async with Engine(model, af, progress=False) as e:
                assert type(e._remote).__name__ == "RemoteFFN" and e._remote.graph_safe
                first = [r.token_ids for r in await asyncio.gather(*(e.complete(p, params) for p in prompts))]
                running = [asyncio.create_task(e.complete(p, params)) for p in prompts]
                while e.stats().num_generated_tokens < len(prompts) * params.max_tokens + 10:
                    await asyncio.sleep(0.01)
                loads = await e.expert_loads()  # counted on the expert GPUs, inside their captured steps
                report = await e.rebalance()
                during = [r.token_ids for r in await asyncio.gather(*running)]
                after = [r.token_ids for r in await asyncio.gather(*(e.complete(p, params) for p in prompts))]
                stats = await e._links.request_all({"type": "stats"})
                return first, during, after, report, stats, loads

    first, during, after, report, stats, loads = asyncio.run(run())
    assert first == during == after == expected
    assert report.epoch == 1 and report.replicas_added > 0
    assert [s["epoch"] for s in stats] == [1, 1]
    assert sum(s["experts_received"] for s in stats) == report.replicas_added
    assert sum(s["nccl_received_bytes"] for s in stats) == 0  # both on cuda:1: copied over the control plane
    assert int(loads.sum()) > 0 and report.balancedness_after <= report.balancedness_before


def test_eplb_copies_experts_between_gpus_over_nccl(tmp_path):
    """Expert nodes on two GPUs: a live rebalance copies the gained experts GPU to GPU over
    NCCL (no host copy), and tokens stay those of the colocated engine. The attention node
    shares cuda:0 with expert node 0, so that pair's data plane is a host peer (NCCL needs one
    GPU per rank) and the other pair's NCCL: no CUDA graphs."""
    model, path, cfg, prompts, params, expected = _eplb_setup(tmp_path, expert_devices=["cuda:0", "cuda:1"])

    async def run():
        with Deployment(path, model, start_attention=False) as dep:
            af = dataclasses.replace(cfg, deployment=dataclasses.replace(cfg.deployment, port=dep.port, token=dep.token))
            async with Engine(model, af, progress=False) as e:
                assert type(e._remote).__name__ == "RemoteFFN" and not e._remote.graph_safe
                running = [asyncio.create_task(e.complete(p, params)) for p in prompts]
                while e.stats().num_generated_tokens < 20:
                    await asyncio.sleep(0.01)
                report = await e.rebalance()
                during = [r.token_ids for r in await asyncio.gather(*running)]
                after = [r.token_ids for r in await asyncio.gather(*(e.complete(p, params) for p in prompts))]
                stats = await e._links.request_all({"type": "stats"})
                return during, after, report, stats

    during, after, report, stats = asyncio.run(run())
    assert during == after == expected
    assert report.epoch == 1 and report.replicas_added > 0
    assert sum(s["experts_received"] for s in stats) == report.replicas_added
    assert [s["nccl_received_bytes"] for s in stats] == [s["received_bytes"] for s in stats]
    assert sum(s["nccl_received_bytes"] for s in stats) > 0
