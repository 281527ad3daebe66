"""Fused linear cross-entropy against F.cross_entropy on full FP32 logits: loss and every gradient."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from yxanul.errors import YxanulError
from yxanul.kernels.linear_ce import (default_chunk, linear_cross_entropy, reference_cross_entropy,
                                      use_fused_ce)


def _data(N=41, d=24, r=16, V=97, factorized=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g).requires_grad_()
    P = (torch.randn(d, r, generator=g) / math.sqrt(d)).requires_grad_() if factorized else None
    W = torch.randn(V, r if factorized else d, generator=g).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[::4] = -1
    return h, P, W, t


def _grads(loss_fn, tensors, scale=1.0):
    for x in tensors:
        x.grad = None
    loss = loss_fn()
    (loss * scale).backward()
    return loss.detach(), [x.grad.clone() for x in tensors]


@pytest.mark.parametrize("factorized", [True, False])
@pytest.mark.parametrize("chunk", [1, 7, 41, 1000])
def test_loss_and_grads_match_reference(factorized, chunk):
    h, P, W, t = _data(factorized=factorized)
    ts = [x for x in (h, P, W) if x is not None]
    l1, g1 = _grads(lambda: linear_cross_entropy(h, W, t, P=P, chunk=chunk), ts, scale=2.5)
    l2, g2 = _grads(lambda: reference_cross_entropy(h, W, t, P=P), ts, scale=2.5)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_ignored_rows_get_zero_grad_and_all_ignored_is_nan():
    h, P, W, t = _data(factorized=False)
    _, (gh, _) = _grads(lambda: linear_cross_entropy(h, W, t, chunk=5), [h, W])
    assert torch.all(gh[t == -1] == 0) and torch.all(gh[t != -1].abs().sum(1) > 0)
    t_all = torch.full_like(t, -1)
    loss = linear_cross_entropy(h, W, t_all)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(h @ W.t(), t_all, ignore_index=-1))


def test_custom_ignore_index_and_3d_input():
    h, P, W, t = _data(N=24, factorized=False)
    t2 = torch.where(t == -1, torch.full_like(t, -100), t)
    a = linear_cross_entropy(h.view(2, 12, -1), W, t2.view(2, 12), ignore_index=-100, chunk=5)
    b = F.cross_entropy(h @ W.t(), t2, ignore_index=-100)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_no_grad_and_frozen_weight():
    h, P, W, t = _data(factorized=False)
    with torch.no_grad():
        a = linear_cross_entropy(h, W, t, chunk=8)
    torch.testing.assert_close(a, reference_cross_entropy(h, W, t).detach(), rtol=1e-5, atol=1e-5)
    W2 = W.detach()
    loss = linear_cross_entropy(h, W2, t, chunk=8)
    loss.backward()
    assert h.grad is not None and W2.grad is None


def test_autocast_bf16_close_to_fp32():
    h, P, W, t = _data(factorized=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = linear_cross_entropy(h, W, t, P=P, chunk=16)
        a.backward()
    assert W.grad.dtype == torch.float32 and h.grad.dtype == torch.float32 and P.grad.dtype == torch.float32
    b = reference_cross_entropy(h, W, t, P=P).detach()
    assert abs(float(a.detach()) - float(b)) / float(b) < 0.03


def test_fp8_head_emulated_close():
    h, P, W, t = _data(factorized=False)
    a = linear_cross_entropy(h, W, t, chunk=16, head_fp8=True)
    af = float(a.detach())
    b = reference_cross_entropy(h, W, t).detach()
    assert af != float(b)  # the head really went through FP8
    assert abs(af - float(b)) / float(b) < 0.05
    a.backward()
    assert torch.isfinite(W.grad).all() and torch.isfinite(h.grad).all()


def test_model_plugin_matches_default_loss(tiny_cfg):
    from yxanul.model import Yxanul
    torch.manual_seed(0)
    model = Yxanul(tiny_cfg)
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 16))
    tgt = torch.randint(0, tiny_cfg.vocab_size, (2, 16))
    tgt[0, :3] = -1
    ref = model(idx, tgt)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    use_fused_ce(model, chunk=8)
    got = model(idx, tgt)
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_default_chunk_bounds():
    assert default_chunk(16384, 200005) == 1024
    assert default_chunk(10, 200005) == 10
    assert default_chunk(1 << 20, 257) == 1 << 19  # 2^30 bytes / (4 * 257) rounded down to a power of two


@pytest.mark.parametrize("bad", [
    lambda h, P, W, t: linear_cross_entropy(h, W, t[:-1]),
    lambda h, P, W, t: linear_cross_entropy(h, W[:, :5], t),
    lambda h, P, W, t: linear_cross_entropy(h, W, t, chunk=0),
    lambda h, P, W, t: linear_cross_entropy(h, W, t, P=torch.randn(3, 4)),
    lambda h, P, W, t: linear_cross_entropy(h[0], W, t),
])
def test_bad_input(bad):
    h, P, W, t = _data(factorized=False)
    with pytest.raises(YxanulError):
        bad(h, P, W, t)


@pytest.mark.gpu
def test_cuda_bf16_triton_and_fp8_head():
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(512, 128, device=dev, generator=g).requires_grad_()
    W = (torch.randn(1000, 128, device=dev, generator=g) * 0.1).requires_grad_()
    t = torch.randint(0, 1000, (512,), device=dev, generator=g)
    t[::7] = -1
    ref = float(reference_cross_entropy(h, W, t).detach())
    grads = {}
    for impl, fp8 in (("torch", False), ("triton", False), ("triton", True), ("cut", False)):
        h.grad = W.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            a = linear_cross_entropy(h, W, t, chunk=128, head_fp8=fp8, impl=impl)
        a.backward()
        grads[(impl, fp8)] = (h.grad.clone(), W.grad.clone())
        assert abs(float(a.detach()) - ref) / ref < (0.05 if fp8 else 0.01)
    for other in (("triton", False), ("cut", False)):
        for a, b in zip(grads[("torch", False)], grads[other]):
            torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-4)
    h.grad = W.grad = None
    reference_cross_entropy(h, W, t).backward()  # full FP32 logits, autograd: independent of the chunked GEMMs
    for impl in ("torch", "triton", "cut"):
        for a, b in zip(grads[(impl, False)], (h.grad, W.grad)):
            assert float((a.float() - b).norm() / b.norm()) < 2e-2, impl


_INTERP_SNIPPET = r"""
import json, torch
from yxanul.kernels.linear_ce import linear_cross_entropy, reference_cross_entropy
out = []
for V, K, chunk, impl in ((97, 24, 8, "triton"), (5000, 24, 16, "triton"), (97, 24, None, "cut"),
                          (1000, 24, None, "cut"), (96, 32, None, "cut")):
    g = torch.Generator().manual_seed(V)
    h = torch.randn(37, K, generator=g).requires_grad_()
    W = torch.randn(V, K, generator=g).requires_grad_()
    t = torch.randint(0, V, (37,), generator=g); t[::4] = -1
    t[1], t[2] = V - 1, 0  # the last column (in the partial tile unless V fills the tiles) and the first
    l1 = linear_cross_entropy(h, W, t, chunk=chunk, impl=impl); (l1 * 2).backward()
    g1 = (h.grad.clone(), W.grad.clone()); h.grad = W.grad = None
    l2 = reference_cross_entropy(h, W, t); (l2 * 2).backward()
    gref = (h.grad.clone(), W.grad.clone()); h.grad = W.grad = None
    with torch.no_grad():  # the forward alone
        l3 = linear_cross_entropy(h.detach(), W.detach(), t, chunk=chunk, impl=impl)
    h.requires_grad_(False)  # only the weight's gradient
    (linear_cross_entropy(h, W, t, chunk=chunk, impl=impl) * 2).backward()
    gw_only = W.grad.clone(); h.requires_grad_(True); h.grad = W.grad = None
    out.append({"impl": impl, "loss": abs(float(l1.detach()) - float(l2.detach())),
                "loss_nograd": abs(float(l3) - float(l2.detach())),
                "gh": float((g1[0] - gref[0]).abs().max()), "gw": float((g1[1] - gref[1]).abs().max()),
                "gw_only": float((gw_only - gref[1]).abs().max()),
                "ignored_zero": bool((g1[0][t == -1] == 0).all())})
