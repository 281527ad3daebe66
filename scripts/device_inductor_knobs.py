"""Inductor settings for the compiled blocks under CUDA graphs: training throughput of Yxanul-197M (16 x 2048)
for bf16 and fp8-delayed with torch.compile's reduce-overhead mode alone and with extra inductor options,
all in one process (ratios compare within it). Writes knobs-<variant>.json into OUT_DIR.
Usage: python scripts/device_inductor_knobs.py OUT_DIR [VARIANT ...]"""
import json
import os
import sys

import torch._inductor.config as ic

from yxanul.bench.throughput import run_throughput

VARIANTS = {
    "base": ({}, "bf16,fp8-delayed"),
    "cdt": ({"coordinate_descent_tuning": True}, "bf16,fp8-delayed"),
    "tiling": ({"triton.tile_reductions": True, "triton.prefer_nd_tiling": True}, "fp8-delayed"),
}

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
names = sys.argv[2:] or list(VARIANTS)
common = dict(model="yxanul-197m", batch=16, seq=2048, steps=20, warmup=5, profile=3, compile_mode="reduce-overhead")


def _owner(key):
    *path, leaf = key.split(".")
    obj = ic
    for part in path:
        obj = getattr(obj, part)
    return obj, leaf


defaults = {}
for name in names:
    opts, modes = VARIANTS[name]
    for k, v in defaults.items():  # back to the defaults
        setattr(*_owner(k), v)
    applied = {}
    for k, v in opts.items():
        obj, leaf = _owner(k)
        if not hasattr(obj, leaf):
            print(f"== {name}: inductor has no option {k}; skipped", file=sys.stderr, flush=True)
            continue
        defaults.setdefault(k, getattr(obj, leaf))
        setattr(obj, leaf, v)
        applied[k] = v
    print(f"== {name}: {json.dumps(applied)}", file=sys.stderr, flush=True)
    run_throughput(modes=modes, json_out=os.path.join(out, f"knobs-{name}.json"), **common)
