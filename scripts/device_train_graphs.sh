#!/usr/bin/env bash
# `yxanul train` with the H100 preset (FP8 tensorwise, 2 x 16 x 2048 tokens per step) on real text, with CUDA graphs
# (the preset's compile_mode: reduce-overhead) and with torch.compile's default mode, 60 steps each.
# Usage: scripts/device_train_graphs.sh OUT_DIR CARRY_DIR   (CARRY_DIR: train.txt.xz, val.txt.xz, o200k_base.tiktoken)
set -uo pipefail
out="${1:?usage: $0 OUT_DIR CARRY_DIR}"
carry="${2:?usage: $0 OUT_DIR CARRY_DIR}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -m yxanul data prepare "$carry/train.txt.xz" --val "$carry/val.txt.xz" --tokenizer "$carry/o200k_base.tiktoken" \
  --out /tmp/yx-data --workers 16 --no-progress > /dev/null
for mode in reduce-overhead default; do
  python -m yxanul train --train-config yxanul-197m-h100 --compile-mode "$mode" --data /tmp/yx-data \
    --out "/tmp/yx-$mode" --steps 60 --warmup 10 --eval-every 60 --eval-batches 4 --log-every 10 \
    --checkpoint-every 0 --no-progress 2>&1 | grep -v "^ " | tail -3
  cp "/tmp/yx-$mode/metrics.jsonl" "$out/train-h100-$mode-metrics.jsonl" 2>/dev/null || true
done
