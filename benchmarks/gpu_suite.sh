#!/usr/bin/env bash
# Every GPU check in one go, results as JSON and text under $OUT (about 6-7 minutes on one H100/H200; at most 9.5):
#   1. the gpu-marked tests (bf16 against fp32, compiled against eager, fused attention kernels);
#   2. benchmarks/throughput.py --matrix gpu (step time, tokens/s, MFU, memory; GPT-2 124M and 1.5B);
#   3. benchmarks/end_to_end.py --matrix gpu (whole SMS runs, process start to summary.json, with the
#      chapter's plain loop in the same run as the baseline of time and test accuracy).
#
#   OUT=results bash benchmarks/gpu_suite.sh              # on the GPU machine
#   OUT=/tmp/r MATRIX=tiny bash benchmarks/gpu_suite.sh   # the same script on a CPU, tiny model, seconds
#
# Where DeepSpeed or pytest is not installed, the wheels in .whl/ are installed first (an offline GPU
# machine): build them where there is a network with DeepSpeed's make-wheels script plus
#   python3 -m pip download -q --no-deps -d .whl pytest pluggy iniconfig
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
MATRIX=${MATRIX:-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

if ! $PY -c "import deepspeed, pytest" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its output, go on after a failure
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
  tail -n 40 "$OUT/$name.txt"
}

{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  $PY -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)"; } \
  >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if ! $PY -c "import pytest" 2>/dev/null; then
  echo "gpu_tests: skipped, pytest is not installed (see the header)" | tee -a "$OUT/steps.txt"
elif [ "$MATRIX" = gpu ]; then
  step gpu_tests 120 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
else
  step gpu_tests 600 env DIST_FINETUNE_TEST_DEVICE=cpu $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
fi
step throughput 270 $PY benchmarks/throughput.py --matrix "$MATRIX" --json "$OUT/throughput.json"
step end_to_end 180 $PY benchmarks/end_to_end.py --matrix "$MATRIX" --json "$OUT/end_to_end.json"
