"""FP8 experts ([model] expert_dtype = "fp8") on expert nodes: the setting reaches expert node
processes, a 1A1F deployment gives the colocated engine's greedy tokens, and EPLB copies of fp8
experts between nodes keep their fp8 values."""

import asyncio
import dataclasses

import torch

from afkv import Engine
from afkv.nodes.expert import ExpertNode
from afkv.nodes.placement import contiguous_placement
from afkv.serve.launch import Deployment
from tests.helpers import random_prompt
from tests.nodes.test_disaggregated import PARAMS, _attached_config, _colocated, _write_config
from tests.nodes.test_eplb_weights import _ask, _moved

CPU = torch.device("cpu")


async def test_1a1f_with_fp8_experts_matches_colocated(tiny_dir, tmp_path):
    model = str(tiny_dir["qwen3_moe"])
    path = _write_config(tmp_path, 1, 1, extra='[model]\nexpert_dtype = "fp8"\n')
    prompts = [random_prompt(4 + 5 * i, 256, seed=i) for i in range(3)]
    with Deployment(path, model, start_attention=False) as dep:
        cfg = _attached_config(path, dep)
        assert cfg.model.expert_dtype == "fp8"
        expected = await _colocated(model, cfg, prompts)
        plain = await _colocated(model, dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                                          expert_dtype="auto")), prompts)
        assert expected != plain  # the setting changes the experts (else this test would prove nothing)
        async with Engine(model, cfg, progress=False) as engine:
            got = await asyncio.gather(*(engine.complete(p, PARAMS) for p in prompts))
        assert [r.token_ids for r in got] == expected


async def test_eplb_copies_fp8_experts_between_nodes(spec, zipf_dir):
    spec = spec.with_expert_dtype("fp8")
    old, new = contiguous_placement(spec, 2), _moved(spec)
    nodes = [ExpertNode(spec, zipf_dir, old, j, CPU, torch.bfloat16) for j in range(2)]
    for n in nodes:
        await n.start()
    try:
        peers = [[j, "127.0.0.1", n.port] for j, n in enumerate(nodes)]
        for n in nodes:
            await _ask(n, {"type": "eplb_prepare", "placement": new.to_msg(), "peers": peers})
        for j, n in enumerate(nodes):
            holder = nodes[1 - j]
            gained = [(layer, e) for layer in range(spec.num_layers) for e in new.held(j)[layer] - old.held(j)[layer]]
            assert gained and n.stats.snapshot()["experts_received"] == len(gained)
            for layer, e in gained:
                mine, theirs = n.holdings.ffn.experts[layer][e], holder.holdings.ffn.experts[layer][e]
                assert mine.gate_up.dtype == torch.float8_e4m3fn
                assert torch.equal(mine.gate_up.view(torch.uint8), theirs.gate_up.view(torch.uint8))
                assert torch.equal(mine.down.view(torch.uint8), theirs.down.view(torch.uint8))
                torch.testing.assert_close(mine.down_scale, theirs.down_scale, rtol=2.0**-23, atol=0)
    finally:
        for n in nodes:
            await n.aclose()
