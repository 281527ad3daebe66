"""FP8 operands in 1 x b tiles of both GEMM layouts, written by the kernels that produce their values.

Per-tile scales need no reduction over the whole tensor, so the kernel that computes a value can quantize it.
Two kernels of the quantizers' shapes each compute the values from the inputs and quantize one layout: the row
kernel a BM x b tile (BM row tiles, scales along the row, as ``act_quant``), the column kernel a b x BN tile
cast with its b x 1 scales and stored transposed (as ``act_quant_t``). The value being quantized is never
written in the activation dtype; its inputs are read once per layout. (One program owning a whole b x b tile
and writing both layouts, its chunks recomputed for the row scales, was measured much slower than the
separate quantizers on the H100: docs/perf-notes.md.) Every function returns ``(q [M, K],
s [M, K/b], qT [K, M], sT [K, M/b])``, the forward (or dgrad) and the weight-gradient operand with their scales.

:func:`rmsnorm_tiles`      RMSNorm's output ``(x * rstd) * w`` rounded to x's dtype, from x and the row scales
:func:`swiglu_tiles`       ``h = silu(g) * u`` rounded to the activation dtype (as the unfused layers round it):
                           down_proj's operands
:func:`swiglu_bwd_tiles`   ``dgate, dup`` in FP32 from g, u and dh, as the fused gate/up projection's output
                           gradient ``[dgate, dup]`` ``[M, 2F]``: its dgrad and wgrad operands

``g`` and ``u`` are two ``[M, F]`` views with one row stride (the halves of the fused gate/up GEMM's output).
Numerics: :mod:`yxanul.fp8.producers` (``rmsnorm_tiles_quant``, ``swiglu_tiles_quant``,
``swiglu_bwd_tiles_quant``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..fp8.formats import get_format
from .quant import _cdiv, cast_fp8, check_offsets, nan_max, scale_from_amax, scale_inv_constant

BM = 32      # rows per program of the row-tile kernels (a BM x block tile, as act_quant)
BN = 64      # columns per program of the column-tile kernels (a block x BN tile, as act_quant_t)
BN_BWD = 32  # the same for the SwiGLU backward, which holds two such tiles (dgate, dup)
WARPS = 4

# what the kernels compute from their inputs
RMSNORM, SWIGLU = 1, 2


@triton.jit
def cast_cols_t(x, qt_ptr, st_ptr, offs_m, cols, mask, pid_m, M, NMB, FMAX: tl.constexpr, POW2: tl.constexpr,
                INV: tl.constexpr):
    """Cast a b x BN tile (b rows of BN column tiles) with its column (b x 1) scales, store it transposed at rows
    `cols` of qT [*, M] and the scales at rows `cols` of sT [*, NMB]."""
    st = scale_from_amax(nan_max(tl.abs(x), 0), FMAX, POW2, INV)
    qt = cast_fp8(x, st[None, :], FMAX, qt_ptr.dtype.element_ty)
    tl.store(qt_ptr + cols[:, None] * M + offs_m[None, :], tl.trans(qt), mask=tl.trans(mask))
    tl.store(st_ptr + cols * NMB + pid_m, st, mask=tl.max(mask.to(tl.int32), 0) > 0)


@triton.jit
def _produce(a_ptr, b_ptr, r_ptr, w_ptr, offs_m, offs_k, mask, stride_in, M, K, PRODUCER: tl.constexpr):
    """A tile of the values to quantize, in FP32."""
    off = offs_m[:, None] * stride_in + offs_k[None, :]
    a = tl.load(a_ptr + off, mask=mask, other=0.0)
    if PRODUCER == 1:  # RMSNorm: (x * rstd) * w, rounded to x's dtype
        r = tl.load(r_ptr + offs_m, mask=offs_m < M, other=0.0)
        w = tl.load(w_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        y = ((a.to(tl.float32) * r[:, None]) * w[None, :]).to(a.dtype)
    else:  # SwiGLU: silu(g) * u, rounded to g's dtype
        g = a.to(tl.float32)
        u = tl.load(b_ptr + off, mask=mask, other=0.0).to(tl.float32)
        y = (tl.div_rn(g, 1.0 + tl.exp(-g)) * u).to(a.dtype)
    return y.to(tl.float32)


@triton.jit
def _tiles_rows_kernel(a_ptr, b_ptr, r_ptr, w_ptr, q_ptr, s_ptr, M, K, stride_in, NKB, PRODUCER: tl.constexpr,
                       BM: tl.constexpr, BLOCK: tl.constexpr,
                       FMAX: tl.constexpr, POW2: tl.constexpr, INV: tl.constexpr):
    pid_k = tl.program_id(1)
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_k = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    y = _produce(a_ptr, b_ptr, r_ptr, w_ptr, offs_m, offs_k, mask, stride_in, M, K, PRODUCER)
    s = scale_from_amax(nan_max(tl.abs(y), 1), FMAX, POW2, INV)
    tl.store(q_ptr + offs_m[:, None] * K + offs_k[None, :], cast_fp8(y, s[:, None], FMAX, q_ptr.dtype.element_ty),
             mask=mask)
    tl.store(s_ptr + offs_m * NKB + pid_k, s, mask=offs_m < M)


@triton.jit
def _cols_tile(M, K, BN: tl.constexpr, BLOCK: tl.constexpr):
    """A column kernel's BLOCK x BN tile: its row block, offsets and mask."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_k = tl.program_id(1) * BN + tl.arange(0, BN)
    return pid_m, offs_m, offs_k, (offs_m[:, None] < M) & (offs_k[None, :] < K)


