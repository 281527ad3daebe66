"""Where the training loop's step differs from the benchmark's: one process builds `yxanul train`'s Trainer (the
H100 preset, fp8-delayed or bf16, one micro-batch per step, real data) and the benchmark's step for the same mode,
times 10 steps of each with CUDA events, then profiles 3 steps of each (CPU and CUDA activity): GPU busy time by
category, the step time it leaves idle, and the host calls that wait for the GPU.
Usage: python scripts/device_train_probe.py DATA_DIR OUT_JSON [MODE]   (MODE: fp8-delayed or bf16)"""
import gc
import json
import sys
import tempfile
import time

import torch

from yxanul.bench.profile import device_kernels, summarize
from yxanul.bench.throughput import _Run
from yxanul.hostgc import settle
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
WAITS = ("Synchronize", "item", "local_scalar", "Memcpy", "HostAlloc", "EventQuery")


def measure(name, step_fn):
    for _ in range(8):
        step_fn()
    torch.cuda.synchronize()
    settle("freeze")  # as both loops do after their warm-up
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    s.record()
    for _ in range(10):
        step_fn()
    e.record()
    host_ms = (time.perf_counter() - t0) * 100
    torch.cuda.synchronize()
    step_ms = s.elapsed_time(e) / 10
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step_fn()
        torch.cuda.synchronize()
    avg = prof.key_averages()
    summary = summarize(device_kernels(avg), 3, step_ms, 25)
    cpu = sorted((ev for ev in avg if ev.device_type == DeviceType.CPU), key=lambda ev: -ev.self_cpu_time_total)
    res = {"name": name, "step_ms": round(step_ms, 2), "host_enqueue_ms": round(host_ms, 2),
           "tokens_per_s": round(16 * 2048 / step_ms * 1000),
           "profile": summary,
           "waits": [[ev.key, ev.count / 3, round(ev.self_cpu_time_total / 3000, 3)] for ev in cpu
                     if any(k in ev.key for k in WAITS)],
           "top_cpu": [[ev.key[:100], ev.count / 3, round(ev.self_cpu_time_total / 3000, 3)] for ev in cpu[:30]]}
    print(json.dumps({k: res[k] for k in ("name", "step_ms", "host_enqueue_ms", "tokens_per_s", "waits")}), flush=True)
    print(f"  {name}: busy {summary['gpu_busy_ms']:.2f} idle {summary.get('idle_ms', float('nan')):.2f} | "
          + ", ".join(f"{k} {v:.2f}" for k, v in sorted(summary["categories_ms"].items(), key=lambda kv: -kv[1])),
          flush=True)
    return res


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
