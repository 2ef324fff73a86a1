"""Attention-FFN disaggregation on GPUs: 1A1F over NCCL against colocated data parallel.

Run on a machine with two GPUs (`afkv bench af`). Weights are random in the real shapes
of the model (`random:qwen3-30b-a3b`, `random:mixtral-8x7b`), generated on the devices.
Decode steps are timed with CUDA events around the model step (embedding, every layer,
lm_head on the new rows, argmax on the device), replayed as CUDA graphs on both sides; the
scheduler is not in the loop.

    colocated    one full replica per GPU (data parallel): tokens/s per GPU = B / TPOT
    1A1F         attention on GPU 0, experts on GPU 1:      tokens/s per GPU = B / TPOT / 2
    T_attn       the same step with an FFN that returns zeros at once (GPU 0)
    T_ffn        the expert node's FFN work of one step alone (its own CUDA graph, no transfers)
    bare NCCL    send + recv of one micro-batch's buffers GPU0 -> GPU1 -> GPU0, no compute
    T_x          bare NCCL time of a step's transfers: every layer and micro-batch, back to back
    hidden share 1 - (TPOT - max(T_attn, T_ffn)) / T_x, clamped to [0, 1]: the share of the
                 transfer time that does not lengthen the step past its slower side
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from afkv.bench.steps import (TPOT_LIMIT_S, colocated_phase, copy_bandwidth, eager_inputs, fits, median_s, random_kv,
                               step_bytes, synthetic_step)
from afkv.config import EngineConfig
from afkv.errors import DeviceError
from afkv.model.graphs import DecodeGraphs
from afkv.model.model import Model, load_attention_side
from afkv.model.random import random_spec


async def af_phase(model_name: str, batches, context, block_size, steps, micro_batches, t_attn: dict, log) -> dict:
    """1A1F: attention on cuda:0 (decode steps as CUDA graphs, NCCL sends/receives inside),
    experts on cuda:1 (an expert node process; its steps replay CUDA graphs too)."""
    from afkv.nodes.attention import connect_expert_nodes
    from afkv.nodes.dispatch import capacity
    from afkv.serve.launch import Deployment

    dev = torch.device("cuda:0")
    dtype = torch.bfloat16
    cfg_text = """
