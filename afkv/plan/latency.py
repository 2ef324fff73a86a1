"""The per-layer latency model of one decode step, for colocated, expert-parallel and rAyF.

Per MoE layer and micro-batch i (n_i sequences of one attention node, c tokens of context each):

    a_i   attention side: Kernels.attention_s(n_i, c)
    rt_i  A->F->A: the runtime's round-trip overhead + the link's round trip of the dispatch
          (rows x (hidden + top-k ids and weights)) and combine (rows x hidden) bytes
    f_i   the slowest expert node's FFN over the pairs routed to its experts (E / y held): with
          per-attention-node batching each of the r attention nodes is a launch of its own
          (busy_i = r * f_i), merged: one launch over all r nodes' rows (busy_i = f_i)

    T = T_attn + T_A->F + T_ffn + T_all-to-all + T_F->A, composed per layer as

    serial    cycle = max(sum_i (a_i + rt_i + f_i), sum_i busy_i, sum_i ingress_i)
    pingpong  cycle = max(max_i (a_i + rt_i + f_i), sum_i a_i, sum_i busy_i, sum_i ingress_i)
              + once per step the pipeline's fill: max_i chain_i - cycle / m
    step      = step_overhead + lm_head + T_serial - overlap * (T_serial - T_pingpong)
              (T_x: the sum over layers of cycle, with its fill)

"pingpong" is MegaScale-Infer's model (arXiv 2504.02263): with m micro-batches each side works on
one while the other works on the next, so a layer costs m * max(a, f) once that covers one
micro-batch's round trip (m * max >= a + f + 2 T_c, its rule m >= 2(1 + T_c / T_f) when a ~ f),
and the step adds one round trip's worth of fill: (a + f + 2 T_c) + (m L - 1) max(a, f). The
resource terms (sum a, sum busy, ingress) are what each side must do per layer whatever the
schedule; the chain term is the dependency of a micro-batch on its own previous layer. "serial"
pays every micro-batch's chain in full. `overlap` (AfRuntime, in [0, 1]) is how much of the
difference the runtime achieves: afkv's stored runs with m = 2 sit between the two (the
attention of one micro-batch partly hides behind the experts' work on the other), so it is
fitted to them (afkv.plan.runs); 1 is the ideal the ping-pong schedule promises. With m = 1
both schedules are the same. r attention nodes run independently, so the expert node's busy
time is a bound of its own: that is where rAyF amortizes or saturates.

Colocated (one full replica per GPU): step = lm_head + sum over layers (a + f), no transfers.
Expert parallel (EP, N GPUs, every GPU attention + E / N experts, not runnable by afkv yet):
per layer a + all-to-all round trip + f over the pairs routed to its experts from all N GPUs.

The optimal ratio of rA-1F in closed form (after arXiv 2601.21351, derived here from its three
regimes; `r_star`): r attention instances of B sequences feed one FFN instance. Per step an
instance needs T_A (attention) and T_C (its communication), both independent of r; the FFN over
N = r B tokens needs T_F(N) = T_F0 + beta N (weights read: T_F0; compute: beta per token, all
experts touched). Steps run at the slowest of the three, tau(r) = max(T_A, T_C, T_F0 + beta r B),
and throughput per GPU is X(r) = r B / ((r + 1) tau(r)).
  - While T_F(rB) <= max(T_A, T_C) (attention- or communication-bound), tau is constant and
    X = const * r / (r + 1) grows with r: add attention instances.
  - Past r_AC = (max(T_A, T_C) - T_F0) / (beta B) the FFN is the bottleneck (FFN-bound):
    X = r B / ((r + 1)(T_F0 + beta r B)); dX/dr has the sign of T_F0 - beta B r^2, so X peaks at
    r_peak = sqrt(T_F0 / (beta B)) (weight reads amortized against growing compute).
  - Hence r* = max(r_A, r_C, r_peak), r_A = (T_A - T_F0) / (beta B), r_C = (T_C - T_F0) / (beta B):
    if r_peak >= r_AC, X rises up to r_AC and on to its FFN-bound peak; otherwise X falls from
    r_AC on. An integer r* is floor or ceil, whichever gives the larger X.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from afkv.errors import ConfigError
from afkv.plan.kernels import Kernels, Link
from afkv.plan.profile import AfRuntime, KVFormatCost
from afkv.plan.shapes import Shapes

ID_BYTES = 8  # per routed pair on the wire: an int32 expert id and a float32 weight


class Kind(str, Enum):
    COLOCATED = "colocated"
    EP = "ep"
    AF = "af"


@dataclass(frozen=True)
class Deployment:
    """colocated: one full replica per GPU (data parallel); ep: `attention_gpus` GPUs each with
    attention and a shard of the experts; af: r attention GPUs and y expert GPUs."""

    kind: Kind
    attention_gpus: int = 1
    expert_gpus: int = 0
    micro_batches: int = 1
    kv_format: str = "auto"

    def __post_init__(self) -> None:
        if self.attention_gpus < 1 or self.micro_batches < 1 or (self.kind is Kind.AF) != (self.expert_gpus >= 1):
            raise ConfigError(f"impossible deployment {self}", key="deployment")

    @property
    def gpus(self) -> int:
        return self.attention_gpus + self.expert_gpus

    @property
    def label(self) -> str:
        fmt = "" if self.kv_format == "auto" else f", KV {self.kv_format}"
        if self.kind is Kind.COLOCATED:
            return f"colocated DP{fmt}"
        if self.kind is Kind.EP:
            return f"EP{self.attention_gpus}{fmt}"
        return f"{self.attention_gpus}A{self.expert_gpus}F m={self.micro_batches}{fmt}"


@dataclass(frozen=True)
class Step:
    """One decode step: its time and where the time goes (seconds, summed over layers)."""

    tpot_s: float
    attention_s: float  # the attention side's work (all micro-batches, lm_head)
    ffn_s: float  # the expert side's work for this attention node's rows
    comm_s: float  # round trips (runtime overhead + link)
    overhead_s: float  # once per step
    bound: str  # what sets the layer cycle: attention | FFN | communication


def split(seqs: int, parts: int) -> list[int]:
    """`seqs` sequences in `parts` micro-batches as even as whole sequences allow (none empty)."""
    parts = max(1, min(parts, seqs))
    return [seqs // parts + (1 if i < seqs % parts else 0) for i in range(parts)]


def _rows_share(sh: Shapes, held: int) -> float:
    """Share of tokens with at least one of their top-k experts among `held` of num_experts."""
    if not sh.num_experts or held >= sh.num_experts:
        return 1.0
    return 1.0 - math.comb(sh.num_experts - held, sh.top_k) / math.comb(sh.num_experts, sh.top_k)


def _kv_context(context: float, fmt: KVFormatCost) -> float:
    """Context in model-dtype tokens that cost as much to read as `context` tokens of `fmt`."""
    return context * fmt.bytes_ratio / fmt.read_efficiency


def colocated_step(sh: Shapes, k: Kernels, seqs: int, context: float, fmt: KVFormatCost) -> Step:
    c = _kv_context(context, fmt)
    attn = sh.num_layers * k.attention_s(sh, seqs, c) + k.head_s(sh, seqs)
    ffn = sh.num_moe_layers * k.moe_s(sh, seqs, seqs * sh.top_k, sh.touched(seqs, sh.num_experts)) + \
        sh.num_dense_layers * k.dense_s(sh, seqs)
    return Step(attn + ffn, attn, ffn, 0.0, 0.0, "attention" if attn >= ffn else "FFN")


def ep_step(sh: Shapes, k: Kernels, link: Link, af: AfRuntime, gpus: int, seqs: int, context: float,
            fmt: KVFormatCost) -> Step:
    c = _kv_context(context, fmt)
    a = sh.num_layers * k.attention_s(sh, seqs, c) + k.head_s(sh, seqs)
    held = -(-sh.num_experts // gpus)
    # pairs from all GPUs routed to this GPU's experts: gpus * seqs * k * held / E
    pairs = gpus * seqs * sh.top_k * held / sh.num_experts
    f = sh.num_moe_layers * k.moe_s(sh, seqs, pairs, sh.touched(gpus * seqs, held)) + \
        sh.num_dense_layers * k.dense_s(sh, seqs)
    remote = seqs * sh.top_k * (gpus - 1) / gpus  # pairs leaving this GPU (and coming back)
    db = sh.dtype_bytes
    rt = af.round_trip_overhead_s + link.round_trip_s(remote * (sh.hidden_size * db + ID_BYTES),
                                                      remote * sh.hidden_size * db)
    comm = sh.num_moe_layers * rt
    bound = max((a, "attention"), (f, "FFN"), (comm, "communication"))[1]
    return Step(a + f + comm, a, f, comm, 0.0, bound)


def af_step(sh: Shapes, k: Kernels, link: Link, af: AfRuntime, attention_gpus: int, expert_gpus: int,
            micro_batches: int, seqs: int, context: float, fmt: KVFormatCost) -> Step:
    r, y = attention_gpus, expert_gpus
    c = _kv_context(context, fmt)
    held = -(-sh.num_experts // y) if sh.num_experts else 0
    share = _rows_share(sh, held)
    merged = af.expert_batching == "merged"
    db = sh.dtype_bytes
    sizes = split(seqs, micro_batches)
    totals = {"a": 0.0, "f": 0.0, "rt": 0.0}
    serial, pingpong, fill, bound = 0.0, 0.0, 0.0, "attention"
    for layers, moe in ((sh.num_moe_layers, True), (sh.num_dense_layers, False)):
        if not layers:
            continue
        a_l, f_l, rt_l, busy_l, ingress_l, chain_max = [], [], [], [], [], 0.0
        for n in sizes:
            tokens = r * n if merged else n
            if moe:
                f = k.moe_s(sh, tokens, tokens * sh.top_k * held / sh.num_experts, sh.touched(tokens, held))
                rows, peers = n * share, y  # dispatch: each expert node gets the rows routed to it
            else:
                f = k.dense_s(sh, tokens)
                rows, peers = n, 1  # a dense layer's MLP lives on one expert node
            out_row = sh.hidden_size * db + (sh.top_k * ID_BYTES if moe else 0)
            rt = af.round_trip_overhead_s + link.round_trip_s(peers * rows * out_row, peers * rows * sh.hidden_size * db)
            a = k.attention_s(sh, n, c)
            a_l.append(a)
            f_l.append(f)
            rt_l.append(rt)
            busy_l.append(f if merged else r * f)
            ingress_l.append(r * rows * out_row / link.bytes_per_s)
            chain_max = max(chain_max, a + rt + f)
        resources = {"attention": sum(a_l), "FFN": sum(busy_l), "communication": sum(ingress_l)}
        chain = {"attention": sum(a_l), "FFN": sum(f_l), "communication": sum(rt_l)}
        cycle_serial = max(sum(chain.values()), *resources.values())
        cycle_pp = max(chain_max, *resources.values())
        fill = max(fill, chain_max - cycle_pp / len(sizes))
        serial += layers * cycle_serial
        pingpong += layers * cycle_pp
        for key, name in (("a", "attention"), ("f", "FFN"), ("rt", "communication")):
            totals[key] += layers * chain[name]
        if moe or not sh.num_moe_layers:
            cycle, chained = (cycle_pp, chain_max) if af.overlap >= 0.5 else (cycle_serial, sum(chain.values()))
            bound = max(resources, key=resources.get) if cycle > chained else max(chain, key=chain.get)
    head = k.head_s(sh, seqs)
    layers_s = serial - af.overlap * (serial - pingpong - fill)
    tpot = af.step_overhead_s + head + layers_s
    return Step(tpot, totals["a"] + head, totals["f"], totals["rt"], af.step_overhead_s, bound)


def step(sh: Shapes, k: Kernels, link: Link, af: AfRuntime, dep: Deployment, seqs: int, context: float,
         fmt: KVFormatCost) -> Step:
    if dep.kind is Kind.COLOCATED:
        return colocated_step(sh, k, seqs, context, fmt)
    if dep.kind is Kind.EP:
        return ep_step(sh, k, link, af, dep.attention_gpus, seqs, context, fmt)
    return af_step(sh, k, link, af, dep.attention_gpus, dep.expert_gpus, dep.micro_batches, seqs, context, fmt)


# ---- the analytic optimum of rA-1F ------------------------------------------------------------
@dataclass(frozen=True)
class AnalyticTerms:
    """Per step, for one attention instance of `seqs` sequences (see the module docstring)."""

    t_attn_s: float  # T_A
    t_comm_s: float  # T_C
    t_ffn0_s: float  # T_F0: the FFN's weight reads and fixed costs, all experts touched
    beta_s: float  # the FFN's cost per token (all layers)
    seqs: int

    def throughput(self, r: float) -> float:
        """X(r): tokens per second per GPU of rA-1F."""
        tau = max(self.t_attn_s, self.t_comm_s, self.t_ffn0_s + self.beta_s * r * self.seqs)
        return r * self.seqs / ((r + 1) * tau)


def analytic_terms(sh: Shapes, k: Kernels, link: Link, af: AfRuntime, seqs: int, context: float, micro_batches: int,
                   fmt: KVFormatCost) -> AnalyticTerms:
    """T_A, T_C, T_F0 and beta of the closed form, from the same kernels as the full model (every
    micro-batch reads the experts' weights once: T_F0 grows with m)."""
    c = _kv_context(context, fmt)
    sizes = split(seqs, micro_batches)
    t_a = sum(sh.num_layers * k.attention_s(sh, n, c) for n in sizes) + k.head_s(sh, seqs)
    out_row = sh.hidden_size * sh.dtype_bytes + sh.top_k * ID_BYTES
    t_c = sum(sh.num_moe_layers * (af.round_trip_overhead_s + link.round_trip_s(n * out_row, n * sh.hidden_size *
                                                                                 sh.dtype_bytes)) for n in sizes)
    f0 = sh.num_moe_layers * len(sizes) * (k.moe_s(sh, 0, 0, sh.num_experts))
    beta = sh.num_moe_layers * (sh.top_k * sh.expert_flops_per_pair / k.moe_flops_per_s +
                                (sh.shared_bytes / sh.dtype_bytes * 2 / k.moe_flops_per_s if sh.shared_bytes else 0.0))
    return AnalyticTerms(t_a, t_c, f0, beta, seqs)


def r_star(t: AnalyticTerms) -> tuple[float, int, str]:
    """-> (r* as a real number, the best integer r >= 1, the regime that sets it)."""
    bb = t.beta_s * t.seqs
    candidates = {"attention": (t.t_attn_s - t.t_ffn0_s) / bb, "communication": (t.t_comm_s - t.t_ffn0_s) / bb,
                  "FFN": math.sqrt(t.t_ffn0_s / bb)}
    regime = max(candidates, key=candidates.get)
    r = max(candidates[regime], 1.0)
    lo, hi = max(1, math.floor(r)), max(1, math.ceil(r))
    best = hi if t.throughput(hi) > t.throughput(lo) else lo
    return r, best, regime
