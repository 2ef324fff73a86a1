"""The stored GPU runs (afkv/bench/results: `afkv bench gpu` and `afkv bench af` JSON) as profiles,
and the model's predictions against every step they measured.

What each run recorded and what it is used for:

    calibrates (fitted)                             is predicted
    -----------------------------------------       -----------------------------------------------
    copy ceiling of the run (copy_bytes_per_s)       colocated TPOT at every batch > 1
    attention-only steps (t_attn_s, every batch)     1A1F TPOT at every batch and micro-batch count
    the expert node's FFN (t_ffn_s, m = 1, every       of every run but RUNTIME_RUN (whose rows fit
      batch) and the colocated batch-1 FFN             the runtime constants, left)
      (tpot_s - t_attn_s at batch 1: the few-        the expert node's FFN with m = 2 (t_ffn_s)
      experts end of the FFN curve)
    bare NCCL round trips (link curve), the round
      trip inside eager steps (runtime overhead)
    the runtime's step overhead and overlap: one
      pair for every run, from the newest Mixtral
      1A1F run (RUNTIME_RUN): its m = 1 rows at
      batches whose attention step it measured,
      and its m = 2 rows

The expert kernels changed between runs (torch grouped GEMMs, then Triton fused MoE), so the FFN
points of a run come from the 1A1F run with the same kernels (RUN_SETS, from RESULTS.md: which
call wrote which file); attention points always come from the run being predicted. The run's
GPU (H200) gives the HBM size; the dense-GEMM peak, PCIe and disk rates are the built-in
figures (none of them enters these predictions but as bounds).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from afkv.errors import ConfigError
from afkv.model.random import REAL_SHAPES, random_spec
from afkv.plan.kernels import AttentionPoint, FfnPoint, Kernels, LinkPoint, fit_link
from afkv.plan.latency import af_step, colocated_step
from afkv.plan.profile import AfRuntime, Calibration, KVFormatCost, Profile
from afkv.plan.shapes import Shapes

H200_HBM_BYTES = 143771 * 2**20  # what the device reports
DENSE_GEMM_FLOPS = 0.7 * 989e12  # H100/H200 dense bf16 spec, at the share large GEMMs reach: not measured here
# the same H200 machine, `afkv bench kv` 2026-11-29 (RESULTS.md): pinned copy limits, plain file write / read
H2D_BYTES_PER_S, D2H_BYTES_PER_S = 54.4e9, 53.9e9
DISK_READ_BYTES_PER_S, DISK_WRITE_BYTES_PER_S = 1.46e9, 3.46e9
NVLINK_BYTES_PER_S = 450e9  # H100/H200 NVLink 4, each way: where a run's round trips do not resolve a bandwidth


@dataclass(frozen=True)
class RunSet:
    """Stored runs of one model with one set of expert kernels."""

    model: str
    af_file: str  # the 1A1F run: the expert node's FFN times
    gpu_file: str  # the one-GPU run with the same expert kernels: its batch-1 step
    kernels: str


RUN_SETS = (
    RunSet("mixtral-8x7b", "af-mixtral-final.json", "gpu-final.json", "Triton fused MoE (call 6)"),
    RunSet("qwen3-30b-a3b", "af-qwen3-fixed-plane.json", "gpu-final.json", "Triton fused MoE (call 6 and later)"),
    # not named in RESULTS.md; its expert FFN at 16 rows (1.09 ms per layer) is the torch grouped-GEMM
    # figure of RESULTS.md's kernel benchmark (1.10 ms; Triton: 0.75 ms)
    RunSet("mixtral-8x7b", "af-mixtral.json", "gpu-mixtral.json", "torch grouped GEMMs"),
    RunSet("qwen3-30b-a3b", "af-qwen3.json", "gpu-qwen3.json", "torch grouped GEMMs (calls 3 and 4)"),
)
RUNTIME_RUN = "af-mixtral-final.json"  # fits the step overhead (m = 1 rows) and the overlap (m = 2 rows)


def shapes_of(model: str) -> Shapes:
    return Shapes.from_spec(random_spec(f"random:{model}"), model)


def _rows(table: dict) -> dict[int, dict]:
    return {int(b): r for b, r in table.items()}


def attention_points(rows: dict, context: int, layers: int) -> list[AttentionPoint]:
    """Attention-only steps of a run: batch -> {"t_attn_s"} (rows without it skipped)."""
    return [AttentionPoint(b, context + 1, layers, r["t_attn_s"]) for b, r in sorted(_rows(rows).items())
            if r.get("t_attn_s")]


def _random_ids_touched(sh: Shapes, pairs: float) -> float:
    """Distinct experts among `pairs` ids drawn uniformly with replacement (the expert node's
    `ffn_time` draws its ids so)."""
    return sh.num_experts * (1.0 - (1.0 - 1.0 / sh.num_experts) ** pairs)


def ffn_points(sh: Shapes, af_rows: dict, batch1: dict | None, micro_batches: int = 1) -> list[FfnPoint]:
    """The expert node's FFN of every batch at `micro_batches` (each cap a launch; summed), and
    the colocated batch-1 step's FFN (tpot - t_attn: one token, top_k experts)."""
    out = []
    for _, per_m in sorted(_rows(af_rows).items()):
        r = per_m.get(str(micro_batches)) or per_m.get(micro_batches)
        if r is None:
            continue
        caps = r["caps"]
        if len(set(caps)) != 1:
            raise ConfigError(f"uneven micro-batch capacities {caps}", key="af.caps")
        cap = caps[0]
        pairs = cap * sh.top_k
        out.append(FfnPoint(cap, pairs, _random_ids_touched(sh, pairs), sh.num_moe_layers * len(caps), r["t_ffn_s"]))
    if batch1 is not None:
        out.append(FfnPoint(1, sh.top_k, sh.top_k, sh.num_moe_layers, batch1["tpot_s"] - batch1["t_attn_s"]))
    return out


