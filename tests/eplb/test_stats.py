import pytest
import torch

from afkv.eplb.stats import LoadWindow


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_window_sums_recent_counts_and_forgets_old_ones():
    clock = Clock()
    w = LoadWindow(2, 4, window_s=8.0, num_buckets=4, clock=clock)  # buckets of 2 s
    w.add(0, torch.tensor([1, 0, 0, 2]))
    clock.now += 3.0
    w.add(1, torch.tensor([0, 5, 0, 0]))
    w.add(0, torch.tensor([1, 0, 0, 0]))
    assert w.total().tolist() == [[2, 0, 0, 2], [0, 5, 0, 0]]
    clock.now += 6.0  # the first bucket (t=100) is now older than the window
    assert w.total().tolist() == [[1, 0, 0, 0], [0, 5, 0, 0]]
    clock.now += 2.5  # the same ring slot is reused for a new interval: old counts gone
    w.add(1, torch.tensor([0, 0, 3, 0]))
    assert w.total().tolist() == [[0, 0, 0, 0], [0, 0, 3, 0]]
    w.clear()
    assert int(w.total().sum()) == 0


def test_window_rejects_bad_arguments():
    with pytest.raises(ValueError, match="window_s"):
        LoadWindow(1, 1, window_s=0)
    with pytest.raises(ValueError, match="num_buckets"):
        LoadWindow(1, 1, window_s=1.0, num_buckets=0)
