"""Validation: the model against every colocated and 1A1F step stored in afkv/bench/results.

Calibration (fitted) and prediction are apart (afkv.plan.runs): every predicted figure must be
within 15% of the measured one, except the deviations listed here with their reason; those must
still be off (a model that comes to predict them should drop them from the list)."""

from pathlib import Path

import pytest

from afkv.plan.builtin import STORED_RUNS
from afkv.plan.runs import check_runs, format_checks, load_runs, trim

RESULTS = Path(__file__).resolve().parents[2] / "afkv" / "bench" / "results"
TOLERANCE = 0.15

# (file, figure, batch, micro-batches): why the model misses it
KNOWN_DEVIATIONS = {
    ("af-qwen3.json", "1A1F TPOT", 16, 1):
        "call 3 (unfused attention kernels): the graph step's round trip at 16 rows was ~370 us per layer, "
        "about twice the eager round trip the same run recorded (193 us), which the profile uses",
    ("af-qwen3.json", "1A1F TPOT", 16, 2):
        "the same: each of the two 8-row micro-batches paid the full-step round trip (87 ms = 2 x 44 ms)",
}


@pytest.fixture(scope="module")
def checks():
    return check_runs(RESULTS)


def test_every_stored_step_is_checked(checks):
    """Every colocated and 1A1F step of every stored run, Qwen3 and Mixtral, every batch and m."""
    runs = load_runs(RESULTS)
    want = 0
    for data in runs.values():
        if data["bench"] == "gpu":
            want += sum("tpot_s" in r for m in data["models"].values() for r in m["afkv"].values())
        else:
            want += sum("tpot_s" in r for r in data["colocated"].values())
            want += 2 * sum(len(per_m) for per_m in data["af"].values())  # TPOT and the expert FFN
    assert len(checks) == want
    assert {c.model for c in checks} == {"qwen3-30b-a3b", "mixtral-8x7b"}
    assert {c.micro_batches for c in checks if c.what == "1A1F TPOT"} == {1, 2}
    predicted = [c for c in checks if c.role == "predicted"]
    assert len(predicted) >= 40 and {c.what for c in predicted} == {"colocated TPOT", "1A1F TPOT", "expert FFN"}


def test_predictions_within_15_percent(checks):
    print("\n" + format_checks(checks))
    misses = {(c.file, c.what, c.batch, c.micro_batches): c.error for c in checks
              if c.role == "predicted" and abs(c.error) > TOLERANCE}
    assert set(misses) == set(KNOWN_DEVIATIONS), misses


def test_calibration_rows_fit(checks):
    """The fitted rows are not predictions, but a fit that misses them by much is a wrong form. The
    worst is af-mixtral.json's expert FFN at batch 256 (+16%): with torch grouped GEMMs its time fell
    from 34.9 to 33.4 ms as the batch grew from 16 to 256, which no sum of floors, bytes and FLOPs does."""
    assert max(abs(c.error) for c in checks if c.role == "calibration") <= 0.2


def test_builtin_records_are_the_stored_runs():
    runs = load_runs(RESULTS)
    for name, records in STORED_RUNS.items():
        assert trim(runs[name]) == records, name
