"""afkv.ops.triton_fused against the torch code each kernel replaces.

Skipped without triton (the CPU CI has none). With triton and no GPU, the kernels run on CPU
tensors under Triton's interpreter (TRITON_INTERPRET=1, set here before the module is
imported); with a GPU they run compiled on CUDA (marked gpu), where a CUDA-graph capture of
each is checked too.

Tolerances. Elementwise results are compared in units in the last place (ulps) of their dtype:
16-bit results must equal the reference in at least 99.9 % of elements (both round the same
float32 values; they differ only where a float32 intermediate computed differently, a sum's
order, rsqrt, exp, lies next to a rounding boundary) and be within 2 ulps everywhere (a
1-ulp intermediate times a second rounded op); float32 results within 16 ulps (interpreter:
at most 5 measured). Rotary outputs x * cos + rotate_half(x) * sin can cancel to near zero,
where a 1-ulp difference in a term is many ulps of the result: they are compared against
the magnitude of their head, |got - want| <= eps(dtype) * max|head|. Router weights: rtol
2e-6 (float32 softmax; interpreter: 2 ulps measured); ids exactly (distinct logits).
"""

from __future__ import annotations

import os

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernels are defined (at import)
pytest.importorskip("triton")

from afkv.ops import layers  # noqa: E402
from afkv.ops import triton_fused as tf  # noqa: E402
from afkv.ops.layers import Rotary  # noqa: E402

if not _CUDA and not type(tf._rms_norm_kernel).__name__.startswith("Interpreted"):
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1 was set: run with TRITON_INTERPRET=1", allow_module_level=True
    )

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(_CUDA, reason="the interpreter runs only where CUDA is absent")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not _CUDA, reason="needs a CUDA GPU")]),
]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
EPS = 1e-6


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """Float bits as int64 ordered like the values (so that neighbours differ by 1)."""
    if x.dtype == torch.float32:
        bits = x.view(torch.int32).to(torch.int64)
        return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)
    bits = x.view(torch.int16).to(torch.int64)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def _assert_ulps(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.isfinite(got).all()
    ulps = (_ordered(got.cpu()) - _ordered(want.cpu())).abs()
    if want.dtype == torch.float32:
        assert ulps.max() <= 16, f"max {int(ulps.max())} ulps"
    else:
        assert ulps.max() <= 2, f"max {int(ulps.max())} ulps"
        assert (ulps == 0).float().mean() >= 0.999, f"{int((ulps != 0).sum())} of {ulps.numel()} differ"


def _assert_head_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """got, want [..., D]: each head within eps(dtype) of its largest magnitude."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.isfinite(got).all()
    got, want = got.float().cpu(), want.float().cpu()
    scale = want.abs().amax(-1, keepdim=True) * torch.finfo(got.dtype if got.dtype != torch.float32 else want.dtype).eps
    assert ((got - want).abs() <= scale).all(), f"max {float(((got - want).abs() / scale).max()):.2f} x eps * |head|"


def _randn(shape, dtype, device, gen, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * scale).to(dtype).to(device)


# ----------------------------------------------------------------------------------------------
# rms_norm, add_rms_norm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens", [1, 5, 64])
@pytest.mark.parametrize("dim", [64, 2048])
def test_rms_norm(device, dtype, num_tokens, dim):
    gen = torch.Generator().manual_seed(num_tokens * 7 + dim)
    x = _randn((num_tokens, dim), dtype, device, gen, scale=3.0)
    weight = _randn(dim, dtype, device, gen, scale=0.1) + 1
    _assert_ulps(tf.rms_norm(x, weight, EPS), layers.rms_norm(x, weight, EPS))


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_views_and_mixed_dtypes(device):
    """A row-strided view, a [T, H, D] input, an 8192-wide row, a float32 weight on bfloat16 x
    (the product is promoted to float32, as in torch)."""
    gen = torch.Generator().manual_seed(1)
    big = _randn((5, 3000), torch.bfloat16, device, gen)
    x = big[:, 100:2148]  # [5, 2048], row stride 3000
    weight = _randn(2048, torch.bfloat16, device, gen) + 1
    _assert_ulps(tf.rms_norm(x, weight, EPS), layers.rms_norm(x, weight, EPS))
    heads = _randn((3, 4, 128), torch.bfloat16, device, gen)
    w128 = _randn(128, torch.bfloat16, device, gen) + 1
    _assert_ulps(tf.rms_norm(heads, w128, EPS), layers.rms_norm(heads, w128, EPS))
    wide = _randn((2, 8192), torch.float32, device, gen)
    w_wide = _randn(8192, torch.float32, device, gen)
    _assert_ulps(tf.rms_norm(wide, w_wide, EPS), layers.rms_norm(wide, w_wide, EPS))
    w32 = weight.float() + 0.001
    got, want = tf.rms_norm(x, w32, EPS), layers.rms_norm(x, w32, EPS)
    assert got.dtype == torch.float32
    _assert_ulps(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens", [1, 5, 64])
@pytest.mark.parametrize("dim", [64, 2048])
def test_add_rms_norm(device, dtype, num_tokens, dim):
    gen = torch.Generator().manual_seed(num_tokens * 5 + dim)
    h = _randn((num_tokens, dim), dtype, device, gen, scale=4.0)
    delta = _randn((num_tokens, dim), dtype, device, gen)
    weight = _randn(dim, dtype, device, gen, scale=0.1) + 1
    h_new, normed = tf.add_rms_norm(h, delta, weight, EPS)
    want_h, want_normed = tf.ref_add_rms_norm(h, delta, weight, EPS)
    assert torch.equal(h_new, want_h)  # one rounded float32 add in both
    _assert_ulps(normed, want_normed)


@pytest.mark.parametrize("device", DEVICES)
def test_norm_checks_shapes(device):
    x = torch.zeros(2, 64, device=device)
    with pytest.raises(Exception, match="norm weight"):
        tf.rms_norm(x, torch.ones(32, device=device), EPS)
    with pytest.raises(Exception, match="delta"):
        tf.add_rms_norm(x, x.half(), torch.ones(64, device=device), EPS)
    assert tf.rms_norm(torch.zeros(0, 64, device=device), torch.ones(64, device=device), EPS).shape == (0, 64)
