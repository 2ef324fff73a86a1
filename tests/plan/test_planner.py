"""The planner: workload statistics, KV capacity, the choice, and a config afkv's loader accepts."""

import tomllib

import pytest

from afkv.config import EngineConfig
from afkv.errors import ConfigError
from afkv.plan.builtin import builtin_profile
from afkv.plan.latency import Deployment, Kind
from afkv.plan.planner import Cluster, Workload, evaluate, format_plan, kv_budget_bytes, make_plan, to_json, to_toml
from afkv.plan.shapes import load_shapes


def test_workload_mean_context_is_the_renewal_reward_load():
    assert Workload(1000, 100).context == 1000 + 101 / 2  # fixed D: P + (D + 1) / 2
    assert Workload(1000, 100, "geometric").context == 1100  # geometric D: P + E[D]
    assert Workload(1000, 100).max_len == 1100 and Workload(1000, 100, "geometric").max_len == 1000 + 461


@pytest.mark.parametrize("kwargs,key", [({"prompt_tokens": -1}, "prompt_tokens"), ({"output_tokens": 0}, "output_tokens"),
                                        ({"output_distribution": "zipf"}, "output_distribution"),
                                        ({"tpot_slo_s": 0.0}, "tpot_slo"), ({"prompt_tokens": True}, "prompt_tokens")])
def test_bad_workloads_are_typed_errors(kwargs, key):
    with pytest.raises(ConfigError) as err:
        Workload(**kwargs)
    assert err.value.key == key


def test_kv_capacity_matches_what_the_stored_runs_could_hold():
    """On one H200 at 2048 tokens of context the colocated step held 128 sequences but not 256 of
    Mixtral (KV did not fit beside the model), 256 but not 512 of Qwen3; the attention GPU of 1A1F
    held 384 and 512 (RESULTS.md)."""
    cluster = Cluster(builtin_profile("h200"), 2)
    for model, fits, too_many, af_held in (("mixtral-8x7b", 128, 256, 384), ("qwen3-30b-a3b", 256, 512, 512)):
        sh = load_shapes(model)
        seqs = kv_budget_bytes(sh, cluster, Deployment(Kind.COLOCATED)) / (2049 * sh.kv_bytes_per_token)
        assert fits < seqs < too_many, (model, seqs)
        attention_gpu = kv_budget_bytes(sh, cluster, Deployment(Kind.AF, 1, 1)) / (2049 * sh.kv_bytes_per_token)
        assert attention_gpu > af_held


def test_mixtral_on_two_h200s_colocated_is_bound_by_kv_and_beats_1a1f():
    """What the stored runs showed: colocated stops at the KV it holds, 1A1F reaches ~0.4x."""
    plan = make_plan(load_shapes("mixtral-8x7b"), Cluster(builtin_profile("h200"), 2), Workload(2048, 64))
    assert plan.chosen.deployment == Deployment(Kind.COLOCATED) and plan.colocated.regime == "memory"
    af = max((p for p in plan.predictions if p.deployment.kind is Kind.AF), key=lambda p: p.tok_s_per_gpu)
    assert 0.3 < af.tok_s_per_gpu / plan.colocated.tok_s_per_gpu < 0.6
    assert not any(p.deployment.kind is Kind.EP for p in plan.predictions if p is plan.chosen)


def _load(toml: str, tmp_path) -> EngineConfig:
    path = tmp_path / "plan.toml"
    path.write_text(toml)
    return EngineConfig.from_toml(path)


