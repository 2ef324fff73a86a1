"""Each family against transformers on tiny random checkpoints (fp32)."""

import asyncio

import pytest
import torch

from afkv import Engine, EngineConfig, SamplingParams
from afkv.model.model import load_colocated
from afkv.model.sides import SeqChunk, StepInputs
from tests.conftest import FAMILIES
from tests.helpers import hf_greedy, hf_model, random_prompt, rel_err


def _paged_logits(model, ids: list[int], chunk_sizes: list[int], block_size: int = 4) -> torch.Tensor:
    """Run a prompt through afkv in chunks over a scrambled block table; logits of every position."""
    spec = model.spec
    num_blocks = -(-len(ids) // block_size) + 3
    kv = torch.full((num_blocks, spec.num_layers, 2, block_size, spec.num_kv_heads, spec.head_dim), float("nan"))
    table = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor(ids)
    outs, start = [], 0
    for n in chunk_sizes:
        pos = torch.arange(start, start + n)
        ctx = start + n
        inputs = StepInputs(tokens[start:ctx], pos, table[pos // block_size], pos % block_size,
                            [SeqChunk(0, n, ctx, table[: -(-ctx // block_size)])])
        with torch.no_grad():
            outs.append(model.attn.logits(model.forward(inputs, kv)))
        start = ctx
    assert start == len(ids)
    return torch.cat(outs)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tiny_dir, family):
    model = load_colocated(tiny_dir[family], torch.device("cpu"), torch.float32)
    ref_model = hf_model(tiny_dir[family])
    ids = random_prompt(45, model.spec.vocab_size, seed=1)
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0]  # [T, V]
    # one chunk, and chunked prefill with a decode-like tail: both must match
    for chunks in ([45], [13, 20, 11, 1]):
        got = _paged_logits(model, ids, chunks)
        assert not torch.isnan(got).any()
        assert rel_err(got, ref) <= 1e-4, (family, chunks, rel_err(got, ref))


@pytest.mark.parametrize("family", FAMILIES)
async def test_greedy_tokens_match_transformers_generate(tiny_dir, family):
    ref_model = hf_model(tiny_dir[family])
    prompts = [random_prompt(n, 256, seed=n) for n in (7, 30)]
    refs = [hf_greedy(ref_model, p, 32) for p in prompts]
    cfg = EngineConfig.from_dict({"kv": {"block_size": 4, "num_blocks": 64}, "scheduler": {"max_num_batched_tokens": 16}})
    async with Engine(tiny_dir[family], cfg) as engine:
        got = await asyncio.gather(*(engine.complete(p, SamplingParams(max_tokens=32, ignore_eos=True)) for p in prompts))
    for p, r, g in zip(prompts, refs, got):
        assert g.token_ids == r, family
        assert g.finish_reason == "length"


def test_routing_is_not_degenerate(tiny_dir):
    """Tiny MoE checkpoints route tokens to many experts (a test of the test data)."""
    model = load_colocated(tiny_dir["mixtral"], torch.device("cpu"), torch.float32)
    x = torch.randn(64, model.spec.hidden_size)
    r = model.attn.route(0, x)
    assert r.topk_ids.unique().numel() >= model.spec.num_experts // 2
    assert torch.allclose(r.topk_weights.sum(-1), torch.ones(64))  # Mixtral renormalises
