"""Profiles: built-in ones load from nothing, JSON round-trips, bad files are typed errors naming the key."""

import json

import pytest

from afkv.errors import ConfigError
from afkv.plan.builtin import builtin_profile
from afkv.plan.profile import SCHEMA, Profile, load_profile, save_profile
from afkv.plan.shapes import load_shapes


def test_builtin_profiles_fit_both_calibrated_models():
    h200 = builtin_profile("h200")
    assert {c.name for c in h200.calibrations} == {"qwen3-30b-a3b", "mixtral-8x7b"}
    assert set(h200.fits) == {"qwen3-30b-a3b", "mixtral-8x7b", "*"}
    k, source = h200.kernels(load_shapes("mixtral-8x7b"))
    assert source == "mixtral-8x7b" and 0.5 < k.kv_efficiency <= 1 and k.moe_flops_per_s <= k.gemm_flops_per_s
    assert 0 <= h200.af.overlap <= 1 and h200.af.step_overhead_s > 0 and h200.af.expert_batching == "per_attention_node"
    formats = {f.name: f for f in h200.kv_formats}
    assert formats["int8"].bytes_ratio == 0.75 and formats["int4"].bytes_ratio == 0.5
    assert formats["int4"].read_efficiency < formats["int8"].read_efficiency < 1  # measured: quantized reads are slower


def test_h100_is_the_h200_software_at_its_bandwidth():
    h200, h100 = builtin_profile("h200"), builtin_profile("h100")
    sh = load_shapes("qwen3-30b-a3b")
    k200, _ = h200.kernels(sh)
    k100, _ = h100.kernels(sh)
    assert h100.hbm_bytes < h200.hbm_bytes
    assert k100.copy_bytes_per_s == pytest.approx(k200.copy_bytes_per_s * 3.35 / 4.8)
    assert (k100.attn_floor_s, k100.kv_efficiency, k100.ffn_floor_s) == (k200.attn_floor_s, k200.kv_efficiency,
                                                                          k200.ffn_floor_s)
    assert "estimated" in h100.sources["copy_bytes_per_s"]


def test_unknown_builtin_is_a_config_error():
    with pytest.raises(ConfigError, match="no built-in profile 'a100'.*afkv bench calibrate"):
        builtin_profile("a100")


def test_json_round_trip(tmp_path):
    p = builtin_profile("h200")
    path = save_profile(p, tmp_path / "p.json")
    q = load_profile(path)
    assert q == p
    assert q.fits["*"] == p.fits["*"]
    assert json.loads(path.read_text())["schema"] == SCHEMA


@pytest.mark.parametrize("edit,key", [
    (lambda d: d.update(schema="afkv-profile/0"), "schema"),
    (lambda d: d.pop("copy_bytes_per_s"), "copy_bytes_per_s"),
    (lambda d: d.update(hbm_bytes=-1), "hbm_bytes"),
    (lambda d: d["calibrations"][0]["attention"][0].update(seconds=0), "calibrations[0].attention[0].seconds"),
    (lambda d: d["calibrations"][0]["ffn"][0].pop("touched"), "calibrations[0].ffn[0]"),
    (lambda d: d["af"].update(overlap=1.5), "af.overlap"),
    (lambda d: d["calibrations"][0].update(copy_bytes_per_s=True), "calibrations[0].copy_bytes_per_s"),
])
def test_bad_profiles_name_file_and_key(tmp_path, edit, key):
    data = builtin_profile("h200").to_json()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    assert err.value.file == str(path) and err.value.key == key


def test_missing_or_unreadable_profile(tmp_path):
    with pytest.raises(ConfigError, match="afkv bench calibrate"):
        load_profile(tmp_path / "none.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read the profile"):
        load_profile(tmp_path / "x.json")
    with pytest.raises(ConfigError, match="calibrations"):
        Profile.from_json(builtin_profile("h200").to_json() | {"calibrations": []})
