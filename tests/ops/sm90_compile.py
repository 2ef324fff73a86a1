"""Compile the attention kernels for an H100 (CUDA sm_90) on a machine without a GPU.

Triton's interpreter (how the CPU tests run the kernels) never compiles them, so it misses what
only the compiler rejects (a tl.dot narrower than 16, return types that differ between the
branches of a function, ...). This drives the product's own launch code (the wrappers of
afkv.ops.triton_attention and afkv.ops.triton_mla, with the decisions they take on CUDA) with CPU tensors while
Triton's active driver is a stand-in for an sm_90 device: every launch compiles for that
target and launches nothing. Two depths:

    ttir   the front end only (Python AST -> Triton IR: type and shape errors), fast
    cubin  the whole pipeline down to ptxas's cubin (layouts, LLVM, PTX, registers), and the
           shared memory the kernel needs against an H100's 227 KiB

Run as a script (by tests/ops/test_sm90_compile.py, in a process without TRITON_INTERPRET):

    python tests/ops/sm90_compile.py ttir|cubin [--sweep] [--usage] [--only=REGEX]

It prints one line per compiled specialization (with --usage: registers and spilled bytes of
the cubin, by cuobjdump) and exits 1 when any launch fails to compile.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass

import torch

H100_SHARED_BYTES = 232448  # opt-in shared memory per block on sm_90


@dataclass
class Compiled:
    name: str
    constants: dict
    shared: int = 0
    cubin: bytes | None = None


class _Launcher:
    """What the driver's launcher would be: launches nothing."""

    def __init__(self, src, metadata):
        pass

    def __call__(self, *args, **kwargs):
        return None


class _Utils:
    def __init__(self, log: list[Compiled]):
        self.log = log

    def get_device_properties(self, device):
        return {"max_shared_mem": H100_SHARED_BYTES, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

    def load_binary(self, name, kernel, shared, device):
        entry = next((c for c in reversed(self.log) if c.name == name and c.cubin is None), None)
        if entry is None:  # compiled in an earlier process (Triton's disk cache): no hook call
            entry = Compiled(name, {})
            self.log.append(entry)
        entry.shared, entry.cubin = shared, kernel
        return None, None, 0, 0, 1024  # module, function, registers, spills, max threads


class FakeSm90Driver:
    """Triton's active driver for an H100 that is not there."""

    def __init__(self, log: list[Compiled]):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)
        self.utils = _Utils(log)
        self.launcher_cls = _Launcher

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def install(depth: str) -> list[Compiled]:
    """Make every launch from now on compile for sm_90 to `depth` and launch nothing; patch
    afkv.ops.triton_attention to take the decisions it takes on an H100. -> the log of
    compiled specializations (appended to as launches happen)."""
    from triton import knobs
    from triton._C.libtriton import ir
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime import driver

    from afkv.ops import triton_attention as ta

    log: list[Compiled] = []
    fake = FakeSm90Driver(log)
    driver.set_active(fake)

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        name = repr.split("[", 1)[0]
        log.append(Compiled(name, dict(compile["constants"])))
        if depth == "cubin":
            return None  # go on: Triton compiles, then load_binary records the cubin
        src = ASTSource(fn.jit_function, compile["signature"], compile["constants"], compile["configs"][0])
        backend = CUDABackend(fake.target)
        options = backend.parse_options({"num_warps": compile["num_warps"], "num_stages": compile["num_stages"]})
        context = ir.context()
        ir.load_dialects(context)
        backend.load_dialects(context)
        src.make_ir(fake.target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                    context)
        return True  # compiled as far as asked: skip the rest, launch nothing

    knobs.runtime.jit_cache_hook = hook
    ta._compiled = lambda device: True
    ta._sm_count = lambda device_index: 132
    ta._gpu_family = lambda device_index: "sm90"
    from afkv.ops import triton_mla as tm

    tm._ieee = lambda dtype, device: dtype == torch.float32  # its CUDA decision: 16-bit dots unless float32
    from afkv.ops import triton_moe

    triton_moe._interpreted = lambda x: False  # the hardware's fp8 cast
    assert not type(ta._decode_kernel).__name__.startswith("Interpreted"), "run without TRITON_INTERPRET"
    return log


