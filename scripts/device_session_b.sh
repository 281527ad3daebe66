#!/usr/bin/env bash
# One device call: where the traced quantizers part from the kernels, then bench throughput of the project modes
# on yxanul-197m-seed (8 x 2048, CUDA graphs). Usage: bash scripts/device_session_b.sh OUT_DIR
set -u
out=$1
export PYTHONPATH=$PWD
timeout 150 python scripts/device_traced_quant_check.py "$out/traced-quant-check.json" > "$out/traced.log" 2>&1
grep '^{' "$out/traced.log" || tail -20 "$out/traced.log"
timeout 400 python -m yxanul bench throughput --model yxanul-197m-seed --batch 8 --seq 2048 --steps 20 --warmup 5 \
  --compile-mode reduce-overhead --profile 2 --modes bf16-plain,bf16,fp8,fp8-blockwise,fp8-tensorwise \
  --json-out "$out/throughput-seed.json" 2> "$out/bench.err" | tail -10
grep "profile ms/step" "$out/bench.err"
