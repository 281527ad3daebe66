#!/usr/bin/env bash
# One device call: GPU tests of the traced quantizers and the cross-entropy paths, the cut cross-entropy kernels
# against their v1 baseline, then bench throughput of every project mode on yxanul-197m (16 x 2048, CUDA graphs).
# Usage: bash scripts/device_session_a.sh OUT_DIR
set -u
out=$1
export PYTHONPATH=$PWD
python -m pytest -q -m gpu -p no:cacheprovider tests/test_linear_ce.py tests/test_fp8_linear.py -k "traced or cuda" \
  > "$out/gpu-tests.log" 2>&1; tail -3 "$out/gpu-tests.log"
timeout 120 python scripts/device_cut_ce_versions.py "$out/cut-ce-versions.json" > "$out/cut-ce.log" 2>&1
tail -6 "$out/cut-ce.log"
timeout 420 python -m yxanul bench throughput --model yxanul-197m --batch 16 --seq 2048 --steps 20 --warmup 5 \
  --compile-mode reduce-overhead --profile 2 --modes bf16-plain,bf16,fp8,fp8-blockwise,fp8-tensorwise,fp8-head \
  --json-out "$out/throughput-197m.json" 2> "$out/bench.err" | tail -12
grep "profile ms/step" "$out/bench.err"
