"""The grouped-GEMM expert path against the per-expert loop (all experts, and shards)."""

import pytest
import torch

from afkv.model.model import load_ffn_side
from afkv.model.spec import load_spec
from tests.helpers import rel_err


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("held", [None, frozenset({0, 3, 5})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_equals_per_expert(tiny_dir, family, held, dtype):
    spec = load_spec(tiny_dir[family])
    ffn = load_ffn_side(spec, tiny_dir[family], torch.device("cpu"), dtype, expert_ids=held)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, spec.hidden_size, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(spec.num_experts, generator=g)[: spec.top_k] for _ in range(37)])  # [T, k]
    w = torch.rand(37, spec.top_k, generator=g)
    layer = 0
    st = ffn.stacked[layer]
    assert st is not None
    grouped = ffn._grouped(st, x, ids, w)
    loop = ffn._per_expert(layer, x, ids, w)
    assert torch.isfinite(grouped).all()
    assert rel_err(grouped.float(), loop.float()) < (1e-6 if dtype == torch.float32 else 2e-2)
    if held is not None:  # tokens routed only to experts held elsewhere get exactly zero here
        none_held = ~torch.isin(ids, torch.tensor(sorted(held))).any(-1)
        assert none_held.any() and (grouped[none_held] == 0).all()


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