def link_points(sh: Shapes, af: dict) -> list[LinkPoint]:
    """Bare NCCL round trips the run timed: per micro-batch of every 1A1F row (transfer_bare_s
    covers every layer and micro-batch) and the round-trip probes."""
    out = []
    row_out, row_back = sh.hidden_size * sh.dtype_bytes + sh.top_k * 8, sh.hidden_size * sh.dtype_bytes
    for _, per_m in sorted(_rows(af["af"]).items()):
        for r in per_m.values():
            cap = r["caps"][0]
            out.append(LinkPoint(cap * row_out, cap * row_back, r["transfer_bare_s"] / sh.num_layers / len(r["caps"])))
    out += [LinkPoint(rt["dispatch_bytes"], rt["combine_bytes"], rt["bare_nccl_rtt_s"]) for rt in af["round_trip"]]
    return out


def round_trip_overhead(afs: list[dict]) -> float:
    """Median of (A->F->A inside an eager step - the expert's compute - the bare round trip)."""
    return statistics.median(max(rt["runtime_rtt_s"] - rt["expert_compute_s"] - rt["bare_nccl_rtt_s"], 0.0)
                             for af in afs for rt in af["round_trip"])


def fit_runtime(profile: Profile, sh: Shapes, af: dict) -> AfRuntime:
    """The runtime constants of 1A1F from one run: the step overhead = the mean of (TPOT - the
    model without it) over its m = 1 rows whose batch has a measured attention step; then the
    overlap in [0, 1] by least squares (relative) over its rows with m >= 2, given that overhead
    (the model is linear in it: T = T_serial - overlap * (T_serial - T_pingpong))."""
    k, _ = profile.kernels(sh)
    base = AfRuntime(profile.af.round_trip_overhead_s, 0.0, 0.0, profile.af.expert_batching)
    context = af["context"] + 1

    def tpot(runtime: AfRuntime, b: int, m: int) -> float:
        return af_step(sh, k, profile.link, runtime, 1, 1, m, b, context, profile.kv_formats[0]).tpot_s

    rows = [(b, int(m), r) for b, per_m in sorted(_rows(af["af"]).items()) for m, r in per_m.items()]
    gaps = [r["tpot_s"] - tpot(base, b, m) for b, m, r in rows if m == 1 and r.get("t_attn_s")]
    if not gaps:
        raise ConfigError("no 1A1F row at m = 1 with a measured attention step", key="af")
    base = dataclasses.replace(base, step_overhead_s=sum(gaps) / len(gaps))
    ideal = dataclasses.replace(base, overlap=1.0)
    num = den = 0.0
    for b, m, r in rows:
        if m < 2:
            continue
        serial, hidden = tpot(base, b, m), tpot(base, b, m) - tpot(ideal, b, m)
        num += (serial - r["tpot_s"]) * hidden / r["tpot_s"] ** 2
        den += hidden**2 / r["tpot_s"] ** 2
    overlap = min(max(num / den, 0.0), 1.0) if den else 0.0
    return dataclasses.replace(base, overlap=overlap)


