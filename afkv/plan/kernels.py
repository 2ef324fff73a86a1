"""Per-layer kernel times of one software stack on one GPU kind, fitted to calibration points.

Each side's time is a roofline with a floor: bytes over the HBM copy ceiling (measured), FLOPs
over a compute rate, plus fixed costs the bytes and FLOPs do not explain (kernel launches inside
a CUDA graph, small grids). Per decoder layer, for one micro-batch:

    attention(n seqs, c cached tokens each)
        = attn_floor + (W_attn + n * c * kv / kv_efficiency) / copy + n * F_attn / gemm
    head(n) = W_head / copy + n * F_head / gemm                      (once per step: lm_head)
    moe(tokens, pairs, touched experts)
        = ffn_floor + touched * (W_expert / copy + expert_floor) + pairs * F_pair / moe_flops
          (+ the shared expert: W_shared / copy + tokens * F_shared / moe_flops)
    dense(tokens) = ffn_floor + W_dense / copy + tokens * F_dense / moe_flops

Fitted (non-negative least squares on relative error): attn_floor and kv_efficiency from
attention-only step times; ffn_floor, expert_floor and moe_flops from FFN-only times. Bounds:
kv_efficiency <= 1 (no read beats the copy ceiling), moe_flops <= gemm (no grouped GEMM beats
the dense GEMM peak). Not fitted: copy (a measured copy), gemm (a measured GEMM or a stated
figure), the bytes and FLOPs (afkv.plan.shapes).

With every point at one context, `kv_efficiency` also absorbs per-sequence costs (the two are
proportional there); calibrating at several contexts (afkv bench calibrate) separates them.
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass

import numpy as np

from afkv.errors import ConfigError
from afkv.plan.shapes import Shapes


@dataclass(frozen=True)
class AttentionPoint:
    """An attention-only decode step (the FFN returns zeros): `seqs` sequences attending to
    `context` tokens each, through `layers` layers and the lm_head, in `seconds`."""

    seqs: int
    context: int
    layers: int
    seconds: float


@dataclass(frozen=True)
class FfnPoint:
    """FFN work alone: `layers` MoE layers, each over `tokens` rows holding `pairs` (token, expert)
    pairs that reach `touched` distinct experts, in `seconds`."""

    tokens: int
    pairs: float
    touched: float
    layers: int
    seconds: float


@dataclass(frozen=True)
class Kernels:
    copy_bytes_per_s: float
    gemm_flops_per_s: float
    attn_floor_s: float
    kv_efficiency: float
    ffn_floor_s: float
    expert_floor_s: float
    moe_flops_per_s: float

    def attention_s(self, sh: Shapes, seqs: float, context: float) -> float:
        """One layer's attention side for one micro-batch (seconds)."""
        kv = seqs * context * sh.kv_bytes_per_token_layer / self.kv_efficiency
        return self.attn_floor_s + (sh.attn_layer_bytes + kv) / self.copy_bytes_per_s + \
            seqs * sh.attn_layer_flops_per_token / self.gemm_flops_per_s

    def head_s(self, sh: Shapes, seqs: float) -> float:
        return sh.head_bytes / self.copy_bytes_per_s + seqs * sh.head_flops_per_token / self.gemm_flops_per_s

    def attention_step_s(self, sh: Shapes, seqs: float, context: float, layers: int | None = None) -> float:
        """An attention-only step: every layer and the lm_head."""
        return (sh.num_layers if layers is None else layers) * self.attention_s(sh, seqs, context) + self.head_s(sh, seqs)

    def moe_s(self, sh: Shapes, tokens: float, pairs: float, touched: float, shared: bool = True) -> float:
        """One MoE layer on one node: `pairs` routed pairs over `touched` experts, and the shared
        expert over all `tokens` when this node holds it."""
        t = self.ffn_floor_s + touched * (sh.expert_bytes / self.copy_bytes_per_s + self.expert_floor_s) + \
            pairs * sh.expert_flops_per_pair / self.moe_flops_per_s
        if shared and sh.shared_bytes:
            t += sh.shared_bytes / self.copy_bytes_per_s + tokens * sh.shared_bytes / sh.dtype_bytes * 2 / self.moe_flops_per_s
        return t

    def dense_s(self, sh: Shapes, tokens: float) -> float:
        """One dense MLP layer."""
        return self.ffn_floor_s + sh.dense_bytes / self.copy_bytes_per_s + \
            tokens * sh.dense_bytes / sh.dtype_bytes * 2 / self.moe_flops_per_s

    def to_json(self) -> dict:
        return dict(vars(self))


def _nnls(rows: list[list[float]], y: list[float]) -> np.ndarray:
    """Least squares with every coefficient >= 0 (at most a few unknowns: every active set tried)."""
    a, b = np.asarray(rows, dtype=float), np.asarray(y, dtype=float)
    n = a.shape[1]
    best, best_x = float("inf"), np.zeros(n)
    for k in range(n + 1):
        for active in itertools.combinations(range(n), k):
            x = np.zeros(n)
            if active:
                sol = np.linalg.lstsq(a[:, active], b, rcond=None)[0]
                if (sol < 0).any():
                    continue
                x[list(active)] = sol
            err = float(((a @ x - b) ** 2).sum())
            if err < best:
                best, best_x = err, x
    return best_x