def test_an_af_choice_writes_a_config_afkv_loads(tmp_path):
    """Mixtral on four H100s: one H100 cannot hold the model, so colocated is out; the plan
    picks an rAyF bundle and writes devices, micro-batches and the KV budget for it."""
    cluster = Cluster(builtin_profile("h100"), 4, host_memory_bytes_per_gpu=64 << 30)
    plan = make_plan(load_shapes("mixtral-8x7b"), cluster, Workload(4096, 256))
    assert not plan.colocated.feasible and plan.colocated.regime == "weights leave no room for KV"
    d = plan.chosen.deployment
    assert d.kind is Kind.AF and d.gpus <= 4
    cfg = _load(to_toml(plan), tmp_path)
    assert cfg.deployment.attention_nodes == d.attention_gpus and cfg.deployment.expert_nodes == d.expert_gpus
    assert cfg.deployment.micro_batches == d.micro_batches
    assert len(set(cfg.deployment.attention_devices + cfg.deployment.expert_devices)) == d.gpus
    assert cfg.scheduler.max_num_seqs == plan.chosen.seqs and cfg.scheduler.max_model_len == 4352
    assert cfg.kv.device_memory_mib * 2**20 <= kv_budget_bytes(plan.shapes, cluster, d)
    assert cfg.kv.host_memory_mib == 32 * 1024 and cfg.kv.spill_format in ("none", "int8")


def test_a_colocated_choice_writes_kv_and_scheduler_only(tmp_path):
    plan = make_plan(load_shapes("qwen3-30b-a3b"), Cluster(builtin_profile("h200"), 1), Workload(1024, 128))
    assert plan.chosen.deployment.kind is Kind.COLOCATED
    cfg = _load(to_toml(plan), tmp_path)
    assert cfg.deployment is None and cfg.scheduler.max_num_seqs == plan.chosen.seqs
    text = format_plan(plan)
    assert "colocated DP" in text and "chosen: colocated DP" in text


def test_every_feasible_prediction_meets_the_slo_and_fits():
    w = Workload(8192, 512, "geometric", tpot_slo_s=0.08)
    plan = make_plan(load_shapes("qwen3-30b-a3b"), Cluster(builtin_profile("h200"), 8), w)
    for p in plan.predictions:
        if p.feasible:
            assert p.step.tpot_s <= w.tpot_slo_s and p.seqs <= p.kv_seqs
            assert p.regime in ("attention", "FFN", "communication", "memory")
    feasible = [p for p in plan.predictions if p.feasible]
    assert feasible == sorted(feasible, key=lambda p: -p.tok_s_per_gpu)
    assert plan.chosen.runnable and plan.chosen.tok_s_per_gpu == max(p.tok_s_per_gpu for p in feasible if p.runnable)
    data = to_json(plan)
    assert data["chosen"]["deployment"] == plan.chosen.deployment.label and data["toml"] == to_toml(plan)


def test_a_slower_bundle_that_leaves_gpus_idle_counts_them():
    cluster = Cluster(builtin_profile("h200"), 5)
    sh = load_shapes("qwen3-30b-a3b")
    k, _ = cluster.profile.kernels(sh)
    p = evaluate(sh, k, cluster, Workload(), Deployment(Kind.AF, 1, 1))
    assert p.bundles == 2 and p.tok_s_per_gpu == pytest.approx(
        p.seqs / p.step.tpot_s / 2 * 4 / 5)  # 2 bundles of 2 GPUs: one of 5 GPUs idle


def test_impossible_workloads_say_what_to_do():
    sh = load_shapes("mixtral-8x7b")
    with pytest.raises(ConfigError, match="relax the TPOT SLO"):
        make_plan(sh, Cluster(builtin_profile("h200"), 2), Workload(2048, 64, tpot_slo_s=0.001))
    with pytest.raises(ConfigError, match="past the model's 32768-token context"):
        make_plan(sh, Cluster(builtin_profile("h200"), 2), Workload(32768, 64))
    with pytest.raises(ConfigError, match="add GPUs"):
        make_plan(sh, Cluster(builtin_profile("h100"), 1), Workload())  # 93 GB of weights, one 80 GB GPU


def test_config_from_a_plan_parses_as_toml_with_comments():
    plan = make_plan(load_shapes("mixtral-8x7b"), Cluster(builtin_profile("h200"), 8), Workload(4096, 256))
    data = tomllib.loads(to_toml(plan))
    assert set(data) <= {"kv", "scheduler", "deployment"}