# the cut kernels one by one against float64, including the public grad-h kernel, and a head whose logits are
# all about -100 (a zero logit past V would overflow exp there), V = 33 against tiles of 32
from yxanul.kernels import cut_ce
from yxanul.kernels.linear_ce import _CutLinearCrossEntropy
for V, K, shift in ((97, 24, 0.0), (96, 32, 0.0), (33, 16, -100.0)):
    g = torch.Generator().manual_seed(V + K)
    h = torch.randn(37, K, generator=g) * 0.3
    W = torch.randn(V, K, generator=g) * 0.3
    h[:, 0] = 1.0; W[:, 0] = shift
    t = torch.randint(0, V, (37,), generator=g); t[::5] = -1; t[3] = V - 1
    sc = (t >= 0).double() / 7
    x = h.double() @ W.double().t()
    lse_r = torch.logsumexp(x, 1)
    xt_r = torch.where(t >= 0, x.gather(1, t.clamp_min(0)[:, None])[:, 0], torch.zeros_like(lse_r))
    gr = torch.softmax(x, 1)
    gr[(t >= 0).nonzero()[:, 0], t[t >= 0]] -= 1
    gr *= sc[:, None]
    dh_r, dw_r = gr @ W.double(), gr.t() @ h.double()
    lse, xt = cut_ce.lce_forward(h, W, t)
    lse2, xt2, dh1 = cut_ce.lce_forward_dh(h, W, t)
    dh, dw = cut_ce.lce_backward(h, W, t, lse, sc.float())
    hq = h.clone().requires_grad_()
    l4 = _CutLinearCrossEntropy.apply(hq, W, t, -1, torch.float32, False)  # h's gradient left to the backward
    l4.backward()
    out.append({"impl": f"kernels V={V} K={K} shift={shift}", "scale": 1.0 + abs(shift),
                "fwd": max(float((lse - lse_r).abs().max()), float((xt - xt_r).abs().max())),
                "fwd_dh": max(float((lse2 - lse_r).abs().max()), float((xt2 - xt_r).abs().max()),
                              float((dh1 * sc[:, None] - dh_r).abs().max())),
                "bwd": max(float((dh - dh_r).abs().max()), float((dw - dw_r).abs().max())),
                "late_dh": float((hq.grad - dh_r * 7 / float((t >= 0).sum())).abs().max()),
                "finite": bool(torch.isfinite(dh).all() and torch.isfinite(dh1).all() and torch.isfinite(dw).all())})
