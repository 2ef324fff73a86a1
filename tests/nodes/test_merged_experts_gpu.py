"""Merged expert batching over NCCL: two attention nodes (engines on cuda:0, one process) feed
one expert node on cuda:1; its merged runs issue every member's receives and sends as one NCCL
group and capture each bundle shape as a CUDA graph. Greedy tokens equal colocated's."""

import asyncio
import dataclasses

import pytest
import torch

from afkv import Engine, EngineConfig, SamplingParams
from afkv.serve.launch import Deployment
from tests.helpers import random_prompt

pytestmark = pytest.mark.gpu


def test_nccl_2a1f_merged_matches_colocated(tiny_dir, tmp_path):
    pytest.importorskip("cupy")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    model = str(tiny_dir["mixtral"])
    path = tmp_path / "merged-gpu.toml"
    path.write_text("""
[model]
dtype = "float32"
device = "cuda:0"
[kv]
block_size = 4
num_blocks = 256
[scheduler]
max_num_batched_tokens = 24
[deployment]
attention_nodes = 2
expert_nodes = 1
port = 0
attention_devices = ["cuda:0", "cuda:0"]
expert_devices = ["cuda:1"]
expert_timeout_s = 30.0
expert_batching = "merged"
""")
    prompts = [random_prompt(4 + 5 * i, 256, seed=i) for i in range(6)]
    params = SamplingParams(max_tokens=16, ignore_eos=True)

    async def run():
        cfg = EngineConfig.from_toml(path)
        async with Engine(model, dataclasses.replace(cfg, deployment=None), progress=False) as e:
            expected = [r.token_ids for r in await asyncio.gather(*(e.complete(p, params) for p in prompts))]
        with Deployment(path, model, start_attention=False) as dep:
            af = dep.attached_config()
            engines = [Engine(model, af, progress=False, attention_rank=i) for i in range(2)]
            for e in engines:
                await e.start()
            try:
                before = (await engines[0]._links.request_all({"type": "stats"}))[0]
                for m in (1, 2):
                    for e in engines:
                        e.set_micro_batches(m)
                    async with asyncio.timeout(300):
                        results = await asyncio.gather(*(
                            asyncio.gather(*(e.complete(p, params) for p in prompts)) for e in engines))
                    for per_engine in results:
                        assert [r.token_ids for r in per_engine] == expected, f"m={m}"
                after = (await engines[0]._links.request_all({"type": "stats"}))[0]
                assert after["bundle_links"] - before["bundle_links"] > after["bundles"] - before["bundles"]
            finally:
                for e in engines:
                    await e.aclose()

    asyncio.run(run())
