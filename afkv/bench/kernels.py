"""`afkv bench kernels`: afkv's Triton kernels against their rooflines and the torch code they
replace, on one GPU (python -m afkv.bench.kernels, or `afkv bench kernels ...`).

    moe     the fused-MoE kernel (afkv.ops.triton_moe) at Mixtral-8x7B and Qwen3-30B-A3B expert
            shapes, 16..8192 routed tokens per layer, bf16 and fp8 experts: time per layer, the
            roofline max(weight bytes / HBM copy ceiling, FLOPs / dense-GEMM peak) with both
            ceilings measured in the same run, the achieved share, fp8 / bf16, and the torch
            grouped-GEMM path at the same points; --tune times candidate tile configs per point
    fused   each small fused kernel (afkv.ops.triton_fused) against its torch composition
    decode  a batch-1 decode step of a real-shape model (random weights): TPOT as a CUDA graph
            (as `afkv bench gpu` measures it), T_attn (the FFN returning zeros), and the kernels of
            one step by name (count, device time; torch.profiler over an eager step)
    mla     the paged MLA decode kernel (afkv.ops.triton_mla) at DeepSeek-V3 (128 heads) and
            V2-Lite (16 heads) shapes over bf16 / fp8 / int8 latents: GB/s against the copy
            ceiling, TFLOP/s against the GEMM peak (FlashMLA's figures); with the table of
            mla-bytes: latent bytes per token per format and the longest context on one H200
            (arithmetic; `mla-bytes` alone runs without a GPU)

One timer for every kernel figure (time_s): the calls captured in one CUDA graph, replayed
between CUDA events, as a decode step runs (no launch overhead). MoE calls cycle over weight
copies (distinct layers' weights), so reads come from HBM, not L2. Layer map: bench sits
above ops and model; nothing imports it.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import time
from dataclasses import asdict
from types import SimpleNamespace
from pathlib import Path

import torch

from afkv.errors import ConfigError, DeviceError

MOE_SHAPES = {  # the routed experts of one layer
    "mixtral-8x7b": dict(num_experts=8, hidden=4096, inter=14336, top_k=2),
    "qwen3-30b-a3b": dict(num_experts=128, hidden=2048, inter=768, top_k=8),
}
MOE_TOKENS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
# expert weights of the sweep: fp8 = fp8_mode "tile" (the default); fp8-<mode> = that fp8_mode's tiles
MOE_DTYPES = ("bf16", "fp8", "fp8-once", "fp8-dequant")
FUSED_SHAPES = dict(hidden=2048, num_heads=32, num_kv_heads=4, head_dim=128, num_experts=128, top_k=8, moe_inter=768)


# ----------------------------------------------------------------------------------------------
# The timer


def graph_time_s(fns: list, replays: int) -> float:
    """Seconds per call: the calls fns[0](), fns[1](), ... captured in one CUDA graph (as afkv
    runs a decode step: no launch overhead), replayed `replays` times between CUDA events."""
    for fn in dict.fromkeys(fns):
        fn()  # compile outside the capture
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm the allocator off the default stream, as capture wants
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    del graph
    return start.elapsed_time(end) / 1e3 / (replays * len(fns))


def time_s(fns: list, replays: int, device: torch.device) -> float:
    """Seconds per call of the calls fns: graph_time_s on CUDA; on the CPU (the interpreter: a
    smoke test) a wall clock around eager calls after one warm-up call each."""
    if device.type == "cuda":
        return graph_time_s(fns, replays)
    for fn in dict.fromkeys(fns):
        fn()
    t0 = time.perf_counter()
    for _ in range(replays):
        for fn in fns:
            fn()
    return (time.perf_counter() - t0) / (replays * len(fns))


def _require_gpu() -> torch.device:
    from afkv.ops import triton_moe

    if not triton_moe.available():
        raise DeviceError("afkv bench kernels needs triton and a CUDA GPU")
    torch.cuda.set_device(0)
    return torch.device("cuda:0")


def fp8_gemm_peak(device: torch.device, n: int = 8192) -> float | None:
    """FLOP/s of a large fp8 x fp8 -> bf16 matmul through torch._scaled_mm (tensor-wise scales);
    None where torch or the GPU has none."""
    if torch.cuda.get_device_capability(device) < (8, 9) or not hasattr(torch, "_scaled_mm"):
        return None
    from afkv.bench.calibrate import _timer

    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    one = torch.ones((), device=device)
    try:
        return 2 * n**3 / _timer(device)(lambda: torch._scaled_mm(a, b.t(), one, one, out_dtype=torch.bfloat16))
    except RuntimeError:
        return None


# ----------------------------------------------------------------------------------------------
# moe


def _expert_copies(shape: dict, dtype: str, copies: int, device: torch.device, seed: int) -> list[dict]:
    """`copies` independent layers of random experts: moe_mlp keyword args (gate_up, down and,
    for fp8, their block scales)."""
    from afkv.ops.fp8 import quantize_blocks

    e, h, i = shape["num_experts"], shape["hidden"], shape["inter"]
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(copies):
        layer = {}
        for name, dims, std in (("gate_up", (e, 2 * i, h), h**-0.5), ("down", (e, h, i), i**-0.5)):
            w = torch.empty(dims, device=device, dtype=torch.bfloat16).normal_(0, std, generator=gen)
            if dtype == "fp8":  # 128-row blocks of gate_up never straddle gate and up: I % 128 == 0 here
                layer[name], layer[name + "_scale"] = quantize_blocks(w)
                del w
            else:
                layer[name] = w
        out.append(layer)
    return out


def _weight_bytes(shape: dict, dtype: str, touched: int) -> int:
    h, i = shape["hidden"], shape["inter"]
    per_expert = 3 * h * i * (1 if dtype == "fp8" else 2)
    if dtype == "fp8":
        per_expert += 4 * (2 * -(-i // 128) * -(-h // 128) + -(-h // 128) * -(-i // 128))  # scales
    return touched * per_expert


def _fp8(dtype: str) -> tuple[bool, str]:
    """A sweep dtype (MOE_DTYPES) -> (fp8 weights, fp8_mode)."""
    weights, _, mode = dtype.partition("-")
    return weights == "fp8", mode or "tile"


def _calls(num_tokens: int) -> int:
    return 20 if num_tokens <= 256 else 8 if num_tokens <= 2048 else 4


@torch.inference_mode()
def moe_sweep(models: list[str], tokens: list[int], dtypes: list[str], *, copies: int = 2, replays: int = 3,
              grouped_tokens: tuple[int, ...] = (16, 256, 2048), tune_tokens: tuple[int, ...] = (),
              tune_dtypes: tuple[str, ...] | None = None, deadline: float | None = None, seed: int = 0,
              log=print) -> dict:
    """The fused-MoE sweep (module docstring): at each point every dtype of MOE_DTYPES asked for
    (fp8 rows: their time against bf16's and, for the fp8-<mode> rows, against fp8's at the same
    point, with their largest difference from fp8's output). Points past `deadline`
    (time.monotonic()) are skipped; the tune points (of tune_dtypes, default all) come after
    every default point (all weight copies stay on the GPU until then)."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    from afkv.bench.calibrate import gemm_peak
    from afkv.bench.steps import copy_bandwidth
    from afkv.model.sides import FFNSide, _Stacked
    from afkv.ops.kernels import select_kernels
    from afkv.ops import triton_moe

    unknown = sorted(set(dtypes) - set(MOE_DTYPES))
    if unknown:
        raise ConfigError(f"moe sweep dtypes: unknown {', '.join(unknown)}; known: {', '.join(MOE_DTYPES)}")
    device = _require_gpu()
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    copy_bw = copy_bandwidth(device)
    peaks = {"bf16": gemm_peak(device, torch.bfloat16, 8192)}
    kinds = list(dict.fromkeys("fp8" if _fp8(d)[0] else "bf16" for d in dtypes))  # weight dtypes
    if "fp8" in kinds:
        peaks["fp8"] = fp8_gemm_peak(device) or peaks["bf16"]
    log(f"HBM copy {copy_bw / 1e12:.2f} TB/s, GEMM peak bf16 {peaks['bf16'] / 1e12:.0f} TFLOP/s"
        + (f", fp8 {peaks['fp8'] / 1e12:.0f} TFLOP/s" if "fp8" in peaks else ""))
    result = {"bench": "kernels-moe", "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "triton": triton_moe.triton.__version__, "copy_bytes_per_s": copy_bw, "gemm_flops_per_s": peaks,
              "copies": copies, "replays": replays, "rows": [], "tuned": []}
    pending_tune = []  # (model, dtype, num_tokens, calls, default config, weight copies)
    for name in models:
        shape = MOE_SHAPES[name]
        e, h, i, k = shape["num_experts"], shape["hidden"], shape["inter"], shape["top_k"]
        local = torch.arange(e + 1, device=device)  # every expert held
        layers = {kind: _expert_copies(shape, kind, copies, device, seed) for kind in kinds}
        for num_tokens in tokens:
            gen = torch.Generator(device=device).manual_seed(seed + num_tokens)
            x = torch.randn(num_tokens, h, generator=gen, device=device).to(torch.bfloat16)  # [T, H]
            logits = torch.randn(num_tokens, e, generator=gen, device=device)  # [T, E]
            weights, ids = torch.softmax(logits, -1).topk(k, -1)  # [T, k] each
            touched = int(torch.unique(ids).numel())
            point = {}  # dtype -> (row, first call's output)
            for dtype in dtypes:
                if deadline is not None and time.monotonic() > deadline:
                    log(f"  {name} {dtype} T={num_tokens}: skipped (deadline)")
                    continue
                fp8, mode = _fp8(dtype)
                kind = "fp8" if fp8 else "bf16"
                weight_bytes = _weight_bytes(shape, kind, touched)
                flops = 2 * num_tokens * k * 3 * h * i
                bytes_s, flops_s = weight_bytes / copy_bw, flops / peaks[kind]
                cfg = triton_moe.default_config(num_tokens * k, e, h, i, sm_count, fp8, mode)
                fns = [functools.partial(triton_moe.moe_mlp, x, ids, weights, local, **layers[kind][c % copies],
                                         config=cfg) for c in range(_calls(num_tokens))]
                try:
                    moe_s = time_s(fns, replays, device)
                except (OutOfResources, CompilationError) as exc:  # a candidate mode's tiles on this GPU
                    result["rows_failed"] = result.get("rows_failed", []) + [
                        {"model": name, "dtype": dtype, "num_tokens": num_tokens, "config": asdict(cfg),
                         "error": str(exc)[:300]}]
                    log(f"  {name} {dtype} T={num_tokens}: {type(exc).__name__} {str(exc)[:200]}")
                    continue
                row = {"model": name, "dtype": dtype, "num_tokens": num_tokens, "experts_touched": touched,
                       "weight_bytes": weight_bytes, "flops": flops, "roofline_s": max(bytes_s, flops_s),
                       "bound": "weights" if bytes_s >= flops_s else "flops", "moe_s": moe_s,
                       "share": max(bytes_s, flops_s) / moe_s, "config": asdict(cfg)}
                y = fns[0]().float()
                if dtype == "bf16" and num_tokens in grouped_tokens:
                    tf = select_kernels(device).fused
                    st = [_Stacked(layer["gate_up"], layer["down"], local) for layer in layers["bf16"]]
                    ref = [functools.partial(FFNSide._grouped, st[c % copies], x, ids, weights, tf)
                           for c in range(_calls(num_tokens))]
                    row["torch_s"] = time_s(ref, replays, device)
                    want = ref[0]().float()
                    row["max_rel_diff"] = float((y - want).abs().max() / want.abs().max())
                if fp8 and "bf16" in point:
                    row["vs_bf16"] = moe_s / point["bf16"][0]["moe_s"]
                if fp8 and mode != "tile" and "fp8" in point:
                    tile_row, tile_y = point["fp8"]
                    row["vs_fp8"] = moe_s / tile_row["moe_s"]
                    row["max_rel_diff_fp8"] = float((y - tile_y).abs().max() / tile_y.abs().max())
                point[dtype] = (row, y)
                result["rows"].append(row)
                log(_moe_line(row))
                if num_tokens in tune_tokens and (tune_dtypes is None or dtype in tune_dtypes):
                    pending_tune.append((name, dtype, num_tokens, fns[0].args[:4], cfg, layers[kind]))
                del fns
            del point
        del layers
    _tune(result, pending_tune, sm_count, replays, device, deadline, log)
    del pending_tune
    gc.collect()
    torch.cuda.empty_cache()
    return result


def _tune(result, points, sm_count, replays, device, deadline, log) -> None:
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    from afkv.ops import triton_moe

    for name, dtype, num_tokens, (x, ids, weights, local), default, layers in points:
        shape = MOE_SHAPES[name]
        e, h, i, k = shape["num_experts"], shape["hidden"], shape["inter"], shape["top_k"]
        tried = []
        for cfg in triton_moe.candidate_configs(num_tokens * k, e, h, i, sm_count, *_fp8(dtype)):
            if deadline is not None and time.monotonic() > deadline:
                break
            calls = [functools.partial(triton_moe.moe_mlp, x, ids, weights, local, **layers[c % len(layers)],
                                       config=cfg) for c in range(_calls(num_tokens))]
            try:
                tried.append({"config": asdict(cfg), "moe_s": time_s(calls, replays, device)})
            except (OutOfResources, CompilationError) as exc:  # a candidate may not fit the GPU's shared memory
                tried.append({"config": asdict(cfg), "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        ok = [t for t in tried if "moe_s" in t]
        if ok:
            best = min(ok, key=lambda t: t["moe_s"])
            result["tuned"].append({"model": name, "dtype": dtype, "num_tokens": num_tokens, "default": asdict(default),
                                    "best": best, "tried": tried})
            log(f"  tune {name} {dtype} T={num_tokens}: best {best['moe_s'] * 1e6:.1f} us {best['config']}")


def _moe_line(r: dict) -> str:
    torch_us = f"{r['torch_s'] * 1e6:>10.1f}" if "torch_s" in r else f"{'-':>10}"
    speed = f"{r['torch_s'] / r['moe_s']:>9.2f}" if "torch_s" in r else f"{'-':>9}"
    vs = f"{r['vs_bf16']:>9.2f}" if "vs_bf16" in r else f"{'-':>9}"
    vs_fp8 = f"{r['vs_fp8']:>8.2f}{r['max_rel_diff_fp8']:>9.1e}" if "vs_fp8" in r else f"{'-':>8}{'-':>9}"
    return (f"{r['model']:<14}{r['dtype']:>12}{r['num_tokens']:>6}{r['experts_touched']:>5}"
            f"{r['weight_bytes'] / 1e6:>8.0f}{r['flops'] / 1e9:>8.0f}{r['roofline_s'] * 1e6:>9.1f}{r['bound']:>8}"
            f"{r['moe_s'] * 1e6:>10.1f}{r['share']:>7.0%}{torch_us}{speed}{vs}{vs_fp8}")


def format_moe(result: dict) -> str:
    head = (f"{'model':<14}{'dtype':>12}{'T':>6}{'E':>5}{'MB':>8}{'GFLOP':>8}{'roof us':>9}{'bound':>8}"
            f"{'moe us':>10}{'share':>7}{'torch us':>10}{'x torch':>9}{'vs bf16':>9}{'vs fp8':>8}{'diff fp8':>9}")
    peaks = result["gemm_flops_per_s"]
    lines = [f"{result['device']}, triton {result['triton']}, HBM copy {result['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
             f"GEMM peak " + ", ".join(f"{d} {p / 1e12:.0f} TFLOP/s" for d, p in peaks.items()), head, "-" * len(head)]
    lines += [_moe_line(r) for r in result["rows"]]
    lines += [f"{r['model']} {r['dtype']} T={r['num_tokens']}: failed, {r['error'][:160]}"
              for r in result.get("rows_failed", [])]
    for t in result.get("tuned", []):
        d = next(r for r in result["rows"] if (r["model"], r["dtype"], r["num_tokens"]) == (t["model"], t["dtype"],
                                                                                               t["num_tokens"]))
        c = t["best"]["config"]
        lines.append(f"tune {t['model']} {t['dtype']} T={t['num_tokens']}: default {d['moe_s'] * 1e6:.1f} us, best "
                     f"{t['best']['moe_s'] * 1e6:.1f} us (BM {c['block_m']} GU_BN {c['gate_up_block_n']} D_BN "
                     f"{c['down_block_n']} BK {c['block_k']} S {c['split_k']} G {c['group_m']} w {c['num_warps']} "
                     f"st {c['num_stages']}{' ' + c['fp8_mode'] if t['dtype'] != 'bf16' else ''}"
                     f"{' atomic' if c.get('atomic_combine') else ''}), "
                     f"{sum('error' in x for x in t['tried'])} of {len(t['tried'])} failed to launch")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# fused


def fused_bench(num_tokens: int, *, hidden: int = 2048, num_heads: int = 32, num_kv_heads: int = 4,
                head_dim: int = 128, num_experts: int = 128, top_k: int = 8, moe_inter: int = 768,
                dtype: torch.dtype = torch.bfloat16, calls: int = 100, replays: int = 10, seed: int = 0,
                device: torch.device | str = "cuda") -> list[dict]:
    """Each fused kernel of afkv.ops.triton_fused against the torch composition it replaces at
    `num_tokens` tokens (silu_mul: num_tokens * top_k rows of 2 * moe_inter, as the grouped MoE
    sees them). -> one dict per op: op, num_tokens, fused_s, torch_s (seconds per call), speedup."""
    from afkv.ops import layers
    from afkv.ops import triton_fused as tf

    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device).to(dtype)

    eps = 1e-6
    h, delta, weight = randn(num_tokens, hidden), randn(num_tokens, hidden), randn(hidden)
    qkv = randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim)
    q_norm, k_norm = randn(head_dim), randn(head_dim)
    positions = torch.arange(num_tokens, device=device) + 1000
    cos, sin = layers.Rotary(head_dim, 1e6, device).cos_sin(positions, dtype)  # [T, D] each
    block_size = 16
    kv = randn(-(-num_tokens // block_size) + 1, 2, 2, block_size, num_kv_heads, head_dim)
    slots = torch.arange(num_tokens, device=device)
    slot_blocks, slot_offsets = slots // block_size, slots % block_size
    logits = randn(num_tokens, num_experts)
    gate_up = randn(num_tokens * top_k, 2 * moe_inter)
    qk_args = (num_heads, num_kv_heads, head_dim, q_norm, k_norm, eps, cos, sin, kv, 1, slot_blocks, slot_offsets)
    ops = {  # name -> (fused, torch)
        "rms_norm": (lambda: tf.rms_norm(h, weight, eps), lambda: layers.rms_norm(h, weight, eps)),
        "add_rms_norm": (lambda: tf.add_rms_norm(h, delta, weight, eps),
                         lambda: tf.ref_add_rms_norm(h, delta, weight, eps)),
        "qk_norm_rope_write": (lambda: tf.qk_norm_rope_write(qkv, *qk_args),
                               lambda: tf.ref_qk_norm_rope_write(qkv, *qk_args)),
        "route_topk": (lambda: tf.route_topk(logits, top_k, True), lambda: layers.route_topk(logits, top_k, True)),
        "silu_mul": (lambda: tf.silu_mul(gate_up), lambda: tf.ref_silu_mul(gate_up)),
    }
    rows = []
    for name, (fused, reference) in ops.items():
        fused_s = time_s([fused] * calls, replays, device)
        torch_s = time_s([reference] * calls, replays, device)
        rows.append({"op": name, "num_tokens": num_tokens, "fused_s": fused_s, "torch_s": torch_s,
                     "speedup": torch_s / fused_s})
    return rows


def format_fused(rows: list[dict]) -> str:
    lines = [f"{'op':<20}{'T':>6}{'fused us':>10}{'torch us':>10}{'speedup':>9}"]
    lines += [f"{r['op']:<20}{r['num_tokens']:>6}{r['fused_s'] * 1e6:>10.2f}{r['torch_s'] * 1e6:>10.2f}"
              f"{r['speedup']:>9.2f}" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# decode


def _kernel_table(model, inputs, kv) -> list[dict]:
    """Kernels of one eager step by name: count and device time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    model.attn.logits(model.forward(inputs, kv, 1)).argmax(-1)  # warm
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.attn.logits(model.forward(inputs, kv, 1)).argmax(-1)
        torch.cuda.synchronize()
    table: dict[str, dict] = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        row = table.setdefault(ev.name, {"kernel": ev.name, "count": 0, "device_s": 0.0})
        row["count"] += 1
        row["device_s"] += ev.device_time_total / 1e6 if hasattr(ev, "device_time_total") else ev.cuda_time_total / 1e6
    return sorted(table.values(), key=lambda r: -r["device_s"])


@torch.inference_mode()
def decode_bench(model: str, batch: int, context: int, steps: int, expert_dtypes: list[str],
                 profile: bool = True, log=print) -> dict:
    """TPOT of a decode step replayed as a CUDA graph (as afkv.bench.steps.colocated_phase
    measures it), T_attn, and (profile) the step's kernels by name, per expert dtype."""
    from afkv.bench.steps import ZeroFFN, eager_inputs, median_s, random_kv, step_bytes, synthetic_step
    from afkv.model.graphs import DecodeGraphs
    from afkv.model.model import Model, load_colocated

    device = _require_gpu()
    out = {"bench": "kernels-decode", "device": torch.cuda.get_device_name(device), "model": model, "batch": batch,
           "context": context, "runs": {}}
    block = 16
    for expert_dtype in expert_dtypes:
        t0 = time.perf_counter()
        m = load_colocated(model, device, torch.bfloat16, expert_dtype=expert_dtype)
        log(f"  loaded {model} (experts {expert_dtype}) in {time.perf_counter() - t0:.0f} s")
        spec = m.spec
        step = synthetic_step(spec, batch, context, block)
        nblocks = step[-1]
        kv = random_kv(spec, nblocks + 1, block, torch.bfloat16, device)
        row: dict = {}
        for label, mm in (("tpot_s", m), ("t_attn_s", Model(spec, m.attn, ZeroFFN()))):
            graphs = DecodeGraphs(mm, kv, batch, len(step[5][0]), nblocks, buckets=[batch])
            row[label] = median_s(lambda: graphs.run(*step[:6], 1).argmax(-1), steps)  # noqa: B023
            del graphs
        row["bytes"] = step_bytes(spec, batch, context)  # fp8 routed experts: one byte a weight
        if profile:
            kernels = _kernel_table(m, eager_inputs(step, device), kv)
            row["kernels"] = kernels
            row["kernels_per_step"] = sum(r["count"] for r in kernels)
            row["kernel_device_s"] = sum(r["device_s"] for r in kernels)
        out["runs"][expert_dtype] = row
        log(f"  {model} batch {batch}, experts {expert_dtype}: TPOT {row['tpot_s'] * 1e3:.2f} ms, "
            f"T_attn {row['t_attn_s'] * 1e3:.2f} ms" + (f", {row['kernels_per_step']} kernels per step "
                                                         f"({row['kernel_device_s'] * 1e3:.2f} ms on the device)"
                                                         if profile else ""))
        del m, kv
        gc.collect()
        torch.cuda.empty_cache()
    return out


def format_decode(result: dict, top: int = 12) -> str:
    lines = []
    for dtype, r in result["runs"].items():
        lines.append(f"{result['model']} batch {result['batch']} context {result['context']}, experts {dtype}: "
                     f"TPOT {r['tpot_s'] * 1e3:.2f} ms, T_attn {r['t_attn_s'] * 1e3:.2f} ms")
        if "kernels" in r:
            lines.append(f"  {r['kernels_per_step']} kernels per step, {r['kernel_device_s'] * 1e3:.2f} ms on the "
                         f"device (eager step); top kernels:")
            lines += [f"  {k['count']:>6} x {k['device_s'] / k['count'] * 1e6:>7.2f} us = {k['device_s'] * 1e3:>6.2f} ms  "
                      f"{k['kernel'][:70]}" for k in r["kernels"][:top]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# MLA decode (DeepSeek)

MLA_HEADS = {"deepseek-v3": 128, "deepseek-v2-lite": 16}  # query heads; both cache r = 512, dr = 64
MLA_RANK, MLA_ROPE = 512, 64
MLA_FORMATS = ("bf16", "fp8", "int8")
MLA_WORKLOADS = ((1, 16384), (16, 4096), (64, 4096), (128, 8192))  # (batch, cached tokens per sequence)
_MLA_FLUSH_NBYTES = 512 << 20  # latents cycled through per timing: far beyond L2
H200_USABLE_BYTES = 139 << 30  # one H200 as torch sees it
_KV_SHARE = 0.9  # of what the weights leave: the rest for activations, CUDA graphs, staging


def mla_token_nbytes(fmt: str, block_size: int = 64) -> float:
    """Bytes one token's latent takes in one layer: bf16 (576 values), or a quantized latent
    row (codes, scales, zero points, the 16-bit rotary part) divided by its tokens."""
    from afkv.ops import quant

    if fmt == "bf16":
        return (MLA_RANK + MLA_ROPE) * 2
    spec = quant.LatentQuantSpec(fmt, 1, block_size, MLA_RANK, MLA_ROPE, torch.bfloat16)
    return spec.layer_nbytes / block_size


def _weight_nbytes(model: str, num_layers: int | None = None, expert_dtype: str = "auto") -> int:
    """Bytes of a model's weights as afkv holds them: 16-bit, routed experts one byte each in fp8."""
    from afkv.model.random import REAL_SHAPES, RandomCheckpoint
    from afkv.model.spec import spec_from_hf_config

    cfg = dict(REAL_SHAPES[model], **({"num_hidden_layers": num_layers} if num_layers else {}))
    shapes = RandomCheckpoint(spec_from_hf_config(cfg, source=model)).shapes
    fp8 = expert_dtype == "fp8"
    return sum(math.prod(shape) * (1 if fp8 and ".mlp.experts." in name else 2) for name, shape in shapes.items())


def mla_capacity(block_size: int = 64) -> dict:
    """Per latent format: bytes per token (one layer; DeepSeek-V3's 61 and V2-Lite's 27), the
    ratio to bf16, and the KV tokens (the longest context, or the sum over a batch) one H200
    holds beside each model that fits there (its weights as afkv holds them; 90% of the rest
    for KV). Arithmetic, no device needed."""
    models = {"deepseek-v2-lite (bf16)": ("deepseek-v2-lite", None, "auto"),
              "deepseek-v3-8l (fp8 experts)": ("deepseek-v3-8l", None, "fp8"),
              "deepseek-v3 61l (fp8 experts)": ("deepseek-v3-8l", 61, "fp8")}
    weights = {label: _weight_nbytes(*args) for label, args in models.items()}
    layers = {"deepseek-v2-lite (bf16)": 27, "deepseek-v3-8l (fp8 experts)": 8, "deepseek-v3 61l (fp8 experts)": 61}
    rows = []
    for fmt in MLA_FORMATS:
        per_layer = mla_token_nbytes(fmt, block_size)
        row = {"format": fmt, "bytes_per_token_layer": per_layer, "vs_bf16": per_layer / mla_token_nbytes("bf16"),
               "bytes_per_token_v3": 61 * per_layer, "bytes_per_token_v2_lite": 27 * per_layer, "h200_tokens": {}}
        for label, w in weights.items():
            room = (H200_USABLE_BYTES - w) * _KV_SHARE
            row["h200_tokens"][label] = int(room // (layers[label] * per_layer)) if room > 0 else 0
        rows.append(row)
    return {"block_size": block_size, "h200_usable_bytes": H200_USABLE_BYTES, "weights_bytes": weights, "rows": rows}


def format_capacity(result: dict) -> str:
    labels = list(result["weights_bytes"])
    lines = [f"MLA latent bytes per token (block {result['block_size']}) and the KV tokens one H200 holds beside the "
             f"weights ({result['h200_usable_bytes'] / 2**30:.0f} GiB, 90% of what the weights leave; weights: "
             + ", ".join(f"{k} {v / 1e9:.0f} GB" for k, v in result["weights_bytes"].items())
             + "); one sequence is capped at 163,840 positions",
             f"{'format':>6} {'B/token/layer':>14} {'vs bf16':>8} {'V3 61l B/token':>15} {'V2-Lite B/token':>16} "
             + " ".join(f"{k:>30}" for k in labels)]
    for r in result["rows"]:
        fits = " ".join(f"{_tokens(r['h200_tokens'][k]):>30}" for k in labels)
        lines.append(f"{r['format']:>6} {r['bytes_per_token_layer']:>14.1f} {r['vs_bf16']:>8.3f} "
                     f"{r['bytes_per_token_v3']:>15,.0f} {r['bytes_per_token_v2_lite']:>16,.0f} {fits}")
    lines.append("FlashMLA's fp8 cache: 656 B/token/layer (0.57x of bf16)")
    return "\n".join(lines)


def _tokens(n: int) -> str:
    return f"{n:,} tokens" if n else "does not fit"


def _mla_cache(fmt: str, num_blocks: int, num_layers: int, block_size: int, device: torch.device):
    """A latent cache of random values: bf16 [nb, L, bs, 576], or a quantized device tier whose
    blocks are all rows (one staging block, never read)."""
    from afkv.ops import quant
    from afkv.ops.attention import QuantizedKVCache

    shape = (num_layers, block_size, MLA_RANK + MLA_ROPE)
    if fmt == "bf16":
        return torch.empty((num_blocks, *shape), dtype=torch.bfloat16, device=device).normal_()
    spec = quant.LatentQuantSpec(fmt, num_layers, block_size, MLA_RANK, MLA_ROPE, torch.bfloat16)
    rows = torch.empty(num_blocks, spec.row_nbytes, dtype=torch.uint8, device=device)
    step = max(1, (256 << 20) // (math.prod(shape) * 4))  # float32 blocks quantized per call
    for i in range(0, num_blocks, step):
        n = min(step, num_blocks - i)
        quant.quantize_latent_rows(torch.randn((n, *shape), device=device), spec, out=rows[i : i + n])
    staging = torch.zeros((1, *shape), dtype=torch.bfloat16, device=device)
    return QuantizedKVCache(rows, staging, spec, max_tail_blocks=1)


@torch.inference_mode()
def mla_sweep(formats: list[str], workloads: list[tuple[int, int]], *, models: tuple[str, ...] = tuple(MLA_HEADS),
              block_size: int = 64, tune: bool = False, replays: int = 5, deadline: float | None = None,
              log=print) -> dict:
    """The Triton paged MLA decode kernel (afkv.ops.triton_mla) at DeepSeek-V3's and V2-Lite's
    shapes: time per layer call, latent bytes read / time against the HBM copy ceiling, FLOPs
    / time against the dense bf16 GEMM peak (both measured here), and the roofline share
    max(bytes / copy, FLOPs / peak) / time. Calls cycle over layers (> 512 MiB of latents).
    `tune`: per model and format, the default launch and triton_mla.CANDIDATE_TILES timed
    on the first workload with batch >= 16, each checked against float32 attention over the
    same latents (a candidate that does not compile, fit or match is reported and left out);
    the fastest runs the rest. Tuning stops at `deadline` (time.monotonic())."""
    from afkv.bench.calibrate import gemm_peak
    from afkv.bench.steps import copy_bandwidth
    from afkv.ops import triton_mla

    device = _require_gpu()
    copy_bw = copy_bandwidth(device)
    peak = gemm_peak(device, torch.bfloat16, 8192)
    log(f"HBM copy {copy_bw / 1e12:.2f} TB/s, bf16 GEMM peak {peak / 1e12:.0f} TFLOP/s")
    scale = (128 + MLA_ROPE) ** -0.5
    rows, tuned = [], []
    for model in models:
        heads = MLA_HEADS[model]
        for fmt in formats:
            default = triton_mla.default_tile(heads, fmt != "bf16")
            tile = default
            tune_at = next((w for w in workloads if w[0] >= 16), None) if tune else None
            for batch, context in workloads:
                per_seq = -(-context // block_size)
                token_nbytes = mla_token_nbytes(fmt, block_size)
                layer_nbytes = batch * per_seq * block_size * token_nbytes
                num_layers = max(1, min(16, -(-_MLA_FLUSH_NBYTES // int(layer_nbytes))))
                cache = _mla_cache(fmt, batch * per_seq, num_layers, block_size, device)
                tables = torch.arange(batch * per_seq, device=device).view(batch, per_seq)  # [B, nb]
                lens = torch.full((batch,), context, dtype=torch.int64, device=device)  # [B]
                q = (torch.randn(batch, heads, MLA_RANK + MLA_ROPE, device=device) * 0.1).to(torch.bfloat16)
                calls = functools.partial(_mla_calls, q, cache, tables, lens, scale, num_layers)
                if (batch, context) == tune_at:
                    tile, trials = _mla_tune(default, heads, q, cache, tables, lens, scale, calls, replays, device,
                                             deadline, log)
                    tuned.append({"model": model, "format": fmt, "batch": batch, "context": context,
                                  "default": asdict(default), "best": asdict(tile), "trials": trials})
                seconds = time_s(calls(tile), replays, device)
                read = batch * context * token_nbytes
                flops = 2 * batch * context * heads * (2 * MLA_RANK + MLA_ROPE)  # q.latent and P @ c
                row = {"model": model, "format": fmt, "batch": batch, "context": context, "heads": heads,
                       "seconds": seconds, "read_bytes": read, "bytes_per_s": read / seconds,
                       "vs_copy": read / seconds / copy_bw, "flops_per_s": flops / seconds,
                       "vs_peak": flops / seconds / peak,
                       "roofline_share": max(read / copy_bw, flops / peak) / seconds, "tile": asdict(tile)}
                rows.append(row)
                log(_mla_line(row))
                del cache
                torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(device), "copy_bytes_per_s": copy_bw, "bf16_peak_flops": peak,
            "block_size": block_size, "rows": rows, "tuned": tuned}


def _mla_calls(q, cache, tables, lens, scale, num_layers, tile) -> list:
    """One decode call per layer of the cache (the timer cycles over them)."""
    from afkv.ops import triton_mla

    return [functools.partial(triton_mla.paged_mla_decode, q, cache, layer, tables, lens, scale, MLA_RANK, tile=tile)
            for layer in range(num_layers)]


def _mla_tune(default, heads, q, cache, tables, lens, scale, calls, replays, device, deadline, log):
    """Time the default launch and triton_mla.CANDIDATE_TILES (of at most `heads` heads per
    program, or 16; whole-latent scores over raw latents only); each result checked against
    float32 attention over the same latents.
    -> (the fastest tile that matched, [{tile, us | error}])."""
    from afkv.ops import mla, triton_mla

    raw = isinstance(cache, torch.Tensor)
    cache_f = cache[:, :1].float() if raw else cache  # layer 0
    want = mla.mla_decode_attention(q.float(), cache_f, 0, tables, lens, scale, MLA_RANK)  # [B, H, r]
    candidates = [default] + [t for t in triton_mla.CANDIDATE_TILES
                              if t.block_h <= max(16, heads) and t != default and (raw or not t.whole_scores)]
    best, trials = None, []
    for tile in candidates:
        if deadline is not None and time.monotonic() > deadline:
            log(f"    tile {_tile_str(tile)}: skipped (deadline)")
            continue
        try:
            got = triton_mla.paged_mla_decode(q, cache, 0, tables, lens, scale, MLA_RANK, tile=tile).float()
            err = ((got - want).abs() - 2e-2 * want.abs()).max().item()  # the GPU tests' bound: 3e-2 + 2e-2 |ref|
            if not err <= 3e-2:
                raise ValueError(f"does not match float32 attention (excess {err:.3g})")
            seconds = time_s(calls(tile), replays, device)
        except Exception as exc:  # noqa: BLE001 - a candidate that fails is reported and left out
            trials.append({"tile": asdict(tile), "error": f"{type(exc).__name__}: {str(exc)[:160]}"})
            log(f"    tile {_tile_str(tile)}: {trials[-1]['error']}")
            continue
        trials.append({"tile": asdict(tile), "us": seconds * 1e6})
        log(f"    tile {_tile_str(tile)}: {seconds * 1e6:.1f} us" + (" (default)" if tile == default else ""))
        if best is None or seconds < best[0]:
            best = (seconds, tile)
    if best is None:
        return default, trials
    log(f"    best {_tile_str(best[1])}")
    return best[1], trials


def _tile_str(t) -> str:
    flat = " flat" if getattr(t, "flat", False) else ""  # JSON written before MLATile.flat has none
    return f"h{t.block_h} n{t.block_n} w{t.num_warps} s{t.num_stages} chunk{t.rank_chunk} pps{t.programs_per_sm}{flat}"


def _mla_line(r: dict) -> str:
    return (f"{r['model']:>16} {r['format']:>5} {r['batch']:>5} {r['context']:>7} {r['seconds'] * 1e6:>9.1f} "
            f"{r['bytes_per_s'] / 1e9:>7.0f} {r['vs_copy']:>7.0%} {r['flops_per_s'] / 1e12:>7.0f} {r['vs_peak']:>7.0%} "
            f"{r['roofline_share']:>8.0%}  {_tile_str(SimpleNamespace(**r['tile']))}")


def format_mla(result: dict) -> str:
    head = (f"{'model':>16} {'fmt':>5} {'batch':>5} {'context':>7} {'us/layer':>9} {'GB/s':>7} {'vs copy':>7} "
            f"{'TFLOP/s':>7} {'vs peak':>7} {'roofline':>8}  tile")
    return "\n".join([f"MLA decode kernel, {result['device']}: HBM copy {result['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
                      f"bf16 GEMM {result['bf16_peak_flops'] / 1e12:.0f} TFLOP/s, block {result['block_size']} "
                      f"(anchor: FlashMLA ~3000 GB/s, 660 TFLOP/s on H800)", head, "-" * len(head)]
                     + [_mla_line(r) for r in result["rows"]]
                     + [_tuned_line(t) for t in result.get("tuned", ())])


def _tuned_line(t: dict) -> str:
    us = {_tile_str(SimpleNamespace(**x["tile"])): x["us"] for x in t["trials"] if "us" in x}
    best, default = _tile_str(SimpleNamespace(**t["best"])), _tile_str(SimpleNamespace(**t["default"]))
    failed = sum("error" in x for x in t["trials"])
    ratio = f", {us[default] / us[best]:.2f}x the default ({default})" if default in us and best in us else ""
    return (f"tuned {t['model']} {t['format']} at {t['batch']}x{t['context']}: {best} {us.get(best, float('nan')):.1f} us"
            f"{ratio}; {len(us)} timed, {failed} failed")


# ----------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="afkv bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("moe", "fused", "decode", "mla", "mla-bytes"))
    p.add_argument("--models", default=",".join(MOE_SHAPES), help="moe: comma-separated expert shapes")
    p.add_argument("--tokens", default=",".join(map(str, MOE_TOKENS)), help="moe: routed tokens per layer")
    p.add_argument("--dtypes", default=",".join(MOE_DTYPES),
                   help="moe: expert weights of " + ", ".join(MOE_DTYPES) + " (fp8: fp8_mode tile, the default; "
                   "fp8-MODE: that fp8_mode)")
    p.add_argument("--tune-dtypes", default="", help="moe: the dtypes --tune tunes (default: all swept)")
    p.add_argument("--copies", type=int, default=2, help="moe: weight copies cycled through (distinct layers)")
    p.add_argument("--replays", type=int, default=3)
    p.add_argument("--tune", default="", help="moe: token counts at which to time candidate tile configs; "
                   "mla: any value times triton_mla.CANDIDATE_TILES")
    p.add_argument("--mla-formats", default=",".join(MLA_FORMATS), help="mla: latent formats, bf16 / fp8 / int8")
    p.add_argument("--mla-models", default=",".join(MLA_HEADS), help=f"mla: of {', '.join(MLA_HEADS)}")
    p.add_argument("--mla-workloads", default=",".join(f"{b}x{c}" for b, c in MLA_WORKLOADS),
                   help="mla: BATCHxCONTEXT, comma-separated")
    p.add_argument("--fused-tokens", default="1,64,256", help="fused: token counts")
    p.add_argument("--model", default="random:qwen3-30b-a3b", help="decode: random:<name> or a checkpoint")
    p.add_argument("--batch", type=int, default=1, help="decode: sequences")
    p.add_argument("--context", type=int, default=2048, help="decode: cached tokens per sequence")
    p.add_argument("--steps", type=int, default=10, help="decode: timed steps (median)")
    p.add_argument("--expert-dtypes", default="auto", help="decode: comma-separated, auto and/or fp8")
    p.add_argument("--no-profile", action="store_true", help="decode: skip the per-kernel table")
    p.add_argument("--deadline-s", type=float, help="moe: skip the points (and tuning) left after this many seconds; mla: the tuning")
    p.add_argument("--json", help="output path (default bench-results/kernels-<what>-<time>.json)")
    args = p.parse_args(argv)
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    deadline = time.monotonic() + args.deadline_s if args.deadline_s else None
    log = functools.partial(print, flush=True)
    result: dict = {"bench": f"kernels-{args.what}", "date": time.strftime("%Y-%m-%d")}
    tables = []
    if args.what == "moe":
        moe = moe_sweep(split(args.models), [int(t) for t in split(args.tokens)], split(args.dtypes),
                        copies=args.copies, replays=args.replays, tune_tokens=tuple(int(t) for t in split(args.tune)),
                        tune_dtypes=tuple(split(args.tune_dtypes)) or None, deadline=deadline, log=log)
        result["moe"] = moe
        tables.append(format_moe(moe))
    if args.what == "decode":
        result["decode"] = decode_bench(args.model, args.batch, args.context, args.steps, split(args.expert_dtypes),
                                        profile=not args.no_profile, log=log)
        tables.append(format_decode(result["decode"]))
    if args.what in ("mla", "mla-bytes"):
        result["capacity"] = mla_capacity()
        tables.append(format_capacity(result["capacity"]))
    if args.what == "mla":
        workloads = [tuple(int(x) for x in w.split("x")) for w in split(args.mla_workloads)]
        unknown = sorted(set(split(args.mla_models)) - set(MLA_HEADS))
        if unknown:
            p.error(f"--mla-models: unknown {', '.join(unknown)}; known: {', '.join(MLA_HEADS)}")
        result["mla"] = mla_sweep(split(args.mla_formats), workloads, models=tuple(split(args.mla_models)),
                                  tune=bool(args.tune), replays=args.replays, deadline=deadline, log=log)
        tables.append(format_mla(result["mla"]))
    if args.what == "fused":
        device = _require_gpu()
        rows = [r for t in split(args.fused_tokens) for r in fused_bench(int(t), **FUSED_SHAPES, device=device)]
        result["fused"] = rows
        tables.append(format_fused(rows))
    path = Path(args.json or f"bench-results/kernels-{args.what}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    print("\n\n".join(tables))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
