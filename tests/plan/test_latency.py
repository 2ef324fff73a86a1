"""The step model's arithmetic on synthetic profiles with known answers, and the closed-form r*."""

import dataclasses
import itertools
import math
import random

import pytest

from afkv.plan.builtin import builtin_profile
from afkv.plan.kernels import Kernels, Link
from afkv.plan.latency import (AnalyticTerms, Deployment, Kind, af_step, analytic_terms, colocated_step, r_star, split,
                               step)
from afkv.plan.profile import AfRuntime, KVFormatCost
from afkv.plan.shapes import load_shapes

K = Kernels(4.0e12, 7.0e14, attn_floor_s=40e-6, kv_efficiency=0.8, ffn_floor_s=70e-6, expert_floor_s=0.0,
            moe_flops_per_s=4.0e14)
LINK = Link(20e-6, 400e9)
BF16 = KVFormatCost("auto", 1.0, 1.0)
MIX = load_shapes("mixtral-8x7b")  # 32 MoE layers, 8 experts, top-2, no shared expert, no dense layer
CTX = 2049


def _f(sh, n, held=None):
    held = held or sh.num_experts
    return K.moe_s(sh, n, n * sh.top_k * held / sh.num_experts, sh.touched(n, held))


def _rt(sh, n, overhead):
    return overhead + LINK.round_trip_s(n * (sh.hidden_size * 2 + sh.top_k * 8), n * sh.hidden_size * 2)


def test_split_is_even_and_never_empty():
    assert split(10, 4) == [3, 3, 2, 2] and split(3, 4) == [1, 1, 1] and split(7, 1) == [7]


def test_colocated_is_attention_plus_experts_per_layer():
    s = colocated_step(MIX, K, 64, CTX, BF16)
    a, f = K.attention_s(MIX, 64, CTX), _f(MIX, 64)
    assert s.tpot_s == pytest.approx(32 * (a + f) + K.head_s(MIX, 64))
    assert s.bound == "FFN" and s.comm_s == 0


def test_one_a_one_f_with_one_micro_batch_is_the_sum_of_the_five_terms():
    """m = 1: T = T_attn + T_A->F + T_ffn + T_F->A per layer (the round trip carries both ways),
    whatever the overlap, plus the step's own overhead and the lm_head."""
    af = AfRuntime(round_trip_overhead_s=100e-6, step_overhead_s=1e-3)
    a, f, rt = K.attention_s(MIX, 64, CTX), _f(MIX, 64), _rt(MIX, 64, 100e-6)
    want = 1e-3 + K.head_s(MIX, 64) + 32 * (a + rt + f)
    for overlap in (0.0, 0.5, 1.0):
        s = af_step(MIX, K, LINK, dataclasses.replace(af, overlap=overlap), 1, 1, 1, 64, CTX, BF16)
        assert s.tpot_s == pytest.approx(want)
    assert s.comm_s == pytest.approx(32 * rt) and s.ffn_s == pytest.approx(32 * f)


