"""Delayed scaling: amax histories, scale updates, calibration switch-over, state save/load."""
import io

import pytest
import torch

from yxanul.fp8 import scaling
from yxanul.fp8.linear import Fp8Linear, fp8_step
from yxanul.fp8.recipe import Fp8Recipe

E4M3, E5M2 = 448.0, 57344.0


def _layer(**kw):
    torch.manual_seed(0)
    rec = Fp8Recipe(name="delayed", **{"amax_history_len": 3, "calibration_steps": 0, **kw})
    return Fp8Linear(32, 16, recipe=rec)


def _pass(m, xmax, gmax):
    """One micro-batch whose x has amax `xmax` and whose output grad has amax `gmax`."""
    x = torch.zeros(4, 32)
    x[0, 0] = xmax
    x[1, 1] = -xmax / 2
    x.requires_grad_(True)
    y = m(x)
    g = torch.zeros_like(y)
    g[2, 3] = -gmax
    y.backward(g)


def test_history_and_scales_step_by_step():
    m = _layer(margin=1)
    wmax = float(m.weight.detach().abs().max())
    # step 0: no history yet -> current scaling; the step's amax lands in row 0
    _pass(m, 2.0, 0.5)
    _pass(m, 3.0, 0.25)  # a second micro-batch: row 0 keeps the max
    assert m.amax_history[0].tolist() == pytest.approx([3.0, wmax, 0.5])
    assert m.scale_ready.tolist() == [0, 0, 0]
    fp8_step(m)
    # scale_inv = amax / (FMT_MAX / 2**margin); the history rolled, row 0 is empty
    assert m.scale_inv.tolist() == pytest.approx([3.0 * 2 / E4M3, wmax * 2 / E4M3, 0.5 * 2 / E4M3])
    assert m.amax_history[0].tolist() == [0, 0, 0]
    assert m.amax_history[1].tolist() == pytest.approx([3.0, wmax, 0.5])
    assert m.scale_ready.tolist() == [1, 1, 1]
    assert int(m.fp8_steps) == 1
    # step 1: a smaller amax; algo=max keeps the larger one from step 0
    _pass(m, 1.0, 0.1)
    fp8_step(m)
    assert m.scale_inv[0].item() == pytest.approx(3.0 * 2 / E4M3)
    # after the history length (3 rows) has passed, step 0's amax drops out
    _pass(m, 1.0, 0.1)
    fp8_step(m)
    _pass(m, 1.0, 0.1)
    fp8_step(m)
    assert m.scale_inv[0].item() == pytest.approx(1.0 * 2 / E4M3)
    assert m.scale_inv[2].item() == pytest.approx(0.1 * 2 / E4M3)


def test_most_recent_and_hybrid():
    m = _layer(amax_compute_algo="most_recent", fp8_format="hybrid")
    _pass(m, 4.0, 2.0)
    fp8_step(m)
    _pass(m, 1.0, 1.0)
    fp8_step(m)
    # most_recent: only the last step counts; dy uses E5M2 under hybrid
    assert m.scale_inv[0].item() == pytest.approx(1.0 / E4M3)
    assert m.scale_inv[2].item() == pytest.approx(1.0 / E5M2)


def test_delayed_scale_is_used_and_clips():
    """The scale comes from previous steps: a sudden 4x larger activation saturates at FMT_MAX."""
    m = _layer()
    _pass(m, 1.0, 1.0)
    fp8_step(m)
    x = torch.zeros(1, 32)
    x[0, 0] = 4.0
    w = m.weight.detach()
    y = m(x)
    # x was clipped to 1.0 (= FMT_MAX * scale_inv), so y = 1.0 * w[:, 0] quantized
    wq = (w[:, 0] / m.scale_inv[1]).clamp(-E4M3, E4M3).to(torch.float8_e4m3fn).float() * m.scale_inv[1]
    assert torch.allclose(y[0], wq, rtol=1e-5, atol=1e-7)


def test_zero_amax_keeps_previous_scale():
    hist = torch.zeros(2, 3)
    s = torch.tensor([0.5, 0.5, 0.5])
    ready = torch.zeros(3)
    hist[0] = torch.tensor([448.0, 0.0, 0.0])
    scaling.advance(hist, s, ready, "max", torch.full((3,), 448.0), 0)
    assert s.tolist() == [1.0, 0.5, 0.5] and ready.tolist() == [1, 0, 0]


