import pytest
import torch

from afkv.eplb import zipf_loads, zipf_router_bias


def zipf(num_experts, exponent):
    weights = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** exponent
    return weights / weights.sum()


def test_zipf_loads_rows_are_permuted_zipf_summing_to_total():
    loads = zipf_loads(6, 32, 1.2, total_tokens=5000, seed=0)  # [6, 32]
    assert loads.shape == (6, 32) and loads.dtype == torch.float64
    assert torch.allclose(loads.sum(1), torch.full((6,), 5000.0, dtype=torch.float64))
    expected = 5000 * zipf(32, 1.2)
    for row in loads:
        assert torch.allclose(row.sort(descending=True).values, expected)
    assert len({tuple(row.argsort().tolist()) for row in loads}) > 1, "layers differ"


def test_zipf_loads_depend_only_on_seed():
    assert torch.equal(zipf_loads(3, 16, 1.0, 100, seed=5), zipf_loads(3, 16, 1.0, 100, seed=5))
    assert not torch.equal(zipf_loads(3, 16, 1.0, 100, seed=5), zipf_loads(3, 16, 1.0, 100, seed=6))


def test_exponent_zero_is_uniform():
    assert torch.allclose(zipf_loads(2, 8, 0.0, 80, seed=1), torch.full((2, 8), 10.0, dtype=torch.float64))


def test_router_bias_softmax_is_zipf():
    bias = zipf_router_bias(16, 1.0, seed=2)  # [16]
    assert bias.shape == (16,) and bias.dtype == torch.float32
    assert torch.allclose(bias.double().softmax(0).sort(descending=True).values, zipf(16, 1.0), atol=1e-6)
    assert torch.equal(zipf_router_bias(16, 1.0, seed=2), bias)


def test_skewed_router_concentrates_top1_routing():
    bias = zipf_router_bias(16, 1.2, seed=3)  # [16]
    logits = torch.randn(4096, 16, generator=torch.Generator().manual_seed(0)) + bias  # [T, E]
    counts = torch.bincount(logits.argmax(1), minlength=16)  # [E]
    assert counts.argmax() == bias.argmax()
    assert counts.max() > 3 * counts.float().mean()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: zipf_loads(2, 0, 1.0, 10, 0), "num_experts"),
        (lambda: zipf_loads(2, 8, -1.0, 10, 0), "exponent"),
        (lambda: zipf_loads(2, 8, 1.0, -10, 0), "total_tokens"),
        (lambda: zipf_loads(-1, 8, 1.0, 10, 0), "num_layers"),
        (lambda: zipf_router_bias(8, float("nan"), 0), "exponent"),
    ],
)
def test_rejects_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