@triton.jit
def _tiles_cols_kernel(a_ptr, b_ptr, r_ptr, w_ptr, qt_ptr, st_ptr, M, K, stride_in, NMB, PRODUCER: tl.constexpr,
                       BN: tl.constexpr, BLOCK: tl.constexpr,
                       FMAX: tl.constexpr, POW2: tl.constexpr, INV: tl.constexpr):
    pid_m, offs_m, offs_k, mask = _cols_tile(M, K, BN, BLOCK)
    y = _produce(a_ptr, b_ptr, r_ptr, w_ptr, offs_m, offs_k, mask, stride_in, M, K, PRODUCER)
    cast_cols_t(y, qt_ptr, st_ptr, offs_m, offs_k, mask, pid_m, M, NMB, FMAX, POW2, INV)


@triton.jit
def _swiglu_bwd_grads(g_ptr, u_ptr, d_ptr, offs_m, offs_f, mask, stride_in, stride_d):
    off = offs_m[:, None] * stride_in + offs_f[None, :]
    g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + off, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + offs_m[:, None] * stride_d + offs_f[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.div_rn(1.0, 1.0 + tl.exp(-g))
    return d * u * sig * (1.0 + g * (1.0 - sig)), d * (g * sig)


# the backward's two outputs side by side: [M, 2F] (dgate in columns [0, F), dup in [F, 2F)) with scales
# [M, 2 F/b], and their transposes [2F, M] with scales [2F, M/b]
@triton.jit
def _swiglu_bwd_tiles_rows_kernel(g_ptr, u_ptr, d_ptr, q_ptr, s_ptr, M, F, stride_in, stride_d, NFB,
                                  BM: tl.constexpr, BLOCK: tl.constexpr,
                                  FMAX: tl.constexpr, POW2: tl.constexpr, INV: tl.constexpr):
    pid_f = tl.program_id(1)
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_f = pid_f * BLOCK + tl.arange(0, BLOCK)
    mm = offs_m < M
    mask = mm[:, None] & (offs_f[None, :] < F)
    dg, du = _swiglu_bwd_grads(g_ptr, u_ptr, d_ptr, offs_m, offs_f, mask, stride_in, stride_d)
    s_g = scale_from_amax(nan_max(tl.abs(dg), 1), FMAX, POW2, INV)
    s_u = scale_from_amax(nan_max(tl.abs(du), 1), FMAX, POW2, INV)
    row = offs_m[:, None] * (2 * F)
    tl.store(q_ptr + row + offs_f[None, :], cast_fp8(dg, s_g[:, None], FMAX, q_ptr.dtype.element_ty), mask=mask)
    tl.store(q_ptr + row + F + offs_f[None, :], cast_fp8(du, s_u[:, None], FMAX, q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + offs_m * (2 * NFB) + pid_f, s_g, mask=mm)
    tl.store(s_ptr + offs_m * (2 * NFB) + NFB + pid_f, s_u, mask=mm)


@triton.jit
def _swiglu_bwd_tiles_cols_kernel(g_ptr, u_ptr, d_ptr, qt_ptr, st_ptr, M, F, stride_in, stride_d, NMB,
                                  BN: tl.constexpr, BLOCK: tl.constexpr,
                                  FMAX: tl.constexpr, POW2: tl.constexpr, INV: tl.constexpr):
    pid_m, offs_m, offs_f, mask = _cols_tile(M, F, BN, BLOCK)
    dg, du = _swiglu_bwd_grads(g_ptr, u_ptr, d_ptr, offs_m, offs_f, mask, stride_in, stride_d)
    cast_cols_t(dg, qt_ptr, st_ptr, offs_m, offs_f, mask, pid_m, M, NMB, FMAX, POW2, INV)
    cast_cols_t(du, qt_ptr, st_ptr, offs_m, offs_f + F, mask, pid_m, M, NMB, FMAX, POW2, INV)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(1) == 1 else t.contiguous()


def _pair(gate: torch.Tensor, up: torch.Tensor):
    """Two inputs read with one row stride."""
    gate, up = _rows(gate), _rows(up)
    if gate.stride(0) != up.stride(0):
        gate, up = gate.contiguous(), up.contiguous()
    return gate, up


def _outputs(M: int, K: int, block: int, fmt, device):
    f = get_format(fmt)
    return (torch.empty((M, K), dtype=f.dtype, device=device),
            torch.empty((M, _cdiv(K, block)), dtype=torch.float32, device=device),
            torch.empty((K, M), dtype=f.dtype, device=device),
            torch.empty((K, _cdiv(M, block)), dtype=torch.float32, device=device))


def _launch(producer: int, a, b, r, w, block: int, fmt: str, pow2_scales: bool, bn: int, num_warps: int):
    M, K = a.shape
    out = _outputs(M, K, block, fmt, a.device)
    check_offsets(a, out[0])
    if a.numel():
        fmax = get_format(fmt).max
        kw = dict(PRODUCER=producer, BLOCK=block, FMAX=fmax, POW2=pow2_scales,
                  INV=scale_inv_constant(fmax, a.device), num_warps=num_warps)
        torch.library.wrap_triton(_tiles_rows_kernel)[(_cdiv(M, BM), _cdiv(K, block))](
            a, b, r, w, out[0], out[1], M, K, a.stride(0), _cdiv(K, block), BM=BM, **kw)
        torch.library.wrap_triton(_tiles_cols_kernel)[(_cdiv(M, block), _cdiv(K, bn))](
            a, b, r, w, out[2], out[3], M, K, a.stride(0), _cdiv(M, block), BN=bn, **kw)
    return out


def rmsnorm_tiles(x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, block: int = 128, fmt: str = "e4m3",
                  pow2_scales: bool = False, bn: int = BN, num_warps: int = WARPS):
    """RMSNorm's output from x and its row scales ``rstd`` (``1 / sqrt(mean(x^2) + eps)``, FP32 ``[M]``); y itself
    is never written."""
    x = _rows(x)
    return _launch(RMSNORM, x, x, rstd.float().contiguous(), weight.contiguous(), block, fmt, pow2_scales, bn,
                   num_warps)


def swiglu_tiles(gate: torch.Tensor, up: torch.Tensor, block: int = 128, fmt: str = "e4m3",
                 pow2_scales: bool = False, bn: int = BN, num_warps: int = WARPS):
    """``h = silu(gate) * up`` (module docstring). ``bn``/``num_warps``: the column kernel's width and the warps."""
    gate, up = _pair(gate, up)
    return _launch(SWIGLU, gate, up, gate, gate, block, fmt, pow2_scales, bn, num_warps)


def swiglu_bwd_tiles(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor, block: int = 128, fmt: str = "e4m3",
                     pow2_scales: bool = False, bn: int = BN_BWD, num_warps: int = WARPS):
    """``[dgate, dup]`` ``[M, 2F]`` (module docstring); F must be a multiple of `block`."""
    gate, up = _pair(gate, up)
    dh = _rows(dh)
    M, F = gate.shape
    out = _outputs(M, 2 * F, block, fmt, gate.device)
    check_offsets(gate, dh, out[0])
    if gate.numel():
        fmax = get_format(fmt).max
        kw = dict(BLOCK=block, FMAX=fmax, POW2=pow2_scales, INV=scale_inv_constant(fmax, gate.device),
                  num_warps=num_warps)
        torch.library.wrap_triton(_swiglu_bwd_tiles_rows_kernel)[(_cdiv(M, BM), _cdiv(F, block))](
            gate, up, dh, out[0], out[1], M, F, gate.stride(0), dh.stride(0), _cdiv(F, block), BM=BM, **kw)
        torch.library.wrap_triton(_swiglu_bwd_tiles_cols_kernel)[(_cdiv(M, block), _cdiv(F, bn))](
            gate, up, dh, out[2], out[3], M, F, gate.stride(0), dh.stride(0), _cdiv(M, block), BN=bn, **kw)
    return out
