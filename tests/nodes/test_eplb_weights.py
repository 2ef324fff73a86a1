"""EPLB weights: per-layer expert sets on an expert node, and experts copied between expert
nodes during a placement change (in-process expert nodes on loopback)."""

import pytest
import torch

from afkv.model.model import load_ffn_side
from afkv.nodes.expert import ExpertNode
from afkv.nodes.placement import contiguous_placement, eplb_placement
from afkv.nodes.transfer import ControlPlaneTransfer, NcclTransfer
from afkv.errors import TransportError
from afkv.transport.control import ControlClient

CPU = torch.device("cpu")


def _moved(spec, epoch=1):
    """2 nodes x 5 slots, different experts per layer (from contiguous shards 0-3 | 4-7, node 0
    gains 4, 7, 5 in layers 0, 1, 2 and node 1 gains 0, 3, then 1 and 2)."""
    rows = [[0, 1, 2, 3, 4, 0, 5, 6, 7, 4],
            [0, 1, 2, 3, 7, 4, 5, 6, 7, 3],
            [0, 1, 2, 3, 5, 1, 2, 4, 6, 7]]
    return eplb_placement(spec, 2, torch.tensor(rows[:spec.num_layers]), [0, 1], epoch=epoch)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


async def _nodes(spec, zipf_dir, placement, dtype=torch.float32):
    nodes = [ExpertNode(spec, zipf_dir, placement, j, CPU, dtype) for j in range(placement.num_nodes)]
    for n in nodes:
        await n.start()
    return nodes


async def _ask(node, msg):
    async with await ControlClient.connect("127.0.0.1", node.port, role="attention", node_id="test") as c:
        return await c.request(msg, 30.0)


def test_ffn_side_holds_exactly_the_per_layer_sets(spec, zipf_dir):
    held = {0: frozenset({1, 6}), 2: frozenset({3})}  # layer 1: none
    ffn = load_ffn_side(spec, zipf_dir, CPU, torch.float32, held, frozenset())
    assert [sorted(e) for e in ffn.experts] == [[1, 6], [], [3]]
    assert ffn.stacked[0].gate_up.shape[0] == 2 and ffn.stacked[1] is None and ffn.stacked[2].gate_up.shape[0] == 1
    # partial sums of complementary per-layer shards add up to the whole FFN
    full = load_ffn_side(spec, zipf_dir, CPU, torch.float32)
    rest = {layer: frozenset(range(spec.num_experts)) - held.get(layer, frozenset()) for layer in range(spec.num_layers)}
    other = load_ffn_side(spec, zipf_dir, CPU, torch.float32, rest, frozenset())
    x = torch.randn(5, spec.hidden_size, generator=torch.Generator().manual_seed(0))  # [T, H]
    ids = torch.tensor([[1, 3], [6, 0], [2, 3], [7, 1], [3, 6]])  # [T, k]
    w = torch.rand(5, 2, generator=torch.Generator().manual_seed(1))  # [T, k]
    for layer in range(spec.num_layers):
        torch.testing.assert_close(ffn.forward(layer, x, ids, w) + other.forward(layer, x, ids, w),
                                   full.forward(layer, x, ids, w))


async def test_expert_node_holds_its_slots_per_layer_and_copies_gained_experts_from_peers(spec, zipf_dir):
    old, new = contiguous_placement(spec, 2), _moved(spec)
    nodes = await _nodes(spec, zipf_dir, old, torch.bfloat16)
    try:
        for j, n in enumerate(nodes):
            assert [set(e) for e in n.holdings.ffn.experts] == [set(h) for h in old.held(j)]
        # the holders' copies differ from the checkpoint: only a copy from them can match
        for j, n in enumerate(nodes):
            for layer, experts in enumerate(n.holdings.ffn.experts):
                for e in experts:
                    n.holdings.ffn.expert_weights(layer, e)[0].add_(1.0)
        peers = [[j, "127.0.0.1", n.port] for j, n in enumerate(nodes)]
        for j, n in enumerate(nodes):
            reply = await _ask(n, {"type": "eplb_prepare", "placement": new.to_msg(), "peers": peers})
            assert reply["epoch"] == 0
        gained = {j: [(layer, e) for layer in range(spec.num_layers)
                      for e in new.held(j)[layer] - old.held(j)[layer]] for j in range(2)}
        assert gained == {0: [(0, 4), (1, 7), (2, 5)], 1: [(0, 0), (1, 3), (2, 1), (2, 2)]}
        for j, n in enumerate(nodes):
            holder = nodes[1 - j]
            for layer, e in gained[j]:
                for mine, theirs in zip(n.holdings.ffn.expert_weights(layer, e), holder.holdings.ffn.expert_weights(layer, e)):
                    assert mine.dtype == torch.bfloat16 and torch.equal(_bytes(mine), _bytes(theirs))
            stats = n.stats.snapshot()
            assert stats["experts_received"] == len(gained[j]) and stats["experts_from_checkpoint"] == 0
        for n in nodes:
            assert (await _ask(n, {"type": "eplb_commit", "epoch": 1}))["epoch"] == 1
        for j, n in enumerate(nodes):  # after the commit each layer holds exactly its slots
            assert [set(e) for e in n.holdings.ffn.experts] == [set(h) for h in new.held(j)]
            assert [len(e) for e in n.holdings.ffn.experts] == [s.gate_up.shape[0] for s in n.holdings.ffn.stacked]
    finally:
        for n in nodes:
            await n.aclose()


