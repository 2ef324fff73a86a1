"""Fused Triton kernels for the routed experts of a MoE layer, behind the semantics of the torch
grouped path they replace (afkv.model.sides.FFNSide._grouped).

    moe_mlp         y[t] = sum over t's held selections of w * down_e(silu(gate_e x_t) * up_e x_t)
    default_config  block sizes for a shape (depends only on shapes)
    bench           moe_mlp vs the torch grouped path, achieved weight bytes/s
                    (python -m afkv.ops.triton_moe)

Callers check `available()` and fall back to the torch path where it is False. moe_mlp runs
its kernels on whatever device the tensors are on: CPU tensors run under Triton's interpreter
(TRITON_INTERPRET=1 in the environment before this module is imported), which is how the CPU
tests check it. Importing this module never needs triton.

Layout. The (token, selection) pairs are sorted by held expert (torch ops that never sync:
argsort, cumsum, scatter, searchsorted) into row blocks of BLOCK_M rows, each block holding
rows of one expert only (an expert's last block padded with the sentinel pair T*k). Expert e
takes ceil(count_e / BLOCK_M) blocks, so the blocks number at most
ceil(T*k / BLOCK_M) + min(E_h, T*k): every grid is sized by that bound, and programs past the
real blocks read their block's expert (E_h: none) and exit. Grids depend only on shapes; the
whole call can be captured in a CUDA graph (compile it once outside the capture).

Two kernels, each program one BLOCK_M x BLOCK_N tile of one expert's rows, looping over K:
  gate_up  x rows [BM, H] @ the gate tile and the matching up tile (columns n and n + I of
           gate_up^T) -> silu(gate) * up, written as [rows, I] activations in the dtype of x
           (the [rows, 2I] intermediate is never written)
  down     activations [BM, I] @ down^T tile, times the routing weight (float32), written as
           float32 per-selection rows [P, H] (split-K: one slice of [S, P, H] per K split).
The combine sums each token's k selections (and the S splits) with torch in a fixed order:
no atomics, results equal run to run. Rows of unheld / padding selections stay zero.

Rounding: products in float32 (tensor cores for 16-bit inputs, IEEE float32 for float32
inputs), the activations rounded once to the dtype of x (as the torch path rounds them), the
weighted sum in float32, rounded once to the dtype of x. The torch path rounds gate_up, each
selection's output, its product with the weight and each partial sum to 16 bits as well:
this path is the more accurate of the two.

Bandwidth at small M: with few rows per expert the step is bound by reading the weights; N is
split finely (BLOCK_N 64, 32 when that gives too few programs) so that enough programs stream
each expert's weights once, and the down GEMM splits K when even BLOCK_N 32 leaves too few
programs (decode of one token: 2 experts).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from afkv.errors import ConfigError

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU CI: callers use the torch grouped path
    triton = None

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PROGRAMS_PER_SM = 4  # split N (then K) until a GEMM has this many programs per SM
_MAX_SPLIT_K = 8


@functools.cache
def available() -> bool:
    """True when triton imports and torch sees a CUDA device."""
    return triton is not None and torch.cuda.is_available()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.cache
def _sm_count(device_index: int | None) -> int:
    if device_index is None:  # CPU (interpreter): small, so tests see split K
        return 1
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes of the two GEMMs (every field a compile-time constant of the kernels)."""

    block_m: int  # rows of one expert per program (tl.dot needs >= 16)
    gate_up_block_n: int  # activation columns per gate_up program (reads 2 x this many weight rows)
    down_block_n: int  # output columns per down program
    block_k: int
    split_k: int  # down GEMM: K slices, each summed by the combine
    num_warps: int = 4
    num_stages: int = 4

    def __post_init__(self):
        for name in ("block_m", "gate_up_block_n", "down_block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ConfigError(f"BlockConfig.{name} must be a power of two >= 16, got {v}")
        if self.split_k < 1:
            raise ConfigError(f"BlockConfig.split_k must be >= 1, got {self.split_k}")


def default_config(num_pairs: int, num_held: int, hidden: int, inter: int, sm_count: int) -> BlockConfig:
    """Block sizes for num_pairs = T*k selections over num_held experts of [2I, H] / [H, I]
    (shapes only: the same config for every routing, as a CUDA graph needs). Assumes the
    selections spread evenly over min(num_held, num_pairs) experts."""
    active = max(1, min(num_held, num_pairs))
    rows = _cdiv(num_pairs, active)  # rows per touched expert
    block_m = min(64, max(16, _next_pow2(rows)))
    row_blocks = active * _cdiv(rows, block_m)
    target = _PROGRAMS_PER_SM * sm_count

    def block_n(n: int) -> int:
        return 64 if _cdiv(n, 64) * row_blocks >= target else 32

    block_k = min(128, max(16, _next_pow2(min(hidden, inter))))
    down_n = block_n(hidden)
    split_k = 1
    while (
        split_k < _MAX_SPLIT_K
        and _cdiv(hidden, down_n) * row_blocks * split_k < target
        and inter >= 2 * split_k * block_k * 4  # keep >= 4 K steps per split
    ):
        split_k *= 2
    return BlockConfig(
        block_m=block_m,
        gate_up_block_n=block_n(inter),
        down_block_n=down_n,
        block_k=block_k,
        split_k=split_k,
        num_stages=4 if block_m <= 32 else 3,
    )


# ----------------------------------------------------------------------------------------------
# Kernels (defined only where triton imports).


if triton is not None:

    @triton.jit
    def _dot(a, b, acc, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _gate_up_kernel(
        x_ptr, w_ptr, act_ptr, pairs_ptr, block_expert_ptr,
        num_pairs, num_held, hidden, inter,
        stride_x, stride_we, stride_wn, stride_act,
        TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """Program (b, j): row block b (one expert's rows), activation columns j * BLOCK_N ...:
        act[rows, n] = silu(x[rows] @ gate[n]^T) * (x[rows] @ up[n]^T)."""
        b = tl.program_id(0)
        e = tl.load(block_expert_ptr + b)
        if e >= num_held:  # past the real blocks
            return
        rows = b.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] slots of the sorted layout
        pairs = tl.load(pairs_ptr + rows)  # [BM] (token, selection) pair; num_pairs = padding
        valid = pairs < num_pairs
        tokens = (pairs // TOP_K).to(tl.int64)  # [BM]
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        n_mask = n < inter
        kk = tl.arange(0, BLOCK_K)  # [BK]
        x_ptrs = x_ptr + tokens[:, None] * stride_x + kk[None, :]  # [BM, BK]
        g_ptrs = w_ptr + e.to(tl.int64) * stride_we + n.to(tl.int64)[None, :] * stride_wn + kk[:, None]  # [BK, BN]
        u_ptrs = g_ptrs + inter.to(tl.int64) * stride_wn  # the up rows follow the gate rows
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            if EVEN_K:
                a = tl.load(x_ptrs, mask=valid[:, None], other=0.0)  # [BM, BK]
                g = tl.load(g_ptrs, mask=n_mask[None, :], other=0.0)  # [BK, BN]
                u = tl.load(u_ptrs, mask=n_mask[None, :], other=0.0)
            else:
                k_mask = (k0 + kk) < hidden
                a = tl.load(x_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
                g = tl.load(g_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                u = tl.load(u_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc_g = _dot(a, g, acc_g, IEEE)
            acc_u = _dot(a, u, acc_u, IEEE)
            x_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # [BM, BN] float32; padding rows: 0
        act_ptrs = act_ptr + rows[:, None] * stride_act + n[None, :]
        tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=n_mask[None, :])

    @triton.jit
    def _down_kernel(
        act_ptr, w_ptr, out_ptr, pairs_ptr, block_expert_ptr, weights_ptr,
        num_pairs, num_held, hidden, inter, k_per_split,
        stride_act, stride_we, stride_wn, stride_out_split, stride_out,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """Program (b, j, s): row block b, output columns j * BLOCK_N ..., K slice s:
        out[s, pair, n] = weight[pair] * act[rows, K_s] @ down[n, K_s]^T (float32)."""
        b = tl.program_id(0)
        e = tl.load(block_expert_ptr + b)
        if e >= num_held:
            return
        rows = b.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        pairs = tl.load(pairs_ptr + rows)  # [BM]
        valid = pairs < num_pairs
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        n_mask = n < hidden
        k_start = tl.program_id(2) * k_per_split
        kk = k_start + tl.arange(0, BLOCK_K)  # [BK]
        a_ptrs = act_ptr + rows[:, None] * stride_act + kk[None, :]  # [BM, BK]; padding rows hold 0
        w_ptrs = w_ptr + e.to(tl.int64) * stride_we + n.to(tl.int64)[None, :] * stride_wn + kk[:, None]  # [BK, BN]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_per_split, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                w = tl.load(w_ptrs, mask=n_mask[None, :], other=0.0)
            else:
                k_mask = (kk + k0) < inter
                a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = _dot(a, w, acc, IEEE)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        weight = tl.load(weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)  # [BM]
        acc = acc * weight[:, None]
        out_ptrs = out_ptr + tl.program_id(2).to(tl.int64) * stride_out_split
        out_ptrs += pairs.to(tl.int64)[:, None] * stride_out + n[None, :]
        tl.store(out_ptrs, acc, mask=valid[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------------------------
# Host side


def _max_blocks(num_pairs: int, num_held: int, block_m: int) -> int:
    """Bound on sum over experts of ceil(count_e / block_m) for any routing of num_pairs rows."""
    return _cdiv(num_pairs, block_m) + min(num_held, num_pairs)


def _align(
    local: torch.Tensor, topk_ids: torch.Tensor, num_held: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the (token, selection) pairs by held expert into row blocks of block_m rows, without
    a host synchronisation. -> pairs [max_blocks * block_m + P] int32: the pair index of each
    slot (P on padding slots; slots past max_blocks * block_m hold the unheld pairs and are
    never read), block_expert [max_blocks] int32: the expert of each block, num_held past the
    real blocks."""
    num_pairs = topk_ids.numel()
    device = topk_ids.device
    max_blocks = _max_blocks(num_pairs, num_held, block_m)
    expert = local[topk_ids.reshape(-1)]  # [P] stack index, num_held when not held
    counts = torch.zeros(num_held + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, expert, torch.ones_like(expert))  # [E_h + 1]
    order = torch.argsort(expert, stable=True)  # [P] pairs grouped by expert
    sorted_expert = expert[order]  # [P]
    first = counts.cumsum(0) - counts  # [E_h + 1] first sorted position of each expert
    blocks = (counts[:num_held] + block_m - 1) // block_m  # [E_h]
    block_end = blocks.cumsum(0)  # [E_h]
    slot_start = torch.cat([block_end - blocks, block_end.new_full((1,), max_blocks)]) * block_m  # [E_h + 1]
    positions = torch.arange(num_pairs, device=device)  # [P]
    slots = slot_start[sorted_expert] + positions - first[sorted_expert]  # [P] distinct
    pairs = torch.full((max_blocks * block_m + num_pairs,), num_pairs, dtype=torch.int32, device=device)
    pairs[slots] = order.to(torch.int32)
    block_ids = torch.arange(max_blocks, device=device)  # [max_blocks]
    block_expert = torch.searchsorted(block_end, block_ids, right=True).to(torch.int32)  # [max_blocks]
    return pairs, block_expert


def moe_mlp(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    local: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    config: BlockConfig | None = None,
) -> torch.Tensor:
    """x [T, H], topk_ids [T, k] (logical expert ids; E marks padding), topk_weights [T, k],
    local [E + 1] int64 (logical id -> index in the stack, E_h when not held), gate_up
    [E_h, 2I, H] (gate rows, then up rows), down [E_h, H, I] -> y [T, H] in the dtype of x:
    y[t] = sum over t's selections of a held expert of weight * down_e(silu(gate_e x_t) * up_e x_t).
    `config` overrides default_config (tuning)."""
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    num_held, two_inter, w_hidden = gate_up.shape
    inter = two_inter // 2
    if x.dtype not in _FLOAT_DTYPES:
        raise ConfigError(f"moe_mlp takes float32, float16 or bfloat16 x, got {x.dtype}")
    if gate_up.dtype != x.dtype or down.dtype != x.dtype:
        raise ConfigError(f"expert weights must be {x.dtype}, got {gate_up.dtype} / {down.dtype}")
    if two_inter % 2 or w_hidden != hidden or tuple(down.shape) != (num_held, hidden, inter):
        raise ConfigError(f"gate_up {tuple(gate_up.shape)} / down {tuple(down.shape)} do not fit hidden {hidden}")
    if topk_ids.shape != (num_tokens, top_k) or topk_weights.shape != (num_tokens, top_k):
        raise ConfigError(f"topk_ids {tuple(topk_ids.shape)} / weights {tuple(topk_weights.shape)} are not [T, k]")
    if gate_up.stride(-1) != 1 or down.stride(-1) != 1:
        raise ConfigError("expert weights need a unit stride on their last dim")
    num_pairs = num_tokens * top_k
    if num_pairs == 0 or num_held == 0 or inter == 0:
        return torch.zeros_like(x)
    if x.stride(-1) != 1:
        x = x.contiguous()
    weights = topk_weights.reshape(-1)  # [P]
    if weights.stride(0) != 1:
        weights = weights.contiguous()
    device_index = None
    if x.is_cuda:
        device_index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    cfg = config or default_config(num_pairs, num_held, hidden, inter, _sm_count(device_index))
    ieee = x.dtype == torch.float32
    pairs, block_expert = _align(local, topk_ids, num_held, cfg.block_m)  # [slots], [max_blocks]
    max_blocks = block_expert.shape[0]
    act = torch.empty(max_blocks * cfg.block_m, inter, dtype=x.dtype, device=x.device)  # [slots, I]
    _gate_up_kernel[(max_blocks, _cdiv(inter, cfg.gate_up_block_n))](
        x, gate_up, act, pairs, block_expert,
        num_pairs, num_held, hidden, inter,
        x.stride(0), gate_up.stride(0), gate_up.stride(1), act.stride(0),
        TOP_K=top_k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.gate_up_block_n, BLOCK_K=cfg.block_k,
        EVEN_K=hidden % cfg.block_k == 0, IEEE=ieee, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    k_per_split = _cdiv(_cdiv(inter, cfg.split_k), cfg.block_k) * cfg.block_k
    out = torch.zeros(cfg.split_k, num_pairs, hidden, dtype=torch.float32, device=x.device)  # [S, P, H]
    _down_kernel[(max_blocks, _cdiv(hidden, cfg.down_block_n), cfg.split_k)](
        act, down, out, pairs, block_expert, weights,
        num_pairs, num_held, hidden, inter, k_per_split,
        act.stride(0), down.stride(0), down.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.down_block_n, BLOCK_K=cfg.block_k,
        EVEN_K=inter == cfg.split_k * k_per_split, IEEE=ieee,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    # fixed-order sums (no atomics): the same result every run
    y = out.view(cfg.split_k * num_tokens, top_k, hidden).sum(1)  # [S * T, H]
    return y.view(cfg.split_k, num_tokens, hidden).sum(0).to(x.dtype)  # [T, H]


# ----------------------------------------------------------------------------------------------
# Micro-benchmark (GPU)

MIXTRAL_8X7B = dict(num_experts=8, hidden=4096, inter=14336, top_k=2)
QWEN3_30B_A3B = dict(num_experts=128, hidden=2048, inter=768, top_k=8)
MODELS = {"mixtral-8x7b": MIXTRAL_8X7B, "qwen3-30b-a3b": QWEN3_30B_A3B}


def bench(
    num_tokens: int,
    *,
    num_experts: int,
    hidden: int,
    inter: int,
    top_k: int,
    copies: int = 4,
    calls: int = 10,
    replays: int = 3,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    device: torch.device | str = "cuda",
    config: BlockConfig | None = None,
) -> dict:
    """moe_mlp vs the torch grouped path (FFNSide._grouped with the fused SiLU-and-multiply) at
    `num_tokens` tokens routed uniformly at random, every expert held. Each side: `calls` calls
    in one CUDA graph, call i over weight copy i % copies (distinct layers' weights, so reads
    come from HBM, not L2). -> dict: num_tokens, experts_touched, weight_bytes (of the touched
    experts, per call), moe_s, torch_s (seconds per call), moe_bytes_per_s, torch_bytes_per_s,
    speedup, max_abs_diff (moe_mlp vs torch on copy 0)."""
    from afkv.model.sides import FFNSide, _Stacked, fused_ops  # bench only: ops never import the model
    from afkv.ops.triton_fused import graph_time_s

    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    local = torch.arange(num_experts + 1, device=device)  # [E + 1]: every expert held
    layers = [
        _Stacked(
            torch.empty(num_experts, 2 * inter, hidden, dtype=dtype, device=device).normal_(0, 0.02, generator=gen),
            torch.empty(num_experts, hidden, inter, dtype=dtype, device=device).normal_(0, 0.02, generator=gen),
            local,
        )
        for _ in range(copies)
    ]
    x = torch.randn(num_tokens, hidden, generator=gen, device=device).to(dtype)  # [T, H]
    logits = torch.randn(num_tokens, num_experts, generator=gen, device=device)  # [T, E]
    topk_weights, topk_ids = torch.softmax(logits, -1).topk(top_k, -1)  # [T, k] each
    touched = len(set(topk_ids.flatten().tolist()))
    weight_bytes = touched * 3 * hidden * inter * torch.finfo(dtype).bits // 8
    tf = fused_ops(device)
    moe_fns = [
        functools.partial(moe_mlp, x, topk_ids, topk_weights, st.local, st.gate_up, st.down, config)
        for st in (layers[i % copies] for i in range(calls))
    ]
    torch_fns = [
        functools.partial(FFNSide._grouped, st, x, topk_ids, topk_weights, tf)
        for st in (layers[i % copies] for i in range(calls))
    ]
    diff = float((moe_fns[0]().float() - torch_fns[0]().float()).abs().max())
    moe_s = graph_time_s(moe_fns, replays)
    torch_s = graph_time_s(torch_fns, replays)
    return {
        "num_tokens": num_tokens,
        "experts_touched": touched,
        "weight_bytes": weight_bytes,
        "moe_s": moe_s,
        "torch_s": torch_s,
        "moe_bytes_per_s": weight_bytes / moe_s,
        "torch_bytes_per_s": weight_bytes / torch_s,
        "speedup": torch_s / moe_s,
        "max_abs_diff": diff,
    }


def main(argv: list[str] | None = None) -> None:
    """python -m afkv.ops.triton_moe: moe_mlp vs the torch grouped path, Mixtral-8x7B and Qwen3-30B-A3B shapes."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 128, 256])
    parser.add_argument("--copies", type=int, default=4, help="weight copies cycled through (layers)")
    parser.add_argument("--calls", type=int, default=10, help="calls captured in one CUDA graph")
    parser.add_argument("--replays", type=int, default=3)
    parser.add_argument("--config", type=int, nargs=5, metavar=("BM", "GU_BN", "DOWN_BN", "BK", "SPLIT_K"),
                        help="override default_config (tuning)")  # fmt: skip
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if not available():
        raise SystemExit("needs triton and a CUDA device")
    config = BlockConfig(*args.config) if args.config else None
    print(f"{torch.cuda.get_device_name()}  triton {triton.__version__}  torch {torch.__version__}")
    print(f"bfloat16; per call, both sides in CUDA graphs of {args.calls} calls over {args.copies} weight copies")
    print(f"{'model':<15}{'T':>5}{'experts':>8}{'MB':>8}{'moe us':>10}{'torch us':>10}{'moe TB/s':>9}"
          f"{'torch TB/s':>11}{'speedup':>8}{'max|diff|':>10}")  # fmt: skip
    rows = []
    for name in args.models:
        for num_tokens in args.tokens:
            row = bench(num_tokens, **MODELS[name], copies=args.copies, calls=args.calls, replays=args.replays,
                        config=config)  # fmt: skip
            rows.append({"model": name, **row})
            print(
                f"{name:<15}{num_tokens:>5}{row['experts_touched']:>8}{row['weight_bytes'] / 1e6:>8.0f}"
                f"{row['moe_s'] * 1e6:>10.1f}{row['torch_s'] * 1e6:>10.1f}{row['moe_bytes_per_s'] / 1e12:>9.2f}"
                f"{row['torch_bytes_per_s'] / 1e12:>11.2f}{row['speedup']:>8.2f}{row['max_abs_diff']:>10.2e}"
            )
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
