"""afkv.ops.fp8: e4m3 block quantization (DeepSeek-V3's layout) and the torch reference of the
fused-MoE kernel's FP8 path.

Bounds: e4m3 keeps 3 mantissa bits, so rounding a normal value moves it by at most 2^-4 of
itself; below the smallest normal (2^-6 times the block scale) the grid is 2^-9 scales apart,
so by at most 2^-10 scales. Every check below is that bound, exactly.
"""

import pytest
import torch
import torch.nn.functional as F

from afkv.errors import ConfigError
from afkv.ops import fp8


def _bound(w: torch.Tensor, scale_full: torch.Tensor) -> torch.Tensor:
    return w.abs() * 2.0**-4 + scale_full * 2.0**-10


def _full(scale: torch.Tensor, shape) -> torch.Tensor:
    return scale.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]


@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (64, 48), (1, 1)])
def test_quantize_blocks_round_trip_within_half_a_step(shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * torch.rand(shape, generator=g) ** 4  # wide dynamic range
    q, scale = fp8.quantize_blocks(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale.dtype == torch.float32 and tuple(scale.shape) == fp8.scale_shape(*shape)
    back = fp8.dequantize_blocks(q, scale)
    assert ((back - w).abs() <= _bound(w, _full(scale, shape))).all()
    # each block's largest magnitude lands on 448 exactly
    blocks = F.pad(q.float().abs(), (0, -shape[1] % 128, 0, -shape[0] % 128))
    amax = blocks.view(scale.shape[0], 128, scale.shape[1], 128).amax(dim=(1, 3))
    assert (amax == fp8.FP8_MAX).all()


def test_quantizing_dequantized_weights_gives_the_same_fp8_values():
    """What FFNSide.expert_weights hands out (dequantized, float32) quantizes back to the same
    fp8 values and scales within one float32 step (EPLB moves fp8 experts this way)."""
    w = torch.randn(260, 130, generator=torch.Generator().manual_seed(1))
    q, scale = fp8.quantize_blocks(w)
    q2, scale2 = fp8.quantize_blocks(fp8.dequantize_blocks(q, scale))
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8))
    torch.testing.assert_close(scale2, scale, rtol=2.0**-23, atol=0)


def test_zero_blocks_stay_zero():
    w = torch.zeros(130, 140)
    w[129, 139] = 3.0
    q, scale = fp8.quantize_blocks(w)
    assert (scale > 0).all()
    back = fp8.dequantize_blocks(q, scale)
    assert torch.equal(back, w)


def test_dequantize_with_other_blocks_and_bad_scales():
    q, scale = fp8.quantize_blocks(torch.randn(256, 256))
    with pytest.raises(ConfigError):
        fp8.dequantize_blocks(q, scale[:1])
    # a checkpoint with 64 x 256 blocks: each scale covers its own rows
    s = torch.tensor([[2.0], [3.0], [5.0], [7.0]])
    ones = torch.ones(256, 256).to(torch.float8_e4m3fn)
    got = fp8.dequantize_blocks(ones, s, torch.float32, (64, 256))
    assert torch.equal(got[:, 0], torch.tensor([2.0, 3.0, 5.0, 7.0]).repeat_interleave(64))


def test_quantize_groups_rounds_each_row_group_on_its_own():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 300, generator=g)
    x[2, 128:256] *= 1e-3  # one quiet group: its own scale keeps it precise
    got = fp8.quantize_groups(x)
    groups = F.pad(x, (0, 84)).view(5, 3, 128)
    scale = (groups.abs().amax(-1) / fp8.FP8_MAX).repeat_interleave(128, 1)[:, :300]  # [5, 300]
    assert ((got - x).abs() <= _bound(x, scale)).all()
    assert ((got[2, 128:256] - x[2, 128:256]).abs() <= x[2, 128:256].abs() * 2.0**-4 + 1e-9).all()
    assert torch.equal(fp8.quantize_groups(torch.zeros(2, 130)), torch.zeros(2, 130))


def test_moe_reference_against_a_plain_loop():
    """The reference equals an independent per-token computation on the dequantized operands."""
    g = torch.Generator().manual_seed(3)
    num_experts, hidden, inter, top_k, tokens = 5, 200, 136, 2, 9
    held = [0, 2, 3]
    local = torch.tensor([0, 3, 1, 2, 3, 3])  # expert 1 not held; id 5 = padding
    gate_up = torch.randn(len(held), 2 * inter, hidden, generator=g) / hidden**0.5
    down = torch.randn(len(held), hidden, inter, generator=g) / inter**0.5
    qg = [fp8.quantize_blocks(w[:inter]) for w in gate_up]
    qu = [fp8.quantize_blocks(w[inter:]) for w in gate_up]
    qd = [fp8.quantize_blocks(w) for w in down]
    gu_q = torch.stack([torch.cat([a[0], b[0]]) for a, b in zip(qg, qu)])
    gu_s = torch.stack([torch.cat([a[1], b[1]]) for a, b in zip(qg, qu)])
    dn_q, dn_s = torch.stack([q for q, _ in qd]), torch.stack([s for _, s in qd])
    x = torch.randn(tokens, hidden, generator=g)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(tokens)])
    ids[3, 1] = num_experts
    w = torch.rand(tokens, top_k, generator=g)
    got = fp8.moe_mlp_reference(x, ids, w, local, gu_q, gu_s, dn_q, dn_s)
    want = torch.zeros(tokens, hidden, dtype=torch.float64)
    for t in range(tokens):
        for j in range(top_k):
            e = int(local[ids[t, j]])
            if e == len(held):
                continue
            h = fp8.quantize_groups(x[t]).double() @ fp8.dequantize_gate_up(gu_q[e], gu_s[e]).double().T
            act = F.silu(h[:inter]) * h[inter:]
            want[t] += w[t, j] * (fp8.quantize_groups(act.float()).double() @ fp8.dequantize_blocks(dn_q[e], dn_s[e]).double().T)
    assert float((got.double() - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert (got[ids.eq(1).all(-1) | ids.eq(num_experts).all(-1)] == 0).all()


def test_quantize_blocks_of_a_stack_equals_each_matrix():
    w = torch.randn(3, 200, 260, generator=torch.Generator().manual_seed(4))
    q, scale = fp8.quantize_blocks(w)
    assert q.shape == w.shape and scale.shape == (3, 2, 3)
    for i in range(3):
        qi, si = fp8.quantize_blocks(w[i])
        assert torch.equal(q[i].view(torch.uint8), qi.view(torch.uint8)) and torch.equal(scale[i], si)
