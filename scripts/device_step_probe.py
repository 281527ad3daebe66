"""Where a training step's host time goes: fp8-delayed Yxanul-197M (16 x 2048) under CUDA graphs, timed with CUDA
events, then 3 steps under torch.profiler with CPU activity: GPU busy vs step time, and the host-side calls that
wait for the GPU (synchronizations, device-to-host copies) or take the most time.
Usage: python scripts/device_step_probe.py OUT_JSON [MODE]"""
import json
import sys
import time

import torch

from yxanul.bench.throughput import _Run
from yxanul.config import load_model_config

out = sys.argv[1]
mode = sys.argv[2] if len(sys.argv) > 2 else "fp8-delayed"
cfg = load_model_config("yxanul-197m")
dev = torch.device("cuda")
g = torch.Generator().manual_seed(1234)
data = torch.randint(0, cfg.vocab_size, (16, 2049), generator=g).to(dev)
x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
run = _Run(mode, cfg, dev, True, None, "reduce-overhead")
for _ in range(6):
    run.step(x, y)
torch.cuda.synchronize()
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
t0 = time.perf_counter()
s.record()
for _ in range(10):
    run.step(x, y)
e.record()
host_ms = (time.perf_counter() - t0) * 100
torch.cuda.synchronize()
step_ms = s.elapsed_time(e) / 10
from torch.profiler import ProfilerActivity, profile  # noqa: E402
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(3):
        run.step(x, y)
    torch.cuda.synchronize()
busy = sum(ev.self_device_time_total for ev in prof.key_averages() if ev.device_type.name == "CUDA") / 3000
cpu = sorted((ev for ev in prof.key_averages() if ev.device_type.name == "CPU"), key=lambda ev: -ev.self_cpu_time_total)
waits = [ev for ev in cpu if any(k in ev.key for k in ("Synchronize", "item", "local_scalar", "Memcpy", "EventSynchronize"))]
res = {"mode": mode, "step_ms": round(step_ms, 2), "host_enqueue_ms": round(host_ms, 2), "gpu_busy_ms": round(busy, 2),
       "waits": [[ev.key, ev.count / 3, round(ev.self_cpu_time_total / 3000, 3)] for ev in waits],
       "top_cpu": [[ev.key[:100], ev.count / 3, round(ev.self_cpu_time_total / 3000, 3)] for ev in cpu[:25]]}
print(json.dumps({k: v for k, v in res.items() if k != "top_cpu"}, indent=1))
json.dump(res, open(out, "w"), indent=1)
