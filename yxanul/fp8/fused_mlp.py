"""The whole SwiGLU MLP in FP8 with delayed scaling as one autograd function: ``down(silu(gate(x)) * up(x))``,
whose forward writes h's FP8 copies (both GEMM layouts) from the kernel that computes h, and whose backward
writes ``dgate`` and ``dup`` in FP8 (both layouts) from the kernel that computes them.

Unfused, the three :class:`~yxanul.fp8.linear.Fp8Linear` layers each quantize their own operands, and
torch.compile fuses those casts into the neighbouring kernels, well under bandwidth for the transposed copies
(docs/perf-notes.md). With the scales known in advance (delayed scaling, once the scales are fixed), the
producer of each MLP operand can write it in FP8 directly:

forward   ``g, u = x @ Wg.T, x @ Wu.T`` (FP8 GEMMs); one kernel reads g and u once and writes
          ``h_q [M, F]`` (down's forward operand), ``h_qT [F, M]`` (its weight-gradient operand) and h's amax for
          the history; ``y = h_q @ Wd.T``. h never exists in BF16.
backward  dy in FP8 (both layouts) with down's scale; ``dh`` (dgrad) and ``dWd`` (wgrad, from ``h_qT``); one kernel
          reads g, u and dh once and writes ``dgate`` and ``dup`` in FP8, both layouts, with their amaxes; then the
          gate and up dgrad and wgrad GEMMs.

Numerics: the same as the unfused layers compiled (h computed in FP32 and rounded once to the activation dtype
before its cast, as inductor does), except that ``dgate`` and ``dup`` are quantized from FP32 rather than from
their BF16 rounding. Saved for the backward: the FP8 transposed copies of x (the recipe's
``cache_fp8_activations``; else x), g and u in the activation dtype, and ``h_qT``.

Used by :class:`yxanul.model.MLP` when :func:`convert_model` made gate, up and down delayed-scaling
:class:`~yxanul.fp8.linear.Fp8Linear` layers of one recipe, format and backend, without bias, with the
``fused_mlp`` option (:class:`~yxanul.fp8.options.Fp8Options`), and only while every scale is fixed (after the
calibration steps and the first optimizer step), no statistics are collected and no forward hook is registered
on the three layers; otherwise the MLP runs unfused.

The kernels' numerics are :func:`swiglu_fwd_quant` and :func:`swiglu_bwd_quant` here; :mod:`yxanul.kernels`
registers the Triton versions (:mod:`yxanul.fp8.registry`).
"""
from __future__ import annotations

import torch

from ..errors import YxanulError
from . import registry, scaling
from .backends import out_dtype, quant_tensor
from .formats import get_format


def check_swiglu_shapes(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor | None = None) -> None:
    if gate.dim() != 2 or not gate.is_floating_point():
        raise YxanulError(f"gate must be a 2-D floating-point tensor, got {tuple(gate.shape)} {gate.dtype}",
                          key="gate")
    for name, t in (("up", up), ("dh", dh)):
        if t is not None and t.shape != gate.shape:
            raise YxanulError(f"{name} shape {tuple(t.shape)} does not match gate {tuple(gate.shape)}", key=name)


check_swiglu_bwd_shapes = check_swiglu_shapes


def _amax(t: torch.Tensor) -> torch.Tensor:
    return t.abs().amax() if t.numel() else torch.zeros((), device=t.device)


def swiglu_fwd_quant(gate: torch.Tensor, up: torch.Tensor, scale_h: torch.Tensor, fmt: str = "e4m3"):
    """``h = silu(gate) * up`` computed in FP32, rounded once to gate's dtype and quantized with the given
    per-tensor scale (delayed scaling). Returns ``(h_q [M, F], h_qT [F, M], amax)``, amax the 0-d max |h| (NaN if
    h holds one) for the amax history."""
    check_swiglu_shapes(gate, up)
    g = gate.float()
    h = (g / (1.0 + torch.exp(-g)) * up.float()).to(gate.dtype)
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
    g, u, d = gate.float(), up.float(), dh.float()
    sig = 1.0 / (1.0 + torch.exp(-g))
    dg = d * u * sig * (1.0 + g * (1.0 - sig))
    du = d * (g * sig)
    amax = torch.stack([_amax(dg), _amax(du)]).to(gate.device)
    qg = quant_tensor(dg, f, scale_inv=scale_gate)[0]
    qu = quant_tensor(du, f, scale_inv=scale_up)[0]
    return qg, qg.t().contiguous(), qu, qu.t().contiguous(), amax


def can_fuse(gate, up, down) -> bool:
    """Whether three Fp8Linear layers qualify (module docstring): delayed scaling, one spec, backend and options
    with ``fused_mlp`` on, no bias, SwiGLU shapes."""
    mods = (gate, up, down)
    return (gate.spec.delayed and gate.options.fused_mlp
            and all(m.spec == gate.spec and m.options == gate.options and m.backend == gate.backend
                    and m.bias is None for m in mods)
            and gate.in_features == up.in_features == down.out_features
            and gate.out_features == up.out_features == down.in_features)


