"""The automatic micro-batch count: measured candidates, the fastest kept, measured again."""

import pytest

from afkv.engine.micro_batches import MicroBatchTuner


def run(tuner: MicroBatchTuner, rows: int, cost: dict[int, float], steps: int, decode_only: bool = True) -> list[int]:
    """`steps` steps of `rows` rows whose seconds per step are cost[m] -> the m of each step."""
    used = []
    for _ in range(steps):
        m = tuner.choose(rows)
        used.append(m)
        tuner.observe(rows, m, cost[m], decode_only)
    return used


def test_weight_bound_experts_keep_one_micro_batch():
    # m = 2 reads the experts' weights twice: slower, as measured on 2x H200
    tuner = MicroBatchTuner(warmup=2, trials=3, period=1000)
    used = run(tuner, 64, {1: 0.020, 2: 0.031}, 10)
    assert sorted(set(used)) == [1, 2]  # both measured: (2 warm-up + 3 counted) each
    assert used.count(1) == used.count(2) == 5
    assert tuner.choices == {64: 1}
    assert run(tuner, 64, {1: 0.020, 2: 0.031}, 20) == [1] * 20


def test_overlap_that_pays_keeps_its_m_and_the_rule_is_a_candidate():
    tuner = MicroBatchTuner(warmup=1, trials=2, period=1000)
    tuner.rule_m = 3
    assert tuner.candidates(200) == [1, 2, 3]
    assert tuner.candidates(1) == [1]  # never more micro-batches than rows
    assert tuner.candidates(2) == [1, 2]
    run(tuner, 200, {1: 0.030, 2: 0.024, 3: 0.022}, 9)
    assert tuner.choices == {256: 3}
    assert tuner.choose(150) == 3  # same bucket
    assert tuner.choose(300) in (1, 2, 3) and 512 not in tuner.choices  # another bucket measures its own


def test_warm_up_steps_are_not_counted():
    # the first step of each m captures a CUDA graph: slow, must not decide
    tuner = MicroBatchTuner(warmup=1, trials=2, period=1000)
    seen = {1: 0, 2: 0}
    for _ in range(6):
        m = tuner.choose(8)
        seen[m] += 1
        tuner.observe(8, m, (5.0 if m == 2 else 1.0) if seen[m] == 1 else (0.010 if m == 2 else 0.012), True)
    assert tuner.choices == {8: 2}


def test_prefill_steps_are_not_counted_and_use_the_bucket_choice():
    tuner = MicroBatchTuner(warmup=0, trials=2, period=1000)
    run(tuner, 4, {1: 0.5, 2: 0.1}, 10, decode_only=False)
    assert tuner.choices == {}  # nothing counted
    run(tuner, 4, {1: 0.5, 2: 0.1}, 4)
    assert tuner.choices == {4: 2}
    assert tuner.choose(4) == 2


def test_measures_again_after_the_period():
    tuner = MicroBatchTuner(warmup=0, trials=2, period=5)
    run(tuner, 16, {1: 0.01, 2: 0.02}, 4)
    assert tuner.choices == {16: 1}
    run(tuner, 16, {1: 0.01, 2: 0.02}, 5)  # the period ends: the bucket measures again
    assert tuner.choices == {}
    used = run(tuner, 16, {1: 0.03, 2: 0.02}, 4)  # the load changed: m = 2 is now faster
    assert sorted(set(used)) == [1, 2]
    assert tuner.choices == {16: 2}


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="trials"):
        MicroBatchTuner(trials=0)