def test_calibration_switch_over():
    """Calibration steps scale every operand by its current amax (bit for bit the tensorwise recipe) while the
    history fills; the step after the last one uses the history's scales."""
    m = _layer(calibration_steps=2)
    tw = Fp8Linear(32, 16, recipe=Fp8Recipe(name="tensorwise"))
    tw.weight.data.copy_(m.weight.data)
    assert m.calibrating
    for step, (xs, gs) in enumerate(((1.0, 1.0), (4.0, 0.5))):
        x = (torch.randn(8, 32) * xs).requires_grad_(True)
        x2 = x.detach().clone().requires_grad_(True)
        g = torch.randn(8, 16) * gs
        y, y2 = m(x), tw(x2)
        y.backward(g)
        y2.backward(g)
        assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad) and torch.equal(m.weight.grad, tw.weight.grad)
        assert m.amax_history[0].tolist() == pytest.approx(
            [float(x.detach().abs().max()), float(m.weight.detach().abs().max()), float(g.abs().max())])
        assert not m._scales_fixed  # no host-side switch (and no recompile) while calibrating
        m.weight.grad = tw.weight.grad = None
        fp8_step(m)
        tw.step()
    assert not m.calibrating and m._scales_fixed and m.scale_ready.tolist() == [1, 1, 1]
    # now delayed: the scale of x is the history's max (step 1's amax, 4x step 0's), not this input's amax
    x = torch.randn(8, 32)
    m(x)
    hist_x = float(m.amax_history[1:, 0].max())
    assert m.scale_inv[0].item() == pytest.approx(hist_x / E4M3)
    assert m.scale_inv_x.item() == pytest.approx(hist_x / E4M3)
    assert hist_x > 2 * float(x.abs().max())


def test_state_dict_round_trip(tmp_path):
    m = _layer(calibration_steps=1)
    for a in (2.0, 3.0):
        _pass(m, a, a / 10)
        fp8_step(m)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    assert {"amax_history", "scale_inv", "scale_ready", "fp8_steps", "weight"} <= set(sd)
    m2 = _layer(calibration_steps=1)
    assert m2.calibrating
    m2.load_state_dict(sd)
    assert not m2.calibrating  # the host-side step counter follows the checkpoint
    for k in ("amax_history", "scale_inv", "scale_ready", "fp8_steps"):
        assert torch.equal(getattr(m2, k), getattr(m, k))
    x = torch.randn(3, 32)
    assert torch.equal(m2(x), m(x))
    # a plain nn.Linear checkpoint loads (fresh delayed state) and vice versa
    lin = torch.nn.Linear(32, 16, bias=False)
    m3 = _layer()
    m3.load_state_dict(lin.state_dict())
    assert torch.equal(m3.weight, lin.weight)
    lin.load_state_dict({"weight": m.state_dict()["weight"]})


def test_scales_fixed_after_first_step():
    """Once every operand has a delayed scale, the cast uses it alone (not waiting for the current amax);
    an operand whose history is still all zero keeps the module on current scaling for it."""
    m = _layer()
    _pass(m, 2.0, 0.0)  # dy all zero: no dy scale yet
    fp8_step(m)
    assert m.scale_ready.tolist() == [1, 1, 0] and not m._scales_fixed
    # the dy slot still follows its current amax (scale_inv[2] is the initial 1.0, which would flush 1e-4)
    x = torch.randn(4, 32, requires_grad=True)
    y = m(x)
    g = torch.full_like(y, 1e-4)
    y.backward(g)
    assert x.grad.abs().max() > 0
    fp8_step(m)
    assert m._scales_fixed  # dy recorded a nonzero amax in the last step
    s_before = m.scale_inv.clone()
    x = torch.zeros(2, 32)
    x[0, 0] = 100.0  # far above the delayed x scale: clipped at FMT_MAX * scale_inv[0]
    y = m(x)
    w = m.weight.detach()
    wq = (w[:, 0] / s_before[1]).clamp(-E4M3, E4M3).to(torch.float8_e4m3fn).float() * s_before[1]
    xq = float(E4M3 * s_before[0])
    assert torch.allclose(y[0], xq * wq, rtol=1e-5, atol=1e-7)
    assert m.amax_history[0, 0].item() == 100.0  # the current amax is still recorded


def test_scales_fixed_restored_from_state_dict():
    m = _layer()
    _pass(m, 2.0, 0.5)
    fp8_step(m)
    assert m._scales_fixed
    m2 = _layer()
    assert not m2._scales_fixed
    m2.load_state_dict(m.state_dict())
    assert m2._scales_fixed
    x = torch.randn(3, 32)
    assert torch.equal(m2(x), m(x))