def usage(cubin: bytes) -> str:
    """Registers, spill stores / loads and shared memory of a cubin (cuobjdump -res-usage)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", text)
    return f"regs {m.group(1)} stack {m.group(2)}" if m else text.strip()[-200:]


# ---- the launches: the shapes of the tests and of the models -------------------------------------

# (dtype, num_heads, num_kv_heads, head_dim, block_size): the tiny test models (head_dim 16),
# the kernel tests' shapes, Qwen3-30B-A3B (32 / 4 x 128) and a GQA-less 128
_SHAPES = [
    (torch.float32, 4, 2, 16, 4),
    (torch.bfloat16, 4, 2, 16, 4),
    (torch.float16, 4, 2, 16, 16),
    (torch.float32, 8, 2, 64, 16),
    (torch.bfloat16, 16, 2, 64, 16),
    (torch.float32, 16, 2, 64, 4),
    (torch.bfloat16, 8, 1, 64, 32),
    (torch.bfloat16, 32, 4, 128, 16),
    (torch.float16, 32, 4, 128, 16),
    (torch.float32, 4, 4, 128, 4),
    (torch.bfloat16, 8, 1, 128, 32),
    (torch.bfloat16, 4, 4, 128, 64),
]
_KINDS = ["fp8", "int8", "int4"]
_SWEPT = (torch.bfloat16, 32, 4, 128, 16)  # the shape the sweep's variants launch at (Qwen3-30B-A3B)


def launches(sweep: bool = False):
    """Yield (label, thunk): each thunk launches one product path on CPU tensors; with `sweep`
    also the quantized decode kernel in every variant `afkv bench kv-quant --sweep` tries."""
    from afkv.ops import attention, quant
    from afkv.ops import triton_attention as ta

    for dtype, h, hkv, d, bs in _SHAPES:
        kv = torch.zeros(4, 2, 2, bs, hkv, d, dtype=dtype)
        tables = torch.zeros(2, 3, dtype=torch.int64)
        lens = torch.tensor([2 * bs, 1])
        q = torch.zeros(2, h, d, dtype=dtype)
        for window in (None, 7):
            tag = f"{str(dtype)[6:]} h{h}/{hkv} d{d} bs{bs} w{window}"
            yield f"decode {tag}", lambda q=q, kv=kv, w=window: ta.paged_decode_attention(q, kv, 1, tables, lens, w)
            yield f"decode 1-split {tag}", lambda q=q, kv=kv, w=window: ta.paged_decode_attention(
                q, kv, 1, tables, lens, w, num_splits=1)
            yield f"prefill {tag}", lambda q=q, kv=kv, w=window: ta.paged_prefill_attention(
                torch.zeros(5, h, d, dtype=dtype), kv, 1, torch.zeros(3, dtype=torch.int64), 2 * bs, w)
        yield f"decode partial {str(dtype)[6:]} h{h}/{hkv} d{d} bs{bs} wNone", (
            lambda q=q, kv=kv: ta.paged_decode_partial(q, kv, 1, tables, lens))
        for causal in (True, False):  # a streaming sequence's chunk: its device part, its ring slot
            yield f"prefill partial causal={causal} {str(dtype)[6:]} h{h}/{hkv} d{d} bs{bs} wNone", (
                lambda kv=kv, c=causal: ta.paged_prefill_partial(torch.zeros(5, h, d, dtype=dtype), kv, 1,
                                                                 torch.zeros(3, dtype=torch.int64), 2 * bs, c))
        for kind in _KINDS:
            spec = quant.QuantSpec(kind, 2, bs, hkv, d, quant.scale_dtype_for(dtype))
            cache = attention.QuantizedKVCache(torch.zeros(4, spec.row_nbytes, dtype=torch.uint8),
                                               torch.zeros(3, 2, 2, bs, hkv, d, dtype=dtype), spec, max_tail_blocks=2)
            for window in (None, 7):
                tag = f"{kind} {str(dtype)[6:]} h{h}/{hkv} d{d} bs{bs} w{window}"
                yield f"decode {tag}", lambda q=q, c=cache, w=window: ta.paged_decode_attention_quantized(
                    q, c, 1, tables, lens, w)
                yield f"prefill {tag}", lambda c=cache, w=window: ta.paged_prefill_attention_quantized(
                    torch.zeros(5, h, d, dtype=dtype), c, 1, torch.zeros(3, dtype=torch.int64), 2 * bs, w)
            yield f"decode partial {kind} {str(dtype)[6:]} h{h}/{hkv} d{d} bs{bs} wNone", (
                lambda q=q, c=cache: ta.paged_decode_partial_quantized(q, c, 1, tables, lens))
            for causal in (True, False):
                yield f"prefill partial causal={causal} {kind} {str(dtype)[6:]} h{h}/{hkv} d{d} bs{bs} wNone", (
                    lambda c=cache, cz=causal: ta.paged_prefill_partial_quantized(
                        torch.zeros(5, h, d, dtype=dtype), c, 1, torch.zeros(3, dtype=torch.int64), 2 * bs, cz))
            for config in (ta.sweep_configs(kind) if sweep and (dtype, h, hkv, d, bs) == _SWEPT else ()):
                yield f"decode {kind} {str(dtype)[6:]} h{h}/{hkv} d{d} bs{bs} {config}", (
                    lambda q=q, c=cache, cfg=config: ta.paged_decode_attention_quantized(q, c, 1, tables, lens,
                                                                                         config=cfg))


_MLA_SHAPES = [  # (dtype, heads, kv_lora_rank, rope dims, block size): DeepSeek-V3 and V2-Lite, the tiny test model
    (torch.bfloat16, 128, 512, 64, 64), (torch.bfloat16, 16, 512, 64, 64), (torch.float16, 16, 512, 64, 64),
    (torch.float32, 4, 32, 16, 4), (torch.bfloat16, 4, 32, 16, 4),
]


def mla_launches(sweep: bool = False):
    """Yield (label, thunk) for the paged MLA decode and prefill (afkv.ops.triton_mla) over raw
    latents and every quantized latent format, at DeepSeek's shapes and the tiny model's; with
    `sweep` also the decode in every candidate launch `afkv bench kernels mla --tune 1` times
    (triton_mla.CANDIDATE_TILES) at DeepSeek's shapes."""
    from afkv.ops import attention, quant
    from afkv.ops import triton_mla as tm

    for dtype, h, rank, rope, bs in _MLA_SHAPES:
        tables = torch.zeros(2, 3, dtype=torch.int64)
        lens = torch.tensor([2 * bs, 1])
        q = torch.zeros(2, h, rank + rope, dtype=dtype)
        caches = {"raw": torch.zeros(4, 2, bs, rank + rope, dtype=dtype)}
        for kind in ("fp8", "int8"):
            spec = quant.LatentQuantSpec(kind, 2, bs, rank, rope, quant.scale_dtype_for(dtype))
            caches[kind] = attention.QuantizedKVCache(torch.zeros(4, spec.row_nbytes, dtype=torch.uint8),
                                                      torch.zeros(3, 2, bs, rank + rope, dtype=dtype), spec,
                                                      max_tail_blocks=2)
        for kind, cache in caches.items():
            tag = f"mla {kind} {str(dtype)[6:]} h{h} r{rank}+{rope} bs{bs}"
            yield f"decode {tag}", lambda q=q, c=cache, r=rank: tm.paged_mla_decode(q, c, 1, tables, lens, 0.1, r)
            yield f"prefill {tag}", lambda c=cache, h=h, r=rank, p=rope, dt=dtype: tm.paged_mla_prefill(
                torch.zeros(3, h, r + p, dtype=dt), c, 1, torch.zeros(3, dtype=torch.int64), 2 * bs, 0.1, r)
            for tile in (tm.CANDIDATE_TILES if sweep and rank == 512 and dtype == torch.bfloat16 else ()):
                if tile.block_h <= h and (kind == "raw" or not tile.whole_scores):
                    yield f"decode {tag} {tile}", lambda q=q, c=cache, r=rank, t=tile: tm.paged_mla_decode(
                        q, c, 1, tables, lens, 0.1, r, tile=t)


