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
               spilling as it goes: KVManager.place; each chunk attends its device blocks and its
               streamed ones with the prefill kernels' partials): tokens/s, bytes spilled and
               streamed, and two cheap shares of the time: attention FLOPs / time (the rate the
               whole prefill sustains, a lower bound on the kernels') and the time the streamed
               bytes need at the pinned H2D rate (measured on the prefill's own pinned store)

Host memory: one PinnedRegion (afkv.kv.pinned: exactly its size, huge pages faulted in on every
core, then registered with CUDA) holds the store of every format in turn; its size is the
largest store the rows ask for, capped by `--host-gib` (default: the host memory this process
may still take, /proc/meminfo and the cgroup limit, less HOST_HEADROOM: on a 128 GiB host bf16
blocks of 1M tokens, 72 GiB, fit). A format whose store does not fit
runs the longest context (same host share, whole blocks) that does: the table says which. The
time to pin the region and to fill each format's store is printed and kept in the JSON.

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
from pathlib import Path

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
from afkv.kv.pinned import PinnedRegion
from afkv.kv.stream import StreamConfig, StreamRing, StreamStore
from afkv.model.model import Model, load_attention_side

HOST_HEADROOM = 32 << 30  # host memory left unlocked by default (the process, the OS)
# The prefill row on CUDA: a 256k prompt on a 32k-token device tier (87.5% of its KV, 21 GiB of bf16
# on Qwen3-30B-A3B shapes, ends on the host), chunks of 16k. Attention is 2.7e16 FLOP whatever the
# split; each chunk streams its host part once per layer, so the chunk sets the bytes streamed
# (~P^2 / 2C tokens: 192 GiB, ~3.5 s at 55 GB/s; a layer's host part, <= 0.5 GiB, copies in <= 10 ms
# behind the copy stream while the layer before attends for ~0.1 s at 250 TFLOP/s) and the launch's
# width (C / 8 query tiles x 4 kv heads = 8192 programs); the device tier holds the sinks, a 16k
# window and the chunk.
PREFILL_CUDA = "262144,32768,16384"
_GREEDY = SampleSpec(temperature=0.0, top_k=0, top_p=1.0, seed=0, step=0, num_top_logprobs=None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _empty_cache() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def host_memory_available() -> int:
    """Bytes of host memory this process may still take: MemAvailable, within the cgroup's limit."""
    avail = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                 if line.startswith("MemAvailable:"))
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            avail = min(avail, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit readable
    return avail


def h2d_bandwidth(device: torch.device, host: torch.Tensor, nbytes: int = 2 << 30, reps: int = 8) -> float:
    """Bytes/s of one pinned host -> device copy of nbytes (median) from the page-locked `host`."""
    src = host[:nbytes]
    dst = torch.empty(src.numel(), dtype=torch.uint8, device=device)
    times = []
    for i in range(reps + 2):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src, non_blocking=True)
        e.record()
        e.synchronize()
        if i >= 2:
            times.append(s.elapsed_time(e) / 1e3)
    del dst
    _empty_cache()
    return src.numel() / sorted(times)[len(times) // 2]


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
    """Every store block: one of up to 1024 random blocks encoded in the store's format (one
    copy per layer and 1024 blocks: device -> pinned host at the link's rate)."""
    fmt = store.format
    lay = fmt.layout
    distinct = min(1024, store.config.num_blocks)
    layers = torch.empty((lay.num_layers, distinct, fmt.layer_nbytes), dtype=torch.uint8, device=device)
    for a in range(0, distinct, 64):  # encoded 64 blocks at a time: bounded device memory
        n = min(64, distinct - a)
        blocks = torch.empty((n, *lay.block_shape), dtype=lay.dtype, device=device).normal_(0.0, 1.0, generator=gen)
        layers[:, a : a + n] = fmt.encode(blocks).view(n, lay.num_layers, fmt.layer_nbytes).transpose(0, 1)  # [L, n, lnb]
    for start in range(0, store.config.num_blocks, distinct):
        n = min(distinct, store.config.num_blocks - start)
        for layer in range(lay.num_layers):
            store.buf[layer, start : start + n].copy_(layers[layer, :n], non_blocking=device.type == "cuda")
    _sync(device)
    del layers


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


def _fit(w: _Workload, block_nbytes: int, region_nbytes: int, block_size: int, host_share: float) -> _Workload:
    """w, or where its host blocks (of block_nbytes) overflow the region, the longest context of
    the same batch and host share whose host blocks fit (whole blocks)."""
    if w.batch * (w.host_tokens // block_size) * block_nbytes <= region_nbytes:
        return w
    host_tokens = region_nbytes // block_nbytes // w.batch * block_size
    return _Workload(w.batch, max(host_tokens + block_size, round(host_tokens / host_share / block_size) * block_size),
                     host_tokens)


def _device_kv(layout: KVLayout, num_blocks: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    return torch.empty((num_blocks, *layout.block_shape), dtype=layout.dtype, device=device).normal_(0.0, 1.0,
                                                                                                   generator=gen)


def _device_only_s(model: Model, layout: KVLayout, w: _Workload, steps: int, gen: torch.Generator, progress) -> float:
    """The step over the device-resident blocks alone (the bound's device part)."""
    device = model.attn.embed_tokens.device
    plan, num_blocks = _plans(w, layout, model.spec.vocab_size, streamed=False)
    kv = _device_kv(layout, num_blocks, device, gen)
    seconds = _step_s(ModelRunner(model, kv, layout.block_size, device), plan, steps)
    progress(f"  {w.batch} x {w.context}: device-only part ({w.device_tokens} tokens each) {seconds * 1e3:.1f} ms")
    del kv
    _empty_cache()
    return seconds


def _decode_row(model: Model, layout: KVLayout, w: _Workload, ring: StreamRing, steps: int, h2d: float | None,
                device_only_s: float, gen: torch.Generator, progress) -> dict:
    """The streamed decode step of w, its host blocks read from the store of `ring` (filled)."""
    device = model.attn.embed_tokens.device
    fmt = ring.format
    plan, num_blocks = _plans(w, layout, model.spec.vocab_size, streamed=True)
    kv = _device_kv(layout, num_blocks, device, gen)
    seconds = _step_s(ModelRunner(model, kv, layout.block_size, device, stream=ring), plan, steps)
    del kv
    _empty_cache()
    host_nbytes = w.batch * (w.host_tokens // layout.block_size) * fmt.nbytes
    row = {"batch": w.batch, "context": w.context, "format": fmt.name, "device_tokens": w.device_tokens,
           "host_tokens": w.host_tokens, "host_share": w.host_tokens / w.context, "host_bytes": host_nbytes,
           "step_s": seconds, "device_only_s": device_only_s, "streamed_bytes_per_s": host_nbytes / seconds}
    if h2d:
        row["bound_s"] = host_nbytes / h2d + device_only_s
        row["vs_bound"] = seconds / row["bound_s"]
        row["vs_h2d"] = row["streamed_bytes_per_s"] / h2d
    progress(f"  {w.batch} x {w.context} {fmt.name}: step {seconds * 1e3:.1f} ms, {host_nbytes / 2**30:.2f} GiB "
             f"streamed = {row['streamed_bytes_per_s'] / 1e9:.1f} GB/s"
             + (f" ({row['vs_h2d']:.0%} of h2d), {row['vs_bound']:.2f}x the bound" if h2d else ""))
    return row


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


def prefill_attention_flops(spec, prompt_tokens: int) -> float:
    """FLOPs of a causal prefill's attention (QK^T and PV, 2 x 2 x head_dim per query head and
    visible key) over every layer: query p sees p + 1 keys."""
    pairs = prompt_tokens * (prompt_tokens + 1) / 2
    return 4.0 * spec.head_dim * spec.num_heads * pairs * spec.num_layers


def _prefill_row(model: Model, layout: KVLayout, prompt_tokens: int, device_tokens: int, chunk: int, fmt_name: str,
                 progress) -> dict:
    """One prompt of prompt_tokens on a device tier of device_tokens, through KVManager.place
    and the Scheduler: chunks of `chunk` tokens, the middle spilled as the prompt goes (sinks: one
    block; window: the device tier less a chunk and 3 blocks)."""
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
        _sync(device)  # each step's time in the log (a run cut at its limit shows how far it got)
        progress(f"    step {num_steps}: {min(num_steps * chunk, prompt_tokens)} of {prompt_tokens} tokens, "
                 f"{time.perf_counter() - start:.1f} s")
    seconds = time.perf_counter() - start
    counters = kv.metrics.counters
    flops = prefill_attention_flops(model.spec, prompt_tokens)
    row = {"prompt_tokens": prompt_tokens, "device_tokens": device_tokens, "chunk": chunk, "format": fmt_name,
           "host_share": 1 - device_tokens / prompt_tokens, "steps": num_steps, "seconds": seconds,
           "tok_s": prompt_tokens / seconds, "bytes_spilled": counters["bytes_device_to_stream"],
           "bytes_streamed": counters["bytes_streamed"], "attention_flops": flops,
           "attention_flops_per_s": flops / seconds}
    if device.type == "cuda":
        h2d = h2d_bandwidth(device, kv.stream.buf.view(-1), min(2 << 30, kv.stream.buf.numel()))
        row.update(h2d_bytes_per_s=h2d, stream_s_at_h2d=row["bytes_streamed"] / h2d)
    progress(f"  prefill {prompt_tokens} tokens on a {device_tokens}-token device tier ({fmt_name}, chunks of {chunk}):"
             f" {seconds:.1f} s, {row['tok_s']:.0f} tok/s, attention {flops / seconds / 1e12:.0f} TFLOP/s over the"
             f" whole time; spilled {row['bytes_spilled'] / 2**30:.2f} GiB, streamed "
             f"{row['bytes_streamed'] / 2**30:.2f} GiB over {num_steps} steps"
             + (f" ({row['stream_s_at_h2d']:.1f} s at {row['h2d_bytes_per_s'] / 1e9:.1f} GB/s)" if "h2d_bytes_per_s" in row
                else ""))
    sched.finish(seq, "length", time.perf_counter())
    kv.drain()
    kv.check_invariants()
    del runner, kv
    _empty_cache()
    return row


def run_long_context_bench(model: str, device_name: str, workloads: list[tuple[int, int]], formats: list[str],
                           host_share: float = 0.75, block_size: int = 16, steps: int = 3,
                           prefill: tuple[int, int, int] | None = None, host_gib: float | None = None,
                           progress=print, partial=None, prefill_format: str = "none") -> dict:
    """-> the result (see format_tables); `partial(result)` after each row. No workloads or no
    formats: the prefill row alone."""
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
    if workloads and formats:
        _decode_rows(result, attention_model, layout, workloads, formats, host_share, block_size, steps, host_gib,
                     progress, partial)
    if prefill is not None:
        prompt_tokens, device_tokens, chunk = prefill
        result["prefill"] = _prefill_row(attention_model, layout, prompt_tokens, device_tokens, chunk, prefill_format,
                                         progress)
        partial(result)
    return result


def _decode_rows(result: dict, attention_model: Model, layout: KVLayout, workloads: list[tuple[int, int]],
                 formats: list[str], host_share: float, block_size: int, steps: int, host_gib: float | None,
                 progress, partial) -> None:
    """The decode rows of every workload and host format into result["decode"] (with the host
    region, the H2D rate, the device-only and all-device steps)."""
    device = attention_model.attn.embed_tokens.device
    cuda = device.type == "cuda"
    asked = [_Workload(b, c, int(c * host_share) // block_size * block_size) for b, c in workloads]
    fmts = [make_format(name, layout) for name in formats]
    need = max(w.batch * (w.host_tokens // block_size) * f.nbytes for w in asked for f in fmts)
    if host_gib:
        budget = int(host_gib * 2**30)
    else:  # a small host still runs short contexts
        budget = max(host_memory_available() - HOST_HEADROOM, 2 << 30) if cuda else need
    region_nbytes = min(need, budget)
    start = time.perf_counter()
    region = PinnedRegion(max(region_nbytes, 2 << 30) if cuda else region_nbytes, cuda)
    pin_s = time.perf_counter() - start
    result["host_region"] = {"nbytes": region.nbytes, "needed_nbytes": need, "budget_nbytes": budget, "pin_s": pin_s}
    progress(f"host region: {region.nbytes / 2**30:.1f} GiB (the rows ask for {need / 2**30:.1f}, budget "
             f"{budget / 2**30:.1f}) page-locked in {pin_s:.1f} s = {region.nbytes / pin_s / 1e9:.1f} GB/s")
    h2d = None
    if cuda:
        result["h2d_bytes_per_s"] = h2d = h2d_bandwidth(device, region.tensor)
        progress(f"pinned host -> device: {h2d / 1e9:.1f} GB/s")
    gen = torch.Generator(device=device).manual_seed(0)
    result["decode"] = []
    device_only: dict[tuple[int, int], float] = {}
    fill_s: dict[str, float] = {}
    for fmt in fmts:
        fitted = [_fit(w, fmt.nbytes, region_nbytes, block_size, host_share) for w in asked]
        num_blocks = max(w.batch * (w.host_tokens // block_size) for w in fitted)
        store = StreamStore(StreamConfig(fmt, num_blocks, num_sink_tokens=0, window=1, ahead=2), device, KVMetrics(),
                            host=region.tensor)
        start = time.perf_counter()
        _fill_store(store, device, gen)
        fill_s[fmt.name] = time.perf_counter() - start
        progress(f"{fmt.name}: {num_blocks * fmt.nbytes / 2**30:.1f} GiB of host blocks filled in {fill_s[fmt.name]:.1f} s"
                 + "".join(f"; {w.batch} x {w.context} does not fit: {f.batch} x {f.context} instead"
                           for w, f in zip(asked, fitted) if f != w))
        ring = StreamRing(store, device)
        for w in fitted:
            key = (w.batch, w.context)
            if key not in device_only:
                device_only[key] = _device_only_s(attention_model, layout, w, steps, gen, progress)
            result["decode"].append(_decode_row(attention_model, layout, w, ring, steps, h2d, device_only[key], gen,
                                                progress))
            result["longest_context"] = max(r["context"] for r in result["decode"])
            result["fill_s"] = fill_s
            partial(result)
        del ring, store
        _empty_cache()
    _sync(device)
    region.close()
    del region
    gc.collect()
    base = {(r["batch"], r["context"]): r["step_s"] for r in result["decode"] if r["format"] == "none"}
    all_device = {}
    for r in result["decode"]:
        key = (r["batch"], r["context"])
        if key in base:
            r["speedup_vs_none"] = base[key] / r["step_s"]
        if key not in all_device:
            all_device[key] = _all_device_s(attention_model, layout, _Workload(*key, r["host_tokens"]), steps, progress)
        r["all_device_s"] = all_device[key]
    partial(result)


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
    if "host_region" in result:
        h = result["host_region"]
        lines.append(f"host region {h['nbytes'] / 2**30:.1f} GiB (asked {h['needed_nbytes'] / 2**30:.1f}) page-locked in "
                     f"{h['pin_s']:.1f} s; stores filled in "
                     + ", ".join(f"{k} {v:.1f} s" for k, v in result.get("fill_s", {}).items()))
    if "h2d_bytes_per_s" in result:
        lines.append(f"pinned host -> device {result['h2d_bytes_per_s'] / 1e9:.1f} GB/s ({result['machine']['gpu']})")
    lines += [] if "decode" not in result else _table([("B x context", ""), ("host", ""), ("on host", ".0%"), ("host GiB", ".2f"), ("step ms", ".1f"),
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
        lines += _table([("prefill", "d"), ("host", ""), ("device tier", "d"), ("on host", ".0%"), ("chunk", "d"),
                         ("s", ".1f"), ("tok/s", ".0f"), ("attn TFLOP/s", ".0f"), ("spilled GiB", ".2f"),
                         ("streamed GiB", ".2f"), ("stream s at h2d", ".1f")],
                        [[p["prompt_tokens"], p["format"], p["device_tokens"], p["host_share"], p["chunk"],
                          p["seconds"], p["tok_s"], p["attention_flops_per_s"] / 1e12, p["bytes_spilled"] / 2**30,
                          p["bytes_streamed"] / 2**30, p.get("stream_s_at_h2d")]])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """afkv bench long-context [--device cuda] [--model M] ...: decode steps of contexts mostly in
    host memory, streamed layer by layer, against the PCIe bound and the all-device run; prefill
    of a prompt longer than the device tier. Prints tables, writes JSON."""
    import argparse

    parser = argparse.ArgumentParser(prog="afkv bench long-context", description=main.__doc__)
    parser.add_argument("--model", default="random:qwen3-30b-a3b", help="checkpoint directory or random:<name>")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--workloads", default="",
                        help="BxCONTEXT,... (default: 1x1048576,8x131072 on CUDA, 1x96 on CPU); 0: no decode rows")
    parser.add_argument("--formats", default="int4,int8,none",
                        help="host formats (none = the model dtype), in the order they run")
    parser.add_argument("--host-gib", type=float, default=None,
                        help="cap on the page-locked host region (default on CUDA: the memory available less 32 GiB)")
    parser.add_argument("--host-share", type=float, default=0.75, help="share of each context in host memory")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed decode steps per point (after one warm-up)")
    parser.add_argument("--prefill", default="",
                        help="PROMPT,DEVICE_TOKENS,CHUNK (default: 262144,32768,16384 on CUDA, 256,128,32 on CPU); "
                             "0: skip")
    parser.add_argument("--prefill-format", default="none", help="host format of the prefill row's stream store")
    parser.add_argument("--json", default=None, help="output path (default: bench-results/long-context-<time>.json)")
    args = parser.parse_args(argv)
    cuda = resolve_device(args.device).type == "cuda"
    spec = args.workloads or ("1x1048576,8x131072" if cuda else "1x96")
    workloads = [] if spec == "0" else [tuple(int(x) for x in w.split("x")) for w in spec.split(",")]
    pre = args.prefill or (PREFILL_CUDA if cuda else "256,128,32")
    prefill = None if pre == "0" else tuple(int(x) for x in pre.split(","))
    path = args.json or f"bench-results/long-context-{time.strftime('%Y%m%d-%H%M%S')}.json"
    result = run_long_context_bench(args.model, args.device, workloads, [f for f in args.formats.split(",") if f],
                                    args.host_share, args.block_size, args.steps, prefill, args.host_gib,
                                    partial=lambda r: write_json(r, path), prefill_format=args.prefill_format)
    print(format_tables(result))
    print(f"wrote {write_json(result, path)}")


if __name__ == "__main__":
    main()
