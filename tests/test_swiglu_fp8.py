"""The SwiGLU whose inputs are kept in FP8 for the backward (the recipe's cache_swiglu_inputs): exact forward,
gradients from the dequantized inputs (checked against a hand computation), FP8 what is kept, installed by
convert_model, trained, and counted by the memory estimate."""
import pytest
import torch
import torch.nn.functional as F

from yxanul.errors import YxanulError
from yxanul.fp8.backends import dequant_operand, quant_tiles, quant_tiles_impl
from yxanul.fp8.formats import get_format
from yxanul.fp8.recipe import Fp8Recipe
from yxanul.fp8.swiglu import swiglu_fp8_inputs


def _inputs(shape=(2, 6, 256), seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(shape, generator=g) * 2).to(torch.bfloat16).requires_grad_(True)
    up = torch.randn(shape, generator=g).to(torch.bfloat16).requires_grad_(True)
    dh = torch.randn(shape, generator=g).to(torch.bfloat16)
    return gate, up, dh


def test_forward_is_exact_and_gradients_come_from_the_fp8_inputs():
    gate, up, dh = _inputs()
    h = swiglu_fp8_inputs(gate, up)
    assert torch.equal(h, F.silu(gate) * up)
    h.backward(dh)
    # by hand: dequantized 1 x 128 tiles of gate and up, the SwiGLU derivative in FP32, cast to BF16
    fmt = get_format("e4m3")
    g = dequant_operand(*quant_tiles_impl(gate.detach().reshape(-1, 256), fmt, 128), "tile", 128)
    u = dequant_operand(*quant_tiles_impl(up.detach().reshape(-1, 256), fmt, 128), "tile", 128)
    d = dh.reshape(-1, 256).float()
    s = torch.sigmoid(g)
    want_g = (d * u * s * (1 + g * (1 - s))).to(torch.bfloat16).view_as(gate)
    want_u = (d * g * s).to(torch.bfloat16).view_as(up)
    assert torch.equal(gate.grad, want_g) and torch.equal(up.grad, want_u)
    # and within E4M3's rounding of the exact gradients, yet not equal to them (the inputs were rounded)
    ge, ue = gate.detach().clone().requires_grad_(True), up.detach().clone().requires_grad_(True)
    (F.silu(ge.float()) * ue.float()).backward(dh.float())
    for got, exact in ((gate.grad, ge.grad), (up.grad, ue.grad)):
        rel = float((got.float() - exact).norm() / exact.norm())
        assert 0.003 < rel < 0.08, rel


def test_only_fp8_tiles_and_their_scales_are_kept():
    """What autograd keeps for the backward: the FP8 copies of gate and up and their FP32 tile scales, half the
    bytes of the BF16 inputs (plus 4 bytes per 128 elements), never a BF16 tensor of their size."""
    gate, up, _ = _inputs((4, 8, 512))
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        swiglu_fp8_inputs(gate, up)
    assert sorted(str(t.dtype) for t in kept) == ["torch.float32", "torch.float32", "torch.float8_e4m3fn",
                                                  "torch.float8_e4m3fn"]
    kept_bytes = sum(t.numel() * t.element_size() for t in kept)
    assert kept_bytes == 2 * gate.numel() * (1 + 4 / 128)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kept.clear()
        F.silu(gate) * up
    assert sum(t.numel() * t.element_size() for t in kept) >= 2 * 2 * gate.numel()  # BF16 without it


def test_without_gradients_it_is_the_plain_product():
    gate, up, _ = _inputs()
    with torch.no_grad():
        assert torch.equal(swiglu_fp8_inputs(gate, up), F.silu(gate) * up)


def test_recipe_field_is_validated_and_read_from_the_policy_yaml(tmp_path):
    from yxanul.precision import load_policy
    with pytest.raises(YxanulError, match="recipe.cache_swiglu_inputs"):
        Fp8Recipe(cache_swiglu_inputs="yes").validate()
    p = tmp_path / "policy.yaml"
    p.write_text("recipe:\n  name: tensorwise\n  cache_swiglu_inputs: true\n")
    assert load_policy(str(p)).recipe.cache_swiglu_inputs is True


