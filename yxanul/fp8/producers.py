"""FP8 operands written by the kernels that produce them (the ``fused_producers`` option,
:class:`~yxanul.fp8.options.Fp8Options`).

Unfused, every :class:`~yxanul.fp8.linear.Fp8Linear` quantizes its own operands: torch.compile fuses delayed
scaling's casts into the neighbouring kernels, well under bandwidth for the transposed copies, and the blockwise
recipe reads each operand again in standalone tile quantizers (docs/perf-notes.md). Where the scale does not wait
for a whole-tensor amax (delayed scaling once its scales are fixed; 1 x 128 tiles always), the kernel that
computes an operand can write it in FP8 directly. Two autograd functions own the operations between:

The whole SwiGLU MLP, ``down(silu(gate(x')) * up(x'))`` (:func:`mlp_forward`; delayed and blockwise):

forward   ``g, u`` from FP8 GEMMs (one GEMM over the side-by-side weights for blockwise); h is written in FP8
          as ``[M, F]`` (down_proj's forward operand) and ``[F, M]`` (its weight-gradient operand) from g and
          u: per tensor with h's amax for the history, by one kernel (delayed), or in 1 x 128 tiles of each
          layout with their scales, by one kernel per layout (blockwise, :mod:`yxanul.kernels.tiles`); then
          ``y = h_q @ Wd.T``. h never exists in BF16.
backward  dy in FP8 (both layouts), ``dh`` (dgrad) and ``dWd`` (wgrad, from h's transposed copy); ``dgate`` and
          ``dup`` written in FP8, both layouts, from g, u and dh (one kernel for delayed; one per layout for
          blockwise, as the fused gate/up projection's ``[dgate, dup]``); then the gate and up dgrad and wgrad
          GEMMs.

RMSNorm and the layer after it (blockwise only): x' = ``norm(x)`` exists only as the FP8 tiles of both layouts
that the tile kernels write from x and the row scales (:func:`rmsnorm_tiles_quant`); the norm's backward runs
in the same function. The MLP function takes its norm this way, and :func:`norm_linear` the q/k/v projection's.

Numerics: the same as the unfused layers compiled (h and the norm's output computed in FP32 and rounded once to
the activation dtype before their casts, as inductor does), except that ``dgate`` and ``dup`` are quantized from
FP32 rather than from their BF16 rounding. Saved for the backward: the FP8 transposed copy of the input (the
recipe's ``cache_fp8_activations``, or always where the norm is inside; else the input), x where the norm is
inside, h's transposed FP8 copy, and g and u in the activation dtype or, with the recipe's
``cache_swiglu_inputs``, in FP8 1 x 128 tiles (dequantized for the backward kernel).

The MLP function is installed by :func:`~yxanul.fp8.linear.convert_model` when gate, up and down are FP8 layers
of one recipe (delayed, or blockwise with a SwiGLU width that is a multiple of the block size and the model's
fused projections on), format and backend, without bias, with the option on (:func:`can_fuse`); the norm before
q/k/v is taken where q/k/v run as one blockwise GEMM. Either function runs only while no statistics are
collected and no forward hook is registered on its layers or norm and, for delayed scaling, every scale is fixed
(after the calibration steps and the first optimizer step); otherwise the layers run unfused.

The kernels' numerics are :func:`swiglu_fwd_quant`, :func:`swiglu_bwd_quant`, :func:`swiglu_tiles_quant`,
:func:`swiglu_bwd_tiles_quant` and :func:`rmsnorm_tiles_quant` here; :mod:`yxanul.kernels` registers the Triton
versions (:mod:`yxanul.fp8.registry`).
"""
from __future__ import annotations

import functools

import torch

from ..errors import YxanulError
from . import registry, scaling
from .backends import dequant_operand, out_dtype, quant_tensor, quant_tiles, quant_tiles_t
from .formats import get_format


