"""Linear cross-entropy that never writes logits to memory (Triton), for heads of small rank.

``loss_i = logsumexp_v(h_i . W_v) - h_i . W_{t_i}`` with ``h [N, K]``, ``W [V, K]``, ``K <= 256`` (the factorized
head of Yxanul has K = r = 128). Logit tiles ``[BM, BV]`` are computed on the tensor cores into registers and
consumed there:

* forward (one program per block of BM tokens, looping over the vocabulary): online max / sum-exp -> the
  log-sum-exp of every row; the target logit from the target's row of W, once; nothing of size N x V is stored.
* backward, ``dh`` (per token block, looping over the vocabulary): recompute the tile, accumulate
  ``(softmax * scale_row) @ W_tile``, and subtract ``scale_row * W[target]`` once at the end. When the input
  needs a gradient, :func:`lce_forward_dh` does this inside the forward's pass instead (online, against the
  running maximum, as flash attention accumulates its output) and the backward only scales it.
* backward, ``dW`` (per vocabulary block, looping over the tokens): recompute the tile and accumulate
  ``g^T @ h_tile``. Two kernels instead of one with atomics: the result is deterministic and the same on
  every run, which exact resume relies on.

At Yxanul-197M's shape (N = 32768 tokens, V = 200005, K = 128) this is about 8.4 TFLOP of tensor-core work
and a few MB of memory traffic, instead of a GEMM that writes 13 GB of BF16 logits and three passes over them.
The per-logit work inside the loops is kept to the exponential and what the online sum or the gradient needs:
no column mask except on the forward's last partial tile, no one-hot outside the ``dW`` kernel. The gradient
tile is rounded to the operands' dtype before its GEMM, as a BF16 head's backward does.

The functions here launch Triton unconditionally; :func:`yxanul.kernels.linear_ce.linear_cross_entropy` decides
when to use them.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MAX_K = 256


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _load_tile(ptr, idx, imask, stride, ks, K):
    """Rows `idx` (masked by `imask`) of a row-major [*, K] matrix, K padded to the tile with zeros."""
    return tl.load(ptr + idx[:, None].to(tl.int64) * stride + ks[None, :], mask=imask[:, None] & (ks[None, :] < K),
                   other=0.0)


@triton.jit
def _store_tile(ptr, idx, imask, stride, ks, K, val):
    tl.store(ptr + idx[:, None].to(tl.int64) * stride + ks[None, :], val.to(ptr.dtype.element_ty),
             mask=imask[:, None] & (ks[None, :] < K))


@triton.jit
def _row_state(t_ptr, lse_ptr, sc_ptr, rows, rmask):
    """Per-row target, log-sum-exp and gradient scale (padded rows: no target, scale 0)."""
    return (tl.load(t_ptr + rows, mask=rmask, other=-1), tl.load(lse_ptr + rows, mask=rmask, other=0.0),
            tl.load(sc_ptr + rows, mask=rmask, other=0.0))


# exp(x - c) = exp2(x * LOG2E - c * LOG2E): one FMA and the hardware exp2 per logit
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _target_rows(w_ptr, t, rmask, V, stride_w, ks, K):
    """W's row of each token's target ([BM, BK], zero where the target is ignored or out of range)."""
    return _load_tile(w_ptr, t, rmask & (t >= 0) & (t < V), stride_w, ks, K)


@triton.jit
def _exp_minus(x, c):
    """exp(x - c[:, None]) for a [BM, BV] tile and per-row c, as one FMA and exp2 per element."""
    return tl.exp2(x * LOG2E - (c * LOG2E)[:, None])


@triton.jit
def _online_step(x, m):
    """A [BM, BV] tile against the running row maximum m: (new maximum, factor rescaling what was summed
    against m, exp(x - new maximum))."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    return m_new, tl.exp2((m - m_new) * LOG2E), _exp_minus(x, m_new)


@triton.jit
def _online_lse(x, m, s):
    """One tile folded into the running row maximum m and sum s of exp(x - m)."""
    m_new, alpha, p = _online_step(x, m)
    return m_new, s * alpha + tl.sum(p, axis=1)


