"""Decode steps replayed as CUDA graphs give the tokens of eager steps (GPU machine)."""

import asyncio

import pytest
import torch

from afkv import Engine, EngineConfig, SamplingParams
from afkv.model.graphs import DecodeGraphs
from afkv.model.model import load_colocated
from tests.helpers import random_prompt

pytestmark = pytest.mark.gpu


def _config(graphs: bool, dtype: str) -> EngineConfig:
    return EngineConfig.from_dict({
        "model": {"dtype": dtype, "device": "cuda:0", "cuda_graphs": graphs},
        "kv": {"block_size": 4, "num_blocks": 512},
        "scheduler": {"max_num_seqs": 16, "max_num_batched_tokens": 64},
    })


@pytest.mark.parametrize("family,dtype", [("llama", "float32"), ("qwen3_moe", "bfloat16"), ("mixtral", "bfloat16")])
def test_graph_decode_tokens_equal_eager(tiny_dir, family, dtype):
    """float32 (a dense model: grouped GEMM is bf16-only): identical tokens. bf16 MoE: the padded
    batch changes GEMM shapes and the decode kernel's split count, so a near-tie may flip late in
    a sequence; the first tokens of every request match and almost all of the rest."""
    pytest.importorskip("triton")
    model = str(tiny_dir[family])
    # 13 sequences: buckets pad them to 16, and finished ones shrink the batch through smaller buckets
    prompts = [random_prompt(3 + 4 * i, 256, seed=i) for i in range(13)]
    params = [SamplingParams(max_tokens=8 + 2 * i, ignore_eos=True) for i in range(13)]

    async def run(graphs: bool):
        async with Engine(model, _config(graphs, dtype), progress=False) as e:
            out = await asyncio.gather(*(e.complete(p, s) for p, s in zip(prompts, params)))
            return [r.token_ids for r in out], e._runner.graph_steps

    eager, n0 = asyncio.run(run(False))
    graphed, n1 = asyncio.run(run(True))
    assert n0 == 0 and n1 > 0
    if dtype == "float32":
        assert graphed == eager
        return
    assert all(g[:4] == e[:4] for g, e in zip(graphed, eager))
    same = sum(a == b for g, e in zip(graphed, eager) for a, b in zip(g, e))
    assert same >= 0.9 * sum(map(len, eager)), f"{same} of {sum(map(len, eager))} tokens equal"


def test_padding_rows_do_not_change_logits(tiny_dir):
    """A batch of 5 replayed in the bucket of 8 gives the eager logits of those 5 rows, and the
    padding rows write only the scratch block."""
    pytest.importorskip("triton")
    from afkv.model.sides import SeqChunk, StepInputs

    dev = torch.device("cuda:0")
    model = load_colocated(tiny_dir["qwen3_moe"], dev, torch.bfloat16)
    spec = model.spec
    bs, nb = 4, 8
    kv = torch.randn(64, spec.num_layers, 2, bs, spec.num_kv_heads, spec.head_dim, device=dev).to(torch.bfloat16)
    scratch = 63
    graphs = DecodeGraphs(model, kv, max_batch=8, max_blocks=nb, scratch_block=scratch)
    ctx = [5, 9, 13, 2, 17]
    tables = [tuple(range(i * nb, i * nb + -(-c // bs))) for i, c in enumerate(ctx)]
    ids = [11, 22, 33, 44, 55]
    pos = [c - 1 for c in ctx]
    slot_b = [t[p // bs] for t, p in zip(tables, pos)]
    slot_o = [p % bs for p in pos]
    before = kv.clone()
    with torch.inference_mode():
        got = graphs.run(ids, pos, slot_b, slot_o, ctx, tables, 1).clone()
        after_graph = kv.clone()
        kv.copy_(before)
        t = lambda x: torch.tensor(x, device=dev)
        chunks = [SeqChunk(i, 1, c, t(list(tb))) for i, (c, tb) in enumerate(zip(ctx, tables))]
        inputs = StepInputs(t(ids), t(pos), t(slot_b), t(slot_o), chunks)
        want = model.attn.logits(model.forward(inputs, kv, 1))
    changed = (after_graph != before).flatten(1).any(1).nonzero().flatten().tolist()
    assert set(changed) <= set(slot_b) | {scratch}
    torch.testing.assert_close(after_graph[:scratch], kv[:scratch], rtol=2e-2, atol=2e-2)  # GEMMs of 8 vs 5 rows
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_fused_layer_kernels_match_torch_ops(tiny_dir, family):
    """The fused Triton kernels of a layer (norms, q/k norm + rotary + K/V write, routing,
    SiLU-and-multiply) give the logits and K/V of the torch compositions (bf16)."""
    pytest.importorskip("triton")
    from afkv.model.sides import SeqChunk, StepInputs

    dev = torch.device("cuda:0")
    fused = load_colocated(tiny_dir[family], dev, torch.bfloat16)
    plain = load_colocated(tiny_dir[family], dev, torch.bfloat16)
    assert fused.attn._tf is not None
    plain.attn._tf = None
    plain.ffn.ffn._tf = None
    spec = fused.spec
    kv = [torch.zeros(16, spec.num_layers, 2, 4, spec.num_kv_heads, spec.head_dim, dtype=torch.bfloat16, device=dev)
          for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (11,), generator=g).to(dev)
    pos = torch.arange(11, device=dev)
    table = torch.arange(3, device=dev)
    with torch.inference_mode():
        out = []
        for model, cache in zip((fused, plain), kv):
            inputs = StepInputs(ids, pos, table[pos // 4], pos % 4, [SeqChunk(0, 11, 11, table)])
            out.append(model.attn.logits(model.forward(inputs, cache, 1)))
    torch.testing.assert_close(out[0], out[1], rtol=2e-2, atol=2e-2)
    assert (out[0].argmax(-1) == out[1].argmax(-1)).float().mean() >= 0.9
    torch.testing.assert_close(kv[0], kv[1], rtol=2e-2, atol=2e-2)


def test_triton_moe_matches_grouped_gemm_path(tiny_dir):
    """The FFN side's Triton fused-MoE path gives the torch grouped-GEMM path's output (bf16)."""
    pytest.importorskip("triton")
    from afkv.model.model import load_ffn_side
    from afkv.model.spec import load_spec

    dev = torch.device("cuda:0")
    spec = load_spec(tiny_dir["qwen3_moe"])
    ffn = load_ffn_side(spec, tiny_dir["qwen3_moe"], dev, torch.bfloat16)
    assert ffn._moe is not None
    layer = next(i for i in range(spec.num_layers) if ffn.stacked[i] is not None)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(37, spec.hidden_size, generator=g, device=dev).to(torch.bfloat16)
    logits = torch.randn(37, spec.num_experts, generator=g, device=dev)
    w, ids = torch.softmax(logits, -1).topk(spec.top_k, -1)
    fast = ffn.forward(layer, x, ids, w)
    moe, ffn._moe = ffn._moe, None
    ref = ffn.forward(layer, x, ids, w)
    ffn._moe = moe
    scale = ref.abs().max()
    assert (fast - ref).abs().max() <= 2e-2 * scale
