#!/bin/bash
# #21: why fp8-delayed lost 1.4% in the fork: the same fork with delayed as is, with E5M2 gradients (hybrid), and
# with the most recent amax instead of the history's max.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
D=$PWD/.devdata
cd $D/clean
export PYTHONPATH=$PWD
echo "rev $(cat REV)"
t0=$(date +%s)
DATA_DIR=/tmp/o200k timeout 565 bash scripts/device_fork_variants.sh $D/corpus $D/o200k_base.tiktoken /tmp/fv bf16,fp8-delayed 15000000 300 \
  "hybrid=fp8_format: hybrid" "recent=amax_compute_algo: most_recent" > $OUT/fv.log 2>&1
echo "rc $? after $(( $(date +%s) - t0 )) s"
for v in base hybrid recent; do mkdir -p $OUT/$v; cp /tmp/fv/$v/fork.json /tmp/fv/$v/fork.md $OUT/$v/ 2>/dev/null; cp /tmp/fv/$v/fp8-delayed-r0/metrics.jsonl $OUT/$v/metrics-delayed.jsonl 2>/dev/null; echo "== $v"; cat $OUT/$v/fork.md 2>/dev/null | sed -n 3,8p; done
grep -E "Error|error|Traceback" $OUT/fv.log | head
