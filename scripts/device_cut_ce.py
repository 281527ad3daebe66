"""GPU check and timing of the fused linear cross-entropy paths at Yxanul-197M's head shape.

Usage: python3 scripts/device_cut_ce.py OUT.json [N] [V] [K]

For each path (cut kernels with several tile configurations, chunked Triton softmax kernel, chunked torch,
and the unfused F.cross_entropy over full logits) it checks loss and gradients against the chunked torch path
on the same BF16 operands and times forward + backward with CUDA events (median of 5 after 2 warm-ups).
"""
from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from yxanul.kernels import cut_ce
from yxanul.kernels.linear_ce import linear_cross_entropy


def timed(fn, reps=5, warm=2):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def main():
    out = sys.argv[1]
    N = int(sys.argv[2]) if len(sys.argv) > 2 else 32768
    V = int(sys.argv[3]) if len(sys.argv) > 3 else 200005
    K = int(sys.argv[4]) if len(sys.argv) > 4 else 128
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(N, K, device="cuda", generator=g).bfloat16().requires_grad_()
    W = (torch.randn(V, K, device="cuda", generator=g) * 0.05).requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    t[::97] = -1

    def run(impl):
        h.grad = W.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = linear_cross_entropy(h, W, t, impl=impl)
        loss.backward()
        return loss

    def plain():
        h.grad = W.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = h @ W.t()
        loss = F.cross_entropy(logits.float(), t, ignore_index=-1)
        loss.backward()
        return loss

    ref_loss = float(run("torch").detach())
    ref = (h.grad.float().clone(), W.grad.float().clone())

    def check(name, fn):
        loss = float(fn().detach())
        gh, gw = h.grad.float(), W.grad.float()
        return {"path": name, "loss": loss, "loss_rel_diff": abs(loss - ref_loss) / abs(ref_loss),
                "grad_h_rel_err": float((gh - ref[0]).norm() / ref[0].norm()),
                "grad_w_rel_err": float((gw - ref[1]).norm() / ref[1].norm()),
                "ms": timed(fn)}

    rows = [check("torch-chunked", lambda: run("torch")), check("triton-chunked", lambda: run("triton"))]
    try:
        rows.append(check("unfused F.cross_entropy", plain))
    except torch.cuda.OutOfMemoryError:
        rows.append({"path": "unfused F.cross_entropy", "error": "out of memory"})
    h.grad = W.grad = None
    torch.cuda.empty_cache()
    base = dict(cut_ce.CONFIGS)
    variants = [base,
                {"fwd": (64, 128, 4, 3), "dh": (64, 128, 4, 3), "dw": (64, 128, 4, 3)},
                {"fwd": (128, 256, 8, 3), "dh": (128, 256, 8, 3), "dw": (256, 128, 8, 3)},
                {"fwd": (128, 128, 4, 4), "dh": (128, 128, 4, 4), "dw": (128, 128, 4, 4)},
                {"fwd": (256, 128, 8, 3), "dh": (128, 64, 4, 4), "dw": (128, 64, 4, 4)},
                {"fwd": (64, 256, 8, 3), "dh": (64, 256, 8, 3), "dw": (64, 256, 8, 3)}]
    for cfg in variants:
        cut_ce.CONFIGS.update(cfg)
        name = "cut " + json.dumps(cfg)
        try:
            row = check(name, lambda: run("cut"))
            # per-kernel times at this configuration
            hc, Wc = h.detach(), W.detach().bfloat16()
            lse, _ = cut_ce.lce_forward(hc, Wc, t)
            sc = torch.full((N,), 1.0 / N, device="cuda")
            row["fwd_ms"] = timed(lambda: cut_ce.lce_forward(hc, Wc, t))
            row["dh_ms"] = timed(lambda: cut_ce.lce_backward(hc, Wc, t, lse, sc, need_w=False))
            row["dw_ms"] = timed(lambda: cut_ce.lce_backward(hc, Wc, t, lse, sc, need_h=False))
        except Exception as e:  # noqa: BLE001 - a config that does not compile is recorded, not fatal
            row = {"path": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    cut_ce.CONFIGS.update(base)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "N": N, "V": V, "K": K,
           "reference": "torch-chunked (BF16 logits, FP32 softmax)", "rows": rows}
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
