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
import time
from pathlib import Path

import torch

from afkv.bench.steps import TPOT_LIMIT_S, colocated_phase, copy_bandwidth
from afkv.errors import DeviceError
from afkv.model.random import REAL_SHAPES, random_spec


def hf_phase(name: str, batches: list[int], context: int, log, short: int = 4, long: int = 12) -> dict:
    """transformers' generate with random weights in the same shapes, on cuda:0."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dev = torch.device("cuda:0")
    cfg_dict = dict(REAL_SHAPES[name])
    arch = cfg_dict.pop("architectures")[0]
    model_type = {"Qwen3MoeForCausalLM": "qwen3_moe", "MixtralForCausalLM": "mixtral",
                  "DeepseekV2ForCausalLM": "deepseek_v2", "DeepseekV3ForCausalLM": "deepseek_v3"}[arch]
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
                  hf: bool = True, hf_batches: list[int] | None = None, expert_dtype: str = "auto",
                  log=print) -> dict:
    """`expert_dtype` fp8: afkv holds the routed experts in fp8 (a model whose bf16 experts do
    not fit, as DeepSeek-V3 cut to 8 layers on one H100); HF generate keeps bf16."""
    if not torch.cuda.is_available():
        raise DeviceError("afkv bench gpu needs a CUDA GPU (this machine has none)")
    from afkv.ops import triton_attention

    if not triton_attention.available():
        raise DeviceError("afkv bench gpu needs triton (the kernels its CUDA graphs replay): pip install triton")
    dev = torch.device("cuda:0")
    torch.cuda.set_device(dev)
    copy_bw = copy_bandwidth(dev)
    log(f"HBM copy bandwidth (read + write): {copy_bw / 1e12:.2f} TB/s")
    out = {"bench": "gpu", "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "context": context,
           "copy_bytes_per_s": copy_bw, "date": time.strftime("%Y-%m-%d"), "expert_dtype": expert_dtype,
           "models": {}}
    for name in models:
        log(f"{name}:")
        res: dict = {}
        if hf:
            res["hf"] = hf_phase(name, hf_batches or batches, context, log)
        res["afkv"] = colocated_phase(name, batches, context, block_size, steps, copy_bw, log,
                                      eager_batches={batches[0], batches[-1]}, expert_dtype=expert_dtype)
        res["best_within_50ms"] = {"afkv": _best_within(res["afkv"], TPOT_LIMIT_S),
                                   "hf": _best_within(res.get("hf", {}), TPOT_LIMIT_S)}
        out["models"][name] = res
    return out


def format_table(r: dict) -> str:
    experts = f", routed experts {r['expert_dtype']}" if r.get("expert_dtype", "auto") != "auto" else ""
    lines = [f"{r['device']}, torch {r['torch']}, context {r['context']}, HBM copy {r['copy_bytes_per_s'] / 1e12:.2f} TB/s"
             + experts]
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
