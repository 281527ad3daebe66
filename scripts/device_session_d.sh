#!/usr/bin/env bash
# One device call: the cut cross-entropy versions (v1, v2, forward with dh), then bench throughput of bf16-plain,
# bf16 and fp8 on yxanul-197m (16 x 2048, CUDA graphs). Usage: bash scripts/device_session_d.sh OUT_DIR
set -u
out=$1
export PYTHONPATH=$PWD
timeout 80 python scripts/device_cut_ce_versions.py "$out/cut-ce-versions.json" > "$out/cut-ce.log" 2>&1
tail -5 "$out/cut-ce.log"
timeout 190 python -m yxanul bench throughput --model yxanul-197m --batch 16 --seq 2048 --steps 20 --warmup 5 \
  --compile-mode reduce-overhead --profile 2 --modes bf16-plain,bf16,fp8 \
  --json-out "$out/throughput-197m.json" 2> "$out/bench.err" | tail -6
grep "profile ms/step" "$out/bench.err"
