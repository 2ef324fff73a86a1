"""The FFN side's expert paths (grouped GEMM, per-expert loop, shards) against transformers'
MoE block on the same checkpoint.

Oracle: the decoder layer's MoE block of transformers (its router, its eager per-expert loop
(experts_implementation="eager"), and Qwen2-MoE's gated shared expert), fed the post-attention
norm of the same hidden states; afkv's attention side routes and its FFN side computes.
"""

import pytest
import torch

from afkv.model.model import load_attention_side, load_ffn_side
from afkv.model.spec import load_spec
from tests.helpers import rel_err

# float32: both sides compute the same products in float32; a sum over the hidden size (64) and
# the intermediate size (<= 48) in another order is within (64 + 48) x 2^-24 ~ 7e-6 of max |y|.
TOL_FLOAT32 = 1e-5
# bfloat16 against the float32 block: x, the weights, the activations and the output are each
# rounded once to bfloat16 (<= 2^-9 relative each), four roundings: 4 x 2^-9, doubled for the
# growth of rounding errors through the two GEMMs relative to max |y|: 2^-6 ~ 0.016 (measured 0.006-0.008).
TOL_BFLOAT16 = 2.0**-6


def _transformers_block(model_dir, layer: int):
    """(post-attention norm, MoE block) of one decoder layer of transformers' model."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                              experts_implementation="eager").eval()
    decoder = model.model.layers[layer]
    return decoder.post_attention_layernorm, decoder.mlp


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("path", ["grouped", "per-expert"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_expert_paths_match_transformers_moe_block(tiny_dir, family, path, dtype):
    spec = load_spec(tiny_dir[family])
    layer = 0
    assert spec.sparse_layers[layer]
    norm, block = _transformers_block(tiny_dir[family], layer)
    h = torch.randn(37, spec.hidden_size, generator=torch.Generator().manual_seed(0))  # [T, H]
    x = norm(h)  # [T, H]
    want = block(x[None])[0]  # [T, H]
    _, hf_weights, hf_ids = block.gate(x)  # [T, k]

    _, attn = load_attention_side(tiny_dir[family], torch.device("cpu"), torch.float32)
    routed = attn.route(layer, h)
    assert rel_err(routed.x, x) < TOL_FLOAT32
    order = routed.topk_ids.argsort(-1)
    assert torch.equal(routed.topk_ids.gather(1, order), hf_ids.sort(-1).values)
    torch.testing.assert_close(routed.topk_weights.gather(1, order), hf_weights.gather(1, hf_ids.argsort(-1)),
                               atol=1e-6, rtol=1e-5)

    ffn = load_ffn_side(spec, tiny_dir[family], torch.device("cpu"), dtype)
    ffn.grouped = path == "grouped" and ffn.grouped
    assert ffn.grouped == (path == "grouped")  # torch._grouped_mm runs on this CPU
    got = ffn.forward(layer, routed.x.to(dtype), routed.topk_ids, routed.topk_weights)  # [T, H]
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert rel_err(got.float(), want) < (TOL_FLOAT32 if dtype == torch.float32 else TOL_BFLOAT16)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
@torch.no_grad()
def test_expert_shards_add_up_to_transformers_moe_block(tiny_dir, family):
    """Two expert nodes' shards (experts {0, 3, 5} with the shared expert, and the rest without
    it) sum to the block; tokens routed to none of a shard's experts get exactly zero there."""
    spec = load_spec(tiny_dir[family])
    norm, block = _transformers_block(tiny_dir[family], 0)
    h = torch.randn(37, spec.hidden_size, generator=torch.Generator().manual_seed(1))  # [T, H]
    want = block(norm(h)[None])[0]  # [T, H]
    _, attn = load_attention_side(tiny_dir[family], torch.device("cpu"), torch.float32)
    routed = attn.route(0, h)
    held = frozenset({0, 3, 5})
    rest = frozenset(range(spec.num_experts)) - held
    first = load_ffn_side(spec, tiny_dir[family], torch.device("cpu"), torch.float32, expert_ids=held)
    second = load_ffn_side(spec, tiny_dir[family], torch.device("cpu"), torch.float32, expert_ids=rest,
                           dense_layers=frozenset())
    parts = [ffn.forward(0, routed.x, routed.topk_ids, routed.topk_weights) for ffn in (first, second)]  # [T, H] each
    assert rel_err(parts[0] + parts[1], want) < TOL_FLOAT32
    none_held = ~torch.isin(routed.topk_ids, torch.tensor(sorted(rest))).any(-1)  # [T]
    assert none_held.any() and (parts[1][none_held] == 0).all()


def test_padding_rows_name_no_expert(tiny_dir):
    """Rows routed to expert id num_experts (dispatch padding) contribute exactly zero."""
    spec = load_spec(tiny_dir["qwen3_moe"])
    ffn = load_ffn_side(spec, tiny_dir["qwen3_moe"], torch.device("cpu"), torch.float32)
    x = torch.randn(8, spec.hidden_size)
    ids = torch.randint(0, spec.num_experts, (8, spec.top_k))
    w = torch.rand(8, spec.top_k)
    ids[5:] = spec.num_experts
    w[5:] = 0
    y = ffn._grouped(ffn.stacked[0], x, ids, w)
    assert torch.isfinite(y).all() and (y[5:] == 0).all()
    assert rel_err(y[:5], ffn._grouped(ffn.stacked[0], x[:5], ids[:5], w[:5])) < 1e-6