def fit_attention(sets: list[tuple[Shapes, list[AttentionPoint], float]], gemm_flops_per_s: float) -> tuple[float, float]:
    """-> (attn_floor_s, kv_efficiency) fitted to attention-only steps of one or more models,
    each set (shapes, points, the copy ceiling of the machine that measured them)."""
    rows, y = [], []
    for sh, points, copy_bytes_per_s in sets:
        for p in points:
            kv_at_copy = p.layers * p.seqs * p.context * sh.kv_bytes_per_token_layer / copy_bytes_per_s
            fixed = p.layers * (sh.attn_layer_bytes / copy_bytes_per_s + p.seqs * sh.attn_layer_flops_per_token /
                                gemm_flops_per_s) + sh.head_bytes / copy_bytes_per_s + \
                p.seqs * sh.head_flops_per_token / gemm_flops_per_s
            rows.append([p.layers / p.seconds, kv_at_copy / p.seconds])
            y.append((p.seconds - fixed - kv_at_copy) / p.seconds)
    if len(rows) < 2:
        raise ConfigError("fitting the attention curve needs at least two attention points", key="attention")
    floor, extra = _nnls(rows, y)  # extra = 1 / kv_efficiency - 1
    return float(floor), 1.0 / (1.0 + float(extra))


def fit_ffn(sets: list[tuple[Shapes, list[FfnPoint], float]], gemm_flops_per_s: float) -> tuple[float, float, float]:
    """-> (ffn_floor_s, expert_floor_s, moe_flops_per_s) fitted to FFN-only times (sets as in
    fit_attention)."""
    rows, y = [], []
    for sh, points, copy_bytes_per_s in sets:
        for p in points:
            per_layer = p.seconds / p.layers
            flops = p.pairs * sh.expert_flops_per_pair
            shared = 0.0
            if sh.shared_bytes:
                shared = sh.shared_bytes / copy_bytes_per_s
                flops += p.tokens * sh.shared_bytes / sh.dtype_bytes * 2
            base = p.touched * sh.expert_bytes / copy_bytes_per_s + shared + flops / gemm_flops_per_s
            rows.append([1.0 / per_layer, p.touched / per_layer, flops / per_layer])
            y.append((per_layer - base) / per_layer)
    if len(rows) < 3:
        raise ConfigError("fitting the FFN curve needs at least three FFN points", key="ffn")
    floor, expert_floor, extra = _nnls(rows, y)  # extra = 1 / moe_flops - 1 / gemm
    return float(floor), float(expert_floor), 1.0 / (1.0 / gemm_flops_per_s + float(extra))


def fit_kernels(attention: list[tuple[Shapes, list[AttentionPoint], float]],
                ffn: list[tuple[Shapes, list[FfnPoint], float]], copy_bytes_per_s: float,
                gemm_flops_per_s: float) -> Kernels:
    """Kernel figures for a machine whose copy ceiling is `copy_bytes_per_s`, from points
    measured on machines of the same kind (each set with its own measured ceiling)."""
    attn_floor, kv_eff = fit_attention(attention, gemm_flops_per_s)
    ffn_floor, expert_floor, moe_flops = fit_ffn(ffn, gemm_flops_per_s)
    return Kernels(copy_bytes_per_s, gemm_flops_per_s, attn_floor, kv_eff, ffn_floor, expert_floor, moe_flops)


@dataclass(frozen=True)
class Link:
    """One kind of link between two GPUs: time = latency + bytes / bandwidth, each way."""

    latency_s: float
    bytes_per_s: float

    def round_trip_s(self, out_bytes: float, back_bytes: float) -> float:
        return 2 * self.latency_s + (out_bytes + back_bytes) / self.bytes_per_s


@dataclass(frozen=True)
class LinkPoint:
    """A bare round trip: `out_bytes` sent, `back_bytes` received, in `seconds`."""

    out_bytes: int
    back_bytes: int
    seconds: float


def fit_link(points: list[LinkPoint], fallback_bytes_per_s: float | None = None) -> Link:
    """Latency and bandwidth from bare round trips. When their sizes do not resolve a bandwidth
    (the times do not grow with the bytes: latency-bound sizes), `fallback_bytes_per_s` is used
    and only the latency fitted; without a fallback that is an error."""
    if len(points) < 2:
        raise ConfigError("fitting a link needs at least two round trips of different sizes", key="link.points")
    rows = [[2.0 / p.seconds, (p.out_bytes + p.back_bytes) / p.seconds] for p in points]
    latency, inv_bw = _nnls(rows, [1.0] * len(points))
    if inv_bw > 0:
        return Link(float(latency), 1.0 / float(inv_bw))
    if fallback_bytes_per_s is None:
        raise ConfigError("the link's round trips do not grow with their size: cannot fit a bandwidth",
                          key="link.points")
    rest = [p.seconds - (p.out_bytes + p.back_bytes) / fallback_bytes_per_s for p in points]
    return Link(max(statistics.median(rest) / 2, 0.0), fallback_bytes_per_s)
