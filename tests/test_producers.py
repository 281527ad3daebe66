"""The whole-MLP FP8 function (delayed scaling and the blockwise recipe) against the unfused layers, on the CPU
(emulated GEMMs, reference SwiGLU quantizers)."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from yxanul.errors import YxanulError
from yxanul.fp8 import producers, registry
from yxanul.fp8.linear import convert_model, fp8_step, unconvert_model
from yxanul.fp8.options import Fp8Options
from yxanul.model import MLP, Yxanul
from yxanul.precision import load_policy


def _model(tiny_cfg, recipe="delayed", fused=True, **fields):
    torch.manual_seed(0)
    m = Yxanul(tiny_cfg)
    pol = load_policy(None).with_recipe(name=recipe, calibration_steps=0, **fields).with_fp8_options(fused_producers=fused)
    return convert_model(m, pol, backend="emulated", quiet=True)


def _count_kernels(monkeypatch) -> dict:
    """Count the calls of the SwiGLU quantizers the fused function takes from the registry."""
    calls = {"swiglu_fwd_quant": 0, "swiglu_bwd_quant": 0, "swiglu_tiles_quant": 0, "swiglu_bwd_tiles_quant": 0,
             "rmsnorm_tiles_quant": 0}
    for name in calls:
        real = registry.kernel(name, getattr(producers, name))

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            if _real is getattr(producers, _name):  # no Triton: the reference, which takes no impl
                k.pop("impl", None)
            return _real(*a, **k)
        monkeypatch.setitem(registry._KERNELS, name, counted)
    return calls


def _step(m, idx):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(idx, idx)
    loss.backward()
    return loss


def _ready(tiny_cfg, recipe="delayed", **kw):
    """A converted model after one step and fp8_step: every delayed scale fixed, so the fused path is taken."""
    m = _model(tiny_cfg, recipe, **kw)
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    _step(m, idx)  # the first step scales by the current amax; fp8_step then fixes the scales
    m.zero_grad(set_to_none=True)
    fp8_step(m)
    assert recipe != "delayed" or all(x._scales_fixed for x in m.modules() if hasattr(x, "_scales_fixed"))
    return m, idx


def _unfused(m):
    """The same layers with the fused producers off."""
    ref = copy.deepcopy(m)
    for x in ref.modules():
        if isinstance(x, MLP):
            x.fp8_mlp = None
        if hasattr(x, "options"):
            x.options = dataclasses.replace(x.options, fused_producers=False)
    return ref


KERNELS = {"delayed": ("swiglu_fwd_quant", "swiglu_bwd_quant"),
           "blockwise": ("swiglu_tiles_quant", "swiglu_bwd_tiles_quant")}


@pytest.mark.parametrize("recipe", ["delayed", "blockwise"])
@pytest.mark.parametrize("cache,keep", [(True, False), (False, False), (True, True)],
                         ids=["fp8-cache", "no-cache", "fp8-swiglu-inputs"])
def test_fused_producers_matches_the_unfused_layers(tiny_cfg, monkeypatch, recipe, cache, keep):
    """The loss as the unfused layers give it (h is rounded once here, twice by eager BF16 ops: silu, then the
    product), the same amaxes recorded, and gradients as close to BF16's as the unfused FP8 layers' are (the two
    differ by FP8 rounding flips: dgate/dup are quantized from FP32 here, from their BF16 rounding unfused)."""
    calls = _count_kernels(monkeypatch)
    torch.manual_seed(0)
    bf16 = Yxanul(tiny_cfg)
    m, idx = _ready(tiny_cfg, recipe, cache_fp8_activations=cache, cache_swiglu_inputs=keep)
    mlps = [x for x in m.modules() if isinstance(x, MLP)]
    assert mlps and all(x.fp8_mlp is not None for x in mlps)
    fwd, bwd = KERNELS[recipe]
    # delayed: unfused until every scale is fixed (by the fp8_step in _ready); blockwise: fused from the start
    assert calls[fwd] == calls[bwd] == (len(mlps) if recipe == "blockwise" else 0)
    calls.update({k: 0 for k in calls})
    ref = _unfused(m)
    loss_ref = _step(ref, idx)
    loss = _step(m, idx)
    assert calls[fwd] == calls[bwd] == len(mlps)
    # blockwise: both norms of a block (before q/k/v, inside the MLP function) write their output only as FP8 tiles
    assert calls["rmsnorm_tiles_quant"] == (2 * len(mlps) if recipe == "blockwise" else 0)
    assert sum(calls.values()) == (4 if recipe == "blockwise" else 2) * len(mlps)
    torch.testing.assert_close(loss, loss_ref, rtol=2e-3, atol=0)
    _step(bf16, idx)
    fused = {n: p.grad for n, p in m.named_parameters()}
    unfused = {n: p.grad for n, p in ref.named_parameters()}
    for n, p in bf16.named_parameters():
        b = p.grad
        e_fused = ((fused[n] - b).norm() / b.norm()).item()
        e_unfused = ((unfused[n] - b).norm() / b.norm()).item()
        assert e_fused <= 1.1 * e_unfused + 5e-3, (n, e_fused, e_unfused)
        # the two FP8 paths differ from each other by no more than each differs from BF16
        assert ((fused[n] - unfused[n]).norm() / unfused[n].norm()).item() <= max(e_fused, e_unfused), n
    flags = [x.nonfinite for x in m.modules() if hasattr(x, "nonfinite")]
    assert flags and all(int(f.sum()) == 0 for f in flags)
    if recipe == "blockwise":
        return
    # every history row recorded: the first layer's input amax is the same computation; down's x amax is h's
    first, first_ref = m.layers[0].mlp, ref.layers[0].mlp
    for name in ("gate_proj", "up_proj"):
        assert torch.equal(getattr(first, name).amax_history[0, :2], getattr(first_ref, name).amax_history[0, :2])
    torch.testing.assert_close(first.down_proj.amax_history[0, :2], first_ref.down_proj.amax_history[0, :2],
                               rtol=1e-2, atol=0)
    # the last block's MLP sees nearly the same dy both ways (the forwards differ in h's rounding only); dgate and
    # dup differ by their BF16 rounding and dh's FP8 rounding flips
    last, last_ref = m.layers[-1].mlp, ref.layers[-1].mlp
    for name, tol in (("down_proj", 1e-2), ("gate_proj", 5e-2), ("up_proj", 5e-2)):
        torch.testing.assert_close(getattr(last, name).amax_history[0, 2], getattr(last_ref, name).amax_history[0, 2],
                                   rtol=tol, atol=0)
    assert all((x.amax_history[0] > 0).all() for x in m.modules() if hasattr(x, "amax_history"))


@pytest.mark.parametrize("recipe", ["delayed", "blockwise"])
def test_fused_producers_saves_fp8_not_bf16(tiny_cfg, recipe):
    """What the fused MLP keeps for its backward: no BF16 h; g and u in BF16, or in FP8 tiles (about half the
    bytes) with the recipe's cache_swiglu_inputs."""
    def saved_bytes(keep):
        m, idx = _ready(tiny_cfg, recipe, cache_swiglu_inputs=keep)
        mlp = m.layers[0].mlp
        x = torch.randn(64, tiny_cfg.d_model, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                mlp(x)
        return {(tuple(t.shape), t.dtype) for t in saved}, sum(t.numel() * t.element_size() for t in saved)

    F = tiny_cfg.ffn_hidden
    plain, n_plain = saved_bytes(False)
    kept, n_kept = saved_bytes(True)
    bf16_gu = {(64, F), (64, 2 * F)}
    assert {s for s, d in plain if d == torch.bfloat16} & bf16_gu  # g, u (or gu) kept in BF16
    assert not {s for s, d in kept if d == torch.bfloat16} & bf16_gu
    assert n_plain - n_kept >= 64 * 2 * F * (2 - 1.1)  # 2 bytes per element -> 1 byte plus the tile scales


@pytest.mark.parametrize("recipe", ["delayed", "blockwise"])
def test_fused_producers_trains_like_the_unfused_layers(tiny_cfg, recipe):
    """Eight optimizer steps on one batch: the losses of the fused and unfused FP8 MLPs stay together."""
    m, idx = _ready(tiny_cfg, recipe)
    ref = _unfused(m)
    losses = {}
    for name, model in (("fused", m), ("unfused", ref)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        out = []
        for _ in range(8):
            out.append(_step(model, idx).item())
            opt.step()
            opt.zero_grad(set_to_none=True)
            fp8_step(model)
        losses[name] = out
    assert losses["fused"][-1] < losses["fused"][0] - 0.5  # it learns
    for a, b in zip(losses["fused"], losses["unfused"]):
        assert abs(a - b) < 0.04, losses  # nats; FP8 rounding flips move the two trajectories apart slowly


def test_fused_producers_steps_aside_while_scales_move_statistics_or_hooks(tiny_cfg, monkeypatch):
    """Calibration (scales not fixed), an armed statistics pass and a forward hook each run the MLP unfused."""
    calls = _count_kernels(monkeypatch)
    m = _model(tiny_cfg)
    idx = torch.randint(0, tiny_cfg.vocab_size, (1, 16))
    _step(m, idx)
    assert not any(calls.values())
    fp8_step(m, collect_stats=True)
    _step(m, idx)
    assert not any(calls.values())
    fp8_step(m)
    seen = []
    h = m.layers[0].mlp.down_proj.register_forward_hook(lambda mod, i, o: seen.append(1))
    _step(m, idx)
    assert seen and calls["swiglu_fwd_quant"] == len(m.layers) - 1
    h.remove()


def test_fused_producers_installs_only_for_delayed_and_goes_with_unconvert(tiny_cfg):
    """Only delayed-scaling and blockwise MLPs with the fused_producers option get the fused function (blockwise only
    where the SwiGLU width is a multiple of the block size)."""
    for recipe in ("tensorwise", "rowwise"):
        m = _model(tiny_cfg, recipe)
        assert all(x.fp8_mlp is None for x in m.modules() if isinstance(x, MLP))
    m = _model(tiny_cfg, "blockwise")
    assert all(x.fp8_mlp is not None for x in m.modules() if isinstance(x, MLP))
    m = _model(dataclasses.replace(tiny_cfg, ffn_hidden=320), "blockwise")
    assert all(x.fp8_mlp is None for x in m.modules() if isinstance(x, MLP))
    m = _model(dataclasses.replace(tiny_cfg, fused_projections=False), "blockwise")  # gate/up kept apart
    assert all(x.fp8_mlp is None for x in m.modules() if isinstance(x, MLP))
    m = _model(dataclasses.replace(tiny_cfg, fused_projections=False), "delayed")  # two GEMMs anyway
    assert all(x.fp8_mlp is not None for x in m.modules() if isinstance(x, MLP))
    m = _model(tiny_cfg, fused=False)
    assert all(x.fp8_mlp is None for x in m.modules() if isinstance(x, MLP))
    m = _model(tiny_cfg)
    assert all(x.fp8_mlp is not None for x in m.modules() if isinstance(x, MLP))
    unconvert_model(m)
    assert all(x.fp8_mlp is None for x in m.modules() if isinstance(x, MLP))


def test_bad_fused_producers_option_is_an_error_before_conversion(tiny_cfg):
    m = Yxanul(tiny_cfg)
    with pytest.raises(YxanulError, match="fp8_fused_producers"):
        load_policy(None).with_fp8_options(fused_producers="maybe")
    with pytest.raises(YxanulError, match="fp8_fused_producers"):
        convert_model(m, load_policy(None), backend="emulated", options=Fp8Options(fused_producers="maybe"))
    assert not any(hasattr(x, "spec") for x in m.modules())  # nothing converted


def test_swiglu_fwd_reference_quantizer_numerics():
    """The reference SwiGLU-forward quantizer: h in FP32 rounded once to the input dtype, cast with the given
    scale (values beyond it saturate), both layouts, h's amax."""
    g = torch.randn(33, 70, generator=torch.Generator().manual_seed(3)).bfloat16()
    u = torch.randn(33, 70).bfloat16()
    h = (torch.nn.functional.silu(g.float()) * u.float()).bfloat16().float()
    s = h.abs().amax() / 448 * 0.5  # half the range it needs: the largest values saturate
    q, qt, amax = producers.swiglu_fwd_quant(g, u, s)
    torch.testing.assert_close(amax, h.abs().amax(), rtol=8e-3, atol=0)
    assert torch.equal(qt.float(), q.float().t())
    assert q.float().abs().max() == 448
    small = h.abs() < 200 * s
    torch.testing.assert_close((q.float() * s)[small], h[small], rtol=0.07, atol=s.item() * 2)
    g[3, 5] = float("nan")
    assert torch.isnan(producers.swiglu_fwd_quant(g, u, s)[2])


def test_swiglu_bwd_reference_quantizer_numerics():
    """The reference SwiGLU-backward quantizer: FP32 gradients of silu(g) * u, cast with the given scales."""
    g = torch.randn(33, 70, generator=torch.Generator().manual_seed(2)).bfloat16()
    u = torch.randn(33, 70).bfloat16()
    d = torch.randn(33, 70).bfloat16()
    gf, uf = g.float().requires_grad_(True), u.float().requires_grad_(True)
    (torch.nn.functional.silu(gf) * uf).backward(d.float())
    sg, su = gf.grad.abs().amax() / 448, uf.grad.abs().amax() / 448
    qg, qgt, qu, qut, amax = producers.swiglu_bwd_quant(g, u, d, sg, su)
    torch.testing.assert_close(amax, torch.stack([gf.grad.abs().amax(), uf.grad.abs().amax()]), rtol=1e-6, atol=0)
    assert torch.equal(qgt.float(), qg.float().t()) and torch.equal(qut.float(), qu.float().t())
    torch.testing.assert_close(qg.float() * sg, gf.grad, rtol=0.07, atol=sg.item() * 2)
    torch.testing.assert_close(qu.float() * su, uf.grad, rtol=0.07, atol=su.item() * 2)
    g[3, 5] = float("nan")
    assert torch.isnan(producers.swiglu_bwd_quant(g, u, d, sg, su)[4][0])


def test_fused_producers_is_off_by_default(tiny_cfg, monkeypatch):
    """Not yet measured faster in the training step, so the MLP stays unfused unless the fused_producers option is on."""
    calls = _count_kernels(monkeypatch)
    torch.manual_seed(0)
    m = convert_model(Yxanul(tiny_cfg), load_policy(None).with_recipe(name="delayed", calibration_steps=0),
                      backend="emulated", quiet=True)
    assert all(x.fp8_mlp is None for x in m.modules() if isinstance(x, MLP))
    idx = torch.randint(0, tiny_cfg.vocab_size, (1, 16))
    for _ in range(2):
        _step(m, idx)
        fp8_step(m)
    assert not any(calls.values())


@pytest.mark.parametrize("recipe", ["delayed", "blockwise"])
def test_fused_producers_compiles_without_graph_breaks_on_the_cpu(tiny_cfg, recipe):
    """Each block compiled by torch.compile (inductor, CPU) with the fused MLP inside: no graph break, and the
    compiled step gives the eager loss."""
    from torch._dynamo.utils import counters

    from yxanul.model import compile_blocks

    m, idx = _ready(dataclasses.replace(tiny_cfg, n_layers=2), recipe)
    loss_eager = _step(m, idx).item()
    m.zero_grad(set_to_none=True)
    used = []
    for x in m.modules():
        if isinstance(x, MLP):  # record (outside the autograd function: a side effect dynamo replays) its use
            def counted(mlp, inp, norm=None, _f=x.fp8_mlp):
                y = _f(mlp, inp, norm)
                used.append(y is not None)
                return y
            x.fp8_mlp = counted
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(m)
    loss = _step(m, idx).item()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert used == [True, True]  # both blocks traced through the fused function
    assert loss == pytest.approx(loss_eager, rel=2e-3)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters() if p.requires_grad)


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["delayed", "blockwise"])
def test_fused_producers_compiled_on_the_gpu_matches_the_unfused_layers(tiny_cfg, recipe):
    """Native FP8 GEMMs and the Triton SwiGLU kernels, each block compiled: the loss and gradients of the fused
    MLP against the unfused layers run eagerly on the same device."""
    import yxanul.kernels  # noqa: F401  (registers the Triton kernels)
    from yxanul.model import compile_blocks

    torch.manual_seed(0)
    pol = load_policy(None).with_recipe(name=recipe, calibration_steps=0).with_fp8_options(fused_producers=True)
    m = convert_model(Yxanul(tiny_cfg).cuda(), pol, backend="native", quiet=True)
    assert all(x.fp8_mlp is not None for x in m.modules() if isinstance(x, MLP))
    idx = torch.randint(0, tiny_cfg.vocab_size, (4, 128), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(1))

    def step(model):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(idx, idx)
        loss.backward()
        return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters()}

    step(m)
    m.zero_grad(set_to_none=True)
    fp8_step(m)
    ref = _unfused(m)
    loss_ref, g_ref = step(ref)
    loss_eager, g_eager = step(m)
    m.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compile_blocks(m)
    loss_c, g_c = step(m)
    for loss, grads in ((loss_eager, g_eager), (loss_c, g_c)):
        assert loss == pytest.approx(loss_ref, rel=5e-3)
        for n, g in g_ref.items():
            assert ((grads[n] - g).norm() / g.norm()).item() < 0.1, n


