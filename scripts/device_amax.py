"""Per-tensor amax as one reduction over the flattened tensor or as per-row maxima then a max over the rows
(YXANUL_AMAX=flat|rows): training throughput of Yxanul-197M (16 x 2048, CUDA graphs) for bf16, fp8-tensorwise and
fp8-delayed, all in one process so the ratios compare. Writes amax-<variant>.json (bench throughput's format, with
profiles) into OUT_DIR.   Usage: python scripts/device_amax.py OUT_DIR"""
import os
import sys

from yxanul.bench.throughput import run_throughput

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
common = dict(model="yxanul-197m", batch=16, seq=2048, steps=20, warmup=5, profile=3, compile_mode="reduce-overhead")
for variant, modes in (("rows", "bf16,fp8-tensorwise,fp8-delayed"), ("flat", "fp8-tensorwise,fp8-delayed")):
    os.environ["YXANUL_AMAX"] = variant
    print(f"== YXANUL_AMAX={variant}", file=sys.stderr, flush=True)
    run_throughput(modes=modes, json_out=os.path.join(out, f"amax-{variant}.json"), **common)
