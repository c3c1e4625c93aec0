#!/usr/bin/env bash
# The GPU checks of docs/performance.md as one short run on a lent GPU machine, results
# under $OUT (default runs/gpu). That machine has PyTorch but no pytest: install it here
# first and carry the folder:
#     pip install --target .gpu-pytest pytest==9.2.0 pytest-timeout==2.4.0
# Then run it there: bash benchmarks/gpu_session.sh [tests|bench|all]
set -uo pipefail
export PYTHONPATH=.:.gpu-pytest
out=${OUT:-runs/gpu}
mkdir -p "$out"
what=${1:-all}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
if [[ $what == tests || $what == all ]]; then
    # TP=2 and PP=2 as gloo ranks on the one GPU against one rank; the four variants on the small model
    python -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_paths.py 2>&1 | tail -30 | tee "$out/gpu_tests.txt"
fi
if [[ $what == bench || $what == all ]]; then
    python benchmarks/gpu_step.py --out "$out/gpu_step.jsonl" 2>&1 | grep -v Warning | tee "$out/gpu_step.txt"
    # The planner's prediction of meshpar's peak, beside the measured peak_memory_gib above
    python -m meshpar train --model llama-1.4b --dry-run --global-batch-size 8 --micro-batch-size 8 \
        --seq-len 2048 --precision bf16 2>&1 | tee "$out/dry_run.txt"
fi
