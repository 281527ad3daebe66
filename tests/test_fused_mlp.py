"""The fused FP8 gate/up/SwiGLU function (delayed scaling) against the unfused layers, on the CPU (emulated GEMMs,
reference SwiGLU-backward quantizer)."""
from __future__ import annotations

import copy

import pytest
import torch

from yxanul.errors import YxanulError
from yxanul.fp8 import fused_mlp, registry
from yxanul.fp8.linear import convert_model, fp8_step, unconvert_model
from yxanul.fp8.options import Fp8Options
from yxanul.model import MLP, Yxanul
from yxanul.precision import load_policy


def _model(tiny_cfg, recipe="delayed", fused=True):
    torch.manual_seed(0)
    m = Yxanul(tiny_cfg)
    pol = load_policy(None).with_recipe(name=recipe, calibration_steps=0).with_fp8_options(fused_swiglu=fused)
    return convert_model(m, pol, backend="emulated", quiet=True)


def _count_swiglu_bwd(monkeypatch) -> list:
    """Count the calls of the SwiGLU-backward quantizer the fused function takes from the registry."""
    calls = []
    real = registry.kernel("swiglu_bwd_quant", fused_mlp.swiglu_bwd_quant)
    monkeypatch.setitem(registry._KERNELS, "swiglu_bwd_quant", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _step(m, idx):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(idx, idx)
    loss.backward()
    return loss


def test_fused_swiglu_matches_the_unfused_layers(tiny_cfg, monkeypatch):
    """Same loss, and gradients as close to BF16's as the unfused FP8 layers' are (the two differ by FP8 rounding
    flips: dgate/dup are quantized from FP32 here, from their BF16 rounding unfused)."""
    calls = _count_swiglu_bwd(monkeypatch)
    torch.manual_seed(0)
    bf16 = Yxanul(tiny_cfg)
    m = _model(tiny_cfg)
    mlps = [x for x in m.modules() if isinstance(x, MLP)]
    assert mlps and all(x.fused_gate_up is not None for x in mlps)
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    _step(m, idx)  # the first step scales by the current amax; fp8_step then fixes the scales
    m.zero_grad(set_to_none=True)
    assert not calls  # unfused until every scale is fixed
    fp8_step(m)
    assert all(x._scales_fixed for x in m.modules() if hasattr(x, "_scales_fixed"))
    ref = copy.deepcopy(m)
    for x in ref.modules():
        if isinstance(x, MLP):
            x.fused_gate_up = None  # the same layers, unfused
    loss_ref = _step(ref, idx)
    assert not calls
    loss = _step(m, idx)
    assert len(calls) == len(mlps)
    assert loss.item() == loss_ref.item()  # the forward is the same computation
    _step(bf16, idx)
    fused = {n: p.grad for n, p in m.named_parameters()}
    unfused = {n: p.grad for n, p in ref.named_parameters()}
    for n, p in bf16.named_parameters():
        b = p.grad
        e_fused = ((fused[n] - b).norm() / b.norm()).item()
        e_unfused = ((unfused[n] - b).norm() / b.norm()).item()
        assert e_fused <= 1.1 * e_unfused + 5e-3, (n, e_fused, e_unfused)
        assert ((fused[n] - unfused[n]).norm() / unfused[n].norm()).item() < 0.1, n
    for a, b in zip(m.modules(), ref.modules()):
        if hasattr(a, "amax_history"):
            assert torch.equal(a.amax_history[0, :2], b.amax_history[0, :2])  # x, w: the same forward
    # the last block's gate/up see the same dh both ways: their dy amax differs only by BF16 rounding (earlier
    # blocks' inputs already differ by FP8 rounding flips)
    last, last_ref = m.layers[-1].mlp, ref.layers[-1].mlp
    for name in ("gate_proj", "up_proj"):
        torch.testing.assert_close(getattr(last, name).amax_history[0, 2], getattr(last_ref, name).amax_history[0, 2],
                                   rtol=1e-2, atol=0)


def test_fused_swiglu_installs_only_for_delayed_and_goes_with_unconvert(tiny_cfg):
    """Only delayed-scaling gate/up pairs with the fused_swiglu option get the fused function."""
    m = _model(tiny_cfg, "tensorwise")
    assert all(x.fused_gate_up is None for x in m.modules() if isinstance(x, MLP))
    m = _model(tiny_cfg, fused=False)
    assert all(x.fused_gate_up is None for x in m.modules() if isinstance(x, MLP))
    m = _model(tiny_cfg)
    assert all(x.fused_gate_up is not None for x in m.modules() if isinstance(x, MLP))
    m = _model(tiny_cfg)
    unconvert_model(m)
    assert all(x.fused_gate_up is None for x in m.modules() if isinstance(x, MLP))


def test_bad_fused_swiglu_option_is_an_error_before_conversion(tiny_cfg):
    m = Yxanul(tiny_cfg)
    with pytest.raises(YxanulError, match="fp8_fused_swiglu"):
        load_policy(None).with_fp8_options(fused_swiglu="maybe")
    with pytest.raises(YxanulError, match="fp8_fused_swiglu"):
        convert_model(m, load_policy(None), backend="emulated", options=Fp8Options(fused_swiglu="maybe"))
    assert not any(hasattr(x, "spec") for x in m.modules())  # nothing converted


def test_fused_swiglu_reference_quantizer_numerics():
    """The reference SwiGLU-backward quantizer: FP32 gradients of silu(g) * u, cast with the given scales."""
    g = torch.randn(33, 70, generator=torch.Generator().manual_seed(2)).bfloat16()
    u = torch.randn(33, 70).bfloat16()
    d = torch.randn(33, 70).bfloat16()
    gf, uf = g.float().requires_grad_(True), u.float().requires_grad_(True)
    (torch.nn.functional.silu(gf) * uf).backward(d.float())
    sg, su = gf.grad.abs().amax() / 448, uf.grad.abs().amax() / 448
    qg, qgt, qu, qut, amax = fused_mlp.swiglu_bwd_quant(g, u, d, sg, su)
    torch.testing.assert_close(amax, torch.stack([gf.grad.abs().amax(), uf.grad.abs().amax()]), rtol=1e-6, atol=0)
    assert torch.equal(qgt.float(), qg.float().t()) and torch.equal(qut.float(), qu.float().t())
    torch.testing.assert_close(qg.float() * sg, gf.grad, rtol=0.07, atol=sg.item() * 2)
    torch.testing.assert_close(qu.float() * su, uf.grad, rtol=0.07, atol=su.item() * 2)
    g[3, 5] = float("nan")
    assert torch.isnan(fused_mlp.swiglu_bwd_quant(g, u, d, sg, su)[4][0])


def test_fused_swiglu_is_off_by_default(tiny_cfg, monkeypatch):
    """Measured slower in the training step, so the MLP stays unfused unless the fused_swiglu option is on."""
    calls = _count_swiglu_bwd(monkeypatch)
    torch.manual_seed(0)
    m = convert_model(Yxanul(tiny_cfg), load_policy(None).with_recipe(name="delayed", calibration_steps=0),
                      backend="emulated", quiet=True)
    assert all(x.fused_gate_up is None for x in m.modules() if isinstance(x, MLP))
    idx = torch.randint(0, tiny_cfg.vocab_size, (1, 16))
    for _ in range(2):
        _step(m, idx)
        fp8_step(m)
    assert not calls