def test_fused_producers_blockwise_takes_a_one_read_gradient_quantizer(tiny_cfg):
    """Where the op table has ``grad_quant_dual`` (both 1 x 128 layouts from one read), the blockwise MLP's
    backward takes it for down_proj's output gradient, with the same bytes as the two separate quantizers."""
    from yxanul.fp8 import backends
    from yxanul.kernels import reference

    used = []

    def dual(x, want_q=True, want_qt=True):
        used.append(x.shape)
        return reference.act_quant_dual(x, 128, "e4m3")

    m, idx = _ready(tiny_cfg, "blockwise")
    _step(m, idx)
    want = {n: p.grad.clone() for n, p in m.named_parameters()}
    backends.register_ops("blockwise", "emulated", grad_quant_dual=dual)
    try:
        m2, _ = _ready(tiny_cfg, "blockwise")
        m2.load_state_dict(m.state_dict())
        m2.zero_grad(set_to_none=True)
        used.clear()
        _step(m2, idx)
    finally:
        backends.register_ops("blockwise", "emulated", grad_quant_dual=None)
    # per layer: o_proj's and down_proj's output gradients are d_model wide (q/k/v's are wider)
    assert used.count(torch.Size((idx.numel(), tiny_cfg.d_model))) == 2 * tiny_cfg.n_layers, used
    for n, p in m2.named_parameters():
        assert torch.equal(p.grad, want[n]), n


