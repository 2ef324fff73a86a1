"""`afkv bench eplb`: expert load balancing under Zipf-skewed routing, CPU or GPU processes.

A synthetic Mixtral checkpoint whose routers prefer experts by a Zipf law
(afkv.model.tiny.write_zipf_checkpoint) is served by one attention node (this process) and N expert
nodes (processes on loopback), twice in the same run:

    no EPLB   contiguous shards, no replicas (the baseline)
    EPLB      slots_per_node spare slots; after a warm-up the coordinator rebalances
              from the measured load statistics, then the same batch is decoded again

For each: max / mean tokens per expert node (measured by the expert nodes' load windows
over the measured phase) and decode tokens/s; ratios are against the baseline of the same
run. Greedy tokens of both runs are compared (they must be equal).

On GPUs (`devices`: the attention node's device, then one per expert node) the expert nodes
should sit on different GPUs, so that a node's load is its GPU's work and the rebalance copies
experts GPU to GPU over NCCL. With two GPUs the attention node shares the first GPU with
expert node 0; NCCL refuses two ranks on one GPU, so that pair's hidden states go through
host memory (the host peer, afkv.transport.peer).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from afkv.model.tiny import write_zipf_checkpoint

_CONFIG = """
[model]
device = "{device}"
dtype = "{dtype}"
[kv]
block_size = 16
num_blocks = 512
[scheduler]
max_num_batched_tokens = 512
[deployment]
attention_nodes = 1
expert_nodes = {experts}
micro_batches = 1
port = 0
expert_timeout_s = 60.0
{devices}
[eplb]
enabled = true
slots_per_node = {slots}
window_s = 3600.0
"""


async def _node_loads(engine) -> "dict[int, torch.Tensor]":
    return await engine._balancer.node_loads()  # node -> [L, E] tokens since start (window longer than the run)


def _config_text(experts: int, slots: int, devices: list[str] | None, dtype: str) -> str:
    if not devices:
        return _CONFIG.format(experts=experts, slots=slots, device="cpu", dtype=dtype, devices="")
    if len(devices) != experts + 1:
        raise ValueError(f"devices: the attention node's then one per expert node ({experts + 1}), got {devices}")
    placed = f"attention_devices = {json.dumps(devices[:1])}\nexpert_devices = {json.dumps(devices[1:])}"  # TOML arrays
    return _CONFIG.format(experts=experts, slots=slots, device=devices[0], dtype=dtype, devices=placed)


async def _run_mode(model_dir: Path, work: Path, config: str, slots: int, rebalance: bool, prompts, params,
                    repeats: int) -> dict:
    from afkv import Engine, EngineConfig
    from afkv.nodes.balancer import node_balancedness
    from afkv.serve.launch import Deployment

    path = work / f"eplb-{slots}.toml"
    path.write_text(config)
    with Deployment(path, model_dir, start_attention=False) as dep:
        cfg = EngineConfig.from_toml(path)
        cfg = dataclasses.replace(cfg, deployment=dataclasses.replace(cfg.deployment, port=dep.port, token=dep.token))
        async with Engine(model_dir, cfg, progress=False) as engine:
            await asyncio.gather(*(engine.complete(p, params) for p in prompts))  # warm-up: loads to balance on
            report = await engine.rebalance() if rebalance else None
            moved = await engine._links.request_all({"type": "stats"})  # weights copied by the rebalance
            start = await _node_loads(engine)
            t0 = time.perf_counter()
            tokens = None
            for _ in range(repeats):
                done = await asyncio.gather(*(engine.complete(p, params) for p in prompts))
                tokens = [d.token_ids for d in done]
            wall_s = time.perf_counter() - t0
            end = await _node_loads(engine)
            finished = await engine._links.request_all({"type": "stats"})
            placement = engine._links.placement
    router = torch.tensor(placement.has_router)
    per_node = torch.stack([(end[j] - start[j]).sum(-1) for j in sorted(end)], -1)[router]  # [L_moe, N]
    generated = repeats * len(prompts) * params.max_tokens
    return {
        "slots_per_node": slots, "rebalanced": rebalance, "epoch": placement.epoch,
        "max_replicas": placement.max_replicas,
        "node_tokens": per_node.sum(0).tolist(),
        "max_over_mean_node_load": node_balancedness(per_node),
        "predicted_before": None if report is None else report.balancedness_before,
        "predicted_after": None if report is None else report.balancedness_after,
        "rebalance_s": None if report is None else report.duration_s,
        "experts_received": sum(m["experts_received"] for m in moved),
        "received_bytes": sum(m["received_bytes"] for m in moved),
        "nccl_received_bytes": sum(m.get("nccl_received_bytes", 0) for m in moved),
        "experts_from_checkpoint": sum(m["experts_from_checkpoint"] for m in moved),
        "wall_s": wall_s, "generated_tokens": generated, "tokens_per_s": generated / wall_s,
        # expert nodes' FFN compute over the measured phase, as a share of its wall time: where
        # this is small, the node loads cannot set the decode speed
        "node_compute_share": [(f["compute_s"] - m["compute_s"]) / wall_s for m, f in zip(moved, finished)],
        "token_ids": tokens,
    }


async def run_eplb_bench(exponent: float = 1.0, expert_nodes: int = 2, slots_per_node: int = 6, batch: int = 16,
                         prompt_len: int = 16, gen_len: int = 32, repeats: int = 2, seed: int = 0,
                         hidden_size: int = 256, intermediate_size: int = 1024, num_layers: int = 4,
                         num_experts: int = 8, work_dir: str | Path | None = None, devices: list[str] | None = None,
                         dtype: str = "float32") -> dict:
    import tempfile

    from afkv import SamplingParams

    with tempfile.TemporaryDirectory(prefix="afkv-eplb-") as tmp:
        work = Path(work_dir) if work_dir else Path(tmp)
        model_dir = write_zipf_checkpoint(work / "zipf-model", exponent, seed, num_experts=num_experts,
                                          num_layers=num_layers, hidden_size=hidden_size,
                                          intermediate_size=intermediate_size)
        gen = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(3, 256, (prompt_len,), generator=gen).tolist() for _ in range(batch)]
        params = SamplingParams(max_tokens=gen_len, ignore_eos=True)
        base_slots = -(-num_experts // expert_nodes)
        modes = []
        for slots, rebalance in ((base_slots, False), (slots_per_node, True)):
            config = _config_text(expert_nodes, slots, devices, dtype)
            modes.append(await _run_mode(model_dir, work, config, slots, rebalance, prompts, params, repeats))
        baseline, eplb = modes
    base_tokens, eplb_tokens = baseline.pop("token_ids"), eplb.pop("token_ids")
    differing = sum(a != b for a, b in zip(base_tokens, eplb_tokens))
    return {
        "bench": "eplb", "time": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform(),
        "cpus": __import__("os").cpu_count(), "torch": torch.__version__,
        "args": {"exponent": exponent, "expert_nodes": expert_nodes, "slots_per_node": slots_per_node,
                 "batch": batch, "prompt_len": prompt_len, "gen_len": gen_len, "repeats": repeats, "seed": seed,
                 "hidden_size": hidden_size, "intermediate_size": intermediate_size, "num_layers": num_layers,
                 "num_experts": num_experts, "devices": devices or ["cpu"] * (expert_nodes + 1), "dtype": dtype},
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "baseline": baseline, "eplb": eplb, "greedy_tokens_equal": differing == 0,
        "differing_sequences": differing,
        "load_ratio": eplb["max_over_mean_node_load"] / baseline["max_over_mean_node_load"],
        "throughput_ratio": eplb["tokens_per_s"] / baseline["tokens_per_s"],
    }


def format_table(result: dict) -> str:
    a = result["args"]
    rows = [f"Zipf exponent {a['exponent']}, {a['expert_nodes']} expert nodes, {a['num_experts']} experts x "
            f"{a['num_layers']} layers (H {a['hidden_size']}, I {a['intermediate_size']}), batch {a['batch']}, "
            f"{a['gen_len']} new tokens x {a['repeats']}; devices {', '.join(a['devices'])} ({a['dtype']})",
            "| mode | slots/node | max/mean node load | load vs baseline | tok/s | tok/s vs baseline | "
            "expert compute / wall per node |",
            "|---|---:|---:|---:|---:|---:|---|"]
    base = result["baseline"]
    for name, r in (("no EPLB", base), ("EPLB", result["eplb"])):
        rows.append(f"| {name} | {r['slots_per_node']} | {r['max_over_mean_node_load']:.3f} | "
                    f"{r['max_over_mean_node_load'] / base['max_over_mean_node_load']:.2f} | "
                    f"{r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f} | "
                    f"{', '.join(f'{c:.2f}' for c in r['node_compute_share'])} |")
    e = result["eplb"]
    rows.append(f"rebalance: predicted max/mean {e['predicted_before']:.3f} -> {e['predicted_after']:.3f} in "
                f"{e['rebalance_s']:.2f} s ({e['experts_received']} experts, {e['received_bytes'] / 2**20:.1f} MiB "
                f"copied between expert nodes, {e['nccl_received_bytes'] / 2**20:.1f} MiB of it over NCCL, "
                f"{e['experts_from_checkpoint']} read from the checkpoint); "
                f"greedy tokens equal: {result['greedy_tokens_equal']} ({result['differing_sequences']} of "
                f"{a['batch']} sequences differ)")
    return "\n".join(rows)

