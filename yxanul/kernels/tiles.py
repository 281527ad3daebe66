"""FP8 operands in 1 x b tiles of both GEMM layouts, written by the kernel that produces their values.

Per-tile scales need no reduction over the whole tensor, so the kernel that computes a value can quantize it:
one program owns b rows x b columns. The transposed copy's tiles (b rows of one column) are complete in every
column of the program's tile, so each chunk of columns is cast and stored transposed as soon as it is computed
(:func:`cast_cols_t`); the row tiles (b columns of one row) are complete once all chunks are seen, so the chunks
are then recomputed from the inputs (read again, from cache) and cast with the row scales. Registers hold one
chunk of b x BN values, not the whole tile. Every function returns ``(q [M, K], s [M, K/b], qT [K, M],
sT [K, M/b])``, the forward (or dgrad) and the weight-gradient operand with their scales.

:func:`dual_tiles`         x itself (``act_quant_dual`` with chunks)
:func:`rmsnorm_tiles`      RMSNorm's output ``(x * rstd) * w`` rounded to x's dtype, from x and the row scales
:func:`swiglu_tiles`       ``h = silu(g) * u`` rounded to the activation dtype (as the unfused layers round it):
                           down_proj's operands
:func:`swiglu_bwd_tiles`   ``dgate, dup`` in FP32 from g, u and dh, as the fused gate/up projection's output
                           gradient ``[dgate, dup]`` ``[M, 2F]``: its dgrad and wgrad operands

``g`` and ``u`` are two ``[M, F]`` views with one row stride (the halves of the fused gate/up GEMM's output).
Numerics: :mod:`yxanul.kernels.reference` (``act_quant_dual``) and :mod:`yxanul.fp8.producers`
(``rmsnorm_tiles_quant``, ``swiglu_tiles_quant``, ``swiglu_bwd_tiles_quant``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..fp8.formats import get_format
from .quant import _cdiv, cast_fp8, nan_max, nan_maximum, scale_from_amax, scale_inv_constant

BN = 32      # columns per chunk
WARPS = 4

# what _dual_tiles_kernel computes from its inputs
IDENTITY, RMSNORM, SWIGLU = 0, 1, 2


@triton.jit
def cast_cols_t(x, qt_ptr, st_ptr, offs_m, cols, mask, pid_m, M, NMB, FMAX: tl.constexpr, POW2: tl.constexpr,
                INV: tl.constexpr):
    """Cast a b x BN chunk (b rows of one column tile) with its column (b x 1) scales, store it transposed at rows
    `cols` of qT [*, M] and the scales at rows `cols` of sT [*, NMB]; return the chunk's row maxima of |x|."""
    ax = tl.abs(x)
    st = scale_from_amax(nan_max(ax, 0), FMAX, POW2, INV)
    qt = cast_fp8(x, st[None, :], FMAX, qt_ptr.dtype.element_ty)
    tl.store(qt_ptr + cols[:, None].to(tl.int64) * M + offs_m[None, :], tl.trans(qt), mask=tl.trans(mask))
    tl.store(st_ptr + cols * NMB + pid_m, st, mask=tl.max(mask.to(tl.int32), 0) > 0)
    return nan_max(ax, 1)


