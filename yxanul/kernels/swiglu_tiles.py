"""The SwiGLU forward and backward fused with blockwise (1 x b tile) FP8 quantization of their outputs.

Per-tile scales need no reduction over the whole tensor, so the kernel that computes a value can quantize it:
one program owns b tokens x b features. The transposed copy's tiles (b tokens of one feature) are complete in
every column of the program's tile, so each chunk of columns is cast and stored transposed as soon as it is
computed; the row tiles (b features of one token) are complete once all chunks are seen, so the chunks are then
recomputed from the inputs (read again, from cache) and cast with the row scales. Registers hold one chunk of
b x BN values, not the whole tile.

forward   ``h = silu(g) * u`` rounded to the activation dtype (as the unfused layers round it) ->
          ``(h_q [M, F], s [M, F/b], h_qT [F, M], sT [F, M/b])``: down_proj's forward and weight-gradient operands.
backward  ``dgate, dup`` in FP32 from g, u and dh -> the fused gate/up projection's output gradient
          ``[dgate, dup]`` ``[M, 2F]`` in the same four-tensor form: its dgrad and wgrad operands.

``g`` and ``u`` are two ``[M, F]`` views with one row stride (the halves of the fused gate/up GEMM's output).
Numerics: :func:`yxanul.fp8.producers.swiglu_tiles_quant` and :func:`~yxanul.fp8.producers.swiglu_bwd_tiles_quant`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..fp8.formats import get_format
from .quant import cast_cols_t, cast_fp8, nan_maximum, scale_from_amax, scale_inv_constant

BN = 32      # columns per chunk
WARPS = 4


@triton.jit
def _silu_mul(g, u):
    return tl.div_rn(g, 1.0 + tl.exp(-g)) * u


@triton.jit
def _swiglu_tiles_kernel(g_ptr, u_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, M, F, stride_in, NFB, NMB,
                         BLOCK: tl.constexpr, BN: tl.constexpr, FMAX: tl.constexpr, POW2: tl.constexpr,
                         INV: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_f = tl.program_id(1)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    mm = offs_m < M
    rmax = tl.zeros((BLOCK,), tl.float32)
    for c in tl.static_range(0, BLOCK, BN):
        offs_f = pid_f * BLOCK + c + tl.arange(0, BN)
        mask = mm[:, None] & (offs_f[None, :] < F)
        off = offs_m[:, None].to(tl.int64) * stride_in + offs_f[None, :]
        g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + off, mask=mask, other=0.0).to(tl.float32)
        h = _silu_mul(g, u).to(g_ptr.dtype.element_ty).to(tl.float32)
        rmax = nan_maximum(rmax, cast_cols_t(h, qt_ptr, st_ptr, offs_m, offs_f, mask, pid_m, M, NMB, FMAX, POW2,
                                              INV))
    s = scale_from_amax(rmax, FMAX, POW2, INV)
    for c in tl.static_range(0, BLOCK, BN):
        offs_f = pid_f * BLOCK + c + tl.arange(0, BN)
        mask = mm[:, None] & (offs_f[None, :] < F)
        off = offs_m[:, None].to(tl.int64) * stride_in + offs_f[None, :]
        g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + off, mask=mask, other=0.0).to(tl.float32)
        h = _silu_mul(g, u).to(g_ptr.dtype.element_ty).to(tl.float32)
        q = cast_fp8(h, s[:, None], FMAX, q_ptr.dtype.element_ty)
        tl.store(q_ptr + offs_m[:, None].to(tl.int64) * F + offs_f[None, :], q, mask=mask)
    tl.store(s_ptr + offs_m * NFB + pid_f, s, mask=mm)


@triton.jit
def _swiglu_bwd_grads(g_ptr, u_ptr, d_ptr, offs_m, offs_f, mask, stride_in, stride_d):
    off = offs_m[:, None].to(tl.int64) * stride_in + offs_f[None, :]
    g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + off, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + offs_m[:, None].to(tl.int64) * stride_d + offs_f[None, :], mask=mask,
                other=0.0).to(tl.float32)
    sig = tl.div_rn(1.0, 1.0 + tl.exp(-g))
    return d * u * sig * (1.0 + g * (1.0 - sig)), d * (g * sig)


@triton.jit
def _swiglu_bwd_tiles_kernel(g_ptr, u_ptr, d_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, M, F, stride_in, stride_d, NFB,
                             NMB, BLOCK: tl.constexpr, BN: tl.constexpr, FMAX: tl.constexpr, POW2: tl.constexpr,
                             INV: tl.constexpr):
    # outputs are [M, 2F] (dgate in columns [0, F), dup in [F, 2F)) and their transposes [2F, M]
    pid_m = tl.program_id(0)
    pid_f = tl.program_id(1)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    mm = offs_m < M
    rmax_g = tl.zeros((BLOCK,), tl.float32)
    rmax_u = tl.zeros((BLOCK,), tl.float32)
    for c in tl.static_range(0, BLOCK, BN):
        offs_f = pid_f * BLOCK + c + tl.arange(0, BN)
        mask = mm[:, None] & (offs_f[None, :] < F)
        dg, du = _swiglu_bwd_grads(g_ptr, u_ptr, d_ptr, offs_m, offs_f, mask, stride_in, stride_d)
        rmax_g = nan_maximum(rmax_g, cast_cols_t(dg, qt_ptr, st_ptr, offs_m, offs_f, mask, pid_m, M, NMB, FMAX,
                                                  POW2, INV))
        rmax_u = nan_maximum(rmax_u, cast_cols_t(du, qt_ptr, st_ptr, offs_m, offs_f + F, mask, pid_m, M, NMB,
                                                  FMAX, POW2, INV))
    s_g = scale_from_amax(rmax_g, FMAX, POW2, INV)
    s_u = scale_from_amax(rmax_u, FMAX, POW2, INV)
    for c in tl.static_range(0, BLOCK, BN):
        offs_f = pid_f * BLOCK + c + tl.arange(0, BN)
        mask = mm[:, None] & (offs_f[None, :] < F)
        dg, du = _swiglu_bwd_grads(g_ptr, u_ptr, d_ptr, offs_m, offs_f, mask, stride_in, stride_d)
        row = offs_m[:, None].to(tl.int64) * (2 * F)
        tl.store(q_ptr + row + offs_f[None, :], cast_fp8(dg, s_g[:, None], FMAX, q_ptr.dtype.element_ty), mask=mask)
        tl.store(q_ptr + row + F + offs_f[None, :], cast_fp8(du, s_u[:, None], FMAX, q_ptr.dtype.element_ty),
                 mask=mask)
    tl.store(s_ptr + offs_m * (2 * NFB) + pid_f, s_g, mask=mm)
    tl.store(s_ptr + offs_m * (2 * NFB) + NFB + pid_f, s_u, mask=mm)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(1) == 1 else t.contiguous()


def _inputs(gate: torch.Tensor, up: torch.Tensor):
    gate, up = _rows(gate), _rows(up)
    if gate.stride(0) != up.stride(0):
        gate, up = gate.contiguous(), up.contiguous()
    return gate, up


def swiglu_tiles(gate: torch.Tensor, up: torch.Tensor, block: int = 128, fmt: str = "e4m3",
                 pow2_scales: bool = False, bn: int = BN, num_warps: int = WARPS):
    """``(h_q, s, h_qT, sT)``; see the module docstring. ``bn``/``num_warps``: the launch shape."""
    f = get_format(fmt)
    gate, up = _inputs(gate, up)
    M, F = gate.shape
    dev = gate.device
    nfb, nmb = _cdiv(F, block), _cdiv(M, block)
    q = torch.empty((M, F), dtype=f.dtype, device=dev)
    s = torch.empty((M, nfb), dtype=torch.float32, device=dev)
    qt = torch.empty((F, M), dtype=f.dtype, device=dev)
    st = torch.empty((F, nmb), dtype=torch.float32, device=dev)
    if gate.numel():
        torch.library.wrap_triton(_swiglu_tiles_kernel)[(nmb, nfb)](
            gate, up, q, s, qt, st, M, F, gate.stride(0), nfb, nmb, BLOCK=block, BN=min(bn, block), FMAX=f.max,
            POW2=pow2_scales, INV=scale_inv_constant(f.max, dev), num_warps=num_warps)
    return q, s, qt, st


def swiglu_bwd_tiles(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor, block: int = 128, fmt: str = "e4m3",
                     pow2_scales: bool = False, bn: int = BN, num_warps: int = WARPS):
    """``(dgu_q [M, 2F], s, dgu_qT [2F, M], sT)`` for ``[dgate, dup]``; see the module docstring."""
    f = get_format(fmt)
    gate, up = _inputs(gate, up)
    dh = _rows(dh)
    M, F = gate.shape
    dev = gate.device
    nfb, nmb = _cdiv(F, block), _cdiv(M, block)
    q = torch.empty((M, 2 * F), dtype=f.dtype, device=dev)
    s = torch.empty((M, 2 * nfb), dtype=torch.float32, device=dev)
    qt = torch.empty((2 * F, M), dtype=f.dtype, device=dev)
    st = torch.empty((2 * F, nmb), dtype=torch.float32, device=dev)
    if gate.numel():
        torch.library.wrap_triton(_swiglu_bwd_tiles_kernel)[(nmb, nfb)](
            gate, up, dh, q, s, qt, st, M, F, gate.stride(0), dh.stride(0), nfb, nmb, BLOCK=block,
            BN=min(bn, block), FMAX=f.max, POW2=pow2_scales, INV=scale_inv_constant(f.max, dev),
            num_warps=num_warps)
    return q, s, qt, st
