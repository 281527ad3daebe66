"""Where a training step's GPU time goes: torch.profiler over a few steps, kernels grouped by what they do.

Categories (by kernel name; the first matching rule wins):

  fp8_quant          this project's Triton quantizers (act/weight/tensor quant, rmsnorm->fp8, swiglu->fp8,
                     the SwiGLU backward->fp8)
  cross_entropy      the fused linear cross-entropy's kernels (cut_ce, softmax-gradient) and the (log_)softmax /
                     nll kernels of the unfused loss
  attention          flash / cuDNN attention kernels
  fp8_quant_fused    inductor-generated kernels that compute an amax or clamp-and-cast: FP8 quantization fused
                     with its neighbours (and whatever else inductor put in the same kernel)
  fused_elementwise  the other inductor-generated kernels (norms, RoPE, SwiGLU, residual adds, casts)
  fp8_gemm           cuBLAS/CUTLASS GEMMs on FP8 operands
  gemm               the other GEMMs (BF16/FP32 matmuls)
  optimizer          fused AdamW (multi-tensor apply) kernels
  copy               memcpy / memset / transposes / eager casts
  other              everything else (eager elementwise and reductions, fills, ...)

``gpu_busy_ms`` is the sum of kernel times per step; ``step_ms - gpu_busy_ms`` is time the GPU sat idle
(launch gaps, host syncs) when kernels do not overlap, which on one stream they do not.
"""
from __future__ import annotations

import re

_RULES = (
    ("fp8_quant", re.compile(r"_(act_quant|act_quant_t|act_quant_dual|weight_quant|tensor_quant|amax_partial|"
                             r"rmsnorm_quant|swiglu_quant|swiglu_fwd_cast|swiglu_bwd_cast|"
                             r"tiles_rows|tiles_cols)\w*kernel", re.I)),
    ("cross_entropy", re.compile(r"_lce_|softmax_grad|log_softmax|nll_loss|cross_entropy", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|cudnn", re.I)),
    # inductor's generated kernels: the ones that compute an amax or clamp-and-cast are FP8 quantization
    # fused into their neighbours; the rest are norms, RoPE, SwiGLU, residual adds and casts
    ("fp8_quant_fused", re.compile(r"^triton_\w*(amax|clamp)", re.I)),
    ("fused_elementwise", re.compile(r"^triton_", re.I)),
    # cuBLAS names FP8 kernels with a "qq" operand code (nvjet_sm90_qqtst_...), CUTLASS with e4m3/e5m2
    ("fp8_gemm", re.compile(r"nvjet_\w*_qq|(gemm|xmma|cutlass|sm90|sm89|cublas).*(e4m3|e5m2|f8)", re.I)),
    ("gemm", re.compile(r"gemm|xmma|cutlass|nvjet|cublas|matmul|sm90_|ampere_|hopper", re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy|transpose|CatArrayBatched", re.I)),
)
CATEGORIES = tuple(name for name, _ in _RULES) + ("other",)


def classify(name: str) -> str:
    for cat, rx in _RULES:
        if rx.search(name):
            return cat
    return "other"


def summarize(kernels, steps: int, step_ms: float | None = None, top: int = 15) -> dict:
    """``kernels``: iterable of (name, total_device_us, calls) over ``steps`` steps -> per-step breakdown."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    cats = {c: 0.0 for c in CATEGORIES}
    per = []
    for name, us, calls in kernels:
        if us <= 0:
            continue
        c = classify(name)
        cats[c] += us
        per.append((us, name, calls, c))
    per.sort(reverse=True)
    busy = sum(cats.values()) / steps / 1000
    out = {"steps": steps, "gpu_busy_ms": round(busy, 3),
           "categories_ms": {c: round(v / steps / 1000, 3) for c, v in cats.items() if v > 0},
           "top_kernels": [{"name": n[:160], "ms": round(us / steps / 1000, 3), "calls_per_step": calls / steps,
                            "category": c} for us, n, calls, c in per[:top]],
           "kernels": [[n[:160], round(us / steps / 1000, 4), calls / steps] for us, n, calls, c in per]}
    if step_ms is not None:
        out["step_ms"] = round(step_ms, 3)
        out["idle_ms"] = round(max(step_ms - busy, 0.0), 3)
    return out


def device_kernels(events) -> list[tuple[str, float, int]]:
    """(name, total device us, calls) of the kernels, memcpys and memsets among torch.profiler's averaged
    events. A record_function range shows on the GPU timeline too (an annotation such as the optimizer's
    "Optimizer.step#AdamW.step" spanning its kernels): it is left out, or those kernels would count twice."""
    from torch.autograd import DeviceType
    rows = []
    for ev in events:
        if ev.device_type != DeviceType.CUDA or getattr(ev, "is_user_annotation", False):
            continue
        us = getattr(ev, "self_device_time_total", None)
        if us is None:  # older torch
            us = getattr(ev, "self_cuda_time_total", 0.0)
        rows.append((ev.key, float(us), int(ev.count)))
    return rows


def profile_steps(step_fn, steps: int = 3, step_ms: float | None = None, top: int = 15) -> dict:
    """Run ``step_fn()`` ``steps`` times under torch.profiler (CUDA activity) and summarize the kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(ProfilerActivity.CUDA)
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step_fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return summarize(device_kernels(prof.key_averages()), steps, step_ms, top)


def format_profile(mode: str, prof: dict) -> str:
    parts = [f"{c} {v:.2f}" for c, v in sorted(prof["categories_ms"].items(), key=lambda kv: -kv[1])]
    tail = f", idle {prof['idle_ms']:.2f}" if "idle_ms" in prof else ""
    return f"[{mode}] profile ms/step: busy {prof['gpu_busy_ms']:.2f}{tail} | " + ", ".join(parts)