def check_swiglu_shapes(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor | None = None) -> None:
    if gate.dim() != 2 or not gate.is_floating_point():
        raise YxanulError(f"gate must be a 2-D floating-point tensor, got {tuple(gate.shape)} {gate.dtype}",
                          key="gate")
    for name, t in (("up", up), ("dh", dh)):
        if t is not None and t.shape != gate.shape:
            raise YxanulError(f"{name} shape {tuple(t.shape)} does not match gate {tuple(gate.shape)}", key=name)



def _amax(t: torch.Tensor) -> torch.Tensor:
    return t.abs().amax() if t.numel() else torch.zeros((), device=t.device)


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in FP32 as the kernels compute it, rounded once to gate's dtype."""
    g = gate.float()
    return (g / (1.0 + torch.exp(-g)) * up.float()).to(gate.dtype)


def _swiglu_grads(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dgate, dup)`` in FP32: ``dh * up * s * (1 + gate * (1 - s))`` and ``dh * silu(gate)``, s = sigmoid(gate)."""
    g, u, d = gate.float(), up.float(), dh.float()
    sig = 1.0 / (1.0 + torch.exp(-g))
    return d * u * sig * (1.0 + g * (1.0 - sig)), d * (g * sig)


def _tiles_dual(x: torch.Tensor, fmt: str, block: int, pow2: bool):
    # the opaque tile quantizers: torch.compile's CPU code generation fails on both tilings of one tensor in
    # one kernel (docs/perf-notes.md)
    return quant_tiles(x, fmt, block, pow2) + quant_tiles_t(x, fmt, block, pow2)


def swiglu_tiles_quant(gate: torch.Tensor, up: torch.Tensor, block: int = 128, fmt: str = "e4m3",
                       pow2_scales: bool = False):
    """``h = silu(gate) * up`` (FP32, rounded once to gate's dtype) in 1 x `block` FP8 tiles, both GEMM layouts:
    ``(h_q [M, F], s [M, F/block], h_qT [F, M], sT [F, M/block])`` (the blockwise recipe)."""
    check_swiglu_shapes(gate, up)
    return _tiles_dual(_swiglu(gate, up), fmt, block, pow2_scales)


def swiglu_bwd_tiles_quant(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor, block: int = 128,
                           fmt: str = "e4m3", pow2_scales: bool = False):
    """The SwiGLU backward as the fused gate/up projection's output gradient ``[dgate, dup]`` (``[M, 2F]``,
    computed in FP32) in 1 x `block` FP8 tiles, both GEMM layouts: ``(q [M, 2F], s, qT [2F, M], sT)``.
    F must be a multiple of `block` (no tile spans both halves)."""
    check_swiglu_shapes(gate, up, dh)
    if gate.shape[1] % block:
        raise YxanulError(f"the SwiGLU width {gate.shape[1]} is not a multiple of the block size {block}",
                          key="gate")
    return _tiles_dual(torch.cat(_swiglu_grads(gate, up, dh), dim=1), fmt, block, pow2_scales)


def rms_rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm's row scales ``1 / sqrt(mean(x^2) + eps)`` in FP32, ``[M]``, as :class:`yxanul.model.RMSNorm`
    computes them."""
    return torch.rsqrt(x.float().pow(2).mean(-1) + eps)


def rmsnorm_tiles_quant(x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, block: int = 128,
                        fmt: str = "e4m3", pow2_scales: bool = False):
    """RMSNorm's output ``(x * rstd) * weight`` (FP32, rounded once to x's dtype, as the norm module rounds it)
    in 1 x `block` FP8 tiles, both GEMM layouts: ``(q [M, K], s, qT [K, M], sT)`` (the blockwise recipe)."""
    if x.dim() != 2 or rstd.shape != (x.shape[0],) or weight.shape != (x.shape[1],):
        raise YxanulError(f"x {tuple(x.shape)}, rstd {tuple(rstd.shape)} and norm weight {tuple(weight.shape)} do "
                          f"not match", key="x")
    y = ((x.float() * rstd.float()[:, None]) * weight.float()).to(x.dtype)
    return _tiles_dual(y, fmt, block, pow2_scales)


