"""KV tiers: transfer bandwidth against the copy limit, and decode speed with tiers on / off.

transfers (blocks of the model's KV geometry, `num_blocks` of them at once)
    device -> host (demote) and host -> device (promote) through the tiers' Copier, per
    format (quantize on the way down, dequantize on the way up), against one plain copy of
    the same raw bytes between the same two memories in the same run (the copy limit).
    host -> disk (spill) and disk -> host (fetch) through the disk tier's block-file
    functions on `io_threads` threads (one file per block, crc32 computed / verified),
    against one sequential write / read of the same bytes in 1 MiB chunks (the limit).
    Writes land in the page cache for both (no fsync); reads are cold for both: files are
    fsynced and dropped from the page cache (posix_fadvise DONTNEED) before they are read.
    GB/s counts a block's raw (unquantized) bytes; wire GB/s the bytes it takes in the tier
    format. ratio = limit seconds / seconds for the same blocks: against a raw copy for
    device <-> host (so a quantized format can beat 1 only by moving fewer bytes), against
    the same format's bytes written / read sequentially for host <-> disk.

decode
    Decode tokens/s for `batch` distinct random prompts (no shared prefix: 0% prefix hits),
    `repeats` times per configuration, interleaved, best run kept:
      off       device tier only
      on        + host memory and disk tiers (idle: nothing needs demoting)
      spilling  + host and disk, with a device tier just big enough for the batch, so every
                run demotes the previous run's cached blocks (and writes them to disk)
"""

from __future__ import annotations

import asyncio
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from afkv.config import EngineConfig
from afkv.engine.engine import Engine, resolve_device, resolve_dtype
from afkv.engine.params import SamplingParams
from afkv.kv.block_pool import chain_hash
from afkv.kv.formats import make_format
from afkv.kv.layout import KVLayout
from afkv.kv.tiers.copier import Copier, CopyOp, Direction
from afkv.kv.tiers.disk import block_file_name, read_block, write_block
from afkv.kv.tiers.fileio import default_fileio
from afkv.model.spec import load_spec

_CHUNK_NBYTES = 1 << 20


def _model_dir(model: str | None) -> Path:
    if model is not None:
        return Path(model)
    from afkv.model.default import ensure_default_checkpoint

    return ensure_default_checkpoint(progress=False)


def _best_s(fn, repeats: int, sync: bool) -> float:
    best = float("inf")
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def _row(path: str, fmt: str, num_blocks: int, raw_nbytes: int, wire_nbytes: int, seconds: float, limit_s: float) -> dict:
    return {
        "path": path, "format": fmt, "blocks": num_blocks, "raw_mib": raw_nbytes / 2**20,
        "wire_mib": wire_nbytes / 2**20, "seconds": seconds, "gb_s": raw_nbytes / seconds / 1e9,
        "wire_gb_s": wire_nbytes / seconds / 1e9, "limit_gb_s": raw_nbytes / limit_s / 1e9,
        "ratio": limit_s / seconds,
    }  # fmt: skip


def run_transfer_bench(layout: KVLayout, device: torch.device, num_blocks: int, formats: list[str],
                       io_threads: int, disk_dir: Path, repeats: int = 3, progress=print) -> list[dict]:
    cuda = device.type == "cuda"
    kv = torch.randn((num_blocks, *layout.block_shape), device=device).to(layout.dtype)  # [N, *block_shape]
    raw_nbytes = num_blocks * layout.block_nbytes
    flat = kv.view(-1).view(torch.uint8)  # [N * block_nbytes]
    staging = torch.empty(flat.shape, dtype=torch.uint8, pin_memory=cuda)  # [N * block_nbytes]
    d2h_limit_s = _best_s(lambda: staging.copy_(flat, non_blocking=cuda), repeats, cuda)
    h2d_limit_s = _best_s(lambda: flat.copy_(staging, non_blocking=cuda), repeats, cuda)
    rows = []
    for name in formats:
        fmt = make_format(name, layout)
        host = torch.empty((num_blocks, fmt.nbytes), dtype=torch.uint8, pin_memory=cuda)  # [N, nbytes]
        copier = Copier(kv, host, fmt)

        def batch(direction: Direction) -> None:
            result = copier.run([CopyOp(direction, i, i) for i in range(num_blocks)])
            if result.event is not None:
                result.event.synchronize()

        demote_s = _best_s(lambda: batch(Direction.TO_HOST), repeats, cuda)
        promote_s = _best_s(lambda: batch(Direction.TO_DEVICE), repeats, cuda)
        wire = num_blocks * fmt.nbytes
        rows.append(_row("device->host (demote)", name, num_blocks, raw_nbytes, wire, demote_s, d2h_limit_s))
        rows.append(_row("host->device (promote)", name, num_blocks, raw_nbytes, wire, promote_s, h2d_limit_s))
        spill_s, fetch_s, write_limit_s, read_limit_s = _disk_bench(host, fmt.digest, io_threads, disk_dir / name, repeats)
        rows.append(_row("host->disk (spill)", name, num_blocks, raw_nbytes, wire, spill_s, write_limit_s))
        rows.append(_row("disk->host (fetch)", name, num_blocks, raw_nbytes, wire, fetch_s, read_limit_s))
        progress(f"  {name}: demote {rows[-4]['gb_s']:.2f} GB/s, promote {rows[-3]['gb_s']:.2f}, "
                 f"spill {rows[-2]['gb_s']:.2f}, fetch {rows[-1]['gb_s']:.2f}")
    return rows


