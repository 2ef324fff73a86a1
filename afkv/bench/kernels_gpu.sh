#!/usr/bin/env bash
# Issue 17 items 4-6 on one GPU, in one command: the kernels' GPU tests, the batch-1 TPOT of
# Qwen3-30B-A3B shapes before (a baseline tree, optional) and after, and the fused-MoE sweep
# (Mixtral-8x7B and Qwen3-30B-A3B shapes, 16..8192 tokens) with tuning points: at each point
# bf16, fp8 (fp8_mode tile, the default) and the candidate fp8 modes fp8-once (activations
# quantized once per call) and fp8-dequant (weights dequantized to bf16 in registers), in the
# same run, each fp8 row with its time against bf16 and the fp8-<mode> rows against fp8.
#
#   afkv/bench/kernels_gpu.sh OUT [BASELINE_TREE]
#
# Run from the repository root with it on PYTHONPATH. BASELINE_TREE: another checkout whose
# `afkv bench gpu` gives the "before" TPOT on the same machine (BASELINE_PYTHONPATH: its
# PYTHONPATH, default: none added). Each phase has its own time limit (seconds, environment:
# TESTS_S, BEFORE_S, DECODE_S, MOE_S) so that a slow phase cannot starve the others; every
# phase writes its JSON and log under OUT; the summary comes last. The sweep: MOE_TOKENS (default
# all), MOE_DTYPES (default bf16,fp8,fp8-once,fp8-dequant), TUNE (token counts to tune at),
# TUNE_DTYPES (default: every swept dtype). EXPERT_DTYPES: the decode phase's (auto and/or fp8).
set -u
OUT=${1:?usage: kernels_gpu.sh OUT [BASELINE_TREE]}
BASE=${2:-}
mkdir -p "$OUT"
start=$SECONDS
phase() { echo "== $1 ($((SECONDS - start)) s)"; }

phase "GPU tests"
timeout "${TESTS_S:-70}" python3 -m pytest -q -p no:cacheprovider tests/ops/test_triton_moe.py \
    -k "real_shapes or graph or multi_program or (fp8_matches and (ragged or padding)) or (fp8_modes and (ragged or padding)) or (fp8_block_configs and (once or dequant)) or (block_configs and atomic)" \
    tests/engine/test_graphs_gpu.py::test_triton_moe_matches_grouped_gemm_path >"$OUT/tests.txt" 2>&1
tail -n 2 "$OUT/tests.txt"

if [ -n "$BASE" ]; then
    phase "TPOT before (baseline tree)"
    (cd "$BASE" && PYTHONPATH="${BASELINE_PYTHONPATH:-}" timeout "${BEFORE_S:-60}" python3 -m afkv.cli bench gpu \
        --models qwen3-30b-a3b --batch-sizes 1 --no-hf --steps 10 --json "$OUT/before.json") >"$OUT/before.txt" 2>&1
    grep -E "TPOT|error" "$OUT/before.txt" | head -n 3
fi

phase "TPOT after, kernels per step"
timeout "${DECODE_S:-60}" python3 -m afkv.bench.kernels decode --model random:qwen3-30b-a3b --batch 1 \
    --steps 10 --expert-dtypes "${EXPERT_DTYPES:-auto}" --json "$OUT/decode.json" >"$OUT/decode.txt" 2>&1
grep -E "TPOT|Error" "$OUT/decode.txt" | head -n 4

phase "fused-MoE sweep"
MOE=${MOE_S:-120}
timeout "$((MOE + 30))" python3 -m afkv.bench.kernels moe --deadline-s "$MOE" --tune "${TUNE:-16,256,4096}" \
    --tokens "${MOE_TOKENS:-16,32,64,128,256,512,1024,2048,4096,8192}" \
    --dtypes "${MOE_DTYPES:-bf16,fp8,fp8-once,fp8-dequant}" --tune-dtypes "${TUNE_DTYPES:-}" \
    --json "$OUT/moe.json" >"$OUT/moe.txt" 2>&1

phase "summary"
tail -n 2 "$OUT/tests.txt"
if [ -n "$BASE" ]; then grep -E "qwen3-30b-a3b +\|" "$OUT/before.txt" | head -n 2; rm -f "$OUT/before.png"; fi
sed -n '/kernels per step/,$p' "$OUT/decode.txt" | head -n 14
grep -E "TPOT" "$OUT/decode.txt" | tail -n 2
sed -n '/HBM copy/,$p' "$OUT/moe.txt"
