"""weight_cache="step": the static FP8 weight copies refreshed for all layers of one shape at once."""
import copy

import pytest
import torch

from yxanul.config import load_model_config
from yxanul.fp8.linear import _STATIC_W, convert_model, fp8_modules, fp8_step
from yxanul.model import Yxanul
from yxanul.precision import load_policy


def _model(recipe, cfg, device="cpu"):
    torch.manual_seed(0)
    pol = load_policy(None).with_recipe(name=recipe, calibration_steps=1 if recipe == "delayed" else 0)
    backend = "native" if device == "cuda" else "emulated"  # on CUDA with the registered Triton quantizers
    return convert_model(Yxanul(cfg).to(device), pol.with_fp8_options(weight_cache="step"), backend=backend,
                         quiet=True)


def _per_layer(mods):
    for m in mods:
        m.refresh_static_weight()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("recipe", ["blockwise", "tensorwise", "delayed", "rowwise"])
def test_grouped_refresh_is_bit_identical_to_one_layer_at_a_time(recipe, device, monkeypatch):
    """Three optimizer steps (delayed: one calibration step, then history scales), every static copy and every
    delayed-scaling buffer compared bit for bit with the per-layer refresh, and the training losses equal."""
    import yxanul.fp8.linear as lin
    if device == "cuda":
        import yxanul.kernels  # noqa: F401  (registers the Triton quantizers)
    cfg = load_model_config("tiny")
    a = _model(recipe, cfg, device)
    b = copy.deepcopy(a)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (a, b)]
    x = torch.randint(0, cfg.vocab_size, (2, 65), generator=torch.Generator().manual_seed(1)).to(device)
    losses = {0: [], 1: []}
    for _ in range(3):
        for i, (m, opt) in enumerate(zip((a, b), opts)):
            loss = m(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i == 0:
                fp8_step(m)  # grouped
            else:
                monkeypatch.setattr(lin, "_refresh_static_weights", _per_layer)
                fp8_step(m)
                monkeypatch.undo()
            losses[i].append(loss.item())
        for (na, ma), mb in zip(fp8_modules(a).items(), fp8_modules(b).values()):
            for n in _STATIC_W:
                if recipe == "delayed" and ma.calibrating:
                    continue
                ta, tb = getattr(ma, n), getattr(mb, n)
                assert ta.dtype == tb.dtype and torch.equal(ta.view(torch.uint8) if ta.dtype.itemsize == 1 else ta,
                                                            tb.view(torch.uint8) if tb.dtype.itemsize == 1 else tb), (na, n)
            for n, t in ma.named_buffers(recurse=False):
                if n not in _STATIC_W:
                    torch.testing.assert_close(t, getattr(mb, n), rtol=0, atol=0, equal_nan=True, msg=(na, n))
    assert losses[0] == losses[1]


VIEWS = {"aten::select", "aten::detach", "aten::view", "aten::unbind", "aten::alias", "aten::as_strided",
         "aten::slice", "aten::transpose", "aten::t"}


def test_grouped_refresh_launches_do_not_grow_with_depth():
    """The refresh's computing operator calls (the kernel launches on a GPU; views launch none) depend on the
    number of distinct weight shapes, not on the number of layers (one layer at a time, Yxanul-197M's refresh
    took about 1,800 launches per step)."""
    def ops_per_step(n_layers):
        cfg = load_model_config("tiny", {"n_layers": n_layers})
        m = _model("blockwise", cfg)
        fp8_step(m)  # the static buffers exist from here on
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fp8_step(m)
        return len([e for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None
                    and e.name not in VIEWS])
    assert ops_per_step(8) == ops_per_step(2)


@pytest.mark.parametrize("recipe", ["delayed", "blockwise"])
@pytest.mark.parametrize("collect", [False, True])
def test_fp8_step_launches_do_not_grow_with_depth(recipe, collect):
    """fp8_step's bookkeeping (delayed histories and scales, arming the statistics) is a fixed number of
    computing operators, whatever the depth (the "fixed number of launches" of the host-time budget)."""
    def ops(n_layers):
        cfg = load_model_config("tiny", {"n_layers": n_layers})
        torch.manual_seed(0)
        m = convert_model(Yxanul(cfg), load_policy(None).with_recipe(name=recipe, calibration_steps=0),
                          backend="emulated", quiet=True)
        x = torch.randint(0, cfg.vocab_size, (2, 33))
        for _ in range(2):  # the delayed scales become fixed after the first step (a one-time host sync)
            m(x[:, :-1], x[:, 1:]).backward()
            fp8_step(m)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fp8_step(m, collect_stats=collect)
        return len([e for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None
                    and e.name not in VIEWS])
    assert ops(8) == ops(2)


def test_a_layer_with_its_own_weight_quantizer_keeps_it():
    """A weight quantizer that is not the reference one (here power-of-two scales, put into the layers' op
    tables) is not replaced by the grouped cast: the copies are that quantizer's."""
    import dataclasses
    import functools

    from yxanul.fp8.backends import quant_tensor
    from yxanul.fp8.formats import get_format
    cfg = load_model_config("tiny")
    m = _model("tensorwise", cfg)
    mods = list(fp8_modules(m).values())
    for layer in mods:
        layer.ops = dataclasses.replace(layer.ops, weight_quant=functools.partial(
            lambda w, **kw: quant_tensor(w, **kw), fmt=get_format("e4m3"), pow2=True))
    fp8_step(m)
    for layer in mods:
        s = float(layer._ws)
        assert s == 2.0 ** round(torch.log2(torch.tensor(s)).item())  # a power of two: the layer's quantizer


def test_grouped_refresh_works_in_bounded_chunks(monkeypatch):
    """A group larger than the chunk budget is refreshed in several stacks (its temporaries stay bounded),
    still bit for bit the per-layer copies."""
    import yxanul.fp8.linear as lin
    cfg = load_model_config("tiny", {"n_layers": 4})
    a = _model("blockwise", cfg)
    b = copy.deepcopy(a)
    stacked = []
    group = lin._refresh_group
    budget = 2 * 256 * 256 * 4  # two q_proj-sized FP32 weights
    monkeypatch.setattr(lin, "_refresh_group", lambda ms: (stacked.append(
        sum(m.weight.numel() * m.weight.element_size() for m in ms)), group(ms))[1])
    monkeypatch.setattr(lin, "REFRESH_CHUNK_BYTES", budget)
    fp8_step(a)
    monkeypatch.undo()
    _per_layer(list(fp8_modules(b).values()))
    shapes = {tuple(m.weight.shape) for m in fp8_modules(a).values()}
    assert max(stacked) <= budget and len(stacked) > len(shapes)  # some shape took several stacks
    for ma, mb in zip(fp8_modules(a).values(), fp8_modules(b).values()):
        for n in _STATIC_W:
            ta, tb = getattr(ma, n), getattr(mb, n)
            assert torch.equal(ta.float(), tb.float()), n