def _disk_bench(host: torch.Tensor, digest: bytes, io_threads: int, path: Path, repeats: int) -> tuple[float, ...]:
    """-> best seconds to spill and to fetch every row of `host` (one file each), and the
    limits: one sequential write and one cold read of the same bytes (interleaved runs)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    fileio = default_fileio()
    hashes = [chain_hash(None, [i]) for i in range(host.shape[0])]
    rows = [host[i].numpy() for i in range(host.shape[0])]
    data = host.view(-1).numpy()
    big = path / "sequential.bin"
    best = [float("inf")] * 4  # spill, fetch, write limit, read limit
    with ThreadPoolExecutor(io_threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            crcs = list(pool.map(lambda i: write_block(path, digest, hashes[i], rows[i], fileio), range(len(rows))))
            spill_s = time.perf_counter() - start
            for h in hashes:
                _drop_cache(path / block_file_name(h))
            start = time.perf_counter()
            list(pool.map(lambda i: read_block(path, digest, hashes[i], crcs[i], rows[i], fileio), range(len(rows))))
            fetch_s = time.perf_counter() - start
            start = time.perf_counter()
            fd = os.open(big, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            for off in range(0, data.nbytes, _CHUNK_NBYTES):
                os.write(fd, data[off : off + _CHUNK_NBYTES])
            os.close(fd)
            write_s = time.perf_counter() - start
            _drop_cache(big)
            start = time.perf_counter()
            with open(big, "rb", buffering=0) as f:
                view = memoryview(data)
                for off in range(0, data.nbytes, _CHUNK_NBYTES):
                    f.readinto(view[off : off + _CHUNK_NBYTES])
            read_s = time.perf_counter() - start
            best = [min(b, t) for b, t in zip(best, (spill_s, fetch_s, write_s, read_s))]
    for h in hashes:
        (path / block_file_name(h)).unlink()
    big.unlink()
    return tuple(best)


def _drop_cache(path: Path) -> None:
    """fsync, then ask the kernel to drop the file's pages: the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