def rmsnorm_backward(dy: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor):
    """Gradients of ``y = (x * rstd) * weight`` (rstd from x, :func:`rms_rstd`): ``(dx in x's dtype, dweight in
    FP32)``."""
    xhat = x.float() * rstd[:, None]
    g = dy.float()
    gw = g * weight.float()
    dx = rstd[:, None] * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
    return dx.to(x.dtype), (g * xhat).sum(0)


def swiglu_fwd_quant(gate: torch.Tensor, up: torch.Tensor, scale_h: torch.Tensor, fmt: str = "e4m3"):
    """``h = silu(gate) * up`` computed in FP32, rounded once to gate's dtype and quantized with the given
    per-tensor scale (delayed scaling). Returns ``(h_q [M, F], h_qT [F, M], amax)``, amax the 0-d max |h| (NaN if
    h holds one) for the amax history."""
    check_swiglu_shapes(gate, up)
    h = _swiglu(gate, up)
    q = quant_tensor(h, get_format(fmt), scale_inv=scale_h)[0]
    return q, q.t().contiguous(), _amax(h.float())


def swiglu_bwd_quant(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor, scale_gate: torch.Tensor,
                     scale_up: torch.Tensor, fmt: str = "e4m3"):
    """The backward of ``h = silu(gate) * up`` quantized for the gate and up projections' backward GEMMs.

    ``dgate = dh * up * s * (1 + gate * (1 - s))`` and ``dup = dh * silu(gate)`` (s = sigmoid(gate)), computed in
    FP32 from the inputs and quantized from FP32 with the given per-tensor scales (delayed scaling), never rounded
    to BF16 in between. Returns ``(dgate_q [M, F], dgate_qT [F, M], dup_q, dup_qT, amax [2])``, amax the max
    |dgate| and |dup| (NaN if the tensor holds one) for the amax histories."""
    check_swiglu_shapes(gate, up, dh)
    f = get_format(fmt)
    dg, du = _swiglu_grads(gate, up, dh)
    amax = torch.stack([_amax(dg), _amax(du)]).to(gate.device)
    qg = quant_tensor(dg, f, scale_inv=scale_gate)[0]
    qu = quant_tensor(du, f, scale_inv=scale_up)[0]
    return qg, qg.t().contiguous(), qu, qu.t().contiguous(), amax


def tiled(spec) -> bool:
    """Tile-scaled activations and gradients with block-scaled weights: the blockwise recipe."""
    return spec.x.granularity == "tile" and spec.w.granularity == "block" and spec.dy.granularity == "tile"


def fp8_fusion_kind(mods) -> str | None:
    """:func:`yxanul.model.fusion_kind` of bias-free FP8 linear layers that read one input (``"fp8"``,
    ``"fp8-tensor"`` or None): one spec, backend and options, and either tiled with every width a multiple of the
    block or per-tensor with the ``fused_tensor_projections`` option."""
    first = mods[0]
    s = first.spec
    if not all(m.spec == s and m.backend == first.backend and m.options == first.options for m in mods):
        return None
    if tiled(s) and all(m.out_features % s.block == 0 for m in mods):
        return "fp8"
    if s.per_tensor and first.options.fused_tensor_projections:
        return "fp8-tensor"
    return None


def can_fuse(gate, up, down, fused_projections: bool = True) -> bool:
    """Whether three Fp8Linear layers qualify (module docstring): delayed scaling, or the blockwise recipe with a
    SwiGLU width that is a multiple of the block size, where the model runs gate and up as one GEMM
    (`fused_projections`: the blockwise function does); one spec, backend and options with ``fused_producers`` on;
    no bias; SwiGLU shapes."""
    mods = (gate, up, down)
    s = gate.spec
    blockwise_ok = tiled(s) and gate.out_features % s.block == 0 and fused_projections
    return ((s.delayed or blockwise_ok) and gate.options.fused_producers
            and all(m.spec == s and m.options == gate.options and m.backend == gate.backend
                    and m.bias is None for m in mods)
            and gate.in_features == up.in_features == down.out_features
            and gate.out_features == up.out_features == down.in_features)


