#!/usr/bin/env bash
# FP8 operands written by their producers (fused_producers option: the whole-MLP function, the norms writing FP8
# tiles) on the GPU, from the repository root. Parts:
#   tests    the GPU tests of the fused FP8 kernels (bit-exact against the references) and of the functions,
#            plus the other GPU tests of recent FP8 options (fast accumulation, FP8-kept SwiGLU inputs)
#   kernels  the SwiGLU and norm FP8 kernels and the one-read 1 x 128 dual quantizer timed against the paths they
#            replace (device_fused_quant_kernels.py)
#   197m-delayed, 197m-blockwise
#            bench throughput, Yxanul-197M 16 x 2048, CUDA graphs: bf16 and the recipe with and without the
#            option, one process (three modes: one call's time limit holds three compilations of this model)
#   1b-delayed, 1b-blockwise
#            the same for Yxanul-1B at 8 x 2048
#   197m-proj
#            Yxanul-197M: delayed with q/k/v and gate/up as one GEMM each (fused_tensor_projections), alone and
#            with the fused producers, against plain delayed, one process
#   fastacc  Yxanul-1B: the forward GEMM with fast accumulation (fprop_fast_accum) next to delayed
#   memory   Yxanul-197M: FP8-kept SwiGLU inputs (cache_swiglu_inputs), delayed unfused and blockwise with the fused
#            producers, for the peak-memory target
#   weight-step
#            Yxanul-197M: delayed with its weights quantized once per step by the grouped refresh (weight_cache:
#            step) against the in-graph quantization, one process
#   profile-blockwise, profile-proj
#            Yxanul-197M under --profile 2 (GPU time by kernel category): blockwise with and without the fused
#            producers; delayed with and without the fused per-tensor projections
# Usage: [BUDGET_S=N] scripts/device_fused_producers.sh OUT_DIR PART...
#   BUDGET_S: stop each part when that many seconds have passed since the start (a bench keeps the modes it
#   finished: its JSON is written after every mode); default 3600
set -uo pipefail
out="${1:?usage: $0 OUT_DIR PART...}"
shift
mkdir -p "$out"
end=$(( $(date +%s) + ${BUDGET_S:-3600} ))
left() { echo $(( end - $(date +%s) > 1 ? end - $(date +%s) : 1 )); }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
memory=bf16,fp8-delayed+swiglu-fp8,fp8-blockwise+swiglu-fp8
bench() { local name="$1" modes="$2"; shift 2; timeout "$(left)" python -m yxanul bench throughput --seq 2048 --steps 20 --warmup 5 \
  --compile-mode reduce-overhead --modes "$modes" "$@" --json-out "$out/throughput-$name.json" 2>&1 \
  | grep -v "^ " | grep -v "^\[" | tail -10; }
for part in "$@"; do
  case "$part" in
    tests)
      timeout "$(left)" python -m pytest -q -m gpu tests/test_kernels.py tests/test_producers.py 2>&1 | tail -30
      timeout "$(left)" python -m pytest -q -m gpu tests/test_swiglu_fp8.py tests/test_fp8_linear.py tests/test_train.py \
        -k "swiglu or fast_accum or cuda_traced or cuda_graph_steps" 2>&1 | tail -4 ;;
    kernels) timeout "$(left)" python scripts/device_fused_quant_kernels.py "$out/fused-quant-kernels.json" 2>&1 | grep -v Warn | tail -40 ;;
    197m-delayed|197m-blockwise|1b-delayed|1b-blockwise)
      recipe="${part#*-}"
      if [[ "$part" == 197m-* ]]; then size=(--model yxanul-197m --batch 16); else size=(--model yxanul-1b --batch 8); fi
      bench "$part" "bf16,fp8-$recipe+fused-producers,fp8-$recipe" "${size[@]}" ;;
    197m-proj) bench 197m-proj fp8-delayed,fp8-delayed+fused-proj,fp8-delayed+fused-proj+fused-producers \
      --model yxanul-197m --batch 16 ;;
    fastacc) bench 1b-fastacc bf16,fp8-delayed,fp8-delayed+fast-accum --model yxanul-1b --batch 8 ;;
    memory) bench 197m-memory "$memory" --model yxanul-197m --batch 16 ;;
    weight-step) bench 197m-weight-step fp8-delayed,fp8-delayed+weight-step --model yxanul-197m --batch 16 ;;
    profile-blockwise) bench 197m-profile-blockwise fp8-blockwise,fp8-blockwise+fused-producers --model yxanul-197m \
      --batch 16 --profile 2 ;;
    profile-proj) bench 197m-profile-proj fp8-delayed,fp8-delayed+fused-proj --model yxanul-197m --batch 16 --profile 2 ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
