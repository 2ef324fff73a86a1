"""1A1F over NCCL on two GPUs: greedy tokens equal the colocated engine (tiny fp32 model)."""

import asyncio
import dataclasses
import os

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
            af = dataclasses.replace(cfg, deployment=dataclasses.replace(cfg.deployment, port=dep.port),
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
                c = dataclasses.replace(cfg, deployment=dataclasses.replace(cfg.deployment, port=dep.port),
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


@pytest.mark.skipif(os.environ.get("AFKV_GPU_FAULT_TEST") != "1",
                    reason="hung past 240 s on 2x H200 on 2026-11-29: the abort/rejoin path after a killed expert "
                           "node does not work yet (issue 4); AFKV_GPU_FAULT_TEST=1 runs it, with stack dumps")
def test_nccl_expert_death_fails_fast_then_recovers(tiny_dir, tmp_path):
    """A killed expert node: the step times out (communicators aborted), requests fail with a
    clear error, nothing hangs; a restarted node is joined again and tokens are unchanged."""
    pytest.importorskip("cupy")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    import faulthandler
    import sys
    import time

    faulthandler.dump_traceback_later(90, repeat=True, file=sys.stderr)  # where it hangs, if it does

    from afkv.errors import RequestFailedError

    model = str(tiny_dir["mixtral"])
    path = _write_1a1f(tmp_path, "float32", 256, 5.0, micro_batches=2)
    prompts = [random_prompt(6, 256, seed=i) for i in range(3)]
    params = SamplingParams(max_tokens=16, ignore_eos=True)

    async def run():
        cfg = EngineConfig.from_toml(path)
        with Deployment(path, model, start_attention=False) as dep:
            cfg = dataclasses.replace(cfg, deployment=dataclasses.replace(cfg.deployment, port=dep.port))
            async with Engine(model, cfg, progress=False) as e:
                expected = [r.token_ids for r in await asyncio.gather(*(e.complete(p, params) for p in prompts))]
                started = asyncio.Event()

                async def consume():
                    async for _ in e.generate(prompts[0], SamplingParams(max_tokens=2000, ignore_eos=True)):
                        started.set()

                task = asyncio.create_task(consume())
                await started.wait()
                t0 = time.monotonic()
                dep.kill_node(dep.expert_rank(0))
                with pytest.raises(RequestFailedError):
                    async with asyncio.timeout(60):
                        await task
                assert time.monotonic() - t0 < 5.0 + 15.0
                dep.start_node(dep.expert_rank(0))
                dep.wait_ready("expert", 1)
                got = [r.token_ids for r in await asyncio.gather(*(e.complete(p, params) for p in prompts))]
                assert got == expected

    try:
        asyncio.run(run())
    finally:
        faulthandler.cancel_dump_traceback_later()