def cat_weight_copies(mods) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The FP8 weight copies ``(q, s, qT, sT)`` of layers reading one input, side by side as one layer's (exact for
    block scales when every output width is a multiple of the block size)."""
    parts = [m.weight_fp8() for m in mods]
    with torch.autocast(parts[0][0].device.type, enabled=False):  # autocast's cat rejects FP8 tensors
        return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                torch.cat([p[2] for p in parts], 1), torch.cat([p[3] for p in parts], 1))


def _kernel(name: str, mod):
    """The registered fused kernel `name` as the layer's ``kernels`` option asks (``torch``: the reference here)."""
    ref = _REFERENCES[name]
    impl = mod.options.kernels
    fn = registry.kernel(name, ref) if impl != "torch" else ref
    return fn if fn is ref else functools.partial(fn, impl=impl)


_REFERENCES = {"swiglu_fwd_quant": swiglu_fwd_quant, "swiglu_bwd_quant": swiglu_bwd_quant,
               "swiglu_tiles_quant": swiglu_tiles_quant, "swiglu_bwd_tiles_quant": swiglu_bwd_tiles_quant,
               "rmsnorm_tiles_quant": rmsnorm_tiles_quant}


def mlp_forward(mlp, x: torch.Tensor, norm=None) -> torch.Tensor | None:
    """``down_proj(silu(gate_proj(x')) * up_proj(x'))``, x' = ``norm(x)`` (an RMSNorm, or x itself when None),
    through the fused function, or None when the MLP must run unfused now (module docstring). The blockwise path
    computes the norm inside the function: its kernel writes the norm's output only as FP8 tiles."""
    mods = gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    # calibrating first: torch.compile guards only on what is read, and _scales_fixed flips during calibration
    # (one more compiled variant of the block if it were read there)
    delayed = gate.spec.delayed
    if delayed and (any(m.calibrating for m in mods) or not all(m._scales_fixed for m in mods)):
        return None
    if any(m._collect for m in mods) or any(m._forward_hooks or m._forward_pre_hooks
                                            for m in mods + ((norm,) if norm is not None else ())):
        return None
    if x.shape[-1] != gate.in_features:
        raise YxanulError(f"input has {x.shape[-1]} features, expected {gate.in_features}", key=gate.name or None)
    if not delayed:
        nw = norm.weight if norm is not None else None
        return _MlpTilesFn.apply(x, nw, gate.weight, up.weight, down.weight, *cat_weight_copies((gate, up)),
                                 *down.weight_fp8(), mlp, norm.eps if norm is not None else None)
    if norm is not None:
        x = norm(x)
    w = [t for m in mods for t in m.weight_fp8()]
    sxg = gate._delayed_scale("x", x, also=(up,))  # the function quantizes x once, with gate's scale
    y, amax_h = _MlpFn.apply(x, gate.weight, up.weight, down.weight, *w, sxg, down.scale_inv_x, mlp)
    scaling.record_amax(down.amax_history, 0, amax_h)
    return y