async def test_gained_experts_without_a_live_holder_come_from_the_checkpoint(spec, zipf_dir):
    old, new = contiguous_placement(spec, 2), _moved(spec)
    nodes = await _nodes(spec, zipf_dir, old)
    try:
        port = nodes[0].port
        await nodes[0].aclose()  # the only holder of node 1's gains is gone
        peers = [[0, "127.0.0.1", port], [1, "127.0.0.1", nodes[1].port]]
        await _ask(nodes[1], {"type": "eplb_set", "placement": new.to_msg(), "peers": peers})
        n = nodes[1]
        stats = n.stats.snapshot()
        assert stats["experts_received"] == 0 and stats["experts_from_checkpoint"] == 4
        ref = load_ffn_side(spec, zipf_dir, CPU, torch.float32)
        for layer, e in [(0, 0), (1, 3), (2, 1), (2, 2)]:
            for mine, want in zip(n.holdings.ffn.expert_weights(layer, e), ref.expert_weights(layer, e)):
                assert torch.equal(mine, want)
    finally:
        for n in nodes:
            await n.aclose()


async def test_transfer_splits_large_experts_into_bounded_frames(spec, zipf_dir):
    nodes = await _nodes(spec, zipf_dir, contiguous_placement(spec, 2))
    try:
        row_bytes = spec.hidden_size * 4
        transfer = ControlPlaneTransfer({0: ("127.0.0.1", nodes[0].port)}, "test", None, nodes[1]._executor, CPU,
                                        timeout_s=10.0, max_bytes=3 * row_bytes)  # three rows of gate_up per frame
        got, missing = await transfer.fetch(0, [(0, 1), (1, 3), (1, 6)])
        assert missing == [(1, 6)]  # held by node 1, not node 0
        assert sorted(got) == [(0, 1), (1, 3)]
        for (layer, e), pair in got.items():
            for mine, theirs in zip(pair, nodes[0].holdings.ffn.expert_weights(layer, e)):
                assert torch.equal(mine, theirs)
    finally:
        for n in nodes:
            await n.aclose()


async def test_nccl_transfer_falls_back_to_frames_when_the_holder_is_not_on_another_gpu(spec, zipf_dir):
    """The GPU transfer asks the holder first; a holder that cannot take part in an NCCL copy
    (here: on the CPU) says so, and the same experts come over the control plane instead."""
    nodes = await _nodes(spec, zipf_dir, contiguous_placement(spec, 2))
    try:
        peers = {0: ("127.0.0.1", nodes[0].port)}
        frames = ControlPlaneTransfer(peers, "test", None, nodes[1]._executor, CPU, timeout_s=10.0)
        transfer = NcclTransfer(peers, "test", None, device=CPU, gpu="", timeout_s=10.0, fallback=frames)
        got, missing = await transfer.fetch(0, [(0, 1), (2, 3), (1, 6)])
        assert missing == [(1, 6)] and sorted(got) == [(0, 1), (2, 3)]
        for (layer, e), pair in got.items():
            for mine, theirs in zip(pair, nodes[0].holdings.ffn.expert_weights(layer, e)):
                assert torch.equal(mine, theirs)
        assert transfer.nccl_bytes == 0
        reply = await _ask(nodes[0], {"type": "expert_weights_nccl", "experts": [[0, 1]], "nccl_id": "", "gpu": ""})
        assert reply == {"type": "unsupported", "reason": "expert node 0 is not on a GPU"}
        with pytest.raises(TransportError, match="malformed expert_weights_nccl"):
            await _ask(nodes[0], {"type": "expert_weights_nccl", "experts": [["x"]], "nccl_id": ""})
        assert (await _ask(nodes[0], {"type": "eplb_placement"}))["type"] == "placement"  # still serving
    finally:
        for n in nodes:
            await n.aclose()
