#!/usr/bin/env bash
# FP8 quantization paths on the GPU, Yxanul-197M at 16 x 2048, every process under CUDA graphs
# (--compile-mode reduce-overhead) unless noted. Ratios are compared within a process only.
#   kernels   the GPU kernel tests (bit-exact against the references) and the quantizer bandwidth bench
#   nocache   bf16 and the FP8 recipes with the default policy (the wgrad operand re-quantized in backward)
#   cache     the same with FP8 activation caching (docs/history/2026-11-25-h100/policy-fp8-cache.yaml)
#   eager     caching, torch.compile's default mode (kernels launched one by one)
# Usage: scripts/device_fp8_paths.sh OUT_DIR PART...
set -uo pipefail
out="${1:?usage: $0 OUT_DIR PART...}"
shift
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
common=(--model yxanul-197m --batch 16 --seq 2048 --steps 20 --warmup 5)
graphs=(--compile-mode reduce-overhead)
cache=(--config docs/history/2026-11-25-h100/policy-fp8-cache.yaml)
bench() { local name="$1"; shift; python -m yxanul bench throughput "${common[@]}" "$@" \
  --json-out "$out/throughput-$name.json" 2>&1 | grep -v "^ " | grep -v "^\[" | tail -8; }
for part in "$@"; do
  case "$part" in
    kernels)
      python -m pytest -q -m gpu tests/test_kernels.py 2>&1 | tail -2
      python scripts/device_quant_bench.py "$out/quant-bench.json" 2>&1 | grep -v "variant" | grep -v Warn ;;
    nocache) bench nocache "${graphs[@]}" --modes bf16,fp8-tensorwise,fp8-delayed,fp8-blockwise --profile 3 ;;
    cache) bench cache "${graphs[@]}" "${cache[@]}" --modes bf16,fp8-tensorwise,fp8-delayed,fp8-blockwise --profile 3 ;;
    eager) bench eager "${cache[@]}" --modes bf16,fp8-tensorwise,fp8-delayed,fp8-blockwise ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
