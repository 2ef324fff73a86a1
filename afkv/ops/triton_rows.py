"""copy_rows: dst[dst_idx[k]] = src[src_idx[k]] for rows of two 2-D tensors on one device, one
Triton kernel (a KV hand-off's copy between cache blocks and a staging buffer's slots, both on
the GPU: afkv.kv.tiers.copier.move_rows, its "triton" indexed kernel).

Each program copies BLOCK consecutive elements of one row: plain loads and stores at unit stride,
which Triton turns into 16-byte vector accesses when the row's start is 16-byte aligned (rows of
int64 words whose row stride is a multiple of 16 elements, as every KV block row is), so a warp
moves 512 contiguous bytes per instruction, the way a device memcpy does; only the two row
indices are read per program, no per-element index arithmetic (torch's index_select /
index_copy_ compute one offset per element). Grid: (rows, chunks of a row)."""

from __future__ import annotations

import functools

import torch

from afkv.errors import ConfigError

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU CI: move_rows uses torch's indexed kernels
    triton = None

BLOCK = 2048  # elements a program copies (16 KiB of int64 words); 4 warps: 4 x 16-byte accesses per thread


@functools.cache
def available() -> bool:
    """True when triton imports and torch sees a CUDA device."""
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _copy_rows_kernel(dst_ptr, src_ptr, dst_idx_ptr, src_idx_ptr, row_len, dst_stride, src_stride,
                          BLOCK: tl.constexpr):
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        d = tl.load(dst_idx_ptr + row).to(tl.int64)
        s = tl.load(src_idx_ptr + row).to(tl.int64)
        offs = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < row_len
        x = tl.load(src_ptr + s * src_stride + offs, mask=mask)
        tl.store(dst_ptr + d * dst_stride + offs, x, mask=mask)


def copy_rows(dst: torch.Tensor, dst_idx: torch.Tensor, src: torch.Tensor, src_idx: torch.Tensor) -> None:
    """dst [m, w] rows dst_idx[k] = src [n, w] rows src_idx[k] (int64 [r] each, on the tensors'
    device; dst_idx distinct). Rows of one dtype with a unit stride along w; launched on the
    current stream, no host synchronisation."""
    if triton is None:
        raise ConfigError("copy_rows needs triton")
    if dst.dim() != 2 or src.dim() != 2 or dst.shape[1] != src.shape[1] or dst.dtype != src.dtype \
            or dst.stride(1) != 1 or src.stride(1) != 1 or dst_idx.shape != src_idx.shape or dst_idx.dim() != 1:
        raise ConfigError(f"copy_rows: dst {tuple(dst.shape)} {dst.dtype}, src {tuple(src.shape)} {src.dtype}, "
                          f"indices {tuple(dst_idx.shape)} / {tuple(src_idx.shape)}: rows of one width, dtype and "
                          "unit inner stride, one index per row on each side")
    rows, width = dst_idx.shape[0], dst.shape[1]
    if rows == 0 or width == 0:
        return
    grid = (rows, triton.cdiv(width, BLOCK))
    _copy_rows_kernel[grid](dst, src, dst_idx, src_idx, width, dst.stride(0), src.stride(0), BLOCK=BLOCK,
                            num_warps=4)
