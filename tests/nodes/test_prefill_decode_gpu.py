"""One GPU, PD: a prefill node and the decode node as two processes on the same GPU (and an
expert node there too). The rows leave the prefill node's GPU through pinned host memory
(KVManager.export_rows), cross as checked frames, and land in the decode node's GPU cache on
its worker (KVManager.receive); greedy tokens equal the colocated engine's on the same GPU,
and only the blocks the decode node lacks cross."""

import asyncio
import dataclasses

import pytest
import torch

from afkv import Engine, EngineConfig
from afkv.serve.launch import Deployment
from tests.nodes.test_prefill_decode import PARAMS, expected_transfers, prompts_with_shared_prefixes

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("experts", [0, 1], ids=["1P1D", "1P1D1E"])
def test_pd_on_one_gpu_matches_colocated(tiny_dir, tmp_path, experts):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    model = str(tiny_dir["qwen3_moe"])
    path = tmp_path / "pd-gpu.toml"
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
attention_nodes = 1
expert_nodes = {experts}
prefill_nodes = 1
port = 0
attention_devices = ["cuda:0"]
expert_devices = {["cuda:0"] * experts}
prefill_devices = ["cuda:0"]
expert_timeout_s = 30.0
prefill_timeout_s = 30.0
""".replace("'", '"'))
    prompts = prompts_with_shared_prefixes()
    cfg = EngineConfig.from_toml(path)

    async def run():
        async with Engine(model, dataclasses.replace(cfg, deployment=None), progress=False) as e:
            expected = [(await e.complete(p, PARAMS)).token_ids for p in prompts]
        with Deployment(path, model, start_attention=False) as dep:
            pd = dataclasses.replace(cfg, deployment=dataclasses.replace(cfg.deployment, port=dep.port, token=dep.token))
            async with Engine(model, pd, progress=False) as e:
                got = [(await e.complete(p, PARAMS)).token_ids for p in prompts]
                assert got == expected
                assert e.kv_metrics().counters["handoff_received_blocks"] == sum(expected_transfers(prompts))
                e.kv_manager.check_invariants()

    asyncio.run(run())
