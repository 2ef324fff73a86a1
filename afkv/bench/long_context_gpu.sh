#!/usr/bin/env bash
# Issue 13 on one GPU, in one command (a phase of gpu_session.sh): the streaming GPU tests, then
# `afkv bench long-context` on Qwen3-30B-A3B shapes: decode of 1 x 1M and 8 x 128k tokens with 75%
# of the KV in host memory, int4 / int8 / bf16 host blocks, each format at the longest of those
# contexts its blocks fit in the page-locked host region, against the pinned-H2D bound and the
# all-device run where it fits; then, as its own phase, the prefill of a 256k prompt on a 32k-token
# device tier (87.5% of its KV ends on the host) in 16k chunks, through the Triton prefill partials.
#
#   afkv/bench/long_context_gpu.sh OUT
#
# Run from the repository root with it on PYTHONPATH. Phase limits (seconds, environment): TESTS_S
# (150: the first Triton compiles happen here; PYTEST_ARGS="-n 8" spreads them over pytest-xdist
# workers), BENCH_S (160: the decode rows), PREFILL_S (240: the prefill row; a 256k prompt is
# ~2.7e16 FLOP of attention, ~110 s at 250 TFLOP/s; each step's progress is logged); 0 skips a phase.
# WORKLOADS, FORMATS, HOST_GIB (cap on the host region; default: the available memory less 32 GiB)
# override the decode rows' defaults; PREFILL (PROMPT,DEVICE_TOKENS,CHUNK) and PREFILL_FORMAT (none,
# fp8, int8, int4) the prefill row's (PREFILL=0: none). The prefill row alone: TESTS_S=0 BENCH_S=0.
# Every phase writes its log (the bench its JSON after each row: a run cut at its limit keeps
# what it measured) under OUT; the summary comes last.
set -u
OUT=${1:?usage: long_context_gpu.sh OUT}
mkdir -p "$OUT"
start=$SECONDS
phase() { echo "== $1 ($((SECONDS - start)) s)"; }
# a phase whose limit is 0 is skipped (timeout 0 would mean no limit)
timeout() { if [ "$1" = 0 ]; then echo "   skipped"; return 0; fi; command timeout "$@"; }

phase "GPU tests (streaming; the prefill and decode partials)"
timeout "${TESTS_S:-150}" python3 -m pytest -v -p no:cacheprovider ${PYTEST_ARGS:-} -m gpu tests/kv/test_stream_gpu.py \
    tests/ops/test_triton_attention.py -k "stream or partial" >"$OUT/tests.txt" 2>&1
tail -n 3 "$OUT/tests.txt"

phase "afkv bench long-context (decode rows)"
timeout "${BENCH_S:-160}" python3 -m afkv.cli bench long-context --device cuda --model random:qwen3-30b-a3b \
    --workloads "${WORKLOADS:-1x1048576,8x131072}" --formats "${FORMATS:-int4,int8,none}" \
    ${HOST_GIB:+--host-gib "$HOST_GIB"} --prefill 0 --json "$OUT/long-context.json" >"$OUT/bench.txt" 2>&1
echo "   exit $?"

phase "afkv bench long-context (prefill row)"
[ "${PREFILL:-}" = 0 ] && PREFILL_S=0  # PREFILL=0: no prefill row (gpu_verify.sh)
timeout "${PREFILL_S:-240}" python3 -m afkv.cli bench long-context --device cuda --model random:qwen3-30b-a3b \
    --workloads 0 --prefill "${PREFILL:-262144,32768,16384}" --prefill-format "${PREFILL_FORMAT:-none}" \
    --json "$OUT/long-context-prefill.json" >"$OUT/prefill.txt" 2>&1
echo "   exit $?"

phase "summary"
grep -E "passed|failed|FAILED|ERROR" "$OUT/tests.txt" | tail -n 12
tail -n 40 "$OUT/bench.txt" 2>/dev/null
tail -n 12 "$OUT/prefill.txt" 2>/dev/null
