"""afkv.ops.triton_moe.moe_mlp against a plain per-expert reference and the torch grouped path
(FFNSide._grouped); with FP8 weights against afkv.ops.fp8.moe_mlp_reference.

Skipped without triton (the CPU CI has none). With triton and no GPU, the kernels run on CPU
tensors under Triton's interpreter (TRITON_INTERPRET=1, set here before the module is
imported) in float32 (the interpreter's tl.dot is wrong on 16-bit inputs); with a GPU they run
compiled on CUDA in bfloat16 (marked gpu), at real Mixtral / Qwen3 shapes and in a CUDA graph.

Tolerances, as a fraction of the reference's largest magnitude max|ref|:
  float32 (interpreter, IEEE dot): 1e-5 against a float64 reference (measured <= 3e-7).
  bfloat16 (GPU): 1e-2 against a float32 reference, 1.5e-2 against the torch grouped path.
    moe_mlp rounds once where bfloat16 enters (the activations) and at the end; a float32
    simulation of that rounding gives 2.8e-3, the torch grouped path 6.2e-3 (it also rounds
    gate_up, each selection's output and each partial sum), on [8 x 1024/512] experts, T 64.
    (Each selection's weighted output is rounded to bfloat16 before the sum, as the torch
    grouped path rounds it.)
  FP8 weights (e4m3, 128 x 128 block scales) against the torch reference of the FP8 path, which
    quantizes the activations per 128-column group as the kernel does: interpreter, float32 x,
    1e-5 (measured 6e-7: the same fp8 operands, float32 sums in another order); GPU, bfloat16 x,
    2e-2 (the reference keeps each selection's output in float32, the kernel rounds it to
    bfloat16, and a quotient next to an fp8 rounding boundary may round the other way).
    The interpreter's float32 -> fp8 cast loses the carry into the exponent (7.9998 -> 4.0,
    Triton 3.6 and 3.7): under it the kernel rounds to the e4m3 grid itself before the cast.
    Every fp8_mode meets the same bounds: "tile" and "once" against the reference above (the
    same quantized operands; "once" quantizes the down GEMM's input from float32 where gate_up's
    epilogue does it, not from its bfloat16 rounding), "dequant" against the reference with
    unquantized activations (its weights rounded to bfloat16 after scaling on the GPU).
Rows of unheld and padding selections contribute exactly zero; results equal bit for bit run to run
(except with BlockConfig.atomic_combine, whose float32 sums have no fixed order: its tests check
the bounds above).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernels are defined (at import)
pytest.importorskip("triton")

from afkv.model.sides import FFNSide, _Stacked  # noqa: E402
from afkv.ops import fp8  # noqa: E402
from afkv.ops import triton_moe as tm  # noqa: E402

if not _CUDA and not type(tm._gate_up_kernel).__name__.startswith("Interpreted"):
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1 was set: run with TRITON_INTERPRET=1", allow_module_level=True
    )

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(_CUDA, reason="the interpreter runs only where CUDA is absent")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not _CUDA, reason="needs a CUDA GPU")]),
]


def _dtype(device: str) -> torch.dtype:
    return torch.float32 if device == "cpu" else torch.bfloat16


def _problem(num_experts, held, hidden, inter, top_k, num_tokens, device, seed=0, padding=0.0, scale=1.0):
    """Random experts (only `held` of num_experts stacked), routing with distinct ids per token,
    a fraction `padding` of selections set to the padding id num_experts."""
    gen = torch.Generator().manual_seed(seed)
    dtype = _dtype(device)
    num_held = len(held)
    gate_up = torch.randn(num_held, 2 * inter, hidden, generator=gen) * (scale / hidden**0.5)  # [E_h, 2I, H]
    down = torch.randn(num_held, hidden, inter, generator=gen) * (scale / inter**0.5)  # [E_h, H, I]
    x = torch.randn(num_tokens, hidden, generator=gen)  # [T, H]
    topk_ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])  # [T, k]
    topk_ids = topk_ids.reshape(num_tokens, top_k)
    pad = torch.rand(num_tokens, top_k, generator=gen) < padding
    topk_ids = torch.where(pad, torch.full_like(topk_ids, num_experts), topk_ids)
    topk_weights = torch.softmax(torch.randn(num_tokens, top_k, generator=gen), -1)  # [T, k] float32
    local = torch.full((num_experts + 1,), num_held, dtype=torch.int64)  # [E + 1]
    local[torch.tensor(sorted(held), dtype=torch.int64)] = torch.arange(num_held)
    to = dict(device=device)
    return (
        x.to(dtype).to(**to), topk_ids.to(**to), topk_weights.to(**to), local.to(**to),
        gate_up.to(dtype).to(**to), down.to(dtype).to(**to),
    )  # fmt: skip


def _reference(x, topk_ids, topk_weights, local, gate_up, down, dtype=torch.float64) -> torch.Tensor:
    """Plain per-expert loop in `dtype` -> [T, H]."""
    num_held, two_inter, _ = gate_up.shape
    inter = two_inter // 2
    expert = local[topk_ids]  # [T, k]
    y = torch.zeros(x.shape, dtype=dtype, device=x.device)
    for e in range(num_held):
        tokens, slots = (expert == e).nonzero(as_tuple=True)  # [n] each
        if tokens.numel() == 0:
            continue
        h = x[tokens].to(dtype) @ gate_up[e].to(dtype).T  # [n, 2I]
        act = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]  # [n, I]
        out = act @ down[e].to(dtype).T * topk_weights[tokens, slots, None].to(dtype)  # [n, H]
        y.index_add_(0, tokens, out)
    return y


def _check(y, args, device) -> None:
    x = args[0]
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    if device == "cpu":
        want = _reference(*args)
        scale = float(want.abs().max())
        err = float((y.double() - want).abs().max())
        assert err <= 1e-5 * scale, f"{err / scale:.2e} x max|ref|"
    else:
        want = _reference(*args, dtype=torch.float32)
        scale = float(want.abs().max())
        err = float((y.float() - want).abs().max())
        assert err <= 1e-2 * scale, f"{err / scale:.2e} x max|ref|"
    x, topk_ids, topk_weights, local, gate_up, down = args
    grouped = FFNSide._grouped(_Stacked(gate_up, down, local), x, topk_ids, topk_weights)
    diff = float((y.double() - grouped.double()).abs().max())
    tol = 1e-5 if device == "cpu" else 1.5e-2
    assert diff <= tol * scale, f"{diff / scale:.2e} x max|ref| vs grouped"


CASES = {  # name -> (num_experts, held, hidden, inter, top_k, num_tokens, padding)
    "tiny-T1": (4, range(4), 64, 32, 2, 1, 0.0),
    "tiny-T5": (4, range(4), 64, 32, 2, 5, 0.0),
    "tiny-T33": (4, range(4), 64, 32, 2, 33, 0.0),
    "partially-held": (4, (0, 2), 64, 32, 2, 33, 0.0),
    "padding": (4, range(4), 64, 32, 2, 17, 0.3),
    "held-and-padding": (8, (1, 4, 5), 64, 32, 2, 20, 0.25),
    "qwen3-like": (16, range(16), 64, 32, 4, 24, 0.0),
    "ragged-K": (4, range(4), 80, 48, 2, 9, 0.0),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_reference(device, case):
    num_experts, held, hidden, inter, top_k, num_tokens, padding = case
    args = _problem(num_experts, tuple(held), hidden, inter, top_k, num_tokens, device, padding=padding)
    _check(tm.moe_mlp(*args), args, device)


CONFIGS = {
    "split-k": tm.BlockConfig(block_m=16, gate_up_block_n=16, down_block_n=16, block_k=16, split_k=2),
    "split-k-ragged": tm.BlockConfig(block_m=16, gate_up_block_n=32, down_block_n=16, block_k=16, split_k=4),
    "block-m-32": tm.BlockConfig(block_m=32, gate_up_block_n=16, down_block_n=32, block_k=32, split_k=1),
    "atomic-combine": tm.BlockConfig(block_m=16, gate_up_block_n=16, down_block_n=32, block_k=16, split_k=1,
                                     atomic_combine=True),
    "atomic-combine-split-k": tm.BlockConfig(block_m=16, gate_up_block_n=32, down_block_n=16, block_k=16, split_k=4,
                                             atomic_combine=True),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_block_configs(device, config):
    args = _problem(8, (0, 1, 3, 6, 7), 64, 80, 2, 40, device, seed=1, padding=0.1)
    _check(tm.moe_mlp(*args, config=config), args, device)


@pytest.mark.parametrize("device", DEVICES)
def test_unheld_and_padding_are_exact_zero(device):
    x, topk_ids, topk_weights, local, gate_up, down = _problem(6, (0, 1), 64, 32, 2, 7, device)
    topk_ids = torch.tensor([[2, 3], [6, 4], [5, 6], [0, 6], [3, 1], [6, 6], [2, 0]], device=device)
    y = tm.moe_mlp(x, topk_ids, topk_weights, local, gate_up, down)
    none_held = [0, 1, 2, 5]
    assert (y[none_held] == 0).all()
    _check(y, (x, topk_ids, topk_weights, local, gate_up, down), device)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    args = _problem(8, range(8), 64, 32, 2, 33, device, seed=2)
    assert torch.equal(tm.moe_mlp(*args), tm.moe_mlp(*args))


def _check_align(local, topk_ids, num_held, block_m) -> None:
    """Every held pair sits in exactly one slot of a block of its expert, in pair order within
    it; each expert has ceil(count / block_m) blocks, in expert order; padding slots hold P;
    blocks past the real ones name no expert."""
    pairs, block_expert = tm._align(local, topk_ids, num_held, block_m)
    pairs, block_expert = pairs.cpu(), block_expert.cpu()
    num_pairs = topk_ids.numel()
    max_blocks = tm._max_blocks(num_pairs, num_held, block_m)
    assert block_expert.shape == (max_blocks,) and pairs.shape == (max_blocks * block_m,)
    expert = local.cpu()[topk_ids.cpu().flatten()]
    counts = torch.bincount(expert, minlength=num_held + 1)[:num_held]
    blocks = (counts + block_m - 1) // block_m
    real = int(blocks.sum())
    want_experts = torch.repeat_interleave(torch.arange(num_held), blocks)
    assert torch.equal(block_expert[:real].long(), want_experts)
    assert (block_expert[real:] == num_held).all()
    for e in range(num_held):
        start = int(blocks[:e].sum()) * block_m
        rows = pairs[start : start + int(blocks[e]) * block_m].long()
        held_pairs = (expert == e).nonzero().flatten()
        assert torch.equal(rows[: int(counts[e])], held_pairs)
        assert (rows[int(counts[e]) :] == num_pairs).all()


def test_align_blocks():
    local = torch.tensor([0, 3, 1, 2, 3])  # expert 1 not held; id 4 = padding
    topk_ids = torch.tensor([[0, 2], [2, 3], [1, 2], [4, 0], [2, 3], [2, 2]])
    _check_align(local, topk_ids, 3, 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_tokens,top_k,num_experts,held,block_m", [
    (1, 8, 128, 128, 16),  # decode: one program
    (700, 2, 8, 5, 16),  # 1400 pairs: two programs, each places its chunk after the other's
    (1500, 4, 16, 16, 64),  # 6000 pairs, 6 programs
    (300, 1, 4, 1, 128),  # one held expert
])
def test_align_blocks_multi_program(device, num_tokens, top_k, num_experts, held, block_m):
    gen = torch.Generator().manual_seed(num_tokens)
    topk_ids = torch.stack([torch.randperm(num_experts + 1, generator=gen)[:top_k] for _ in range(num_tokens)])
    kept = torch.randperm(num_experts, generator=gen)[:held].sort().values
    local = torch.full((num_experts + 1,), held, dtype=torch.int64)
    local[kept] = torch.arange(held)
    _check_align(local.to(device), topk_ids.to(device), held, block_m)


def test_config_is_validated():
    with pytest.raises(tm.ConfigError):
        tm.BlockConfig(block_m=8, gate_up_block_n=32, down_block_n=32, block_k=64, split_k=1)


# ----------------------------------------------------------------------------------------------
# GPU: real shapes and CUDA graphs

REAL = {  # name -> (num_experts, hidden, inter, top_k, num_tokens)
    "mixtral-T16": (8, 4096, 14336, 2, 16),
    "mixtral-T128": (8, 4096, 14336, 2, 128),
    "qwen3-T64": (128, 2048, 768, 8, 64),
}


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", REAL.values(), ids=REAL.keys())
def test_real_shapes(case):
    num_experts, hidden, inter, top_k, num_tokens = case
    gen = torch.Generator(device="cuda").manual_seed(0)
    dtype = torch.bfloat16
    gate_up = torch.empty(num_experts, 2 * inter, hidden, dtype=dtype, device="cuda")  # [E, 2I, H]
    gate_up.normal_(0, hidden**-0.5, generator=gen)
    down = torch.empty(num_experts, hidden, inter, dtype=dtype, device="cuda").normal_(0, inter**-0.5, generator=gen)
    x = torch.randn(num_tokens, hidden, generator=gen, device="cuda").to(dtype)
    logits = torch.randn(num_tokens, num_experts, generator=gen, device="cuda")  # [T, E]
    topk_weights, topk_ids = torch.softmax(logits, -1).topk(top_k)  # [T, k] each
    local = torch.arange(num_experts + 1, device="cuda")
    args = (x, topk_ids, topk_weights, local, gate_up, down)
    _check(tm.moe_mlp(*args), args, "cuda")
    default = tm.default_config(num_tokens * top_k, num_experts, hidden, inter, tm.sm_count(0))
    _check(tm.moe_mlp(*args, config=dataclasses.replace(default, atomic_combine=True)), args, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_replay_with_changed_inputs():
    num_experts, hidden, inter, top_k, num_tokens = 16, 512, 256, 4, 24
    held = (0, 2, 3, 5, 8, 9, 11, 15)
    shape = (num_experts, held, hidden, inter, top_k, num_tokens)
    x, topk_ids, topk_weights, local, gate_up, down = _problem(*shape, "cuda")
    tm.moe_mlp(x, topk_ids, topk_weights, local, gate_up, down)  # compile outside the capture
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        tm.moe_mlp(x, topk_ids, topk_weights, local, gate_up, down)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = tm.moe_mlp(x, topk_ids, topk_weights, local, gate_up, down)
    for seed in (1, 2, 3):
        x2, ids2, w2, _, _, _ = _problem(*shape, "cuda", seed=seed, padding=0.2)
        if seed == 3:  # every selection on one expert: one expert takes all blocks
            ids2 = torch.full_like(ids2, held[1])
        x.copy_(x2), topk_ids.copy_(ids2), topk_weights.copy_(w2)
        graph.replay()
        torch.cuda.synchronize()
        want = tm.moe_mlp(x, topk_ids, topk_weights, local, gate_up, down)
        assert torch.equal(y, want)
        _check(y.clone(), (x, topk_ids, topk_weights, local, gate_up, down), "cuda")


# ----------------------------------------------------------------------------------------------
# FP8 weights


def _fp8_problem(num_experts, held, hidden, inter, top_k, num_tokens, device, seed=0, padding=0.0):
    """_problem with the experts quantized to fp8 (gate and up blocks apart) -> args of moe_mlp."""
    x, topk_ids, topk_weights, local, gate_up, down = _problem(
        num_experts, held, hidden, inter, top_k, num_tokens, "cpu", seed=seed, padding=padding)
    gate = [fp8.quantize_blocks(w[:inter]) for w in gate_up]
    up = [fp8.quantize_blocks(w[inter:]) for w in gate_up]
    dn = [fp8.quantize_blocks(w) for w in down]
    gu_q = torch.stack([torch.cat([g[0], u[0]]) for g, u in zip(gate, up)])
    gu_s = torch.stack([torch.cat([g[1], u[1]]) for g, u in zip(gate, up)])
    dn_q, dn_s = torch.stack([q for q, _ in dn]), torch.stack([s for _, s in dn])
    to = dict(device=device)
    return (x.to(_dtype(device)).to(**to), topk_ids.to(**to), topk_weights.to(**to), local.to(**to),
            gu_q.to(**to), dn_q.to(**to), gu_s.to(**to), dn_s.to(**to))


def _check_fp8(y, args, device, mode: str = "tile") -> None:
    x, topk_ids, topk_weights, local, gu_q, dn_q, gu_s, dn_s = args
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    want = fp8.moe_mlp_reference(x.float(), topk_ids, topk_weights, local, gu_q, gu_s, dn_q, dn_s,
                                 quantize_activations=mode != "dequant")
    scale = float(want.abs().max())
    err = float((y.float() - want).abs().max())
    assert err <= (1e-5 if device == "cpu" else 2e-2) * scale, f"{err / scale:.2e} x max|ref|"


FP8_CASES = {  # name -> (num_experts, held, hidden, inter, top_k, num_tokens, padding)
    "T1": (4, range(4), 256, 128, 2, 1, 0.0),
    "T13": (4, range(4), 256, 256, 2, 13, 0.0),
    "ragged": (6, range(6), 192, 160, 2, 21, 0.0),  # H and I not multiples of 128: partial blocks
    "held-and-padding": (8, (1, 4, 5), 128, 128, 2, 20, 0.25),
    "tiny": (8, range(8), 64, 32, 2, 9, 0.0),  # one block per matrix, one group per row
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", FP8_CASES.values(), ids=FP8_CASES.keys())
def test_fp8_matches_reference(device, case):
    num_experts, held, hidden, inter, top_k, num_tokens, padding = case
    args = _fp8_problem(num_experts, tuple(held), hidden, inter, top_k, num_tokens, device, padding=padding)
    _check_fp8(tm.moe_mlp(*args), args, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["once", "dequant"])
@pytest.mark.parametrize("case", FP8_CASES.values(), ids=FP8_CASES.keys())
def test_fp8_modes_match_reference(device, mode, case):
    """The mode's default tiles: activations quantized once per call / weights dequantized."""
    num_experts, held, hidden, inter, top_k, num_tokens, padding = case
    args = _fp8_problem(num_experts, tuple(held), hidden, inter, top_k, num_tokens, device, padding=padding)
    cfg = tm.default_config(num_tokens * top_k, len(held), hidden, inter, tm.sm_count(None), True, mode)  # as on CPU
    assert cfg.fp8_mode == mode
    _check_fp8(tm.moe_mlp(*args, config=cfg), args, device, mode)


