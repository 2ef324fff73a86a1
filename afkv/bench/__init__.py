"""Benchmarks (`afkv bench ...`): each prints a table and writes JSON. Every figure is
reported next to a baseline measured in the same run. RESULTS.md keeps the runs' figures.

    decode.py   afkv vs transformers' generate: decode tokens/s and TTFT per batch size
    serve.py    the HTTP server (afkv serve) vs the in-process Engine: tok/s and TTFT
    kv.py       KV tier bandwidths against the copy limit; decode with tiers off / on
    kv_quant.py quantized device KV (fp8/int8/int4): kernel bytes/s vs copy, decode steps, capacity
    long_context.py  contexts larger than the GPU: decode with KV streamed from host memory against the
                pinned-H2D bound and the all-device run; prefill past the device tier (long_context_gpu.sh)
    af.py       1A1F over NCCL vs colocated data parallel on two GPUs (real shapes)
    gpu.py      one GPU: afkv (CUDA graphs) vs transformers vs the HBM copy ceiling, plot
    eplb.py     expert load balancing under Zipf skew (CPU processes)
    experts_merged.py  2A1F: the expert node's steps per attention node vs merged (CPU or GPU processes)
    steps.py    decode-step timing shared by af.py, gpu.py and kv_quant.py
    calibrate.py  a machine profile for `afkv plan` (afkv.plan): kernel curves, links, PCIe, disk
    kernels.py  Triton kernels vs roofline and torch: fused-MoE sweep (bf16/fp8), fused ops, batch-1
                decode with its kernels by name (kernels_gpu.sh: those + GPU tests + TPOT before/after)
"""

from __future__ import annotations

import json
from pathlib import Path


def write_json(result: dict, path: str | Path) -> Path:
    """Write a benchmark's result (values JSON cannot hold are written as strings) -> the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    return path

