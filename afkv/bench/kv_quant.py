"""`afkv bench kv-quant`: long-context decode with a quantized device tier (fp8 / int8 / int4)
against the model dtype, in one run on one device. Table and JSON.

copy ceiling   a 4 GiB device-to-device copy (bytes read + written per second): what every
               kernel's bytes/s is held to
kernel         the decode attention kernel, per format: B sequences of `context` tokens (blocks
               scattered at random), enough layers in turn that their KV is several times the
               L2; the GPU's time per launch (a CUDA graph of launches) and the time per call
               launched from Python (the real launch path: host work included where longer);
               bytes/s = the bytes it must read (codes + scale data, or the bf16 cache) / GPU
               time, and that over the copy ceiling. `--sweep`: every variant of
               triton_attention.QUANT_DECODE_SWEEP too, each checked against the torch reference
               (a wrong one is reported, not timed); the variant with the least worst ratio to
               each workload's fastest becomes the format's launch for the rest of the run and is
               printed as the QUANT_DECODE_CONFIGS row for this GPU family
attention step the attention node's decode step (embedding, every layer's attention side,
               the lm_head; an FFN that returns zeros: AF disaggregation puts the experts on
               other GPUs) replayed as a CUDA graph, per workload (B x context) and format:
               step time against the model dtype's (the GPU's time: replays of one captured
               step, its inputs uploaded once; the host's work per step is the same for all)
capacity       the whole model resident (random weights, colocated): the most sequences of
               `--capacity-context` tokens whose KV fits in the memory left, and the full
               decode step's tokens/s at that batch (CUDA graph); the longest single context
               that fits

KV is random (a quantized tier's rows are made by quantizing random blocks, so their codes
and scales are realistic), each sequence's last block a full-precision staging block. Step
times are medians of CUDA-event timings after warm-ups. On a CPU (tests) only the attention
step runs, eagerly, through the torch references: its times mean nothing.
"""

from __future__ import annotations

import gc
import platform
import time
from dataclasses import asdict

import torch

from afkv.bench import write_json
from afkv.bench.steps import ZeroFFN, copy_bandwidth, median_s
from afkv.engine.engine import resolve_device, resolve_dtype
from afkv.kv.formats import make_format
from afkv.kv.layout import KVLayout
from afkv.model.model import LocalFFN, Model, load_attention_side, load_ffn_side
from afkv.model.sides import SeqChunk, StepInputs
from afkv.ops import quant
from afkv.ops.attention import QuantizedKVCache

_L2_FLUSH_NBYTES = 512 << 20
_TILES = [(64, 4, 2), (128, 4, 1), (128, 4, 2), (128, 8, 2), (64, 4, 1)]  # block_n, warps, stages
_CACHE_RESERVE_NBYTES = 3 << 30  # left free beside the KV at capacity: activations, graph pools, logits


def _model_name(model: str | None) -> str:
    if model is not None:
        return model
    from afkv.model.default import ensure_default_checkpoint

    return str(ensure_default_checkpoint(progress=False))