FP8_CONFIGS = {
    "split-k": tm.BlockConfig(block_m=16, gate_up_block_n=16, down_block_n=16, block_k=128, split_k=2),
    "wide-n": tm.BlockConfig(block_m=32, gate_up_block_n=256, down_block_n=256, block_k=128, split_k=1),
    "block-m-128": tm.BlockConfig(block_m=128, gate_up_block_n=64, down_block_n=32, block_k=128, split_k=1),
    # activations quantized once: gate_up's epilogue writes the fp8 input of the down GEMM (BLOCK_N
    # a multiple of 128; 256 over I = 320: a partial group), or the quantize launch does (BLOCK_N 64)
    "once-epilogue": tm.BlockConfig(block_m=32, gate_up_block_n=256, down_block_n=64, block_k=128, split_k=1,
                                    fp8_mode="once"),
    "once-epilogue-split-k": tm.BlockConfig(block_m=16, gate_up_block_n=128, down_block_n=32, block_k=128,
                                            split_k=2, fp8_mode="once"),
    "once-apart": tm.BlockConfig(block_m=64, gate_up_block_n=64, down_block_n=128, block_k=128, split_k=1,
                                 fp8_mode="once"),
    "dequant-split-k": tm.BlockConfig(block_m=16, gate_up_block_n=32, down_block_n=16, block_k=128, split_k=2,
                                      fp8_mode="dequant"),
    "once-atomic-combine": tm.BlockConfig(block_m=32, gate_up_block_n=128, down_block_n=64, block_k=128, split_k=2,
                                          fp8_mode="once", atomic_combine=True),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", FP8_CONFIGS.values(), ids=FP8_CONFIGS.keys())
def test_fp8_block_configs(device, config):
    args = _fp8_problem(8, (0, 1, 3, 6, 7), 384, 320, 2, 40, device, seed=1, padding=0.1)
    _check_fp8(tm.moe_mlp(*args, config=config), args, device, config.fp8_mode)


def test_fp8_once_quantizes_x_as_the_reference():
    """The quantize launch of fp8_mode "once" gives the values and scales of fp8.quantize_groups
    (a partial last group, rows past a power of two)."""
    x = torch.randn(37, 200, generator=torch.Generator().manual_seed(3)) * 5
    x[4] = 0.0  # an all-zero row: the floor scale, zeros
    q, scale = tm._quantize(x, exact_cast=True)
    assert q.dtype == fp8.FP8 and scale.shape == (37, 2)
    deq = q.float() * scale.repeat_interleave(128, 1)[:, :200]  # [37, 200]
    assert torch.equal(deq, fp8.quantize_groups(x))
    assert (q[4].float() == 0).all()


def test_fp8_mode_is_validated():
    with pytest.raises(tm.ConfigError, match="fp8_mode"):
        tm.BlockConfig(block_m=16, gate_up_block_n=16, down_block_n=16, block_k=128, split_k=1, fp8_mode="fast")


def test_fp8_misuse_is_a_config_error():
    x, ids, w, local, gu_q, dn_q, gu_s, dn_s = _fp8_problem(4, range(4), 128, 128, 2, 3, "cpu")
    with pytest.raises(tm.ConfigError, match="block_k"):
        tm.moe_mlp(x, ids, w, local, gu_q, dn_q, gu_s, dn_s,
                   config=tm.BlockConfig(block_m=16, gate_up_block_n=16, down_block_n=16, block_k=64, split_k=1))
    with pytest.raises(tm.ConfigError, match="scale"):
        tm.moe_mlp(x, ids, w, local, gu_q, dn_q)
    with pytest.raises(tm.ConfigError, match="scales must be"):
        tm.moe_mlp(x, ids, w, local, gu_q, dn_q, gu_s[:, :1], dn_s)


FP8_REAL = {**REAL, "qwen3-T2048": (128, 2048, 768, 8, 2048)}  # + the compute regime (128 rows per expert)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", FP8_REAL.values(), ids=FP8_REAL.keys())
def test_fp8_real_shapes(case):
    """bf16 activations, fp8 experts quantized on the GPU, at Mixtral / Qwen3 shapes: every
    fp8_mode's default tiles, "once" on the tiles of "tile", and "once" with gate_up's BLOCK_N
    widened to 128 (its epilogue quantizes the down GEMM's input) where the default is narrower."""
    num_experts, hidden, inter, top_k, num_tokens = case
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate_up = torch.empty(num_experts, 2 * inter, hidden, device="cuda").normal_(0, hidden**-0.5, generator=gen)
    down = torch.empty(num_experts, hidden, inter, device="cuda").normal_(0, inter**-0.5, generator=gen)
    gate = [fp8.quantize_blocks(w[:inter]) for w in gate_up]
    up = [fp8.quantize_blocks(w[inter:]) for w in gate_up]
    dn = [fp8.quantize_blocks(w) for w in down]
    gu_q = torch.stack([torch.cat([g[0], u[0]]) for g, u in zip(gate, up)])
    gu_s = torch.stack([torch.cat([g[1], u[1]]) for g, u in zip(gate, up)])
    dn_q, dn_s = torch.stack([q for q, _ in dn]), torch.stack([s for _, s in dn])
    del gate_up, down, gate, up, dn
    x = torch.randn(num_tokens, hidden, generator=gen, device="cuda").to(torch.bfloat16)
    logits = torch.randn(num_tokens, num_experts, generator=gen, device="cuda")  # [T, E]
    topk_weights, topk_ids = torch.softmax(logits, -1).topk(top_k)  # [T, k] each
    local = torch.arange(num_experts + 1, device="cuda")
    args = (x, topk_ids, topk_weights, local, gu_q, dn_q, gu_s, dn_s)
    shape = (num_tokens * top_k, num_experts, hidden, inter, tm.sm_count(0), True)
    configs = [tm.default_config(*shape, mode) for mode in tm.FP8_MODES]
    configs.append(dataclasses.replace(configs[0], fp8_mode="once"))
    if configs[1].gate_up_block_n < 128:
        configs.append(dataclasses.replace(configs[1], gate_up_block_n=128))
    for cfg in dict.fromkeys(configs):
        _check_fp8(tm.moe_mlp(*args, config=cfg), args, "cuda", cfg.fp8_mode)
