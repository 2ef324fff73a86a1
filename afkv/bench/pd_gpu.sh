#!/usr/bin/env bash
# Prefill/decode disaggregation on one GPU, in one call (<= 150 s): the hand-off's row copies alone
# (`afkv bench pd-rows`: scattered blocks <-> a run of staging slots through torch's indexed
# kernels and the Triton copy_rows, against one copy of the same bytes; <= 25 s), then the KV hand-off benchmark
# (`afkv bench pd-handoff`: a colocated node, then 2 decode nodes + 1 prefill node as processes
# on the same GPU; GB/s of the hand-off against a device -> device copy of the same bytes
# measured in the same run, the path CUDA IPC takes; last block -> first token against the
# colocated TTFT; each decode node's link keeps its staging buffer, so the measured pair's set-up
# is the request alone and "new bufs" is 0), table + JSON under OUT. Model: random:qwen3-30b-a3b-16e (Qwen3-30B-A3B with
# 16 of its 128 experts: every KV shape real, 96 KiB of KV per token, 10 GB of weights per
# process, so that three processes fit one H100). With TESTS_S > 0 the PD GPU tests (the
# copier's, whose indexed copies the CUDA IPC hand-off takes, copy_rows', the KV manager's
# hand-off API on CUDA) run first.
#
#   afkv/bench/pd_gpu.sh OUT
#
# Run from the repository root with it on PYTHONPATH. ROWS_S (default 25; 0: skip), HANDOFF_S
# (default 110), TESTS_S (0: skip), MODEL, PROMPT_LENS override. Two GPUs: DEVICES=cuda:0,cuda:1
# puts the decode nodes on the first and the prefill node on the second (the NCCL carrier; the
# limit is then one peer copy between the GPUs), and the tests include the two-GPU 1P1D.
set -u
OUT=${1:?usage: pd_gpu.sh OUT}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
start=$SECONDS
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/machine.txt"

if [ "${TESTS_S:-0}" -gt 0 ]; then
    echo "== tests (at $((SECONDS - start)) s)"
    timeout "$TESTS_S" python3 -m pytest -v -p no:cacheprovider -rfE tests/nodes/test_prefill_decode_gpu.py tests/kv/test_copier_gpu.py tests/ops/test_triton_rows.py tests/kv/test_handoff.py \
        >"$OUT/tests.txt" 2>&1
    echo "   exit $? after $((SECONDS - start)) s"
    grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/tests.txt" | tail -n 8
fi

if [ "${ROWS_S:-25}" -gt 0 ]; then
    echo "== pd-rows (at $((SECONDS - start)) s)"
    timeout "${ROWS_S:-25}" python3 -m afkv.cli bench pd-rows --json "$OUT/pd-rows.json" >"$OUT/pd-rows.txt" 2>&1
    echo "   exit $? after $((SECONDS - start)) s"
    tail -n 8 "$OUT/pd-rows.txt"
fi

echo "== pd-handoff (at $((SECONDS - start)) s)"
timeout "${HANDOFF_S:-110}" python3 -m afkv.cli bench pd-handoff --model "${MODEL:-random:qwen3-30b-a3b-16e}" \
    --prompt-lens "${PROMPT_LENS:-1024,4096,8000}" --device-memory-mib 4096 ${DEVICES:+--devices "$DEVICES"} \
    --json "$OUT/pd-handoff.json" >"$OUT/pd-handoff.txt" 2>&1
echo "   exit $? after $((SECONDS - start)) s"
tail -n 12 "$OUT/pd-handoff.txt"
exit 0
