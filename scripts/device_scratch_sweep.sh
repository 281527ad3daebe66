#!/usr/bin/env bash
# From-scratch loss parity needs a recipe whose plateau exit is reproducible (docs/benchmarks.md, "Loss parity"):
# for each candidate recipe, two BF16 runs of Yxanul-197M from the same initialization on the same data (bf16,
# bf16-b: they differ only by GPU non-determinism, as FP8 and BF16 runs of one repeat do), paired per-window
# delta at the end: the smaller it is, the better FP8 can be told apart. MODES: the modes (default bf16,bf16-b).
# Usage: scripts/device_scratch_sweep.sh CORPUS_DIR RANKS_FILE OUT_DIR [TOKENS] [RECIPE ...]
#   a RECIPE is NAME:LR:WARMUP, default "base:1.5e-3:45" "gentle:6e-4:300"
set -euo pipefail
corpus="$1"; ranks="$2"; out="$3"; tokens="${4:-15000000}"
shift $(( $# < 4 ? $# : 4 ))
[ $# -gt 0 ] || set -- "base:1.5e-3:45" "gentle:6e-4:300"
data="${DATA_DIR:-/tmp/yxanul-o200k}"
[ -f "$data/meta.json" ] || python3 -m yxanul data prepare "$corpus/train.txt.xz" --val "$corpus/val.txt.xz" \
  --tokenizer "$ranks" --out "$data" --workers "$(nproc)" --no-progress
for r in "$@"; do
  IFS=: read -r name lr warmup <<< "$r"
  python3 -m yxanul bench quality --model yxanul-197m --data "$data" --tokens "$tokens" --modes "${MODES:-bf16,bf16-b}" --seeds 1 \
    --batch 16 --seq 2048 --lr "$lr" --warmup "$warmup" --eval-every 100 --eval-batches 8 --compile --device cuda \
    --out "$out/$name" ${SWEEP_ARGS:-}
done
