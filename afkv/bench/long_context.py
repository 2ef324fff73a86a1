"""`afkv bench long-context`: contexts larger than the device tier, streamed from host memory
layer by layer (afkv.kv.stream), against the PCIe bound and the all-device run of the same
invocation. Table and JSON.

h2d            the pinned host -> device copy rate of this machine (a 2 GiB pinned buffer,
               median of repeats): the link every streamed byte crosses
decode         per workload (B sequences x context) and host format (none = the model dtype,
               int8, int4, fp8): the attention node's decode step (embedding, every layer's
               attention side with the middle of each context streamed, the lm_head, greedy
               sampling; an FFN that returns zeros: AF puts the experts on other GPUs) through
               the engine's ModelRunner, with `--host-share` of each context in the stream
               store and the sinks + recent window on the device. Against:
                 bound     = host bytes per step / h2d + the device-only step (the same step
                             over the device-resident blocks alone): the issue's target is
                             step <= 1.15 x bound
                 all-device = the whole context on the device (where it fits), eager, same runner
               streamed GB/s = host bytes per step / step time (vs h2d)
prefill        a prompt longer than the device tier through the real scheduler (chunked prefill
               spilling as it goes: KVManager.place): tokens/s and bytes spilled

Wall-clock seconds per step (the runner's step ends with its one host synchronisation), median
of `--steps` after one warm-up. KV is random: the store is filled from a few random blocks
encoded in the host format (realistic codes and scales), the device blocks drawn at random.
On a CPU (tests) everything runs through the torch references and the times mean nothing.
"""

from __future__ import annotations

import gc
import platform
import time
from dataclasses import dataclass

import torch

from afkv.bench import write_json
from afkv.bench.steps import ZeroFFN
from afkv.engine.engine import resolve_device, resolve_dtype
from afkv.engine.params import SamplingParams
from afkv.engine.runner import ChunkPlan, ModelRunner, SampleSpec
from afkv.engine.scheduler import Scheduler, SchedulerLimits
from afkv.engine.sequence import Sequence
from afkv.kv.formats import make_format
from afkv.kv.layout import KVLayout
from afkv.kv.manager import KVManager
from afkv.kv.metrics import KVMetrics
from afkv.kv.stream import StreamConfig, StreamRing, StreamStore
from afkv.model.model import Model, load_attention_side

