#!/usr/bin/env bash
# Recipe variants on one fork (docs/benchmarks.md, "Loss parity"): the fork protocol of device_fork.sh for
# MODES, then the same trunk and BF16 branches reused for each variant, in which only the FP8 branches run
# again. A variant is NAME=RECIPE_LINES (the shipped policy plus a `recipe:` section of those ';'-separated
# lines) or NAME+=ARGS (more `bench quality` options, e.g. --calibration-steps 0 or --fp8-backend emulated; an
# option that BF16 runs depend on too, such as --no-compile, retrains the trunk and the BF16 branches).
# Usage: scripts/device_fork_variants.sh CORPUS_DIR RANKS_FILE OUT_DIR MODES [TOKENS] [FORK_AT] [VARIANT ...]
#   e.g. ... /tmp/fork bf16,fp8-delayed 15000000 300 "hybrid=fp8_format: hybrid" \
#            "recent=amax_compute_algo: most_recent" "nocal+=--calibration-steps 0"
# OUT_DIR/base holds the plain run, OUT_DIR/<name> each variant (fork.json and fork.md in each).
set -euo pipefail
corpus="$1"; ranks="$2"; out="$3"; modes="$4"; tokens="${5:-15000000}"; fork_at="${6:-300}"
shift $(( $# < 6 ? $# : 6 ))
here="$(cd "$(dirname "$0")" && pwd)"
bash "$here/device_fork.sh" "$corpus" "$ranks" "$out/base" "$modes" "$tokens" "$fork_at" 1
policy="$(python3 -c 'from yxanul.precision import DEFAULT_POLICY; print(DEFAULT_POLICY)')"
for v in "$@"; do
  name="${v%%=*}"; rest="${v#*=}"
  if [ "${name%+}" != "$name" ]; then
    name="${name%+}"; args="$rest"
  else
    args="--config $out/$name/policy.yaml"
  fi
  dir="$out/$name"; mkdir -p "$dir"
  for d in trunk bf16-r0 bf16-b-r0; do
    [ -e "$dir/$d" ] || cp -al "$out/base/$d" "$dir/$d"
  done
  if [ "$args" = "--config $dir/policy.yaml" ]; then
    { cat "$policy"; printf '\nrecipe:\n'; printf '%s\n' "$rest" | tr ';' '\n' | sed 's/^ */  /'; } > "$dir/policy.yaml"
  fi
  FORK_ARGS="$args ${FORK_ARGS:-}" bash "$here/device_fork.sh" "$corpus" "$ranks" "$dir" "$modes" "$tokens" "$fork_at" 1
done
