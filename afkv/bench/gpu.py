"""The GPU benchmark suite (`afkv bench gpu`): afkv against the hardware and against HF
transformers, on real model shapes with random weights generated on the device.

For each model, in one run on one machine:

    copy bandwidth   a device-to-device copy of 4 GiB: the HBM ceiling every step is held to
    HF generate      transformers' generate on one GPU (random weights, the same shapes):
                     TPOT from two generate calls of different lengths (prefill cancels out)
    afkv colocated   one full replica on one GPU: decode steps replayed as CUDA graphs, and
                     the same steps eagerly; T_attn = the step with an FFN that returns zeros
    roofline share   bytes a step must move (weights it touches + KV it reads) / copy
                     bandwidth, over the measured step time, per side
    AF 1A1F          (two GPUs, --af) attention on GPU 0, experts on GPU 1 over NCCL:
                     `afkv.bench.af` (its figures: step / max(T_attn, T_ffn), round trip)

Decode steps are timed with CUDA events around embedding, every layer, the lm_head and an
argmax on the device (the scheduler is not in the loop), median of `steps` after warm-ups.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import torch

from afkv.bench.af import TPOT_LIMIT_S, _fits, _kv, _ZeroFFN
from afkv.model.graphs import DecodeGraphs
from afkv.model.model import Model, load_colocated
from afkv.model.random import REAL_SHAPES, random_spec
from afkv.model.sides import SeqChunk, StepInputs


def copy_bandwidth(device: torch.device, nbytes: int = 4 << 30, reps: int = 10) -> float:
    """Bytes/s of a device-to-device copy, counting the read and the write (median)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    times = []
    for i in range(reps + 2):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        if i >= 2:
            times.append(s.elapsed_time(e) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / sorted(times)[len(times) // 2]


def step_bytes(spec, batch: int, context: int, itemsize: int = 2) -> dict[str, float]:
    """Bytes one decode step must move at least, per side: every attention-side weight once
    (embedding rows aside), the batch's KV, and the experts the batch touches (uniform routing:
    E * (1 - (1 - k/E)^B) distinct experts per MoE layer)."""
    h, d = spec.hidden_size, spec.head_dim
    attn_layer = h * (spec.num_heads + 2 * spec.num_kv_heads) * d + spec.num_heads * d * h + 2 * h
    attn = spec.num_layers * attn_layer + spec.vocab_size * h  # + lm_head
    ffn = 0.0
    for i in range(spec.num_layers):
        if spec.sparse_layers[i]:
            e, k = spec.num_experts, spec.layer_top_k(i)
            attn += spec.num_experts * h  # router
            touched = e * (1 - (1 - k / e) ** batch)
            ffn += touched * 3 * h * spec.moe_intermediate_size
            if spec.shared_expert_intermediate_size:
                ffn += 3 * h * spec.shared_expert_intermediate_size
        else:
            ffn += 3 * h * spec.intermediate_size
    kv = batch * (context + 1) * spec.kv_bytes_per_token(itemsize)
    return {"attention": attn * itemsize + kv, "ffn": ffn * itemsize, "kv": kv}


def _synthetic_step(spec, batch: int, context: int, block_size: int):
    """Token ids, positions, slots, context lengths and block tables of `batch` sequences
    at `context` cached tokens, each in its own blocks."""
    per_seq = -(-(context + 1) // block_size)
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, spec.vocab_size, (batch,), generator=g).tolist()
    tables = [tuple(range(b * per_seq, (b + 1) * per_seq)) for b in range(batch)]
    pos = [context] * batch
    slot_b = [t[context // block_size] for t in tables]
    slot_o = [context % block_size] * batch
    return ids, pos, slot_b, slot_o, [context + 1] * batch, tables, batch * per_seq


def _eager_inputs(step, device) -> StepInputs:
    ids, pos, slot_b, slot_o, lens, tables, _ = step
    t = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
    table = t([list(x) for x in tables])  # [B, nb]
    chunks = [SeqChunk(i, 1, c, table[i]) for i, c in enumerate(lens)]
    return StepInputs(t(ids), t(pos), t(slot_b), t(slot_o), chunks)


def _median_s(fn, steps: int, warmup: int = 2) -> float:
    times = []
    for i in range(steps + warmup):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        if i >= warmup:
            times.append(s.elapsed_time(e) / 1e3)
    return sorted(times)[len(times) // 2]


@torch.inference_mode()
def colocated_phase(name: str, batches: list[int], context: int, block_size: int, steps: int, copy_bw: float,
                    log, eager_batches: set[int]) -> dict:
    dev = torch.device("cuda:0")
    t0 = time.perf_counter()
    model = load_colocated(f"random:{name}", dev, torch.bfloat16)
    log(f"  afkv: loaded random:{name} on {dev} in {time.perf_counter() - t0:.0f} s")
    spec = model.spec
    zero = Model(spec, model.attn, _ZeroFFN())
    rows: dict[int, dict] = {}
    for b in batches:
        if not _fits(spec, b, context, block_size, torch.cuda.mem_get_info(dev)[0], torch.bfloat16):
            rows[b] = {"note": "KV does not fit next to the full model"}
            log(f"  afkv batch {b}: KV does not fit")
            continue
        step = _synthetic_step(spec, b, context, block_size)
        nblocks = step[-1]
        kv = _kv(spec, nblocks + 1, block_size, torch.bfloat16, dev)  # + the graphs' scratch block
        row: dict = {}
        for label, m in (("graph", model), ("graph_attn_only", zero)):
            graphs = DecodeGraphs(m, kv, b, len(step[5][0]), nblocks, buckets=[b])
            run = lambda: graphs.run(*step[:6], 1).argmax(-1)  # noqa: E731
            row[label + "_s"] = _median_s(run, steps)
            del graphs
        if b in eager_batches:
            inputs = _eager_inputs(step, dev)
            row["eager_s"] = _median_s(lambda: model.attn.logits(model.forward(inputs, kv, 1)).argmax(-1), steps)
        tpot = row["graph_s"]
        need = step_bytes(spec, b, context)
        row |= {"tpot_s": tpot, "tok_s": b / tpot, "t_attn_s": row["graph_attn_only_s"],
                "roofline_share": (need["attention"] + need["ffn"]) / copy_bw / tpot,
                "attn_roofline_share": need["attention"] / copy_bw / row["graph_attn_only_s"],
                "bytes": need}
        rows[b] = row
        eager = f", eager {row['eager_s'] * 1e3:.1f} ms" if "eager_s" in row else ""
        log(f"  afkv batch {b}: TPOT {tpot * 1e3:.2f} ms ({b / tpot:.0f} tok/s){eager}, "
            f"T_attn {row['t_attn_s'] * 1e3:.2f} ms, roofline {row['roofline_share']:.0%}")
        del kv
        torch.cuda.empty_cache()
    del model, zero
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def hf_phase(name: str, batches: list[int], context: int, log, short: int = 4, long: int = 12) -> dict:
    """transformers' generate with random weights in the same shapes, on cuda:0."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dev = torch.device("cuda:0")
    cfg_dict = dict(REAL_SHAPES[name])
    arch = cfg_dict.pop("architectures")[0]
    model_type = {"Qwen3MoeForCausalLM": "qwen3_moe", "MixtralForCausalLM": "mixtral"}[arch]
    cfg = AutoConfig.for_model(model_type, **cfg_dict)
    t0 = time.perf_counter()
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    log(f"  HF: built {arch} with random weights on {dev} in {time.perf_counter() - t0:.0f} s")
    spec = random_spec(f"random:{name}")
    rows: dict[int, dict] = {}
    for b in batches:
        kv_need = b * (context + long) * spec.kv_bytes_per_token(2)
        if kv_need > torch.cuda.mem_get_info(dev)[0] * 0.6:
            rows[b] = {"note": "KV does not fit next to the full model"}
            log(f"  HF batch {b}: KV does not fit")
            continue
        ids = torch.randint(0, spec.vocab_size, (b, context), device=dev)
        mask = torch.ones_like(ids)

        def gen(n: int) -> float:
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
            return time.perf_counter() - t

        try:
            gen(2)  # warm-up
            t_short, t_long = gen(short), gen(long)
        except torch.OutOfMemoryError:
            rows[b] = {"note": "out of memory"}
            log(f"  HF batch {b}: out of memory")
            torch.cuda.empty_cache()
            continue
        tpot = (t_long - t_short) / (long - short)
        rows[b] = {"tpot_s": tpot, "tok_s": b / tpot}
        log(f"  HF batch {b}: TPOT {tpot * 1e3:.1f} ms ({b / tpot:.0f} tok/s)")
        torch.cuda.empty_cache()
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def _best_within(rows: dict, limit_s: float) -> dict:
    ok = [(r["tok_s"], b) for b, r in rows.items() if r.get("tpot_s") and r["tpot_s"] <= limit_s]
    if not ok:
        return {"batch": None, "tok_s": 0.0}
    tok, b = max(ok)
    return {"batch": b, "tok_s": tok}


def run_gpu_suite(models: list[str], batches: list[int], context: int, steps: int = 10, block_size: int = 16,
                  hf: bool = True, hf_batches: list[int] | None = None, log=print) -> dict:
    if not torch.cuda.is_available():
        raise RuntimeError("afkv bench gpu needs a CUDA GPU")
    from afkv.ops import triton_attention

    if not triton_attention.available():
        raise RuntimeError("afkv bench gpu needs triton (the decode kernel the CUDA graphs replay)")
    dev = torch.device("cuda:0")
    torch.cuda.set_device(dev)
    copy_bw = copy_bandwidth(dev)
    log(f"HBM copy bandwidth (read + write): {copy_bw / 1e12:.2f} TB/s")
    out = {"bench": "gpu", "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "context": context,
           "copy_bytes_per_s": copy_bw, "date": time.strftime("%Y-%m-%d"), "models": {}}
    for name in models:
        log(f"{name}:")
        res: dict = {}
        if hf:
            res["hf"] = hf_phase(name, hf_batches or batches, context, log)
        res["afkv"] = colocated_phase(name, batches, context, block_size, steps, copy_bw, log,
                                      eager_batches={batches[0], batches[-1]})
        res["best_within_50ms"] = {"afkv": _best_within(res["afkv"], TPOT_LIMIT_S),
                                   "hf": _best_within(res.get("hf", {}), TPOT_LIMIT_S)}
        out["models"][name] = res
    return out


def format_table(r: dict) -> str:
    lines = [f"{r['device']}, torch {r['torch']}, context {r['context']}, HBM copy {r['copy_bytes_per_s'] / 1e12:.2f} TB/s"]
    head = (f"{'model':>14} | {'batch':>5} | {'afkv TPOT ms':>12} | {'afkv tok/s':>10} | {'eager TPOT ms':>13} | "
            f"{'HF TPOT ms':>10} | {'HF tok/s':>8} | {'afkv/HF':>7} | {'roofline':>8} | {'T_attn ms':>9} | {'attn roofline':>13}")
    lines += [head, "-" * len(head)]
    nan = float("nan")
    for name, res in r["models"].items():
        hf = res.get("hf", {})
        for b in sorted(res["afkv"], key=int):
            a, h = res["afkv"][b], hf.get(b, {})
            ratio = a["tok_s"] / h["tok_s"] if a.get("tok_s") and h.get("tok_s") else nan
            lines.append(
                f"{name:>14} | {b:>5} | {a.get('tpot_s', nan) * 1e3:>12.2f} | {a.get('tok_s', nan):>10.0f} | "
                f"{a.get('eager_s', nan) * 1e3:>13.1f} | {h.get('tpot_s', nan) * 1e3:>10.1f} | {h.get('tok_s', nan):>8.0f} | "
                f"{ratio:>7.1f} | {a.get('roofline_share', nan):>8.0%} | {a.get('t_attn_s', nan) * 1e3:>9.2f} | "
                f"{a.get('attn_roofline_share', nan):>13.0%}")
        bw = res["best_within_50ms"]
        lines.append(f"{name}: best within 50 ms TPOT: afkv batch {bw['afkv']['batch']} ({bw['afkv']['tok_s']:.0f} tok/s), "
                     f"HF batch {bw['hf']['batch']} ({bw['hf']['tok_s']:.0f} tok/s)")
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    return path


def write_plot(result: dict, path: str | Path) -> Path | None:
    """Decode tokens/s against batch, afkv and HF per model (log-log). None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, res in result["models"].items():
        for side, style in (("afkv", "-o"), ("hf", "--s")):
            pts = sorted((int(b), r["tok_s"]) for b, r in res.get(side, {}).items() if r.get("tok_s"))
            if pts:
                ax.plot(*zip(*pts), style, label=f"{name} {'afkv (CUDA graphs)' if side == 'afkv' else 'HF generate'}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (sequences)")
    ax.set_ylabel("decode tokens/s (one GPU)")
    ax.set_title(f"{result['device']}, context {result['context']}, {result['date']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
