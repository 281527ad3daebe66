#!/bin/bash
# #20: the whole GPU test suite (tile kernels, memtrace, compiled memory estimate among them)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; git log --oneline -1
t0=$(date +%s)
timeout 560 python3 -m pytest -q -m gpu tests -p no:cacheprovider \
  > $OUT/gpu-tests.log 2>&1; echo "gpu tests rc $? after $(( $(date +%s) - t0 )) s"; tail -5 $OUT/gpu-tests.log