def test_fp8_step_batched_matches_per_layer_advance():
    """fp8_step advances all delayed layers in batched launches; the result is what advancing each layer's
    history on its own gives, also for layers with different recipe settings in one model."""
    import copy

    torch.manual_seed(0)
    layers = torch.nn.ModuleList(
        [Fp8Linear(16, 8, recipe=Fp8Recipe(name="delayed", calibration_steps=0, amax_history_len=4, margin=i % 2,
                                           amax_compute_algo="max" if i % 3 else "most_recent"))
         for i in range(6)])
    ref = copy.deepcopy(layers)
    gen = torch.Generator().manual_seed(1)
    for step in range(7):
        for a, b in zip(layers, ref):
            for slot in (0, 1, 2):
                v = torch.rand((), generator=gen) * (step % 3)  # some steps record zeros
                scaling.record_amax(a.amax_history, slot, v)
                scaling.record_amax(b.amax_history, slot, v)
        fp8_step(layers)
        for b in ref:
            scaling.advance(b.amax_history, b.scale_inv, b.scale_ready, b.recipe.amax_compute_algo,
                            torch.tensor(b._fmt_max), b.recipe.margin, b.recipe.pow2_scales)
        for a, b in zip(layers, ref):
            for k in ("amax_history", "scale_inv", "scale_ready"):
                assert torch.equal(getattr(a, k), getattr(b, k)), (step, k)
            assert int(a.fp8_steps) == step + 1


def test_fixed_scales_give_the_same_numbers():
    """Casting with the history's scale alone equals the current-or-delayed selection once every scale exists."""
    m = _layer()
    _pass(m, 2.0, 0.5)
    fp8_step(m)
    assert m._scales_fixed
    x = torch.randn(5, 32, requires_grad=True)
    y1 = m(x)
    y1.backward(torch.ones_like(y1))
    g1 = x.grad.clone()
    m._scales_fixed = False
    x.grad = None
    y2 = m(x)
    y2.backward(torch.ones_like(y2))
    assert torch.equal(y1, y2) and torch.equal(g1, x.grad)


def test_module_step_also_fixes_scales():
    m = _layer()
    _pass(m, 2.0, 0.5)
    m.step()
    assert m._scales_fixed and m.scale_ready.tolist() == [1, 1, 1]


def test_load_into_meta_module():
    m = _layer()
    _pass(m, 2.0, 0.5)
    fp8_step(m)
    with torch.device("meta"):
        m2 = _layer()
    m2.load_state_dict(m.state_dict(), assign=True)
    assert m2._scales_fixed and torch.equal(m2.scale_inv, m.scale_inv)


def test_tensor_abs_max_is_the_flat_amax_and_propagates_nonfinite():
    """The row-by-row amax (which torch.compile fuses into the producing kernel) is the same value as one flat
    reduction, for 1-3-D tensors, and a NaN or Inf anywhere still reaches the recorded amax."""
    from yxanul.fp8.backends import tensor_abs_max
    g = torch.Generator().manual_seed(3)
    for shape in [(7,), (5, 33), (2, 3, 130)]:
        x = (torch.randn(*shape, generator=g) * 3).bfloat16()
        got = tensor_abs_max(x)
        assert got.dtype == torch.float32 and got.dim() == 0
        assert got.item() == x.float().abs().max().item()
    x = torch.randn(6, 40)
    x[4, 17] = float("nan")
    assert torch.isnan(tensor_abs_max(x))
    x[4, 17] = float("-inf")
    assert tensor_abs_max(x).item() == float("inf")


def _slot_scales(m):
    return [float(getattr(m, f"scale_inv_{w}")) for w in ("x", "w", "dy")]


def test_slot_scales_follow_scale_inv_through_steps_and_loading():
    """The 0-d per-operand scales the fixed-scale casts read are scale_inv's entries after every fp8_step and
    after loading a state dict, and they are separate allocations (what cuBLAS needs)."""
    m = _layer()
    for xmax, gmax in ((3.0, 0.5), (1.0, 0.25), (6.0, 2.0)):
        _pass(m, xmax, gmax)
        fp8_step(m)
        assert _slot_scales(m) == m.scale_inv.tolist()
    assert m._scales_fixed
    ptrs = {getattr(m, f"scale_inv_{w}").data_ptr() for w in ("x", "w", "dy")}
    assert len(ptrs) == 3 and m.scale_inv.data_ptr() not in ptrs
    # the cast of a fixed-scale step uses them
    x = torch.randn(4, 32)
    y = m(x)
    xs = m.scale_inv[0]
    xq = (x / xs).clamp(-E4M3, E4M3).to(torch.float8_e4m3fn).float() * xs
    wq = (m.weight.detach() / m.scale_inv[1]).clamp(-E4M3, E4M3).to(torch.float8_e4m3fn).float() * m.scale_inv[1]
    torch.testing.assert_close(y, xq @ wq.t(), rtol=1e-5, atol=1e-5)
    fresh = _layer()
    fresh.load_state_dict(m.state_dict())
    assert _slot_scales(fresh) == m.scale_inv.tolist() and fresh._scales_fixed
    assert "scale_inv_x" not in m.state_dict()  # derived, not saved


