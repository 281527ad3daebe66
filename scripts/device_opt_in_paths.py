"""Two opt-in paths against the defaults, measured side by side, on a CUDA machine:

* YXANUL_BLOCK_QUANT=traced: blockwise 1 x 128 quantizers of activations and output gradients traced into the
  compiled blocks (inductor may fuse them into the producing kernels), against the Triton kernels (kernel);
* YXANUL_WEIGHT_CACHE=step: compiled blocks read FP8 weight copies quantized once per optimizer step by fp8_step,
  against quantizing the weights in the graph at every forward (graph).

First the GPU tests of the layers and kernels, then training throughput of Yxanul-197M (16 x 2048, CUDA graphs,
profiles) for bf16, fp8-blockwise with each quantizer path, fp8-delayed with each weight path and fp8-head; one
GROUP per process, so the ratios within a group compare. Writes opt-in-paths-GROUP.json (bench throughput's
format; the opt-in rows are named "MODE/traced" and "MODE/static-weights") and the per-variant JSON
(variant-GROUP-NAME.json) into OUT_DIR.
Usage: python scripts/device_opt_in_paths.py OUT_DIR [MODEL BATCH [GROUP]]
GROUP (default all) is one of: all; blockwise (bf16 and fp8-blockwise with each quantizer path); delayed (bf16 and
fp8-delayed with each weight path); each group fits one 10-minute device call. The GPU tests run with all and
blockwise."""
import os
import subprocess
import sys

from yxanul.bench.throughput import _ratios, format_table, run_throughput
from yxanul.io import atomic_write_json

out = sys.argv[1]
model = sys.argv[2] if len(sys.argv) > 2 else "yxanul-197m"
batch = int(sys.argv[3]) if len(sys.argv) > 3 else 16
group = sys.argv[4] if len(sys.argv) > 4 else "all"
TRACED = ("traced", {"YXANUL_BLOCK_QUANT": "traced"}, "fp8-blockwise", "/traced")
STATIC = ("static-weights", {"YXANUL_WEIGHT_CACHE": "step"}, "fp8-delayed", "/static-weights")
groups = {  # group -> the default paths' modes, then the opt-in variants (name, environment, modes, row suffix)
    "all": ("bf16,fp8-blockwise,fp8-delayed,fp8-head", TRACED, STATIC),
    "blockwise": ("bf16,fp8-blockwise", TRACED),
    "delayed": ("bf16,fp8-delayed", STATIC),
}
if group not in groups:
    sys.exit(f"error: GROUP must be one of {', '.join(groups)}, got {group!r}")
variants = (("default", {}, groups[group][0], ""),) + groups[group][1:]
os.makedirs(out, exist_ok=True)
if group in ("all", "blockwise"):
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                            "tests/test_fp8_linear.py", "tests/test_kernels.py"], capture_output=True, text=True)
    with open(os.path.join(out, "gpu-tests.log"), "w") as f:
        f.write(tests.stdout + tests.stderr)
    print("\n".join(tests.stdout.strip().splitlines()[-6:]), flush=True)
common = dict(model=model, batch=batch, seq=2048, steps=20, warmup=5, profile=3, compile_mode="reduce-overhead")
rows, first = [], None
for name, env, modes, suffix in variants:
    for k in ("YXANUL_BLOCK_QUANT", "YXANUL_WEIGHT_CACHE"):
        os.environ.pop(k, None)
    os.environ.update(env)
    print(f"== {name} {env}", file=sys.stderr, flush=True)
    res = run_throughput(modes=modes, json_out=os.path.join(out, f"variant-{group}-{name}.json"), **common)
    first = first or res
    for r in res["rows"]:
        rows.append(dict(r, mode=r["mode"] + suffix))
_ratios(rows)
result = dict(first, rows=rows, block_quant="per row", weight_cache="per row")
atomic_write_json(os.path.join(out, f"opt-in-paths-{group}.json"), result)
print(format_table(result), flush=True)
