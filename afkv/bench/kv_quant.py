"""`afkv bench kv-quant`: long-context decode with a quantized device tier (fp8 / int8 / int4)
against the model dtype, in one run on one device. Table and JSON.

copy ceiling   a 4 GiB device-to-device copy (bytes read + written per second): what every
               kernel's bytes/s is held to
kernel         the decode attention kernel alone, per format: B sequences of `context` tokens
               (blocks scattered at random), enough layers in turn that their KV is several
               times the L2; bytes/s = the bytes it must read (codes + scale data, or the
               bf16 cache) / time, and that over the copy ceiling. Quantized formats also try
               several tile shapes; `--tune` uses the fastest for the rest of the run
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
def _kernel_rows(layout: KVLayout, num_heads: int, formats: list[str], workloads: list[tuple[int, int]],
                 copy_bw: float, tune: bool, progress) -> list[dict]:
    from afkv.ops import triton_attention as ta

    device = torch.device("cuda", torch.cuda.current_device())
    rows = []
    for batch, context in workloads:
        for fmt in formats:
            per_layer = _Cache(layout, fmt, batch, context, device, num_layers=1).kv_nbytes
            num_layers = max(1, min(layout.num_layers, -(-_L2_FLUSH_NBYTES // per_layer)))
            c = _Cache(layout, fmt, batch, context, device, seed=1, num_layers=num_layers)
            tables = torch.tensor([list(t) for t in c.tables], device=device)
            lens = torch.full((batch,), context + 1, dtype=torch.int64, device=device)
            q = torch.randn(batch, num_heads, layout.head_dim, device=device).to(layout.dtype)
            sweep = fmt != "auto" and (batch, context) == next((w for w in workloads if w[1] >= 8192), None)
            tiles = [ta.QuantTile(*t) for t in _TILES] if sweep else [None]  # tile shapes tried on one workload
            best = None
            for tile in tiles:
                if fmt == "auto":
                    def call(i, tables=tables):
                        return ta.paged_decode_attention(q, c.cache, i % num_layers, tables, lens)
                else:
                    def call(i, tile=tile):
                        return ta.paged_decode_attention_quantized(q, c.cache, i % num_layers, tables, lens, tile=tile)
                seconds = _events_s(call, iters=max(20, 2 * num_layers))
                nbytes = c.kv_nbytes // num_layers
                row = {"format": fmt, "batch": batch, "context": context, "seconds": seconds, "read_bytes": nbytes,
                       "bytes_per_s": nbytes / seconds, "vs_copy": nbytes / seconds / copy_bw,
                       "tile": None if tile is None else [tile.block_n, tile.num_warps, tile.num_stages]}
                if tile is not None:
                    progress(f"    kernel {fmt} {batch}x{context} tile {row['tile']}: {seconds * 1e6:.1f} us, "
                             f"{row['bytes_per_s'] / 1e9:.0f} GB/s ({row['vs_copy']:.0%} of copy)")
                if best is None or seconds < best["seconds"]:
                    best = row
            if tune and fmt != "auto" and best["tile"] is not None:
                ta.QUANT_DECODE_TILES[fmt] = ta.QuantTile(*best["tile"])
            rows.append(best)
            progress(f"  kernel {fmt} {batch}x{context}: {best['seconds'] * 1e6:.1f} us per layer, "
                     f"{best['bytes_per_s'] / 1e9:.0f} GB/s = {best['vs_copy']:.0%} of copy (tile {best['tile']})")
            del c
            torch.cuda.empty_cache()
    return rows


def _events_s(fn, iters: int, warmup: int = 3) -> float:
    for i in range(warmup):
        fn(i)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for i in range(iters):
        fn(i)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


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
                       tune: bool = False, progress=print, partial=None) -> dict:
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
        result["kernel"] = _kernel_rows(layout, spec.num_heads, formats, workloads, copy_bw, tune, progress)
        from afkv.ops import triton_attention as ta

        result["tiles"] = {k: [t.block_n, t.num_warps, t.num_stages] for k, t in ta.QUANT_DECODE_TILES.items()}
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
        lines += _table([("kernel", ""), ("B x context", ""), ("us/layer", ".1f"), ("GB/s", ".0f"), ("vs copy", ".0%"),
                         ("tile", "")],
                        [[r["format"], shape(r), r["seconds"] * 1e6, r["bytes_per_s"] / 1e9, r["vs_copy"], str(r["tile"])]
                         for r in result["kernel"]])
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
    parser.add_argument("--tune", action="store_true", help="use the fastest kernel tile found for the steps")
    parser.add_argument("--json", default=None, help="output path (default: bench-results/kv-quant-<time>.json)")
    args = parser.parse_args(argv)
    cuda = resolve_device(args.device).type == "cuda"
    spec = args.workloads or ("8x16384,2x65536,8x2048" if cuda else "2x64")
    workloads = [tuple(int(x) for x in w.split("x")) for w in spec.split(",")]
    path = args.json or f"bench-results/kv-quant-{time.strftime('%Y%m%d-%H%M%S')}.json"
    result = run_kv_quant_bench(args.model, args.device, args.formats.split(","), workloads, args.block_size,
                                args.steps, args.capacity_context or None, args.tune,
                                partial=lambda r: write_json(r, path))
    print(format_tables(result))
    print(f"wrote {write_json(result, path)}")


if __name__ == "__main__":
    main()