@dataclass(frozen=True)
class Records:
    """One model's stored records: `attention` {"rows": batch -> {"t_attn_s"}, "copy", "context"}
    (attention-only steps and the copy ceiling of their run), `af` a `bench af` result (the expert
    node's FFN at m = 1, bare NCCL round trips, the runtime's round trip), `batch1` a colocated
    batch-1 row {"tpot_s", "t_attn_s"} with the same expert kernels."""

    shapes: Shapes
    attention: dict
    af: dict
    batch1: dict | None

    def calibration(self) -> Calibration:
        sh = self.shapes
        return Calibration(sh.name, MappingProxyType(dict(REAL_SHAPES[sh.name])), self.attention["copy"],
                           tuple(attention_points(self.attention["rows"], self.attention["context"], sh.num_layers)),
                           tuple(ffn_points(sh, self.af["af"], self.batch1)))


def records_profile(name: str, records: list[Records], runtime: AfRuntime | None = None,
                    hbm_bytes: int = H200_HBM_BYTES, **fields) -> Profile:
    """A profile of the machine of stored runs: one calibration per model, the link from every
    run's bare round trips, the round-trip overhead theirs; `runtime` the step overhead and
    overlap (None: zero); the copy ceiling of the first records' attention run."""
    lp = [p for r in records for p in link_points(r.shapes, r.af)]
    runtime = dataclasses.replace(runtime or AfRuntime(), round_trip_overhead_s=round_trip_overhead([r.af for r in records]))
    return Profile(name=name, hbm_bytes=hbm_bytes, copy_bytes_per_s=records[0].attention["copy"],
                   gemm_flops_per_s=DENSE_GEMM_FLOPS, h2d_bytes_per_s=H2D_BYTES_PER_S, d2h_bytes_per_s=D2H_BYTES_PER_S,
                   disk_read_bytes_per_s=DISK_READ_BYTES_PER_S, disk_write_bytes_per_s=DISK_WRITE_BYTES_PER_S,
                   link_kind="nccl", link=fit_link(lp, NVLINK_BYTES_PER_S), link_points=tuple(lp),
                   calibrations=tuple(r.calibration() for r in records), af=runtime, **fields)


def table_of(run: dict, model: str) -> dict:
    """A run's steps of one model: {"rows": batch -> row, "copy", "context"}."""
    rows = run["colocated"] if run["bench"] == "af" else run["models"][model]["afkv"]
    return {"rows": rows, "copy": run["copy_bytes_per_s"], "context": run["context"]}


@dataclass(frozen=True)
class Check:
    """One measured figure and the model's value for it."""

    file: str
    model: str
    what: str  # "colocated TPOT" | "1A1F TPOT" | "expert FFN"
    batch: int
    micro_batches: int
    measured_s: float
    predicted_s: float
    role: str  # "predicted" | "calibration"

    @property
    def error(self) -> float:
        return self.predicted_s / self.measured_s - 1.0


