"""Holdings' kept placements: kept while a linked attention node may still step with them,
retired once every linked node moved past them, or left (its data plane dropped)."""

import dataclasses

import torch

from afkv.model.spec import ModelSpec
from afkv.nodes.expert_stats import ExpertStats
from afkv.nodes.holdings import Holdings
from afkv.nodes.placement import contiguous_placement


def _holdings() -> Holdings:
    spec = ModelSpec(family="mixtral", vocab_size=64, hidden_size=16, num_layers=2, num_heads=2,
                     num_kv_heads=1, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e4, max_position=64,
                     tie_embeddings=False, qkv_bias=False, qk_norm=False, sliding_window=None,
                     intermediate_size=32, num_experts=8, top_k=2, moe_intermediate_size=32,
                     norm_topk_prob=True, shared_expert_intermediate_size=0,
                     sparse_layers=(True, True), bos_token_id=None, eos_token_ids=())
    old = contiguous_placement(spec, 2)
    h = Holdings(spec, "unused", dataclasses.replace(old, epoch=1), 0, torch.device("cpu"), torch.float32,
                 ExpertStats(), None, 5.0)
    h._kept = {0: old}  # epoch 0 kept: an attention node may still step with it
    h.load = lambda received=None: None  # no checkpoint: only the bookkeeping is under test
    return h


def test_a_departed_attention_node_no_longer_keeps_an_old_placement():
    h = _holdings()
    h.link("attention0")
    h.link("attention1")
    assert h.step_with("attention0", 1)[0]
    assert 0 in h._kept  # attention1 has not stepped since it joined: it may still use epoch 0
    assert h.step_with("attention1", 0)[0]  # and it does: the kept placement serves it
    assert 0 in h._kept
    h.unlink("attention1")  # its connection ended
    assert 0 in h._kept  # retired at the next step, not under the event loop
    assert h.step_with("attention0", 1)[0]
    assert h._kept == {}
    assert not h.step_with("attention1", 0)[0]  # a node that comes back on epoch 0 is told to move


def test_kept_while_every_linked_node_has_not_moved_past():
    h = _holdings()
    h.link("attention0")
    h.link("attention1")
    h.step_with("attention0", 1)
    h.step_with("attention1", 1)
    assert h._kept == {}  # both moved past epoch 0