def mlp_forward(mlp, x: torch.Tensor) -> torch.Tensor | None:
    """``down_proj(silu(gate_proj(x)) * up_proj(x))`` through the fused function, or None when the MLP must run
    unfused now (module docstring)."""
    mods = gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    # calibrating first: torch.compile guards only on what is read, and _scales_fixed flips during calibration
    # (one more compiled variant of the block if it were read there)
    if any(m.calibrating for m in mods) or not all(m._scales_fixed for m in mods):
        return None
    if any(m._collect or m._forward_hooks or m._forward_pre_hooks for m in mods):
        return None
    if x.shape[-1] != gate.in_features:
        raise YxanulError(f"input has {x.shape[-1]} features, expected {gate.in_features}", key=gate.name or None)
    w = [t for m in mods for t in m.weight_fp8()]
    sxg = gate._delayed_scale("x", x)
    sxu = up._delayed_scale("x", x)
    y, amax_h = _MlpFn.apply(x, gate.weight, up.weight, down.weight, *w, sxg, sxu, down.scale_inv_x, mlp)
    scaling.record_amax(down.amax_history, 0, amax_h)
    return y


class _MlpFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wg, wu, wd, gq, gs, gtq, gts, uq, us, utq, uts, dq, ds, dtq, dts, sxg, sxu, sh, mlp):
        gate, down = mlp.gate_proj, mlp.down_proj
        ops = gate.ops
        x2 = x.reshape(-1, x.shape[-1])
        od = out_dtype(x)
        xgq = ops.act_quant(x2, scale_inv=sxg)[0]
        xuq = ops.act_quant(x2, scale_inv=sxu)[0]
        g = ops.fprop(xgq, sxg, gq, gs, od)
        u = ops.fprop(xuq, sxu, uq, us, od)
        fwd = registry.kernel("swiglu_fwd_quant", swiglu_fwd_quant)
        hq, hqt, amax_h = fwd(g, u, sh, down.spec.x.fmt)
        y = ops.fprop(hq, sh, dq, ds, od)
        if gate.spec.recipe.cache_fp8_activations:
            ctx.save_for_backward(None, xgq.t().contiguous(), xuq.t().contiguous(), g, u, hqt, gtq, gts, utq, uts,
                                  dtq, dts, sxg, sxu, sh)
        else:
            ctx.save_for_backward(x2, None, None, g, u, hqt, gtq, gts, utq, uts, dtq, dts, sxg, sxu, sh)
        ctx.mlp, ctx.x_shape, ctx.x_dtype = mlp, x.shape, x.dtype
        ctx.mark_non_differentiable(amax_h)
        return y.view(*x.shape[:-1], y.shape[-1]), amax_h

    @staticmethod
    def backward(ctx, dy, _damax):
        x2, xgt, xut, g, u, hqt, gtq, gts, utq, uts, dtq, dts, sxg, sxu, sh = ctx.saved_tensors
        gate, up, down = ctx.mlp.gate_proj, ctx.mlp.up_proj, ctx.mlp.down_proj
        ops = gate.ops
        dy2 = dy.reshape(-1, dy.shape[-1])
        sdy = down._delayed_scale("dy", dy2)
        dyq, dytq = quant_dy_delayed(ops, dy2, sdy)
        dh = ops.dgrad(dyq, sdy, dtq, dts, g.dtype)
        dwd = ops.wgrad(dytq, sdy, hqt, sh, torch.float32) if ctx.needs_input_grad[3] else None
        sdg, sdu = gate.scale_inv_dy, up.scale_inv_dy
        bwd = registry.kernel("swiglu_bwd_quant", swiglu_bwd_quant)
        dgq, dgqt, duq, duqt, amax = bwd(g, u, dh, sdg, sdu, gate.spec.dy.fmt)
        scaling.record_amax(gate.amax_history, 2, amax[0])
        scaling.record_amax(up.amax_history, 2, amax[1])
        dx = dwg = dwu = None
        if ctx.needs_input_grad[0]:
            dx = ops.dgrad(dgq, sdg, gtq, gts, ctx.x_dtype) + ops.dgrad(duq, sdu, utq, uts, ctx.x_dtype)
            dx = dx.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            if xgt is None:
                xgt = ops.act_quant(x2, scale_inv=sxg)[0].t().contiguous()
            dwg = ops.wgrad(dgqt, sdg, xgt, sxg, torch.float32)
        if ctx.needs_input_grad[2]:
            if xut is None:
                xut = ops.act_quant(x2, scale_inv=sxu)[0].t().contiguous()
            dwu = ops.wgrad(duqt, sdu, xut, sxu, torch.float32)
        return (dx, dwg, dwu, dwd) + (None,) * 16


def quant_dy_delayed(ops, dy2: torch.Tensor, scale_inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An output gradient in both GEMM layouts with a delayed (per-tensor) scale: ``(dy_q, dy_qT)``."""
    if ops.grad_quant_dual is not None:
        out = ops.grad_quant_dual(dy2, scale_inv=scale_inv)
        return out[0], out[2]
    dyq = ops.grad_quant(dy2, scale_inv=scale_inv)[0]
    return dyq, dyq.t().contiguous()
