"""Tensor operations: torch reference implementations (CPU and GPU) and, where triton is
installed, the Triton kernels that replace them on CUDA (triton_*.py). Lowest layer: imports
nothing from afkv except afkv.errors.
"""
