import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from afkv.eplb import Placement, balancedness, gpu_loads, naive_placement, rebalance, zipf_loads


@st.composite
def rebalance_args(draw):
    num_nodes = draw(st.sampled_from([1, 2, 4]))
    num_gpus = num_nodes * draw(st.integers(1, 4))
    num_groups = draw(st.sampled_from([1, 2, 3, 4, 8]))
    num_experts = num_groups * draw(st.integers(1, 6))
    num_slots = num_gpus * (-(-num_experts // num_gpus) + draw(st.integers(0, 3)))
    num_layers = draw(st.integers(1, 3))
    size = num_layers * num_experts
    values = draw(st.lists(st.integers(0, 1000), min_size=size, max_size=size))
    dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.float32, torch.float64]))
    loads = torch.tensor(values, dtype=dtype).reshape(num_layers, num_experts)  # [L, E]
    return loads, num_slots, num_groups, num_nodes, num_gpus


def assert_valid(placement, num_layers, num_experts, num_slots, num_gpus):
    L, E, S = num_layers, num_experts, num_slots
    R = S - E + 1
    for name in ("phy2log", "log2phy", "logcnt"):
        assert getattr(placement, name).dtype == torch.int64, name
    assert placement.phy2log.shape == (L, S)
    assert placement.log2phy.shape == (L, E, R)
    assert placement.logcnt.shape == (L, E)
    assert placement.num_gpus == num_gpus and placement.slots_per_gpu * num_gpus == S

    assert (placement.logcnt >= 1).all()
    assert (placement.logcnt.sum(1) == S).all()
    assert ((placement.phy2log >= 0) & (placement.phy2log < E)).all()
    counted = torch.zeros(L, E, dtype=torch.int64).scatter_add_(
        1, placement.phy2log, torch.ones_like(placement.phy2log)
    )  # [L, E]
    assert torch.equal(counted, placement.logcnt)

    used = torch.arange(R) < placement.logcnt.unsqueeze(-1)  # [L, E, R]
    assert (placement.log2phy[~used] == -1).all()
    layer_ids = torch.arange(L).view(L, 1, 1).expand(L, E, R)[used]  # [L*S]
    expert_ids = torch.arange(E).view(1, E, 1).expand(L, E, R)[used]  # [L*S]
    slot_ids = placement.log2phy[used]  # [L*S]
    assert (placement.phy2log[layer_ids, slot_ids] == expert_ids).all()
    assert torch.equal(slot_ids.view(L, S).sort(1).values, torch.arange(S).expand(L, S))
    replica_slots = placement.log2phy.masked_fill(~used, S)  # [L, E, R]
    assert (replica_slots[..., 1:] >= replica_slots[..., :-1]).all(), "replica slots ascend"


@settings(max_examples=150, deadline=None)
@given(args=rebalance_args())
def test_rebalance_gives_a_consistent_placement(args):
    loads, num_slots, num_groups, num_nodes, num_gpus = args
    placement = rebalance(loads, num_slots, num_groups, num_nodes, num_gpus)
    assert_valid(placement, *loads.shape, num_slots, num_gpus)
    again = rebalance(loads, num_slots, num_groups, num_nodes, num_gpus)
    assert torch.equal(again.phy2log, placement.phy2log)


@settings(max_examples=150, deadline=None)
@given(args=rebalance_args())
def test_hierarchical_policy_keeps_each_group_on_one_node(args):
    loads, num_slots, num_groups, num_nodes, num_gpus = args
    assume(num_groups % num_nodes == 0)
    placement = rebalance(loads, num_slots, num_groups, num_nodes, num_gpus)
    experts_per_group = loads.shape[1] // num_groups
    node_of_slot = torch.arange(num_slots) // (num_slots // num_nodes)  # [S]
    group_of_slot = placement.phy2log // experts_per_group  # [L, S]
    for layer in range(loads.shape[0]):
        for group in range(num_groups):
            nodes = node_of_slot[group_of_slot[layer] == group].unique()
            assert nodes.numel() == 1, (layer, group, nodes)
        for node in range(num_nodes):
            experts = placement.phy2log[layer, node_of_slot == node].unique()
            assert experts.numel() == loads.shape[1] // num_nodes


