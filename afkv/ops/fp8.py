"""FP8 expert weights: e4m3 with one float32 scale per 128 x 128 block, as DeepSeek-V3
checkpoints store them (`<name>` float8_e4m3fn [N, K], `<name>_scale_inv` float32
[ceil(N/128), ceil(K/128)]: weight = fp8 value * scale), and the torch reference of the
fused-MoE kernel's FP8 path (afkv.ops.triton_moe).

    quantize_blocks       weight [N, K] -> (fp8 [N, K], scales [N/128, K/128]); amax / 448 per block
    dequantize_blocks     the inverse (exact values of the fp8 grid times the scale)
    quantize_groups       activations rounded to the fp8 grid per row and 128-column group, as the
                          kernel quantizes its A operand (amax / 448 per group), in float32
    moe_mlp_reference     the FP8 expert MLP in torch: dequantize-then-matmul, float32

The kernel's FP8 arithmetic (DeepSeek-V3's recipe): each 128-column group of an activation
row is scaled by amax / 448 and rounded to e4m3; products of fp8 operands are summed per
128-long K block and promoted to float32 there, times the activation group's scale and the
weight block's scale. The reference computes the same function by dequantizing both
operands and multiplying in float32: it equals the kernel up to float32 summation order
(and, rarely, a quotient next to an fp8 rounding boundary).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from afkv.errors import ConfigError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value
BLOCK = 128  # scale block: 128 x 128 weights, 1 x 128 activations
AMAX_EPS = 1e-10  # floor of a group's amax: an all-zero group gets a tiny scale, never 0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scale_shape(rows: int, cols: int, block: tuple[int, int] = (BLOCK, BLOCK)) -> tuple[int, int]:
    return _cdiv(rows, block[0]), _cdiv(cols, block[1])


def quantize_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., N, K] (any float dtype) -> (fp8 [..., N, K], scales float32 [..., ceil(N/128),
    ceil(K/128)]): each 128 x 128 block (partial at the edges) of each matrix scaled so that its
    largest magnitude is 448."""
    if weight.dim() < 2:
        raise ConfigError(f"quantize_blocks takes [..., N, K] weights, got shape {tuple(weight.shape)}")
    *lead, n, k = weight.shape
    sn, sk = scale_shape(n, k)
    w = F.pad(weight.float(), (0, sk * BLOCK - k, 0, sn * BLOCK - n))  # [..., sn*128, sk*128]
    blocks = w.view(*lead, sn, BLOCK, sk, BLOCK)
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., sn, sk]
    scale = amax.clamp(min=AMAX_EPS) / FP8_MAX
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(*lead, sn * BLOCK, sk * BLOCK)[..., :n, :k].contiguous(), scale


def dequantize_blocks(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32, block: tuple[int, int] = (BLOCK, BLOCK)
) -> torch.Tensor:
    """fp8 [N, K], scales [ceil(N/bn), ceil(K/bk)] for blocks (bn, bk) -> weight [N, K] of `dtype`
    (computed in float32)."""
    if q.dim() != 2 or tuple(scale.shape) != scale_shape(*q.shape, block):
        raise ConfigError(f"fp8 weight {tuple(q.shape)} with {block[0]} x {block[1]} blocks needs scales of shape "
                          f"{scale_shape(*q.shape, block) if q.dim() == 2 else '?'}, got {tuple(scale.shape)}")
    n, k = q.shape
    s = scale.float().repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]  # [N, K]
    return (q.float() * s).to(dtype)


def quantize_groups(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> float32 [..., K]: each row's 128-column groups (the last partial) scaled by
    amax / 448, rounded to e4m3 and scaled back: the values the kernel's fp8 dot sees."""
    k = x.shape[-1]
    g = _cdiv(k, BLOCK)
    xg = F.pad(x.float(), (0, g * BLOCK - k)).unflatten(-1, (g, BLOCK))  # [..., g, 128]
    scale = xg.abs().amax(-1, keepdim=True).clamp(min=AMAX_EPS) / FP8_MAX  # [..., g, 1]
    q = (xg / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float()
    return (q * scale).flatten(-2)[..., :k]


def split_gate_up_scale(scale: torch.Tensor, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales of a stacked gate_up [2I, H] (gate blocks, then up blocks: I need not be a
    multiple of 128) -> (gate scales, up scales)."""
    rows = _cdiv(inter, BLOCK)
    return scale[..., :rows, :], scale[..., rows:, :]


def dequantize_gate_up(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """gate_up fp8 [2I, H] with scales [2 ceil(I/128), ceil(H/128)] -> [2I, H] of `dtype`."""
    inter = q.shape[0] // 2
    gs, us = split_gate_up_scale(scale, inter)
    return torch.cat([dequantize_blocks(q[:inter], gs, dtype), dequantize_blocks(q[inter:], us, dtype)])


def moe_mlp_reference(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    local: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_scale: torch.Tensor,
    down: torch.Tensor,
    down_scale: torch.Tensor,
    quantize_activations: bool = True,
) -> torch.Tensor:
    """The FP8 fused-MoE in torch (the CPU path and the kernel's oracle). x [T, H], topk_ids
    [T, k] (E marks padding), topk_weights [T, k], local [E + 1] (logical id -> stack index,
    E_h when not held), gate_up fp8 [E_h, 2I, H] with scales [E_h, 2 ceil(I/128), ceil(H/128)],
    down fp8 [E_h, H, I] with scales [E_h, ceil(H/128), ceil(I/128)] -> y [T, H] in x's dtype.
    Activations are rounded to x's dtype between the two GEMMs, as the kernel stores them.
    quantize_activations=False: both GEMMs take their activations unquantized (the kernel's
    fp8_mode "dequant": the weights dequantized, 16-bit MMAs).
    One pass per held expert with tokens (a host synchronisation each: not for CUDA hot paths)."""
    num_held, two_inter, _ = gate_up.shape
    inter = two_inter // 2
    expert = local[topk_ids]  # [T, k] stack index
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
    q = quantize_groups if quantize_activations else torch.Tensor.float
    xq = q(x)  # [T, H] float32
    for e in range(num_held):
        tokens, slots = (expert == e).nonzero(as_tuple=True)  # [n] each
        if tokens.numel() == 0:
            continue
        h = xq[tokens] @ dequantize_gate_up(gate_up[e], gate_up_scale[e]).T  # [n, 2I]
        act = (F.silu(h[:, :inter]) * h[:, inter:]).to(x.dtype)  # [n, I]
        out = q(act) @ dequantize_blocks(down[e], down_scale[e]).T  # [n, H]
        y.index_add_(0, tokens, out * topk_weights[tokens, slots, None].float())
    return y.to(x.dtype)
