#!/usr/bin/env bash
# Per-tensor FP8 quantization on the GPU: the one-pass Triton kernels against the reference, then training
# throughput of Yxanul-197M (16 x 2048) with them (YXANUL_TENSOR_QUANT=kernel), with inductor's traced
# quantization (traced, the default), and under CUDA graphs (--compile-mode reduce-overhead, with the kernels). One process per variant;
# ratios are only compared within a process.
# Usage: scripts/device_tensor_quant.sh OUT_DIR
set -uo pipefail
out="${1:?usage: $0 OUT_DIR}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -m pytest -q -m gpu tests/test_kernels.py 2>&1 | tail -4
common=(--model yxanul-197m --batch 16 --seq 2048 --steps 20 --warmup 5)
YXANUL_TENSOR_QUANT=kernel python -m yxanul bench throughput "${common[@]}" --modes bf16,fp8-tensorwise,fp8-delayed \
  --profile 3 --json-out "$out/throughput-kernel.json" 2>&1 | grep -v "^ " | tail -12
YXANUL_TENSOR_QUANT=traced python -m yxanul bench throughput "${common[@]}" --modes bf16,fp8-tensorwise,fp8-delayed \
  --profile 3 --json-out "$out/throughput-traced.json" 2>&1 | grep -v "^ " | tail -12
YXANUL_TENSOR_QUANT=kernel python -m yxanul bench throughput "${common[@]}" --compile-mode reduce-overhead \
  --modes bf16,fp8-tensorwise,fp8-delayed,fp8-blockwise --json-out "$out/throughput-graphs.json" 2>&1 \
  | grep -v "^ " | tail -14
