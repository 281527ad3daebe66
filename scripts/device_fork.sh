#!/usr/bin/env bash
# Loss parity by the fork protocol (docs/benchmarks.md, "Loss parity"): a BF16 trunk of Yxanul-197M on the
# real-text corpus (o200k), then every mode from the trunk's checkpoint to the end, paired per-window evaluation.
# Usage: scripts/device_fork.sh CORPUS_DIR RANKS_FILE OUT_DIR [MODES] [TOKENS] [FORK_AT] [REPEATS]
#   CORPUS_DIR holds train.txt.xz and val.txt.xz; RANKS_FILE is o200k_base.tiktoken; OUT_DIR keeps the runs
#   (checkpoints included: several GB), fork.json and fork.md. Re-running with the same OUT_DIR reuses finished
#   branches. FORK_ARGS adds options; DATA_DIR is where the data is prepared.
set -euo pipefail
corpus="$1"; ranks="$2"; out="$3"
modes="${4:-bf16,fp8-delayed,fp8-blockwise,fp8-tensorwise}"; tokens="${5:-15000000}"; fork_at="${6:-300}"
repeats="${7:-1}"
data="${DATA_DIR:-/tmp/yxanul-o200k}"
if [ ! -f "$data/meta.json" ]; then
  python3 -m yxanul data prepare "$corpus/train.txt.xz" --val "$corpus/val.txt.xz" --tokenizer "$ranks" \
    --out "$data" --workers "$(nproc)" --no-progress
fi
python3 -m yxanul bench quality --model yxanul-197m --data "$data" --tokens "$tokens" --modes "$modes" \
  --fork-at "$fork_at" --repeats "$repeats" \
  --batch 16 --seq 2048 --lr 1.5e-3 --eval-every 100 --eval-batches 8 --calibration-steps 20 \
  --compile --device cuda --out "$out" ${FORK_ARGS:-}
