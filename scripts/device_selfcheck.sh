#!/usr/bin/env bash
# Native FP8 GEMMs vs the emulated reference for every recipe and every Yxanul-197M linear shape.
# Usage: scripts/device_selfcheck.sh [OUT_DIR]   (writes selfcheck-<model>.json there; default: docs/benchmarks)
set -euo pipefail
out="${1:-docs/benchmarks}"
mkdir -p "$out"
rc=0
for model in yxanul-197m yxanul-197m-seed; do
  for fmt in e4m3 hybrid; do
    python -m yxanul selfcheck --model "$model" --tokens 4096 --fp8-format "$fmt" --json \
      > "$out/selfcheck-$model-$fmt.json" || rc=1
    python - "$out/selfcheck-$model-$fmt.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
bad = [r for r in d["rows"] if not r["ok"]]
print(f"{d['model']} {d['fp8_format']}: {len(d['rows']) - len(bad)}/{len(d['rows'])} ok ({d['compared']}, {d['device']})")
for r in bad:
    print(f"  FAIL {r['recipe']} {r['op']} M={r['M']} K={r['K']} N={r['N']} rel_err={r['rel_err']} {r['error'] or ''}")
PY
  done
done
exit $rc
