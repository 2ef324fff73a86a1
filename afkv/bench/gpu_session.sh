#!/usr/bin/env bash
# One call on the GPU machine: the phases named on the command line, each under its own time
# limit, each writing its log (and JSON) under OUT, a summary last.
#
#   afkv/bench/gpu_session.sh OUT PHASE[=SECONDS] ...
#
# Phases:
#   tests       every GPU test of one device (pytest -m gpu; two-GPU tests skip), per-test timeout;
#               TEST_FILES (space-separated) narrows it to those files; PYTEST_ARGS adds options
#               (-n 8 with pytest-xdist carried: the Triton compiles run in parallel)
#   kv-quant    afkv bench kv-quant on Qwen3-30B-A3B shapes (kernel sweep vs copy, attention step, capacity)
#   calibrate   afkv bench calibrate (a profile for afkv plan) on Qwen3-30B-A3B and Mixtral-8x7B shapes
#   kernels     afkv/bench/kernels_gpu.sh (fused-MoE sweep, batch-1 TPOT)
#   deepseek    afkv/bench/deepseek_gpu.sh, where present
#   long-context afkv/bench/long_context_gpu.sh, where present
#   pd          afkv/bench/pd_gpu.sh (prefill and decode as two processes on one GPU), where present
# Run from the repository root with it on PYTHONPATH (NCCL_NVLS_ENABLE=0 is set here).
set -u
OUT=${1:?usage: gpu_session.sh OUT PHASE[=SECONDS] ...}
shift
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
start=$SECONDS
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/machine.txt"

for arg in "$@"; do
    name=${arg%%=*}
    limit=${arg#*=}
    [ "$limit" = "$arg" ] && limit=240
    echo "== $name (limit ${limit} s, at $((SECONDS - start)) s)"
    log="$OUT/$name.txt"
    case $name in
        tests)
            # the files holding GPU tests only: the others may import what the GPU machine lacks (openai, fastapi)
            timeout "$limit" python3 -m pytest -v -p no:cacheprovider -m gpu --timeout 100 -rfE ${PYTEST_ARGS:-} \
                ${TEST_FILES:-$(grep -rl "pytest.mark.gpu" tests --include="*.py" | sort)} >"$log" 2>&1 ;;
        kv-quant)
            # KV_QUANT_ARGS (default --sweep: every launch variant of the quantized decode kernel,
            # checked and timed, the winners printed as this GPU's QUANT_DECODE_CONFIGS row and used
            # for the attention steps; add --capacity-context 0 to skip the capacity phase; set it
            # empty to run the committed table only)
            timeout "$limit" python3 -m afkv.cli bench kv-quant --device cuda --model random:qwen3-30b-a3b \
                --steps 8 ${KV_QUANT_ARGS---sweep} --json "$OUT/kv-quant.json" >"$log" 2>&1 ;;
        calibrate)
            timeout "$limit" python3 -m afkv.cli bench calibrate --models random:qwen3-30b-a3b,random:mixtral-8x7b \
                --device cuda --out "$OUT/profile.json" >"$log" 2>&1 ;;
        kernels)
            timeout "$limit" bash afkv/bench/kernels_gpu.sh "$OUT/kernels" >"$log" 2>&1 ;;
        deepseek)
            timeout "$limit" bash afkv/bench/deepseek_gpu.sh "$OUT/deepseek" >"$log" 2>&1 ;;
        long-context)
            timeout "$limit" bash afkv/bench/long_context_gpu.sh "$OUT/long-context" >"$log" 2>&1 ;;
        pd)
            timeout "$limit" bash afkv/bench/pd_gpu.sh "$OUT/pd" >"$log" 2>&1 ;;
        *)
            echo "unknown phase $name" | tee "$log" ;;
    esac
    echo "   exit $? after $((SECONDS - start)) s"
done

echo "== summary ($((SECONDS - start)) s)"
for arg in "$@"; do
    name=${arg%%=*}
    echo "---- $name"
    case $name in
        tests) grep -E " FAILED| ERROR|passed|failed|Timeout" "$OUT/tests.txt" | tail -n 60 ;;
        *) tail -n 30 "$OUT/$name.txt" ;;
    esac
done
