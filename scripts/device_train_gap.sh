#!/usr/bin/env bash
# Logged training throughput against `bench throughput` (docs/benchmarks.md, "Logged training throughput against
# the benchmark"): fp8-delayed and bf16 benched, then `yxanul train` with the H100 preset at one micro-batch per
# step, with and without gradient clipping, without FP8 statistics, and in BF16; the logged rate of each window
# after compilation.
# Usage: scripts/device_train_gap.sh OUT_DIR CARRY_DIR [RUNS]   (CARRY_DIR: train.txt.xz, val.txt.xz,
# o200k_base.tiktoken; RUNS: a comma list of bench,fp8,fp8-stats1,fp8-noclip,fp8-nostats,bf16, all by default;
# fp8-stats1 records the FP8 statistics at every logged step, the default before they went to every 10th)
set -uo pipefail
out="${1:?usage: $0 OUT_DIR CARRY_DIR}"; carry="${2:?usage: $0 OUT_DIR CARRY_DIR}"
runs=",${3:-bench,fp8,fp8-stats1,fp8-noclip,fp8-nostats,bf16},"
mkdir -p "$out"
data="${DATA_DIR:-/tmp/yxanul-o200k}"
[ -f "$data/meta.json" ] || python3 -m yxanul data prepare "$carry/train.txt.xz" --val "$carry/val.txt.xz" \
  --tokenizer "$carry/o200k_base.tiktoken" --out "$data" --workers "$(nproc)" --no-progress > /dev/null
if [[ $runs == *,bench,* ]]; then
  python3 -m yxanul bench throughput --model yxanul-197m --batch 16 --seq 2048 --steps 30 --warmup 5 \
    --compile-mode reduce-overhead --modes fp8-delayed,bf16 --json-out "$out/throughput.json" > "$out/throughput.log" 2>&1
  tail -4 "$out/throughput.log"
fi
for v in "fp8:--fp8-calibration-steps 10" "fp8-stats1:--fp8-calibration-steps 10 --fp8-stats-every 1" "fp8-noclip:--fp8-calibration-steps 10 --clip 0" "fp8-nostats:--fp8-calibration-steps 10 --fp8-stats-every 0" "bf16:--precision bf16"; do
  name="${v%%:*}"; args="${v#*:}"
  [[ $runs == *,$name,* ]] || continue
  rm -rf "/tmp/yx-gap-$name"
  # shellcheck disable=SC2086  # $args holds several options
  python3 -m yxanul train --train-config yxanul-197m-h100 --data "$data" --steps 90 --grad-accum 1 --warmup 10 \
    --log-every 10 --eval-every 0 --checkpoint-every 0 --out "/tmp/yx-gap-$name" --no-progress $args \
    > "$out/train-$name.log" 2>&1
  cp "/tmp/yx-gap-$name/metrics.jsonl" "$out/metrics-$name.jsonl" 2>/dev/null || true
  python3 - "$out/metrics-$name.jsonl" "$name" <<'PY'
import json, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if r.get("tokens_per_s")]
late = [r["tokens_per_s"] for r in rows if r["step"] > 30]
print(sys.argv[2], "logged tokens/s after step 30:", ", ".join(f"{v:,.0f}" for v in late))
PY
done