print("RESULTS " + json.dumps(out))
"""


def test_triton_kernels_interpreted():
    """Under TRITON_INTERPRET=1 (FP32: the CPU interpreter's tl.dot mis-handles BF16 operands): the chunked
    softmax-gradient kernel and the register-only cut kernels (partial token tiles; partial and whole last
    vocabulary tiles; K < BK and K = BK; targets in the first and last columns)."""
    import json
    import os
    import subprocess
    import sys
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", _INTERP_SNIPPET], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULTS ")][-1][8:])
    assert [r["impl"] for r in res].count("cut") == 3
    kern = [r for r in res if r["impl"].startswith("kernels")]
    assert len(kern) == 3
    for r in kern:
        # FP32 exponentials of logits near -100 carry about 1e-5 relative error; gradients of that size of head
        # are differences of such terms, so the bound grows with the logits' magnitude
        tol = 2e-5 * r["scale"]
        assert r["finite"] and r["fwd"] < tol and r["fwd_dh"] < tol and r["bwd"] < tol and r["late_dh"] < tol, r
    for r in res:
        if r in kern:
            continue
        assert r["loss"] < 1e-4 and r["loss_nograd"] < 1e-4 and r["gh"] < 1e-5 and r["gw"] < 1e-5, r
        assert r["gw_only"] < 1e-5 and r["ignored_zero"], r


def test_cut_impl_refuses_wide_or_fp8_heads():
    h, P, W, t = _data(factorized=False)
    with pytest.raises(YxanulError, match="rank"):
        linear_cross_entropy(h, torch.randn(W.shape[0], 300), t, P=torch.randn(h.shape[1], 300), impl="cut")
    with pytest.raises(YxanulError, match="FP8"):
        linear_cross_entropy(h, W, t, head_fp8=True, impl="cut")
    with pytest.raises(YxanulError, match="implementation"):
        linear_cross_entropy(h, W, t, impl="fast")


@pytest.mark.parametrize("bad_id", [-5, 97, 1000])
def test_out_of_vocabulary_target_is_refused(bad_id):
    h, P, W, t = _data(factorized=False)  # V = 97
    t = t.clone()
    t[3] = bad_id
    with pytest.raises(YxanulError, match="outside the vocabulary"):
        linear_cross_entropy(h, W, t)
    t[3] = -1  # the ignore index is fine
    assert torch.isfinite(linear_cross_entropy(h, W, t))


def test_fused_loss_inside_a_compiled_model_matches_eager(tiny_cfg):
    """torch.compile(model) with the fused loss: the loss runs eagerly (a graph break), same numbers."""
    import dataclasses
    from yxanul.kernels.linear_ce import use_fused_ce
    from yxanul.model import Yxanul
    cfg = dataclasses.replace(tiny_cfg, n_layers=1)
    torch.manual_seed(0)
    m = use_fused_ce(Yxanul(cfg))
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    want = m(x, x)
    torch._dynamo.reset()
    got = torch.compile(m, backend="aot_eager")(x, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cut_launch_halves_the_tile_when_a_gpu_runs_out_of_resources(monkeypatch):
    """The tile configurations were chosen at K = 128; a wider head that does not fit retries with half the
    program's tile (and two pipeline stages) instead of failing, and gives up below 16."""
    pytest.importorskip("triton")
    from yxanul.kernels import cut_ce
    monkeypatch.setattr(cut_ce, "_interpreting", lambda: False)
    err = cut_ce._out_of_resources()
    calls = []

    class Kernel:
        def __init__(self, fits):
            self.fits = fits

        def __getitem__(self, grid):
            def run(*args, BM, BV, num_warps, num_stages, **meta):
                calls.append((grid, BM, BV, num_stages))
                if not self.fits(BM, BV):
                    raise err(232448, 232448, "shared memory") if err is not RuntimeError else err("out")
            return run

    cut_ce._launch("fwd_dh", Kernel(lambda bm, bv: bm <= 32), 1000, ())
    bm, bv, _, ns = cut_ce.CONFIGS["fwd_dh"]
    assert calls[0] == ((-(-1000 // bm),), bm, bv, ns)
    assert calls[-1] == ((-(-1000 // 32),), 32, bv, 2) and len(calls) == 3
    calls.clear()
    cut_ce._launch("dw", Kernel(lambda bm, bv: bv <= 64), 500, ())
    assert [c[2] for c in calls] == [cut_ce.CONFIGS["dw"][1], 64] and calls[-1][0] == (-(-500 // 64),)
    with pytest.raises(err):
        cut_ce._launch("fwd", Kernel(lambda bm, bv: False), 10, ())


def test_weight_gradient_accumulation_falls_back_once_and_keeps_real_errors(monkeypatch):
    """_add_wgrad (chunked loss): where torch refuses addmm with an FP32 output, it warns once and adds a separate
    product from then on; running out of memory is raised, not taken for a refusal."""
    from yxanul.kernels import linear_ce
    monkeypatch.setattr(linear_ce, "_FP32_ADDMM", [True])
    monkeypatch.setattr(linear_ce, "_fp32_addmm_applies", lambda g, t: True)
    real_addmm, calls = torch.addmm, []

    def refusing(*a, **k):
        calls.append(k.get("out_dtype"))
        raise RuntimeError("expected mat1 and mat2 to have the same dtype")

    monkeypatch.setattr(torch, "addmm", refusing)
    g = torch.zeros(5, 3)
    gt, hc = torch.randn(5, 4).bfloat16(), torch.randn(4, 3).bfloat16()
    with pytest.warns(RuntimeWarning, match="FP32 output"):
        linear_ce._add_wgrad(g, gt, hc)
    linear_ce._add_wgrad(g, gt, hc)  # no second attempt, no second warning
    assert calls == [torch.float32] and linear_ce._FP32_ADDMM == [False]
    torch.testing.assert_close(g, 2 * (gt @ hc).float())
    monkeypatch.setattr(linear_ce, "_FP32_ADDMM", [True])
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("oom")))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        linear_ce._add_wgrad(g, gt, hc)
    assert linear_ce._FP32_ADDMM == [True]
    monkeypatch.setattr(torch, "addmm", real_addmm)