def _keep(spec, *ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What the backward keeps of the SwiGLU's inputs: the tensors themselves or, with the recipe's
    ``cache_swiglu_inputs``, their FP8 1 x block tiles and scales (as :mod:`yxanul.fp8.swiglu` keeps them)."""
    if not spec.recipe.cache_swiglu_inputs:
        return ts
    return tuple(t for x in ts for t in quant_tiles(x, spec.x.fmt, spec.block))


def _restore(spec, kept) -> tuple[torch.Tensor, ...]:
    """The SwiGLU's inputs from :func:`_keep` (dequantized to FP32 when kept in FP8)."""
    if not spec.recipe.cache_swiglu_inputs:
        return tuple(kept)
    return tuple(dequant_operand(q, s, "tile", spec.block) for q, s in zip(kept[::2], kept[1::2]))


class _MlpFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wg, wu, wd, gq, gs, gtq, gts, uq, us, utq, uts, dq, ds, dtq, dts, sxg, sh, mlp):
        gate, down = mlp.gate_proj, mlp.down_proj
        ops = gate.ops
        x2 = x.reshape(-1, x.shape[-1])
        od = out_dtype(x)
        # one FP8 copy of x for both GEMMs, with gate's scale: up's history records the same amax of the same x
        # every step, so its scale has the same value; the copy is consistent with the scale it is used with either way
        xq = ops.act_quant(x2, scale_inv=sxg)[0]
        g = ops.fprop(xq, sxg, gq, gs, od)
        u = ops.fprop(xq, sxg, uq, us, od)
        fwd = _kernel("swiglu_fwd_quant", gate)
        hq, hqt, amax_h = fwd(g, u, sh, down.spec.x.fmt)
        y = down.ops.fprop(hq, sh, dq, ds, od)
        xs = (None, xq.t().contiguous()) if gate.spec.recipe.cache_fp8_activations else (x2, None)
        ctx.save_for_backward(*xs, hqt, gtq, gts, utq, uts, dtq, dts, sxg, sh, *_keep(gate.spec, g, u))
        ctx.mlp, ctx.x_shape, ctx.x_dtype, ctx.act_dtype = mlp, x.shape, x.dtype, g.dtype
        ctx.mark_non_differentiable(amax_h)
        return y.view(*x.shape[:-1], y.shape[-1]), amax_h

    @staticmethod
    def backward(ctx, dy, _damax):
        x2, xt, hqt, gtq, gts, utq, uts, dtq, dts, sx, sh, *kept = ctx.saved_tensors
        gate, up, down = ctx.mlp.gate_proj, ctx.mlp.up_proj, ctx.mlp.down_proj
        g, u = _restore(gate.spec, kept)
        ops = gate.ops
        dy2 = dy.reshape(-1, dy.shape[-1])
        sdy = down._delayed_scale("dy", dy2)
        dyq, _, dytq, _ = down.ops.grad_operands(dy2, True, sdy)
        dh = down.ops.dgrad(dyq, sdy, dtq, dts, ctx.act_dtype)
        dwd = down.ops.wgrad(dytq, sdy, hqt, sh, torch.float32) if ctx.needs_input_grad[3] else None
        sdg, sdu = gate.scale_inv_dy, up.scale_inv_dy
        bwd = _kernel("swiglu_bwd_quant", gate)
        dgq, dgqt, duq, duqt, amax = bwd(g, u, dh, sdg, sdu, gate.spec.dy.fmt)
        scaling.record_amax(gate.amax_history, 2, amax[0])
        scaling.record_amax(up.amax_history, 2, amax[1])
        dx = dwg = dwu = None
        if ctx.needs_input_grad[0]:
            dx = ops.dgrad(dgq, sdg, gtq, gts, ctx.x_dtype) + ops.dgrad(duq, sdu, utq, uts, ctx.x_dtype)
            dx = dx.view(ctx.x_shape)
        if (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]) and xt is None:
            xt = ops.act_quant(x2, scale_inv=sx)[0].t().contiguous()
        if ctx.needs_input_grad[1]:
            dwg = ops.wgrad(dgqt, sdg, xt, sx, torch.float32)
        if ctx.needs_input_grad[2]:
            dwu = ops.wgrad(duqt, sdu, xt, sx, torch.float32)
        return (dx, dwg, dwu, dwd) + (None,) * 15


