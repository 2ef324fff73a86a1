"""KV pruning, unit level: policy selection, key mass, the manager's block drops and H2O
compaction (contents and accounting), and validation of pruning parameters."""

import math

import pytest
import torch

from afkv.config import EngineConfig, KVConfig
from afkv.engine.params import SamplingParams
from afkv.errors import ConfigError, InvalidSamplingParamsError
from afkv.kv.layout import KVLayout
from afkv.kv.manager import KVManager
from afkv.kv.pruning import KVPruning, h2o_keep, h2o_should_prune, streaming_drop
from afkv.ops.attention import paged_attention

BS = 4
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, block_size=BS, dtype=torch.float32)


# ---- policy selection ------------------------------------------------------------------------
def test_h2o_keeps_sinks_window_and_heaviest_middle_tokens():
    scores = torch.tensor([9.0, 1.0, 5.0, 3.0, 8.0, 2.0, 7.0, 0.0, 4.0, 6.0])
    spec = KVPruning("h2o", num_sink_tokens=1, window=2, budget=6)
    # sink: slot 0; window: slots 8, 9; 3 heavy hitters among slots 1..7 (scores 1 5 3 8 2 7 0): 4, 6, 2
    assert h2o_keep(scores, spec).tolist() == [0, 2, 4, 6, 8, 9]


def test_h2o_ignores_the_scores_of_sinks_and_window_and_breaks_ties_by_slot():
    scores = torch.tensor([0.0, 0.0, 3.0, 3.0, 3.0, 100.0, 100.0])
    spec = KVPruning("h2o", num_sink_tokens=2, window=2, budget=6)
    assert h2o_keep(scores, spec).tolist() == [0, 1, 2, 3, 5, 6]  # slot 4 ties with 2, 3 and loses
    assert h2o_keep(scores[:5], spec).tolist() == [0, 1, 2, 3, 4]  # under budget: everything


def test_h2o_prunes_once_a_whole_block_can_be_freed():
    spec = KVPruning("h2o", num_sink_tokens=1, window=2, budget=8)
    assert not h2o_should_prune(8 + BS - 1, BS, spec)
    assert h2o_should_prune(8 + BS, BS, spec)


def test_streaming_drops_the_full_blocks_between_sinks_and_window():
    spec = KVPruning("streaming", num_sink_tokens=2, window=6)
    assert streaming_drop(8, BS, spec) == range(1, 1)  # window reaches into block 0's neighbour
    assert streaming_drop(13, BS, spec) == range(1, 1)  # window starts at slot 7 (block 1)
    assert streaming_drop(14, BS, spec) == range(1, 2)  # window starts at slot 8: block 1 goes
    assert streaming_drop(30, BS, spec) == range(1, 6)  # window 24..29 lives in blocks 6, 7
    no_sinks = KVPruning("streaming", num_sink_tokens=0, window=4)
    assert streaming_drop(10, BS, no_sinks) == range(0, 1)
    five_sinks = KVPruning("streaming", num_sink_tokens=5, window=4)  # sinks take blocks 0 and 1 whole
    assert streaming_drop(20, BS, five_sinks) == range(2, 4)