@pytest.mark.parametrize("recipe", ["blockwise", "delayed"])
def test_convert_model_installs_it_and_training_follows_the_uncached_model(tiny_cfg, recipe):
    """Only MLPs whose gate and up are FP8 layers of a recipe with cache_swiglu_inputs get it; the losses and
    weight gradients stay within FP8 rounding of the same model without it; unconvert_model takes it away."""
    from yxanul.fp8.linear import convert_model, unconvert_model
    from yxanul.model import MLP, Yxanul
    from yxanul.precision import load_policy

    def build(cache):
        torch.manual_seed(3)
        m = Yxanul(tiny_cfg)
        pol = load_policy().with_fp8(True).with_recipe(name=recipe, calibration_steps=0,
                                                        cache_swiglu_inputs=cache)
        return convert_model(m, pol, backend="emulated", quiet=True)

    plain, cached = build(False), build(True)
    mlps = [m for m in cached.modules() if isinstance(m, MLP)]
    assert mlps and all(m.swiglu is not None for m in mlps)
    assert all(m.swiglu is None for m in plain.modules() if isinstance(m, MLP))
    x = torch.randint(0, tiny_cfg.vocab_size, (2, 32))
    y = torch.randint(0, tiny_cfg.vocab_size, (2, 32))
    losses = []
    for m in (plain, cached):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(x, y)
        loss.backward()
        losses.append(float(loss.detach()))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)  # the forward is exact
    pg = dict(plain.named_parameters())
    for name, p in cached.named_parameters():
        if "mlp" in name and p.grad is not None and pg[name].grad.norm() > 0:
            rel = float((p.grad - pg[name].grad).norm() / pg[name].grad.norm())
            assert rel < 0.1, (name, rel)
    unconvert_model(cached)
    assert all(m.swiglu is None for m in mlps)


def test_memory_estimate_counts_the_fp8_swiglu_inputs():
    from yxanul.config import load_model_config
    from yxanul.memory import MemoryOptions, estimate
    from yxanul.precision import load_policy
    cfg = load_model_config("yxanul-197m")
    opts = MemoryOptions(batch=16, seq=2048, precision="fp8")
    pol = load_policy()
    base = estimate(cfg, pol, opts)
    cached = estimate(cfg, pol.with_recipe(cache_swiglu_inputs=True), opts)
    f, tokens, layers = cfg.ffn_hidden, 16 * 2048, cfg.n_layers
    # gate, silu(gate) and up in BF16 (eager) -> gate and up in FP8 with one FP32 scale per 128
    saved = layers * tokens * (3 * 2 * f - 2 * f * (1 + 4 / 128))
    assert base["activations_bytes"] - cached["activations_bytes"] == pytest.approx(saved, rel=1e-6)


def test_traces_whole_under_torch_compile_with_the_eager_gradients():
    """torch.compile traces the function without a graph break (fullgraph) and its backward gives the eager
    gradients bit for bit (the dequantize-and-differentiate is what eager computes)."""
    def f(g, u):
        return swiglu_fp8_inputs(g, u) * 2

    gate, up, dh = _inputs((64, 256))
    torch.compile(f, fullgraph=True)(gate, up).backward(dh)
    ge, ue = gate.detach().clone().requires_grad_(True), up.detach().clone().requires_grad_(True)
    f(ge, ue).backward(dh)
    assert torch.equal(gate.grad, ge.grad) and torch.equal(up.grad, ue.grad)


@pytest.mark.gpu
def test_cuda_traced_quantization_matches_the_reference():
    """On CUDA the tile quantization is traced torch ops (for inductor to fuse into the SwiGLU kernel): eager its
    FP8 tiles and scales are the opaque quantizer's bit for bit, and the gradients are the SwiGLU backward of
    those tiles dequantized, up to one BF16 rounding; compiled, the gradients agree with eager up to inductor's
    rounding."""
    gate, up, dh = (t.detach().cuda() for t in _inputs((8, 64, 512)))
    fm = get_format("e4m3")
    deq = []
    for t in (gate, up):
        q, s = quant_tiles_impl(t.reshape(-1, 512), fm, 128)
        rq, rs = quant_tiles(t.reshape(-1, 512), "e4m3", 128)  # the opaque quantizer, on the same device
        assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
        deq.append(dequant_operand(rq, rs, "tile", 128).view(t.shape))
    gate.requires_grad_(True)
    up.requires_grad_(True)
    swiglu_fp8_inputs(gate, up).backward(dh)
    g, u = deq
    sig = torch.sigmoid(g)
    d = dh.float()
    for got, ref in ((gate.grad, d * u * sig * (1 + g * (1 - sig))), (up.grad, d * g * sig)):
        torch.testing.assert_close(got.float(), ref, rtol=2 ** -7, atol=1e-6)
    gc, uc = gate.detach().clone().requires_grad_(True), up.detach().clone().requires_grad_(True)
    torch.compile(lambda g, u: swiglu_fp8_inputs(g, u), fullgraph=True)(gc, uc).backward(dh)
    for got, ref in ((gc.grad, gate.grad), (uc.grad, up.grad)):
        assert float((got.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
