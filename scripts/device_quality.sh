#!/usr/bin/env bash
# Loss parity of Yxanul-197M on the real-text corpus (o200k), as recorded in docs/benchmarks.md.
# Usage: scripts/device_quality.sh CORPUS_DIR RANKS_FILE OUT_DIR [MODES] [TOKENS]
#   CORPUS_DIR holds train.txt.xz and val.txt.xz; RANKS_FILE is o200k_base.tiktoken.
#   QUALITY_ARGS adds options (e.g. "--compile-mode reduce-overhead"); DATA_DIR is where the data is prepared.
set -euo pipefail
corpus="$1"; ranks="$2"; out="$3"; modes="${4:-bf16,fp8-tensorwise,fp8-delayed,fp8-all}"; tokens="${5:-30000000}"
data="${DATA_DIR:-/tmp/yxanul-o200k}"
if [ ! -f "$data/meta.json" ]; then
  python3 -m yxanul data prepare "$corpus/train.txt.xz" --val "$corpus/val.txt.xz" --tokenizer "$ranks" \
    --out "$data" --workers "$(nproc)" --no-progress
fi
python3 -m yxanul bench quality --model yxanul-197m --data "$data" --tokens "$tokens" --modes "$modes" \
  --batch 16 --seq 2048 --lr 1.5e-3 --eval-every 50 --eval-batches 16 --calibration-steps 20 \
  --fp8-all-recipe tensorwise --compile --device cuda --out "$out" ${QUALITY_ARGS:-}
