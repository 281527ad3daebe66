"""Side-by-side check and timing of versions of the cut cross-entropy kernels on a CUDA machine.

Usage: python scripts/device_cut_ce_versions.py OUT.json [N V K]   (default Yxanul-197M's head: 32768 200005 128)

Compares the current kernels (yxanul/kernels/cut_ce.py) with their earlier versions v1 and v2, taken from git
history (BASELINES), on the same BF16 operands: lse and target logit of the forward, dh and dW of the backward against a chunked FP32
reference (torch). Times each kernel with CUDA events, versions interleaved, median of 10, over three input sets
in rotation: v1 and v2 run forward, dh and dW; the current version runs the forward with dh (what training
uses), the forward alone and dW, the fused kernel at several tile shapes. Writes OUT.json and prints a table.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import torch

from yxanul.io import atomic_write_json
from yxanul.kernels import cut_ce


# the earlier versions of yxanul/kernels/cut_ce.py, taken from git history
BASELINES = {"v1": "d48141c29dc008ef7380539a49a386a9a3623868", "v2": "86229072b53f67e20874fd0c5b51cb2629486b2f"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _baseline(name):
    """The module of version `name`, from ``git show COMMIT:yxanul/kernels/cut_ce.py`` (written to a temporary
    file), or from ``$BASELINE_DIR/cut_ce_<name>.py`` on a machine without the repository's history."""
    path = os.path.join(os.environ.get("BASELINE_DIR") or tempfile.mkdtemp(), f"cut_ce_{name}.py")
    if not os.path.exists(path):
        src = subprocess.run(["git", "-C", REPO, "show", f"{BASELINES[name]}:yxanul/kernels/cut_ce.py"],
                             capture_output=True, text=True, check=True).stdout
        with open(path, "w") as f:
            f.write(src)
    spec = importlib.util.spec_from_file_location(f"cut_ce_{name}", path)
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
    versions = {"v1": _baseline("v1"), "v2": _baseline("v2"), "current": cut_ce}
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
        sets.append((h, W, t, torch.full((N,), 1.0 / N, device=dev) * (t >= 0)))
    h, W, t, sc = sets[0]
    ref = reference(h, W, t, sc)
    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
           "N": N, "V": V, "K": K, "configs": dict(cut_ce.CONFIGS), "checks": {}, "ms": {}}
    for name, mod in versions.items():
        if name == "current":
            lse, xt, dh1 = mod.lce_forward_dh(h, W, t)
            dh = dh1 * sc[:, None]
            _, dW = mod.lce_backward(h, W, t, lse, sc, need_h=False)
            lse0, xt0 = mod.lce_forward(h, W, t)
            extra = {"forward_alone_lse_max_abs_vs_fp32": float((lse0 - ref[0]).abs().max()),
                     "forward_alone_target_logit_max_abs_vs_fp32": float((xt0 - ref[1]).abs().max())}
        else:
            lse, xt = mod.lce_forward(h, W, t)
            dh, dW = mod.lce_backward(h, W, t, lse, sc)
            extra = {}
        res["checks"][name] = {"lse_max_abs_vs_fp32": float((lse - ref[0]).abs().max()),
                               "target_logit_max_abs_vs_fp32": float((xt - ref[1]).abs().max()),
                               "dh_rel_vs_fp32": rel(dh, ref[2]), "dw_rel_vs_fp32": rel(dW, ref[3]),
                               "finite": bool(torch.isfinite(lse).all() and torch.isfinite(dh).all()
                                              and torch.isfinite(dW).all()), **extra}
    print(json.dumps(res["checks"], indent=1), flush=True)
    if dev == "cpu":
        return
    lse_of = {id(s): cut_ce.lce_forward(s[0], s[1], s[2])[0] for s in sets}

    def fns(name, mod, s):
        hh, WW, tt, ss = s
        if name == "current":
            return {"fwd+dh": lambda: mod.lce_forward_dh(hh, WW, tt), "fwd": lambda: mod.lce_forward(hh, WW, tt),
                    "dw": lambda: mod.lce_backward(hh, WW, tt, lse_of[id(s)], ss, need_h=False)}
        return {"fwd": lambda: mod.lce_forward(hh, WW, tt),
                "dh": lambda: mod.lce_backward(hh, WW, tt, lse_of[id(s)], ss, need_w=False),
                "dw": lambda: mod.lce_backward(hh, WW, tt, lse_of[id(s)], ss, need_h=False)}

    def time_all(table):
        for f in table.values():  # warm-up and compilation
            for fn in f.values():
                fn()
        torch.cuda.synchronize()
        times = {}
        for rep in range(10):
            for (name, i), f in table.items():
                if i != rep % len(sets):
                    continue
                for k, fn in f.items():
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                    fn()
                    e1.record()
                    torch.cuda.synchronize()
                    times.setdefault((name, k), []).append(e0.elapsed_time(e1))
        return {key: sorted(ts)[len(ts) // 2] for key, ts in times.items()}

    med = time_all({(n, i): fns(n, mod, s) for n, mod in versions.items() for i, s in enumerate(sets)})
    for (n, k), ms in med.items():
        res["ms"].setdefault(n, {})[k] = ms
    for n, row in res["ms"].items():
        row["training_step"] = (row["fwd+dh"] if n == "current" else row["fwd"] + row["dh"]) + row["dw"]
    base = cut_ce.CONFIGS["fwd_dh"]
    res["fwd_dh_tiles"] = {}
    for cfg in ((128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 4, 3), (64, 64, 4, 4)):
        cut_ce.CONFIGS["fwd_dh"] = cfg
        try:
            m = time_all({("tile", i): {"fwd+dh": (lambda s=s: cut_ce.lce_forward_dh(s[0], s[1], s[2]))}
                          for i, s in enumerate(sets)})
            res["fwd_dh_tiles"][str(cfg)] = m[("tile", "fwd+dh")]
        except Exception as e:  # noqa: BLE001 - a tile shape that does not compile is recorded, not fatal
            res["fwd_dh_tiles"][str(cfg)] = f"{type(e).__name__}: {str(e)[:200]}"
    cut_ce.CONFIGS["fwd_dh"] = base
    atomic_write_json(out, res)
    for n, row in res["ms"].items():
        print(n, {k: round(v, 3) for k, v in row.items()})
    print("fwd+dh tiles (BM, BV, warps, stages):", res["fwd_dh_tiles"])


if __name__ == "__main__":
    main()
