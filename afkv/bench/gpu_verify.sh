#!/usr/bin/env bash
# The next GPU call, in one command (~580 s on one H100): every GPU test of one device (8 at a
# time: pytest-xdist), the quantized decode-kernel sweep, the MLA kernel with its tuning, the
# long-context bench without its prefill row, and the PD hand-off bench; everything lands in
# OUT/all.tgz (the device tool brings back at most 8 files) and the summary is printed.
#
#   afkv/bench/gpu_verify.sh OUT
#
# Run from the repository root with it and the carried wheels (pytest-asyncio, pytest-timeout,
# pytest-xdist, execnet) on PYTHONPATH. It checks what session 3 built without a GPU: the int4
# prefill at head_dim 64 (64-column code tiles), batch-invariant split-K (graph replay equals
# eager), streamed decode through the Triton kernels, the chunked MLA kernel, PD through CUDA IPC.
set -u
OUT=${1:?usage: gpu_verify.sh OUT}
work=$(mktemp -d)
export PYTEST_ARGS="${PYTEST_ARGS:--n 8}" KV_QUANT_ARGS="${KV_QUANT_ARGS:---sweep --capacity-context 0}"
export TESTS_S=0 MLA_S="${MLA_S:-85}" TUNE=1 V3_S="${V3_S:-0}" LONG_S="${LONG_S:-0}" V2_S="${V2_S:-0}" BENCH_S="${BENCH_S:-145}" PREFILL=0 HANDOFF_S="${HANDOFF_S:-100}"
# PHASES splits it over two device calls (each has 600 s), e.g. "tests=200 kv-quant=80 deepseek=100"
# then "long-context=150 pd=105"
bash afkv/bench/gpu_session.sh "$work/o" ${PHASES:-tests=200 kv-quant=70 deepseek=90 long-context=150 pd=105}
tar czf "$OUT/all.tgz" -C "$work" o
[ -f "$work/o/tests.txt" ] && grep -E "FAILED|ERROR" "$work/o/tests.txt" | head -n 30
true
