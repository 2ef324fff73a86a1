"""Kernel curves: fits recover the figures that generated their points; bounds hold; links fit."""

import pytest

from afkv.errors import ConfigError
from afkv.plan.kernels import AttentionPoint, FfnPoint, Kernels, Link, LinkPoint, fit_kernels, fit_link
from afkv.plan.shapes import load_shapes

COPY, GEMM = 4.0e12, 7.0e14
TRUE = Kernels(COPY, GEMM, attn_floor_s=40e-6, kv_efficiency=0.8, ffn_floor_s=70e-6, expert_floor_s=1.5e-6,
               moe_flops_per_s=4.0e14)


def _points(sh, k: Kernels, layers: int = 4):
    attn = [AttentionPoint(n, c, layers, k.attention_step_s(sh, n, c, layers)) for n in (1, 8, 64) for c in (1024, 8192)]
    ffn = []
    for tokens in (1, 16, 256, 4096):
        for held in (sh.num_experts, sh.top_k):
            touched = min(held, sh.touched(tokens, held))
            pairs = tokens * sh.top_k
            ffn.append(FfnPoint(tokens, pairs, touched, 2, 2 * k.moe_s(sh, tokens, pairs, touched)))
    return attn, ffn


@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "mixtral-8x7b"])
def test_fits_recover_the_generating_figures(model):
    sh = load_shapes(model)
    attn, ffn = _points(sh, TRUE)
    fit = fit_kernels([(sh, attn, COPY)], [(sh, ffn, COPY)], COPY, GEMM)
    for name in ("attn_floor_s", "kv_efficiency", "ffn_floor_s", "expert_floor_s", "moe_flops_per_s"):
        assert getattr(fit, name) == pytest.approx(getattr(TRUE, name), rel=1e-6), name


def test_a_fit_times_bytes_at_the_new_ceiling():
    """Points measured at one copy ceiling, figures for a machine with another: floors and
    efficiencies carry over, the byte terms scale."""
    sh = load_shapes("mixtral-8x7b")
    attn, ffn = _points(sh, TRUE)
    fit = fit_kernels([(sh, attn, COPY)], [(sh, ffn, COPY)], COPY / 2, GEMM)
    assert fit.copy_bytes_per_s == COPY / 2
    assert fit.kv_efficiency == pytest.approx(TRUE.kv_efficiency)
    weights = 8 * sh.expert_bytes  # an all-experts layer: only its weight reads take longer
    assert fit.moe_s(sh, 64, 128, 8) == pytest.approx(TRUE.moe_s(sh, 64, 128, 8) + weights / (COPY / 2) - weights / COPY)


def test_bounds_no_read_beats_the_copy_ceiling_no_moe_beats_the_gemm_peak():
    """Points faster than the ceilings allow fit to the ceilings, never past them."""
    sh = load_shapes("mixtral-8x7b")
    fast = Kernels(COPY * 1.5, GEMM * 3, 0.0, 1.0, 0.0, 0.0, GEMM * 3)  # "measured" on a faster machine
    attn, ffn = _points(sh, fast)
    fit = fit_kernels([(sh, attn, COPY)], [(sh, ffn, COPY)], COPY, GEMM)
    assert fit.kv_efficiency == pytest.approx(1.0)
    assert fit.moe_flops_per_s == pytest.approx(GEMM)
    assert fit.attn_floor_s >= 0 and fit.ffn_floor_s >= 0 and fit.expert_floor_s >= 0


def test_too_few_points_is_a_config_error():
    sh = load_shapes("mixtral-8x7b")
    attn, ffn = _points(sh, TRUE)
    with pytest.raises(ConfigError, match="at least two attention points"):
        fit_kernels([(sh, attn[:1], COPY)], [(sh, ffn, COPY)], COPY, GEMM)
    with pytest.raises(ConfigError, match="at least three FFN points"):
        fit_kernels([(sh, attn, COPY)], [(sh, ffn[:2], COPY)], COPY, GEMM)


def test_link_fit_and_its_fallback():
    true = Link(20e-6, 400e9)
    pts = [LinkPoint(n, n, true.round_trip_s(n, n)) for n in (1 << 14, 1 << 20, 1 << 24)]
    fit = fit_link(pts)
    assert fit.latency_s == pytest.approx(true.latency_s) and fit.bytes_per_s == pytest.approx(true.bytes_per_s)
    flat = [LinkPoint(n, n, 50e-6) for n in (1 << 14, 1 << 20)]  # latency-bound: sizes do not show a bandwidth
    with pytest.raises(ConfigError, match="cannot fit a bandwidth"):
        fit_link(flat)
    fallback = fit_link(flat, 450e9)
    assert fallback.bytes_per_s == 450e9 and 0 < fallback.latency_s < 25e-6
