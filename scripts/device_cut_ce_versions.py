"""Side-by-side check and timing of two versions of the cut cross-entropy kernels on a CUDA machine.

Usage: python scripts/device_cut_ce_versions.py OUT.json [N V K]   (default Yxanul-197M's head: 32768 200005 128)

Compares the current kernels (yxanul/kernels/cut_ce.py) with the baseline copy in scripts/baselines/cut_ce_v1.py
on the same BF16 operands: lse and target logit of the forward, dh and dW of the backward against each other and
against a chunked FP32 reference (torch). Times each kernel (forward, dh, dW) with CUDA events, versions
interleaved, median of 15, over three input sets in rotation. Writes OUT.json and prints a table.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import torch

from yxanul.io import atomic_write_json
from yxanul.kernels import cut_ce


def _baseline():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "baselines", "cut_ce_v1.py")
    spec = importlib.util.spec_from_file_location("cut_ce_v1", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def reference(h, W, t, sc, chunk=4096):
    """FP32 lse, target logit, dh, dW over chunks of tokens (loss = sum_i sc_i * CE_i)."""
    hf, Wf = h.float(), W.float()
    lse, xt = [], []
    dh = torch.zeros_like(hf)
    dW = torch.zeros_like(Wf)
    for i in range(0, h.shape[0], chunk):
        x = hf[i:i + chunk] @ Wf.t()
        l = torch.logsumexp(x, dim=1)
        tt = t[i:i + chunk]
        ok = (tt >= 0) & (tt < W.shape[0])
        xti = torch.where(ok, x.gather(1, tt.clamp(0, W.shape[0] - 1)[:, None])[:, 0], torch.zeros_like(l))
        g = torch.softmax(x, dim=1)
        g[ok.nonzero()[:, 0], tt[ok]] -= 1.0
        g *= sc[i:i + chunk, None]
        dh[i:i + chunk] = g @ Wf
        dW += g.t() @ hf[i:i + chunk]
        lse.append(l)
        xt.append(xti)
    return torch.cat(lse), torch.cat(xt), dh, dW


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def main():
    out = sys.argv[1]
    N, V, K = (int(x) for x in sys.argv[2:5]) if len(sys.argv) > 4 else (32768, 200005, 128)
    versions = {"v1": _baseline(), "current": cut_ce}
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run of the checks (TRITON_INTERPRET=1, FP32)
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    sets = []
    for seed in range(3):
        g = torch.Generator(device=dev).manual_seed(seed)
        h = torch.randn(N, K, device=dev, generator=g).to(dt)
        W = (torch.randn(V, K, device=dev, generator=g) * 0.05).to(dt)
        t = torch.randint(0, V, (N,), device=dev, generator=g)
        t[::97] = -1
        t[1], t[2] = V - 1, 0
        sets.append((h, W, t, torch.full((N,), 1.0 / N, device=dev)))
    h, W, t, sc = sets[0]
    ref = reference(h, W, t, sc)
    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__, "N": N, "V": V, "K": K, "checks": {},
           "ms": {}}
    outs = {}
    for name, mod in versions.items():
        lse, xt = mod.lce_forward(h, W, t)
        dh, dW = mod.lce_backward(h, W, t, lse, sc)
        outs[name] = (lse, xt, dh, dW)
        res["checks"][name] = {"lse_max_abs_vs_fp32": float((lse - ref[0]).abs().max()),
                               "target_logit_max_abs_vs_fp32": float((xt - ref[1]).abs().max()),
                               "dh_rel_vs_fp32": rel(dh, ref[2]), "dw_rel_vs_fp32": rel(dW, ref[3]),
                               "finite": bool(torch.isfinite(lse).all() and torch.isfinite(dh).all()
                                              and torch.isfinite(dW).all())}
    a, b = outs["current"], outs["v1"]
    res["checks"]["current_vs_v1"] = {"lse_max_abs": float((a[0] - b[0]).abs().max()),
                                      "target_logit_max_abs": float((a[1] - b[1]).abs().max()),
                                      "dh_rel": rel(a[2], b[2]), "dw_rel": rel(a[3], b[3])}

    def kernels(mod, s):
        hh, WW, tt, ss = s
        return {"fwd": lambda: mod.lce_forward(hh, WW, tt),
                "dh": lambda: mod.lce_backward(hh, WW, tt, lse_of[id(s)], ss, need_w=False),
                "dw": lambda: mod.lce_backward(hh, WW, tt, lse_of[id(s)], ss, need_h=False)}

    if dev == "cpu":
        print(json.dumps(res["checks"], indent=1))
        return
    lse_of = {id(s): cut_ce.lce_forward(s[0], s[1], s[2])[0] for s in sets}
    times = {(n, k): [] for n in versions for k in ("fwd", "dh", "dw")}
    fns = {(n, i): kernels(mod, s) for n, mod in versions.items() for i, s in enumerate(sets)}
    for f in fns.values():  # warm-up and compilation
        for fn in f.values():
            fn()
    torch.cuda.synchronize()
    for rep in range(15):
        for n in versions:
            for k in ("fwd", "dh", "dw"):
                fn = fns[(n, rep % len(sets))][k]
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                fn()
                e1.record()
                torch.cuda.synchronize()
                times[(n, k)].append(e0.elapsed_time(e1))
    for (n, k), ts in times.items():
        ts.sort()
        res["ms"].setdefault(n, {})[k] = {"median": ts[len(ts) // 2], "min": ts[0], "max": ts[-1]}
    for n in versions:
        res["ms"][n]["total_median"] = sum(res["ms"][n][k]["median"] for k in ("fwd", "dh", "dw"))
    atomic_write_json(out, res)
    print(json.dumps(res["checks"], indent=1))
    print(f"{'kernel':8} {'v1 ms':>8} {'current ms':>11} {'ratio':>6}")
    for k in ("fwd", "dh", "dw", "total_median"):
        v1 = res["ms"]["v1"][k]["median"] if k != "total_median" else res["ms"]["v1"][k]
        cu = res["ms"]["current"][k]["median"] if k != "total_median" else res["ms"]["current"][k]
        print(f"{k:8} {v1:8.3f} {cu:11.3f} {v1 / cu:6.3f}")


if __name__ == "__main__":
    main()
