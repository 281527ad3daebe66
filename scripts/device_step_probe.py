"""Where a training step's host time goes: fp8-delayed Yxanul-197M (16 x 2048) under CUDA graphs, timed with CUDA
events, then 3 steps under torch.profiler with CPU activity: GPU busy time by category against step time, and the
host-side calls that wait for the GPU (synchronizations, device-to-host copies) or take the most time.
`measure` is shared with scripts/device_train_probe.py.
Usage: python scripts/device_step_probe.py OUT_JSON [MODE]"""
import json
import sys
import time

import torch

from yxanul.bench.profile import device_kernels, summarize
from yxanul.hostgc import settle

WAITS = ("Synchronize", "item", "local_scalar", "Memcpy", "HostAlloc", "EventQuery")


def measure(name, step_fn, tokens_per_step: int = 16 * 2048) -> dict:
    """8 warm-up calls of `step_fn`, 10 timed with CUDA events (and the host's enqueue time), then 3 under
    torch.profiler: the record, also printed in short."""
    for _ in range(8):
        step_fn()
    torch.cuda.synchronize()
    settle("freeze")  # as the training loop and the benchmark do after their warm-up
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
           "tokens_per_s": round(tokens_per_step / step_ms * 1000),
           "profile": summary,
           "waits": [[ev.key, ev.count / 3, round(ev.self_cpu_time_total / 3000, 3)] for ev in cpu
                     if any(k in ev.key for k in WAITS)],
           "top_cpu": [[ev.key[:100], ev.count / 3, round(ev.self_cpu_time_total / 3000, 3)] for ev in cpu[:30]]}
    print(json.dumps({k: res[k] for k in ("name", "step_ms", "host_enqueue_ms", "tokens_per_s", "waits")}), flush=True)
    print(f"  {name}: busy {summary['gpu_busy_ms']:.2f} idle {summary.get('idle_ms', float('nan')):.2f} | "
          + ", ".join(f"{k} {v:.2f}" for k, v in sorted(summary["categories_ms"].items(), key=lambda kv: -kv[1])),
          flush=True)
    return res


def main(out: str, mode: str) -> None:
    from yxanul.bench.throughput import _Run
    from yxanul.config import load_model_config
    cfg = load_model_config("yxanul-197m")
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(1234)
    data = torch.randint(0, cfg.vocab_size, (16, 2049), generator=g).to(dev)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    run = _Run(mode, cfg, dev, True, None, "reduce-overhead")
    res = measure(mode, lambda: run.step(x, y))
    with open(out, "w") as f:
        json.dump({"mode": mode, "device": torch.cuda.get_device_name(), "torch": torch.__version__, **res}, f,
                  indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "fp8-delayed")
