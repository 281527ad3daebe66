"""Fused linear cross-entropy: the output head and the loss without FP32 logits for the whole batch.

``loss = mean_i CE(h_i @ W.T, t_i)`` over the tokens whose target is not ``ignore_index``. The tokens are
processed in chunks: for each chunk the logits are computed in the compute dtype (BF16 under autocast),
upcast to FP32 for the log-sum-exp, turned in place into the gradient of the loss w.r.t. the logits
(``softmax - onehot``, scaled by ``1/n_valid``), and immediately contracted into ``grad_h = g @ W`` and
``grad_W += g.T @ h``. The backward pass only scales the stored gradients by the incoming gradient. Peak extra
memory is one chunk of logits (about ``chunk * V * 6`` bytes) plus ``grad_W`` in FP32, instead of ``N * V``
logits in BF16 and FP32 and their gradient.

Factorized tied heads (``logits = (h @ P) @ W.T``): pass ``P``; ``h @ P`` is computed first, under autograd, so
P's gradient flows normally and the fused part only sees the rank-r projection.

On CUDA, heads of rank ``K <= 256`` (Yxanul's factorized head has K = 128) go further by default: the
Triton kernels of :mod:`yxanul.kernels.cut_ce` compute logit tiles in registers and never write any logits
(forward: log-sum-exp per row; backward: two recomputing kernels for ``grad_h`` and ``grad_W``).

Optional FP8 head (``head_fp8=True``): the logits GEMM runs in FP8 E4M3 with one scale per tensor for the
chunk and for W (``torch._scaled_mm`` on CUDA, quantize-dequantize emulation elsewhere); the gradients use the
compute-dtype operands (a straight-through estimator for the head's quantization).
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from ..errors import YxanulError
from . import tensor_quant, uses_triton

CHUNK_BYTES = 1 << 30   # budget for one chunk's FP32 logits when chunk is not given

_TRITON_KERNEL = None


def _softmax_grad_kernel():
    """The Triton kernel, built on first use (so importing this module never needs triton)."""
    global _TRITON_KERNEL
    if _TRITON_KERNEL is not None:
        return _TRITON_KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def softmax_grad(logits_ptr, stride, tgt_ptr, inv_ptr, loss_ptr, V, ignore_index,
                     BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr):
        """One row: loss = lse - logit[t]; logits overwritten in place by (softmax - onehot(t)) / n_valid."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        t = tl.load(tgt_ptr + row)
        valid = t != ignore_index
        cols = tl.arange(0, BLOCK_V)
        m = tl.full((BLOCK_V,), float("-inf"), tl.float32)
        acc = tl.zeros((BLOCK_V,), tl.float32)
        for off in range(0, V, BLOCK_V):
            c = off + cols
            x = tl.load(base + c, mask=c < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            alpha = tl.where(m_new == float("-inf"), 1.0, tl.exp(m - m_new))
            acc = acc * alpha + tl.where(x == float("-inf"), 0.0, tl.exp(x - m_new))
            m = m_new
        mx = tl.max(m, axis=0)
        lse = mx + tl.log(tl.sum(acc * tl.exp(m - mx), axis=0))
        ts = tl.where(valid, t, 0)
        xt = tl.load(base + ts).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - xt, 0.0))
        if WRITE_GRAD:
            scale = tl.where(valid, tl.load(inv_ptr), 0.0)
            for off in range(0, V, BLOCK_V):
                c = off + cols
                x = tl.load(base + c, mask=c < V, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) - tl.where(c == ts, 1.0, 0.0)
                tl.store(base + c, (g * scale).to(logits_ptr.dtype.element_ty), mask=c < V)

    _TRITON_KERNEL = softmax_grad
    return softmax_grad


def _triton_softmax_grad(logits, V, t, inv, ignore_index, write_grad):
    """Per-row losses of a chunk (FP32) and, with write_grad, its first V columns replaced by the gradient."""
    C = logits.shape[0]
    loss = torch.empty(C, dtype=torch.float32, device=logits.device)
    _softmax_grad_kernel()[(C,)](logits, logits.stride(0), t, inv, loss, V, ignore_index,
                                 BLOCK_V=4096 if V >= 4096 else max(16, 1 << (V - 1).bit_length()),
                                 WRITE_GRAD=write_grad, num_warps=8)
    return loss


_FP32_ADDMM = [hasattr(torch.ops.aten.addmm, "dtype_out")]  # cleared if the first CUDA call refuses it


def _fp32_addmm_applies(grad_W: torch.Tensor, gt: torch.Tensor) -> bool:
    return grad_W.is_cuda and gt.dtype != grad_W.dtype


