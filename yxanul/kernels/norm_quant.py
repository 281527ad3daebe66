"""RMSNorm fused with its 1 x b FP8 quantization: one read of x, writes y (for the residual stream and the
norm's backward) and the FP8 copy plus scales that the following FP8 GEMMs (q/k/v or gate/up) consume.

:func:`yxanul.kernels.tiles.rmsnorm_tiles` writes no y, only its FP8 copies in both GEMM layouts.

The quantized values are those of y *as rounded to its output dtype*, so they agree exactly with quantizing
the unfused norm's output. The row's mean square is a different reduction order than torch's, so y itself may
differ from :func:`yxanul.kernels.reference.rmsnorm` in the last bit of a few elements.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import YxanulError
from ..fp8.formats import get_format
from .quant import _cdiv, abs_max, cast_fp8, scale_from_amax, scale_inv_constant
from .reference import _check_2d, _check_block


@triton.jit
def _rmsnorm_quant_kernel(x_ptr, w_ptr, y_ptr, q_ptr, s_ptr, M, K, stride_xm, NKB, eps,
                          R: tl.constexpr, NG: tl.constexpr, BLOCK: tl.constexpr,
                          FMAX: tl.constexpr, POW2: tl.constexpr, INV: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = pid * R + tl.arange(0, R)
    g = tl.arange(0, NG)
    j = tl.arange(0, BLOCK)
    k = g[None, :, None] * BLOCK + j[None, None, :]                # [1, NG, BLOCK]
    mm = offs_m < M
    mask = mm[:, None, None] & (k < K)
    x = tl.load(x_ptr + offs_m[:, None, None] * stride_xm + k, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + k, mask=k < K, other=0.0).to(tl.float32)
    ms = tl.sum(tl.sum(x * x, axis=2), axis=1) / K                 # [R]
    rstd = 1.0 / tl.sqrt_rn(ms + eps)
    y = (x * rstd[:, None, None]) * w
    y_out = y.to(y_ptr.dtype.element_ty)
    off = offs_m[:, None, None] * K + k
    tl.store(y_ptr + off, y_out, mask=mask)
    yq = y_out.to(tl.float32)
    s = scale_from_amax(abs_max(yq, 2), FMAX, POW2, INV)   # [R, NG]
    q = cast_fp8(yq, s[:, :, None], FMAX, q_ptr.dtype.element_ty)
    tl.store(q_ptr + off, q, mask=mask)
    tl.store(s_ptr + offs_m[:, None] * NKB + g[None, :], s, mask=mm[:, None] & (g[None, :] < NKB))


def rmsnorm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, block: int = 128,
                  fmt: str = "e4m3", pow2_scales: bool = False):
    _check_2d(x)
    _check_block(block)
    if weight.shape != (x.shape[1],):
        raise YxanulError(f"norm weight shape {tuple(weight.shape)} does not match x {tuple(x.shape)}",
                          key="weight")
    f = get_format(fmt)
    x = x.contiguous()
    weight = weight.contiguous()
    M, K = x.shape
    nkb = _cdiv(K, block)
    ng = triton.next_power_of_2(nkb)
    if ng * block > 65536:
        raise YxanulError(f"rmsnorm_quant supports rows up to 65536 elements, got {K}", key="x")
    y = torch.empty_like(x)
    q = torch.empty((M, K), dtype=f.dtype, device=x.device)
    s = torch.empty((M, nkb), dtype=torch.float32, device=x.device)
    if x.numel():
        r = max(1, min(16, 4096 // (ng * block)))
        _rmsnorm_quant_kernel[(_cdiv(M, r),)](x, weight, y, q, s, M, K, x.stride(0), nkb, float(eps), R=r, NG=ng,
                                              BLOCK=block, FMAX=f.max, POW2=pow2_scales,
                                              INV=scale_inv_constant(f.max, x.device), num_warps=4)
    return y, q, s

