#!/usr/bin/env bash
# The whole-MLP FP8 function (fused_mlp option) on the GPU, from the repository root. Parts:
#   tests    the GPU tests of the SwiGLU FP8 kernels (bit-exact against the references) and of the fused MLP,
#            plus the other GPU tests of recent FP8 options (fast accumulation, FP8-kept SwiGLU inputs)
#   kernels  the SwiGLU FP8 kernels and the one-read 1 x 128 dual quantizer timed against the paths they replace
#           (device_fused_quant_kernels.py)
#   197m     bench throughput, Yxanul-197M 16 x 2048, CUDA graphs: bf16 and delayed / blockwise with and without
#            fused_mlp, one process
#   1b       the same for Yxanul-1B at 8 x 2048
# Usage: scripts/device_fused_mlp.sh OUT_DIR PART...
set -uo pipefail
out="${1:?usage: $0 OUT_DIR PART...}"
shift
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
modes=bf16,fp8-delayed,fp8-delayed+fused-mlp,fp8-blockwise,fp8-blockwise+fused-mlp
bench() { local name="$1"; shift; python -m yxanul bench throughput --seq 2048 --steps 20 --warmup 5 \
  --compile-mode reduce-overhead --modes "$modes" "$@" --json-out "$out/throughput-$name.json" 2>&1 \
  | grep -v "^ " | grep -v "^\[" | tail -10; }
for part in "$@"; do
  case "$part" in
    tests)
      python -m pytest -q -m gpu tests/test_kernels.py tests/test_fused_mlp.py 2>&1 | tail -4
      python -m pytest -q -m gpu tests/test_swiglu_fp8.py tests/test_fp8_linear.py tests/test_train.py \
        -k "swiglu or fast_accum or cuda_traced or cuda_graph_steps" 2>&1 | tail -4 ;;
    kernels) python scripts/device_fused_quant_kernels.py "$out/fused-quant-kernels.json" 2>&1 | grep -v Warn | tail -40 ;;
    197m) bench 197m --model yxanul-197m --batch 16 ;;
    1b) bench 1b --model yxanul-1b --batch 8 ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
