"""Fused FP8 kernels with one dispatching entry point per operation.

Every operation has a pure-torch reference (:mod:`yxanul.kernels.reference`, the numerics) and a Triton
kernel. The dispatcher uses Triton for CUDA tensors (or for any tensor when ``TRITON_INTERPRET=1``, which is
how the kernels are tested on a CPU) and the reference otherwise. ``impl="torch"|"triton"|"auto"`` forces a
choice per call (the FP8 layers pass their ``kernels`` option, :class:`yxanul.fp8.options.Fp8Options`).

Importing this package registers the quantizers and fused kernels with the FP8 layers
(:mod:`yxanul.fp8.registry`, see :func:`register`) when Triton imports.

Operations (x is 2-D ``[M, K]``; FP32 scales, ``scale_inv = amax / FMT_MAX``):
  act_quant(x, block=128, fmt="e4m3")       -> q [M, K], s [M, ceil(K/block)]
  act_quant_t(x, block=128)                 -> qT [K, M], sT [K, ceil(M/block)]
  act_quant_dual(x, block=128)              -> q, s, qT, sT from one read of x
  weight_quant(w, block=128)                -> q [N, K], s [ceil(N/block), ceil(K/block)]
  tensor_quant(x, fmt="e4m3")               -> q like x, 0-d scale
  tensor_quant_dual(x, fmt="e4m3", scale_inv=None)
                                            -> q [M, K], 0-d scale, qT [K, M] from one read of x (the scale
                                               from x's amax, or the given one)
  tensor_amax(x)                            -> 0-d max |x| (NaN if x has one)
  rmsnorm_quant(x, weight, eps, block=128)  -> y (x's dtype), q, s
  swiglu_quant(gate, up, block=128)         -> h (gate's dtype) or None, q, s
  swiglu_fwd_quant(gate, up, scale_h, fmt="e4m3")
                                            -> h_q, h_qT, amax: the SwiGLU cast with a given per-tensor scale
                                               (delayed scaling), both layouts
  rmsnorm_tiles_quant(x, rstd, weight, block=128)
                                            -> q, s, qT, sT: RMSNorm's output from x and its row scales, in
                                               1 x block tiles, both layouts (y itself not written)
  swiglu_tiles_quant(gate, up, block=128)   -> h_q, s, h_qT, sT: the SwiGLU in 1 x block tiles, both layouts
  swiglu_bwd_tiles_quant(gate, up, dh, block=128)
                                            -> q [M, 2F], s, qT, sT: [dgate, dup] in 1 x block tiles, both layouts
  swiglu_bwd_quant(gate, up, dh, scale_gate, scale_up, fmt="e4m3")
                                            -> dgate_q, dgate_qT, dup_q, dup_qT, amax [2]: the SwiGLU backward
                                               cast with given per-tensor scales (delayed scaling), both layouts
"""
from __future__ import annotations

import functools
import importlib
import os

import torch
from torch import Tensor

from ..errors import YxanulError
from ..fp8 import registry
from ..fp8.backends import quant_tensor
from ..fp8.formats import get_format
from ..fp8.options import KERNEL_IMPLS as IMPLS
from . import reference

__all__ = ["act_quant", "act_quant_t", "act_quant_dual", "weight_quant", "tensor_quant", "tensor_quant_dual",
           "tensor_amax", "rmsnorm_quant", "swiglu_quant", "swiglu_fwd_quant", "swiglu_bwd_quant",
           "swiglu_tiles_quant", "swiglu_bwd_tiles_quant", "rmsnorm_tiles_quant",
           "triton_available", "uses_triton",
           "OPS", "fp8_op_overrides", "register"]


def triton_available() -> bool:
    """Whether triton imports and the kernels are registered (decided once, when this package is imported)."""
    return _TRITON_OK


def _mod(name: str):
    """The Triton submodule `name` (importing a submodule rebinds the package attribute of the same name,
    which for ``swiglu_quant`` is the dispatching function: put it back)."""
    mod = importlib.import_module(f"{__name__}.{name}")
    globals()["swiglu_quant"] = _swiglu_quant_dispatch
    return mod


