"""The fused FP8 gate/up/SwiGLU backward (delayed scaling) on and off (YXANUL_FUSED_SWIGLU): training throughput of
Yxanul-197M (16 x 2048, CUDA graphs) for bf16 and fp8-delayed in one process, so the ratios compare. Writes
fused-swiglu-<on|off>.json (bench throughput's format, with profiles) into OUT_DIR.
Usage: python scripts/device_fused_swiglu.py OUT_DIR"""
import os
import sys

from yxanul.bench.throughput import run_throughput

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
common = dict(model="yxanul-197m", batch=16, seq=2048, steps=20, warmup=5, profile=3, compile_mode="reduce-overhead")
for variant, modes in (("on", "bf16,fp8-delayed"), ("off", "fp8-delayed")):
    os.environ["YXANUL_FUSED_SWIGLU"] = variant
    print(f"== YXANUL_FUSED_SWIGLU={variant}", file=sys.stderr, flush=True)
    run_throughput(modes=modes, json_out=os.path.join(out, f"fused-swiglu-{variant}.json"), **common)
