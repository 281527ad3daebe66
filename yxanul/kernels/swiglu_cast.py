"""The SwiGLU forward and backward fused with the FP8 quantization of their outputs, for delayed scaling.

``h = silu(gate) * up`` feeds down_proj, which needs h in FP8 twice: ``[M, F]`` for its forward GEMM and
transposed ``[F, M]`` for its weight gradient (Hopper's FP8 GEMMs take K-major operands only). The backward
produces ``dgate`` and ``dup``, the output gradients of the gate and up projections, each needed in FP8 in the same
two layouts. With the scales known in advance (delayed scaling), one pass reads its inputs once and writes the
FP8 tensors plus one partial amax per tile: h, ``dgate`` and ``dup`` never exist in BF16.
Numerics: :func:`yxanul.kernels.reference.swiglu_fwd_quant` and :func:`~yxanul.kernels.reference.swiglu_bwd_quant`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..fp8.formats import get_format
from .quant import _cdiv, abs_max, cast_fp8

# tile: tokens x features, and warps; the fastest of the shapes scripts/device_swiglu_bwd_bench.py compares
BM = 32
BN = 128
WARPS = 4


@triton.jit
def _tile_amax(x):
    return abs_max(abs_max(x, 1), 0)


@triton.jit
def _tile(M, F, BM: tl.constexpr, BN: tl.constexpr):
    """This program's BM x BN tile of an [M, F] tensor: offsets and mask, and those of its place in the [F, M]
    transpose."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < F)
    off = offs_m[:, None].to(tl.int64) * F + offs_n[None, :]
    off_t = offs_n[:, None].to(tl.int64) * M + offs_m[None, :]
    return off, mask, off_t, tl.trans(mask)


@triton.jit
def _cast_both(x, s_ptr, q_ptr, qt_ptr, off, mask, off_t, mask_t, FMAX: tl.constexpr):
    """Cast a tile with the per-tensor scale at s_ptr and store it in both layouts."""
    q = cast_fp8(x, tl.load(s_ptr), FMAX, q_ptr.dtype.element_ty)
    tl.store(q_ptr + off, q, mask=mask)
    tl.store(qt_ptr + off_t, tl.trans(q), mask=mask_t)


@triton.jit
def _swiglu_fwd_cast_kernel(g_ptr, u_ptr, s_ptr, q_ptr, qt_ptr, part_ptr, M, F,
                            BM: tl.constexpr, BN: tl.constexpr, FMAX: tl.constexpr):
    off, mask, off_t, mask_t = _tile(M, F, BM, BN)
    g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + off, mask=mask, other=0.0).to(tl.float32)
    h = tl.div_rn(g, 1.0 + tl.exp(-g)) * u
    h = h.to(g_ptr.dtype.element_ty).to(tl.float32)  # rounded once to the activation dtype, as unfused
    _cast_both(h, s_ptr, q_ptr, qt_ptr, off, mask, off_t, mask_t, FMAX)
    tl.store(part_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), _tile_amax(h))


@triton.jit
def _swiglu_bwd_cast_kernel(g_ptr, u_ptr, d_ptr, sg_ptr, su_ptr, gq_ptr, gqt_ptr, uq_ptr, uqt_ptr, part_ptr,
                            M, F, NP, BM: tl.constexpr, BN: tl.constexpr, FMAX: tl.constexpr):
    off, mask, off_t, mask_t = _tile(M, F, BM, BN)
    g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + off, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + off, mask=mask, other=0.0).to(tl.float32)
    sig = tl.div_rn(1.0, 1.0 + tl.exp(-g))
    dg = d * u * sig * (1.0 + g * (1.0 - sig))
    du = d * (g * sig)
    _cast_both(dg, sg_ptr, gq_ptr, gqt_ptr, off, mask, off_t, mask_t, FMAX)
    _cast_both(du, su_ptr, uq_ptr, uqt_ptr, off, mask, off_t, mask_t, FMAX)
    pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(part_ptr + pid, _tile_amax(dg))
    tl.store(part_ptr + NP + pid, _tile_amax(du))


def swiglu_fwd_cast(gate: torch.Tensor, up: torch.Tensor, scale_h: torch.Tensor, fmt: str = "e4m3",
                    bm: int = BM, bn: int = BN, num_warps: int = WARPS):
    """``(h_q, h_qT, amax)``; see the module docstring."""
    f = get_format(fmt)
    gate, up = gate.contiguous(), up.contiguous()
    M, F = gate.shape
    dev = gate.device
    q = torch.empty((M, F), dtype=f.dtype, device=dev)
    qt = torch.empty((F, M), dtype=f.dtype, device=dev)
    grid = (_cdiv(M, bm), _cdiv(F, bn))
    part = torch.zeros((max(grid[0] * grid[1], 1),), dtype=torch.float32, device=dev)
    if gate.numel():
        s = scale_h.float().reshape(()).contiguous()
        torch.library.wrap_triton(_swiglu_fwd_cast_kernel)[grid](gate, up, s, q, qt, part, M, F, BM=bm, BN=bn,
                                                                  FMAX=f.max, num_warps=num_warps)
    return q, qt, part.amax()


def swiglu_bwd_cast(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor, scale_gate: torch.Tensor,
                    scale_up: torch.Tensor, fmt: str = "e4m3", bm: int = BM, bn: int = BN, num_warps: int = WARPS):
    """``(dgate_q, dgate_qT, dup_q, dup_qT, amax [2])``; see the module docstring. ``bm``/``bn``/``num_warps``:
    the tile and launch shape (a benchmark's knob; the defaults are the measured best)."""
    f = get_format(fmt)
    gate, up, dh = gate.contiguous(), up.contiguous(), dh.contiguous()
    M, F = gate.shape
    dev = gate.device
    gq = torch.empty((M, F), dtype=f.dtype, device=dev)
    gqt = torch.empty((F, M), dtype=f.dtype, device=dev)
    uq = torch.empty((M, F), dtype=f.dtype, device=dev)
    uqt = torch.empty((F, M), dtype=f.dtype, device=dev)
    grid = (_cdiv(M, bm), _cdiv(F, bn))
    np_ = grid[0] * grid[1]
    part = torch.zeros((2, max(np_, 1)), dtype=torch.float32, device=dev)
    if gate.numel():
        sg = scale_gate.float().reshape(()).contiguous()
        su = scale_up.float().reshape(()).contiguous()
        torch.library.wrap_triton(_swiglu_bwd_cast_kernel)[grid](
            gate, up, dh, sg, su, gq, gqt, uq, uqt, part, M, F, np_, BM=bm, BN=bn, FMAX=f.max,
            num_warps=num_warps)
    return gq, gqt, uq, uqt, part.amax(dim=1)

