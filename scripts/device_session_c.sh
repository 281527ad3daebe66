#!/usr/bin/env bash
# One device call: GPU tests of the cross-entropy paths and the traced quantizers, then bench throughput of
# bf16-plain, bf16 and fp8 on yxanul-197m-seed (8 x 2048, CUDA graphs), whose rank-768 head takes the chunked loss.
# Usage: bash scripts/device_session_c.sh OUT_DIR
set -u
out=$1
export PYTHONPATH=$PWD
python -m pytest -q -m gpu -p no:cacheprovider tests/test_linear_ce.py tests/test_fp8_linear.py -k "traced or cuda" \
  > "$out/gpu-tests.log" 2>&1; tail -3 "$out/gpu-tests.log"
python - <<'PY'
import torch
from yxanul.kernels import linear_ce as m
g = torch.randn(1024, 200064, device="cuda", dtype=torch.bfloat16)
h = torch.randn(1024, 768, device="cuda", dtype=torch.bfloat16)
acc = torch.randn(200005, 768, device="cuda")
ref = acc + g.t()[:200005].float() @ h.float()
m._add_wgrad(acc, g.t()[:200005], h)
print("fp32 addmm in use:", m._FP32_ADDMM[0], "rel err vs FP32:", float((acc - ref).norm() / ref.norm()))
PY
timeout 300 python -m yxanul bench throughput --model yxanul-197m-seed --batch 8 --seq 2048 --steps 20 --warmup 5 \
  --compile-mode reduce-overhead --profile 2 --modes bf16-plain,bf16,fp8 \
  --json-out "$out/throughput-seed.json" 2> "$out/bench.err" | tail -6
grep "profile ms/step" "$out/bench.err"