def load_runs(results_dir: str | Path) -> dict[str, dict]:
    """Every stored `bench gpu` / `bench af` JSON under `results_dir` (recursively): name -> data."""
    out = {}
    for path in sorted(Path(results_dir).rglob("*.json")):
        data = json.loads(path.read_text())
        if data.get("bench") in ("gpu", "af"):
            out[path.name] = data
    if not out:
        raise ConfigError("no `afkv bench gpu` or `afkv bench af` JSON found", file=str(results_dir))
    return out


def _run_set(file: str, model: str) -> RunSet:
    for s in RUN_SETS:
        if s.model == model and file in (s.af_file, s.gpu_file):
            return s
    raise ConfigError(f"no run set names {file} for {model}: add it to afkv.plan.runs.RUN_SETS", key="RUN_SETS")


def check_runs(results_dir: str | Path) -> list[Check]:
    """The model against every colocated and 1A1F step of every stored run (see the module docstring)."""
    runs = load_runs(results_dir)
    runtime = fitted_runtime(runs)
    checks: list[Check] = []
    for file, data in runs.items():
        models = [data["model"].removeprefix("random:")] if data["bench"] == "af" else list(data["models"])
        for model in models:
            sh = shapes_of(model)
            rs = _run_set(file, model)
            table = table_of(data, model)
            batch1 = table_of(runs[rs.gpu_file], model)["rows"].get("1")
            profile = records_profile(file, [Records(sh, table, runs[rs.af_file], batch1)], runtime)
            checks += _checks(file, model, sh, profile, table, data if data["bench"] == "af" else None,
                              batch1_calibrates=file == rs.gpu_file, runtime_fit=file == RUNTIME_RUN)
    return checks


def fitted_runtime(runs: dict[str, dict]) -> AfRuntime:
    """The step overhead and overlap of every 1A1F prediction, fitted on RUNTIME_RUN alone."""
    af = runs[RUNTIME_RUN]
    model = af["model"].removeprefix("random:")
    sh = shapes_of(model)
    batch1 = table_of(runs[_run_set(RUNTIME_RUN, model).gpu_file], model)["rows"].get("1")
    return fit_runtime(records_profile(RUNTIME_RUN, [Records(sh, table_of(af, model), af, batch1)]), sh, af)


def _checks(file: str, model: str, sh: Shapes, profile: Profile, table: dict, af: dict | None,
            batch1_calibrates: bool, runtime_fit: bool) -> list[Check]:
    k, _ = profile.kernels(sh)
    fmt = profile.kv_formats[0]
    context = table["context"] + 1
    out = []
    for b, r in sorted(_rows(table["rows"]).items()):
        if "tpot_s" not in r:
            continue
        pred = colocated_step(sh, k, b, context, fmt).tpot_s
        role = "calibration" if b == 1 and batch1_calibrates else "predicted"
        out.append(Check(file, model, "colocated TPOT", b, 1, r["tpot_s"], pred, role))
    if af is None:
        return out
    for b, per_m in sorted(_rows(af["af"]).items()):
        for m_key, r in sorted(per_m.items(), key=lambda x: int(x[0])):
            m = int(m_key)
            pred = af_step(sh, k, profile.link, profile.af, 1, 1, m, b, context, fmt).tpot_s
            role = "calibration" if runtime_fit and (m > 1 or r.get("t_attn_s")) else "predicted"
            out.append(Check(file, model, "1A1F TPOT", b, m, r["tpot_s"], pred, role))
            caps = r["caps"]
            pairs = caps[0] * sh.top_k
            ffn = sh.num_moe_layers * len(caps) * k.moe_s(sh, caps[0], pairs, _random_ids_touched(sh, pairs))
            out.append(Check(file, model, "expert FFN", b, m, r["t_ffn_s"], ffn, "calibration" if m == 1 else "predicted"))
    return out


