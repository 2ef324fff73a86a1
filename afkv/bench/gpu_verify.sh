#!/usr/bin/env bash
# The next GPU session, in three calls of one command each (each under 600 s on one H100):
#
#   CALL=a afkv/bench/gpu_verify.sh OUT   # ~530 s: every GPU test of one device (8 at a time:
#                                         # pytest-xdist), DeepSeek (MLA kernel + tuning, V3 8 layers
#                                         # at 2k and 16k, V2-Lite at 16k and 2k against HF generate)
#   CALL=b afkv/bench/gpu_verify.sh OUT   # ~570 s: long-context decode rows (1M, 8 x 128k) and the
#                                         # 256k prefill row; the PD row copies and hand-off
#   CALL=c afkv/bench/gpu_verify.sh OUT   # ~350 s: the fused-MoE sweep (bf16, fp8 tile / once /
#                                         # dequant) with tuning, batch-1 TPOT; the quantized
#                                         # decode-kernel sweep (kv-quant)
#
# Everything lands in OUT/all.tgz (the device tool brings back at most 8 files) and the summary is
# printed. Run from the repository root with it and the carried wheels (pytest-asyncio,
# pytest-timeout, pytest-xdist, execnet) on PYTHONPATH. The phases' own GPU tests are left to call
# a's tests phase (TESTS_S=0 below). PHASES overrides the call's phase list.
set -u
OUT=${1:?usage: CALL=a|b|c gpu_verify.sh OUT}
work=$(mktemp -d)
export PYTEST_ARGS="${PYTEST_ARGS:--n 8}" KV_QUANT_ARGS="${KV_QUANT_ARGS:---sweep --capacity-context 0}"
export TESTS_S=0 MLA_S="${MLA_S:-70}" V3_S="${V3_S:-50}" V3_LONG_S="${V3_LONG_S:-45}" LONG_S="${LONG_S:-45}" V2_S="${V2_S:-80}" \
    BENCH_S="${BENCH_S:-150}" PREFILL_S="${PREFILL_S:-240}" HANDOFF_S="${HANDOFF_S:-110}" \
    DECODE_S="${DECODE_S:-40}" MOE_S="${MOE_S:-90}" MOE_TOKENS="${MOE_TOKENS:-16,64,256,1024,4096,8192}" \
    TUNE_DTYPES="${TUNE_DTYPES:-bf16,fp8-once}" MLA_MODELS="${MLA_MODELS:-deepseek-v2-lite,deepseek-v3}"
case ${CALL:-a} in
    a) phases="tests=210 deepseek=320" ;;
    b) phases="long-context=400 pd=170" ;;
    c) phases="kernels=230 kv-quant=120" ;;
    *) echo "CALL must be a, b or c" >&2; exit 2 ;;
esac
# deepseek_gpu.sh reads TUNE=1 as "tune the MLA tiles"; kernels_gpu.sh reads TUNE as the MoE tune points
[ "${CALL:-a}" = a ] && export TUNE=1 || export TUNE="${TUNE:-16,4096}"
bash afkv/bench/gpu_session.sh "$work/o" ${PHASES:-$phases}
tar czf "$OUT/all.tgz" -C "$work" o
[ -f "$work/o/tests.txt" ] && grep -E "FAILED|ERROR" "$work/o/tests.txt" | head -n 30
true
