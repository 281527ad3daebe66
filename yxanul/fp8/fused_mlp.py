"""The SwiGLU MLP's gate and up projections in FP8 with delayed scaling, as one autograd function whose backward
quantizes ``dgate`` and ``dup`` inside the SwiGLU backward kernel (:func:`yxanul.kernels.swiglu_bwd_quant`).

Unfused, autograd computes ``dgate`` and ``dup`` (the SwiGLU backward) and each projection's backward then
quantizes its output gradient in both GEMM layouts; torch.compile fuses that into one kernel, but one that writes
the transposed FP8 copies well under bandwidth (docs/perf-notes.md). Here the known delayed scales let one
Triton kernel read gate, up and dh once and write both layouts of both gradients.

Used by :class:`yxanul.model.MLP` when :func:`convert_model` made both projections delayed-scaling
:class:`~yxanul.fp8.linear.Fp8Linear` layers (no bias, same format) with the ``fused_swiglu`` option
(:class:`~yxanul.fp8.options.Fp8Options`), once their scales are fixed (after the calibration steps and the
first optimizer step), while no statistics are collected; otherwise the MLP runs unfused. Gradients differ from the unfused path only in that
``dgate`` and ``dup`` are quantized from FP32 rather than from their BF16 rounding. The fused path calls
neither projection module, so forward hooks registered on ``gate_proj`` / ``up_proj`` do not run on it.

Off by default because it measured slower in the training step (docs/perf-notes.md): the function boundary
stops torch.compile's partitioner from recomputing h's FP8 copies for down_proj inside the backward from gate
and up, so h is stored in BF16 and quantized again. Folding down_proj into the function (its transposed FP8
input written by the forward) is the next step.

The kernel's numerics are :func:`swiglu_bwd_quant` here; :mod:`yxanul.kernels` registers the Triton version
(:mod:`yxanul.fp8.registry`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import YxanulError
from . import registry, scaling
from .backends import out_dtype, quant_tensor
from .formats import get_format


def check_swiglu_bwd_shapes(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor) -> None:
    if gate.dim() != 2 or not gate.is_floating_point():
        raise YxanulError(f"gate must be a 2-D floating-point tensor, got {tuple(gate.shape)} {gate.dtype}",
                          key="gate")
    for name, t in (("up", up), ("dh", dh)):
        if t.shape != gate.shape:
            raise YxanulError(f"{name} shape {tuple(t.shape)} does not match gate {tuple(gate.shape)}", key=name)


def swiglu_bwd_quant(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor, scale_gate: torch.Tensor,
                     scale_up: torch.Tensor, fmt: str = "e4m3"):
    """The backward of ``h = silu(gate) * up`` quantized for the gate and up projections' backward GEMMs.

    ``dgate = dh * up * s * (1 + gate * (1 - s))`` and ``dup = dh * silu(gate)`` (s = sigmoid(gate)), computed in
    FP32 from the inputs and quantized from FP32 with the given per-tensor scales (delayed scaling), never rounded
    to BF16 in between. Returns ``(dgate_q [M, F], dgate_qT [F, M], dup_q, dup_qT, amax [2])``, amax the max
    |dgate| and |dup| (NaN if the tensor holds one) for the amax histories."""
    check_swiglu_bwd_shapes(gate, up, dh)
    f = get_format(fmt)
    g, u, d = gate.float(), up.float(), dh.float()
    sig = 1.0 / (1.0 + torch.exp(-g))
    dg = d * u * sig * (1.0 + g * (1.0 - sig))
    du = d * (g * sig)
    amax = torch.stack([dg.abs().amax(), du.abs().amax()]) if dg.numel() else torch.zeros(2)
    qg = quant_tensor(dg, f, scale_inv=scale_gate)[0]
    qu = quant_tensor(du, f, scale_inv=scale_up)[0]
    return qg, qg.t().contiguous(), qu, qu.t().contiguous(), amax.to(gate.device)


def can_fuse(gate, up) -> bool:
    """Whether two Fp8Linear layers qualify: delayed scaling, the same spec, no bias, the same shape, and the
    ``fused_swiglu`` option on."""
    return (gate.spec.delayed and gate.spec == up.spec and gate.options.fused_swiglu and up.options.fused_swiglu
            and gate.bias is None and up.bias is None and gate.in_features == up.in_features
            and gate.out_features == up.out_features)


def swiglu_gate_up(mlp, x: torch.Tensor) -> torch.Tensor | None:
    """``silu(gate_proj(x)) * up_proj(x)`` through the fused function, or None when the MLP must run unfused now."""
    gate, up = mlp.gate_proj, mlp.up_proj
    # calibrating first: torch.compile guards only on what is read, and _scales_fixed flips during calibration
    # (one more compiled variant of the block if it were read there)
    if gate.calibrating or up.calibrating or not (gate._scales_fixed and up._scales_fixed):
        return None
    if gate._collect or up._collect or gate.backend != up.backend:
        return None
    if x.shape[-1] != gate.in_features:
        raise YxanulError(f"input has {x.shape[-1]} features, expected {gate.in_features}", key=gate.name or None)
    gq, gs, gtq, gts = gate.weight_fp8()
    uq, us, utq, uts = up.weight_fp8()
    sxg = gate._delayed_scale("x", x)
    sxu = up._delayed_scale("x", x)
    return _GateUpSwiGLUFn.apply(x, gate.weight, up.weight, gq, gs, gtq, gts, uq, us, utq, uts, sxg, sxu, gate, up)


class _GateUpSwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wg, wu, gq, gs, gtq, gts, uq, us, utq, uts, sxg, sxu, gate, up):
        ops = gate.ops
        x2 = x.reshape(-1, x.shape[-1])
        od = out_dtype(x)
        xgq, xgs = ops.act_quant(x2, scale_inv=sxg)
        xuq, xus = ops.act_quant(x2, scale_inv=sxu)
        g = ops.fprop(xgq, xgs, gq, gs, od)
        u = ops.fprop(xuq, xus, uq, us, od)
        h = F.silu(g) * u
        if gate.spec.recipe.cache_fp8_activations:
            ctx.save_for_backward(None, xgq.t().contiguous(), xuq.t().contiguous(), g, u, gtq, gts, utq, uts, sxg,
                                  sxu)
        else:
            ctx.save_for_backward(x2, None, None, g, u, gtq, gts, utq, uts, sxg, sxu)
        ctx.gate, ctx.up, ctx.x_shape, ctx.x_dtype = gate, up, x.shape, x.dtype
        return h.view(*x.shape[:-1], h.shape[-1])

    @staticmethod
    def backward(ctx, dh):
        x2, xgt, xut, g, u, gtq, gts, utq, uts, sxg, sxu = ctx.saved_tensors
        gate, up = ctx.gate, ctx.up
        ops = gate.ops
        dh2 = dh.reshape(-1, dh.shape[-1])
        sdg, sdu = gate.scale_inv_dy, up.scale_inv_dy
        bwd = registry.kernel("swiglu_bwd_quant", swiglu_bwd_quant)
        dgq, dgqt, duq, duqt, amax = bwd(g, u, dh2, sdg, sdu, gate.spec.dy.fmt)
        scaling.record_amax(gate.amax_history, 2, amax[0])
        scaling.record_amax(up.amax_history, 2, amax[1])
        dx = dwg = dwu = None
        if ctx.needs_input_grad[0]:
            dx = (ops.dgrad(dgq, sdg, gtq, gts, ctx.x_dtype) + ops.dgrad(duq, sdu, utq, uts, ctx.x_dtype))
            dx = dx.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            if xgt is None:
                xgt = ops.act_quant(x2, scale_inv=sxg)[0].t().contiguous()
            dwg = ops.wgrad(dgqt, sdg, xgt, sxg, torch.float32)
        if ctx.needs_input_grad[2]:
            if xut is None:
                xut = ops.act_quant(x2, scale_inv=sxu)[0].t().contiguous()
            dwu = ops.wgrad(duqt, sdu, xut, sxu, torch.float32)
        return (dx, dwg, dwu) + (None,) * 12
