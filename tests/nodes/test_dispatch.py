"""The routing rule and per-peer dispatch of the data plane (afkv.nodes.dispatch), against a
plain-Python reference of the documented rule."""

import pytest
import torch

from afkv.model.spec import ModelSpec
from afkv.nodes.dispatch import DispatchTables, capacity, combine, pack, peer_capacity, row_shares
from afkv.nodes.placement import contiguous_placement, eplb_placement


def _spec(num_experts=8, top_k=2, layers=2, shared=0):
    return ModelSpec(family="mixtral", vocab_size=64, hidden_size=16, num_layers=layers, num_heads=2,
                     num_kv_heads=1, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e4, max_position=64,
                     tie_embeddings=False, qkv_bias=False, qk_norm=False, sliding_window=None,
                     intermediate_size=32, num_experts=num_experts, top_k=top_k, moe_intermediate_size=32,
                     norm_topk_prob=True, shared_expert_intermediate_size=shared,
                     sparse_layers=(True,) * layers, bos_token_id=None, eos_token_ids=())


def _buffers(num_peers, cap, n, hidden, k):
    return (torch.zeros(num_peers, cap, dtype=torch.int64), torch.zeros(num_peers, cap, hidden),
            torch.zeros(num_peers, cap, k, dtype=torch.int32), torch.zeros(num_peers, cap, k))