def _tiled_input(mod, x2: torch.Tensor, nw: torch.Tensor | None, eps: float | None):
    """A blockwise layer's input in FP8 for its forward GEMM: ``(q, s, saved)``, ``saved`` = ``(x, qT, sT, rstd,
    norm weight)``, what the backward keeps of it (None where not kept). With a norm weight, x is the norm's input
    and the norm's output exists only as the FP8 tiles of both layouts that :func:`rmsnorm_tiles_quant` writes (the
    transposed ones come for free and are kept; so are x and the row scales, for the norm's backward); without,
    x is quantized by the layer's ops and the transposed tiles are made for the backward from x or, with the
    recipe's ``cache_fp8_activations``, kept now."""
    spec, ops = mod.spec, mod.ops
    if nw is not None:
        rstd = rms_rstd(x2, eps)
        q, s, qt, st = _kernel("rmsnorm_tiles_quant", mod)(x2, rstd, nw, spec.block, spec.x.fmt, spec.x.pow2)
        saved = (x2, qt, st, rstd, nw)
    else:
        (q, s), qt, st, rstd = ops.act_quant(x2), None, None, None
        saved = (None, *ops.act_quant_t(x2), None, None) if spec.recipe.cache_fp8_activations else \
            (x2, None, None, None, None)
    mod._flag(0, s)
    return q, s, saved


def _tiled_input_grads(mod, dxn: torch.Tensor, saved, x_shape, want_norm: bool):
    """``(dx, dnorm_weight)`` from the gradient of the layer's input (the norm's output where there is a norm)."""
    x2, _, _, rstd, nw = saved
    dnw = None
    if nw is not None:
        dxn, dnw = rmsnorm_backward(dxn, x2, rstd, nw)
        dnw = dnw.to(nw.dtype) if want_norm else None
    return dxn.view(x_shape), dnw


def _tiled_x_t(mod, saved):
    """The transposed FP8 tiles of the layer's input for its weight gradient, kept or made now."""
    x2, xtq, xts, _, _ = saved
    return (xtq, xts) if xtq is not None else mod.ops.act_quant_t(x2)


def _tiled_grad(mod, dy2: torch.Tensor, want_dw: bool):
    """An output gradient in 1 x block FP8 tiles, ``(q, s, qT, sT)`` (qT/sT None without ``want_dw``), flagged."""
    out = mod.ops.grad_operands(dy2, want_dw)
    mod._flag(2, out[1])
    return out


class _MlpTilesFn(torch.autograd.Function):
    """The blockwise recipe: gate and up as one GEMM over their side-by-side weights (exact for 128 x 128 blocks),
    h and ``[dgate, dup]`` written in 1 x block tiles, both layouts, by the SwiGLU kernels."""

    @staticmethod
    def forward(ctx, x, nw, wg, wu, wd, guq, gus, gutq, guts, dq, ds, dtq, dts, mlp, eps):
        gate, down = mlp.gate_proj, mlp.down_proj
        ops, spec = gate.ops, gate.spec
        x2 = x.reshape(-1, x.shape[-1])
        od = out_dtype(x)
        xq, xs, saved = _tiled_input(gate, x2, nw, eps)
        gu = ops.fprop(xq, xs, guq, gus, od)
        f = gu.shape[1] // 2
        fwd = _kernel("swiglu_tiles_quant", gate)
        hq, hs, hqt, hst = fwd(gu[:, :f], gu[:, f:], spec.block, down.spec.x.fmt, down.spec.x.pow2)
        down._flag(0, hs)
        y = down.ops.fprop(hq, hs, dq, ds, od)
        # gu's 1 x block tiles do not straddle gate and up (F is a multiple of the block): kept whole
        ctx.save_for_backward(*saved, hqt, hst, gutq, guts, dtq, dts, *_keep(spec, gu))
        ctx.mlp, ctx.x_shape, ctx.x_dtype, ctx.act_dtype = mlp, x.shape, x.dtype, gu.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        saved, (hqt, hst, gutq, guts, dtq, dts), kept = ctx.saved_tensors[:5], ctx.saved_tensors[5:11], \
            ctx.saved_tensors[11:]
        gate, down = ctx.mlp.gate_proj, ctx.mlp.down_proj
        ops, spec = gate.ops, gate.spec
        gu, = _restore(spec, kept)
        want_dw = ctx.needs_input_grad[4]
        dyq, dys, dytq, dyts = _tiled_grad(down, dy.reshape(-1, dy.shape[-1]), want_dw)
        dh = down.ops.dgrad(dyq, dys, dtq, dts, ctx.act_dtype)
        dwd = down.ops.wgrad(dytq, dyts, hqt, hst, torch.float32) if want_dw else None
        f = gu.shape[1] // 2
        bwd = _kernel("swiglu_bwd_tiles_quant", gate)
        dq, ds, dqt, dst = bwd(gu[:, :f], gu[:, f:], dh, spec.block, spec.dy.fmt, spec.dy.pow2)
        gate._flag(2, ds)
        dx = dnw = dwg = dwu = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dx, dnw = _tiled_input_grads(gate, ops.dgrad(dq, ds, gutq, guts, ctx.x_dtype), saved, ctx.x_shape,
                                         ctx.needs_input_grad[1])
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            dwg, dwu = ops.wgrad(dqt, dst, *_tiled_x_t(gate, saved), torch.float32).split(f)
        return (dx, dnw, dwg, dwu, dwd) + (None,) * 10


