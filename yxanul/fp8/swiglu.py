"""SwiGLU whose inputs are kept for the backward in FP8: the recipe's ``cache_swiglu_inputs``.

``h = silu(gate) * up`` is computed as usual; what the backward keeps of ``gate`` and ``up`` (in BF16 the
largest activations of a block: two ``[tokens, ffn_hidden]`` tensors per layer) is their FP8 copy in 1 x block
tiles along the hidden dimension with FP32 scales, half the bytes. The backward dequantizes them and computes
``dgate = dh * up * s * (1 + gate * (1 - s))`` and ``dup = dh * silu(gate)`` (s = sigmoid(gate)) in FP32; ``h``
itself is never kept (``down_proj`` keeps what it needs of it). DeepSeek-V3 stores the SwiGLU's inputs this
way. The forward is exact; the gradients carry the FP8 rounding of ``gate`` and ``up`` (E4M3: a relative error of
at most 2^-4 per element), so loss parity is a question for ``bench quality``.

On CUDA the quantization is traced as torch ops, so torch.compile can write the FP8 copies from the kernel
that computes ``h`` (1 x block tiles along the last dimension are row reductions of the same iteration space);
elsewhere it is the opaque tile quantizer (:func:`yxanul.fp8.backends.quant_tiles`), the same numbers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends import dequant_operand, quant_tiles, quant_tiles_impl
from .formats import get_format


class _SwigluFp8Inputs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, fmt: str, block: int):
        h = F.silu(gate) * up
        f = gate.shape[-1]
        g2, u2 = gate.reshape(-1, f), up.reshape(-1, f)
        if gate.is_cuda:
            fm = get_format(fmt)
            (gq, gs), (uq, us) = quant_tiles_impl(g2, fm, block), quant_tiles_impl(u2, fm, block)
        else:
            (gq, gs), (uq, us) = quant_tiles(g2, fmt, block), quant_tiles(u2, fmt, block)
        ctx.save_for_backward(gq, gs, uq, us)
        ctx.shape, ctx.dtypes, ctx.block = gate.shape, (gate.dtype, up.dtype), block
        return h

    @staticmethod
    def backward(ctx, dh):
        gq, gs, uq, us = ctx.saved_tensors
        g = dequant_operand(gq, gs, "tile", ctx.block)
        u = dequant_operand(uq, us, "tile", ctx.block)
        d = dh.reshape(g.shape).float()
        sig = torch.sigmoid(g)
        dg = d * u * sig * (1.0 + g * (1.0 - sig))
        du = d * (g * sig)
        return dg.to(ctx.dtypes[0]).view(ctx.shape), du.to(ctx.dtypes[1]).view(ctx.shape), None, None


def swiglu_fp8_inputs(gate: torch.Tensor, up: torch.Tensor, fmt: str = "e4m3", block: int = 128) -> torch.Tensor:
    """``silu(gate) * up`` whose backward keeps ``gate`` and ``up`` as FP8 1 x `block` tiles (module docstring).
    Without gradients it is the plain product."""
    if not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
        return F.silu(gate) * up
    return _SwigluFp8Inputs.apply(gate, up, get_format(fmt).name, int(block))
