#!/usr/bin/env bash
# The GPU checks of docs/performance.md as one short run on a lent GPU machine, results
# under $OUT (default runs/gpu): the GPU's name, the benchmark's JSON lines and its
# profile, the gpu-marked tests' summary. Each part has its own time limit, so one that
# hangs leaves the others' results. That machine's Python has PyTorch and pytest; run
# from the source tree:  bash benchmarks/gpu_session.sh [bench|microbench|tests|all]
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-runs/gpu}
mkdir -p "$out"
what=${1:-all}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$out/gpu.txt"
if [[ $what == bench || $what == all ]]; then
    # Eager pair first, then the compiled pair; one line per variant as it ends
    timeout "${BENCH_TIMEOUT:-330}" python benchmarks/gpu_step.py --out "$out/gpu_step.jsonl" \
        --profile "$out/profile.txt" 2>&1 | grep -v -e Warning -e USDT | tee "$out/gpu_step.txt"
fi
if [[ $what == microbench || $what == all ]]; then
    # The planner's efficiency constants and each operation's cost on this GPU (issue 33
    # item 9): copy the file into meshpar/planner/data/ and name it in hardware.MEASURED
    timeout "${MICROBENCH_TIMEOUT:-180}" python benchmarks/gpu_microbench.py \
        --out "$out/microbench-$(date +%F).json" 2>&1 | tee "$out/microbench.txt"
fi
if [[ $what == tests || $what == all ]]; then
    # TP=2 and PP=2 as gloo ranks on the one GPU against one rank, and the recast weights'
    # memory on CUDA (the small-model benchmark test is left to the run above)
    timeout "${TESTS_TIMEOUT:-150}" python -m pytest -q -m gpu -p no:cacheprovider --timeout 120 \
        -k "not benchmark_on_cuda" tests/test_gpu_paths.py 2>&1 | tail -40 | tee "$out/gpu_tests.txt"
fi
# The planner's prediction of meshpar's peak (beside the measured peak_memory_gib) needs no
# GPU: meshpar train --model llama-1.4b --dry-run --global-batch-size 8 --micro-batch-size 8
#     --seq-len 2048 --precision bf16
