#!/usr/bin/env bash
# CUDA graphs for the compiled blocks: training throughput of Yxanul-197M (16 x 2048) with torch.compile's default
# mode and with reduce-overhead, one process each (ratios are compared within a process), then a short
# `yxanul train` run with CUDA graphs on real text (blockwise FP8) to check the training loop under them.
# Usage: scripts/device_graphs.sh OUT_DIR CARRY_DIR   (CARRY_DIR: train.txt.xz, val.txt.xz, o200k_base.tiktoken)
set -uo pipefail
out="${1:?usage: $0 OUT_DIR CARRY_DIR}"
carry="${2:?usage: $0 OUT_DIR CARRY_DIR}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
common=(--model yxanul-197m --batch 16 --seq 2048 --steps 20 --warmup 5 --profile 3
        --modes bf16,fp8-tensorwise,fp8-delayed,fp8-blockwise)
python -m yxanul bench throughput "${common[@]}" --json-out "$out/throughput-default.json" 2>&1 \
  | grep -v "^ " | tail -8
python -m yxanul bench throughput "${common[@]}" --compile-mode reduce-overhead \
  --json-out "$out/throughput-graphs.json" 2>&1 | grep -v "^ " | tail -8
python -m yxanul data prepare "$carry/train.txt.xz" --val "$carry/val.txt.xz" --tokenizer "$carry/o200k_base.tiktoken" \
  --out /tmp/yx-data --workers 16 --no-progress > /dev/null
python -m yxanul train --train-config yxanul-197m-h100 --fp8-recipe blockwise --compile-mode reduce-overhead \
  --data /tmp/yx-data --out /tmp/yx-run --steps 40 --grad-accum 1 --warmup 10 --eval-every 40 --eval-batches 4 \
  --log-every 10 --checkpoint-every 0 --no-progress 2>&1 | grep -v "^ " | tail -8
cp /tmp/yx-run/metrics.jsonl "$out/train-graphs-blockwise-metrics.jsonl" 2>/dev/null || true
