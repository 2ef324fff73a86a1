"""`afkv bench experts-merged`: an expert node fed by two attention nodes, its steps per attention
node against merged (`[deployment] expert_batching`), in the same run.

Two attention nodes (engines in this process, attention ranks 0 and 1) and one expert node (a
process on loopback) decode the same batch shape, both at once, twice:

    per_attention_node  the expert node runs each attention node's step alone (the baseline)
    merged              one FFN call per layer and micro-batch over both attention nodes' rows

For each: decode tokens/s of the two attention nodes together, the expert node's FFN seconds
per attention-node step (its `compute_s` over the steps it answered: a merged FFN call counts
once), FFN launches per attention-node step, and the share of steps that ran in a merged
bundle. Ratios are merged over per_attention_node. Greedy tokens of both runs are compared
(they must be equal).

On GPUs (`devices`: attention node 0's, attention node 1's, the expert node's) the expert node
should have a GPU of its own so that the pairs are NCCL peers (afkv.transport.peer.peer_kind: two
processes on one GPU get the host peer, whose every transfer is host work, so a one-GPU run
measures the host copies as much as the experts). Steps replayed as CUDA graphs are not timed
by the expert node: on GPUs the FFN seconds cover its eager steps only (`timed_ffn_calls`), and
the run adds the expert node's `ffn_time` of one step's FFN work alone (CUDA-graph replays, no
transfers) at the buffers of one attention node's step, twice (per_attention_node), against
one step over both attention nodes' rows (merged): the weight reads merged batching saves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

MODES = ("per_attention_node", "merged")

_CONFIG = """
[model]
device = "{device}"
dtype = "{dtype}"
[kv]
block_size = 16
num_blocks = {num_blocks}
[scheduler]
max_num_seqs = {batch}
max_num_batched_tokens = 512
[deployment]
attention_nodes = 2
expert_nodes = 1
micro_batches = {micro_batches}
port = 0
expert_timeout_s = 60.0
expert_batching = "{batching}"
{devices}
"""


def _config_text(batching: str, micro_batches: int, batch: int, devices: list[str] | None, dtype: str) -> str:
    num_blocks = max(512, 4 * batch * 8)
    if not devices:
        return _CONFIG.format(device="cpu", dtype=dtype, num_blocks=num_blocks, batch=batch,
                              micro_batches=micro_batches, batching=batching, devices="")
    if len(devices) != 3:
        raise ValueError(f"devices: attention node 0's, attention node 1's, the expert node's; got {devices}")
    placed = f"attention_devices = {json.dumps(devices[:2])}\nexpert_devices = {json.dumps(devices[2:])}"  # TOML arrays
    return _CONFIG.format(device=devices[0], dtype=dtype, num_blocks=num_blocks, batch=batch,
                          micro_batches=micro_batches, batching=batching, devices=placed)


def _prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (prompt_len + i % 4,), generator=gen).tolist() for i in range(batch)]


async def _run_mode(model: str | None, work: Path, config: str, batching: str, prompts: list, params,
                    repeats: int, ffn_caps: list[int] | None, log) -> dict:
    from afkv import Engine, EngineConfig
    from afkv.serve.launch import Deployment

    path = work / f"experts-{batching}.toml"
    path.write_text(config)
    with Deployment(path, model, start_attention=False, ready_timeout_s=600, log_dir=work) as dep:
        cfg = EngineConfig.from_toml(path)
        cfg = dataclasses.replace(cfg, deployment=dataclasses.replace(cfg.deployment, port=dep.port, token=dep.token))
        engines = []
        try:
            for rank in range(2):
                d = cfg.deployment
                own = cfg if not d.attention_devices else dataclasses.replace(
                    cfg, model=dataclasses.replace(cfg.model, device=d.attention_devices[rank]))
                engine = Engine(model, own, progress=False, attention_rank=rank)
                engines.append(engine)
                await engine.start()

            async def both():
                return await asyncio.gather(*(asyncio.gather(*(e.complete(p, params) for p in prompts))
                                              for e in engines))

            await both()  # warm-up: kernels, buffers, CUDA graphs
            before = (await engines[0]._links.request_all({"type": "stats"}))[0]
            t0 = time.perf_counter()
            tokens = None
            for _ in range(repeats):
                done = await both()
                tokens = [[r.token_ids for r in per_node] for per_node in done]
            wall_s = time.perf_counter() - t0
            after = (await engines[0]._links.request_all({"type": "stats"}))[0]
            ffn_time = None
            if ffn_caps is not None:  # GPU: one attention node's step alone, twice, vs both attention nodes' rows
                ffn_time = {}
                for name, caps in (("one_node_s", ffn_caps), ("both_nodes_s", [2 * c for c in ffn_caps])):
                    reply = await engines[0]._links.request_all({"type": "ffn_time", "caps": caps, "reps": 10})
                    ffn_time[name] = reply[0]["seconds"]
                ffn_time["merged_over_per_node"] = ffn_time["both_nodes_s"] / (2 * ffn_time["one_node_s"])
        finally:
            for engine in engines:
                await engine.aclose()
    d = {k: after[k] - before[k] for k in ("requests", "bundles", "bundle_links", "ffn_launches", "compute_s",
                                            "batches", "gather_timeouts")}
    generated = 2 * repeats * len(prompts) * params.max_tokens
    steps = max(d["requests"], 1)
    row = {"expert_batching": batching, "wall_s": wall_s, "generated_tokens": generated,
           "tokens_per_s": generated / wall_s, "attention_steps": d["requests"], "expert_runs": d["bundles"],
           "ffn_launches": d["ffn_launches"], "ffn_launches_per_step": d["ffn_launches"] / steps,
           "ffn_s": d["compute_s"], "ffn_s_per_step": d["compute_s"] / steps, "timed_ffn_calls": d["batches"],
           "merged_share": (d["bundle_links"] - d["bundles"]) / steps * 2 if d["bundles"] else 0.0,
           "gather_timeouts": d["gather_timeouts"], "ffn_time": ffn_time, "token_ids": tokens}
    log(f"  {batching}: {row['tokens_per_s']:.1f} tok/s, expert FFN {row['ffn_s_per_step'] * 1e3:.2f} ms per "
        f"attention-node step, {row['ffn_launches_per_step']:.1f} FFN launches per step")
    return row


async def run_experts_merged_bench(model: str | None = None, batch: int = 8, prompt_len: int = 16, gen_len: int = 32,
                                   micro_batches: int = 1, repeats: int = 2, devices: list[str] | None = None,
                                   dtype: str = "float32", log=print) -> dict:
    """Both modes on the same prompts and deployment shape (module docstring) -> the result."""
    from afkv import SamplingParams
    from afkv.nodes.dispatch import capacity

    params = SamplingParams(max_tokens=gen_len, ignore_eos=True)
    prompts = _prompts(batch, prompt_len, 256, seed=0)
    work = Path(tempfile.mkdtemp(prefix="afkv-experts-merged-"))
    on_gpu = bool(devices) and torch.device(devices[2]).type == "cuda"
    ffn_caps = [capacity(-(-batch // micro_batches))] * micro_batches if on_gpu else None
    rows = {}
    for batching in MODES:
        log(f"afkv bench experts-merged: {batching}")
        config = _config_text(batching, micro_batches, batch, devices, dtype)
        rows[batching] = await _run_mode(model, work, config, batching, prompts, params, repeats,
                                         ffn_caps if batching == "merged" else None, log)
    base, merged = rows["per_attention_node"], rows["merged"]
    return {
        "bench": "experts-merged", "date": time.strftime("%Y-%m-%d"), "model": model or "default",
        "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "devices": devices or ["cpu", "cpu", "cpu"], "dtype": dtype, "batch_per_attention_node": batch,
        "prompt_len": prompt_len, "gen_len": gen_len, "micro_batches": micro_batches, "repeats": repeats,
        "rows": rows,
        "ratios": {"tokens_per_s": merged["tokens_per_s"] / base["tokens_per_s"],
                   "ffn_s_per_step": (merged["ffn_s_per_step"] / base["ffn_s_per_step"]
                                      if base["ffn_s_per_step"] else None),
                   "ffn_launches_per_step": merged["ffn_launches_per_step"] / base["ffn_launches_per_step"]},
        "tokens_equal": base["token_ids"] == merged["token_ids"],
    }


def format_table(r: dict) -> str:
    lines = [f"{r['model']} on {', '.join(r['devices'])} ({r['dtype']}): 2 attention nodes x {r['batch_per_attention_node']}"
             f" sequences, 1 expert node, m = {r['micro_batches']}, {r['gen_len']} tokens x {r['repeats']}",
             f"{'expert_batching':<19} | {'tok/s':>7} | {'FFN ms/step':>11} | {'launches/step':>13} | "
             f"{'merged steps':>12} | {'gather timeouts':>15}"]
    lines.append("-" * len(lines[-1]))
    for batching, row in r["rows"].items():
        lines.append(f"{batching:<19} | {row['tokens_per_s']:>7.1f} | {row['ffn_s_per_step'] * 1e3:>11.2f} | "
                     f"{row['ffn_launches_per_step']:>13.1f} | {row['merged_share']:>12.0%} | "
                     f"{row['gather_timeouts']:>15}")
    ratios = r["ratios"]
    ffn = ratios["ffn_s_per_step"]
    alone = r["rows"]["merged"]["ffn_time"]
    if alone:
        lines.append(f"expert FFN alone (CUDA graphs, no transfers): one attention node's step {alone['one_node_s'] * 1e3:.2f} "
                     f"ms, both nodes' rows in one step {alone['both_nodes_s'] * 1e3:.2f} ms: merged / per node "
                     f"{alone['merged_over_per_node']:.2f}x")
    lines.append(f"merged / per_attention_node: tok/s {ratios['tokens_per_s']:.2f}x, FFN s per step "
                 f"{'-' if ffn is None else f'{ffn:.2f}x'}, launches per step {ratios['ffn_launches_per_step']:.2f}x; "
                 f"greedy tokens {'equal' if r['tokens_equal'] else 'DIFFER'}")
    return "\n".join(lines)
