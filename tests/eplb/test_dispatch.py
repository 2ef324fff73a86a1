import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from afkv.eplb import rebalance, split_among_replicas


@st.composite
def dispatch_args(draw):
    num_experts = draw(st.integers(1, 12))
    num_gpus = draw(st.sampled_from([1, 2, 4]))
    num_slots = num_gpus * (-(-num_experts // num_gpus) + draw(st.integers(0, 4)))
    expert_loads = draw(st.lists(st.integers(0, 100), min_size=num_experts, max_size=num_experts))
    placement = rebalance(torch.tensor([expert_loads]), num_slots, 1, 1, num_gpus)
    num_tokens = draw(st.integers(0, 40))
    top_k = draw(st.integers(1, min(4, num_experts)))
    size = num_tokens * top_k
    ids = draw(st.lists(st.integers(0, num_experts - 1), min_size=size, max_size=size))
    token_expert_ids = torch.tensor(ids, dtype=torch.int64).reshape(num_tokens, top_k)  # [T, k]
    return token_expert_ids, placement


@settings(max_examples=150, deadline=None)
@given(args=dispatch_args())
def test_slots_hold_the_expert_and_replicas_share_evenly(args):
    token_expert_ids, placement = args
    log2phy, logcnt, phy2log = placement.log2phy[0], placement.logcnt[0], placement.phy2log[0]
    slot_ids = split_among_replicas(token_expert_ids, log2phy, logcnt)  # [T, k]
    assert slot_ids.shape == token_expert_ids.shape and slot_ids.dtype == torch.int64
    assert torch.equal(phy2log[slot_ids], token_expert_ids)
    pairs_per_slot = torch.bincount(slot_ids.reshape(-1), minlength=placement.num_slots)  # [S]
    for expert in range(placement.num_experts):
        counts = pairs_per_slot[log2phy[expert, : logcnt[expert]]]  # [replicas]
        assert counts.max() - counts.min() <= 1
    assert torch.equal(split_among_replicas(token_expert_ids, log2phy, logcnt), slot_ids)
    assert torch.equal(split_among_replicas(token_expert_ids.int(), log2phy, logcnt), slot_ids)
    rotated = split_among_replicas(token_expert_ids, log2phy, logcnt, offset=5)  # [T, k]
    assert torch.equal(phy2log[rotated], token_expert_ids)
    pairs_per_slot = torch.bincount(rotated.reshape(-1), minlength=placement.num_slots)  # [S]
    for expert in range(placement.num_experts):
        counts = pairs_per_slot[log2phy[expert, : logcnt[expert]]]  # [replicas]
        assert counts.max() - counts.min() <= 1


def test_round_robin_in_row_major_order():
    log2phy = torch.tensor([[0, 2, 3], [1, -1, -1]])  # [2, 3]: expert 0 on slots 0, 2, 3
    logcnt = torch.tensor([3, 1])
    token_expert_ids = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])  # [4, 2]
    slot_ids = split_among_replicas(token_expert_ids, log2phy, logcnt)
    assert slot_ids.tolist() == [[0, 1], [2, 1], [1, 3], [0, 1]]


def test_offset_rotates_the_first_replica():
    log2phy = torch.tensor([[0, 2, 3]])  # [1, 3]
    logcnt = torch.tensor([3])
    single = torch.zeros(1, 1, dtype=torch.int64)  # [1, 1]: one token, expert 0
    firsts = [split_among_replicas(single, log2phy, logcnt, offset=step).item() for step in range(6)]
    assert firsts == [0, 2, 3, 0, 2, 3]
    assert split_among_replicas(single, log2phy, logcnt, offset=torch.tensor(4)).item() == 2


@pytest.mark.parametrize(
    "ids_shape, ids_dtype, log2phy_shape, logcnt_shape, match",
    [
        ((4,), torch.int64, (2, 1), (2,), "token_expert_ids"),
        ((4, 2), torch.float32, (2, 1), (2,), "token_expert_ids"),
        ((4, 2), torch.int64, (3, 2, 1), (2,), "log2phy"),
        ((4, 2), torch.int64, (2, 1), (3,), "logcnt"),
    ],
)
def test_rejects_bad_shapes(ids_shape, ids_dtype, log2phy_shape, logcnt_shape, match):
    ids = torch.zeros(ids_shape, dtype=ids_dtype)
    log2phy = torch.zeros(log2phy_shape, dtype=torch.int64)
    logcnt = torch.ones(logcnt_shape, dtype=torch.int64)
    with pytest.raises(ValueError, match=match):
        split_among_replicas(ids, log2phy, logcnt)
