"""Every attention kernel launch of afkv.ops.triton_attention and afkv.ops.triton_mla, and every
fused-MoE launch of afkv.ops.triton_moe (bf16 and each fp8_mode, default and candidate tiles),
compiles for an H100 (sm_90),
checked without a GPU: tests/ops/sm90_compile.py drives the product's launch code against a
stand-in sm_90 driver, in its own process (the other kernel tests import triton under
TRITON_INTERPRET=1, which never compiles). The front end (TTIR) for every shape the tests and
models launch, every table entry and every variant the kernel sweep tries; the whole pipeline
down to cubin (and shared memory within an H100's) for Qwen3-30B-A3B's shapes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

_SCRIPT = Path(__file__).with_name("sm90_compile.py")
_ROOT = Path(__file__).parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(_ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(_SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_every_launch_compiles_to_triton_ir_for_sm90():
    out = _run("ttir", "--sweep")
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " 0 failed" in out.stdout
    assert "_decode_quant_kernel" in out.stdout and "_prefill_quant_kernel" in out.stdout
    assert "_mla_decode_kernel" in out.stdout
    for kernel in ("_align_kernel", "_quantize_kernel", "_gate_up_kernel", "_down_kernel", "_combine_kernel"):
        assert f"moe mixtral T4096 fp8-once default: {kernel}" in out.stdout


def test_the_model_shapes_compile_to_cubin_for_sm90():
    out = _run("cubin", "--only=bfloat16 h32/4 d128 bs16 wNone")
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    for kernel in ("_decode_kernel", "_prefill_kernel", "_decode_quant_kernel", "_prefill_quant_kernel",
                   "_reduce_kernel"):
        assert kernel in out.stdout


def test_deepseek_mla_compiles_to_cubin_for_sm90():
    """The paged MLA decode at DeepSeek-V3's shapes (128 heads, 512 + 64 latent, block 64) over
    raw, fp8 and int8 latents: the whole pipeline, shared memory within an H100's."""
    out = _run("cubin", "--only=mla .* bfloat16 h128", "--usage")
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    mla = [line for line in out.stdout.splitlines() if "_mla_decode_kernel" in line or "_mla_flat_kernel" in line]
    assert len(mla) == 6  # decode and prefill x three formats, whichever kernel the default tile names
    print("\n".join(mla))  # registers, spills


def test_mla_candidate_launches_compile_to_cubin_for_sm90():
    """Every launch the MLA kernel tuning times (triton_mla.CANDIDATE_TILES) at DeepSeek-V3's
    and V2-Lite's shapes over raw, fp8 and int8 latents, down to cubin within an H100's shared
    memory; registers and spilled bytes printed (-s shows them)."""
    out = _run("cubin", "--sweep", "--usage", "--only=^decode mla .* bfloat16 h(128|16) .*MLATile")
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if "_mla_decode_kernel" in line or "_mla_flat_kernel" in line]
    from afkv.ops import triton_mla as tm

    launches = [(h, kind, t) for h in (128, 16) for kind in ("raw", "fp8", "int8") for t in tm.CANDIDATE_TILES
                if t.block_h <= h and (kind == "raw" or not t.whole_scores)]
    assert len(lines) == len(launches)
    print("\n".join(lines))


def test_row_copy_compiles_to_cubin_for_sm90():
    """The hand-off's Triton row copy (afkv.ops.triton_rows) at a real KV block's row of words and
    at odd byte rows, down to cubin; registers and spills printed (-s shows them)."""
    out = _run("cubin", "--only=^rows ", "--usage")
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if "_copy_rows_kernel" in line]
    assert len(rows) == 2
    print("\n".join(rows))


def test_fp8_moe_modes_compile_to_cubin_without_spills():
    """The fused MoE with fp8 weights in fp8_mode "once" and "dequant", at the tiles default_config
    picks for them on an H100 (Qwen3-30B-A3B decode and compute regime, Mixtral's 64-row tiles):
    down to cubin, shared memory within an H100's, and no register spills (the "tile" mode's
    gate_up spills 376-536 bytes at 64- and 128-row tiles: the tiles of the new modes avoid it)."""
    out = _run("cubin", "--usage", "--only=^moe (qwen3 T(16|4096)|mixtral T256) fp8-(once|dequant) default")
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    gemms = [line for line in out.stdout.splitlines() if "_gate_up_kernel" in line or "_down_kernel" in line]
    assert len(gemms) == 12, out.stdout[-3000:]  # 3 points x 2 modes x 2 GEMMs
    assert all(line.endswith("stack 0") for line in gemms), "\n".join(gemms)
    print("\n".join(gemms))
