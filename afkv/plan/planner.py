"""Choosing a deployment: every candidate at its best batch, the winner, and its config.

For a model, a cluster and a workload, each candidate deployment (colocated data parallel, expert
parallel over the cluster, every rAyF bundle that fits with m = 1..4 micro-batches, device KV
formats where KV capacity binds) runs the largest batch per attention GPU that both fits its KV
(HBM x utilization - the weights it holds, over the workload's mean context) and keeps TPOT
within the SLO. Its tokens/s per GPU counts the whole cluster (GPUs a bundle size leaves idle
count too). The regime says what bounds it: "memory" when KV capacity stops the batch, else
the term that sets the layer cycle (attention, FFN, communication). The chosen deployment is the
fastest that afkv can run (EP is shown for reference: afkv has no colocated EP yet); `to_toml`
writes its [kv], [scheduler] and [deployment] sections for afkv's config loader.

The workload's mean context per sequence is the renewal-reward load of one batch slot (as in
arXiv 2601.21351): a request of P prompt and D decode tokens attends P + j tokens at its j-th
step, and slots are refilled at once, so the time-average is theta = E[P] + E[D (D + 1)] / (2 E[D]):
P + (D + 1) / 2 for a fixed D, P + E[D] for a geometric D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from afkv.errors import ConfigError
from afkv.plan.kernels import Kernels, Link
from afkv.plan.latency import Deployment, Kind, Step, step
from afkv.plan.profile import Profile
from afkv.plan.shapes import Shapes

BLOCK_SIZE = 16
MICRO_BATCHES = (1, 2, 3, 4)
MAX_SEQS = 1 << 16
DISTRIBUTIONS = ("fixed", "geometric")
MODEL_ERROR = 0.15  # predictions against the stored runs: within this, but for the outliers RESULTS names
NETWORK = Link(latency_s=10e-6, bytes_per_s=50e9)  # between hosts: 400 Gb/s per GPU (assumed, not measured)


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int = 2048
    output_tokens: int = 256
    output_distribution: str = "fixed"  # fixed | geometric (mean output_tokens)
    tpot_slo_s: float = 0.05

    def __post_init__(self) -> None:
        for key in ("prompt_tokens", "output_tokens"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "prompt_tokens" else 1):
                raise ConfigError(f"{key} must be a whole number ({'>= 0' if key == 'prompt_tokens' else '>= 1'}), "
                                  f"got {value!r}", key=key)
        if self.output_distribution not in DISTRIBUTIONS:
            raise ConfigError(f"output_distribution must be one of {', '.join(DISTRIBUTIONS)}, got "
                              f"{self.output_distribution!r}", key="output_distribution")
        if not self.tpot_slo_s > 0:
            raise ConfigError(f"the TPOT SLO must be positive, got {self.tpot_slo_s!r} s", key="tpot_slo")

    @property
    def context(self) -> float:
        """theta: mean tokens a decode step attends per sequence (see the module docstring)."""
        d = self.output_tokens
        return self.prompt_tokens + (d if self.output_distribution == "geometric" else (d + 1) / 2)

    @property
    def max_len(self) -> int:
        """Longest sequence to admit: prompt + output (geometric: its 99th percentile)."""
        d = self.output_tokens
        return self.prompt_tokens + (math.ceil(d * math.log(100)) if self.output_distribution == "geometric" else d)


@dataclass(frozen=True)
class Cluster:
    profile: Profile
    gpus: int
    gpus_per_host: int = 8
    network: Link = NETWORK
    host_memory_bytes_per_gpu: int = 0
    hbm_utilization: float = 0.9  # share of HBM for weights and KV (the rest: CUDA context, activations, graphs)

    def __post_init__(self) -> None:
        for key in ("gpus", "gpus_per_host"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key} must be a whole number >= 1, got {value!r}", key=key)
        if not 0 < self.hbm_utilization <= 1:
            raise ConfigError(f"hbm_utilization must be in (0, 1], got {self.hbm_utilization}", key="hbm_utilization")
        if self.host_memory_bytes_per_gpu < 0:
            raise ConfigError("host memory per GPU must be >= 0", key="host_memory")

    @property
    def usable_bytes(self) -> float:
        return self.profile.hbm_bytes * self.hbm_utilization

    def link(self, gpus: int) -> Link:
        """The link a group of `gpus` GPUs talks over: the profile's within a host, else the
        slower of it and the network."""
        own = self.profile.link
        if gpus <= self.gpus_per_host:
            return own
        return Link(max(own.latency_s, self.network.latency_s), min(own.bytes_per_s, self.network.bytes_per_s))


@dataclass(frozen=True)
class Prediction:
    deployment: Deployment
    seqs: int  # per attention GPU (0: infeasible)
    step: Step | None  # at `seqs`; infeasible: at one sequence when that is past the SLO, else None
    tok_s_per_gpu: float  # over the whole cluster
    kv_seqs: int  # sequences of the workload's mean context the attention GPU's KV holds
    regime: str  # attention | FFN | communication | memory; or why it is infeasible
    bundles: int
    runnable: bool  # afkv can run it today

    @property
    def feasible(self) -> bool:
        return self.seqs > 0


def _weights_on_attention_gpu(sh: Shapes, dep: Deployment) -> float:
    if dep.kind is Kind.COLOCATED:
        return sh.total_bytes
    if dep.kind is Kind.EP:
        held = -(-sh.num_experts // dep.attention_gpus) if sh.num_experts else 0
        return sh.attention_side_bytes + sh.num_moe_layers * (held * sh.expert_bytes + sh.shared_bytes) + \
            sh.num_dense_layers * sh.dense_bytes
    return sh.attention_side_bytes


def kv_budget_bytes(sh: Shapes, cluster: Cluster, dep: Deployment) -> float:
    """KV bytes an attention GPU (a colocated GPU) of `dep` holds: usable HBM - its weights."""
    return cluster.usable_bytes - _weights_on_attention_gpu(sh, dep)


def evaluate(sh: Shapes, k: Kernels, cluster: Cluster, workload: Workload, dep: Deployment) -> Prediction:
    """`dep` at its best batch: the largest that fits the KV and keeps TPOT within the SLO."""
    bundles = cluster.gpus // dep.gpus
    runnable = dep.kind is not Kind.EP
    fmt = cluster.profile.kv_format(dep.kv_format)

    def infeasible(why: str, at_one: Step | None = None) -> Prediction:
        return Prediction(dep, 0, at_one, 0.0, 0, why, bundles, runnable)

    if bundles == 0:
        return infeasible(f"needs {dep.gpus} GPUs")
    if dep.kind is Kind.AF and sh.expert_side_bytes(dep.expert_gpus) > cluster.usable_bytes:
        return infeasible(f"experts do not fit {dep.expert_gpus} GPU(s)")
    kv_bytes = kv_budget_bytes(sh, cluster, dep)
    seq_bytes = (workload.context + BLOCK_SIZE / 2) * sh.kv_bytes_per_token * fmt.bytes_ratio
    kv_seqs = int(max(kv_bytes, 0.0) // seq_bytes)
    if kv_seqs < 1:
        return infeasible("weights leave no room for KV")
    link = cluster.link(dep.gpus)
    af = cluster.profile.af

    def at(seqs: int) -> Step:
        return step(sh, k, link, af, dep, seqs, workload.context, fmt)

    top = min(kv_seqs, MAX_SEQS)
    one = at(1)
    if one.tpot_s > workload.tpot_slo_s:
        return infeasible(f"TPOT >= {one.tpot_s * 1e3:.1f} ms", one)
    if at(top).tpot_s <= workload.tpot_slo_s:
        seqs, regime = top, "memory"
    else:
        lo, hi = 1, top  # TPOT(lo) within the SLO, TPOT(hi) past it
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if at(mid).tpot_s <= workload.tpot_slo_s else (lo, mid)
        seqs, regime = lo, ""
    s = at(seqs)
    per_gpu = seqs * dep.attention_gpus / s.tpot_s / dep.gpus
    return Prediction(dep, seqs, s, per_gpu * bundles * dep.gpus / cluster.gpus, kv_seqs, regime or s.bound,
                      bundles, runnable)


def candidates(sh: Shapes, cluster: Cluster, micro_batches: tuple[int, ...] = MICRO_BATCHES) -> list[Deployment]:
    n = cluster.gpus
    out = [Deployment(Kind.COLOCATED)]
    if sh.num_experts and n >= 2:
        out += [Deployment(Kind.EP, g) for g in sorted({n, min(n, cluster.gpus_per_host)}) if g >= 2]
    out += [Deployment(Kind.AF, r, y, m) for r in range(1, n) for y in range(1, n - r + 1) for m in micro_batches]
    return out


@dataclass(frozen=True)
class Plan:
    shapes: Shapes
    cluster: Cluster
    workload: Workload
    kernels_from: str  # which calibration the kernel figures come from
    predictions: tuple[Prediction, ...]  # feasible first, fastest first
    chosen: Prediction
    colocated: Prediction
    notes: tuple[str, ...] = field(default=())


def make_plan(sh: Shapes, cluster: Cluster, workload: Workload,
              micro_batches: tuple[int, ...] = MICRO_BATCHES) -> Plan:
    if not micro_batches or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in micro_batches):
        raise ConfigError(f"micro-batch counts must be whole numbers >= 1, got {micro_batches}", key="micro_batches")
    if workload.max_len > sh.max_position:
        raise ConfigError(f"prompt + output ({workload.max_len} tokens) is past the model's {sh.max_position}-token "
                          "context: shorten the workload", key="prompt_len")
    k, source = cluster.profile.kernels(sh)
    formats = [f.name for f in cluster.profile.kv_formats if f.name != "auto"]
    preds = []
    for dep in candidates(sh, cluster, micro_batches):
        p = evaluate(sh, k, cluster, workload, dep)
        preds.append(p)
        if p.regime == "memory":  # KV capacity binds: a smaller device format may pay
            preds += [evaluate(sh, k, cluster, workload, Deployment(dep.kind, dep.attention_gpus, dep.expert_gpus,
                                                                    dep.micro_batches, f)) for f in formats]
    preds.sort(key=lambda p: (-p.tok_s_per_gpu, p.deployment.gpus, p.deployment.micro_batches))
    colocated = next(p for p in preds if p.deployment == Deployment(Kind.COLOCATED))
    runnable = [p for p in preds if p.runnable and p.feasible]
    if not runnable:
        best = min((p for p in preds if p.runnable and p.step is not None), default=None, key=lambda p: p.step.tpot_s)
        raise ConfigError("no deployment meets the workload on this cluster"
                          + (f" (the fastest step at batch 1: {best.deployment.label}, {best.regime})" if best else "")
                          + ": relax the TPOT SLO, shorten the context or add GPUs", key="tpot_slo")
    notes = []
    if cluster.profile.af.expert_batching == "per_attention_node":
        notes.append("expert nodes run each attention node's rows apart (afkv's default): weights are read once "
                     "per attention node and micro-batch; --expert-batching merged models afkv's merged batching")
    else:
        notes.append("merged expert batching (one FFN launch per layer and micro-batch over every attention "
                     "node's rows) runs in afkv ([deployment] expert_batching = \"merged\") but has not been "
                     "measured on GPUs yet: the AF figures assume it amortizes the weight reads fully")
    return Plan(sh, cluster, workload, source, tuple(preds), runnable[0], colocated, tuple(notes))


# ---- output ---------------------------------------------------------------------------------------
def _row(p: Prediction, base: Prediction) -> str:
    d = p.deployment
    if not p.feasible:
        return f"{d.label:<22} {'-':>6} {'-':>8} {'-':>10} {'-':>6} {'-':>9}  {p.regime}"
    ratio = f"{p.tok_s_per_gpu / base.tok_s_per_gpu:.2f}" if base.feasible else "-"  # no colocated baseline
    note = "" if p.runnable else "  (not in afkv yet)"
    return (f"{d.label:<22} {p.seqs:>6} {p.step.tpot_s * 1e3:>8.2f} {p.tok_s_per_gpu:>10.0f} {ratio:>6} "
            f"{p.kv_seqs:>9}  {p.regime}{note}")


def format_plan(plan: Plan, top: int = 8) -> str:
    sh, c, w = plan.shapes, plan.cluster, plan.workload
    lines = [f"{sh.name} on {c.gpus} x {c.profile.name} ({c.gpus_per_host} per host); prompt {w.prompt_tokens}, "
             f"output {w.output_tokens} ({w.output_distribution}): mean context {w.context:.0f} tokens; "
             f"TPOT SLO {w.tpot_slo_s * 1e3:.0f} ms",
             f"kernel figures: profile {c.profile.name}, fitted on {plan.kernels_from}; runtime overlap "
             f"{c.profile.af.overlap:.2f}, {c.profile.af.expert_batching.replace('_', ' ')}"]
    head = f"{'deployment':<22} {'batch':>6} {'TPOT ms':>8} {'tok/s/GPU':>10} {'vs DP':>6} {'KV seqs':>9}  bound"
    lines += [head, "-" * len(head)]
    shown: list[Prediction] = []
    seen = set()
    for p in plan.predictions:  # one row per topology: its best m and KV format
        d = p.deployment
        if p.feasible and len(shown) < top and (d.kind, d.attention_gpus, d.expert_gpus) not in seen:
            seen.add((d.kind, d.attention_gpus, d.expert_gpus))
            shown.append(p)
    for p in (plan.colocated, *(p for p in plan.predictions if p.deployment.kind is Kind.EP)):
        d = p.deployment
        if (d.kind, d.attention_gpus, d.expert_gpus) not in seen:
            seen.add((d.kind, d.attention_gpus, d.expert_gpus))
            shown.append(p)
    lines += [_row(p, plan.colocated) for p in shown]
    ch = plan.chosen
    lines.append(f"chosen: {ch.deployment.label}: {explain(plan)}")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def explain(plan: Plan) -> str:
    ch, base = plan.chosen, plan.colocated
    d = ch.deployment
    parts = [f"{ch.tok_s_per_gpu:.0f} tok/s per GPU at {ch.seqs} sequences per attention GPU, TPOT "
             f"{ch.step.tpot_s * 1e3:.1f} ms, bound by {ch.regime}"]
    if d.kind is Kind.COLOCATED:
        parts.append("no disaggregated topology beats one replica per GPU here")
    elif base.feasible:
        ratio = ch.tok_s_per_gpu / base.tok_s_per_gpu
        parts.append(f"{ratio:.2f}x colocated ({base.tok_s_per_gpu:.0f} tok/s per GPU, "
                     f"{base.seqs} sequences, bound by {base.regime})")
        if ratio < 1 + MODEL_ERROR:
            parts.append(f"within the model's validated error ({MODEL_ERROR:.0%}) of colocated: measure both")
        if ch.kv_seqs > base.kv_seqs:
            parts.append(f"an attention GPU holds the KV of {ch.kv_seqs} sequences against {base.kv_seqs}")
    else:
        parts.append(f"colocated is infeasible ({base.regime})")
    if ch.bundles * d.gpus < plan.cluster.gpus:
        parts.append(f"{ch.bundles} bundle(s) of {d.gpus} GPUs leave {plan.cluster.gpus - ch.bundles * d.gpus} idle")
    return "; ".join(parts)


def to_toml(plan: Plan) -> str:
    """The chosen deployment's [kv], [scheduler] and [deployment] sections (afkv's config format)."""
    ch, sh, c, w = plan.chosen, plan.shapes, plan.cluster, plan.workload
    d = ch.deployment
    kv_mib = int(kv_budget_bytes(sh, c, d) // 2**20)
    lines = [f"# afkv plan: {sh.name} on {c.gpus} x {c.profile.name}; prompt {w.prompt_tokens}, output "
             f"{w.output_tokens} ({w.output_distribution}), TPOT SLO {w.tpot_slo_s * 1e3:.0f} ms",
             f"# chosen {d.label}: {explain(plan)}"]
    if d.kind is Kind.COLOCATED:
        lines.append(f"# colocated: one engine per GPU with this config ({c.gpus} engines, data parallel)")
    else:
        lines.append(f"# {ch.bundles} deployment(s) of {d.gpus} GPUs; start each with: afkv launch THIS.toml")
    lines += ["", "[kv]", f"block_size = {BLOCK_SIZE}", f"device_memory_mib = {kv_mib}"]
    if d.kv_format != "auto":
        lines.append(f'device_format = "{d.kv_format}"')
    host_mib = int(c.host_memory_bytes_per_gpu // 2 // 2**20)
    if host_mib:
        seq_bytes = w.context * sh.kv_bytes_per_token
        spill = "none" if host_mib * 2**20 >= ch.seqs * seq_bytes else "int8"
        lines += [f"host_memory_mib = {host_mib}  # half the host memory per GPU: preempted and prefix-cached blocks",
                  f'spill_format = "{spill}"']
    lines += ["", "[scheduler]", f"max_num_seqs = {ch.seqs}", f"max_model_len = {w.max_len}"]
    if d.kind is Kind.AF:
        per_host = c.gpus_per_host
        att = [f'"cuda:{g % per_host}"' for g in range(d.attention_gpus)]
        exp = [f'"cuda:{g % per_host}"' for g in range(d.attention_gpus, d.gpus)]
        lines += ["", "[deployment]", f"attention_nodes = {d.attention_gpus}", f"expert_nodes = {d.expert_gpus}",
                  f"micro_batches = {d.micro_batches}", f"attention_devices = [{', '.join(att)}]",
                  f"expert_devices = [{', '.join(exp)}]"]
        if c.profile.af.expert_batching != "per_attention_node":  # the runtime's default
            lines.append(f'expert_batching = "{c.profile.af.expert_batching}"')
    return "\n".join(lines) + "\n"


def to_json(plan: Plan) -> dict:
    def pred(p: Prediction) -> dict:
        d = p.deployment
        out = {"deployment": d.label, "kind": d.kind.value, "attention_gpus": d.attention_gpus,
               "expert_gpus": d.expert_gpus, "micro_batches": d.micro_batches, "kv_format": d.kv_format,
               "seqs_per_attention_gpu": p.seqs, "tok_s_per_gpu": p.tok_s_per_gpu, "kv_seqs": p.kv_seqs,
               "regime": p.regime, "bundles": p.bundles, "runnable": p.runnable}
        if p.feasible:
            out |= {"tpot_s": p.step.tpot_s, "attention_s": p.step.attention_s, "ffn_s": p.step.ffn_s,
                    "comm_s": p.step.comm_s, "overhead_s": p.step.overhead_s}
        return out

    w, c = plan.workload, plan.cluster
    return {"model": plan.shapes.name, "profile": c.profile.name, "gpus": c.gpus, "gpus_per_host": c.gpus_per_host,
            "workload": {"prompt_tokens": w.prompt_tokens, "output_tokens": w.output_tokens,
                         "output_distribution": w.output_distribution, "tpot_slo_s": w.tpot_slo_s,
                         "mean_context": w.context},
            "kernels_from": plan.kernels_from, "chosen": pred(plan.chosen), "colocated": pred(plan.colocated),
            "explanation": explain(plan), "toml": to_toml(plan), "notes": list(plan.notes),
            "predictions": [pred(p) for p in plan.predictions]}
