"""`afkv bench calibrate`: measure a machine for `afkv plan` and write its profile JSON.

On one GPU (a few minutes per model) or on the CPU (the same code at small sizes, for tests):

    copy ceiling     a device-to-device copy (read + write), bytes/s
    GEMM peak        a large square matmul in the model dtype, FLOP/s
    T_attn           attention-only decode steps (the FFN returns zeros) of the model's first
                     `--layers` layers and its lm_head, over a grid of batch x context
                     (CUDA graphs on GPUs with triton, eager otherwise)
    T_ffn            the FFN side of the model's first MoE layers over a grid of routed tokens x
                     experts held (ids drawn among the held experts, k distinct per token)
    link             round trips of growing size: NCCL between two GPUs where there are two (and
                     CuPy), else pinned device->host->device copies, else a local socket pair (CPU)
    PCIe             pinned host<->device copies (CPU: host memory copies)
    disk             a sequential write (fsync) and a cold read of a file

What one GPU cannot measure (the runtime's round-trip and step overheads, its micro-batch
overlap, quantized KV read rates) is taken from the built-in profile named by --like and said
so in the profile's `sources`. Layer map: bench sits above plan and model; nothing imports it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

import afkv
from afkv.bench.kv import _drop_cache
from afkv.bench.steps import ZeroFFN, copy_bandwidth, eager_inputs, fits, random_kv, synthetic_step
from afkv.errors import DeviceError, UnsupportedModelError
from afkv.model.model import Model, open_checkpoint
from afkv.model.sides import AttentionSide, FFNSide
from afkv.model.spec import ModelSpec
from afkv.plan.builtin import builtin_profile
from afkv.plan.profile import SCHEMA, Profile

GPU_GRID = {"batches": (1, 8, 32, 128, 256), "contexts": (1024, 4096, 16384), "tokens": (1, 4, 16, 64, 256, 1024, 4096),
            "layers": 4, "copy_bytes": 2 << 30, "gemm": 8192, "disk_bytes": 1 << 30}
CPU_GRID = {"batches": (1, 4, 16), "contexts": (64, 256), "tokens": (1, 8, 64), "layers": 2, "copy_bytes": 64 << 20,
            "gemm": 512, "disk_bytes": 16 << 20}
LINK_BYTES = {"gpu": (16 << 10, 256 << 10, 4 << 20, 32 << 20), "cpu": (64 << 10, 1 << 20, 16 << 20)}
WARMUP = 2


def _timer(device: torch.device):
    """-> time(fn, reps): median seconds of fn() after warm-ups (CUDA events on GPUs)."""
    def run(fn, reps: int = 5) -> float:
        times = []
        for i in range(reps + WARMUP):
            if device.type == "cuda":
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                e.synchronize()
                dt = s.elapsed_time(e) / 1e3
            else:
                t = time.perf_counter()
                fn()
                dt = time.perf_counter() - t
            if i >= WARMUP:
                times.append(dt)
        return statistics.median(times)
    return run


def _first_layers(spec: ModelSpec, n: int, moe_only: bool = False) -> ModelSpec:
    layers = [i for i in range(spec.num_layers) if spec.sparse_layers[i] or not moe_only][:n]
    if moe_only and not layers:
        raise UnsupportedModelError(f"{spec.extra.get('source')}: calibrating the FFN needs an MoE model")
    n = layers[-1] + 1
    return dataclasses.replace(spec, num_layers=n, sparse_layers=spec.sparse_layers[:n])


def copy_ceiling(device: torch.device, nbytes: int) -> float:
    if device.type == "cuda":
        return copy_bandwidth(device, nbytes)
    a = torch.empty(nbytes, dtype=torch.uint8)
    b = torch.empty_like(a)
    return 2 * nbytes / _timer(device)(lambda: b.copy_(a))


def gemm_peak(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / _timer(device)(lambda: a @ b)


@torch.inference_mode()
def attention_points(model: str, device: torch.device, dtype: torch.dtype, grid: dict, log) -> list[dict]:
    spec, reader = open_checkpoint(model)
    spec = _first_layers(spec, grid["layers"])
    try:
        attn = AttentionSide(spec, reader, device, dtype)
    finally:
        reader.close()
    zero = Model(spec, attn, ZeroFFN())
    timer = _timer(device)
    graphs_ok = device.type == "cuda" and _triton()
    block = 16
    out = []
    for context in grid["contexts"]:
        for b in grid["batches"]:
            free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 1 << 62
            if not fits(spec, b, context, block, free, dtype):
                log(f"  T_attn batch {b} context {context}: KV does not fit, skipped")
                continue
            step = synthetic_step(spec, b, context, block)
            nblocks = step[-1]
            kv = random_kv(spec, nblocks + 1, block, dtype, device)
            if graphs_ok:
                from afkv.model.graphs import DecodeGraphs

                graphs = DecodeGraphs(zero, kv, b, len(step[5][0]), nblocks, buckets=[b])
                seconds = timer(lambda: graphs.run(*step[:6], 1).argmax(-1))
                del graphs
            else:
                inputs = eager_inputs(step, device)
                seconds = timer(lambda: zero.attn.logits(zero.forward(inputs, kv, 1)).argmax(-1))
            out.append({"seqs": b, "context": context + 1, "layers": spec.num_layers, "seconds": seconds})
            log(f"  T_attn batch {b} context {context}: {seconds * 1e3:.3f} ms ({spec.num_layers} layers + lm_head)")
            del kv
    return out


@torch.inference_mode()
def ffn_points(model: str, device: torch.device, dtype: torch.dtype, grid: dict, log) -> list[dict]:
    spec, reader = open_checkpoint(model)
    spec = _first_layers(spec, 2 if device.type == "cuda" else 1, moe_only=True)
    moe = [i for i in range(spec.num_layers) if spec.sparse_layers[i]]
    try:
        ffn = FFNSide(spec, reader, device, dtype)
    finally:
        reader.close()
    timer = _timer(device)
    e, k = spec.num_experts, spec.top_k
    gen = torch.Generator(device=device).manual_seed(0)
    out = []
    for held in sorted({e, max(k, e // 8)}, reverse=True):
        for n in grid["tokens"]:
            x = torch.randn(n, spec.hidden_size, generator=gen, device=device).to(dtype) * 0.1  # [n, H]
            ids = torch.rand(n, held, generator=gen, device=device).topk(k, dim=-1).indices  # [n, k] among held
            w = torch.full((n, k), 1.0 / k, device=device)  # [n, k]
            run = lambda: [ffn.forward(i, x, ids, w) for i in moe]  # noqa: E731
            if device.type == "cuda":
                run()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    run()
                seconds = timer(g.replay)
                del g
            else:
                seconds = timer(run)
            touched = int(torch.unique(ids).numel())
            out.append({"tokens": n, "pairs": n * k, "touched": touched, "layers": len(moe), "seconds": seconds})
            log(f"  T_ffn {n} tokens, {held} experts held ({touched} touched): {seconds / len(moe) * 1e6:.0f} us per layer")
    return out


def _triton() -> bool:
    from afkv.ops import triton_attention

    return triton_attention.available()


def _nccl() -> bool:
    try:
        from cupy.cuda import nccl  # noqa: F401
    except ImportError:
        return False
    return True


def link_points(device: torch.device, log) -> tuple[str, list[dict]]:
    if device.type == "cuda" and torch.cuda.device_count() >= 2 and _nccl():
        from afkv.bench.af import bare_nccl_round_trip

        kind, rtt = "nccl", lambda n: bare_nccl_round_trip(n, n, reps=20)
    elif device.type == "cuda":
        kind = "pcie"

        def rtt(n: int) -> float:
            d = torch.empty(n, dtype=torch.uint8, device=device)
            h = torch.empty(n, dtype=torch.uint8, pin_memory=True)
            return _timer(device)(lambda: (h.copy_(d, non_blocking=True), d.copy_(h, non_blocking=True)))
    else:
        kind, rtt = "socket", _socket_round_trip
    out = []
    for n in LINK_BYTES["gpu" if device.type == "cuda" else "cpu"]:
        seconds = rtt(n)
        out.append({"out_bytes": n, "back_bytes": n, "seconds": seconds})
        log(f"  link ({kind}) round trip of 2 x {n >> 10} KiB: {seconds * 1e6:.0f} us")
    return kind, out


def _socket_round_trip(nbytes: int, reps: int = 5) -> float:
    """A local socket pair: send nbytes, the peer echoes them back (the CPU data plane's path)."""
    a, b = socket.socketpair()
    payload = bytes(nbytes)

    def echo() -> None:
        for _ in range(reps + WARMUP):
            b.sendall(_recv(b, nbytes))

    peer = threading.Thread(target=echo, daemon=True)
    peer.start()
    times = []
    try:
        for i in range(reps + WARMUP):
            t = time.perf_counter()
            a.sendall(payload)
            _recv(a, nbytes)
            if i >= WARMUP:
                times.append(time.perf_counter() - t)
    finally:
        peer.join(timeout=10)
        a.close()
        b.close()
    return statistics.median(times)


def _recv(sock: socket.socket, nbytes: int) -> bytes:
    buf = bytearray(nbytes)
    view, got = memoryview(buf), 0
    while got < nbytes:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("socket closed during a calibration round trip")
        got += n
    return bytes(buf)


def host_copy_rates(device: torch.device, nbytes: int) -> tuple[float, float]:
    """-> (host->device, device->host) bytes/s of pinned copies (CPU: plain host memory copies)."""
    cuda = device.type == "cuda"
    d = torch.empty(nbytes, dtype=torch.uint8, device=device)
    h = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    t = _timer(device)
    return nbytes / t(lambda: d.copy_(h, non_blocking=cuda)), nbytes / t(lambda: h.copy_(d, non_blocking=cuda))


def disk_rates(directory: Path, nbytes: int) -> tuple[float, float]:
    """-> (read, write) bytes/s: a sequential write with fsync, then a read after dropping the cache."""
    directory.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkstemp(dir=directory, prefix="afkv-calibrate-")[1])
    data = os.urandom(1 << 20) * (nbytes >> 20)
    try:
        t = time.perf_counter()
        with open(path, "wb", buffering=0) as f:
            f.write(data)
            os.fsync(f.fileno())
        write_s = time.perf_counter() - t
        _drop_cache(path)
        t = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while f.read(1 << 22):
                pass
        read_s = time.perf_counter() - t
    finally:
        path.unlink()
    return len(data) / read_s, len(data) / write_s


