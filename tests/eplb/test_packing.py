import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from afkv.eplb.packing import pack_equal_counts, replica_counts


@settings(max_examples=100, deadline=None)
@given(num_packs=st.integers(1, 6), items_per_pack=st.integers(1, 4), data=st.data())
def test_pack_equal_counts_fills_every_pack_equally(num_packs, items_per_pack, data):
    size = num_packs * items_per_pack
    weights = data.draw(st.lists(st.floats(0, 1000), min_size=size, max_size=size))
    pack_ids = pack_equal_counts(weights, num_packs)
    assert sorted(pack_ids) == sorted(list(range(num_packs)) * (len(weights) // num_packs))
    assert pack_equal_counts(weights, num_packs) == pack_ids


def test_pack_equal_counts_pairs_heavy_with_light():
    assert pack_equal_counts([10.0, 1.0, 9.0, 2.0], 2) == [0, 0, 1, 1]


def _best_max_per_replica(weights, num_slots):
    best = float("inf")
    for extra in itertools.product(range(num_slots - len(weights) + 1), repeat=len(weights)):
        if sum(extra) == num_slots - len(weights):
            best = min(best, max(w / (1 + x) for w, x in zip(weights, extra, strict=True)))
    return best


@settings(max_examples=100, deadline=None)
@given(weights=st.lists(st.integers(0, 100), min_size=1, max_size=4), spare=st.integers(0, 5))
def test_replica_counts_minimises_heaviest_replica_when_cap_does_not_bind(weights, spare):
    num_slots = len(weights) + spare
    counts = replica_counts([float(w) for w in weights], num_slots, num_gpus=num_slots)
    assert sum(counts) == num_slots and min(counts) >= 1
    heaviest = max(w / c for w, c in zip(weights, counts, strict=True))
    assert heaviest == _best_max_per_replica(weights, num_slots)


def test_replica_counts_caps_at_num_gpus_until_every_expert_reaches_it():
    assert replica_counts([100.0, 1.0, 1.0], 7, num_gpus=2) == [3, 2, 2]
    assert replica_counts([100.0, 1.0, 1.0], 5, num_gpus=2) == [2, 2, 1]
    assert replica_counts([100.0, 1.0, 1.0], 5, num_gpus=8) == [3, 1, 1]
