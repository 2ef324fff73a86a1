"""Sampling through the engine: SamplingParams reach the sampler, and seeded requests draw
what the sampler draws on transformers' logits of the same tokens.

Oracle: transformers' forward pass on prompt + generated tokens gives the logits of every
step; every returned token must be in the set transformers' warpers keep for the request's
temperature, top-k and top-p, and afkv.ops.sampling (checked on its own against hand-computed
values in tests/ops/test_sampling.py) with the engine's generator for (seed, step) must pick the
token the engine returned. afkv's float32 logits differ from transformers' by ~1e-6, far
below what moves a draw across a boundary of the cumulative distribution for these seeds.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from afkv import Engine, EngineConfig, SamplingParams
from afkv.ops.sampling import row_generator, sample_tokens
from tests.helpers import hf_model, random_prompt

CASES = [  # temperature, top_k, top_p
    (1.0, 0, 1.0),
    (0.3, 0, 0.5),
    (2.0, 3, 1.0),
    (0.8, 20, 0.9),
    (1.5, 0, 0.6),
]


def _cfg(device: str = "cpu") -> EngineConfig:
    # float32 on the GPU too: the oracle's logits are float32 (bfloat16 logits would move draws)
    return EngineConfig.from_dict({"model": {"device": device, "dtype": "float32"},
                                   "kv": {"block_size": 4, "num_blocks": 128},
                                   "scheduler": {"max_num_batched_tokens": 32, "max_num_seqs": 16}})


def _kept_by_transformers(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """logits [V] -> bool [V]: the tokens transformers' warpers keep (temperature, top-k, top-p)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    x = TemperatureLogitsWarper(sp.temperature)(None, logits[None].clone())
    if sp.top_k:
        x = TopKLogitsWarper(sp.top_k)(None, x)
    if sp.top_p < 1.0:
        x = TopPLogitsWarper(sp.top_p)(None, x)
    return torch.isfinite(x[0])


def _check_against_transformers(tiny_dir, prompts, params, outs, device: torch.device) -> None:
    ref = hf_model(tiny_dir["mixtral"])
    p_inside = 1.0  # chance that unfiltered T=1 sampling stays inside every kept set
    for prompt, sp, out in zip(prompts, params, outs):
        with torch.no_grad():
            logits = ref(torch.tensor([prompt + out])).logits[0, len(prompt) - 1 : -1].float()  # [n, V]
        for step, tok in enumerate(out):
            kept = _kept_by_transformers(logits[step], sp)
            assert kept[tok], (sp, step)
            p_inside *= float(torch.softmax(logits[step], -1)[kept].sum())
            row = logits[step].to(device)
            gen = row_generator(sp.seed, step, device)
            assert sample_tokens(row[None], [(sp.temperature, sp.top_k, sp.top_p, gen)])[0].item() == tok, (sp, step)
    # the filters bite: sampling that ignored temperature, top_k and top_p would have left the
    # kept sets somewhere in these requests with probability >= 1 - p_inside
    assert p_inside < 1e-6, p_inside


async def _run(model_dir, prompts, params, device="cpu") -> tuple[list[list[int]], int]:
    """-> (tokens of each request, decode steps replayed as CUDA graphs)."""
    async with Engine(model_dir, _cfg(device), progress=False) as engine:
        done = await asyncio.gather(*(engine.complete(p, sp) for p, sp in zip(prompts, params)))
        return [r.token_ids for r in done], engine._runner.graph_steps


def _workload(n_tokens: int = 12):
    prompts = [random_prompt(5 + 3 * i, 256, seed=40 + i) for i in range(len(CASES))]
    params = [SamplingParams(max_tokens=n_tokens, temperature=t, top_k=k, top_p=p, seed=100 + i, ignore_eos=True)
              for i, (t, k, p) in enumerate(CASES)]
    return prompts, params


def test_seeded_requests_draw_what_the_sampler_draws_on_transformers_logits(tiny_dir):
    """Batched requests, each with its own temperature / top-k / top-p and seed."""
    prompts, params = _workload()
    outs, _ = asyncio.run(_run(tiny_dir["mixtral"], prompts, params))
    assert all(len(o) == 12 for o in outs)
    _check_against_transformers(tiny_dir, prompts, params, outs, torch.device("cpu"))


@pytest.mark.gpu
def test_seeded_sampling_on_the_gpu(tiny_dir):
    """CUDA generators: the engine on the GPU (float32, CUDA graphs on: decode steps are
    replayed) draws what the sampler draws with the same CUDA generators on transformers'
    logits, and the same requests alone draw the same tokens as in a batch."""
    dev = torch.device("cuda:0")
    prompts, params = _workload(10)
    outs, graph_steps = asyncio.run(_run(tiny_dir["mixtral"], prompts, params, "cuda:0"))
    assert graph_steps > 0
    _check_against_transformers(tiny_dir, prompts, params, outs, dev)
    alone = [asyncio.run(_run(tiny_dir["mixtral"], [p], [sp], "cuda:0"))[0][0] for p, sp in zip(prompts[:2], params[:2])]
    assert alone == outs[:2]