def _define_custom_ops():
    """The Triton kernels as ``torch.ops.yxanul.triton_*`` custom ops: opaque to torch.compile (which then
    neither traces into the launch code nor breaks the graph), with shape-only fake implementations."""
    def cd(a, b):
        return -(-a // b)

    def fq(x, shape, fmt):
        return x.new_empty(shape, dtype=get_format(fmt).dtype)

    def f32(x, shape):
        return x.new_empty(shape, dtype=torch.float32)

    @torch.library.custom_op("yxanul::triton_act_quant", mutates_args=())
    def _aq(x: Tensor, block: int, fmt: str, pow2: bool) -> tuple[Tensor, Tensor]:
        return _mod("quant").act_quant(x, block, fmt, pow2)

    @_aq.register_fake
    def _(x, block, fmt, pow2):
        return fq(x, x.shape, fmt), f32(x, (x.shape[0], cd(x.shape[1], block)))

    @torch.library.custom_op("yxanul::triton_act_quant_t", mutates_args=())
    def _aqt(x: Tensor, block: int, fmt: str, pow2: bool) -> tuple[Tensor, Tensor]:
        return _mod("quant").act_quant_t(x, block, fmt, pow2)

    @_aqt.register_fake
    def _(x, block, fmt, pow2):
        return fq(x, (x.shape[1], x.shape[0]), fmt), f32(x, (x.shape[1], cd(x.shape[0], block)))

    @torch.library.custom_op("yxanul::triton_act_quant_dual", mutates_args=())
    def _aqd(x: Tensor, block: int, fmt: str, pow2: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return _mod("quant").act_quant_dual(x, block, fmt, pow2)

    @_aqd.register_fake
    def _(x, block, fmt, pow2):
        M, K = x.shape
        return (fq(x, (M, K), fmt), f32(x, (M, cd(K, block))), fq(x, (K, M), fmt), f32(x, (K, cd(M, block))))

    @torch.library.custom_op("yxanul::triton_weight_quant", mutates_args=())
    def _wq(w: Tensor, block: int, fmt: str, pow2: bool) -> tuple[Tensor, Tensor]:
        return _mod("quant").weight_quant(w, block, fmt, pow2)

    @_wq.register_fake
    def _(w, block, fmt, pow2):
        return fq(w, w.shape, fmt), f32(w, (cd(w.shape[0], block), cd(w.shape[1], block)))

    @torch.library.custom_op("yxanul::triton_tensor_quant", mutates_args=())
    def _tq(x: Tensor, fmt: str) -> tuple[Tensor, Tensor]:
        return _mod("quant").tensor_quant(x, fmt)

    @_tq.register_fake
    def _(x, fmt):
        return fq(x, x.shape, fmt), f32(x, ())

    @torch.library.custom_op("yxanul::triton_rmsnorm_quant", mutates_args=())
    def _rq(x: Tensor, weight: Tensor, eps: float, block: int, fmt: str, pow2: bool) -> tuple[Tensor, Tensor, Tensor]:
        return _mod("norm_quant").rmsnorm_quant(x, weight, eps, block, fmt, pow2)

    @_rq.register_fake
    def _(x, weight, eps, block, fmt, pow2):
        return torch.empty_like(x), fq(x, x.shape, fmt), f32(x, (x.shape[0], cd(x.shape[1], block)))

    @torch.library.custom_op("yxanul::triton_swiglu_quant", mutates_args=())
    def _sq(gate: Tensor, up: Tensor, block: int, fmt: str, pow2: bool, return_h: bool) -> tuple[Tensor, Tensor, Tensor]:
        h, q, s = _mod("swiglu_quant").swiglu_quant(gate, up, block, fmt, pow2, return_h)
        return (h if h is not None else gate.new_empty((0,))), q, s

    @_sq.register_fake
    def _(gate, up, block, fmt, pow2, return_h):
        h = torch.empty_like(gate) if return_h else gate.new_empty((0,))
        return h, fq(gate, gate.shape, fmt), f32(gate, (gate.shape[0], cd(gate.shape[1], block)))


    # per-tensor quantization as triton_ops: torch.compile sees and launches the kernels itself (no Python
    # call per launch, no graph break), and must materialize their input, which is the point (tensor_cast.py)
    tc = _mod("tensor_cast")

    @torch.library.triton_op("yxanul::tensor_amax", mutates_args=())
    def _tamax(x: Tensor) -> Tensor:
        return tc.tensor_amax_parts(x).amax()

    @torch.library.triton_op("yxanul::tensor_quant_dual", mutates_args=())
    def _tqd(x: Tensor, fmt: str, write_q: bool, write_qt: bool) -> tuple[Tensor, Tensor, Tensor]:
        return tc.tensor_cast(x, fmt, parts=tc.tensor_amax_parts(x), write_q=write_q, write_qt=write_qt)

    sb = _mod("swiglu_cast")

    @torch.library.triton_op("yxanul::swiglu_fwd_cast", mutates_args=())
    def _sfc(gate: Tensor, up: Tensor, scale_h: Tensor, fmt: str) -> tuple[Tensor, Tensor, Tensor]:
        return sb.swiglu_fwd_cast(gate, up, scale_h, fmt)

    @torch.library.triton_op("yxanul::swiglu_bwd_cast", mutates_args=())
    def _sbc(gate: Tensor, up: Tensor, dh: Tensor, scale_gate: Tensor, scale_up: Tensor,
             fmt: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return sb.swiglu_bwd_cast(gate, up, dh, scale_gate, scale_up, fmt)

    st = _mod("tiles")

    @torch.library.triton_op("yxanul::swiglu_tiles", mutates_args=())
    def _stl(gate: Tensor, up: Tensor, block: int, fmt: str, pow2: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return st.swiglu_tiles(gate, up, block, fmt, pow2)

    @torch.library.triton_op("yxanul::swiglu_bwd_tiles", mutates_args=())
    def _sbt(gate: Tensor, up: Tensor, dh: Tensor, block: int, fmt: str,
             pow2: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return st.swiglu_bwd_tiles(gate, up, dh, block, fmt, pow2)

    @torch.library.triton_op("yxanul::rmsnorm_tiles", mutates_args=())
    def _rnt(x: Tensor, rstd: Tensor, weight: Tensor, block: int, fmt: str,
             pow2: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return st.rmsnorm_tiles(x, rstd, weight, block, fmt, pow2)

    @torch.library.triton_op("yxanul::tensor_cast_dual", mutates_args=())
    def _tcd(x: Tensor, scale_inv: Tensor, fmt: str, write_q: bool, write_qt: bool) -> tuple[Tensor, Tensor]:
        q, _, qt = tc.tensor_cast(x, fmt, scale_inv=scale_inv, write_q=write_q, write_qt=write_qt)
        return q, qt


_MODS: dict = {}


def _launch(op: str, mod: str, *args):
    """Run a Triton kernel: directly in eager mode (no custom-op dispatch overhead, which is larger than the
    kernels themselves at small sizes), through its custom op while torch.compile traces."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.yxanul, "triton_" + op)(*args)
    return getattr(_MODS[mod], op)(*args)


def _check(x, block, name="x"):
    reference._check_2d(x, name)
    reference._check_block(block)


def _fmt(fmt) -> str:
    return get_format(fmt).name


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read by triton at its import, so once here too


def _interpret() -> bool:
    return _INTERPRET


def uses_triton(*tensors: torch.Tensor, impl: str | None = None) -> bool:
    """Whether a call with these tensors would run the Triton kernel."""
    impl = impl or "auto"
    if impl not in IMPLS:
        raise YxanulError(f"unknown kernel implementation {impl!r} (expected one of {', '.join(IMPLS)})",
                          key="impl")
    if impl == "torch":
        return False
    ok = triton_available() and (_interpret() or all(t.is_cuda for t in tensors))
    if impl == "triton" and not ok:
        raise YxanulError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1) and an importable triton",
                          key="impl")
    return ok


def act_quant(x, block: int = 128, fmt: str = "e4m3", pow2_scales: bool = False, *, impl: str | None = None):
    if uses_triton(x, impl=impl):
        _check(x, block)
        return _launch("act_quant", "quant", x, block, _fmt(fmt), pow2_scales)
    return reference.act_quant(x, block, fmt, pow2_scales)


def act_quant_t(x, block: int = 128, fmt: str = "e4m3", pow2_scales: bool = False, *, impl: str | None = None):
    if uses_triton(x, impl=impl):
        _check(x, block)
        return _launch("act_quant_t", "quant", x, block, _fmt(fmt), pow2_scales)
    return reference.act_quant_t(x, block, fmt, pow2_scales)


def act_quant_dual(x, block: int = 128, fmt: str = "e4m3", pow2_scales: bool = False, *,
                   impl: str | None = None):
    if uses_triton(x, impl=impl):
        _check(x, block)
        return _launch("act_quant_dual", "quant", x, block, _fmt(fmt), pow2_scales)
    return reference.act_quant_dual(x, block, fmt, pow2_scales)


def weight_quant(w, block: int = 128, fmt: str = "e4m3", pow2_scales: bool = False, *, impl: str | None = None):
    if uses_triton(w, impl=impl):
        _check(w, block, "w")
        return _launch("weight_quant", "quant", w, block, _fmt(fmt), pow2_scales)
    return reference.weight_quant(w, block, fmt, pow2_scales)


def tensor_quant(x, fmt: str = "e4m3", *, impl: str | None = None):
    if impl is None and torch.compiler.is_compiling():
        # while torch.compile traces: plain torch ops, which inductor fuses into the neighbouring kernels
        # (amax into the producer's epilogue, the cast into the consumer's prologue) and launches without
        # a Python custom-op call; the Triton kernel serves eager mode
        return quant_tensor(x, get_format(fmt))
    if uses_triton(x, impl=impl):
        if not x.is_floating_point():
            raise YxanulError(f"x must be a floating-point tensor, got {x.dtype}", key="x")
        return _launch("tensor_quant", "quant", x, _fmt(fmt))
    return reference.tensor_quant(x, fmt)


tensor_quant.reference_bytes = True  # byte for byte yxanul.fp8.backends.quant_tensor (tests/test_kernels.py)


def tensor_quant_dual(x, fmt: str = "e4m3", scale_inv=None, want_q: bool = True, want_qt: bool = True, *,
                      impl: str | None = None):
    """Per-tensor quantization of a 2-D x into both GEMM layouts: ``(q [M, K], s, qT [K, M])``, s the 0-d
    scale (computed from x's amax, or ``scale_inv`` when given, as delayed scaling does). A layout not wanted
    may come back empty."""
    if uses_triton(x, impl=impl):
        reference._check_2d(x)
        f = _fmt(fmt)
        if scale_inv is None:
            return torch.ops.yxanul.tensor_quant_dual(x, f, bool(want_q), bool(want_qt))
        q, qt = torch.ops.yxanul.tensor_cast_dual(x, scale_inv, f, bool(want_q), bool(want_qt))
        return q, scale_inv, qt
    return reference.tensor_quant_dual(x, fmt, scale_inv)


def tensor_amax(x, *, impl: str | None = None):
    """max |x| as a 0-d FP32 tensor (NaN if x holds one), without a host synchronization."""
    if uses_triton(x, impl=impl):
        return torch.ops.yxanul.tensor_amax(x)
    return x.detach().float().abs().amax()


def rmsnorm_quant(x, weight, eps: float = 1e-6, block: int = 128, fmt: str = "e4m3", pow2_scales: bool = False,
                  *, impl: str | None = None):
    if uses_triton(x, weight, impl=impl):
        _check(x, block)
        if weight.shape != (x.shape[1],):
            raise YxanulError(f"norm weight shape {tuple(weight.shape)} does not match x {tuple(x.shape)}",
                              key="weight")
        return _launch("rmsnorm_quant", "norm_quant", x, weight, float(eps), block, _fmt(fmt),
                       pow2_scales)
    return reference.rmsnorm_quant(x, weight, eps, block, fmt, pow2_scales)


def swiglu_quant(gate, up, block: int = 128, fmt: str = "e4m3", pow2_scales: bool = False, return_h: bool = True,
                 *, impl: str | None = None):
    if uses_triton(gate, up, impl=impl):
        _check(gate, block, "gate")
        if up.shape != gate.shape:
            raise YxanulError(f"up shape {tuple(up.shape)} does not match gate {tuple(gate.shape)}", key="up")
        if torch.compiler.is_compiling():
            h, q, s = torch.ops.yxanul.triton_swiglu_quant(gate, up, block, _fmt(fmt), pow2_scales, return_h)
            return (h if return_h else None), q, s
        return _MODS["swiglu_quant"].swiglu_quant(gate, up, block, _fmt(fmt), pow2_scales, return_h)
    return reference.swiglu_quant(gate, up, block, fmt, pow2_scales, return_h)


_swiglu_quant_dispatch = swiglu_quant


def swiglu_fwd_quant(gate, up, scale_h, fmt: str = "e4m3", *, impl: str | None = None):
    """SwiGLU with its output quantized for down_proj's GEMMs (delayed scaling): ``(h_q, h_qT, amax)``, see
    :func:`reference.swiglu_fwd_quant`."""
    if uses_triton(gate, up, impl=impl):
        reference.check_swiglu_shapes(gate, up)
        return torch.ops.yxanul.swiglu_fwd_cast(gate, up, scale_h, _fmt(fmt))
    return reference.swiglu_fwd_quant(gate, up, scale_h, fmt)


def swiglu_bwd_quant(gate, up, dh, scale_gate, scale_up, fmt: str = "e4m3", *, impl: str | None = None):
    """The SwiGLU backward with its outputs quantized for the gate/up backward GEMMs (delayed scaling):
    ``(dgate_q, dgate_qT, dup_q, dup_qT, amax [2])``, see :func:`reference.swiglu_bwd_quant`."""
    if uses_triton(gate, up, dh, impl=impl):
        reference.check_swiglu_shapes(gate, up, dh)
        return torch.ops.yxanul.swiglu_bwd_cast(gate, up, dh, scale_gate, scale_up, _fmt(fmt))
    return reference.swiglu_bwd_quant(gate, up, dh, scale_gate, scale_up, fmt)


def swiglu_tiles_quant(gate, up, block: int = 128, fmt: str = "e4m3", pow2_scales: bool = False, *,
                       impl: str | None = None):
    """SwiGLU with its output in 1 x block FP8 tiles for down_proj's GEMMs (blockwise recipe):
    ``(h_q, s, h_qT, sT)``, see :func:`reference.swiglu_tiles_quant`."""
    if uses_triton(gate, up, impl=impl):
        reference.check_swiglu_shapes(gate, up)
        reference._check_block(block)
        return torch.ops.yxanul.swiglu_tiles(gate, up, block, _fmt(fmt), pow2_scales)
    return reference.swiglu_tiles_quant(gate, up, block, fmt, pow2_scales)


def swiglu_bwd_tiles_quant(gate, up, dh, block: int = 128, fmt: str = "e4m3", pow2_scales: bool = False, *,
                           impl: str | None = None):
    """The SwiGLU backward as ``[dgate, dup]`` in 1 x block FP8 tiles for the fused gate/up projection's backward
    GEMMs (blockwise recipe): ``(q [M, 2F], s, qT [2F, M], sT)``, see :func:`reference.swiglu_bwd_tiles_quant`."""
    if uses_triton(gate, up, dh, impl=impl):
        reference.check_swiglu_shapes(gate, up, dh)
        reference._check_block(block)
        if gate.shape[1] % block:
            raise YxanulError(f"the SwiGLU width {gate.shape[1]} is not a multiple of the block size {block}",
                              key="gate")
        return torch.ops.yxanul.swiglu_bwd_tiles(gate, up, dh, block, _fmt(fmt), pow2_scales)
    return reference.swiglu_bwd_tiles_quant(gate, up, dh, block, fmt, pow2_scales)


def rmsnorm_tiles_quant(x, rstd, weight, block: int = 128, fmt: str = "e4m3", pow2_scales: bool = False, *,
                        impl: str | None = None):
    """RMSNorm's output in 1 x block FP8 tiles of both layouts from x and its row scales (blockwise recipe):
    ``(q, s, qT, sT)``, see :func:`reference.rmsnorm_tiles_quant`."""
    if uses_triton(x, rstd, weight, impl=impl):
        _check(x, block)
        if rstd.shape != (x.shape[0],) or weight.shape != (x.shape[1],):
            raise YxanulError(f"x {tuple(x.shape)}, rstd {tuple(rstd.shape)} and norm weight "
                              f"{tuple(weight.shape)} do not match", key="x")
        return torch.ops.yxanul.rmsnorm_tiles(x, rstd, weight, block, _fmt(fmt), pow2_scales)
    return reference.rmsnorm_tiles_quant(x, rstd, weight, block, fmt, pow2_scales)


# The op table an FP8 backend can take its quantization ops from (same names and signatures).
OPS = {"act_quant": act_quant, "act_quant_t": act_quant_t, "act_quant_dual": act_quant_dual,
       "weight_quant": weight_quant, "tensor_quant": tensor_quant, "tensor_quant_dual": tensor_quant_dual,
       "tensor_amax": tensor_amax, "rmsnorm_quant": rmsnorm_quant,
       "swiglu_quant": swiglu_quant, "swiglu_fwd_quant": swiglu_fwd_quant,
       "swiglu_bwd_quant": swiglu_bwd_quant, "swiglu_tiles_quant": swiglu_tiles_quant,
       "swiglu_bwd_tiles_quant": swiglu_bwd_tiles_quant, "rmsnorm_tiles_quant": rmsnorm_tiles_quant}


def fp8_op_overrides(spec, impl: str | None = None) -> dict:
    """The Triton quantizers for a resolved recipe (an :class:`yxanul.fp8.recipe.Fp8Spec`), as the FP8 layers'
    op table takes them; ``impl`` is passed to every call (None: Triton for CUDA tensors).

    1 x block activation and gradient tiles with block x block weights: activations, their transpose, output
    grads (both layouts) and weights. Current per-tensor scaling without power-of-two scales: activations, grads
    and weights. Anything else keeps the reference ops. The kernels produce the same bytes as the reference
    quantizers; off CUDA the dispatchers fall back to them.
    """
    f, g = spec.x.fmt, spec.dy.fmt
    b, p2 = spec.block, spec.x.pow2
    kw = {"impl": impl} if impl else {}
    if spec.x.granularity == "tile" and spec.w.granularity == "block":
        # not the one-pass act_quant_dual: on the H100 it is slower than the two kernels (docs/perf-notes.md)
        return dict(act_quant=functools.partial(act_quant, block=b, fmt=f, pow2_scales=p2, **kw),
                    act_quant_t=functools.partial(act_quant_t, block=b, fmt=f, pow2_scales=p2, **kw),
                    grad_quant=functools.partial(act_quant, block=b, fmt=g, pow2_scales=p2, **kw),
                    grad_quant_t=functools.partial(act_quant_t, block=b, fmt=g, pow2_scales=p2, **kw),
                    weight_quant=functools.partial(weight_quant, block=b, fmt=f, pow2_scales=p2, **kw))
    if spec.per_tensor and not spec.delayed and not p2:
        return dict(act_quant=functools.partial(tensor_quant, fmt=f, **kw),
                    grad_quant=functools.partial(tensor_quant, fmt=g, **kw),
                    weight_quant=functools.partial(tensor_quant, fmt=f, **kw))
    return {}


def register() -> bool:
    """Register the quantizers and the fused SwiGLU forward and backward with the FP8 layers (:mod:`yxanul.fp8.registry`)
    when Triton imports; done once when this package is imported. Returns whether they were registered."""
    if not _TRITON_OK:
        return False
    registry.register_quantizers(fp8_op_overrides)
    registry.register_kernel("swiglu_fwd_quant", swiglu_fwd_quant)
    registry.register_kernel("swiglu_bwd_quant", swiglu_bwd_quant)
    registry.register_kernel("swiglu_tiles_quant", swiglu_tiles_quant)
    registry.register_kernel("swiglu_bwd_tiles_quant", swiglu_bwd_tiles_quant)
    registry.register_kernel("rmsnorm_tiles_quant", rmsnorm_tiles_quant)
    return True


def _probe() -> bool:
    try:
        import triton  # noqa: F401
        for name in ("quant", "norm_quant", "swiglu_quant"):
            _MODS[name] = _mod(name)
    except Exception:  # noqa: BLE001  (no triton, or one too old: the references serve)
        return False
    _define_custom_ops()
    return True


_TRITON_OK = _probe()
register()
