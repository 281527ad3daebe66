"""SwiGLU fused with its 1 x b FP8 quantization: ``h = silu(gate) * up`` (FP32 inside, rounded once to the
input dtype) and h's FP8 copy with scales, ready for down_proj, from one read of gate and up.
Storing h itself is optional (``return_h=False``), for backward schemes that recompute it.
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
def _swiglu_quant_kernel(g_ptr, u_ptr, h_ptr, q_ptr, s_ptr, M, F, stride_gm, stride_um, NKB,
                         BM: tl.constexpr, BLOCK: tl.constexpr, FMAX: tl.constexpr, POW2: tl.constexpr,
                         INV: tl.constexpr, STORE_H: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_k = pid_k * BLOCK + tl.arange(0, BLOCK)
    mm = offs_m < M
    mask = mm[:, None] & (offs_k[None, :] < F)
    g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs_m[:, None] * stride_um + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    h = tl.div_rn(g, 1.0 + tl.exp(-g)) * u
    h = h.to(h_ptr.dtype.element_ty).to(tl.float32)
    off = offs_m[:, None] * F + offs_k[None, :]
    if STORE_H:
        tl.store(h_ptr + off, h.to(h_ptr.dtype.element_ty), mask=mask)
    s = scale_from_amax(abs_max(h, 1), FMAX, POW2, INV)
    tl.store(q_ptr + off, cast_fp8(h, s[:, None], FMAX, q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + offs_m * NKB + pid_k, s, mask=mm)


def swiglu_quant(gate: torch.Tensor, up: torch.Tensor, block: int = 128, fmt: str = "e4m3",
                 pow2_scales: bool = False, return_h: bool = True):
    _check_2d(gate, "gate")
    _check_block(block)
    if up.shape != gate.shape:
        raise YxanulError(f"up shape {tuple(up.shape)} does not match gate {tuple(gate.shape)}", key="up")
    f = get_format(fmt)
    gate, up = gate.contiguous(), up.contiguous()
    M, F = gate.shape
    nkb = _cdiv(F, block)
    h = torch.empty_like(gate) if return_h else torch.empty((1,), dtype=gate.dtype, device=gate.device)
    q = torch.empty((M, F), dtype=f.dtype, device=gate.device)
    s = torch.empty((M, nkb), dtype=torch.float32, device=gate.device)
    if gate.numel():
        bm = 16 if block >= 256 else 32
        _swiglu_quant_kernel[(_cdiv(M, bm), nkb)](gate, up, h, q, s, M, F, gate.stride(0), up.stride(0), nkb,
                                                  BM=bm, BLOCK=block, FMAX=f.max, POW2=pow2_scales,
                                                  INV=scale_inv_constant(f.max, gate.device),
                                                  STORE_H=return_h, num_warps=4)
    return (h if return_h else None), q, s