def format_checks(checks: list[Check]) -> str:
    head = f"{'run':<26} {'model':<14} {'figure':<15} {'batch':>5} {'m':>2} {'measured ms':>11} {'model ms':>9} {'error':>7}  role"
    lines = [head, "-" * len(head)]
    for c in checks:
        lines.append(f"{c.file:<26} {c.model:<14} {c.what:<15} {c.batch:>5} {c.micro_batches:>2} "
                     f"{c.measured_s * 1e3:>11.2f} {c.predicted_s * 1e3:>9.2f} {c.error:>+7.1%}  {c.role}")
    pred = [abs(c.error) for c in checks if c.role == "predicted"]
    if pred:
        lines.append(f"{len(pred)} predicted figures: median |error| {statistics.median(pred):.1%}, "
                     f"max {max(pred):.1%}, within 15%: {sum(e <= 0.15 for e in pred)}/{len(pred)}")
    return "\n".join(lines)


_KEEP_AF_ROW = ("tpot_s", "t_attn_s", "t_ffn_s", "caps", "transfer_bare_s")
_KEEP_ROUND_TRIP = ("runtime_rtt_s", "expert_compute_s", "bare_nccl_rtt_s", "dispatch_bytes", "combine_bytes")


def trim(run: dict) -> dict:
    """The fields of a stored run that profiles and checks read (the rest is left out)."""
    head = {k: run[k] for k in ("bench", "context", "copy_bytes_per_s")}
    steps = lambda rows: {b: {k: r[k] for k in ("tpot_s", "t_attn_s") if k in r} for b, r in rows.items()  # noqa: E731
                          if "tpot_s" in r}
    if run["bench"] == "gpu":
        return head | {"models": {m: {"afkv": steps(v["afkv"])} for m, v in run["models"].items()}}
    return head | {"model": run["model"], "colocated": steps(run["colocated"]),
                   "af": {b: {m: {k: r[k] for k in _KEEP_AF_ROW} for m, r in per_m.items()} for b, per_m in run["af"].items()},
                   "round_trip": [{k: rt[k] for k in _KEEP_ROUND_TRIP} for rt in run["round_trip"]]}


def machine_profile(name: str, runs: dict[str, dict], sets: tuple[RunSet, ...], **fields) -> Profile:
    """A profile of the machine of `runs` with one calibration per run set: attention points of
    the set's one-GPU run, FFN points of its 1A1F run and that one-GPU run's batch 1; the runtime
    constants fitted on RUNTIME_RUN."""
    records = []
    for s in sets:
        attention = table_of(runs[s.gpu_file], s.model)
        records.append(Records(shapes_of(s.model), attention, runs[s.af_file], attention["rows"].get("1")))
    return records_profile(name, records, fitted_runtime(runs), **fields)


def kv_format_costs(run: dict, kernels: Kernels) -> tuple[KVFormatCost, ...]:
    """Device KV formats from a `bench kv-quant` run (the same decode steps with the device tier
    in each format): the step-time difference to the model dtype is the difference in KV reads,
    so a format's read time = the model's bf16 KV read time + that difference."""
    w = run["workload"]
    rows = {r["format"]: r for r in run["rows"]}
    base = rows["auto"]
    kv_s = w["num_seqs"] * (w["context_len"] + 1) * base["kv_bytes_per_token"] / (kernels.kv_efficiency *
                                                                                  kernels.copy_bytes_per_s)
    out = [KVFormatCost("auto", 1.0, 1.0)]
    for name, r in rows.items():
        if name == "auto":
            continue
        ratio = r["kv_bytes_per_token"] / base["kv_bytes_per_token"]
        fmt_s = kv_s + (r["step_ms"] - base["step_ms"]) / 1e3
        out.append(KVFormatCost(name, ratio, ratio * kv_s / fmt_s))
    return tuple(out)
