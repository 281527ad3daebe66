"""Where the training loop's step differs from the benchmark's: one process builds `yxanul train`'s Trainer (the
H100 preset, fp8-delayed or bf16, one micro-batch per step, real data) and the benchmark's step for the same mode,
times 10 steps of each with CUDA events, then profiles 3 steps of each (CPU and CUDA activity): GPU busy time by
category, the step time it leaves idle, and the host calls that wait for the GPU (scripts/device_step_probe.py's
`measure`).
Usage: python scripts/device_train_probe.py DATA_DIR OUT_JSON [MODE]   (MODE: fp8-delayed or bf16)"""
import gc
import json
import sys
import tempfile

import torch

from device_step_probe import measure  # this folder (the script's own) is first on sys.path
from yxanul.bench.throughput import _Run
from yxanul.train import Trainer
from yxanul.train_config import load_train_config

data_dir, out = sys.argv[1], sys.argv[2]
mode = sys.argv[3] if len(sys.argv) > 3 else "fp8-delayed"
over = {"data": data_dir, "steps": 200, "grad_accum": 1, "warmup": 10, "log_every": 1000, "eval_every": 0,
        "checkpoint_every": 0, "progress": False, "out": tempfile.mkdtemp(prefix="yx-probe-"),
        "fp8_calibration_steps": 0, "fp8_stats_every": 0}
if mode == "bf16":
    over["precision"] = "bf16"
cfg = load_train_config("yxanul-197m-h100", over)
results = []


def train_part():
    tr = Trainer(cfg, log=lambda *a, **k: None)
    counter = iter(range(10 ** 6))
    results.append(measure(f"train {mode}", lambda: tr.train_step(next(counter))))
    return [t.contiguous() for t in tr.loader.batch(0)], tr.model_cfg


(x, y), model_cfg = train_part()
gc.collect()
torch.cuda.empty_cache()
torch._dynamo.reset()
run = _Run(mode, model_cfg, torch.device("cuda"), True, None, "reduce-overhead")
results.append(measure(f"bench {mode}, real batch", lambda: run.step(x, y)))
g = torch.Generator().manual_seed(1234)
rnd = torch.randint(0, model_cfg.vocab_size, (16, 2049), generator=g).cuda()
xr, yr = rnd[:, :-1].contiguous(), rnd[:, 1:].contiguous()
results.append(measure(f"bench {mode}, random tokens", lambda: run.step(xr, yr)))
with open(out, "w") as f:
    json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, f, indent=1)
