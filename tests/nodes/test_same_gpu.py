"""One GPU: an attention node and an expert node on the same GPU, which NCCL refuses (one GPU
per rank), talk through host peers (afkv.transport.peer.peer_kind). Greedy tokens equal the
colocated engine's on the same GPU; the step is never captured in a CUDA graph on either
side (host peers are host work), and the expert node serves."""

import asyncio
import dataclasses

import pytest
import torch

from afkv import Engine, EngineConfig, SamplingParams
from afkv.serve.launch import Deployment
from tests.helpers import random_prompt

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("experts", [1, 2], ids=["1A1F", "1A2F"])
def test_same_gpu_host_peers_match_colocated(tiny_dir, tmp_path, experts):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    model = str(tiny_dir["qwen2_moe"])
    path = tmp_path / "same-gpu.toml"
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
port = 0
attention_devices = ["cuda:0"]
expert_devices = {["cuda:0"] * experts}
expert_timeout_s = 30.0
""".replace("'", '"'))
    prompts = [random_prompt(4 + 5 * i, 256, seed=i) for i in range(6)]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    cfg = EngineConfig.from_toml(path)

    async def run():
        async with Engine(model, dataclasses.replace(cfg, deployment=None), progress=False) as e:
            expected = [r.token_ids for r in await asyncio.gather(*(e.complete(p, params) for p in prompts))]
        with Deployment(path, model, start_attention=False) as dep:
            af = dataclasses.replace(cfg, deployment=dataclasses.replace(cfg.deployment, port=dep.port, token=dep.token))
            async with Engine(model, af, progress=False) as e:
                assert not e._remote.graph_safe and e._runner.graphs is None
                for m in (1, 2):
                    e.set_micro_batches(m)
                    got = [r.token_ids for r in await asyncio.gather(*(e.complete(p, params) for p in prompts))]
                    assert got == expected, f"m={m}"
                stats = await e._links.request_all({"type": "stats"})
                assert all(s["requests"] > 0 for s in stats)

    asyncio.run(run())
