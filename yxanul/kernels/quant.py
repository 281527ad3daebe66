"""Triton FP8 quantization kernels: 1 x b activation tiles, their transpose, both at once, b x b weight
blocks, and one scale per tensor.

Numerics follow :mod:`yxanul.kernels.reference` bit for bit on the GPU: ``scale_inv = max(amax, 1e-12) / FMAX``
(IEEE division), optional power-of-two rounding up of the scale, ``q = rne(clamp(x / scale_inv, +-FMAX))``.
The functions here launch Triton unconditionally; :mod:`yxanul.kernels` chooses between them and the
references. Inputs must be 2-D; they are made contiguous.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..errors import YxanulError
from ..fp8.formats import get_format
from .reference import _check_2d, _check_block

AMAX_EPS = 1e-12
# Round to the FP8 grid in FP32 arithmetic before the cast: only needed under TRITON_INTERPRET=1, whose cast is
# not always round-to-nearest-even. On the GPU the cast itself (cvt.rn.satfinite) is exact and the software
# rounding would make these kernels compute-bound (scripts/device_quant_bench.py, docs/perf-notes.md).
EMULATE_ROUNDING = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def scale_from_amax(amax, FMAX: tl.constexpr, POW2: tl.constexpr, INV: tl.constexpr):
    """scale_inv = max(amax, eps) / FMAX, optionally rounded up to a power of two (exact, via the bits).

    INV = 0.0: IEEE division (what torch computes on the CPU). INV = fp32(1 / FMAX): multiplication by the
    reciprocal, which is what torch computes on CUDA for a tensor divided by a Python scalar.
    """
    if INV == 0.0:
        s = tl.div_rn(tl.maximum(amax, 1e-12), FMAX)
    else:
        s = tl.maximum(amax, 1e-12) * INV
    if POW2:
        bits = s.to(tl.int32, bitcast=True)
        up = (bits & 0x7F800000) + 0x00800000
        bits = tl.where((bits & 0x007FFFFF) != 0, up, bits)
        s = bits.to(tl.float32, bitcast=True)
    return tl.where(amax != amax, amax, s)  # a NaN amax gives a NaN scale (tl.maximum would drop it)


@triton.jit
def round_to_fp8_grid(y, MBITS: tl.constexpr, MIN_NORMAL: tl.constexpr, SUB_MAGIC: tl.constexpr):
    """Round FP32 values (|y| <= FMAX) to the nearest FP8 value, ties to even, staying in FP32.

    Normal range: round the FP32 mantissa to MBITS bits on the integer bits (a carry moves into the exponent
    as it should). Subnormal range: the quantum is fixed, so adding and subtracting a magic constant rounds.
    The following cast is then exact on every backend (Triton's CPU interpreter mis-rounds the carry case).
    """
    DROP: tl.constexpr = 23 - MBITS
    bits = y.to(tl.int32, bitcast=True)
    rb = (bits + ((1 << (DROP - 1)) - 1) + ((bits >> DROP) & 1)) & (-(1 << DROP))
    a = tl.abs(y)
    sub = (a + SUB_MAGIC) - SUB_MAGIC
    # copy the sign bit (so -tiny rounds to -0.0 as torch's cast does; `-sub` would give +0.0 for sub == 0)
    sub = (sub.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)
    return tl.where(a < MIN_NORMAL, sub, rb.to(tl.float32, bitcast=True))


@triton.jit
def nan_max(a, AXIS: tl.constexpr):
    """max along AXIS that is NaN when any element is (tl.max skips NaN), like torch.amax."""
    m = tl.max(a, axis=AXIS)
    n = tl.max((a != a).to(tl.int32), axis=AXIS)
    return tl.where(n > 0, float("nan"), m)


@triton.jit
def abs_max(x, AXIS: tl.constexpr):
    return nan_max(tl.abs(x), AXIS)


@triton.jit
def nan_maximum(a, b):
    """Elementwise max that is NaN where either operand is (tl.maximum drops NaN)."""
    return tl.where((a != a) | (b != b), float("nan"), tl.maximum(a, b))


@triton.jit
def max_of_partials(part_ptr, NPART, PB: tl.constexpr):
    """The NaN-propagating max of NPART partial maxima, read PB at a time (a few KB, from L2): lets every
    program of a cast kernel derive the tensor's scale itself, with no launch between amax and cast."""
    m = tl.zeros((PB,), tl.float32)
    for off in range(0, NPART, PB):
        p = off + tl.arange(0, PB)
        m = nan_maximum(m, tl.load(part_ptr + p, mask=p < NPART, other=0.0))
    return nan_max(m, 0)


@triton.jit
def cast_fp8(x, s, FMAX: tl.constexpr, out_ty: tl.constexpr):
    y = tl.div_rn(x, s)
    yc = tl.minimum(tl.maximum(y, -FMAX), FMAX)
    if EMULATE_ROUNDING:
        if FMAX == 448.0:     # E4M3: 3 mantissa bits, smallest normal 2^-6, subnormal quantum 2^-9
            yc = round_to_fp8_grid(yc, 3, 0.015625, 24576.0)
        else:                 # E5M2: 2 mantissa bits, smallest normal 2^-14, subnormal quantum 2^-16
            yc = round_to_fp8_grid(yc, 2, 0.00006103515625, 192.0)
    yc = tl.where(y != y, y, yc)  # NaN propagates
    return yc.to(out_ty, fp_downcast_rounding="rtne")


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, NKB,
                      BM: tl.constexpr, BLOCK: tl.constexpr, FMAX: tl.constexpr, POW2: tl.constexpr,
                      INV: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_k = pid_k * BLOCK + tl.arange(0, BLOCK)
    mm = offs_m < M
    mask = mm[:, None] & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    s = scale_from_amax(abs_max(x, 1), FMAX, POW2, INV)
    q = cast_fp8(x, s[:, None], FMAX, q_ptr.dtype.element_ty)
    tl.store(q_ptr + offs_m[:, None] * K + offs_k[None, :], q, mask=mask)
    tl.store(s_ptr + offs_m * NKB + pid_k, s, mask=mm)


@triton.jit
def _act_quant_t_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, NMB,
                        BK: tl.constexpr, BLOCK: tl.constexpr, FMAX: tl.constexpr, POW2: tl.constexpr,
                      INV: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_k = pid_k * BK + tl.arange(0, BK)
    mk = offs_k < K
    mask = (offs_m[:, None] < M) & mk[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    s = scale_from_amax(abs_max(x, 0), FMAX, POW2, INV)
    q = cast_fp8(x, s[None, :], FMAX, q_ptr.dtype.element_ty)
    tl.store(q_ptr + offs_k[:, None] * M + offs_m[None, :], tl.trans(q), mask=tl.trans(mask))
    tl.store(s_ptr + offs_k * NMB + pid_m, s, mask=mk)


@triton.jit
def _act_quant_dual_kernel(x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, M, K, stride_xm, NKB, NMB,
                           BLOCK: tl.constexpr, FMAX: tl.constexpr, POW2: tl.constexpr,
                      INV: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_k = pid_k * BLOCK + tl.arange(0, BLOCK)
    mm = offs_m < M
    mk = offs_k < K
    mask = mm[:, None] & mk[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    ax = tl.abs(x)
    s = scale_from_amax(nan_max(ax, 1), FMAX, POW2, INV)
    q = cast_fp8(x, s[:, None], FMAX, q_ptr.dtype.element_ty)
    tl.store(q_ptr + offs_m[:, None] * K + offs_k[None, :], q, mask=mask)
    tl.store(s_ptr + offs_m * NKB + pid_k, s, mask=mm)
    st = scale_from_amax(nan_max(ax, 0), FMAX, POW2, INV)
    qt = cast_fp8(x, st[None, :], FMAX, qt_ptr.dtype.element_ty)
    tl.store(qt_ptr + offs_k[:, None] * M + offs_m[None, :], tl.trans(qt), mask=tl.trans(mask))
    tl.store(st_ptr + offs_k * NMB + pid_m, st, mask=mk)


@triton.jit
def _weight_quant_kernel(w_ptr, q_ptr, s_ptr, N, K, stride_wn, NKB,
                         BLOCK: tl.constexpr, FMAX: tl.constexpr, POW2: tl.constexpr,
                      INV: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs_k = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    s = scale_from_amax(nan_max(abs_max(w, 1), 0), FMAX, POW2, INV)
    q = cast_fp8(w, s, FMAX, q_ptr.dtype.element_ty)
    tl.store(q_ptr + offs_n[:, None] * K + offs_k[None, :], q, mask=mask)
    tl.store(s_ptr + pid_n * NKB + pid_k, s)


@triton.jit
def _amax_partial_kernel(x_ptr, out_ptr, numel, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Partial max |x| over ITERS consecutive blocks of BLOCK elements per program (NaN-propagating)."""
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * (BLOCK * ITERS)
    m = tl.zeros((BLOCK,), tl.float32)
    for i in range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        m = nan_maximum(m, tl.abs(tl.load(x_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)))
    tl.store(out_ptr + pid, nan_max(m, 0))


@triton.jit
def _tensor_quant_kernel(x_ptr, q_ptr, part_ptr, s_ptr, numel, NPART, BLOCK: tl.constexpr, PBLOCK: tl.constexpr,
                         FMAX: tl.constexpr, INV: tl.constexpr):
    """Pass 2: every program reduces the partial maxima itself (a few KB), derives the scale, casts its block."""
    pid = tl.program_id(0)
    s = scale_from_amax(max_of_partials(part_ptr, NPART, PBLOCK), FMAX, False, INV)
    if pid == 0:
        tl.store(s_ptr, s)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(q_ptr + offs, cast_fp8(x, s, FMAX, q_ptr.dtype.element_ty), mask=m)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_offsets(*ts: torch.Tensor) -> None:
    """The 2-D kernels address with 32-bit offsets (row * stride + column): refuse a tensor whose last row ends
    at 2^31 elements or beyond (strided views included) with one error, instead of wrapping around."""
    for t in ts:
        if t.numel() and (t.shape[0] - 1) * t.stride(0) + t.shape[1] >= 2 ** 31:
            raise YxanulError(f"tensor {tuple(t.shape)} spans too many elements for the FP8 kernels (< 2^31)",
                              key="x")


def scale_inv_constant(fmax: float, device: torch.device) -> float:
    """The INV argument of scale_from_amax that reproduces torch's ``amax / fmax`` on `device`."""
    if device.type == "cuda":
        return float(torch.tensor(1.0, dtype=torch.float32) / fmax)  # fp32(1/fmax), correctly rounded
    return 0.0


def act_quant(x: torch.Tensor, block: int = 128, fmt: str = "e4m3", pow2_scales: bool = False):
    _check_2d(x)
    _check_block(block)
    f = get_format(fmt)
    x = x.contiguous()
    check_offsets(x)
    M, K = x.shape
    nkb = _cdiv(K, block)
    q = torch.empty((M, K), dtype=f.dtype, device=x.device)
    s = torch.empty((M, nkb), dtype=torch.float32, device=x.device)
    if x.numel():
        bm = 16 if block >= 256 else 32
        _act_quant_kernel[(_cdiv(M, bm), nkb)](x, q, s, M, K, x.stride(0), nkb, BM=bm, BLOCK=block,
                                               FMAX=f.max, POW2=pow2_scales,
                                               INV=scale_inv_constant(f.max, x.device), num_warps=4)
    return q, s


def act_quant_t(x: torch.Tensor, block: int = 128, fmt: str = "e4m3", pow2_scales: bool = False):
    _check_2d(x)
    _check_block(block)
    f = get_format(fmt)
    x = x.contiguous()
    check_offsets(x)
    M, K = x.shape
    nmb = _cdiv(M, block)
    qt = torch.empty((K, M), dtype=f.dtype, device=x.device)
    st = torch.empty((K, nmb), dtype=torch.float32, device=x.device)
    if x.numel():
        bk = 64  # 128 x 64 tiles: measured faster than 128 x 32 on the H100 (scripts/device_tile_quant_bench.py)
        _act_quant_t_kernel[(nmb, _cdiv(K, bk))](x, qt, st, M, K, x.stride(0), nmb, BK=bk, BLOCK=block,
                                                 FMAX=f.max, POW2=pow2_scales,
                                                 INV=scale_inv_constant(f.max, x.device), num_warps=4)
    return qt, st


def act_quant_dual(x: torch.Tensor, block: int = 128, fmt: str = "e4m3", pow2_scales: bool = False):
    """Both layouts from one read of x, the whole block x block tile in registers."""
    _check_2d(x)
    _check_block(block)
    f = get_format(fmt)
    x = x.contiguous()
    check_offsets(x)
    M, K = x.shape
    nkb, nmb = _cdiv(K, block), _cdiv(M, block)
    q = torch.empty((M, K), dtype=f.dtype, device=x.device)
    s = torch.empty((M, nkb), dtype=torch.float32, device=x.device)
    qt = torch.empty((K, M), dtype=f.dtype, device=x.device)
    st = torch.empty((K, nmb), dtype=torch.float32, device=x.device)
    if x.numel():
        _act_quant_dual_kernel[(nmb, nkb)](x, q, s, qt, st, M, K, x.stride(0), nkb, nmb, BLOCK=block,
                                           FMAX=f.max, POW2=pow2_scales,
                                           INV=scale_inv_constant(f.max, x.device), num_warps=8)
    return q, s, qt, st


def weight_quant(w: torch.Tensor, block: int = 128, fmt: str = "e4m3", pow2_scales: bool = False):
    _check_2d(w, "w")
    _check_block(block)
    f = get_format(fmt)
    w = w.contiguous()
    check_offsets(w)
    N, K = w.shape
    nnb, nkb = _cdiv(N, block), _cdiv(K, block)
    q = torch.empty((N, K), dtype=f.dtype, device=w.device)
    s = torch.empty((nnb, nkb), dtype=torch.float32, device=w.device)
    if w.numel():
        _weight_quant_kernel[(nnb, nkb)](w, q, s, N, K, w.stride(0), nkb, BLOCK=block, FMAX=f.max,
                                         POW2=pow2_scales,
                                         INV=scale_inv_constant(f.max, w.device), num_warps=8)
    return q, s


TENSOR_BLOCK = 8192


def _partial_amax(x: torch.Tensor) -> torch.Tensor:
    n = x.numel()
    nb = _cdiv(n, TENSOR_BLOCK)
    part = torch.empty(nb, dtype=torch.float32, device=x.device)
    _amax_partial_kernel[(nb,)](x, part, n, BLOCK=TENSOR_BLOCK, ITERS=1, num_warps=8)
    return part


def tensor_amax(x: torch.Tensor) -> torch.Tensor:
    """Global max |x| as a 0-d FP32 tensor, without a host synchronization (partial maxima, then a tiny max)."""
    x = x.contiguous()
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    return _partial_amax(x).amax()


def tensor_quant(x: torch.Tensor, fmt: str = "e4m3"):
    """One scale for the whole tensor in two launches: partial maxima, then scale + cast (no host sync)."""
    f = get_format(fmt)
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=f.dtype, device=x.device)
    s = torch.empty((), dtype=torch.float32, device=x.device)
    n = x.numel()
    if n == 0:
        s.fill_(AMAX_EPS / f.max)
        return q, s
    part = _partial_amax(x)
    _tensor_quant_kernel[(part.numel(),)](x, q, part, s, n, part.numel(), BLOCK=TENSOR_BLOCK, PBLOCK=1024,
                                          FMAX=f.max, INV=scale_inv_constant(f.max, x.device), num_warps=8)
    return q, s
