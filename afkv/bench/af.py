"""Attention-FFN disaggregation on GPUs: 1A1F over NCCL against colocated data parallel.

Run on a machine with two GPUs (`afkv bench af`). Weights are random in the real shapes
of the model (`random:qwen3-30b-a3b`, `random:mixtral-8x7b`), generated on the devices.
Decode steps are timed with CUDA events around the model step (embedding, every layer,
lm_head on the new rows, argmax on the device); the scheduler is not in the loop.

    colocated    one full replica per GPU (data parallel): tokens/s per GPU = B / TPOT
    1A1F         attention on GPU 0, experts on GPU 1:      tokens/s per GPU = B / TPOT / 2
    T_attn       the same step with an FFN that returns zeros at once (GPU 0)
    T_ffn        expert compute per step, CUDA events on the expert node
    bare NCCL    send + recv of one micro-batch's bytes GPU0 -> GPU1 -> GPU0, no compute
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from afkv.config import EngineConfig
from afkv.model.model import Model, load_attention_side, load_colocated
from afkv.model.sides import SeqChunk, StepInputs

TPOT_LIMIT_S = 0.050


def _decode_inputs(spec, batch: int, context: int, block_size: int, device) -> tuple[StepInputs, int]:
    per_seq = -(-(context + 1) // block_size)
    g = torch.Generator(device="cpu").manual_seed(batch)
    tokens = torch.randint(0, spec.vocab_size, (batch,), generator=g).to(device)
    pos = torch.full((batch,), context, dtype=torch.int64, device=device)
    tables = torch.arange(batch * per_seq, device=device).view(batch, per_seq)
    chunks = [SeqChunk(b, 1, context + 1, tables[b]) for b in range(batch)]
    return StepInputs(tokens, pos, tables[:, context // block_size], pos % block_size, chunks), batch * per_seq


def _kv(spec, num_blocks: int, block_size: int, dtype, device) -> torch.Tensor:
    shape = (num_blocks, spec.num_layers, 2, block_size, spec.num_kv_heads, spec.head_dim)
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.5)  # in place: KV may be ~100 GB


def _time_steps(model: Model, inputs: StepInputs, kv, m: int, steps: int) -> float:
    """Seconds per decode step (median of `steps`, after two warm-ups)."""
    times = []
    for i in range(steps + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        h = model.forward(inputs, kv, m)  # [B, H]
        next_ids = model.attn.logits(h).argmax(-1)  # [B] sampled on the device
        end.record()
        end.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end) / 1e3)
    del next_ids
    return sorted(times)[len(times) // 2]


class _ZeroFFN:
    def begin_step(self, mb_sizes):
        pass

    def end_step(self):
        pass

    def submit(self, layer, x, ids, w):
        z = torch.zeros_like(x)
        return type("Done", (), {"result": lambda self: z})()


def _fits(spec, batch, context, block_size, free_bytes: int, dtype) -> bool:
    per_seq = -(-(context + 1) // block_size)
    need = batch * per_seq * block_size * spec.kv_bytes_per_token(dtype.itemsize)
    return need < free_bytes * 0.85


def colocated_phase(model_name: str, batches, context, block_size, steps, log) -> dict:
    dev = torch.device("cuda:0")
    torch.cuda.set_device(dev)
    dtype = torch.bfloat16
    t0 = time.perf_counter()
    model = load_colocated(model_name, dev, dtype)
    log(f"colocated: loaded {model_name} on {dev} in {time.perf_counter() - t0:.0f} s")
    spec = model.spec
    rows = {}
    for b in batches:
        free = torch.cuda.mem_get_info(dev)[0]
        if not _fits(spec, b, context, block_size, free, dtype):
            rows[b] = {"tpot_s": None, "note": "KV does not fit next to the full model"}
            log(f"  colocated batch {b}: KV does not fit")
            continue
        inputs, nblocks = _decode_inputs(spec, b, context, block_size, dev)
        kv = _kv(spec, nblocks, block_size, dtype, dev)
        tpot = _time_steps(model, inputs, kv, 1, steps)
        attn_only = Model(spec, model.attn, _ZeroFFN())
        t_attn = _time_steps(attn_only, inputs, kv, 1, steps)
        rows[b] = {"tpot_s": tpot, "tok_s_per_gpu": b / tpot, "t_attn_s": t_attn}
        log(f"  colocated batch {b}: TPOT {tpot * 1e3:.1f} ms, {b / tpot:.0f} tok/s/GPU, T_attn {t_attn * 1e3:.1f} ms")
        del kv
        torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()
    return rows


async def af_phase(model_name: str, batches, context, block_size, steps, micro_batches, rtt_points, log) -> dict:
    from afkv.nodes.attention import connect_expert_nodes
    from afkv.serve.launch import Deployment

    dev = torch.device("cuda:0")
    dtype = torch.bfloat16
    cfg_text = f"""
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
        d = dataclasses.replace(EngineConfig.from_toml(tmp / "af.toml").deployment, port=dep.port)
        ex = ThreadPoolExecutor(1)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(ex, torch.cuda.set_device, dev)
        spec, attn = await loop.run_in_executor(ex, load_attention_side, model_name, dev, dtype)
        backend = await connect_expert_nodes(spec, d, 0, dev, dtype, ex)
        model = Model(spec, attn, backend)
        stats0 = (await backend.control.request_all({"type": "stats"}))[0]
        for b in batches:
            free = torch.cuda.mem_get_info(dev)[0]
            if not _fits(spec, b, context, block_size, free, dtype):
                log(f"  1A1F batch {b}: KV does not fit")
                continue
            inputs, nblocks = _decode_inputs(spec, b, context, block_size, dev)
            kv = await loop.run_in_executor(ex, _kv, spec, nblocks, block_size, dtype, dev)
            t_attn = await loop.run_in_executor(ex, _time_steps, Model(spec, attn, _ZeroFFN()), inputs, kv, 1, steps)
            for m in micro_batches:
                s0 = (await backend.control.request_all({"type": "stats"}))[0]
                tpot = await loop.run_in_executor(ex, _time_steps, model, inputs, kv, m, steps)
                s1 = (await backend.control.request_all({"type": "stats"}))[0]
                n_steps = max(s1["requests"] - s0["requests"], 1)
                t_ffn = (s1["compute_s"] - s0["compute_s"]) / n_steps
                out["rows"].setdefault(b, {})[m] = {"tpot_s": tpot, "tok_s_per_gpu": b / tpot / 2, "t_attn_s": t_attn,
                                                    "t_ffn_s": t_ffn, "step_over_max": tpot / max(t_attn, t_ffn)}
                log(f"  1A1F batch {b} m={m}: TPOT {tpot * 1e3:.1f} ms, {b / tpot / 2:.0f} tok/s/GPU, "
                    f"T_attn {t_attn * 1e3:.1f} ms, T_ffn {t_ffn * 1e3:.1f} ms")
            del kv
            torch.cuda.empty_cache()
        # one micro-batch's A->F->A round trip inside real steps: CUDA events from "ready to send"
        # to "partial sums received", minus the expert's compute for that micro-batch layer
        for b, m in rtt_points:
            if b not in out["rows"] or m not in out["rows"][b]:
                continue
            inputs, nblocks = _decode_inputs(spec, b, context, block_size, dev)
            kv = await loop.run_in_executor(ex, _kv, spec, nblocks, block_size, dtype, dev)
            backend.trace = []
            s0 = (await backend.control.request_all({"type": "stats"}))[0]
            await loop.run_in_executor(ex, _time_steps, model, inputs, kv, m, 4)
            s1 = (await backend.control.request_all({"type": "stats"}))[0]
            pairs, backend.trace = backend.trace, None
            rtt = sorted(a.elapsed_time(z) / 1e3 for a, z in pairs)[len(pairs) // 2]
            per_mb_layer_ffn = (s1["compute_s"] - s0["compute_s"]) / max(s1["batches"] - s0["batches"], 1)
            rows = -(-b // m)
            out.setdefault("round_trip", []).append({
                "batch": b, "m": m, "rows": rows, "runtime_rtt_s": rtt, "expert_compute_s": per_mb_layer_ffn,
                "dispatch_bytes": rows * (spec.hidden_size * dtype.itemsize + spec.top_k * 8),
                "combine_bytes": rows * spec.hidden_size * dtype.itemsize})
            del kv
            torch.cuda.empty_cache()
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
        raise RuntimeError("afkv bench af needs two GPUs (attention on cuda:0, experts on cuda:1)")
    colo = await asyncio.to_thread(colocated_phase, model, batches, context, block_size, steps, log)
    rtt_points = sorted({(batches[0], 1), (min(batches, key=lambda b: abs(b - 128)), 1)})
    af = await af_phase(model, batches, context, block_size, steps, micro_batches, rtt_points, log)
    for rt in af.get("round_trip", []):
        rt["bare_nccl_rtt_s"] = bare_nccl_round_trip(rt["dispatch_bytes"], rt["combine_bytes"])
        rt["transfer_over_bare"] = max(rt["runtime_rtt_s"] - rt["expert_compute_s"], 0.0) / rt["bare_nccl_rtt_s"]
    # best micro-batch count per batch for the AF side
    af_best = {b: min(per_m.values(), key=lambda r: r["tpot_s"]) | {"m": min(per_m, key=lambda m: per_m[m]["tpot_s"])}
               for b, per_m in af["rows"].items()}
    cb, ctok = best_within(colo, TPOT_LIMIT_S)
    ab, atok = best_within(af_best, TPOT_LIMIT_S)
    return {"bench": "af", "model": model, "context": context, "device": torch.cuda.get_device_name(0),
            "colocated": colo, "af": af["rows"], "af_best": af_best, "round_trip": af.get("round_trip", []),
            "best_within_50ms": {"colocated": {"batch": cb, "tok_s_per_gpu": ctok},
                                 "af": {"batch": ab, "tok_s_per_gpu": atok},
                                 "ratio": (atok / ctok) if ctok else None}}


def format_af_table(r: dict) -> str:
    lines = [f"{r['model']}, context {r['context']}, {r['device']} x2, decode tokens/s per GPU",
             f"{'batch':>5} | {'coloc TPOT ms':>13} | {'coloc tok/s/GPU':>15} | {'AF m':>4} | {'AF TPOT ms':>10} | "
             f"{'AF tok/s/GPU':>12} | {'AF/coloc':>8} | {'T_attn ms':>9} | {'T_ffn ms':>8} | {'step/max':>8}"]
    lines.append("-" * len(lines[-1]))
    for b in sorted(set(r["colocated"]) | set(r["af_best"]), key=int):
        c = r["colocated"].get(b, {})
        a = r["af_best"].get(b, {})
        ct = c.get("tpot_s")
        ratio = (a["tok_s_per_gpu"] / c["tok_s_per_gpu"]) if a and ct else float("nan")
        lines.append(
            f"{b:>5} | {ct * 1e3 if ct else float('nan'):>13.1f} | {c.get('tok_s_per_gpu', float('nan')):>15.0f} | "
            f"{a.get('m', 0):>4} | {a.get('tpot_s', float('nan')) * 1e3:>10.1f} | {a.get('tok_s_per_gpu', float('nan')):>12.0f} | "
            f"{ratio:>8.2f} | {a.get('t_attn_s', float('nan')) * 1e3:>9.1f} | {a.get('t_ffn_s', float('nan')) * 1e3:>8.1f} | "
            f"{a.get('step_over_max', float('nan')):>8.2f}")
    bw = r["best_within_50ms"]
    lines.append(f"best within 50 ms TPOT: colocated batch {bw['colocated']['batch']} "
                 f"{bw['colocated']['tok_s_per_gpu']:.0f} tok/s/GPU; AF batch {bw['af']['batch']} "
                 f"{bw['af']['tok_s_per_gpu']:.0f} tok/s/GPU; ratio {bw['ratio'] if bw['ratio'] is None else round(bw['ratio'], 2)}")
    for rt in r["round_trip"]:
        lines.append(f"A->F->A one micro-batch ({rt['rows']} rows): runtime {rt['runtime_rtt_s'] * 1e6:.0f} us "
                     f"(expert compute {rt['expert_compute_s'] * 1e6:.0f} us), bare NCCL {rt['bare_nccl_rtt_s'] * 1e6:.0f} us, "
                     f"transfer/bare {rt['transfer_over_bare']:.2f}")
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    return path