def packing_lower_bound(loads, placement, num_nodes):
    """[L] heaviest GPU load that no equal-count packing of these replicas
    onto each node's GPUs can beat.

    Per node, with n GPUs of k slots and replica loads r1 >= r2 >= ...:
    - some GPU carries at least the node's mean, sum(r) / n;
    - for j < k, some GPU holds j + 1 of the top j*n + 1 replicas (pigeonhole),
      so it carries >= (j + 1) * r_{j*n+1} plus its other k - j - 1 replicas,
      which weigh at least the k - j - 1 lightest of the node.
    It judges the packing step given the replicas rebalance chose; it is not
    a bound over all replica choices (the greedy replication can be beaten).
    """
    num_layers, num_slots = placement.phy2log.shape
    gpus_per_node = placement.num_gpus // num_nodes
    slots_per_gpu = placement.slots_per_gpu
    slots_per_node = num_slots // num_nodes
    replica_loads = (loads.double() / placement.logcnt).gather(1, placement.phy2log)  # [L, S]
    replica_loads = replica_loads.reshape(num_layers, num_nodes, slots_per_node)  # [L, N, S/N]
    replica_loads = replica_loads.sort(-1, descending=True).values
    bound = replica_loads.sum(-1) / gpus_per_node  # [L, N]
    for j in range(slots_per_gpu):
        num_light = slots_per_gpu - 1 - j
        lightest = replica_loads[..., slots_per_node - num_light :].sum(-1) if num_light else 0.0
        bound = torch.maximum(bound, (j + 1) * replica_loads[..., j * gpus_per_node] + lightest)
    return bound.amax(-1)  # [L]


QUALITY_CONFIGS = [
    # experts, gpus, slots, groups, nodes
    (64, 4, 64, 8, 1),
    (64, 4, 80, 8, 2),
    (64, 4, 80, 1, 1),
    (64, 8, 96, 8, 4),
    (64, 8, 72, 8, 2),
    (48, 8, 64, 6, 4),  # 6 groups over 4 nodes: global policy
    (128, 16, 160, 8, 2),
    (256, 32, 288, 8, 4),  # DeepSeek-V3 shaped: 8 groups, 4 nodes of 8 GPUs, 9 slots each
]


@pytest.mark.parametrize("config", QUALITY_CONFIGS)
@pytest.mark.parametrize("exponent", [0.5, 1.0, 1.5])
def test_packing_is_within_1_3_of_the_best_packing_of_its_replicas(config, exponent):
    num_experts, num_gpus, num_slots, num_groups, num_nodes = config
    for seed in range(2):
        loads = zipf_loads(4, num_experts, exponent, total_tokens=100_000, seed=seed)  # [L, E]
        placement = rebalance(loads, num_slots, num_groups, num_nodes, num_gpus)
        policy_nodes = num_nodes if num_groups % num_nodes == 0 else 1
        heaviest_gpu = gpu_loads(loads, placement).amax(-1)  # [L]
        assert (heaviest_gpu <= 1.3 * packing_lower_bound(loads, placement, policy_nodes) + 1e-6).all()


@pytest.mark.parametrize("config", [c for c in QUALITY_CONFIGS if c[0] % c[1] == 0])
@pytest.mark.parametrize("exponent", [0.5, 1.0, 1.5])
def test_rebalance_beats_the_naive_placement_on_skewed_loads(config, exponent):
    num_experts, num_gpus, num_slots, num_groups, num_nodes = config
    loads = zipf_loads(8, num_experts, exponent, total_tokens=100_000, seed=7)  # [L, E]
    naive = balancedness(loads, naive_placement(num_experts, 8, num_gpus=num_gpus))  # [L]
    placed = balancedness(loads, rebalance(loads, num_slots, num_groups, num_nodes, num_gpus))  # [L]
    assert placed.mean() < naive.mean()
    assert (placed <= naive + 1e-9).all()


