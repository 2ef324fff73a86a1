"""CUDA kernels of native/, compiled at run time through CuPy, behind the API of afkv.ops.quant.

Each function runs a kernel when its tensors are on a CUDA device, their dtype is one the
kernels take (float32, float16, bfloat16) and `available()`; otherwise it runs the torch
reference in afkv.ops.quant. Kernels and reference write the same bytes, so a block quantized
by either dequantizes with either (native/kv_quant.cu says how).

Kernels run on torch's current stream of the tensors' device and share memory with torch
through DLPack; nothing here synchronises the host. Modules compile once per device, on first
use. native/ is found next to the afkv package, or at $AFKV_NATIVE_DIR.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np
import torch

from afkv.errors import ConfigError
from afkv.ops import quant
from afkv.ops.quant import QuantizedBlock, QuantizedTensor, QuantSpec

_SOURCE = "kv_quant.cu"
_THREADS = 256
_ATTN_THREADS = 128  # kAttnWarps * 32 in kv_quant.cu
_ATTN_DIMS_PER_LANE = (2, 4, 8, 16)  # instantiated in kv_quant.cu: head_dim <= 32 * dims per lane
_KERNEL_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


@functools.cache
def available() -> bool:
    """True when torch has CUDA and CuPy imports and sees a device."""
    if not torch.cuda.is_available():
        return False
    try:
        import cupy
    except ImportError:
        return False
    return bool(cupy.is_available())


def native_dir() -> Path:
    env = os.environ.get("AFKV_NATIVE_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "native"
    if not path.is_dir():
        raise ConfigError(f"CUDA source directory {path} does not exist", key="AFKV_NATIVE_DIR")
    return path


@functools.cache
def _module(source: str, device_index: int):
    import cupy

    code = (native_dir() / source).read_text()
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=code, options=("--std=c++17",))
        module.compile()
    return module


@functools.cache
def _function(name: str, device_index: int):
    import cupy

    with cupy.cuda.Device(device_index):
        return _module(_SOURCE, device_index).get_function(name)


def _launch(name: str, device: torch.device, grid: int, block: int, args: tuple) -> None:
    """Launch `name` on torch's current stream of `device`. Tensors in `args` go through DLPack."""
    import cupy

    if grid == 0:
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    function = _function(name, index)
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(index).cuda_stream, device_id=index)
    with cupy.cuda.Device(index), stream:  # DLPack export on the same stream: no event, no sync
        cargs = tuple(_dlpack(a) if isinstance(a, torch.Tensor) else a for a in args)
        function((grid,), (block,), cargs, stream=stream)


def _dlpack(t: torch.Tensor):
    import cupy

    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)  # CuPy has no bfloat16; the kernels read the bits
    return cupy.from_dlpack(t)


