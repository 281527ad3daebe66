#!/usr/bin/env bash
# `yxanul train` with the H100 preset (FP8 delayed scaling, CUDA graphs, 2 x 16 x 2048 tokens per step) on real text:
# 10 BF16 calibration steps, then FP8 with the histories' scales (a recompile under CUDA graphs), an evaluation
# and a checkpoint at the end, then 10 more steps resumed from that checkpoint.
# Usage: scripts/device_train_delayed.sh OUT_DIR CARRY_DIR   (CARRY_DIR: train.txt.xz, val.txt.xz, o200k_base.tiktoken)
set -uo pipefail
out="${1:?usage: $0 OUT_DIR CARRY_DIR}"
carry="${2:?usage: $0 OUT_DIR CARRY_DIR}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -m yxanul data prepare "$carry/train.txt.xz" --val "$carry/val.txt.xz" --tokenizer "$carry/o200k_base.tiktoken" \
  --out /tmp/yx-data --workers 16 --no-progress > /dev/null
common=(--train-config yxanul-197m-h100 --data /tmp/yx-data --out /tmp/yx-delayed --fp8-calibration-steps 10
        --warmup 10 --eval-every 50 --eval-batches 4 --log-every 10 --no-progress)
python -m yxanul train "${common[@]}" --steps 50 --checkpoint-every 50 2>&1 | grep -v "^ " | tail -4
python -m yxanul train "${common[@]}" --steps 60 --checkpoint-every 0 --resume 2>&1 | grep -v "^ " | tail -3
cp /tmp/yx-delayed/metrics.jsonl "$out/train-h100-delayed-metrics.jsonl" 2>/dev/null || true
