"""`afkv plan`: a calibrated per-layer latency model that chooses the deployment.

Given a model, a cluster and a workload, it predicts tokens/s per GPU, TPOT and KV capacity of
colocated data parallel, expert parallel and every rAyF topology with m micro-batches, marks what
bounds each (attention, FFN, communication, memory), and writes the chosen [kv], [scheduler] and
[deployment] sections. Kernel times come from a profile: points measured by `afkv bench
calibrate`, or the built-in H200 (afkv's stored runs) and H100 (scaled) profiles. `afkv plan
--check-runs afkv/bench/results` puts the model against every stored GPU step.

Layer map (a leaf: reads afkv.model.spec / afkv.model.random and afkv.errors; only the CLI and
afkv.bench import it; modules import only downwards):

    planner   candidates, the best batch of each within SLO and KV, the choice, TOML / JSON / table
       |
    builtin   h200 / h100 profiles from the stored runs' records
       |
    runs      stored `bench gpu` / `bench af` JSON -> profiles; predicted vs measured
       |
    latency   one decode step: colocated, EP, rAyF with m micro-batches; the closed-form r*
       |
    profile   Profile (versioned JSON), Calibration, AfRuntime, KVFormatCost
       |
    kernels   per-layer kernel curves and their fits; links
       |
    shapes    bytes and FLOPs per layer and token of a ModelSpec
"""

from afkv.plan.builtin import builtin_profile
from afkv.plan.latency import Deployment, Kind, Step
from afkv.plan.planner import Cluster, Plan, Prediction, Workload, format_plan, make_plan, to_json, to_toml
from afkv.plan.profile import Profile, load_profile, save_profile
from afkv.plan.shapes import Shapes, load_shapes

__all__ = [
    "Cluster", "Deployment", "Kind", "Plan", "Prediction", "Profile", "Shapes", "Step", "Workload",
    "builtin_profile", "format_plan", "load_profile", "load_shapes", "make_plan", "save_profile", "to_json", "to_toml",
]