def _software() -> dict:
    out = {"afkv": afkv.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        v = torch.cuda.nccl.version()
        out["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    return out


def run_calibration(models: list[str], device: str = "auto", like: str = "h200", disk_dir: str | None = None,
                    log=print) -> dict:
    """Measure this machine for `models` -> a profile JSON (afkv.plan.profile), validated."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("afkv bench calibrate --device cuda needs a CUDA GPU (this machine has none)")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    cuda = dev.type == "cuda"
    grid = GPU_GRID if cuda else CPU_GRID
    dtype = torch.bfloat16 if cuda else torch.float32
    base = builtin_profile(like)
    log(f"calibrating {dev} ({torch.cuda.get_device_name(dev) if cuda else platform.processor() or 'CPU'})")
    copy = copy_ceiling(dev, grid["copy_bytes"])
    gemm = gemm_peak(dev, dtype, grid["gemm"])
    log(f"  copy ceiling {copy / 1e9:.1f} GB/s, GEMM peak {gemm / 1e12:.2f} TFLOP/s ({dtype})")
    calibrations = []
    for model in models:
        spec, reader = open_checkpoint(model)
        reader.close()
        config = _hf_config(model, spec)
        log(f"{model}:")
        calibrations.append({"name": model.removeprefix("random:") if model.startswith("random:") else Path(model).name,
                             "model": config, "copy_bytes_per_s": copy,
                             "attention": attention_points(model, dev, dtype, grid, log),
                             "ffn": ffn_points(model, dev, dtype, grid, log)})
        if cuda:
            torch.cuda.empty_cache()
    link_kind, link = link_points(dev, log)
    h2d, d2h = host_copy_rates(dev, grid["copy_bytes"])
    disk_read, disk_write = disk_rates(Path(disk_dir or tempfile.gettempdir()), grid["disk_bytes"])
    log(f"  host->device {h2d / 1e9:.1f} GB/s, device->host {d2h / 1e9:.1f} GB/s; disk read {disk_read / 1e9:.2f} "
        f"GB/s, write {disk_write / 1e9:.2f} GB/s")
    hbm = torch.cuda.get_device_properties(dev).total_memory if cuda else os.sysconf("SC_PAGE_SIZE") * \
        os.sysconf("SC_PHYS_PAGES")
    data = {
        "schema": SCHEMA, "name": f"{platform.node()}-{dev.type}",
        "machine": {"gpu": torch.cuda.get_device_name(dev) if cuda else None,
                    "gpus": torch.cuda.device_count() if cuda else 0, "host": platform.node(),
                    "platform": platform.platform(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")},
        "software": _software(),
        "sources": {"af": f"not measurable here: built-in profile {like}",
                    "kv_formats": f"not measured here: built-in profile {like}"},
        "hbm_bytes": hbm, "copy_bytes_per_s": copy, "gemm_flops_per_s": gemm, "h2d_bytes_per_s": h2d,
        "d2h_bytes_per_s": d2h, "disk_read_bytes_per_s": disk_read, "disk_write_bytes_per_s": disk_write,
        "link": {"kind": link_kind, "points": link}, "calibrations": calibrations,
        "af": dataclasses.asdict(base.af), "kv_formats": [dataclasses.asdict(f) for f in base.kv_formats],
    }  # fmt: skip
    return Profile.from_json(data, source="afkv bench calibrate").to_json()


def _hf_config(model: str, spec: ModelSpec) -> dict:
    """The config.json fields the planner reads back (afkv.model.spec.spec_from_hf_config)."""
    from afkv.model.random import REAL_SHAPES, is_random

    if is_random(model):
        return dict(REAL_SHAPES[model.removeprefix("random:")])
    return json.loads((Path(model) / "config.json").read_text())


def format_profile(profile: dict) -> str:
    p = Profile.from_json(profile)
    lines = [f"profile {p.name}: copy {p.copy_bytes_per_s / 1e9:.1f} GB/s, GEMM {p.gemm_flops_per_s / 1e12:.2f} TFLOP/s, "
             f"link {p.link_kind} {p.link.latency_s * 1e6:.1f} us + {p.link.bytes_per_s / 1e9:.1f} GB/s, "
             f"H2D {p.h2d_bytes_per_s / 1e9:.1f} GB/s, disk read {p.disk_read_bytes_per_s / 1e9:.2f} GB/s"]
    for name, k in p.fits.items():
        lines.append(f"  {name if name != '*' else 'all models'}: attention floor {k.attn_floor_s * 1e6:.1f} us/layer, "
                     f"KV read {k.kv_efficiency:.0%} of copy; FFN floor {k.ffn_floor_s * 1e6:.1f} us/layer + "
                     f"{k.expert_floor_s * 1e6:.2f} us/expert, MoE {k.moe_flops_per_s / 1e12:.1f} TFLOP/s")
    return "\n".join(lines)
