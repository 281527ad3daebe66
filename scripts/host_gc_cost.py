"""What one full garbage collection costs the host after torch.compile: the number of objects the collector
tracks, and the time of a full collection, before and after compiling and running a few steps of a model.

Usage: python scripts/host_gc_cost.py [--model tiny] [--layers 2] [--seq 64]   (CPU is enough)
"""
import argparse
import dataclasses
import gc
import json
import time

import torch

from yxanul.config import load_model_config
from yxanul.model import Yxanul, compile_blocks


def full_collection() -> dict:
    t = time.perf_counter()
    gc.collect()
    return {"objects": len(gc.get_objects()), "full_gc_ms": round((time.perf_counter() - t) * 1000, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args()
    cfg = dataclasses.replace(load_model_config(args.model), n_layers=args.layers, max_seq_len=args.seq)
    out = {"torch": torch.__version__, "model": cfg.name, "layers": cfg.n_layers, "before": full_collection()}
    model = compile_blocks(Yxanul(cfg))
    x = torch.randint(0, cfg.vocab_size, (2, args.seq))
    for _ in range(3):
        model(x, x).backward()
    out["after_compile"] = full_collection()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