_GREEDY = SampleSpec(temperature=0.0, top_k=0, top_p=1.0, seed=0, step=0, num_top_logprobs=None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _empty_cache() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def h2d_bandwidth(device: torch.device, nbytes: int = 2 << 30, reps: int = 8) -> float:
    """Bytes/s of one pinned host -> device copy of nbytes (median)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for i in range(reps + 2):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src, non_blocking=True)
        e.record()
        e.synchronize()
        if i >= 2:
            times.append(s.elapsed_time(e) / 1e3)
    del src, dst
    _empty_cache()
    return nbytes / sorted(times)[len(times) // 2]


@dataclass
class _Workload:
    """B sequences of `context` cached tokens: each with `device_tokens` on the device (sinks and
    the recent window, the new token's slot included) and the rest in the stream store."""

    batch: int
    context: int
    host_tokens: int  # per sequence, a multiple of block_size

    @property
    def device_tokens(self) -> int:
        return self.context - self.host_tokens


def _fill_store(store: StreamStore, device: torch.device, gen: torch.Generator) -> None:
    """Every store block: one of 64 random blocks encoded in the store's format."""
    fmt = store.format
    lay = fmt.layout
    distinct = min(64, store.config.num_blocks)
    blocks = torch.empty((distinct, *lay.block_shape), dtype=lay.dtype, device=device).normal_(0.0, 1.0, generator=gen)
    layers = fmt.encode(blocks).view(distinct, lay.num_layers, fmt.layer_nbytes).transpose(0, 1).contiguous()  # [L, d, lnb]
    for start in range(0, store.config.num_blocks, distinct):
        n = min(distinct, store.config.num_blocks - start)
        for layer in range(lay.num_layers):
            store.buf[layer, start : start + n].copy_(layers[layer, :n], non_blocking=device.type == "cuda")
    _sync(device)


def _plans(w: _Workload, layout: KVLayout, vocab: int, streamed: bool) -> tuple[list[ChunkPlan], int]:
    """A decode step's plan: sequence b's device blocks are b * per_seq ..., its streamed store ids
    b * host_blocks ... (contiguous: one run per layer). -> (plan, device blocks needed). With
    `streamed` False the plan covers the device-resident blocks alone (the bound's device part)."""
    bs = layout.block_size
    host_blocks = w.host_tokens // bs
    per_seq = -(-(w.device_tokens + 1) // bs)
    plan = []
    for b in range(w.batch):
        ids = tuple(range(b * per_seq, (b + 1) * per_seq))
        store = tuple(range(b * host_blocks, (b + 1) * host_blocks)) if streamed else ()
        plan.append(ChunkPlan(seq_id=b, token_ids=((7 * b + 3) % vocab,), start_pos=w.context, block_table=ids,
                              sample=_GREEDY, num_dropped=w.host_tokens, streamed=store))
    return plan, w.batch * per_seq


def _step_s(runner: ModelRunner, plan: list[ChunkPlan], steps: int) -> float:
    runner.execute(plan)  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        runner.execute(plan)  # ends with the step's one host synchronisation (the sampled tokens)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _decode_rows(model: Model, layout: KVLayout, w: _Workload, formats: list[str], steps: int, h2d: float | None,
                 progress) -> list[dict]:
    device = model.attn.embed_tokens.device
    gen = torch.Generator(device=device).manual_seed(0)
    bs = layout.block_size
    vocab = model.spec.vocab_size
    rows = []
    plan_dev, num_dev_blocks = _plans(w, layout, vocab, streamed=False)
    kv = torch.empty((num_dev_blocks, *layout.block_shape), dtype=layout.dtype, device=device).normal_(0.0, 1.0,
                                                                                                       generator=gen)
    device_only_s = _step_s(ModelRunner(model, kv, bs, device), plan_dev, steps)
    progress(f"  {w.batch} x {w.context}: device-only part ({w.device_tokens} tokens each) {device_only_s * 1e3:.1f} ms")
    host_blocks = w.batch * w.host_tokens // bs
    for fmt_name in formats:
        fmt = make_format(fmt_name, layout)
        store = StreamStore(StreamConfig(fmt, host_blocks, num_sink_tokens=0, window=1, ahead=2), device, KVMetrics())
        _fill_store(store, device, gen)
        runner = ModelRunner(model, kv, bs, device, stream=StreamRing(store, device))
        plan, _ = _plans(w, layout, vocab, streamed=True)
        seconds = _step_s(runner, plan, steps)
        host_nbytes = host_blocks * fmt.nbytes
        row = {"batch": w.batch, "context": w.context, "format": fmt_name, "device_tokens": w.device_tokens,
               "host_tokens": w.host_tokens, "host_share": w.host_tokens / w.context, "host_bytes": host_nbytes,
               "step_s": seconds, "device_only_s": device_only_s, "streamed_bytes_per_s": host_nbytes / seconds}
        if h2d:
            row["bound_s"] = host_nbytes / h2d + device_only_s
            row["vs_bound"] = seconds / row["bound_s"]
            row["vs_h2d"] = row["streamed_bytes_per_s"] / h2d
        rows.append(row)
        progress(f"  {w.batch} x {w.context} {fmt_name}: step {seconds * 1e3:.1f} ms, {host_nbytes / 2**30:.2f} GiB "
                 f"streamed = {row['streamed_bytes_per_s'] / 1e9:.1f} GB/s"
                 + (f" ({row['vs_h2d']:.0%} of h2d), {row['vs_bound']:.2f}x the bound" if h2d else ""))
        del runner, store
        _empty_cache()
    base = next((r for r in rows if r["format"] == "none"), None)
    for r in rows:
        if base is not None:
            r["speedup_vs_none"] = base["step_s"] / r["step_s"]
    del kv
    _empty_cache()
    rows_all = _all_device_s(model, layout, w, steps, progress)
    for r in rows:
        r["all_device_s"] = rows_all
    return rows


def _all_device_s(model: Model, layout: KVLayout, w: _Workload, steps: int, progress) -> float | None:
    """The same step with every block on the device (eager), or None where it does not fit."""
    device = model.attn.embed_tokens.device
    bs = layout.block_size
    per_seq = -(-(w.context + 1) // bs)
    need = w.batch * per_seq * layout.block_nbytes
    if device.type == "cuda" and need > torch.cuda.mem_get_info(device)[0] - (4 << 30):
        progress(f"  {w.batch} x {w.context} all on the device: {need / 2**30:.1f} GiB does not fit")
        return None
    kv = torch.empty((w.batch * per_seq, *layout.block_shape), dtype=layout.dtype, device=device).normal_(0.0, 1.0)
    plan = [ChunkPlan(seq_id=b, token_ids=((7 * b + 3) % model.spec.vocab_size,), start_pos=w.context,
                      block_table=tuple(range(b * per_seq, (b + 1) * per_seq)), sample=_GREEDY)
            for b in range(w.batch)]
    seconds = _step_s(ModelRunner(model, kv, bs, device), plan, steps)
    progress(f"  {w.batch} x {w.context} all on the device: step {seconds * 1e3:.1f} ms")
    del kv
    _empty_cache()
    return seconds


def _prefill_row(model: Model, layout: KVLayout, prompt_tokens: int, device_tokens: int, chunk: int, fmt_name: str,
                 progress) -> dict:
    """One prompt of prompt_tokens on a device tier of device_tokens, through KVManager.place
    and the Scheduler: chunks of `chunk` tokens, the middle spilled as the prompt goes."""
    device = model.attn.embed_tokens.device
    bs = layout.block_size
    fmt = make_format(fmt_name, layout)
    num_blocks = -(-device_tokens // bs)
    window = device_tokens - chunk - 3 * bs
    if window < bs:
        raise ValueError(f"prefill: the device tier ({device_tokens} tokens) must exceed a chunk ({chunk}) by more "
                         f"than 4 blocks")
    store_blocks = -(-prompt_tokens // bs)
    cfg = StreamConfig(fmt, store_blocks, num_sink_tokens=bs, window=window, ahead=2)
    kv = KVManager(layout, num_blocks, device, stream=cfg)
    runner = ModelRunner(model, kv.kv, bs, device, stream=kv.stream_ring)
    sched = Scheduler(kv, SchedulerLimits(max_num_seqs=1, max_num_batched_tokens=chunk))
    prompt = torch.randint(3, model.spec.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    seq = Sequence(0, prompt, SamplingParams(max_tokens=1), seed=0, max_len=prompt_tokens + 1, arrival_s=0.0)
    sched.add(seq)
    _sync(device)
    start = time.perf_counter()
    num_steps = 0
    while seq.num_output_tokens == 0:
        step = sched.schedule()
        if not step:
            raise RuntimeError("prefill: the scheduler planned nothing (the device tier is too small)")
        plan = sched.plan(step)
        sched.postprocess(step, plan, runner.execute(plan), time.perf_counter())
        num_steps += 1
    seconds = time.perf_counter() - start
    counters = kv.metrics.counters
    row = {"prompt_tokens": prompt_tokens, "device_tokens": device_tokens, "chunk": chunk, "format": fmt_name,
           "steps": num_steps, "seconds": seconds, "tok_s": prompt_tokens / seconds,
           "bytes_spilled": counters["bytes_device_to_stream"], "bytes_streamed": counters["bytes_streamed"]}
    progress(f"  prefill {prompt_tokens} tokens on a {device_tokens}-token device tier ({fmt_name}): {seconds:.1f} s, "
             f"{row['tok_s']:.0f} tok/s; spilled {row['bytes_spilled'] / 2**30:.2f} GiB, streamed "
             f"{row['bytes_streamed'] / 2**30:.2f} GiB over {num_steps} steps")
    sched.finish(seq, "length", time.perf_counter())
    kv.drain()
    kv.check_invariants()
    del runner, kv
    _empty_cache()
    return row


def run_long_context_bench(model: str, device_name: str, workloads: list[tuple[int, int]], formats: list[str],
                           host_share: float = 0.75, block_size: int = 16, steps: int = 3,
                           prefill: tuple[int, int, int] | None = None, progress=print, partial=None) -> dict:
    """-> the result (see format_tables); `partial(result)` after each phase."""
    partial = partial or (lambda _: None)
    device = resolve_device(device_name)
    dtype = resolve_dtype("auto", device)
    cuda = device.type == "cuda"
    spec, attn = load_attention_side(model, device, dtype)
    attention_model = Model(spec, attn, ZeroFFN())
    layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, block_size, dtype)
    progress(f"{model}: {spec.num_layers} layers, {spec.num_heads} / {spec.num_kv_heads} heads, head_dim "
             f"{spec.head_dim}, {dtype}, {device}" + (f" ({torch.cuda.get_device_name(device)})" if cuda else ""))
    result = {"bench": "long-context", "model": model, "formats": formats, "block_size": block_size,
              "host_share": host_share,
              "machine": {"platform": platform.platform(), "torch": torch.__version__, "device": str(device),
                          "gpu": torch.cuda.get_device_name(device) if cuda else None}}
    h2d = None
    if cuda:
        result["h2d_bytes_per_s"] = h2d = h2d_bandwidth(device)
        progress(f"pinned host -> device: {h2d / 1e9:.1f} GB/s")
    result["decode"] = []
    for i, (batch, context) in enumerate(workloads):
        host_tokens = int(context * host_share) // block_size * block_size
        result["decode"] += _decode_rows(attention_model, layout, _Workload(batch, context, host_tokens), formats, steps,
                                         h2d, progress)
        result["longest_context"] = max(r["context"] for r in result["decode"])
        partial(result)
        if i == 0 and prefill is not None:  # before the other workloads: a run cut at its limit keeps one of each
            prompt_tokens, device_tokens, chunk = prefill
            result["prefill"] = _prefill_row(attention_model, layout, prompt_tokens, device_tokens, chunk, "none",
                                             progress)
            partial(result)
    return result


def _table(head: list[tuple[str, str]], rows: list[list]) -> list[str]:
    widths = [max(len(t), 7) for t, _ in head]
    line = " | ".join(f"{t:>{w}}" for (t, _), w in zip(head, widths))
    out = ["", line, "-" * len(line)]
    for row in rows:
        cells = ["-" if v is None else format(v, spec) for v, (_, spec) in zip(row, head)]
        out.append(" | ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    return out


def format_tables(result: dict) -> str:
    lines = []
    if "h2d_bytes_per_s" in result:
        lines.append(f"pinned host -> device {result['h2d_bytes_per_s'] / 1e9:.1f} GB/s ({result['machine']['gpu']})")
    lines += _table([("B x context", ""), ("host", ""), ("on host", ".0%"), ("host GiB", ".2f"), ("step ms", ".1f"),
                     ("GB/s", ".1f"), ("vs h2d", ".0%"), ("bound ms", ".1f"), ("vs bound", ".2f"),
                     ("dev-part ms", ".1f"), ("all-dev ms", ".1f"), ("vs none", ".2f")],
                    [[f"{r['batch']} x {r['context']}", r["format"], r["host_share"], r["host_bytes"] / 2**30,
                      r["step_s"] * 1e3, r["streamed_bytes_per_s"] / 1e9, r.get("vs_h2d"),
                      r["bound_s"] * 1e3 if "bound_s" in r else None, r.get("vs_bound"), r["device_only_s"] * 1e3,
                      r["all_device_s"] * 1e3 if r.get("all_device_s") else None, r.get("speedup_vs_none")]
                     for r in result["decode"]])
    if "longest_context" in result:
        lines.append(f"longest context served: {result['longest_context']} tokens")
    if "prefill" in result:
        p = result["prefill"]
        lines += _table([("prefill", "d"), ("device tier", "d"), ("chunk", "d"), ("s", ".1f"), ("tok/s", ".0f"),
                         ("spilled GiB", ".2f"), ("streamed GiB", ".2f")],
                        [[p["prompt_tokens"], p["device_tokens"], p["chunk"], p["seconds"], p["tok_s"],
                          p["bytes_spilled"] / 2**30, p["bytes_streamed"] / 2**30]])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """afkv bench long-context [--device cuda] [--model M] ...: decode steps of contexts mostly in
    host memory, streamed layer by layer, against the PCIe bound and the all-device run; prefill
    of a prompt longer than the device tier. Prints tables, writes JSON."""
    import argparse

    parser = argparse.ArgumentParser(prog="afkv bench long-context", description=main.__doc__)
    parser.add_argument("--model", default="random:qwen3-30b-a3b", help="checkpoint directory or random:<name>")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--workloads", default="", help="BxCONTEXT,... (default: 1x393216,8x49152 on CUDA, 1x96 on CPU)")
    parser.add_argument("--formats", default="none,int8,int4", help="host formats (none = the model dtype)")
    parser.add_argument("--host-share", type=float, default=0.75, help="share of each context in host memory")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed decode steps per point (after one warm-up)")
    parser.add_argument("--prefill", default="",
                        help="PROMPT,DEVICE_TOKENS,CHUNK (default: 32768,8192,2048 on CUDA, 256,128,32 on CPU); 0: skip")
    parser.add_argument("--json", default=None, help="output path (default: bench-results/long-context-<time>.json)")
    args = parser.parse_args(argv)
    cuda = resolve_device(args.device).type == "cuda"
    spec = args.workloads or ("1x393216,8x49152" if cuda else "1x96")
    workloads = [tuple(int(x) for x in w.split("x")) for w in spec.split(",")]
    pre = args.prefill or ("32768,8192,2048" if cuda else "256,128,32")
    prefill = None if pre == "0" else tuple(int(x) for x in pre.split(","))
    path = args.json or f"bench-results/long-context-{time.strftime('%Y%m%d-%H%M%S')}.json"
    result = run_long_context_bench(args.model, args.device, workloads, args.formats.split(","), args.host_share,
                                    args.block_size, args.steps, prefill, partial=lambda r: write_json(r, path))
    print(format_tables(result))
    print(f"wrote {write_json(result, path)}")


if __name__ == "__main__":
    main()
