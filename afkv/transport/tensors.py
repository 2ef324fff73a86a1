"""Tensors as raw bytes for frames (CPU data plane): any dtype, bf16 included."""

from __future__ import annotations

import torch

from afkv.errors import FrameError

DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64)}


def pack_tensor(t: torch.Tensor) -> dict:
    t = t.detach().contiguous().cpu()
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "data": t.view(torch.uint8).numpy().tobytes()}


def unpack_tensor(obj: dict, device: torch.device | str = "cpu") -> torch.Tensor:
    try:
        dtype = DTYPES[obj["dtype"]]
        shape = [int(s) for s in obj["shape"]]
        data = obj["data"]
    except (KeyError, TypeError, ValueError) as exc:
        raise FrameError(f"malformed tensor in frame: {exc}") from exc
    n = 1
    for s in shape:
        n *= s
    if not isinstance(data, (bytes, bytearray)) or len(data) != n * dtype.itemsize:
        raise FrameError(f"tensor frame holds {len(data) if isinstance(data, (bytes, bytearray)) else '?'} bytes, "
                         f"expected {n * dtype.itemsize} for {shape} {dtype}")
    if n == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape).to(device)
