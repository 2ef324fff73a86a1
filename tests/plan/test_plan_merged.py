"""A plan made for merged expert batching writes the runtime's key, and afkv's loader reads it back."""

import dataclasses

from afkv.config import EngineConfig
from afkv.plan.builtin import builtin_profile
from afkv.plan.latency import Kind
from afkv.plan.planner import Cluster, Workload, format_plan, make_plan, to_toml
from afkv.plan.shapes import load_shapes


def _profile(batching: str, overlap: float):
    profile = builtin_profile("h200")
    return dataclasses.replace(profile, af=dataclasses.replace(profile.af, expert_batching=batching, overlap=overlap))


def _load(toml: str, tmp_path) -> EngineConfig:
    path = tmp_path / "plan.toml"
    path.write_text(toml)
    return EngineConfig.from_toml(path)


def test_a_merged_plan_writes_expert_batching_and_reads_back(tmp_path):
    plan = make_plan(load_shapes("mixtral-8x7b"), Cluster(_profile("merged", 1.0), 8), Workload(4096, 256))
    d = plan.chosen.deployment
    assert d.kind is Kind.AF and d.attention_gpus > d.expert_gpus  # the rA-1F-like bundles merged batching pays for
    toml = to_toml(plan)
    assert 'expert_batching = "merged"' in toml
    cfg = _load(toml, tmp_path)
    assert cfg.deployment.expert_batching == "merged"
    assert cfg.deployment.attention_nodes == d.attention_gpus and cfg.deployment.expert_nodes == d.expert_gpus
    text = format_plan(plan)
    assert "(not in afkv yet)" not in "\n".join(line for line in text.splitlines() if line.startswith(d.label))
    assert "not been measured on GPUs" in text


def test_a_per_node_plan_keeps_the_runtime_default(tmp_path):
    cluster = Cluster(builtin_profile("h100"), 4, host_memory_bytes_per_gpu=64 << 30)
    plan = make_plan(load_shapes("mixtral-8x7b"), cluster, Workload(4096, 256))
    assert plan.chosen.deployment.kind is Kind.AF
    toml = to_toml(plan)
    assert "expert_batching" not in toml
    assert _load(toml, tmp_path).deployment.expert_batching == "per_attention_node"
