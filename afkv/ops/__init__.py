"""Tensor operations: torch reference implementations (CPU and GPU) and, where built,
CUDA kernels from native/ (see afkv.ops.native). Lowest layer: imports nothing from afkv
except afkv.errors.
"""