@triton.jit
def _produce(a_ptr, b_ptr, r, w_ptr, offs_m, offs_k, mask, stride_in, K, PRODUCER: tl.constexpr):
    """One b x BN chunk of the values to quantize, in FP32."""
    off = offs_m[:, None].to(tl.int64) * stride_in + offs_k[None, :]
    a = tl.load(a_ptr + off, mask=mask, other=0.0)
    if PRODUCER == 1:    # RMSNorm
        w = tl.load(w_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        y = ((a.to(tl.float32) * r[:, None]) * w[None, :]).to(a.dtype)
    elif PRODUCER == 2:  # SwiGLU
        g = a.to(tl.float32)
        u = tl.load(b_ptr + off, mask=mask, other=0.0).to(tl.float32)
        y = (tl.div_rn(g, 1.0 + tl.exp(-g)) * u).to(a.dtype)
    else:
        y = a
    return y.to(tl.float32)


@triton.jit
def _dual_tiles_kernel(a_ptr, b_ptr, r_ptr, w_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, M, K, stride_in, NKB, NMB,
                       PRODUCER: tl.constexpr, BLOCK: tl.constexpr, BN: tl.constexpr, FMAX: tl.constexpr,
                       POW2: tl.constexpr, INV: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    mm = offs_m < M
    r = tl.zeros((BLOCK,), tl.float32)
    if PRODUCER == 1:
        r = tl.load(r_ptr + offs_m, mask=mm, other=0.0)
    rmax = tl.zeros((BLOCK,), tl.float32)
    for c in tl.static_range(0, BLOCK, BN):
        offs_k = pid_k * BLOCK + c + tl.arange(0, BN)
        mask = mm[:, None] & (offs_k[None, :] < K)
        y = _produce(a_ptr, b_ptr, r, w_ptr, offs_m, offs_k, mask, stride_in, K, PRODUCER)
        rmax = nan_maximum(rmax, cast_cols_t(y, qt_ptr, st_ptr, offs_m, offs_k, mask, pid_m, M, NMB, FMAX, POW2,
                                             INV))
    s = scale_from_amax(rmax, FMAX, POW2, INV)
    for c in tl.static_range(0, BLOCK, BN):
        offs_k = pid_k * BLOCK + c + tl.arange(0, BN)
        mask = mm[:, None] & (offs_k[None, :] < K)
        y = _produce(a_ptr, b_ptr, r, w_ptr, offs_m, offs_k, mask, stride_in, K, PRODUCER)
        tl.store(q_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :],
                 cast_fp8(y, s[:, None], FMAX, q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + offs_m * NKB + pid_k, s, mask=mm)


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
    # two outputs side by side: [M, 2F] (dgate in columns [0, F), dup in [F, 2F)) and their transposes [2F, M]
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
    if a.numel():
        fmax = get_format(fmt).max
        torch.library.wrap_triton(_dual_tiles_kernel)[(_cdiv(M, block), _cdiv(K, block))](
            a, b, r, w, *out, M, K, a.stride(0), _cdiv(K, block), _cdiv(M, block), PRODUCER=producer, BLOCK=block,
            BN=min(bn, block), FMAX=fmax, POW2=pow2_scales, INV=scale_inv_constant(fmax, a.device),
            num_warps=num_warps)
    return out


def dual_tiles(x: torch.Tensor, block: int = 128, fmt: str = "e4m3", pow2_scales: bool = False, bn: int = BN,
               num_warps: int = WARPS):
    """x itself in 1 x block tiles of both layouts from one read (module docstring)."""
    x = _rows(x)
    return _launch(IDENTITY, x, x, x, x, block, fmt, pow2_scales, bn, num_warps)


def rmsnorm_tiles(x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, block: int = 128, fmt: str = "e4m3",
                  pow2_scales: bool = False, bn: int = BN, num_warps: int = WARPS):
    """RMSNorm's output from x and its row scales ``rstd`` (``1 / sqrt(mean(x^2) + eps)``, FP32 ``[M]``); y itself
    is never written."""
    x = _rows(x)
    return _launch(RMSNORM, x, x, rstd.float().contiguous(), weight.contiguous(), block, fmt, pow2_scales, bn,
                   num_warps)


def swiglu_tiles(gate: torch.Tensor, up: torch.Tensor, block: int = 128, fmt: str = "e4m3",
                 pow2_scales: bool = False, bn: int = BN, num_warps: int = WARPS):
    """``h = silu(gate) * up`` (module docstring). ``bn``/``num_warps``: the launch shape."""
    gate, up = _pair(gate, up)
    return _launch(SWIGLU, gate, up, gate, gate, block, fmt, pow2_scales, bn, num_warps)


def swiglu_bwd_tiles(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor, block: int = 128, fmt: str = "e4m3",
                     pow2_scales: bool = False, bn: int = BN, num_warps: int = WARPS):
    """``[dgate, dup]`` ``[M, 2F]`` (module docstring); F must be a multiple of `block`."""
    gate, up = _pair(gate, up)
    dh = _rows(dh)
    M, F = gate.shape
    out = _outputs(M, 2 * F, block, fmt, gate.device)
    if gate.numel():
        fmax = get_format(fmt).max
        torch.library.wrap_triton(_swiglu_bwd_tiles_kernel)[(_cdiv(M, block), _cdiv(F, block))](
            gate, up, dh, *out, M, F, gate.stride(0), dh.stride(0), _cdiv(F, block), _cdiv(M, block), BLOCK=block,
            BN=min(bn, block), FMAX=fmax, POW2=pow2_scales, INV=scale_inv_constant(fmax, gate.device),
            num_warps=num_warps)
    return out