def test_serial_and_pingpong_micro_batches():
    """m = 2: serial pays both chains; ping-pong is MegaScale-Infer's
    (a + f + rt) + (m L - 1) max(a, f) when m max(a, f) covers one round trip."""
    af = AfRuntime(round_trip_overhead_s=50e-6)
    n = 128
    a, f, rt = K.attention_s(MIX, n // 2, CTX), _f(MIX, n // 2), _rt(MIX, n // 2, 50e-6)
    head = K.head_s(MIX, n)
    serial = af_step(MIX, K, LINK, dataclasses.replace(af, overlap=0.0), 1, 1, 2, n, CTX, BF16).tpot_s
    assert serial == pytest.approx(head + 32 * 2 * (a + rt + f))
    assert 2 * max(a, f) >= a + f + rt  # the ping-pong condition holds here
    pp = af_step(MIX, K, LINK, dataclasses.replace(af, overlap=1.0), 1, 1, 2, n, CTX, BF16)
    assert pp.tpot_s == pytest.approx(head + (a + f + rt) + (2 * 32 - 1) * max(a, f))
    assert pp.bound == "FFN"
    half = af_step(MIX, K, LINK, dataclasses.replace(af, overlap=0.5), 1, 1, 2, n, CTX, BF16).tpot_s
    assert half == pytest.approx((serial + pp.tpot_s) / 2)


def test_expert_batching_per_attention_node_against_merged():
    """Eight attention nodes on one expert node: run apart, the expert reads its weights eight
    times per layer and bounds the step; merged, once for all their rows."""
    n, r = 32, 8
    apart = AfRuntime(overlap=1.0, expert_batching="per_attention_node")
    s = af_step(MIX, K, LINK, apart, r, 1, 1, n, CTX, BF16)
    assert s.bound == "FFN"
    assert s.tpot_s == pytest.approx(K.head_s(MIX, n) + 32 * r * _f(MIX, n))
    merged = af_step(MIX, K, LINK, dataclasses.replace(apart, expert_batching="merged"), r, 1, 1, n, CTX, BF16)
    chain = K.attention_s(MIX, n, CTX) + _rt(MIX, n, 0.0) + _f(MIX, r * n)
    assert merged.tpot_s == pytest.approx(K.head_s(MIX, n) + 32 * chain)


def test_expert_nodes_split_experts_and_rows():
    """Two expert nodes: each holds 4 of 8 experts and gets the tokens with a pair there."""
    n = 64
    s = af_step(MIX, K, LINK, AfRuntime(), 1, 2, 1, n, CTX, BF16)
    rows = n * (1 - math.comb(4, 2) / math.comb(8, 2))
    rt = LINK.round_trip_s(2 * rows * (MIX.hidden_size * 2 + 16), 2 * rows * MIX.hidden_size * 2)
    want = K.head_s(MIX, n) + 32 * (K.attention_s(MIX, n, CTX) + rt + _f(MIX, n, held=4))
    assert s.tpot_s == pytest.approx(want)


def test_quantized_kv_costs_its_read_rate():
    slow = KVFormatCost("int8", 0.5, 0.25)  # half the bytes, read 4x slower: as 2x the context in bf16
    assert colocated_step(MIX, K, 16, CTX, slow).tpot_s == pytest.approx(colocated_step(MIX, K, 16, 2 * CTX, BF16).tpot_s)


def test_expert_parallel_is_attention_all_to_all_and_local_experts():
    g, n = 8, 32
    s = step(MIX, K, LINK, AfRuntime(), Deployment(Kind.EP, g), n, CTX, BF16)
    remote = n * 2 * (g - 1) / g
    rt = LINK.round_trip_s(remote * (MIX.hidden_size * 2 + 8), remote * MIX.hidden_size * 2)
    f = K.moe_s(MIX, n, g * n * 2 * 1 / 8, MIX.touched(g * n, 1))
    assert s.tpot_s == pytest.approx(K.head_s(MIX, n) + 32 * (K.attention_s(MIX, n, CTX) + rt + f))


# ---- the closed form of rA-1F ---------------------------------------------------------------
def test_closed_form_r_star_is_the_argmax_of_its_throughput():
    rng = random.Random(0)
    for _ in range(300):
        t = AnalyticTerms(t_attn_s=rng.uniform(1e-3, 0.1), t_comm_s=rng.uniform(1e-4, 0.05),
                          t_ffn0_s=rng.uniform(1e-3, 0.05), beta_s=rng.uniform(1e-6, 1e-4), seqs=rng.randint(1, 512))
        _, best, _ = r_star(t)
        brute = max(range(1, 2000), key=t.throughput)
        assert t.throughput(best) == pytest.approx(t.throughput(brute), rel=1e-12), (t, best, brute)


def test_closed_form_regimes():
    base = dict(t_comm_s=0.0, beta_s=1e-5, seqs=100)  # beta B = 1 ms per attention instance
    assert r_star(AnalyticTerms(t_attn_s=0.050, t_ffn0_s=0.004, **base))[2] == "attention"  # r_A = 46 > sqrt(4)
    assert r_star(AnalyticTerms(t_attn_s=0.005, t_ffn0_s=0.016, **base))[:3:2] == (4.0, "FFN")  # sqrt(16)
    comm = dict(base, t_comm_s=0.060)
    assert r_star(AnalyticTerms(t_attn_s=0.010, t_ffn0_s=0.004, **comm))[:3:2] == (pytest.approx(56.0), "communication")


# the full model under the analytic model's assumptions (one expert launch per layer for all
# attention nodes, ideal ping-pong, every micro-batch reaching almost every expert): its best r
# by brute force agrees with the closed form
AGREE = [("mixtral-8x7b", 32, 4096, 2), ("mixtral-8x7b", 128, 4096, 4), ("mixtral-8x7b", 16, 32768, 4),
         ("mixtral-8x7b", 256, 2048, 2), ("qwen3-30b-a3b", 128, 4096, 2), ("qwen3-30b-a3b", 256, 2048, 4),
         ("qwen3-30b-a3b", 64, 32768, 4)]


def _brute_r(sh, k, profile, af, seqs, context, m, r_max=64):
    x = {r: r * seqs / ((r + 1) * af_step(sh, k, profile.link, af, r, 1, m, seqs, context, BF16).tpot_s)
         for r in range(1, r_max + 1)}
    return max(x, key=x.get), x


@pytest.mark.parametrize("model,seqs,context,m", AGREE)
def test_full_model_agrees_with_the_closed_form_where_its_assumptions_hold(model, seqs, context, m):
    p = builtin_profile("h200")
    sh = load_shapes(model)
    k, _ = p.kernels(sh)
    af = dataclasses.replace(p.af, overlap=1.0, expert_batching="merged")
    _, r_cf, _ = r_star(analytic_terms(sh, k, p.link, af, seqs, context, m, BF16))
    r_bf, x = _brute_r(sh, k, p, af, seqs, context, m)
    assert abs(r_cf - r_bf) <= 1 and x[r_cf] >= 0.99 * x[r_bf]


def test_the_closed_form_does_not_describe_afkv_today():
    """Expert nodes that run each attention node's rows apart read the weights r times: adding
    attention nodes does not amortize them, and the best r stays at 1-2 where the closed form
    (one read for all) says several."""
    p = builtin_profile("h200")
    for model, seqs, context in itertools.product(("mixtral-8x7b", "qwen3-30b-a3b"), (32, 128), (4096,)):
        sh = load_shapes(model)
        k, _ = p.kernels(sh)
        _, r_cf, _ = r_star(analytic_terms(sh, k, p.link, p.af, seqs, context, 2, BF16))
        r_bf, _ = _brute_r(sh, k, p, p.af, seqs, context, 2)
        assert r_bf <= 2 < r_cf