def row_launches(sweep: bool = False):
    """Yield (label, thunk) for copy_rows (afkv.ops.triton_rows, the KV hand-off's Triton row
    copy) on rows of int64 words of a Qwen3-30B-A3B KV block (1.5 MiB) and on odd byte rows."""
    from afkv.ops import triton_rows

    idx = torch.zeros(2, dtype=torch.int64)
    for dtype, width in ((torch.int64, 48 * 2 * 4 * 16 * 128 * 2 // 8), (torch.uint8, 6)):
        rows = torch.zeros(3, width, dtype=dtype)
        yield f"rows {str(dtype)[6:]} w{width}", lambda r=rows: triton_rows.copy_rows(r, idx, r, idx)


_MOE_SHAPES = {  # name -> (experts, hidden, inter, top_k): afkv.bench.kernels.MOE_SHAPES (tests do not import bench)
    "qwen3": (128, 2048, 768, 8), "mixtral": (8, 4096, 14336, 2),
}
_MOE_TOKENS = (16, 256, 4096)  # decode tiles, 64-row tiles, 128-row tiles (compute regime)


def moe_launches(sweep: bool = False):
    """Yield (label, thunk) for the fused MoE (afkv.ops.triton_moe.moe_mlp) at Qwen3-30B-A3B's and
    Mixtral-8x7B's expert shapes, bf16 weights and fp8 weights in every fp8_mode, with the tiles
    default_config picks on an H100 (132 SMs); with `sweep` also every candidate config the
    tuner times (candidate_configs). The weights are expanded views (no memory behind the
    experts: nothing launches)."""
    from afkv.ops import fp8
    from afkv.ops import triton_moe as tm

    for name, (e, h, i, k) in _MOE_SHAPES.items():
        local = torch.arange(e + 1)
        layers = {"bf16": dict(gate_up=torch.zeros(1, 1, h, dtype=torch.bfloat16).expand(e, 2 * i, h),
                               down=torch.zeros(1, 1, i, dtype=torch.bfloat16).expand(e, h, i))}
        gs, ds = (e, 2 * -(-i // 128), -(-h // 128)), (e, -(-h // 128), -(-i // 128))
        layers["fp8"] = dict(gate_up=torch.zeros(1, 1, h, dtype=fp8.FP8).expand(e, 2 * i, h),
                             down=torch.zeros(1, 1, i, dtype=fp8.FP8).expand(e, h, i),
                             gate_up_scale=torch.ones(1, 1, gs[2]).expand(gs), down_scale=torch.ones(1, 1, ds[2]).expand(ds))
        for t in _MOE_TOKENS:
            x = torch.zeros(t, h, dtype=torch.bfloat16)
            ids = torch.zeros(t, k, dtype=torch.int64)
            w = torch.zeros(t, k)
            for dtype, mode in (("bf16", "tile"), ("fp8", "tile"), ("fp8", "once"), ("fp8", "dequant")):
                is_fp8 = dtype == "fp8"
                configs = (tm.candidate_configs if sweep else lambda *a: [tm.default_config(*a)])(
                    t * k, e, h, i, 132, is_fp8, mode)
                for n, cfg in enumerate(configs):
                    tag = f"moe {name} T{t} {dtype}{'-' + mode if is_fp8 else ''} {'default' if n == 0 else cfg}"
                    yield tag, lambda x=x, ids=ids, w=w, lw=layers[dtype], cfg=cfg, local=local: tm.moe_mlp(
                        x, ids, w, local, **lw, config=cfg)


def main(argv: list[str]) -> int:
    depth = argv[0] if argv else "ttir"
    show_usage = "--usage" in argv
    only = next((a.split("=", 1)[1] for a in argv if a.startswith("--only=")), None)
    log = install(depth)
    failed = 0
    with torch.inference_mode():
        # lazily: a thunk reads some of its shape from the loop that yields it
        sweep = "--sweep" in argv
        for label, thunk in itertools.chain(launches(sweep), mla_launches(sweep), row_launches(), moe_launches(sweep)):
            if only and not re.search(only, label):
                continue
            start = len(log)
            try:
                thunk()
            except Exception:  # noqa: BLE001 - every failure is reported, then the exit status says it
                failed += 1
                print(f"FAILED {label}\n{traceback.format_exc(limit=-3)}", flush=True)
                continue
            for c in log[start:]:
                extra = ""
                if depth == "cubin":
                    if c.shared > H100_SHARED_BYTES:
                        failed += 1
                        extra = f" FAILED: {c.shared} bytes of shared memory"
                    elif show_usage and c.cubin is not None:
                        extra = f" shared {c.shared} {usage(c.cubin)}"
                print(f"ok {label}: {c.name}{extra}", flush=True)
    print(f"{len(log)} kernel specializations compiled for sm_90 ({depth}), {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