def _random_rows(spec: quant.QuantSpec, num_rows: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """uint8 [num_rows, row_nbytes]: 64 random blocks quantized, repeated (realistic codes and scales)."""
    distinct = min(num_rows, 64)
    blocks = torch.randn(distinct, *spec.block_shape, generator=gen, device=device)
    made = quant.quantize_rows(blocks, spec)  # [distinct, row_nbytes]
    rows = torch.empty((num_rows, spec.row_nbytes), dtype=torch.uint8, device=device)
    for start in range(0, num_rows, distinct):
        n = min(distinct, num_rows - start)
        rows[start : start + n] = made[:n]
    return rows


class _Cache:
    """A device tier for `batch` sequences of `context` cached tokens (+ the decode token): the
    model dtype's blocks, or quantized rows plus one staging block per sequence (its last) and
    the graphs' scratch staging block. Tables, slots and lengths of one decode step."""

    def __init__(self, layout: KVLayout, fmt: str, batch: int, context: int, device: torch.device, seed: int = 0,
                 num_layers: int | None = None):
        gen = torch.Generator(device=device).manual_seed(seed)
        if num_layers is not None:
            layout = KVLayout(num_layers, layout.num_kv_heads, layout.head_dim, layout.block_size, layout.dtype)
        self.layout, self.fmt = layout, fmt
        bs = layout.block_size
        self.per_seq = -(-(context + 1) // bs)
        n = batch * self.per_seq
        if fmt == "auto":
            self.cache = torch.empty((n + 1, *layout.block_shape), dtype=layout.dtype, device=device).normal_(
                0.0, 1.0, generator=gen)  # + the graphs' scratch block
            ids = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()  # blocks scattered
            self.tables = [tuple(ids[b * self.per_seq : (b + 1) * self.per_seq]) for b in range(batch)]
            self.scratch = n
        else:
            spec = make_format(fmt, layout).spec
            per_rows = self.per_seq - 1  # the last block of each sequence is its staging block
            rows = _random_rows(spec, max(1, batch * per_rows), device, gen)
            staging = torch.empty((batch + 1, *layout.block_shape), dtype=layout.dtype, device=device).normal_(
                0.0, 1.0, generator=gen)
            self.cache = QuantizedKVCache(rows, staging, spec, max_tail_blocks=1)
            nr = rows.shape[0]
            ids = torch.randperm(batch * per_rows, generator=torch.Generator().manual_seed(seed)).tolist()
            self.tables = [tuple(ids[b * per_rows : (b + 1) * per_rows]) + (nr + b,) for b in range(batch)]
            self.scratch = nr + batch
        self.batch, self.context = batch, context

    @property
    def kv_nbytes(self) -> int:
        """Bytes the decode step's attention must read: every layer's K/V of every sequence
        (quantized tier: its rows, and its staging block's tokens in the model dtype)."""
        bs, raw = self.layout.block_size, self.layout.block_nbytes
        tokens = self.batch * (self.context + 1)
        if self.fmt == "auto":
            return tokens * raw // bs
        quantized = self.batch * (self.per_seq - 1) * bs
        return quantized * self.cache.spec.row_nbytes // bs + (tokens - quantized) * raw // bs

    def step(self, token_ids: list[int]) -> tuple:
        """DecodeGraphs.run's arguments for one decode step (the token at position `context`)."""
        bs, ctx = self.layout.block_size, self.context
        slots = [t[ctx // bs] for t in self.tables]
        return (token_ids, [ctx] * self.batch, slots, [ctx % bs] * self.batch, [ctx + 1] * self.batch, self.tables)


# ---- kernel ---------------------------------------------------------------------------------------
_GRAPH_LAUNCHES = 12  # launches per captured graph (over the layers in turn: L2 holds none of them)
_EAGER_CALLS = 40
_TOL_ABS, _TOL_REL = 3e-2, 2e-2  # the 16-bit tolerance of tests/ops/test_triton_attention.py


def _graph_s(fn, launches: int = _GRAPH_LAUNCHES, reps: int = 7) -> float:
    """The GPU's seconds per call of fn(i): calls i = 0 .. launches - 1 captured in one CUDA
    graph, the median of `reps` replays over `launches` (no host work in it)."""
    fn(0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(launches):
            fn(i)
    graph.replay()
    seconds = median_s(graph.replay, reps)
    del graph
    return seconds / launches


def _eager_s(fn, calls: int = _EAGER_CALLS) -> float:
    """Seconds per call of fn(i) launched from Python back to back (the real launch path: the
    host's work per call included where it is longer than the GPU's)."""
    for i in range(3):
        fn(i)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for i in range(calls):
        fn(i)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def _kernel_cache(layout: KVLayout, fmt: str, batch: int, context: int, device: torch.device) -> "_Cache":
    """A cache with enough layers that the kernel's calls over them in turn outgrow the L2."""
    per_layer = _cache_nbytes(layout, fmt, batch, context, 1)
    num_layers = max(1, min(layout.num_layers, -(-_L2_FLUSH_NBYTES // per_layer)))
    return _Cache(layout, fmt, batch, context, device, seed=1, num_layers=num_layers)


def _reference(c: "_Cache", q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Layer 0's decode attention in float32 over the dequantized rows (the torch reference)."""
    from afkv.ops.attention import gather_layer, paged_decode_attention

    scratch = gather_layer(c.cache, 0, tables).float()  # [B, nb, 2, bs, Hkv, D]
    batch, width = tables.shape
    ids = torch.arange(batch * width, device=q.device).view(batch, width)
    return paged_decode_attention(q.float(), scratch.flatten(0, 1)[:, None], 0, ids, lens)


def _kernel_rows(layout: KVLayout, num_heads: int, formats: list[str], workloads: list[tuple[int, int]],
                 copy_bw: float, sweep: bool, progress, device: torch.device) -> tuple[list[dict], dict | None]:
    """Per workload and format: the decode kernel alone (a CUDA graph of launches over the
    layers) and through its real launch path (eager calls), in the table's launch; with `sweep`
    every variant of ta.sweep_configs too, each checked against the torch reference first.
    -> (rows, the sweep's table: per format the variant fastest over all workloads, or None)."""
    from afkv.ops import triton_attention as ta

    if sweep and device.type == "cuda":
        _precompile(layout, num_heads, [f for f in formats if f != "auto"], workloads, progress)
    rows, timings = [], {}  # timings[fmt][config] = [seconds per workload]
    for batch, context in workloads:
        for fmt in formats:
            c = _kernel_cache(layout, fmt, batch, context, device)
            tables = torch.tensor([list(t) for t in c.tables], device=device)
            lens = torch.full((batch,), context + 1, dtype=torch.int64, device=device)
            q = torch.randn(batch, num_heads, layout.head_dim, device=device).to(layout.dtype)
            nbytes = c.kv_nbytes // c.layout.num_layers
            num_layers = c.layout.num_layers
            base = {"format": fmt, "batch": batch, "context": context, "read_bytes": nbytes}
            if fmt == "auto":
                def call(i):
                    return ta.paged_decode_attention(q, c.cache, i % num_layers, tables, lens)
                configs = [None]
            else:
                table = ta.quant_decode_config(fmt, device)
                variants = ta.sweep_configs(fmt) if sweep else []
                configs = [table] + [v for v in variants if v != table and (v.cvt != 1 or device.type == "cuda")]
                want = _reference(c, q, tables, lens)
            for config in configs:
                if config is not None:
                    def call(i, config=config):
                        return ta.paged_decode_attention_quantized(q, c.cache, i % num_layers, tables, lens,
                                                                   config=config)
                    try:
                        got = call(0).float()
                        err = ((got - want).abs() - _TOL_REL * want.abs()).max().item()
                    except Exception as exc:  # noqa: BLE001 - a launch that fails to compile or run: reported
                        err = f"{type(exc).__name__}: {str(exc)[-300:]}"
                    if not (isinstance(err, float) and err <= _TOL_ABS):  # NaN too
                        progress(f"    kernel {fmt} {batch}x{context} {_cfg(config)}: WRONG ({err})")
                        rows.append(base | {"config": _cfg(config), "wrong": True, "error": err})
                        timings.setdefault(fmt, {}).setdefault(config, []).append(float("inf"))
                        continue
                seconds = _graph_s(call)
                row = base | {"config": _cfg(config), "seconds": seconds, "bytes_per_s": nbytes / seconds,
                              "vs_copy": nbytes / seconds / copy_bw}
                if config is None or config == configs[0]:
                    row["table"] = True
                    row["launch_seconds"] = _eager_s(call)
                if config is not None:
                    timings.setdefault(fmt, {}).setdefault(config, []).append(seconds)
                rows.append(row)
                progress(f"  kernel {fmt} {batch}x{context} {_cfg(config)}: {seconds * 1e6:.1f} us "
                         f"({row['bytes_per_s'] / 1e9:.0f} GB/s, {row['vs_copy']:.0%} of copy)"
                         + (f"; launched from Python {row['launch_seconds'] * 1e6:.1f} us" if "launch_seconds" in row
                            else ""))
            del c
            _empty_cache()
    if not sweep:
        return rows, None
    chosen = {}
    for fmt, by_config in timings.items():  # the variant whose worst ratio to each workload's best is least
        best = [min(t[w] for t in by_config.values()) for w in range(len(workloads))]
        if all(b < float("inf") for b in best):
            chosen[fmt] = min(by_config, key=lambda cfg: max(t / b for t, b in zip(by_config[cfg], best)))
    return rows, chosen


def _cfg(config) -> str | None:
    if config is None:
        return None
    return (f"n{config.block_n} w{config.num_warps} s{config.num_stages} p{config.programs_per_sm} "
            f"c{config.cvt} r{config.max_regs or '-'}" + (" halves" if config.halves else "")
            + (f" t{config.min_split_tiles}" if config.min_split_tiles > 1 else "")
            + (f" pf{config.prefetch}" if config.prefetch else "") + (f" wd{config.words}" if config.words else "")
            + (" defer" if config.deferred_sums else ""))


def _cache_nbytes(layout: KVLayout, fmt: str, batch: int, context: int, num_layers: int) -> int:
    """_Cache.kv_nbytes without building the cache."""
    bs = layout.block_size
    per_seq = -(-(context + 1) // bs)
    one = KVLayout(num_layers, layout.num_kv_heads, layout.head_dim, bs, layout.dtype)
    tokens = batch * (context + 1)
    if fmt == "auto":
        return tokens * one.block_nbytes // bs
    quantized = batch * (per_seq - 1) * bs
    return quantized * make_format(fmt, one).nbytes // bs + (tokens - quantized) * one.block_nbytes // bs


def _compile_share(jobs: list[tuple]) -> int:
    """A worker of _precompile: launch each job's kernel once on small tensors whose
    specialization (constexprs, integer arguments' divisibility) equals the real launch's, so
    the compiled kernel lands in Triton's disk cache. -> how many compiled."""
    from afkv.ops import triton_attention as ta
    from afkv.ops.attention import QuantizedKVCache

    device = torch.device("cuda", 0)
    done = 0
    for layout_args, fmt, batch, context, num_heads, config_args, num_layers in jobs:
        layout = KVLayout(num_layers, *layout_args)
        spec = make_format(fmt, layout).spec
        bs = layout.block_size
        per_seq = -(-(context + 1) // bs)
        real_rows = max(1, batch * (per_seq - 1))
        rows = torch.zeros((16 + real_rows % 16, spec.row_nbytes), dtype=torch.uint8, device=device)
        staging = torch.zeros((batch + 1, *layout.block_shape), dtype=layout.dtype, device=device)
        cache = QuantizedKVCache(rows, staging, spec, max_tail_blocks=1)
        tables = torch.zeros((batch, per_seq), dtype=torch.int64, device=device)
        lens = torch.ones(batch, dtype=torch.int64, device=device)
        q = torch.zeros(batch, num_heads, layout.head_dim, dtype=layout.dtype, device=device)
        ta.paged_decode_attention_quantized(q, cache, 0, tables, lens, config=ta.QuantDecodeConfig(*config_args))
        done += 1
    torch.cuda.synchronize()
    return done


def _precompile(layout: KVLayout, num_heads: int, formats: list[str], workloads, progress) -> None:
    """Compile every variant the sweep launches in parallel processes (Triton's compiler runs on
    one core); the sweep then finds them in Triton's disk cache. Best effort: a failure here
    only means the sweep compiles as it goes."""
    import concurrent.futures
    import multiprocessing
    import os
    from dataclasses import astuple

    from afkv.ops import triton_attention as ta

    jobs = []
    for batch, context in workloads:
        for fmt in formats:
            num_layers = max(1, min(layout.num_layers,
                                    -(-_L2_FLUSH_NBYTES // _cache_nbytes(layout, fmt, batch, context, 1))))
            args = (layout.num_kv_heads, layout.head_dim, layout.block_size, layout.dtype)
            for config in [ta.quant_decode_config(fmt, torch.device("cuda"))] + ta.sweep_configs(fmt):
                jobs.append((args, fmt, batch, context, num_heads, astuple(config), num_layers))
    workers = max(1, min(len(jobs), (os.cpu_count() or 2) - 2, 12))
    t0 = time.perf_counter()
    try:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            done = sum(pool.map(_compile_share, [jobs[i::workers] for i in range(workers)]))
        progress(f"  compiled {done} kernel launches in {workers} processes in {time.perf_counter() - t0:.0f} s")
    except Exception as exc:  # noqa: BLE001 - best effort, see the docstring
        progress(f"  parallel compile failed ({type(exc).__name__}: {exc}); compiling as the sweep goes")


# ---- decode steps ---------------------------------------------------------------------------------
def _step_s(model: Model, cache: _Cache, steps: int) -> float:
    """Median seconds of one decode step of all the cache's sequences (CUDA graph on CUDA,
    eager through the references on a CPU)."""
    token_ids = [(7 * b + 3) % model.spec.vocab_size for b in range(cache.batch)]
    args = cache.step(token_ids)
    device = cache.cache.device
    if device.type != "cuda":
        ids, pos, slots, offs, lens, tables = args
        t = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
        table = t([list(x) for x in tables])
        inputs = StepInputs(t(ids), t(pos), t(slots), t(offs), [SeqChunk(i, 1, n, table[i]) for i, n in enumerate(lens)])
        start = time.perf_counter()
        for _ in range(steps):
            model.attn.logits(model.forward(inputs, cache.cache)).argmax(-1)
        return (time.perf_counter() - start) / steps
    from afkv.model.graphs import DecodeGraphs

    graphs = DecodeGraphs(model, cache.cache, cache.batch, cache.per_seq, cache.scratch, buckets=[cache.batch])
    graphs.run(*args, 1)  # captures, and uploads this step's inputs
    seconds = median_s(lambda: graphs.replay(cache.batch), steps)  # the GPU's step: replays of that step
    del graphs
    return seconds


def _attention_rows(model: Model, layout: KVLayout, formats: list[str], workloads, steps: int, progress) -> list[dict]:
    rows = []
    for batch, context in workloads:
        base = None
        for fmt in formats:
            cache = _Cache(layout, fmt, batch, context, _device_of(model))
            seconds = _step_s(model, cache, steps)
            row = {"format": fmt, "batch": batch, "context": context, "step_s": seconds, "tok_s": batch / seconds,
                   "kv_nbytes": cache.kv_nbytes}
            base = base or row
            row["vs_auto"] = seconds / base["step_s"]
            row["kv_vs_auto"] = cache.kv_nbytes / base["kv_nbytes"]
            rows.append(row)
            progress(f"  attention step {fmt} {batch}x{context}: {seconds * 1e3:.2f} ms ({row['vs_auto']:.3f}x), "
                     f"KV {cache.kv_nbytes / 2**30:.2f} GiB ({row['kv_vs_auto']:.3f}x)")
            del cache
            _empty_cache()
    return rows


def _capacity_rows(model: Model, layout: KVLayout, formats: list[str], context: int, steps: int, progress) -> list[dict]:
    """The most `context`-token sequences whose KV fits beside the resident model, and the full
    decode step there; the longest single context that fits."""
    rows = []
    for fmt in formats:
        _empty_cache()
        free = torch.cuda.mem_get_info()[0] - _CACHE_RESERVE_NBYTES
        per_token = (layout.block_nbytes if fmt == "auto" else make_format(fmt, layout).nbytes) / layout.block_size
        per_seq = -(-(context + 1) // layout.block_size) * layout.block_size * per_token
        extra = 0 if fmt == "auto" else layout.block_nbytes  # each sequence's staging block
        batch = int(free // (per_seq + extra))
        longest = int(free // per_token)
        row = {"format": fmt, "context": context, "max_seqs": batch, "longest_context": longest}
        if batch > 0:
            cache = _Cache(layout, fmt, batch, context, _device_of(model))
            row["step_s"] = _step_s(model, cache, steps)
            row["tok_s"] = batch / row["step_s"]
            del cache
        rows.append(row)
        progress(f"  capacity {fmt}: {batch} x {context} tokens ({longest} tokens in one sequence); "
                 + (f"full step {row['step_s'] * 1e3:.1f} ms, {row['tok_s']:.0f} tok/s" if batch else "nothing fits"))
    base = rows[0]
    for r in rows:
        r["seqs_vs_auto"] = r["max_seqs"] / max(1, base["max_seqs"])
        if "tok_s" in r and "tok_s" in base:
            r["tok_s_vs_auto"] = r["tok_s"] / base["tok_s"]
    return rows


def _device_of(model: Model) -> torch.device:
    return model.attn.embed_tokens.device


def _empty_cache() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_kv_quant_bench(model: str | None, device_name: str, formats: list[str], workloads: list[tuple[int, int]],
                       block_size: int = 16, steps: int = 10, capacity_context: int | None = 16384,
                       sweep: bool = False, progress=print, partial=None) -> dict:
    """-> the result (see format_tables); `partial(result)` is called after each phase (a run cut
    short still leaves what it measured)."""
    partial = partial or (lambda _: None)
    device = resolve_device(device_name)
    dtype = resolve_dtype("auto", device)
    cuda = device.type == "cuda"
    name = _model_name(model)
    formats = ["auto"] + [f for f in formats if f != "auto"]
    spec, attn = load_attention_side(name, device, dtype)
    layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, block_size, dtype)
    progress(f"{name}: {spec.num_layers} layers, {spec.num_heads} / {spec.num_kv_heads} heads, head_dim "
             f"{spec.head_dim}, {dtype}, {device}" + (f" ({torch.cuda.get_device_name(device)})" if cuda else ""))
    result = {"bench": "kv-quant", "model": name, "formats": formats, "block_size": block_size,
              "machine": {"platform": platform.platform(), "torch": torch.__version__, "device": str(device),
                          "gpu": torch.cuda.get_device_name(device) if cuda else None,
                          "gpu_memory_bytes": torch.cuda.get_device_properties(device).total_memory if cuda else None}}
    if cuda:
        result["copy_bytes_per_s"] = copy_bw = copy_bandwidth(device)
        progress(f"copy ceiling: {copy_bw / 1e12:.2f} TB/s (read + write)")
        from afkv.ops import triton_attention as ta

        result["kernel"], chosen = _kernel_rows(layout, spec.num_heads, formats, workloads, copy_bw, sweep, progress,
                                                 device)
        family = ta._gpu_family(device.index if device.index is not None else torch.cuda.current_device())
        if chosen:  # the rest of the run launches the sweep's winners
            ta.QUANT_DECODE_CONFIGS[family] = chosen
            result["sweep_table"] = {"family": family, "configs": {k: asdict(v) for k, v in chosen.items()}}
            progress(f"sweep table: QUANT_DECODE_CONFIGS[{family!r}] = {{"
                     + ", ".join(f"{k!r}: {v!r}" for k, v in chosen.items()) + "}")
        result["configs"] = {k: _cfg(ta.quant_decode_config(k, device)) for k in formats if k != "auto"}
        partial(result)
    attention_model = Model(spec, attn, ZeroFFN())
    result["attention_step"] = _attention_rows(attention_model, layout, formats, workloads, steps, progress)
    partial(result)
    if cuda and capacity_context:
        _empty_cache()
        t0 = time.perf_counter()
        full = Model(spec, attn, LocalFFN(load_ffn_side(spec, name, device, dtype)))
        progress(f"loaded the FFN side in {time.perf_counter() - t0:.0f} s")
        result["capacity"] = _capacity_rows(full, layout, formats, capacity_context, steps, progress)
        del full
    _empty_cache()
    return result


def _table(head: list[tuple[str, str]], rows: list[list]) -> list[str]:
    """A text table: head [(title, format spec)], rows of values (None prints "-")."""
    widths = [max(len(t), 7) for t, _ in head]
    line = " | ".join(f"{t:>{w}}" for (t, _), w in zip(head, widths))
    out = ["", line, "-" * len(line)]
    for row in rows:
        cells = ["-" if v is None else format(v, spec) for v, (_, spec) in zip(row, head)]
        out.append(" | ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    return out


def format_tables(result: dict) -> str:
    lines = []
    shape = lambda r: f"{r['batch']} x {r['context']}"  # noqa: E731
    if "copy_bytes_per_s" in result:
        lines.append(f"copy ceiling {result['copy_bytes_per_s'] / 1e12:.2f} TB/s ({result['machine']['gpu']})")
        timed = [r for r in result["kernel"] if "seconds" in r]
        best = {}
        for r in timed:
            key = (r["format"], r["batch"], r["context"])
            if key not in best or r["seconds"] < best[key]["seconds"]:
                best[key] = r
        shown = [r for r in timed if r.get("table") or best[(r["format"], r["batch"], r["context"])] is r]
        lines += _table([("kernel", ""), ("B x context", ""), ("launch", ""), ("us/layer", ".1f"), ("GB/s", ".0f"),
                         ("vs copy", ".0%"), ("from Python us", ".1f")],
                        [[r["format"], shape(r), ("table " if r.get("table") else "best ") + str(r["config"] or ""),
                          r["seconds"] * 1e6, r["bytes_per_s"] / 1e9, r["vs_copy"],
                          r["launch_seconds"] * 1e6 if "launch_seconds" in r else None] for r in shown])
        wrong = [r for r in result["kernel"] if r.get("wrong")]
        if wrong:
            lines.append("WRONG (not timed): " + "; ".join(f"{r['format']} {shape(r)} {r['config']}" for r in wrong))
        if "sweep_table" in result:
            t = result["sweep_table"]
            rows = ", ".join(f"{k!r}: QuantDecodeConfig({', '.join(f'{f}={v!r}' for f, v in c.items())})"
                             for k, c in t["configs"].items())
            lines.append(f"sweep table (afkv/ops/triton_attention.py): QUANT_DECODE_CONFIGS[{t['family']!r}] = {{{rows}}}")
    lines += _table([("attention step", ""), ("B x context", ""), ("ms", ".2f"), ("tok/s", ".0f"), ("vs auto", ".3f"),
                     ("KV GiB", ".2f"), ("KV vs auto", ".3f")],
                    [[r["format"], shape(r), r["step_s"] * 1e3, r["tok_s"], r["vs_auto"], r["kv_nbytes"] / 2**30,
                      r["kv_vs_auto"]] for r in result["attention_step"]])
    if "capacity" in result:
        lines += _table([("capacity", ""), ("context", "d"), ("max seqs", "d"), ("vs auto", ".2f"), ("step ms", ".1f"),
                         ("tok/s", ".0f"), ("longest context", "d")],
                        [[r["format"], r["context"], r["max_seqs"], r["seqs_vs_auto"],
                          r["step_s"] * 1e3 if "step_s" in r else None, r.get("tok_s"), r["longest_context"]]
                         for r in result["capacity"]])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """afkv bench kv-quant [--device cuda] [--model M] ...: long-context decode with fp8 / int8 /
    int4 device blocks against the model dtype; prints tables, writes JSON."""
    import argparse

    parser = argparse.ArgumentParser(prog="afkv bench kv-quant", description=main.__doc__)
    parser.add_argument("--model", default=None,
                        help="checkpoint directory or random:<name> (default: the default model)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--formats", default="fp8,int8,int4")
    parser.add_argument("--workloads", default="",
                        help="BxCONTEXT,... (default: 8x16384,2x65536,8x2048 on CUDA, 2x64 on CPU)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed decode steps per point")
    parser.add_argument("--capacity-context", type=int, default=16384, help="0: skip the capacity phase")
    parser.add_argument("--sweep", action="store_true",
                        help="time every launch variant of the quantized decode kernel (checked against the "
                             "reference), print the table of the fastest per format and use it for the rest")
    parser.add_argument("--json", default=None, help="output path (default: bench-results/kv-quant-<time>.json)")
    args = parser.parse_args(argv)
    cuda = resolve_device(args.device).type == "cuda"
    spec = args.workloads or ("8x16384,2x65536,8x2048" if cuda else "2x64")
    workloads = [tuple(int(x) for x in w.split("x")) for w in spec.split(",")]
    path = args.json or f"bench-results/kv-quant-{time.strftime('%Y%m%d-%H%M%S')}.json"
    result = run_kv_quant_bench(args.model, args.device, args.formats.split(","), workloads, args.block_size,
                                args.steps, args.capacity_context or None, args.sweep,
                                partial=lambda r: write_json(r, path))
    print(format_tables(result))
    print(f"wrote {write_json(result, path)}")


if __name__ == "__main__":
    main()