[model]
dtype = "bfloat16"
[deployment]
attention_nodes = 1
expert_nodes = 1
port = 0
attention_devices = ["cuda:0"]
expert_devices = ["cuda:1"]
expert_timeout_s = 120.0
"""
    tmp = Path(tempfile.mkdtemp())
    (tmp / "af.toml").write_text(cfg_text)
    out: dict = {"rows": {}}
    with Deployment(tmp / "af.toml", model_name, start_attention=False, ready_timeout_s=600, log_dir=tmp) as dep:
        log(f"1A1F: expert node ready on cuda:1 ({dep.address})")
        d = dataclasses.replace(EngineConfig.from_toml(tmp / "af.toml").deployment, port=dep.port,
                                token=dep.token)
        ex = ThreadPoolExecutor(1)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(ex, torch.cuda.set_device, dev)
        spec, attn = await loop.run_in_executor(ex, load_attention_side, model_name, dev, dtype)
        backend = await connect_expert_nodes(spec, d, 0, dev, dtype, ex)
        model = Model(spec, attn, backend)
        for b in batches:
            if not fits(spec, b, context, block_size, torch.cuda.mem_get_info(dev)[0], dtype):
                log(f"  1A1F batch {b}: KV does not fit")
                continue
            step = synthetic_step(spec, b, context, block_size)
            nblocks = step[-1]
            kv = await loop.run_in_executor(ex, random_kv, spec, nblocks + 1, block_size, dtype, dev)
            for m in micro_batches:
                graphs = await loop.run_in_executor(ex, functools.partial(DecodeGraphs, model, kv, b, len(step[5][0]),
                                                                          nblocks, buckets=[b]))
                run = lambda: graphs.run(*step[:6], m).argmax(-1)  # noqa: E731
                tpot = await loop.run_in_executor(ex, torch.inference_mode()(median_s), run, steps)
                caps = [capacity(n) for n in graphs.sizes(b, m)]
                t_ffn = (await backend.links.request_all({"type": "ffn_time", "caps": caps, "reps": 5}))[0]["seconds"]
                ta = t_attn.get(b)
                row = {"tpot_s": tpot, "tok_s_per_gpu": b / tpot / 2, "t_attn_s": ta, "t_ffn_s": t_ffn, "caps": caps,
                       "step_over_max": tpot / max(ta or 0.0, t_ffn)}
                out["rows"].setdefault(b, {})[m] = row
                log(f"  1A1F batch {b} m={m}: TPOT {tpot * 1e3:.2f} ms, {b / tpot / 2:.0f} tok/s/GPU, "
                    f"T_attn {(ta or float('nan')) * 1e3:.2f} ms, T_ffn {t_ffn * 1e3:.2f} ms")
                del graphs
            del kv
            await loop.run_in_executor(ex, torch.cuda.empty_cache)
        # one micro-batch's A->F->A round trip inside real (eager) steps: CUDA events from "ready
        # to send" to "partial sums received", minus the expert's compute for that micro-batch layer
        for b in batches[:1] + [x for x in batches if x in (64, 128)][:1]:
            if b not in out["rows"]:
                continue
            step = synthetic_step(spec, b, context, block_size)
            kv = await loop.run_in_executor(ex, random_kv, spec, step[-1], block_size, dtype, dev)
            inputs = eager_inputs(step, dev)
            backend.trace = []
            fwd = lambda: model.forward(inputs, kv, 1)  # noqa: E731
            await loop.run_in_executor(ex, torch.inference_mode()(median_s), fwd, 4)
            pairs, backend.trace = backend.trace, None
            rtt = sorted(a.elapsed_time(z) / 1e3 for a, z in pairs)[len(pairs) // 2]
            cap = capacity(b)
            per_mb_layer_ffn = out["rows"][b][1]["t_ffn_s"] / spec.num_layers if 1 in out["rows"][b] else 0.0
            out.setdefault("round_trip", []).append({
                "batch": b, "m": 1, "rows": cap, "runtime_rtt_s": rtt, "expert_compute_s": per_mb_layer_ffn,
                "dispatch_bytes": cap * (spec.hidden_size * dtype.itemsize + spec.top_k * 8),
                "combine_bytes": cap * spec.hidden_size * dtype.itemsize})
            del kv
            await loop.run_in_executor(ex, torch.cuda.empty_cache)
        await backend.aclose()
        ex.shutdown()
    return out


def bare_nccl_round_trip(dispatch_bytes: int, combine_bytes: int, reps: int = 50) -> float:
    """Send + recv of the same bytes GPU0 -> GPU1 -> GPU0 with NCCL in one process (median s)."""
    from cupy.cuda import nccl

    comms = nccl.NcclCommunicator.initAll([0, 1])
    u8 = getattr(nccl, "NCCL_UINT8", None) or nccl.NCCL_INT8
    a = [torch.empty(dispatch_bytes, dtype=torch.uint8, device=f"cuda:{i}") for i in (0, 1)]
    c = [torch.empty(combine_bytes, dtype=torch.uint8, device=f"cuda:{i}") for i in (0, 1)]
    streams = [torch.cuda.current_stream(i) for i in (0, 1)]
    times = []
    for r in range(reps + 5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.device(0):
            start.record(streams[0])
        nccl.groupStart()
        comms[0].send(a[0].data_ptr(), dispatch_bytes, u8, 1, streams[0].cuda_stream)
        comms[1].recv(a[1].data_ptr(), dispatch_bytes, u8, 0, streams[1].cuda_stream)
        nccl.groupEnd()
        nccl.groupStart()
        comms[1].send(c[1].data_ptr(), combine_bytes, u8, 0, streams[1].cuda_stream)
        comms[0].recv(c[0].data_ptr(), combine_bytes, u8, 1, streams[0].cuda_stream)
        nccl.groupEnd()
        with torch.cuda.device(0):
            end.record(streams[0])
        end.synchronize()
        if r >= 5:
            times.append(start.elapsed_time(end) / 1e3)
    for comm in comms:
        comm.destroy()
    return sorted(times)[len(times) // 2]


def best_within(rows: dict, limit_s: float) -> tuple[int | None, float]:
    ok = [(r["tok_s_per_gpu"], b) for b, r in rows.items() if r.get("tpot_s") and r["tpot_s"] <= limit_s]
    if not ok:
        return None, 0.0
    tok, b = max(ok)
    return b, tok


async def run_af_bench(model: str, batches: list[int], context: int, micro_batches: list[int], steps: int = 10,
                       block_size: int = 16, log=print) -> dict:
    if torch.cuda.device_count() < 2:
        raise DeviceError(f"afkv bench af needs two GPUs (attention on cuda:0, experts on cuda:1); "
                          f"this machine has {torch.cuda.device_count()}")
    name = model.removeprefix("random:")
    copy_bw = await asyncio.to_thread(copy_bandwidth, torch.device("cuda:0"))
    colo_rows = await asyncio.to_thread(colocated_phase, name, batches, context, block_size, steps, copy_bw, log, set())
    colo = {b: ({"tpot_s": r["tpot_s"], "tok_s_per_gpu": r["tok_s"], "t_attn_s": r["t_attn_s"]} if "tpot_s" in r else r)
            for b, r in colo_rows.items()}
    t_attn = {b: r["t_attn_s"] for b, r in colo.items() if "t_attn_s" in r}
    af = await af_phase(model, batches, context, block_size, steps, micro_batches, t_attn, log)
    spec = random_spec(model)
    for b, per_m in af["rows"].items():
        for m, r in per_m.items():
            # transfer of one step, bare: every layer and micro-batch, NCCL send + recv of its buffers
            k = spec.top_k
            bare = sum(bare_nccl_round_trip(c * (spec.hidden_size * 2 + k * 8), c * spec.hidden_size * 2, reps=20)
                       for c in r["caps"])
            need = step_bytes(spec, b, context)  # bytes each side must read per step, against the copy ceiling
            r["ffn_roofline_share"] = need["ffn"] / copy_bw / r["t_ffn_s"]
            r["attn_roofline_share"] = need["attention"] / copy_bw / r["t_attn_s"] if r["t_attn_s"] else None
            r["transfer_bare_s"] = t_x = bare * spec.num_layers
            exposed = r["tpot_s"] - max(r["t_attn_s"] or 0.0, r["t_ffn_s"])
            r["transfer_hidden_share"] = min(1.0, max(0.0, 1.0 - exposed / t_x))
    for rt in af.get("round_trip", []):
        rt["bare_nccl_rtt_s"] = bare_nccl_round_trip(rt["dispatch_bytes"], rt["combine_bytes"])
        rt["transfer_over_bare"] = max(rt["runtime_rtt_s"] - rt["expert_compute_s"], 0.0) / rt["bare_nccl_rtt_s"]
    # best micro-batch count per batch for the AF side
    af_best = {b: min(per_m.values(), key=lambda r: r["tpot_s"]) | {"m": min(per_m, key=lambda m: per_m[m]["tpot_s"])}
               for b, per_m in af["rows"].items()}
    cb, ctok = best_within(colo, TPOT_LIMIT_S)
    ab, atok = best_within(af_best, TPOT_LIMIT_S)
    return {"bench": "af", "model": model, "context": context, "device": torch.cuda.get_device_name(0),
            "copy_bytes_per_s": copy_bw, "date": time.strftime("%Y-%m-%d"), "cuda_graphs": True,
            "colocated": colo, "af": af["rows"], "af_best": af_best, "round_trip": af.get("round_trip", []),
            "best_within_50ms": {"colocated": {"batch": cb, "tok_s_per_gpu": ctok},
                                 "af": {"batch": ab, "tok_s_per_gpu": atok},
                                 "ratio": (atok / ctok) if ctok else None}}


def format_af_table(r: dict) -> str:
    lines = [f"{r['model']}, context {r['context']}, {r['device']} x2, decode tokens/s per GPU",
             f"{'batch':>5} | {'coloc TPOT ms':>13} | {'coloc tok/s/GPU':>15} | {'AF m':>4} | {'AF TPOT ms':>10} | "
             f"{'AF tok/s/GPU':>12} | {'AF/coloc':>8} | {'T_attn ms':>9} | {'T_ffn ms':>8} | {'step/max':>8} | {'hidden':>6}"]
    lines.append("-" * len(lines[-1]))
    for b in sorted(set(r["colocated"]) | set(r["af_best"]), key=int):
        c = r["colocated"].get(b, {})
        a = r["af_best"].get(b, {})
        ct = c.get("tpot_s")
        ratio = (a["tok_s_per_gpu"] / c["tok_s_per_gpu"]) if a and ct else float("nan")
        lines.append(
            f"{b:>5} | {ct * 1e3 if ct else float('nan'):>13.2f} | {c.get('tok_s_per_gpu', float('nan')):>15.0f} | "
            f"{a.get('m', 0):>4} | {a.get('tpot_s', float('nan')) * 1e3:>10.2f} | {a.get('tok_s_per_gpu', float('nan')):>12.0f} | "
            f"{ratio:>8.2f} | {(a.get('t_attn_s') or float('nan')) * 1e3:>9.2f} | {a.get('t_ffn_s', float('nan')) * 1e3:>8.2f} | "
            f"{a.get('step_over_max', float('nan')):>8.2f} | {a.get('transfer_hidden_share', float('nan')):>6.0%}")
    bw = r["best_within_50ms"]
    lines.append(f"best within 50 ms TPOT: colocated batch {bw['colocated']['batch']} "
                 f"{bw['colocated']['tok_s_per_gpu']:.0f} tok/s/GPU; AF batch {bw['af']['batch']} "
                 f"{bw['af']['tok_s_per_gpu']:.0f} tok/s/GPU; ratio {bw['ratio'] if bw['ratio'] is None else round(bw['ratio'], 2)}")
    for rt in r["round_trip"]:
        lines.append(f"A->F->A one micro-batch ({rt['rows']} rows): runtime {rt['runtime_rtt_s'] * 1e6:.0f} us "
                     f"(expert compute {rt['expert_compute_s'] * 1e6:.0f} us), bare NCCL {rt['bare_nccl_rtt_s'] * 1e6:.0f} us, "
                     f"transfer/bare {rt['transfer_over_bare']:.2f}")
    return "\n".join(lines)