def _add_wgrad(grad_W: torch.Tensor, gt: torch.Tensor, hc: torch.Tensor) -> None:
    """``grad_W += gt @ hc`` with grad_W FP32 and the operands BF16/FP16: on CUDA the GEMM accumulates into the
    FP32 buffer itself (cuBLAS with beta = 1 and an FP32 output), so no BF16 product of the head's size is
    written and then added in a second pass (docs/perf-notes.md)."""
    if _FP32_ADDMM[0] and _fp32_addmm_applies(grad_W, gt):
        try:
            torch.addmm(grad_W, gt, hc, out_dtype=grad_W.dtype, out=grad_W)
            return
        except (RuntimeError, TypeError, NotImplementedError) as e:
            # refused before any work (argument checks); running out of memory or a device fault is not a refusal
            if isinstance(e, torch.cuda.OutOfMemoryError) or type(e).__name__ == "AcceleratorError":
                raise
            _FP32_ADDMM[0] = False
            warnings.warn(f"linear cross-entropy: torch.addmm with an FP32 output is not available here ({e}); "
                          "adding each chunk's weight gradient in a separate pass", RuntimeWarning, stacklevel=2)
    grad_W.add_(gt @ hc)


def default_chunk(n_tokens: int, vocab: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Largest power of two of rows whose FP32 logits fit the budget (at least 16, at most n_tokens)."""
    rows = max(16, 2 ** int(math.floor(math.log2(max(1, budget_bytes // (4 * max(vocab, 1)))))))
    return max(1, min(n_tokens, rows))


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    dev = h.device.type
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except (TypeError, AttributeError, RuntimeError):  # older signatures: CUDA-only query
        if dev == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return h.dtype


class _Fp8Head:
    """Logits of a chunk through FP8 E4M3 with tensorwise scales; W quantized once per forward."""

    def __init__(self, Wc: torch.Tensor, out_dtype: torch.dtype):
        self.V, self.d = Wc.shape
        self.out_dtype = out_dtype
        self.native = (Wc.is_cuda and hasattr(torch, "_scaled_mm") and self.d % 16 == 0
                       and torch.cuda.get_device_capability(Wc.device) >= (8, 9))
        self.wq, self.sw = tensor_quant(Wc)
        if self.native:
            pad = (-self.V) % 16
            if pad:
                self.wq = torch.cat([self.wq, self.wq.new_zeros(pad, self.d)])
        else:
            self.wf = self.wq.float() * self.sw

    def __call__(self, hc: torch.Tensor) -> torch.Tensor:
        hq, sh = tensor_quant(hc)
        if self.native and hc.shape[0] % 16 == 0:
            out = torch._scaled_mm(hq, self.wq.t(), scale_a=sh, scale_b=self.sw, out_dtype=self.out_dtype)
            return out[:, :self.V]
        wf = self.wf if not self.native else self.wq[:self.V].float() * self.sw
        return ((hq.float() * sh) @ wf.t()).to(self.out_dtype)


class _CutLinearCrossEntropy(torch.autograd.Function):
    """Logits only in registers (see :mod:`yxanul.kernels.cut_ce`). The input's gradient is computed in the
    forward's pass up to its per-row scale (FP32, N x K: 16 MB at 32k tokens and rank 128) and scaled in the
    backward; the weight's gradient in the backward."""

    @staticmethod
    def forward(ctx, h, W, targets, ignore_index, cdtype, grad_h_now):
        from .cut_ce import lce_forward, lce_forward_dh  # needs triton (this module imports without it)
        with torch.autocast(h.device.type, enabled=False):
            hc, Wc = h.to(cdtype).contiguous(), W.to(cdtype).contiguous()
            valid = targets != ignore_index
            t = torch.where(valid, targets, torch.full_like(targets, -1))
            if t.is_cuda:  # an id outside [0, V) would silently give loss = log-sum-exp; fail on the device
                torch._assert_async(((t >= -1) & (t < Wc.shape[0])).all())
            if grad_h_now:  # h's gradient up to its scale, in the forward's pass over the vocabulary
                lse, xt, dh1 = lce_forward_dh(hc, Wc, t)
            else:
                (lse, xt), dh1 = lce_forward(hc, Wc, t), hc.new_empty(0)
            n_valid = valid.sum().float()
            loss = torch.where(valid, lse - xt, torch.zeros_like(lse)).sum() / n_valid
        ctx.save_for_backward(hc, Wc, t, lse, valid, n_valid, dh1)
        ctx.dtypes = (h.dtype, W.dtype)
        return loss

    @staticmethod
    def backward(ctx, go):
        from .cut_ce import lce_backward  # needs triton (this module imports without it)
        hc, Wc, t, lse, valid, n_valid, dh1 = ctx.saved_tensors
        sc = valid.float() * (go.float() / n_valid)
        _, dw = lce_backward(hc, Wc, t, lse, sc, need_h=False, need_w=ctx.needs_input_grad[1])
        dh = None
        if ctx.needs_input_grad[0]:
            if dh1.numel() == 0:  # not computed in the forward (h did not need a gradient then)
                dh1 = lce_backward(hc, Wc, t, lse, torch.ones_like(sc), need_w=False)[0].float()
            dh = (dh1 * sc[:, None]).to(ctx.dtypes[0])
        return dh, None if dw is None else dw.to(ctx.dtypes[1]), None, None, None, None


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, targets, ignore_index, chunk, cdtype, head_fp8, use_triton):
        with torch.autocast(h.device.type, enabled=False):
            hc = h.to(cdtype)
            Wc = W.to(cdtype)
            N = hc.shape[0]
            valid = targets != ignore_index
            n_valid = valid.sum()
            inv = 1.0 / n_valid.clamp_min(1).float()
            need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
            grad_h = torch.empty_like(hc) if ctx.needs_input_grad[0] else None
            grad_W = torch.zeros(Wc.shape, dtype=torch.float32, device=W.device) if ctx.needs_input_grad[1] else None
            head = _Fp8Head(Wc, cdtype) if head_fp8 else None
            V = Wc.shape[0]
            if use_triton and head is None and V % 64:
                # pad the vocabulary with zero rows so the logits' row stride is aligned: cuBLAS falls back to
                # much slower kernels for an odd leading dimension (200005). The kernel only reads the first V
                # columns; the padded logits are exactly 0 and so contribute nothing to either gradient GEMM.
                Wk = F.pad(Wc, (0, 0, 0, (-V) % 64))
            else:
                Wk = Wc
            loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
            for s in range(0, N, chunk):
                e = min(N, s + chunk)
                hch, v = hc[s:e], valid[s:e]
                t = torch.where(v, targets[s:e], torch.zeros_like(targets[s:e]))
                if use_triton:
                    logits = head(hch).contiguous() if head is not None else hch @ Wk.t()
                    loss_sum += _triton_softmax_grad(logits, V, targets[s:e], inv.reshape(1), ignore_index,
                                                     need_grad).sum()
                    if not need_grad:
                        continue
                    g = logits
                    if grad_h is not None:
                        torch.matmul(g, Wk, out=grad_h[s:e])
                    if grad_W is not None:
                        _add_wgrad(grad_W, g.t()[:V], hch)
                    continue
                logits = head(hch) if head is not None else hch @ Wc.t()
                lf = logits.float()
                del logits
                lse = torch.logsumexp(lf, dim=-1)
                tgt = lf.gather(1, t[:, None]).squeeze(1)
                vf = v.float()
                loss_sum += ((lse - tgt) * vf).sum()
                if not need_grad:
                    continue
                g = lf.sub_(lse[:, None]).exp_()                      # softmax, in place
                g.scatter_add_(1, t[:, None], torch.full_like(tgt[:, None], -1.0))
                g.mul_((vf * inv)[:, None])
                g = g.to(cdtype)
                if grad_h is not None:
                    torch.matmul(g, Wc, out=grad_h[s:e])
                if grad_W is not None:
                    _add_wgrad(grad_W, g.t(), hch)
            loss = loss_sum / n_valid.float()
        ctx.save_for_backward(grad_h if grad_h is not None else h.new_empty(0),
                              grad_W if grad_W is not None else W.new_empty(0))
        ctx.has = (grad_h is not None, grad_W is not None)
        ctx.dtypes = (h.dtype, W.dtype)
        return loss

    @staticmethod
    def backward(ctx, go):
        grad_h, grad_W = ctx.saved_tensors
        gh = gw = None
        if ctx.has[0]:
            gh = (grad_h.float() * go).to(ctx.dtypes[0])
        if ctx.has[1]:
            gw = (grad_W * go).to(ctx.dtypes[1])
        return gh, gw, None, None, None, None, None, None