@pytest.mark.parametrize("where", ["x", "dy"])
def test_delayed_nonfinite_flag_comes_from_the_amax_history(where):
    """With fixed scales a NaN operand is flagged through the history's current row: fp8_check names it before
    fp8_step, and the flag stays after fp8_step has rolled the row away."""
    from yxanul.errors import NonFiniteError
    from yxanul.fp8.linear import fp8_check
    m = _layer()
    for _ in range(2):
        _pass(m, 1.0, 1.0)
        fp8_step(m)
    assert m._scales_fixed
    net = torch.nn.Sequential(m)
    fp8_check(net)  # clean
    x = torch.randn(4, 32)
    if where == "x":
        x[1, 2] = float("nan")
    y = m(x.requires_grad_(True))
    g = torch.ones_like(y)
    if where == "dy":
        g[0, 0] = float("inf")
    y.backward(g)
    with pytest.raises(NonFiniteError, match=rf"0 \({where}\)$"):
        fp8_check(net)
    fp8_step(m)
    with pytest.raises(NonFiniteError, match=rf"0 \({where}\)$"):
        fp8_check(net)


def _nan_step_synced(monkeypatch, all_reduce):
    """A delayed layer after one clean step and one with a NaN input, its histories through sync_fp8_amax
    in a faked two-rank group whose MAX all-reduce is `all_reduce`."""
    import torch.distributed as dist

    from yxanul.distributed import sync_fp8_amax
    m = _layer()
    _pass(m, 1.0, 1.0)
    fp8_step(m)
    x = torch.randn(4, 32)
    x[0, 0] = float("nan")
    m(x).sum().backward()
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    assert sync_fp8_amax(torch.nn.Sequential(m)) == 1
    return m


def test_sync_keeps_a_nan_flag_that_the_all_reduce_drops(monkeypatch):
    """With data parallelism the amax histories are MAX-all-reduced before fp8_step; NCCL's max drops a NaN
    unless every rank has one, so sync_fp8_amax folds this rank's non-finite flags in first."""
    from yxanul.errors import NonFiniteError
    from yxanul.fp8.linear import fp8_check
    m = _nan_step_synced(monkeypatch, lambda t, op=None, group=None: t.copy_(torch.nan_to_num(t, nan=1.0)))
    net = torch.nn.Sequential(m)
    assert torch.isfinite(m.amax_history).all()  # the other rank's finite maximum won
    fp8_step(m)
    with pytest.raises(NonFiniteError, match=r"0 \(x\)"):
        fp8_check(net)


def test_sync_counts_a_nan_once_when_the_all_reduce_keeps_it(monkeypatch):
    """When every rank saw the NaN, the MAX all-reduce keeps it in the history; sync_fp8_amax has already
    counted it into the flag, so fp8_step must not count it a second time."""
    m = _nan_step_synced(monkeypatch, lambda t, op=None, group=None: t)  # the other rank had a NaN too
    fp8_step(m)
    assert m.nonfinite.tolist() == [1, 0, 0]
    assert bool(torch.isfinite(m.scale_inv).all())


def test_operand_that_stays_zero_stops_holding_the_layer_back():
    """A layer whose output gradient is always zero has no history-based scale for dy. After a whole history
    window of zeros its dy keeps scale 1 (Transformer Engine's initial scale) and the layer counts as fixed
    (no more per-step readiness check); a later nonzero dy still sets the scale at the next step."""
    m = _layer(amax_history_len=3)
    for step in range(3):
        _pass(m, 1.0, 0.0)
        fp8_step(m)
        assert m.scale_ready.tolist() == ([1, 1, 0] if step < 2 else [1, 1, 1])
        assert m._scales_fixed is (step == 2), step
    assert m.scale_ready.tolist() == [1, 1, 1] and m.scale_inv[2].item() == 1.0
    assert m.scale_inv_dy.item() == 1.0
    _pass(m, 1.0, 448.0 * 0.25)
    fp8_step(m)
    assert m.scale_inv[2].item() == pytest.approx(0.25) and m.scale_inv_dy.item() == pytest.approx(0.25)
    assert m.scale_inv[0].item() == pytest.approx(1.0 / E4M3)


