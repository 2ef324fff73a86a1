#!/usr/bin/env bash
# Issue 14 on one GPU, in one command (a phase of afkv/bench/gpu_session.sh): the DeepSeek GPU
# tests, the paged MLA decode kernel against the copy ceiling (FlashMLA's figures), latent bytes
# per token per format, and decode steps of DeepSeek-V3 cut to 8 layers (3 dense + 5 MoE,
# routed experts fp8) and DeepSeek-V2-Lite at 2k and 16k context, V2-Lite against HF generate.
#
#   afkv/bench/deepseek_gpu.sh OUT
#
# Run from the repository root with it on PYTHONPATH. Random weights in real shapes (nothing is
# downloaded). Each phase has its own time limit (seconds, environment: TESTS_S, MLA_S, V3_S,
# V3_LONG_S (V3 at 16k; 0 skips it, the default), LONG_S, V2_S) so a slow phase cannot starve the
# others; the HF phase is last, being the slowest. Every phase writes its log and JSON under OUT;
# the summary comes last. TUNE=1 also times the MLA kernel's candidate launches
# (triton_mla.CANDIDATE_TILES, each checked against float32 attention; tuning stops at two thirds
# of MLA_S, then the rows run with the winners): MLA_S=90 for it; MLA_MODELS (e.g.
# deepseek-v2-lite) narrows that phase to some models. About 200 s on one H100.
set -u
OUT=${1:?usage: deepseek_gpu.sh OUT}
mkdir -p "$OUT"
start=$SECONDS
phase() { echo "== $1 ($((SECONDS - start)) s)"; }
# a phase whose limit is 0 is skipped (timeout 0 would mean no limit)
timeout() { if [ "$1" = 0 ]; then echo "   skipped"; return 0; fi; command timeout "$@"; }

phase "GPU tests: Triton MLA decode (real shapes, graphs), the engine vs transformers, graphs vs eager"
timeout "${TESTS_S:-50}" python3 -m pytest -q -p no:cacheprovider -m gpu -rfE \
    tests/ops/test_triton_mla.py tests/model/test_deepseek_gpu.py >"$OUT/tests.txt" 2>&1
tail -n 2 "$OUT/tests.txt"

phase "MLA decode kernel: GB/s vs copy, TFLOP/s vs GEMM peak; latent bytes per token"
timeout "${MLA_S:-45}" python3 -m afkv.bench.kernels mla ${TUNE:+--tune 1 --deadline-s $(( ${MLA_S:-45} * 2 / 3 ))} --replays 5 \
    ${MLA_MODELS:+--mla-models "$MLA_MODELS"} --json "$OUT/mla.json" >"$OUT/mla.txt" 2>&1
tail -n 3 "$OUT/mla.txt"

phase "DeepSeek-V3 (8 layers, fp8 routed experts), context 2048"
timeout "${V3_S:-60}" python3 -m afkv.cli bench gpu --models deepseek-v3-8l --expert-dtype fp8 --no-hf \
    --batch-sizes 1,16,64,256 --context 2048 --steps 10 --json "$OUT/v3-8l-2k.json" >"$OUT/v3-8l-2k.txt" 2>&1
grep -E "TPOT|rror" "$OUT/v3-8l-2k.txt" | head -n 5

phase "DeepSeek-V3 (8 layers, fp8 routed experts), context 16384"
timeout "${V3_LONG_S:-0}" python3 -m afkv.cli bench gpu --models deepseek-v3-8l --expert-dtype fp8 --no-hf \
    --batch-sizes 1,16,64 --context 16384 --steps 10 --json "$OUT/v3-8l-16k.json" >"$OUT/v3-8l-16k.txt" 2>&1
grep -E "TPOT|rror" "$OUT/v3-8l-16k.txt" | head -n 4

phase "DeepSeek-V2-Lite, context 16384"
timeout "${LONG_S:-35}" python3 -m afkv.cli bench gpu --models deepseek-v2-lite --no-hf \
    --batch-sizes 1,16,64 --context 16384 --steps 10 --json "$OUT/v2-lite-16k.json" >"$OUT/v2-lite-16k.txt" 2>&1
grep -E "TPOT|rror" "$OUT/v2-lite-16k.txt" | head -n 4

phase "DeepSeek-V2-Lite, context 2048, against HF generate"
timeout "${V2_S:-75}" python3 -m afkv.cli bench gpu --models deepseek-v2-lite --hf-batch-sizes 1,16 \
    --batch-sizes 1,16,64,256 --context 2048 --steps 10 --json "$OUT/v2-lite-2k.json" >"$OUT/v2-lite-2k.txt" 2>&1
grep -E "TPOT|rror" "$OUT/v2-lite-2k.txt" | head -n 7

phase "summary"
tail -n 2 "$OUT/tests.txt"
sed -n '/MLA latent bytes/,$p' "$OUT/mla.txt"
for run in v3-8l-2k v3-8l-16k v2-lite-16k v2-lite-2k; do
    echo "-- $run"
    sed -n '/HBM copy/,$p' "$OUT/$run.txt" | grep -v "^afkv: wrote"
done
rm -f "$OUT"/*.png
