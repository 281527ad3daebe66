"""RMSNorm fused with its 1 x b FP8 quantization: one read of x, writes y (for the residual stream and the
norm's backward) and the FP8 copy plus scales that the following FP8 GEMMs (q/k/v or gate/up) consume.

:func:`rmsnorm_tiles` writes no y, only its FP8 copies in both GEMM layouts (forward and weight-gradient
operands), from x and the row scales computed beforehand (the whole-MLP function's blockwise path).

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
from .quant import _cdiv, abs_max, cast_cols_t, cast_fp8, nan_maximum, scale_from_amax, scale_inv_constant
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


@triton.jit
def _rmsnorm_tiles_kernel(x_ptr, r_ptr, w_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, M, K, stride_xm, NKB, NMB,
                          BLOCK: tl.constexpr, BN: tl.constexpr, FMAX: tl.constexpr, POW2: tl.constexpr,
                          INV: tl.constexpr):
    # y = (x * rstd) * w rounded to x's dtype, in 1 x BLOCK tiles of both layouts; one program per
    # BLOCK x BLOCK tile, BLOCK x BN chunks in registers (as _act_quant_dual_chunked_kernel)
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    mm = offs_m < M
    r = tl.load(r_ptr + offs_m, mask=mm, other=0.0)
    rmax = tl.zeros((BLOCK,), tl.float32)
    for c in tl.static_range(0, BLOCK, BN):
        offs_k = pid_k * BLOCK + c + tl.arange(0, BN)
        mask = mm[:, None] & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
        w = tl.load(w_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        y = ((x.to(tl.float32) * r[:, None]) * w[None, :]).to(x.dtype).to(tl.float32)
        rmax = nan_maximum(rmax, cast_cols_t(y, qt_ptr, st_ptr, offs_m, offs_k, mask, pid_m, M, NMB, FMAX, POW2,
                                             INV))
    s = scale_from_amax(rmax, FMAX, POW2, INV)
    for c in tl.static_range(0, BLOCK, BN):
        offs_k = pid_k * BLOCK + c + tl.arange(0, BN)
        mask = mm[:, None] & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
        w = tl.load(w_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        y = ((x.to(tl.float32) * r[:, None]) * w[None, :]).to(x.dtype).to(tl.float32)
        tl.store(q_ptr + offs_m[:, None] * K + offs_k[None, :], cast_fp8(y, s[:, None], FMAX, q_ptr.dtype.element_ty),
                 mask=mask)
    tl.store(s_ptr + offs_m * NKB + pid_k, s, mask=mm)


def rmsnorm_tiles(x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, block: int = 128, fmt: str = "e4m3",
                  pow2_scales: bool = False, bn: int = 32, num_warps: int = 4):
    """RMSNorm's output from x and its row scales ``rstd`` (``1 / sqrt(mean(x^2) + eps)``, FP32 ``[M]``), in 1 x
    block FP8 tiles of both GEMM layouts: ``(q [M, K], s, qT [K, M], sT)``. y itself is never written."""
    f = get_format(fmt)
    x, rstd, weight = x.contiguous(), rstd.float().contiguous(), weight.contiguous()
    M, K = x.shape
    nkb, nmb = _cdiv(K, block), _cdiv(M, block)
    q = torch.empty((M, K), dtype=f.dtype, device=x.device)
    s = torch.empty((M, nkb), dtype=torch.float32, device=x.device)
    qt = torch.empty((K, M), dtype=f.dtype, device=x.device)
    st = torch.empty((K, nmb), dtype=torch.float32, device=x.device)
    if x.numel():
        torch.library.wrap_triton(_rmsnorm_tiles_kernel)[(nmb, nkb)](
            x, rstd, weight, q, s, qt, st, M, K, x.stride(0), nkb, nmb, BLOCK=block, BN=min(bn, block), FMAX=f.max,
            POW2=pow2_scales, INV=scale_inv_constant(f.max, x.device), num_warps=num_warps)
    return q, s, qt, st