def test_rmsnorm_backward_matches_autograd():
    """The fused blockwise MLP's norm backward against autograd through the norm module (FP64)."""
    from yxanul.model import RMSNorm

    g = torch.Generator().manual_seed(4)
    x = torch.randn(37, 96, generator=g, dtype=torch.float64) * 3
    dy = torch.randn(37, 96, generator=g, dtype=torch.float64)
    norm = RMSNorm(96, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)
    xr = x.clone().requires_grad_(True)
    norm(xr).backward(dy)
    dx, dw = producers.rmsnorm_backward(dy, x, producers.rms_rstd(x, 1e-6).double(), norm.weight.detach())
    torch.testing.assert_close(dx, xr.grad, rtol=1e-4, atol=1e-6)  # FP32 inside
    torch.testing.assert_close(dw.double(), norm.weight.grad, rtol=1e-4, atol=1e-6)


def test_norm_with_a_hook_runs_as_a_module(tiny_cfg, monkeypatch):
    """A forward hook on a norm keeps that norm a module call (its output exists for the hook); the other norms
    still write their outputs as FP8 tiles."""
    calls = _count_kernels(monkeypatch)
    m, idx = _ready(tiny_cfg, "blockwise")
    calls.update({k: 0 for k in calls})
    seen = []
    h1 = m.layers[0].attn_norm.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    h2 = m.layers[1].mlp_norm.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    _step(m, idx)
    h1.remove()
    h2.remove()
    assert len(seen) == 2
    assert calls["rmsnorm_tiles_quant"] == 2 * tiny_cfg.n_layers - 2
