#!/usr/bin/env bash
# Issue 13 on one GPU, in one command (a phase of gpu_session.sh): the streaming GPU tests, then
# `afkv bench long-context` on Qwen3-30B-A3B shapes (decode of 1 x 1M and 8 x 128k tokens with 75%
# of the KV in host memory, int4 / int8 / bf16 host blocks, each format at the longest of those
# contexts its blocks fit in the page-locked host region; against the pinned-H2D bound and the
# all-device run where it fits; prefill of a prompt 4x the device tier).
#
#   afkv/bench/long_context_gpu.sh OUT
#
# Run from the repository root with it on PYTHONPATH. Phase limits (seconds, environment): TESTS_S
# (70: the first Triton compiles happen here), BENCH_S (160); WORKLOADS, FORMATS, PREFILL, HOST_GIB
# (cap on the host region; default: the available memory less 32 GiB) override the bench's defaults.
# Every phase writes its log (the bench its JSON after each row: a run cut at its limit keeps
# what it measured) under OUT; the summary comes last.
set -u
OUT=${1:?usage: long_context_gpu.sh OUT}
mkdir -p "$OUT"
start=$SECONDS
phase() { echo "== $1 ($((SECONDS - start)) s)"; }
# a phase whose limit is 0 is skipped (timeout 0 would mean no limit)
timeout() { if [ "$1" = 0 ]; then echo "   skipped"; return 0; fi; command timeout "$@"; }

phase "GPU tests (streaming)"
timeout "${TESTS_S:-70}" python3 -m pytest -v -p no:cacheprovider -m gpu tests/kv/test_stream_gpu.py \
    >"$OUT/tests.txt" 2>&1
tail -n 3 "$OUT/tests.txt"

phase "afkv bench long-context"
timeout "${BENCH_S:-160}" python3 -m afkv.cli bench long-context --device cuda --model random:qwen3-30b-a3b \
    --workloads "${WORKLOADS:-1x1048576,8x131072}" --formats "${FORMATS:-int4,int8,none}" \
    ${HOST_GIB:+--host-gib "$HOST_GIB"} --prefill "${PREFILL:-32768,8192,2048}" --json "$OUT/long-context.json" \
    >"$OUT/bench.txt" 2>&1
echo "   exit $?"

phase "summary"
grep -E "passed|failed|FAILED|ERROR" "$OUT/tests.txt" | tail -n 12
cat "$OUT/bench.txt" | tail -n 40