@torch.compiler.disable  # runs eagerly even inside a compiled model: it launches its own kernels, per chunk or not
def linear_cross_entropy(h: torch.Tensor, W: torch.Tensor, targets: torch.Tensor, P: torch.Tensor | None = None,
                         ignore_index: int = -1, chunk: int | None = None, head_fp8: bool = False,
                         impl: str | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``((h @ P) if P else h) @ W.T`` against `targets`, never materializing all logits.

    h ``[N, d]`` (or ``[..., d]``), W ``[V, r]``, targets ``[N]`` (or h's leading shape), P ``[d, r]`` or None.
    Returns a 0-d FP32 tensor (NaN when every target is ignored, as ``F.cross_entropy`` does).
    ``impl``: ``auto`` (on CUDA the register-only ``cut`` kernels when ``K <= 256`` and the head is not FP8,
    else chunks with the Triton softmax-gradient kernel; chunks in torch elsewhere), ``cut``, ``triton``
    (chunked) or ``torch`` (chunked).
    """
    if h.dim() < 2 or W.dim() != 2:
        raise YxanulError(f"linear_cross_entropy needs h [N, d] and W [V, r], got {tuple(h.shape)} and "
                          f"{tuple(W.shape)}", key="h")
    h = h.reshape(-1, h.shape[-1])
    targets = targets.reshape(-1)
    if targets.shape[0] != h.shape[0]:
        raise YxanulError(f"{targets.shape[0]} targets for {h.shape[0]} tokens", key="targets")
    if P is not None:
        if P.dim() != 2 or P.shape[0] != h.shape[1]:
            raise YxanulError(f"projection P {tuple(P.shape)} does not match h {tuple(h.shape)}", key="P")
        h = h @ P.to(h.dtype)
    if h.shape[1] != W.shape[1]:
        raise YxanulError(f"h has {h.shape[1]} features but W has {W.shape[1]}", key="W")
    if chunk is None:
        chunk = default_chunk(h.shape[0], W.shape[0])
    if not isinstance(chunk, int) or chunk < 1:
        raise YxanulError(f"chunk must be a positive integer, got {chunk!r}", key="chunk")
    if h.shape[0] == 0:
        raise YxanulError("linear_cross_entropy got no tokens", key="h")
    V = W.shape[0]
    if not targets.is_cuda:  # on CUDA a host check would cost a sync per step; the kernels' path asserts below
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
        if bool(bad.any()):
            raise YxanulError(f"target id {int(targets[bad][0])} is outside the vocabulary [0, {V})", key="targets")
    cdtype = _compute_dtype(h)
    from .cut_ce import MAX_K  # needs triton (this module imports without it)
    impl = impl or "auto"
    if impl not in ("auto", "cut", "triton", "torch"):
        raise YxanulError(f"unknown implementation {impl!r} (expected auto, cut, triton or torch)", key="impl")
    cut_ok = W.shape[1] <= MAX_K and not head_fp8
    if impl == "cut":
        if not cut_ok:
            raise YxanulError(f"the cut kernels need a head of rank <= {MAX_K} and no FP8 head "
                              f"(got rank {W.shape[1]}, head_fp8={head_fp8})", key="impl")
        uses_triton(h, W, impl="triton")  # raises when Triton cannot run here
    if impl == "cut" or (impl == "auto" and cut_ok and h.is_cuda and W.is_cuda and uses_triton(h, W, impl="auto")):
        # inside forward, needs_input_grad ignores no_grad: decide here whether h's gradient is wanted
        grad_h_now = torch.is_grad_enabled() and h.requires_grad
        return _CutLinearCrossEntropy.apply(h, W, targets.long(), int(ignore_index), cdtype, grad_h_now)
    use_triton = uses_triton(h, W, impl=impl)  # auto, triton or torch here
    return _LinearCrossEntropy.apply(h, W, targets.long(), int(ignore_index), int(chunk), cdtype, bool(head_fp8),
                                     use_triton)


class FusedCrossEntropy:
    """``model.loss_fn``: the fused head + loss for a :class:`yxanul.model.Yxanul` (ignore_index -1)."""

    def __init__(self, chunk: int | None = None, head_fp8: bool = False):
        self.chunk, self.head_fp8 = chunk, head_fp8

    def __call__(self, model, h, targets):
        W, P = model.head_weight()
        return linear_cross_entropy(h, W, targets, P=P, ignore_index=-1, chunk=self.chunk, head_fp8=self.head_fp8)

    def __repr__(self):
        return f"FusedCrossEntropy(chunk={self.chunk}, head_fp8={self.head_fp8})"


def use_fused_ce(model, chunk: int | None = None, head_fp8: bool = False):
    """Make ``model(idx, targets)`` use the fused linear cross-entropy. Returns the model."""
    model.loss_fn = FusedCrossEntropy(chunk, head_fp8)
    return model


def reference_cross_entropy(h, W, targets, P=None, ignore_index: int = -1):
    """The unfused computation (full logits, ``F.cross_entropy`` in FP32), for tests and benchmarks."""
    h = h.reshape(-1, h.shape[-1])
    if P is not None:
        h = h @ P.to(h.dtype)
    logits = h @ W.to(h.dtype).t()
    return F.cross_entropy(logits.float(), targets.reshape(-1), ignore_index=ignore_index)