@triton.jit
def _lce_fwd_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, xt_ptr, N, V, K, stride_h, stride_w,
                    BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < N
    ks = tl.arange(0, BK)
    a = _load_tile(h_ptr, rows, rmask, stride_h, ks, K)
    t = tl.load(t_ptr + rows, mask=rmask, other=-1)
    # the target logit from the target's row of W, outside the vocabulary loop
    xt = tl.sum(a.to(tl.float32) * _target_rows(w_ptr, t, rmask, V, stride_w, ks, K).to(tl.float32), axis=1)
    m = tl.full((BM,), float("-inf"), tl.float32)
    s = tl.zeros((BM,), tl.float32)
    cv = tl.arange(0, BV)
    v_full = (V // BV) * BV
    for v0 in range(0, v_full, BV):  # whole tiles: no column mask on the logits
        b = _load_tile(w_ptr, v0 + cv, v0 + cv < V, stride_w, ks, K)
        m, s = _online_lse(_dot(a, tl.trans(b), IEEE), m, s)
    if v_full < V:  # the last, partial tile
        cols = v_full + cv
        cmask = cols < V
        b = _load_tile(w_ptr, cols, cmask, stride_w, ks, K)
        m, s = _online_lse(tl.where(cmask[None, :], _dot(a, tl.trans(b), IEEE), float("-inf")), m, s)
    tl.store(lse_ptr + rows, m + tl.log(s), mask=rmask)
    tl.store(xt_ptr + rows, xt, mask=rmask)


@triton.jit
def _online_lse_dot(x, b, m, s, acc, IEEE: tl.constexpr):
    """_online_lse, and acc (the exp(x - m)-weighted sum of b's rows) rescaled to the new maximum."""
    m_new, alpha, p = _online_step(x, m)
    return m_new, s * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + _dot(p.to(b.dtype), b, IEEE)


@triton.jit
def _lce_fwd_dh_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, xt_ptr, dh_ptr, N, V, K, stride_h, stride_w, stride_dh,
                       BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    """The forward and the unscaled ``softmax @ W - W[t]`` in one pass over the vocabulary: the softmax-weighted
    sum of W's rows is accumulated online against the running maximum (rescaled when it grows, as the running
    sum is) and divided by the sum at the end, so each logit tile is computed once for both."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < N
    ks = tl.arange(0, BK)
    a = _load_tile(h_ptr, rows, rmask, stride_h, ks, K)
    t = tl.load(t_ptr + rows, mask=rmask, other=-1)
    wt = _target_rows(w_ptr, t, rmask, V, stride_w, ks, K).to(tl.float32)
    xt = tl.sum(a.to(tl.float32) * wt, axis=1)
    m = tl.full((BM,), float("-inf"), tl.float32)
    s = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, BK), tl.float32)
    cv = tl.arange(0, BV)
    v_full = (V // BV) * BV
    for v0 in range(0, v_full, BV):  # whole tiles: no column mask on the logits
        b = _load_tile(w_ptr, v0 + cv, v0 + cv < V, stride_w, ks, K)
        m, s, acc = _online_lse_dot(_dot(a, tl.trans(b), IEEE), b, m, s, acc, IEEE)
    if v_full < V:  # the last, partial tile: columns past V at -inf add nothing (their rows of W are zeros)
        cols = v_full + cv
        cmask = cols < V
        b = _load_tile(w_ptr, cols, cmask, stride_w, ks, K)
        x = tl.where(cmask[None, :], _dot(a, tl.trans(b), IEEE), float("-inf"))
        m, s, acc = _online_lse_dot(x, b, m, s, acc, IEEE)
    tl.store(lse_ptr + rows, m + tl.log(s), mask=rmask)
    tl.store(xt_ptr + rows, xt, mask=rmask)
    _store_tile(dh_ptr, rows, rmask, stride_dh, ks, K, acc / s[:, None] - wt)


@triton.jit
def _lce_bwd_dh_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, sc_ptr, dh_ptr, N, V, K, stride_h, stride_w, stride_dh,
                       BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    """dh = sc * (softmax @ W - W[t]): the softmax part over the vocabulary tiles, the one-hot part once at the
    end. Only the last, partial tile masks its columns: past V the logit is 0, whose exponential overflows
    when a row's log-sum-exp is below about -88 (Inf times W's zero rows would be NaN)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < N
    ks = tl.arange(0, BK)
    a = _load_tile(h_ptr, rows, rmask, stride_h, ks, K)
    t, lse, sc = _row_state(t_ptr, lse_ptr, sc_ptr, rows, rmask)
    acc = tl.zeros((BM, BK), tl.float32)
    cv = tl.arange(0, BV)
    v_full = (V // BV) * BV
    for v0 in range(0, v_full, BV):
        b = _load_tile(w_ptr, v0 + cv, v0 + cv < V, stride_w, ks, K)
        p = _exp_minus(_dot(a, tl.trans(b), IEEE), lse) * sc[:, None]
        acc += _dot(p.to(b.dtype), b, IEEE)
    if v_full < V:
        cols = v_full + cv
        cmask = cols < V
        b = _load_tile(w_ptr, cols, cmask, stride_w, ks, K)
        p = tl.where(cmask[None, :], _exp_minus(_dot(a, tl.trans(b), IEEE), lse) * sc[:, None], 0.0)
        acc += _dot(p.to(b.dtype), b, IEEE)
    acc -= sc[:, None] * _target_rows(w_ptr, t, rmask, V, stride_w, ks, K).to(tl.float32)
    _store_tile(dh_ptr, rows, rmask, stride_dh, ks, K, acc)


@triton.jit
def _lce_bwd_dw_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, sc_ptr, dw_ptr, N, V, K, stride_h, stride_w, stride_dw,
                       BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    """dW = g^T @ h with g = (softmax - onehot(t)) * sc. A row of the accumulator depends only on its own column
    of g, so the columns past V (garbage there) are simply not stored; padded tokens have sc = 0."""
    cols = tl.program_id(0) * BV + tl.arange(0, BV)
    cmask = cols < V
    ks = tl.arange(0, BK)
    b = _load_tile(w_ptr, cols, cmask, stride_w, ks, K)
    acc = tl.zeros((BV, BK), tl.float32)
    rm = tl.arange(0, BM)
    for m0 in range(0, N, BM):
        rows = m0 + rm
        rmask = rows < N
        a = _load_tile(h_ptr, rows, rmask, stride_h, ks, K)
        t, lse, sc = _row_state(t_ptr, lse_ptr, sc_ptr, rows, rmask)
        onehot = tl.where(cols[None, :] == t[:, None], 1.0, 0.0)
        g = (_exp_minus(_dot(a, tl.trans(b), IEEE), lse) - onehot) * sc[:, None]
        acc += _dot(tl.trans(g.to(a.dtype)), a, IEEE)
    _store_tile(dw_ptr, cols, cmask, stride_dw, ks, K, acc)


# (BM, BV, num_warps, num_stages) per kernel; chosen on an H100 at N=32768, V=200005, K=128
# (scripts/device_cut_ce.py records the alternatives).
CONFIGS = {"fwd": (128, 128, 8, 3), "dh": (64, 128, 4, 3), "dw": (128, 128, 8, 3), "fwd_dh": (128, 64, 8, 3)}


def _bk(K: int) -> int:
    return max(16, 1 << (K - 1).bit_length())


def _launch_args(name: str, interpret: bool):
    BM, BV, nw, ns = CONFIGS[name]
    if interpret:  # the interpreter runs every lane in numpy: small tiles keep CPU tests quick
        BM, BV = 16, 32
    return BM, BV, ({} if interpret else {"num_warps": nw, "num_stages": ns})


def _out_of_resources():
    errors = getattr(triton.runtime, "errors", None)
    return getattr(errors, "OutOfResources", None) or getattr(triton, "OutOfResources", RuntimeError)


def _launch(name: str, kernel, n: int, args: tuple, **meta) -> None:
    """Run `kernel` with CONFIGS[name] over the programs that cover n rows (tokens; vocabulary rows for "dw").
    The configurations were chosen at K = 128; where a wider head does not fit a GPU's shared memory or
    registers, the program's tile is halved (and the pipeline made two-stage) until it does."""
    BM, BV, kw = _launch_args(name, _interpreting())
    while True:
        tile = BV if name == "dw" else BM
        try:
            kernel[(triton.cdiv(n, tile),)](*args, BM=BM, BV=BV, **meta, **kw)
            return
        except _out_of_resources():
            if tile <= 16:
                raise
            BM, BV = (BM, BV // 2) if name == "dw" else (BM // 2, BV)
            if kw:
                kw = dict(kw, num_stages=2)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _prep(h: torch.Tensor, W: torch.Tensor):
    if h.dim() != 2 or W.dim() != 2 or h.shape[1] != W.shape[1]:
        raise ValueError(f"h [N, K] and W [V, K] expected, got {tuple(h.shape)} and {tuple(W.shape)}")
    if h.shape[1] > MAX_K:
        raise ValueError(f"K = {h.shape[1]} > {MAX_K}")
    if h.dtype != W.dtype:
        raise ValueError(f"h and W must share a dtype, got {h.dtype} and {W.dtype}")
    return h.contiguous(), W.contiguous()


def lce_forward(h: torch.Tensor, W: torch.Tensor, targets: torch.Tensor):
    """-> (lse [N] FP32, target_logit [N] FP32); targets outside [0, V) (e.g. ignore_index) give logit 0."""
    h, W = _prep(h, W)
    N, K = h.shape
    V = W.shape[0]
    lse = torch.empty(N, dtype=torch.float32, device=h.device)
    xt = torch.empty(N, dtype=torch.float32, device=h.device)
    _launch("fwd", _lce_fwd_kernel, N, (h, W, targets.contiguous(), lse, xt, N, V, K, h.stride(0), W.stride(0)),
            BK=_bk(K), IEEE=h.dtype == torch.float32)
    return lse, xt


def lce_forward_dh(h: torch.Tensor, W: torch.Tensor, targets: torch.Tensor):
    """The forward together with the input gradient up to its per-row scale: -> (lse [N], target_logit [N],
    dh1 [N, K]) in FP32 with ``dh1_i = softmax(h_i W^T) @ W - W[t_i]`` (``- W[t_i]`` only for targets in
    [0, V)); ``row_scale[:, None] * dh1`` is lce_backward's dh. One pass over the vocabulary instead of two."""
    h, W = _prep(h, W)
    N, K = h.shape
    V = W.shape[0]
    lse = torch.empty(N, dtype=torch.float32, device=h.device)
    xt = torch.empty(N, dtype=torch.float32, device=h.device)
    dh1 = torch.empty(N, K, dtype=torch.float32, device=h.device)
    _launch("fwd_dh", _lce_fwd_dh_kernel, N, (h, W, targets.contiguous(), lse, xt, dh1, N, V, K, h.stride(0),
                                              W.stride(0), dh1.stride(0)), BK=_bk(K), IEEE=h.dtype == torch.float32)
    return lse, xt, dh1


def lce_backward(h: torch.Tensor, W: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, row_scale: torch.Tensor,
                 need_h: bool = True, need_w: bool = True):
    """-> (dh [N, K] in h's dtype or None, dW [V, K] FP32 or None) for ``loss = sum_i row_scale_i * CE_i``.
    ``row_scale`` (FP32 [N]) is 0 for ignored rows."""
    h, W = _prep(h, W)
    N, K = h.shape
    V = W.shape[0]
    t = targets.contiguous()
    sc = row_scale.float().contiguous()
    ieee = h.dtype == torch.float32
    dh = dw = None
    if need_h:
        dh = torch.empty_like(h)
        _launch("dh", _lce_bwd_dh_kernel, N, (h, W, t, lse, sc, dh, N, V, K, h.stride(0), W.stride(0),
                                              dh.stride(0)), BK=_bk(K), IEEE=ieee)
    if need_w:
        dw = torch.empty(V, K, dtype=torch.float32, device=h.device)
        _launch("dw", _lce_bwd_dw_kernel, V, (h, W, t, lse, sc, dw, N, V, K, h.stride(0), W.stride(0),
                                              dw.stride(0)), BK=_bk(K), IEEE=ieee)
    return dh, dw