def norm_linear(x: torch.Tensor, mods, norm) -> torch.Tensor | None:
    """``cat([m(norm(x)) for m in mods], -1)`` as one GEMM whose input the norm writes as FP8 tiles of both layouts
    (the blockwise recipe's q/k/v projection with the ``fused_producers`` option), or None where that does not
    apply: the caller then runs the norm and the layers as usual. ``mods`` must already qualify for one fused GEMM
    (:func:`yxanul.model.fusion_kind` ``"fp8"``)."""
    first = mods[0]
    if not (first.options.fused_producers and tiled(first.spec)) or first._collect \
            or norm._forward_hooks or norm._forward_pre_hooks or x.shape[-1] != first.in_features:
        return None
    w = torch.cat([m.weight for m in mods])
    return _NormTilesLinearFn.apply(x, norm.weight, w, *cat_weight_copies(mods), first, norm.eps)


class _NormTilesLinearFn(torch.autograd.Function):
    """RMSNorm and a blockwise FP8 linear layer: the norm's output exists only as the FP8 tiles of both layouts
    that its kernel writes; the norm's backward runs here too. Flags and statistics as the layer's own."""

    @staticmethod
    def forward(ctx, x, nw, w, wq, ws, wtq, wts, mod, eps):
        x2 = x.reshape(-1, x.shape[-1])
        xq, xs, saved = _tiled_input(mod, x2, nw, eps)
        y = mod.ops.fprop(xq, xs, wq, ws, out_dtype(x))
        ctx.save_for_backward(*saved, wtq, wts)
        ctx.mod, ctx.x_shape, ctx.x_dtype = mod, x.shape, x.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        saved, (wtq, wts) = ctx.saved_tensors[:5], ctx.saved_tensors[5:]
        mod = ctx.mod
        want_dw = ctx.needs_input_grad[2]
        dyq, dys, dytq, dyts = _tiled_grad(mod, dy.reshape(-1, dy.shape[-1]), want_dw)
        dx = dnw = dw = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dx, dnw = _tiled_input_grads(mod, mod.ops.dgrad(dyq, dys, wtq, wts, ctx.x_dtype), saved, ctx.x_shape,
                                         ctx.needs_input_grad[1])
        if want_dw:
            dw = mod.ops.wgrad(dytq, dyts, *_tiled_x_t(mod, saved), torch.float32)
        return dx, dnw, dw, None, None, None, None, None, None
