"""Blockwise FP8 with the 1 x 128 quantizers of activations and output gradients traced into the compiled blocks
(YXANUL_BLOCK_QUANT=traced: inductor may fuse them into the producing kernels) against the Triton kernels
(kernel, opaque calls). First the GPU tests of the traced quantizers and the kernels, then training throughput of
Yxanul-197M (16 x 2048, CUDA graphs, profiles) for bf16, fp8-blockwise with each path, fp8-delayed and fp8-head
(not blockwise, so YXANUL_BLOCK_QUANT does not touch them), all in one process so the ratios compare. Writes block-traced.json (bench throughput's format; the traced row is
named "fp8-blockwise/traced") into OUT_DIR.
Usage: python scripts/device_block_traced.py OUT_DIR [MODEL BATCH]"""
import os
import subprocess
import sys

from yxanul.bench.throughput import _ratios, format_table, run_throughput
from yxanul.io import atomic_write_json

out = sys.argv[1]
model = sys.argv[2] if len(sys.argv) > 2 else "yxanul-197m"
batch = int(sys.argv[3]) if len(sys.argv) > 3 else 16
os.makedirs(out, exist_ok=True)
tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                        "tests/test_fp8_linear.py", "tests/test_kernels.py"], capture_output=True, text=True)
print("\n".join(tests.stdout.strip().splitlines()[-6:]), flush=True)
common = dict(model=model, batch=batch, seq=2048, steps=20, warmup=5, profile=3, compile_mode="reduce-overhead")
runs = []
for path, modes in (("kernel", "bf16,fp8-blockwise"), ("traced", "fp8-blockwise,fp8-delayed,fp8-head")):
    os.environ["YXANUL_BLOCK_QUANT"] = path
    print(f"== YXANUL_BLOCK_QUANT={path}", file=sys.stderr, flush=True)
    runs.append(run_throughput(modes=modes, json_out=os.path.join(out, f"block-{path}.json"), **common))
result = dict(runs[0])
result["block_quant"] = "kernel for the first fp8-blockwise row, traced for fp8-blockwise/traced"
rows = list(runs[0]["rows"])
for r in runs[1]["rows"]:
    r = dict(r)
    if r["mode"] == "fp8-blockwise":
        r["mode"] = "fp8-blockwise/traced"
    rows.append(r)
_ratios(rows)
result["rows"] = rows
atomic_write_json(os.path.join(out, "block-traced.json"), result)
print(format_table(result), flush=True)
