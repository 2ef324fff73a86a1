#!/usr/bin/env bash
# Prefill/decode disaggregation on one GPU, in one call (~150 s): the GPU tests of PD, the KV
# hand-off benchmark (GB/s against the device -> pinned host -> device limit, last block -> first
# token against colocated TTFT) and the interference benchmark, each under its own time limit,
# logs and JSON under OUT.
#
#   afkv/bench/pd_gpu.sh OUT
#
# Run from the repository root with it on PYTHONPATH. TESTS_S, HANDOFF_S, ITL_S override the limits.
set -u
OUT=${1:?usage: pd_gpu.sh OUT}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
start=$SECONDS
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/machine.txt"

echo "== tests (at $((SECONDS - start)) s)"
timeout "${TESTS_S:-60}" python3 -m pytest -v -p no:cacheprovider -m gpu -rfE tests/nodes/test_prefill_decode_gpu.py \
    >"$OUT/tests.txt" 2>&1
echo "   exit $? after $((SECONDS - start)) s"

echo "== pd-handoff (at $((SECONDS - start)) s)"
timeout "${HANDOFF_S:-60}" python3 -m afkv.cli bench pd-handoff --prompt-lens 1024,4096,8000 \
    --json "$OUT/pd-handoff.json" >"$OUT/pd-handoff.txt" 2>&1
echo "   exit $? after $((SECONDS - start)) s"

echo "== pd (at $((SECONDS - start)) s)"
timeout "${ITL_S:-60}" python3 -m afkv.cli bench pd --streams 8 --prompt-len 2048 --interval-s 1 --duration-s 10 \
    --json "$OUT/pd.json" >"$OUT/pd.txt" 2>&1
echo "   exit $? after $((SECONDS - start)) s"

echo "== summary ($((SECONDS - start)) s)"
grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/tests.txt" | tail -n 20
tail -n 12 "$OUT/pd-handoff.txt"
tail -n 12 "$OUT/pd.txt"