# ---- key mass ------------------------------------------------------------------------------
def test_key_mass_equals_a_direct_softmax_and_the_output_matches_sdpa():
    torch.manual_seed(0)
    num_heads, hkv, d = 4, 2, 8
    kv = torch.randn(5, 1, 2, BS, hkv, d)  # 5 blocks, 1 layer
    block_ids = torch.tensor([3, 0, 4])  # context of 10 tokens over 3 blocks
    ctx, n = 10, 3
    q = torch.randn(n, num_heads, d)
    mass = torch.zeros(5, BS)
    mass[3, 0] = 0.5  # accumulates onto what is there
    out = paged_attention(q, kv, 0, block_ids, ctx, key_mass=mass)
    assert torch.allclose(out, paged_attention(q, kv, 0, block_ids, ctx), atol=1e-5)

    keys = kv[block_ids, 0, 0].flatten(0, 1)[:ctx]  # [10, Hkv, D]
    expected = torch.zeros(ctx)
    for h in range(num_heads):
        k = keys[:, h // (num_heads // hkv)]  # [10, D]
        for i in range(n):
            visible = ctx - n + i + 1
            p = torch.softmax(k[:visible] @ q[i, h] / math.sqrt(d), 0)
            expected[:visible] += p
    flat = torch.cat([mass[b] for b in block_ids.tolist()])[:ctx]
    expected[0] += 0.5
    assert torch.allclose(flat, expected, atol=1e-5)
    assert mass[1:3].abs().sum() == 0  # other blocks untouched
    assert float(mass.sum()) == pytest.approx(0.5 + n * num_heads, rel=1e-5)


# ---- the manager ----------------------------------------------------------------------------
def _fill(kv: KVManager, seq_id: int, num_slots: int, base: float) -> None:
    """Slot s of the sequence holds base + s in every element; its key mass is base + s too."""
    table = kv.block_table(seq_id)
    for s in range(num_slots):
        kv.kv[table[s // BS], :, :, s % BS] = base + s
        kv.key_mass[table[s // BS], s % BS] = base + s


def test_h2o_compaction_moves_the_kept_tokens_and_frees_blocks():
    kv = KVManager(LAYOUT, 16, torch.device("cpu"))
    spec = KVPruning("h2o", num_sink_tokens=1, window=2, budget=6)
    kv.match_prefix(0, list(range(12)), spec)  # H2O reuses no prefix
    assert kv.settle(0) == 0
    assert kv.allocate(0, 10)
    kv.flush()  # resets the new blocks' key mass, before the step that fills them
    assert kv.pool.num_free_blocks == 13
    table = list(kv.block_table(0))
    _fill(kv, 0, 10, 0.0)
    scores = [9.0, 1.0, 5.0, 3.0, 8.0, 2.0, 7.0, 0.0, 4.0, 6.0]
    for s, x in enumerate(scores):
        kv.key_mass[table[s // BS], s % BS] = x
    assert kv.prune(0, 9) == 0  # 9 < budget + block_size
    dropped = kv.prune(0, 10)
    assert dropped == 4
    assert kv.block_table(0) == table[:2]  # ceil(6 / 4) blocks stay
    assert kv.pool.num_free_blocks == 14
    kv.flush()  # the copy runs on the worker (inline here)
    kept = [0, 2, 4, 6, 8, 9]
    for j, s in enumerate(kept):
        block, off = table[j // BS], j % BS
        assert torch.all(kv.kv[block, :, :, off] == s), (j, s)
        assert kv.key_mass[block, off] == scores[s]
    kv.commit(0, list(range(12)), 12)  # a pruned sequence registers nothing
    assert not kv.pool._cached
    kv.check_invariants()
    kv.free(0)
    assert kv.pool.num_free_blocks == 16
    kv.check_invariants()


def test_new_blocks_of_h2o_sequences_start_with_zero_mass():
    kv = KVManager(LAYOUT, 4, torch.device("cpu"))
    kv.key_mass.fill_(3.0)  # stale mass of an earlier sequence
    kv.match_prefix(0, [1, 2, 3], KVPruning("h2o", 0, 1, 6))
    assert kv.allocate(0, 5)
    kv.match_prefix(1, [1, 2, 3])  # not H2O: its blocks are left alone
    assert kv.allocate(1, 3)
    kv.flush()
    for b in kv.block_table(0):
        assert torch.all(kv.key_mass[b] == 0)
    assert torch.all(kv.key_mass[kv.block_table(1)[0]] == 3.0)


def test_streaming_releases_shared_prefix_blocks_without_touching_them():
    kv = KVManager(LAYOUT, 16, torch.device("cpu"))
    prompt = list(range(100, 113))  # 13 tokens: 3 full blocks
    kv.match_prefix(0, prompt)
    assert kv.allocate(0, 13)
    kv.commit(0, prompt, 13)
    shared = kv.block_table(0)[:3]
    spec = KVPruning("streaming", num_sink_tokens=1, window=4)
    assert kv.match_prefix(1, prompt + [7, 8, 9], spec) == 12  # shares the 3 full blocks
    assert kv.allocate(1, 16)
    assert all(kv.pool.ref_count(b) == 2 for b in shared)
    before = kv.kv.clone()
    assert kv.prune(1, 16) == 8  # blocks 1 and 2 (slots 4..11) go; sink block 0 and window block 3 stay
    assert kv.num_dropped(1) == 8 and kv.num_dropped(0) == 0  # the one count, which the scheduler reads
    assert kv.block_table(1) == [shared[0], kv.block_table(1)[1]]
    assert [kv.pool.ref_count(b) for b in shared] == [2, 1, 1]
    kv.flush()
    assert torch.equal(kv.kv, before)  # block drops copy nothing
    hashed = len(kv.pool._cached)
    kv.commit(1, prompt + [7, 8, 9, 10, 11, 12, 13], 20)  # pruned: registers nothing more
    assert len(kv.pool._cached) == hashed
    kv.check_invariants()
    kv.free(1)
    kv.free(0)
    assert kv.pool.num_free_blocks == 16
    kv.check_invariants()


# ---- validation ------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, key", [
    (KVPruning("sliding"), "policy"),
    (KVPruning("streaming", window=0), "window"),
    (KVPruning("streaming", num_sink_tokens=-1), "num_sink_tokens"),
    (KVPruning("streaming", budget=64), "budget"),
    (KVPruning("h2o", num_sink_tokens=4, window=60, budget=64), "budget"),
    (KVPruning("h2o", window="8", budget=64), "window"),
])
def test_bad_pruning_params_are_typed_errors_naming_the_key(spec, key):
    with pytest.raises(InvalidSamplingParamsError, match=rf"pruning\.{key}"):
        SamplingParams(pruning=spec)
    with pytest.raises(ConfigError) as info:
        EngineConfig(kv=KVConfig(pruning=spec)).validate("x.toml")
    assert info.value.key == f"kv.pruning.{key}" and info.value.file == "x.toml"


def test_pruning_param_must_be_a_kvpruning():
    with pytest.raises(InvalidSamplingParamsError, match="KVPruning"):
        SamplingParams(pruning={"policy": "h2o"})


def test_kv_pruning_table_in_toml(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[kv]\nblock_size = 8\n[kv.pruning]\npolicy = "h2o"\nnum_sink_tokens = 2\nwindow = 16\nbudget = 64\n')
    cfg = EngineConfig.from_toml(path)
    assert cfg.kv.pruning == KVPruning("h2o", 2, 16, 64)
    assert EngineConfig().kv.pruning == KVPruning() and not KVPruning().enabled
    for body, key in [('policy = "streaming"\nbudget = 10', "kv.pruning.budget"),
                      ("window = -3", "kv.pruning.window"),
                      ("windows = 3", "kv.pruning.windows"),
                      ('num_sink_tokens = "4"', "kv.pruning.num_sink_tokens")]:
        path.write_text(f"[kv.pruning]\n{body}\n")
        with pytest.raises(ConfigError) as info:
            EngineConfig.from_toml(path)
        assert info.value.key == key and info.value.file == str(path), str(info.value)
    path.write_text('[kv]\npruning = "h2o"\n')
    with pytest.raises(ConfigError, match="must be a table"):
        EngineConfig.from_toml(path)


def test_pruning_preset_loads():
    from pathlib import Path

    cfg = EngineConfig.from_toml(Path(__file__).resolve().parents[2] / "configs" / "kv-pruning.toml")
    assert cfg.kv.pruning == KVPruning("h2o", num_sink_tokens=4, window=252, budget=1024)