@pytest.mark.parametrize(
    "num_groups, num_nodes, exponent",
    [(1, 1, e) for e in (0.5, 1.0, 1.5)] + [(8, 1, e) for e in (0.5, 1.0, 1.5)] + [(8, 2, 0.5), (8, 2, 1.0)],
)
def test_headline_config_is_within_1_3_of_perfect(num_groups, num_nodes, exponent):
    """64 experts, 4 GPUs, 80 slots: heaviest GPU <= 1.3 x total / num_gpus,
    a bound no placement can beat; the naive placement misses it.

    Left out: 2 nodes at exponent 1.5. The hottest of 8 groups then carries
    44-63% of a layer's load, and since a group stays on one node, that node
    carries up to 71% (seed 0), so its GPUs reach 1.42 x the mean however the
    node places its replicas. The packing test covers that case.
    """
    loads = zipf_loads(16, 64, exponent, total_tokens=100_000, seed=3)  # [L, E]
    placed = balancedness(loads, rebalance(loads, 80, num_groups, num_nodes, 4))
    assert (placed <= 1.3).all()
    if exponent >= 1.0:
        assert (balancedness(loads, naive_placement(64, 16, num_gpus=4)) > 1.3).any()


def test_balancedness_splits_load_evenly_over_replicas():
    loads = torch.tensor([[6, 0, 1, 1]])  # [1, 4]
    naive = naive_placement(4, 1, num_gpus=2)
    assert gpu_loads(loads, naive).tolist() == [[6.0, 2.0]]
    assert balancedness(loads, naive).tolist() == [1.5]
    placement = rebalance(loads, num_slots=6, num_groups=1, num_nodes=1, num_gpus=2)
    assert placement.logcnt.tolist() == [[2, 1, 2, 1]]  # replicas of 3, 0, .5, .5, 1 and 3 tokens
    assert gpu_loads(loads, placement).tolist() == [[4.0, 4.0]]
    assert balancedness(loads, placement).tolist() == [1.0]


def test_balancedness_of_an_idle_layer_is_one():
    loads = torch.zeros(2, 4)
    assert balancedness(loads, naive_placement(4, 2, num_gpus=2)).tolist() == [1.0, 1.0]


def test_naive_placement_is_identity_without_replicas():
    placement = naive_placement(8, 3, num_gpus=4)
    assert_valid(placement, 3, 8, 8, 4)
    assert torch.equal(placement.phy2log, torch.arange(8).expand(3, 8))
    assert torch.equal(placement.log2phy[..., 0], torch.arange(8).expand(3, 8))


def test_global_policy_replicates_the_hottest_expert_across_gpus():
    loads = torch.tensor([[1000, 10, 10, 10, 10, 10, 10, 10]])  # [1, 8]
    placement = rebalance(loads, num_slots=12, num_groups=1, num_nodes=1, num_gpus=4)
    assert placement.logcnt[0].tolist() == [4, 2, 1, 1, 1, 1, 1, 1]  # at most one replica per GPU
    hot_slots = placement.log2phy[0, 0, : placement.logcnt[0, 0]]
    assert (hot_slots // placement.slots_per_gpu).unique().numel() == 4


GOOD = dict(loads=torch.ones(2, 8), num_slots=8, num_groups=2, num_nodes=1, num_gpus=2)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(num_slots=9), "num_slots"),
        (dict(num_slots=6), "num_slots"),
        (dict(num_slots=0), "num_slots"),
        (dict(num_slots=8.0), "num_slots"),
        (dict(num_slots=True), "num_slots"),
        (dict(num_gpus=3, num_nodes=2), "num_gpus"),
        (dict(num_gpus=-2), "num_gpus"),
        (dict(num_groups=3), "num_groups"),
        (dict(num_nodes=0), "num_nodes"),
        (dict(loads=-torch.ones(2, 8)), "loads"),
        (dict(loads=torch.full((2, 8), float("nan"))), "loads"),
        (dict(loads=torch.ones(8)), "loads"),
        (dict(loads=torch.ones(2, 0)), "loads"),
        (dict(loads=[[1.0] * 8]), "loads"),
    ],
)
def test_rebalance_rejects_bad_arguments(change, match):
    with pytest.raises(ValueError, match=match):
        rebalance(**{**GOOD, **change})


def test_other_misuse_names_the_argument():
    with pytest.raises(ValueError, match="num_experts"):
        naive_placement(6, 1, num_gpus=4)
    with pytest.raises(ValueError, match="loads"):
        gpu_loads(torch.ones(2, 4), naive_placement(8, 2, num_gpus=2))
    placement = naive_placement(8, 2, num_gpus=2)
    with pytest.raises(ValueError, match="logcnt"):
        Placement(placement.phy2log, placement.log2phy, placement.logcnt.int(), num_gpus=2)
    with pytest.raises(ValueError, match="num_slots"):
        Placement(placement.phy2log, placement.log2phy, placement.logcnt, num_gpus=3)