def _expert(e: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A stand-in expert: a different function of x per expert id."""
    return torch.tanh(x * (e[:, None].float() + 1.0))


def _partial(x, ids, w, sentinel):
    """What an expert node returns: the weighted sum over the pairs it was given."""
    y = torch.zeros_like(x)
    for i in range(ids.shape[1]):
        real = ids[:, i] != sentinel
        y += torch.where(real[:, None], w[:, i:i + 1] * _expert(ids[:, i], x), 0.0)
    return y


def _reference_route(p, layer, ids, offset, dead):
    """The rule as documented, one pair at a time: the n-th pair of an expert (row-major)
    goes to its live replica (n + offset) % (live replicas), in replica order; -1 for the
    sentinel and for an expert without a live replica."""
    out = torch.full_like(ids, -1)
    seen: dict[int, int] = {}
    for r in range(ids.shape[0]):
        for c in range(ids.shape[1]):
            e = int(ids[r, c])
            if e == p.sentinel:
                continue
            live = [int(n) for n in p.replica_nodes[layer, e] if n >= 0 and int(n) not in dead]
            n = seen.get(e, 0)
            seen[e] = n + 1
            if live:
                out[r, c] = live[(n + offset) % len(live)]
    return out


@pytest.mark.parametrize("offset", [0, 3])
def test_assign_follows_the_rule_with_replicas_and_dead_nodes(offset):
    spec = _spec()
    phy2log = torch.tensor([[0, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2]] * spec.num_layers)  # 3 nodes x 4 slots
    p = eplb_placement(spec, 3, phy2log, [0, 1, 2], epoch=1)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8, (40, 2), generator=gen)
    ids[5, 1] = p.sentinel
    holder = int(p.replica_nodes[0, 5, 0])  # expert 5 has one replica
    for dead in (frozenset(), frozenset({1}), frozenset({holder})):
        t = DispatchTables(p, torch.device("cpu"), dead)
        want = _reference_route(p, 0, ids, offset, dead)
        assert torch.equal(t.assign(0, ids, torch.tensor(offset)), want)
        # a row needing an expert without a live replica is lost, naming the lowest such expert
        missing = (want == -1) & (ids != p.sentinel)  # [T, k]
        codes = t.lost_code(0, ids)
        for r in range(ids.shape[0]):
            if not bool(missing[r].any()):
                assert codes[r] == 0
                continue
            exc = t.lost_error(int(codes[r]))
            assert (exc.layer, exc.expert) == (0, int(ids[r][missing[r]].min()))
            assert set(exc.nodes) <= dead and "no live replica" in str(exc)
        assert bool(missing.any()) == (holder in dead)


def test_lost_dense_part_names_its_node():
    spec = _spec(shared=16)  # a shared expert per layer, on node dense_node[layer]
    p = contiguous_placement(spec, 2)
    home = p.dense_node[1]
    t = DispatchTables(p, torch.device("cpu"), frozenset({home}))
    ids = torch.tensor([[0, 1], [6, 7]])
    codes = t.lost_code(1, ids)
    assert bool((codes > 0).all())
    exc = t.lost_error(int(codes[0]))
    assert (exc.layer, exc.expert, exc.nodes) == (1, None, (home,))
    assert f"lives only on expert node {home}" in str(exc)


def test_pack_sends_each_peer_only_its_rows_and_combine_restores_the_sum():
    spec = _spec(num_experts=8, top_k=2)
    p = contiguous_placement(spec, 4)  # 2 experts per node
    t = DispatchTables(p, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    n, hidden, k = 24, 16, 2
    x = torch.randn(n, hidden, generator=gen)
    ids = torch.stack([torch.randperm(8, generator=gen)[:k] for _ in range(n)])  # [n, k]
    w = torch.rand(n, k, generator=gen)
    node = t.assign(0, ids)
    cap = 32
    src, xb, idsb, wb = _buffers(4, cap, n, hidden, k)
    need = pack(node, ids, w, x, -1, p.sentinel, torch.full((4,), cap), src, xb, idsb, wb)
    for j in range(4):
        rows = (node == j).any(-1).nonzero().flatten()  # the reference: rows with a pair for node j, in order
        assert need[j] == rows.numel()
        assert src[j, : rows.numel()].tolist() == rows.tolist() and bool((src[j, rows.numel():] == n).all())
        assert torch.equal(xb[j, : rows.numel()], x[rows])
        mine = node[rows] == j
        assert torch.equal(idsb[j, : rows.numel()].long(), torch.where(mine, ids[rows], p.sentinel))
        assert bool((idsb[j, rows.numel():] == p.sentinel).all()) and bool((wb[j, rows.numel():] == 0).all())
    assert int(need.sum()) < 4 * n  # rows go only where they have work
    ys = [_partial(xb[j], idsb[j].long(), wb[j], p.sentinel) for j in range(4)]
    expected = _partial(x, ids, w, p.sentinel)  # colocated: every pair on one node
    assert torch.allclose(combine(ys, src, n), expected, atol=1e-6)


def test_pack_dense_home_gets_every_row_and_overflow_is_counted():
    spec = _spec(num_experts=8, top_k=2)
    p = contiguous_placement(spec, 2)
    t = DispatchTables(p, torch.device("cpu"))
    n, hidden, k = 20, 16, 2
    ids = torch.tensor([[0, 1]] * 15 + [[4, 5]] * 5)  # node 0 needs 15 rows, node 1 needs 5
    x, w = torch.randn(n, hidden), torch.rand(n, k)
    node = t.assign(0, ids)
    src, xb, idsb, wb = _buffers(2, 16, n, hidden, k)
    caps = torch.tensor([8, 16])  # node 0's buffer is too small
    need = pack(node, ids, w, x, 1, p.sentinel, caps, src, xb, idsb, wb)  # node 1: the layer's shared expert
    assert need.tolist() == [15, 20] and (need > caps).tolist() == [True, True]
    assert src[0, :8].tolist() == list(range(8))  # the first rows that fit; the rest are not sent
    assert src[1].tolist() == list(range(16))  # every row (the shared expert), up to its capacity


def test_capacities_cover_uniform_routing_and_drop_bytes():
    spec = _spec(num_experts=64, top_k=4, layers=1)
    p = contiguous_placement(spec, 8)
    shares = row_shares(p, 4)
    expected = 1 - (56 * 55 * 54 * 53) / (64 * 63 * 62 * 61)  # k distinct experts, none of the node's 8
    assert shares == pytest.approx([expected] * 8, rel=1e-9)
    cap = peer_capacity(capacity(256), shares[0])
    assert cap < 256  # a node gets fewer than all the rows
    t = DispatchTables(p, torch.device("cpu"))
    gen = torch.Generator().manual_seed(2)
    worst = 0
    for _ in range(200):  # uniform routing: the bound holds
        ids = torch.stack([torch.randperm(64, generator=gen)[:4] for _ in range(256)])
        node = t.assign(0, ids)
        worst = max(worst, int((node[None] == torch.arange(8)[:, None, None]).any(-1).sum(1).max()))
    assert worst <= cap
    assert peer_capacity(64, 0.5, fixed=0.25) == 16 and peer_capacity(64, 0.5, fixed=0.25, seen=0.6) == 40
    assert peer_capacity(16, 0.99) == 16  # never above the micro-batch
