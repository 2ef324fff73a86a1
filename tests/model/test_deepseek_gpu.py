"""DeepSeek-V2 / V3 on the GPU (tiny random checkpoints): the engine with CUDA graphs over the
Triton MLA decode kernel gives transformers' greedy tokens, and graph steps give eager steps'
tokens over the raw latent cache and the quantized latent device tiers (GPU machine).

Tolerances as tests/engine/test_graphs_gpu.py states them: float32 tokens equal, or a first
difference at a near-tie of transformers' logits (FP32_TIE); bfloat16 and quantized runs of
the same requests agree until a tie of their own logprobs.
"""

import asyncio

import pytest
import torch

from afkv import Engine, EngineConfig, SamplingParams
from tests.conftest import DEEPSEEK
from tests.helpers import hf_greedy, hf_model, random_prompt

pytestmark = pytest.mark.gpu

FP32_TIE = 1e-3  # tests/engine/test_graphs_gpu.py
BF16_TIE = 8 * 2.0**-6


def _config(graphs: bool, dtype: str, device_format: str = "auto") -> EngineConfig:
    return EngineConfig.from_dict({
        "model": {"dtype": dtype, "device": "cuda:0", "cuda_graphs": graphs},
        "kv": {"block_size": 4, "num_blocks": 512, "device_format": device_format},
        "scheduler": {"max_num_seqs": 16, "max_num_batched_tokens": 64},
    })


def _agree_until_a_tie(got, want, tie: float) -> None:
    """Completions (logprobs=2): tokens equal until each request's first difference, where each
    run ranked the other's token second within `tie`."""
    for g, w in zip(got, want):
        for i, (a, b) in enumerate(zip(g.token_ids, w.token_ids)):
            if a != b:
                assert b in g.top_logprobs[i] and g.top_logprobs[i][a] - g.top_logprobs[i][b] <= tie, (i, a, b)
                assert a in w.top_logprobs[i] and w.top_logprobs[i][b] - w.top_logprobs[i][a] <= tie, (i, a, b)
                break


@pytest.mark.parametrize("family", DEEPSEEK)
def test_gpu_engine_greedy_tokens_match_transformers(deepseek_dir, family):
    """float32 on the GPU with CUDA graphs (Triton MLA decode, absorbed prefill) against
    transformers' float32 generate on the CPU."""
    pytest.importorskip("triton")
    prompts = [random_prompt(4 + 5 * i, 256, seed=300 + i) for i in range(6)]
    params = SamplingParams(max_tokens=16, ignore_eos=True)

    async def run():
        async with Engine(str(deepseek_dir[family]), _config(True, "float32"), progress=False) as e:
            out = await asyncio.gather(*(e.complete(p, params) for p in prompts))
            return [r.token_ids for r in out], e._runner.graph_steps

    ours, graph_steps = asyncio.run(run())
    assert graph_steps > 0
    ref = hf_model(deepseek_dir[family])
    for prompt, got in zip(prompts, ours):
        want = hf_greedy(ref, prompt, len(got))
        if got == want:
            continue
        i = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        with torch.no_grad():
            logits = ref(torch.tensor([prompt + want[:i]])).logits[0, -1]  # [V]
        assert float(logits[want[i]] - logits[got[i]]) <= FP32_TIE, (prompt, i)


@pytest.mark.parametrize("family", DEEPSEEK)
@pytest.mark.parametrize("device_format", ["auto", "fp8", "int8"])
def test_graph_decode_equals_eager(deepseek_dir, family, device_format):
    """bfloat16, 13 sequences padded to graph buckets, over the raw latent cache or a quantized
    latent device tier (rows + staging blocks; padding rows write the scratch staging block)."""
    pytest.importorskip("triton")
    prompts = [random_prompt(3 + 4 * i, 256, seed=i) for i in range(13)]
    params = [SamplingParams(max_tokens=8 + 2 * i, ignore_eos=True, logprobs=2) for i in range(13)]

    async def run(graphs: bool):
        async with Engine(str(deepseek_dir[family]), _config(graphs, "bfloat16", device_format),
                          progress=False) as e:
            out = await asyncio.gather(*(e.complete(p, s) for p, s in zip(prompts, params)))
            if device_format != "auto":
                assert e.kv_manager.metrics.counters["quantized_blocks"] > 0
            return out, e._runner.graph_steps

    eager, n0 = asyncio.run(run(False))
    graphed, n1 = asyncio.run(run(True))
    assert n0 == 0 and n1 > 0
    _agree_until_a_tie(graphed, eager, BF16_TIE)
