"""Per-tensor FP8 quantization as two kernels that torch.compile launches itself (``torch.library.triton_op``).

Why they exist: traced as torch ops, a per-tensor quantization of a fused producer (the SwiGLU forward or
backward, the RMSNorm backward) makes inductor recompute the producer twice, once for the amax and once for
the cast, because the cast must wait for the whole tensor's amax. As an extern kernel the amax forces the
producer's output into memory once; the cast then reads it back once and writes both layouts the FP8 GEMMs
need (``q`` [M, K] for the forward or dgrad GEMM, ``qT`` [K, M] for wgrad), in one pass.

In the training step they measured slower than inductor's recomputation (docs/perf-notes.md), so the FP8
layers do not use them; they are the ``tensor_quant_dual`` / ``tensor_amax`` ops of :mod:`yxanul.kernels`,
which an op table can take with :func:`yxanul.fp8.backends.register_ops`.

  tensor_amax_parts(x)                 -> partial maxima of |x| (NaN-propagating), FP32 [ceil(numel / CHUNK)]
  tensor_cast(x, parts|scale_inv, ...) -> q, scale_inv (0-d), qT

Numerics are those of :func:`yxanul.fp8.backends.quant_tensor`: ``scale_inv = max(amax, 1e-12) / FMAX``,
``q = rne(clamp(x / scale_inv, +-FMAX))``; NaN propagates to the scale and the values.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..fp8.formats import get_format
from .quant import _amax_partial_kernel, cast_fp8, max_of_partials, scale_from_amax, scale_inv_constant

AMAX_BLOCK = 4096
AMAX_ITERS = 8
CHUNK = AMAX_BLOCK * AMAX_ITERS     # elements per partial maximum
TILE = 128                          # the cast's square tile
PBLOCK = 512


@triton.jit
def _cast_kernel(x_ptr, q_ptr, qt_ptr, part_ptr, s_in_ptr, s_out_ptr, M, K, NPART,
                 BM: tl.constexpr, BK: tl.constexpr, PB: tl.constexpr, FMAX: tl.constexpr, INV: tl.constexpr,
                 FROM_PARTS: tl.constexpr, WRITE_Q: tl.constexpr, WRITE_QT: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    if FROM_PARTS:
        s = scale_from_amax(max_of_partials(part_ptr, NPART, PB), FMAX, False, INV)
        if (pid_m == 0) & (pid_k == 0):
            tl.store(s_out_ptr, s)
    else:
        s = tl.load(s_in_ptr)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_k = pid_k * BK + tl.arange(0, BK)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    q = cast_fp8(x, s, FMAX, q_ptr.dtype.element_ty)
    if WRITE_Q:
        tl.store(q_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :], q, mask=mask)
    if WRITE_QT:
        tl.store(qt_ptr + offs_k[:, None].to(tl.int64) * M + offs_m[None, :], tl.trans(q),
                 mask=(offs_k[:, None] < K) & (offs_m[None, :] < M))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch(kernel, grid, *args, **kw):
    # inside a triton_op, wrap_triton lets torch.compile see the kernel; in eager mode it launches directly
    return torch.library.wrap_triton(kernel)[grid](*args, **kw)


def tensor_amax_parts(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    n = x.numel()
    nb = max(_cdiv(n, CHUNK), 1)
    part = torch.zeros(nb, dtype=torch.float32, device=x.device)
    if n:
        _launch(_amax_partial_kernel, (nb,), x, part, n, BLOCK=AMAX_BLOCK, ITERS=AMAX_ITERS, num_warps=8)
    return part


def tensor_cast(x: torch.Tensor, fmt: str = "e4m3", parts: torch.Tensor | None = None,
                scale_inv: torch.Tensor | None = None, write_q: bool = True, write_qt: bool = True):
    """Cast a 2-D ``x`` with one scale: from the partial maxima ``parts`` or from a given 0-d ``scale_inv``.
    Returns ``(q [M, K], s, qT [K, M])``, ``s`` the scale computed from ``parts`` (with a given scale, an
    empty tensor: outputs of a custom op must not alias its inputs); a layout not asked for is empty too."""
    f = get_format(fmt)
    x = x.contiguous()
    M, K = x.shape
    q = torch.empty((M, K) if write_q else (0,), dtype=f.dtype, device=x.device)
    qt = torch.empty((K, M) if write_qt else (0,), dtype=f.dtype, device=x.device)
    if scale_inv is None:
        s = torch.empty((), dtype=torch.float32, device=x.device)
        s_in, npart = s, parts.numel()
    else:
        s_in = scale_inv.float().reshape(()).contiguous()
        s, npart, parts = torch.empty((0,), dtype=torch.float32, device=x.device), 0, s_in
    if x.numel():
        grid = (_cdiv(M, TILE), _cdiv(K, TILE))
        _launch(_cast_kernel, grid, x, q, qt, parts, s_in, s, M, K, npart, BM=TILE, BK=TILE, PB=PBLOCK,
                FMAX=f.max, INV=scale_inv_constant(f.max, x.device), FROM_PARTS=scale_inv is None,
                WRITE_Q=write_q, WRITE_QT=write_qt, num_warps=8)
    elif scale_inv is None:
        s.fill_(1e-12 / f.max)
    return q, s, qt