def _grid(num_threads: int) -> int:
    return -(-num_threads // _THREADS)


def _use_kernel(t: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    return t.is_cuda and (dtype or t.dtype) in _KERNEL_DTYPES and available()


def _rows(t: torch.Tensor, inner_ndim: int) -> torch.Tensor:
    """t as rows [N, S] (S = its last inner_ndim dims, contiguous; one stride between rows): a
    view where t allows, else a contiguous copy."""
    rows = t.reshape(-1, math.prod(t.shape[-inner_ndim:]))  # [N, S]
    return rows if rows.stride(1) == 1 else rows.contiguous()


def _rows_into(out: torch.Tensor, inner_ndim: int) -> torch.Tensor | None:
    """out as rows [N, S] sharing its memory, or None where out's strides do not allow that."""
    rows = out.reshape(-1, math.prod(out.shape[-inner_ndim:]))  # [N, S]
    return rows if rows.data_ptr() == out.data_ptr() and rows.stride(1) == 1 else None


def _name(op: str, dtype: torch.dtype, spec: QuantSpec) -> str:
    return f"afkv_{op}_{_KERNEL_DTYPES[dtype]}_b{spec.bits}"


def quantize_keys(k: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """As quant.quantize_keys: k [..., T, H, D] -> per-channel codes, groups of group_size tokens."""
    if not _use_kernel(k):
        return quant.quantize_keys(k, spec)
    num_tokens, num_heads, head_dim = quant.check_kv_input(k, "keys")
    spec.validate_tokens(num_tokens)
    spec.validate_packing(head_dim)
    lead = k.shape[:-3]
    channels = num_heads * head_dim
    x = _rows(k, 3)  # [N, T * C]
    num_outer = x.shape[0]
    data = torch.empty((*lead, num_tokens, num_heads, spec.packed_dim(head_dim)), dtype=torch.uint8, device=k.device)
    group_shape = (*lead, num_tokens // spec.group_size, num_heads, head_dim)
    scale = torch.empty(group_shape, dtype=torch.float32, device=k.device)
    zero = torch.empty(group_shape, dtype=torch.float32, device=k.device)
    num_threads = num_outer * (num_tokens // spec.group_size) * (channels * spec.bits // 8)
    args = (x, np.int64(x.stride(0)), data, scale, zero)
    args += (np.int64(num_outer), np.int32(num_tokens), np.int32(channels), np.int32(spec.group_size))
    _launch(_name("quantize_keys", k.dtype, spec), k.device, _grid(num_threads), _THREADS, args)
    return QuantizedTensor(data, scale, zero, spec)


def quantize_values(v: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """As quant.quantize_values: v [..., T, H, D] -> per-token codes, groups of group_size channels."""
    if not _use_kernel(v):
        return quant.quantize_values(v, spec)
    num_tokens, num_heads, head_dim = quant.check_kv_input(v, "values")
    spec.validate_head_dim(head_dim)
    lead = v.shape[:-3]
    x = _rows(v, 3)  # [N, T * H * D]
    num_outer = x.shape[0]
    num_rows = num_tokens * num_heads
    data = torch.empty((*lead, num_tokens, num_heads, spec.packed_dim(head_dim)), dtype=torch.uint8, device=v.device)
    group_shape = (*lead, num_tokens, num_heads, head_dim // spec.group_size)
    scale = torch.empty(group_shape, dtype=torch.float32, device=v.device)
    zero = torch.empty(group_shape, dtype=torch.float32, device=v.device)
    num_threads = num_outer * num_rows * (head_dim // spec.group_size)
    args = (x, np.int64(x.stride(0)), data, scale, zero)
    args += (np.int64(num_outer), np.int64(num_rows), np.int32(head_dim), np.int32(spec.group_size))
    _launch(_name("quantize_values", v.dtype, spec), v.device, _grid(num_threads), _THREADS, args)
    return QuantizedTensor(data, scale, zero, spec)


def _dequantize(
    op: str, q: QuantizedTensor, shape: tuple[int, ...], dtype: torch.dtype, out: torch.Tensor | None, dims: tuple
) -> torch.Tensor:
    """Run a dequantize kernel into out (or a new tensor); dims = (num_tokens or num_rows, row
    width, as the kernel takes them)."""
    device = q.data.device
    quant.check_out(out, shape, dtype, device)
    target = out if out is not None else torch.empty(shape, dtype=dtype, device=device)
    rows = _rows_into(target, 3)
    dst = rows if rows is not None else torch.empty(shape, dtype=dtype, device=device).reshape(-1, math.prod(shape[-3:]))
    num_outer = dst.shape[0]
    num_threads = q.data.numel()  # one thread per data byte
    args = (q.data.contiguous(), q.scale.contiguous(), q.zero.contiguous(), dst, np.int64(dst.stride(0)))
    args += (np.int64(num_outer), *dims, np.int32(q.spec.group_size))
    _launch(_name(op, dtype, q.spec), device, _grid(num_threads), _THREADS, args)
    if rows is None:
        target.copy_(dst.reshape(shape))
    return target


def dequantize_keys(q: QuantizedTensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """As quant.dequantize_keys: -> keys [..., T, H, D] of `dtype`, into `out` when given."""
    if not _use_kernel(q.data, dtype):
        return quant.dequantize_keys(q, dtype, out)
    shape = quant.key_shape(q)
    dims = (np.int32(shape[-3]), np.int32(shape[-2] * shape[-1]))
    return _dequantize("dequantize_keys", q, shape, dtype, out, dims)


def dequantize_values(q: QuantizedTensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """As quant.dequantize_values: -> values [..., T, H, D] of `dtype`, into `out` when given."""
    if not _use_kernel(q.data, dtype):
        return quant.dequantize_values(q, dtype, out)
    shape = quant.value_shape(q)
    dims = (np.int64(shape[-3] * shape[-2]), np.int32(shape[-1]))
    return _dequantize("dequantize_values", q, shape, dtype, out, dims)


def quantize_block(block: torch.Tensor, spec: QuantSpec) -> QuantizedBlock:
    """As quant.quantize_block: block [*, L, 2, bs, H, D] -> QuantizedBlock (no copy of the
    block: the kernels read keys and values through their strides)."""
    quant.check_block_input(block)
    return QuantizedBlock(
        keys=quantize_keys(block[..., 0, :, :, :], spec),  # [*, L, bs, H, D]
        values=quantize_values(block[..., 1, :, :, :], spec),
    )


def dequantize_block(qb: QuantizedBlock, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """As quant.dequantize_block: -> block [*, L, 2, bs, H, D] of `dtype`, into `out` when given
    (for instance kv[block_id] of the device cache, written in place)."""
    shape = quant.block_shape(qb)
    device = qb.values.data.device
    quant.check_out(out, shape, dtype, device)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    dequantize_keys(qb.keys, dtype, out=out[..., 0, :, :, :])
    dequantize_values(qb.values, dtype, out=out[..., 1, :, :, :])
    return out


def paged_decode_attention(
    q: torch.Tensor,
    blocks: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    layer: int,
    spec: QuantSpec,
    num_layers: int,
    block_size: int,
    num_kv_heads: int,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """As quant.paged_decode_attention: one query token per sequence, q [B, Hq, D], over
    serialised quantized blocks [num_blocks, packed_nbytes] -> [B, Hq, D] of q.dtype. The
    kernel dequantizes keys and values while it reads them; head_dim <= 512. Block ids in
    block_tables must be < num_blocks (the kernel does not check)."""
    head_dim = q.shape[-1]
    if not (_use_kernel(q) and blocks.is_cuda and head_dim <= 32 * _ATTN_DIMS_PER_LANE[-1]):
        return quant.paged_decode_attention(
            q, blocks, block_tables, seq_lens, layer=layer, spec=spec, num_layers=num_layers,
            block_size=block_size, num_kv_heads=num_kv_heads, softmax_scale=softmax_scale,
        )  # fmt: skip
    quant.check_decode_attention_input(
        q, blocks, block_tables, seq_lens, layer, spec, num_layers, block_size, num_kv_heads
    )
    batch, num_q_heads, _ = q.shape
    if not blocks.is_contiguous() or blocks.data_ptr() % 16:  # the kernel reads float32 sections
        blocks = blocks.clone(memory_format=torch.contiguous_format)
    block_tables = block_tables.to(device=q.device, dtype=torch.int32).contiguous()  # [B, max_blocks]
    seq_lens = seq_lens.to(device=q.device, dtype=torch.int32).contiguous()  # [B]
    offsets = []
    for _, dtype, shape, offset in quant.block_sections(spec, num_layers, block_size, num_kv_heads, head_dim):
        offsets.append(np.int64(offset + layer * quant.section_nbytes(dtype, shape) // num_layers))
    off_k_scale, off_k_zero, off_v_scale, off_v_zero, off_k_data, off_v_data = offsets
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # [B, Hq, D]
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    args = (q.contiguous(), blocks, block_tables, np.int32(block_tables.shape[1]), seq_lens, out)
    args += (np.int64(blocks.shape[1]), off_k_scale, off_k_zero, off_v_scale, off_v_zero, off_k_data, off_v_data)
    args += (np.int32(num_q_heads), np.int32(num_kv_heads), np.int32(head_dim), np.int32(block_size))
    args += (np.int32(spec.group_size), np.float32(scale))
    dims_per_lane = next(n for n in _ATTN_DIMS_PER_LANE if 32 * n >= head_dim)
    name = f"{_name('decode_attention', q.dtype, spec)}_d{dims_per_lane}"
    _launch(name, q.device, batch * num_q_heads, _ATTN_THREADS, args)
    return out
