"""Check and time the fused FP8 kernels and the fused linear cross-entropy on a CUDA device.

  python scripts/device_kernels.py            # writes $OUT/device_kernels.json (OUT defaults to ./out)

1. Every Triton kernel against its pure-torch reference with fresh random data: FP8 bytes and scales must be
   identical (RMSNorm / SwiGLU: the quantization of the kernel's own output must be identical, the output
   itself within about one BF16 ulp).
2. Each kernel against the unfused equivalent (eager and torch.compile) at Yxanul-197M shapes: M = 16384
   tokens, K/N in {768, 128, 2048}; a BF16 GEMM of the same shape for scale.
3. The fused linear cross-entropy against full-logit F.cross_entropy (eager and compiled) for
   h [16384, 768] -> P [768, 128] -> W [200005, 128]: forward+backward time and peak memory.
Every item catches its own errors; the JSON is rewritten after each.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yxanul import kernels  # noqa: E402
from yxanul.kernels import linear_ce, reference  # noqa: E402

OUT = Path(os.environ.get("OUT", "./out"))
RESULT = {"device": None, "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          "correctness": [], "kernel_timing": [], "cross_entropy": []}


def save():
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = OUT / ".device_kernels.json.tmp"
    tmp.write_text(json.dumps(RESULT, indent=2))
    tmp.replace(OUT / "device_kernels.json")


def log(msg):
    print(msg, flush=True)


def guarded(section, name):
    def deco(fn):
        def run(*a, **k):
            try:
                entry = fn(*a, **k)
            except Exception as e:  # noqa: BLE001
                entry = {"name": name, "error": f"{type(e).__name__}: {e}".splitlines()[0][:400]}
                log(f"  {name}: FAILED {entry['error']}")
                traceback.print_exc(limit=3)
            entry.setdefault("name", name)
            RESULT[section].append(entry)
            save()
            return entry
        return run
    return deco


def same_fp8(a, b):
    return int((a.view(torch.uint8) != b.view(torch.uint8)).sum())


def diff_f32(a, b):
    return int((a != b).sum())


def check_case(op, M, K, dtype, kw):
    name = f"{op} {M}x{K} {str(dtype).replace('torch.', '')} {kw}"

    @guarded("correctness", name)
    def body():
        x = torch.randn(M, K, device="cuda", dtype=torch.float32) * torch.rand(M, 1, device="cuda") * 8
        x = x.to(dtype)
        x[0, :7] = 0
        if op == "rmsnorm_quant":
            w = torch.rand(K, device="cuda") + 0.5
            y, q, s = kernels.rmsnorm_quant(x, w, 1e-6, impl="triton", **kw)
            yr = reference.rmsnorm(x, w, 1e-6)
            qr, sr = reference.act_quant(y, **kw)
            rel = float(((y.float() - yr.float()).abs() / yr.float().abs().clamp_min(1e-3)).max())
            return {"fp8_mismatch": same_fp8(q, qr), "scale_mismatch": diff_f32(s, sr), "y_max_rel": rel,
                    "ok": same_fp8(q, qr) == 0 and diff_f32(s, sr) == 0 and rel < 1.6e-2}
        if op == "swiglu_quant":
            u = (torch.randn(M, K, device="cuda") * 2).to(dtype)
            h, q, s = kernels.swiglu_quant(x, u, impl="triton", **kw)
            hr = reference.swiglu(x, u)
            h = hr if h is None else h
            qr, sr = reference.act_quant(h, **{k: v for k, v in kw.items() if k != "return_h"})
            rel = float(((h.float() - hr.float()).abs() / hr.float().abs().clamp_min(1e-3)).max())
            return {"fp8_mismatch": same_fp8(q, qr), "scale_mismatch": diff_f32(s, sr), "h_max_rel": rel,
                    "ok": same_fp8(q, qr) == 0 and diff_f32(s, sr) == 0 and rel < 1.6e-2}
        out = getattr(kernels, op)(x, impl="triton", **kw)
        ref = getattr(reference, op)(x, **kw)
        fp8 = sum(same_fp8(a, b) for a, b in zip(out, ref) if a.dtype != torch.float32)
        sc = sum(diff_f32(a, b) for a, b in zip(out, ref) if a.dtype == torch.float32)
        shapes = all(a.shape == b.shape for a, b in zip(out, ref))
        return {"fp8_mismatch": fp8, "scale_mismatch": sc, "shapes_ok": shapes, "ok": fp8 == 0 and sc == 0 and shapes}
    r = body()
    log(f"  {name}: {'ok' if r.get('ok') else 'MISMATCH ' + json.dumps(r)}")


def bench(fn, warmup=5, rep=30):
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=warmup, rep=rep))  # ms


def compiled(fn):
    c = torch.compile(fn)
    return c


def time_kernel(name, fused, unfused, nbytes):
    @guarded("kernel_timing", name)
    def body():
        t_f = bench(fused)
        entry = {"fused_ms": t_f, "fused_gbps": nbytes / t_f / 1e6}
        t_e = bench(unfused)
        entry["unfused_eager_ms"] = t_e
        try:
            cf = compiled(unfused)
            cf()
            entry["unfused_compiled_ms"] = bench(cf)
        except Exception as e:  # noqa: BLE001
            entry["unfused_compiled_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        best = min(v for k, v in entry.items() if k.startswith("unfused") and k.endswith("_ms"))
        entry["speedup_vs_best_unfused"] = best / t_f
        return entry
    r = body()
    log(f"  {name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                                   if k != "name"))


def main():
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    torch.manual_seed(int(time.time()) % 100000)  # fresh data every run
    RESULT["device"] = torch.cuda.get_device_name()
    torch._dynamo.config.cache_size_limit = 64
    bf = torch.bfloat16
    log("1. correctness")
    for op, M, K, dt, kw in [
        ("act_quant", 16384, 768, bf, {}), ("act_quant", 16384, 2048, bf, {}), ("act_quant", 4100, 130, torch.float32, {}),
        ("act_quant", 4096, 768, bf, {"pow2_scales": True}), ("act_quant", 4096, 768, torch.float32, {"fmt": "e5m2"}),
        ("act_quant_t", 16384, 768, bf, {}), ("act_quant_t", 1000, 300, bf, {}),
        ("act_quant_dual", 16384, 768, bf, {}), ("act_quant_dual", 16384, 2048, bf, {}), ("act_quant_dual", 999, 200, bf, {}),
        ("weight_quant", 2048, 768, torch.float32, {}), ("weight_quant", 768, 2048, torch.float32, {}),
        ("weight_quant", 200, 300, bf, {"pow2_scales": True}),
        ("tensor_quant", 16384, 768, bf, {}), ("tensor_quant", 333, 77, torch.float32, {"fmt": "e5m2"}),
        ("rmsnorm_quant", 16384, 768, bf, {}), ("rmsnorm_quant", 100, 300, bf, {}),
        ("swiglu_quant", 16384, 2048, bf, {}), ("swiglu_quant", 100, 300, bf, {"return_h": False}),
    ]:
        check_case(op, M, K, dt, kw)

    log("2. kernel timing (M=16384)")
    M = 16384
    for K in (768, 2048, 128):
        x = torch.randn(M, K, device="cuda", dtype=bf)
        nb = x.numel() * 2 + x.numel() + M * (K // 128) * 4
        time_kernel(f"act_quant K={K}", lambda: kernels.act_quant(x), lambda: reference.act_quant(x), nb)
        time_kernel(f"act_quant_t K={K}", lambda: kernels.act_quant_t(x), lambda: reference.act_quant_t(x), nb)
        time_kernel(f"act_quant_dual K={K}", lambda: kernels.act_quant_dual(x),
                    lambda: reference.act_quant_dual(x), nb + x.numel())
        time_kernel(f"tensor_quant K={K}", lambda: kernels.tensor_quant(x), lambda: reference.tensor_quant(x), nb)
        for N in (768, 2048):
            wx = torch.randn(N, K, device="cuda", dtype=bf)
            time_kernel(f"bf16 gemm M={M} K={K} N={N} (fused=torch.mm, unfused=F.linear)",
                        lambda: x @ wx.t(), lambda: F.linear(x, wx), 2 * (M * K + N * K + M * N))
    for N, K in ((768, 768), (256, 768), (2048, 768), (768, 2048)):
        w = torch.randn(N, K, device="cuda")
        time_kernel(f"weight_quant {N}x{K}", lambda: kernels.weight_quant(w), lambda: reference.weight_quant(w),
                    w.numel() * 5)
    x = torch.randn(M, 768, device="cuda", dtype=bf)
    nw = torch.rand(768, device="cuda") + 0.5
    time_kernel("rmsnorm_quant K=768", lambda: kernels.rmsnorm_quant(x, nw, 1e-6),
                lambda: reference.act_quant(reference.rmsnorm(x, nw, 1e-6)), x.numel() * 5)
    g = torch.randn(M, 2048, device="cuda", dtype=bf)
    u = torch.randn(M, 2048, device="cuda", dtype=bf)
    time_kernel("swiglu_quant F=2048", lambda: kernels.swiglu_quant(g, u),
                lambda: reference.act_quant(F.silu(g) * u), g.numel() * 7)
    time_kernel("swiglu_quant F=2048 no h", lambda: kernels.swiglu_quant(g, u, return_h=False),
                lambda: reference.act_quant(F.silu(g) * u), g.numel() * 5)

    log("3. fused linear cross-entropy, h [16384, 768] @ P [768, 128] @ W [200005, 128]^T")
    h0 = torch.randn(M, 768, device="cuda") * 0.5
    P = (torch.randn(768, 128, device="cuda") / 768 ** 0.5).requires_grad_()
    W = (torch.randn(200005, 128, device="cuda") * 0.02).requires_grad_()
    t = torch.randint(0, 200005, (M,), device="cuda")

    def plain():
        h = h0.detach().to(bf).requires_grad_()
        with torch.autocast("cuda", dtype=bf):
            logits = (h @ P) @ W.t()
            loss = F.cross_entropy(logits.float(), t)
        loss.backward()
        return loss

    def fused(chunk=None, fp8=False, impl=None):
        def f():
            h = h0.detach().to(bf).requires_grad_()
            with torch.autocast("cuda", dtype=bf):
                loss = linear_ce.linear_cross_entropy(h, W, t, P=P, chunk=chunk, head_fp8=fp8, impl=impl)
            loss.backward()
            return loss
        return f

    plain_c = torch.compile(plain)
    ref_loss = None
    for name, fn in [("F.cross_entropy eager", plain), ("F.cross_entropy compiled", plain_c),
                     ("fused torch ops (no Triton)", fused(impl="torch")),
                     ("fused default chunk", fused()), ("fused chunk=2048", fused(2048)), ("fused chunk=4096", fused(4096)),
                     ("fused chunk=512", fused(512)), ("fused fp8 head", fused(None, True))]:
        @guarded("cross_entropy", name)
        def body():
            nonlocal ref_loss
            P.grad = W.grad = None
            loss = float(fn().detach())
            if ref_loss is None:
                ref_loss = loss
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
            ms = bench(fn, warmup=2, rep=20)
            return {"fwd_bwd_ms": ms, "extra_peak_gib": peak, "loss": loss, "loss_rel_diff": abs(loss - ref_loss) / ref_loss}
        r = body()
        log(f"  {name}: {r}")
    save()
    ok = all(c.get("ok") for c in RESULT["correctness"])
    log(f"done: correctness {'all ok' if ok else 'MISMATCHES'}; wrote {OUT / 'device_kernels.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
