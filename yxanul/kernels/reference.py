"""Pure-torch references for every fused kernel in :mod:`yxanul.kernels`.

They define the numerics: each Triton kernel must produce the same scales and (on the GPU) the same FP8
bytes. All quantization goes through :func:`yxanul.fp8.quant.quantize`, in DeepSeek-V3's convention
``scale_inv = amax / FMT_MAX`` and ``q = cast_rne(x / scale_inv)``. Non-finite values propagate (the fused
kernels never synchronize with the host to check); callers that need the check use ``yxanul.fp8.quant``.

Shapes (x is 2-D ``[M, K]``, block ``b``):
  act_quant       q ``[M, K]``, s ``[M, ceil(K/b)]``            1 x b tiles along K
  act_quant_t     qT ``[K, M]``, sT ``[K, ceil(M/b)]``          1 x b tiles along M of x^T
  act_quant_dual  both of the above
  weight_quant    q ``[N, K]``, s ``[ceil(N/b), ceil(K/b)]``    b x b blocks
  tensor_quant    q like x, s a 0-d tensor                     one scale for the tensor
  tensor_quant_dual  q, s, qT                                  the same and its transpose (or a given scale)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import YxanulError
from ..fp8.backends import quant_tensor
from ..fp8.formats import get_format
from ..fp8.producers import (check_swiglu_shapes, rmsnorm_tiles_quant, swiglu_bwd_quant,  # noqa: F401
                             swiglu_bwd_tiles_quant, swiglu_fwd_quant, swiglu_tiles_quant)  # (the fused kernels' numerics)
from ..fp8.quant import quantize


def _check_2d(x: torch.Tensor, name: str = "x") -> None:
    if x.dim() != 2:
        raise YxanulError(f"{name} must be 2-D [M, K], got shape {tuple(x.shape)}", key=name)
    if not x.is_floating_point():
        raise YxanulError(f"{name} must be a floating-point tensor, got {x.dtype}", key=name)


def _check_block(block: int) -> None:
    if not isinstance(block, int) or block < 16 or block & (block - 1):
        raise YxanulError(f"block must be a power of two >= 16, got {block!r}", key="block")


def act_quant(x: torch.Tensor, block: int = 128, fmt: str = "e4m3", pow2_scales: bool = False):
    _check_2d(x)
    _check_block(block)
    return quantize(x, (1, block), fmt, pow2_scales, nonfinite="propagate")


def act_quant_t(x: torch.Tensor, block: int = 128, fmt: str = "e4m3", pow2_scales: bool = False):
    _check_2d(x)
    _check_block(block)
    return quantize(x.t().contiguous(), (1, block), fmt, pow2_scales, nonfinite="propagate")


def act_quant_dual(x: torch.Tensor, block: int = 128, fmt: str = "e4m3", pow2_scales: bool = False):
    """``(q, s, qT, sT)``: the row-tiled copy for the forward GEMM and the transposed one for wgrad."""
    q, s = act_quant(x, block, fmt, pow2_scales)
    qt, st = act_quant_t(x, block, fmt, pow2_scales)
    return q, s, qt, st


def weight_quant(w: torch.Tensor, block: int = 128, fmt: str = "e4m3", pow2_scales: bool = False):
    _check_2d(w, "w")
    _check_block(block)
    return quantize(w, (block, block), fmt, pow2_scales, nonfinite="propagate")


def tensor_quant(x: torch.Tensor, fmt: str = "e4m3"):
    if not x.is_floating_point():
        raise YxanulError(f"x must be a floating-point tensor, got {x.dtype}", key="x")
    return quantize(x, "tensor", fmt, False, nonfinite="propagate")


def tensor_quant_dual(x: torch.Tensor, fmt: str = "e4m3", scale_inv: torch.Tensor | None = None):
    """``(q, s, qT)``: per-tensor quantization of a 2-D x (with x's amax, or the given ``scale_inv``) and
    the transposed copy of q, which with one scale is the quantization of x^T."""
    _check_2d(x)
    q, s = quant_tensor(x, get_format(fmt), scale_inv=scale_inv)
    return q, s, q.t().contiguous()


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm exactly as :class:`yxanul.model.RMSNorm` computes it (FP32 inside, output in x's dtype)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def rmsnorm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, block: int = 128,
                  fmt: str = "e4m3", pow2_scales: bool = False):
    """``(y, q, s)``: y = RMSNorm(x) in x's dtype, and y's 1 x block quantization (of y as rounded)."""
    _check_2d(x)
    if weight.shape != (x.shape[1],):
        raise YxanulError(f"norm weight shape {tuple(weight.shape)} does not match x {tuple(x.shape)}",
                          key="weight")
    y = rmsnorm(x, weight, eps)
    q, s = act_quant(y, block, fmt, pow2_scales)
    return y, q, s


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up computed in FP32 and rounded once to the input dtype."""
    g = gate.float()
    return (F.silu(g) * up.float()).to(gate.dtype)


def swiglu_quant(gate: torch.Tensor, up: torch.Tensor, block: int = 128, fmt: str = "e4m3",
                 pow2_scales: bool = False, return_h: bool = True):
    """``(h or None, q, s)``: h = silu(gate) * up in gate's dtype and its 1 x block quantization."""
    _check_2d(gate, "gate")
    if up.shape != gate.shape:
        raise YxanulError(f"up shape {tuple(up.shape)} does not match gate {tuple(gate.shape)}", key="up")
    h = swiglu(gate, up)
    q, s = act_quant(h, block, fmt, pow2_scales)
    return (h if return_h else None), q, s