def test_operand_with_values_gets_its_scale_before_the_window_ends():
    m = _layer(amax_history_len=4)
    _pass(m, 1.0, 0.0)
    fp8_step(m)
    assert not m._scales_fixed
    _pass(m, 1.0, 2.0)
    fp8_step(m)
    assert m._scales_fixed and m.scale_inv[2].item() == pytest.approx(2.0 / E4M3)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_operand_flags_the_layer_but_does_not_poison_the_scales(bad):
    """One Inf (or NaN) operand is flagged, but the history treats it as no value: the scales stay finite and
    the next clean step computes finite outputs (an Inf amax once became an Inf scale, and every later cast NaN
    for a whole history window)."""
    from yxanul.errors import NonFiniteError
    from yxanul.fp8.linear import fp8_check
    m = _layer(amax_history_len=4)
    net = torch.nn.Sequential(m)
    _pass(m, 1.0, 1.0)
    fp8_step(m)
    before = m.scale_inv.clone()
    x = torch.randn(4, 32)
    x[0, 0] = bad
    m(x.requires_grad_(True)).backward(torch.ones(4, 16))
    fp8_step(m)
    with pytest.raises(NonFiniteError):
        fp8_check(net)
    assert bool(torch.isfinite(m.scale_inv).all()) and bool(torch.isfinite(m.amax_history).all())
    assert m.scale_inv[0].item() == before[0].item()  # from the clean step still in the window
    y = m(torch.randn(4, 32))
    assert bool(torch.isfinite(y).all())


def test_layers_with_different_history_lengths_step_and_check_together():
    """sync_fp8_amax folds the pending flags of every delayed layer at once; with different history lengths the
    histories could not be stacked (a crash before any all-reduce)."""
    from yxanul.fp8.linear import _pending_nonfinite, fp8_check
    net = torch.nn.Sequential(_layer(amax_history_len=2), torch.nn.Linear(16, 32), _layer(amax_history_len=5))
    x = torch.randn(4, 32)
    x[0, 0] = float("nan")
    net(x).sum().backward()
    assert _pending_nonfinite([net[0], net[2]]).tolist() == [[1, 0, 0], [1, 0, 0]]  # x of both (NaN propagates)
    fp8_step(net)
    with pytest.raises(Exception, match="non-finite|NaN"):
        fp8_check(net)
    assert all(int(m.fp8_steps) == 1 for m in (net[0], net[2]))


def test_a_layer_that_never_ran_is_not_forced_to_scale_one():
    """The zero-operand rule applies to layers that have run: one that never did keeps waiting, so its first
    step scales every operand by its current amax (tiny gradients are not flushed by a forced scale of 1)."""
    m = _layer(amax_history_len=2)
    for _ in range(4):
        fp8_step(m)
    assert not m._scales_fixed and m.scale_ready.tolist() == [0, 0, 0]
    x = torch.randn(4, 32, requires_grad=True)
    y = m(x)
    y.backward(torch.full_like(y, 1e-6))
    assert bool((x.grad != 0).any()) and bool((m.weight.grad != 0).any())


@pytest.mark.gpu
def test_compiled_calibration_on_gpu_trains_as_tensorwise_and_records_dy():
    """On a GPU under torch.compile (the training path): the calibration steps of the delayed recipe give the
    tensorwise recipe's losses, and every layer's history holds the output-gradient amax after the first step.
    The earlier BF16 calibration function failed both on the H100 (docs/benchmarks.md, "Loss parity")."""
    from yxanul.config import load_model_config
    from yxanul.fp8.linear import convert_model, fp8_modules
    from yxanul.model import Yxanul, compile_blocks
    from yxanul.precision import load_policy

    cfg = load_model_config("tiny")
    data = torch.randint(0, cfg.vocab_size, (4, 8, 257), generator=torch.Generator().manual_seed(0)).cuda()

    def run(recipe):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = Yxanul(cfg).cuda()
        convert_model(model, load_policy().with_recipe(name=recipe, calibration_steps=3), backend="native",
                      quiet=True)
        compile_blocks(model)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
        losses, dy_rows = [], []
        for b in data:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(b[:, :-1], b[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if recipe == "delayed":
                dy_rows.append([float(m.amax_history[0, 2]) for m in fp8_modules(model).values()])
            fp8_step(model)
            losses.append(loss.item())
        return losses, dy_rows

    tw, _ = run("tensorwise")
    dl, dy_rows = run("delayed")
    assert all(v > 0 for v in dy_rows[0]), dy_rows[0]
    assert dl[:3] == pytest.approx(tw[:3], rel=2e-3), (dl, tw)