async def _decode_tok_s(engine: Engine, batch: int, prompt_len: int, gen_len: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(10, engine.spec.vocab_size, (batch, prompt_len), generator=g).tolist()
    params = SamplingParams(max_tokens=gen_len, ignore_eos=True)
    results = await asyncio.gather(*(engine.complete(p, params) for p in prompts))
    first = max(r.metrics.first_token_s for r in results)
    last = max(r.metrics.finished_s for r in results)
    return batch * (gen_len - 1) / max(last - first, 1e-9)


async def run_decode_tiers_bench(model: str | None, batch: int, prompt_len: int, gen_len: int, repeats: int,
                                 disk_dir: Path, progress=print) -> list[dict]:
    block_size = 16
    need = batch * -(-(prompt_len + gen_len) // block_size)  # blocks of one run
    sched = {"max_num_seqs": max(batch, 1), "max_num_batched_tokens": max(512, batch * prompt_len)}
    tiers = {"host_num_blocks": 4 * need, "disk_num_blocks": 64 * need, "io_threads": 4}
    configs = {
        "off": {"block_size": block_size},
        "on": {"block_size": block_size, **tiers, "disk_path": str(disk_dir / "on")},
        "spilling": {"block_size": block_size, "num_blocks": need + batch, **tiers, "disk_path": str(disk_dir / "spill")},
    }
    engines = {name: Engine(model, EngineConfig.from_dict({"kv": kv, "scheduler": sched}), progress=False)
               for name, kv in configs.items()}
    best = {name: 0.0 for name in configs}
    try:
        for engine in engines.values():
            await engine.start()
            await _decode_tok_s(engine, 1, prompt_len, 4, seed=10**6)  # warm-up
        for r in range(repeats):
            for name, engine in engines.items():
                tok_s = await _decode_tok_s(engine, batch, prompt_len, gen_len, seed=1000 * r + len(name))
                best[name] = max(best[name], tok_s)
                progress(f"  repeat {r}: tiers {name}: {tok_s:.1f} tok/s")
        metrics = {name: engines[name].kv_metrics() for name in configs}
    finally:
        for engine in engines.values():
            if engine.kv_manager.tiers is not None:
                await engine.kv_manager.aclose()
            await engine.aclose()
    return [{"tiers": name, "decode_tok_s": best[name], "vs_off": best[name] / best["off"],
             "device_blocks": metrics[name].tiers[0].capacity_blocks,
             "demotions": metrics[name].counters.get("demotions", 0), "spills": metrics[name].counters.get("spills", 0)}
            for name in configs]  # fmt: skip


async def run_kv_bench(model: str | None, num_blocks: int, formats: list[str], io_threads: int,
                       disk_dir: str | None, batch: int, prompt_len: int, gen_len: int, repeats: int,
                       with_decode: bool = True, progress=print) -> dict:
    model_dir = _model_dir(model)
    spec = load_spec(model_dir)
    device = resolve_device("auto")
    dtype = resolve_dtype("auto", device)
    layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, 16, dtype)
    root = Path(disk_dir) if disk_dir else Path(tempfile.mkdtemp(prefix="afkv-bench-kv-"))
    progress(f"model: {model_dir} (block {layout.block_nbytes / 2**10:.0f} KiB {dtype}, {num_blocks} blocks); disk: {root}")
    transfers = await asyncio.to_thread(run_transfer_bench, layout, device, num_blocks, formats,
                                        io_threads, root / "transfers", repeats, progress)
    decode = []
    if with_decode:
        decode = await run_decode_tiers_bench(model, batch, prompt_len, gen_len, repeats, root / "decode", progress)
    return {
        "bench": "kv",
        "model": str(model or "default"),
        "layout": {"num_layers": layout.num_layers, "num_kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim,
                   "block_size": layout.block_size, "dtype": str(dtype), "block_nbytes": layout.block_nbytes},
        "disk_dir": str(root),
        "io_threads": io_threads,
        "decode_workload": {"batch": batch, "prompt_len": prompt_len, "gen_len": gen_len, "prefix_hits": 0.0},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
                    "threads": torch.get_num_threads(), "device": str(device)},
        "transfers": transfers,
        "decode": decode,
    }


def format_table(result: dict) -> str:
    head = f"{'transfer':<24} | {'format':>6} | {'MiB':>7} | {'GB/s':>7} | {'wire GB/s':>9} | {'limit GB/s':>10} | {'ratio':>5}"
    lines = [head, "-" * len(head)]
    for r in result["transfers"]:
        lines.append(f"{r['path']:<24} | {r['format']:>6} | {r['raw_mib']:>7.1f} | {r['gb_s']:>7.2f} | "
                     f"{r['wire_gb_s']:>9.2f} | {r['limit_gb_s']:>10.2f} | {r['ratio']:>5.2f}")
    if result["decode"]:
        lines += ["", f"{'decode, 0% prefix hits':<24} | {'tok/s':>8} | {'vs off':>6} | {'demotions':>9} | {'spills':>6}"]
        for r in result["decode"]:
            lines.append(f"{'tiers ' + r['tiers']:<24} | {r['decode_tok_s']:>8.1f} | {r['vs_off']:>6.3f} | "
                         f"{r['demotions']:>9} | {r['spills']:>6}")
    return "\n".join(lines)
