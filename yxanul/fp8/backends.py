"""FP8 GEMM backends as a small table of operations, plus the native-vs-emulated self-check.

Every recipe is expressed with a few operations (an :class:`Fp8Ops`):

``act_quant(x [M,K]) -> (q [M,K], s)``           activations (``grad_quant``: output grads), scaled along the
                                                last dim
``act_quant_t(x [M,K]) -> (qT [K,M], sT)``       the same tensor transposed, scaled along M (for wgrad;
                                                ``grad_quant_t`` for output grads)
``weight_quant(w [N,K]) -> (q [N,K], s)``        the weight's forward copy
``weight_t(w, q, s) -> (qT [K,N], sT)``          the weight's transposed copy for dgrad
``fprop``, ``dgrad``, ``wgrad`` ``(a_q, a_s, b_q, b_s, out_dtype) -> a @ b.T``
                                                the layer's three GEMMs, both operands row-major with the
                                                reduction on the last dim, each bound to its operands'
                                                granularities (:meth:`Fp8Spec.gemm_granularity`)

The table is built from a resolved recipe (:class:`~yxanul.fp8.recipe.Fp8Spec`) by :func:`build_ops`; scale
shapes follow each operand's granularity (``block`` is the recipe's block size, 128 by default):
``tensor`` ``[]``, ``row`` ``[rows, 1]``, ``tile`` ``[rows, ceil(cols/block)]``, ``block``
``[ceil(rows/block), ceil(cols/block)]``.

Grad operands use the dy operand's format (E5M2 under ``hybrid``).

Backends: ``emulated`` (quantize -> dequantize -> FP32 matmul: the numerics reference), ``native``
(``torch.nn.functional.scaled_mm`` / ``torch._scaled_mm`` on CUDA sm_89+), ``te`` (Transformer Engine, optional)
and ``auto``. Faster quantizers plug in through :mod:`yxanul.fp8.registry` (``yxanul.kernels`` registers its
Triton kernels there when imported) or, per (recipe, backend), with :func:`register_ops`.
"""
from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import YxanulError
from . import registry
from .formats import Fp8Format, get_format
from .options import Fp8Options
from .quant import AMAX_EPS, pow2_ceil
from .recipe import Fp8Recipe, Fp8Spec, OperandSpec, resolve

BACKENDS = ("auto", "emulated", "native", "te")


# ---------------------------------------------------------------------------------------------------------
# Reference quantizers (pure torch, vectorized; no Python loop over tiles, no host sync)
# ---------------------------------------------------------------------------------------------------------
def _pad_cols(x: torch.Tensor, mult: int) -> torch.Tensor:
    pc = (-x.shape[-1]) % mult
    return F.pad(x, (0, pc)) if pc else x


def _scale_from_amax(amax: torch.Tensor, fmt: Fp8Format, pow2: bool) -> torch.Tensor:
    s = amax.float().clamp_min(AMAX_EPS) / fmt.max
    return pow2_ceil(s) if pow2 else s


def _cast(y: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    # clamp keeps finite values in range; NaN (and Inf, which turns its tile's scale into Inf -> NaN) propagate
    return y.clamp(-fmt.max, fmt.max).to(fmt.dtype)


def quant_tiles_impl(x: torch.Tensor, fmt: Fp8Format, block: int = 128, pow2: bool = False):
    """1 x block tiles along the last dim of a 2-D tensor -> (q, s [M, ceil(K/block)])."""
    M, K = x.shape
    xp = _pad_cols(x.float(), block)
    t = xp.view(M, -1, block)
    s = _scale_from_amax(t.abs().amax(dim=2), fmt, pow2)
    q = _cast(t / s.unsqueeze(2), fmt).view(M, -1)[:, :K]
    return (q if q.is_contiguous() else q.contiguous()), s


def quant_tiles_t_impl(x: torch.Tensor, fmt: Fp8Format, block: int = 128, pow2: bool = False):
    """1 x block tiles of x.T, i.e. block x 1 tiles down the columns of x [M, K]
    -> (qT [K, M], sT [K, ceil(M/block)]), without materializing x.T in high precision."""
    M, K = x.shape
    pr = (-M) % block
    xp = F.pad(x.float(), (0, 0, 0, pr)) if pr else x.float()
    t = xp.view(-1, block, K)
    s = _scale_from_amax(t.abs().amax(dim=1), fmt, pow2)          # [ceil(M/block), K]
    q = _cast(t / s.unsqueeze(1), fmt).view(-1, K)[:M]
    return q.t().contiguous(), s.t().contiguous()


def quant_blocks_impl(w: torch.Tensor, fmt: Fp8Format, block: int = 128, pow2: bool = False):
    """block x block blocks of a 2-D tensor -> (q, s [ceil(N/block), ceil(K/block)])."""
    N, K = w.shape
    pr, pc = (-N) % block, (-K) % block
    wp = F.pad(w.float(), (0, pc, 0, pr)) if (pr or pc) else w.float()
    t = wp.view((N + pr) // block, block, (K + pc) // block, block)
    s = _scale_from_amax(t.abs().amax(dim=(1, 3)), fmt, pow2)
    q = _cast(t / s[:, None, :, None], fmt).view(N + pr, K + pc)[:N, :K]
    return (q if q.is_contiguous() else q.contiguous()), s


# The tile/block quantizers are registered as custom ops: torch.compile treats them as opaque calls (as it
# will the fused GPU kernels that replace them), which also keeps inductor's CPU codegen away from the
# pad -> view -> amax -> divide patterns it has mis-compiled in the backward graph.
@torch.library.custom_op("yxanul::quant_tiles", mutates_args=())
def _quant_tiles_op(x: torch.Tensor, fmt: str, block: int, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return quant_tiles_impl(x, get_format(fmt), block, pow2)


@_quant_tiles_op.register_fake
def _(x, fmt, block, pow2):
    M, K = x.shape
    return x.new_empty(M, K, dtype=get_format(fmt).dtype), x.new_empty(M, -(-K // block), dtype=torch.float32)


@torch.library.custom_op("yxanul::quant_tiles_t", mutates_args=())
def _quant_tiles_t_op(x: torch.Tensor, fmt: str, block: int, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return quant_tiles_t_impl(x, get_format(fmt), block, pow2)


@_quant_tiles_t_op.register_fake
def _(x, fmt, block, pow2):
    M, K = x.shape
    return x.new_empty(K, M, dtype=get_format(fmt).dtype), x.new_empty(K, -(-M // block), dtype=torch.float32)


@torch.library.custom_op("yxanul::quant_blocks", mutates_args=())
def _quant_blocks_op(w: torch.Tensor, fmt: str, block: int, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return quant_blocks_impl(w, get_format(fmt), block, pow2)


@_quant_blocks_op.register_fake
def _(w, fmt, block, pow2):
    N, K = w.shape
    return (w.new_empty(N, K, dtype=get_format(fmt).dtype),
            w.new_empty(-(-N // block), -(-K // block), dtype=torch.float32))


def quant_tiles(x: torch.Tensor, fmt: Fp8Format | str, block: int = 128, pow2: bool = False):
    """1 x block tiles along the last dim of a 2-D tensor -> (q [M, K], s [M, ceil(K/block)])."""
    return _quant_tiles_op(x, get_format(fmt).name, int(block), bool(pow2))


def quant_tiles_t(x: torch.Tensor, fmt: Fp8Format | str, block: int = 128, pow2: bool = False):
    """Tiles of x.T along M -> (qT [K, M], sT [K, ceil(M/block)]): the wgrad operand layout."""
    return _quant_tiles_t_op(x, get_format(fmt).name, int(block), bool(pow2))


def quant_blocks(w: torch.Tensor, fmt: Fp8Format | str, block: int = 128, pow2: bool = False):
    """block x block blocks -> (q [N, K], s [ceil(N/block), ceil(K/block)])."""
    return _quant_blocks_op(w, get_format(fmt).name, int(block), bool(pow2))


def quant_rows(x: torch.Tensor, fmt: Fp8Format, pow2: bool = False):
    s = _scale_from_amax(x.float().abs().amax(dim=1, keepdim=True), fmt, pow2)
    return _cast(x.float() / s, fmt), s


def tensor_abs_max(x: torch.Tensor) -> torch.Tensor:
    """max |x| over the whole tensor as a 0-d FP32 tensor, computed row by row and then over the rows.

    The same value as ``x.abs().amax()`` (a maximum is exact in any order), written so that torch.compile sees a
    reduction over each row, the same iteration space as the kernel producing x (a norm, SwiGLU, their
    backwards): inductor can then compute the amax inside that kernel instead of in a split reduction of its
    own that re-reads or recomputes x."""
    if x.dim() < 2:
        return x.float().abs().amax()
    return x.abs().amax(dim=-1).float().amax()


def out_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of a GEMM's output for input x: the autocast dtype when autocast is on, else x's."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def quant_tensor(x: torch.Tensor, fmt: Fp8Format, pow2: bool = False, scale_inv: torch.Tensor | None = None):
    """Per-tensor quantization with the current amax, or with a given ``scale_inv`` (delayed scaling)."""
    s = _scale_from_amax(tensor_abs_max(x), fmt, pow2) if scale_inv is None else scale_inv.float().reshape(())
    return _cast(x.float() / s, fmt), s


# the grouped weight refresh (yxanul.fp8.linear) may compute this quantizer's bytes itself, for many weights at once
quant_tensor.reference_bytes = True


def expand_operand_scales(s: torch.Tensor, rows: int, cols: int, granularity: str, block: int = 128) -> torch.Tensor:
    """Broadcastable per-element scales for a [rows, cols] operand from its scale tensor (see module doc)."""
    if granularity == "tensor":
        return s.reshape(1, 1)
    if granularity == "row":
        return s.reshape(rows, 1)
    out = s.repeat_interleave(block, 1)[:, :cols] if s.shape[1] > 1 else s
    return out.repeat_interleave(block, 0)[:rows] if granularity == "block" else out


def dequant_operand(q: torch.Tensor, s: torch.Tensor, granularity: str, block: int = 128) -> torch.Tensor:
    return q.float() * expand_operand_scales(s.float(), q.shape[0], q.shape[1], granularity, block)


def emulated_gemm(a_q, a_s, b_q, b_s, out_dtype, a_gran: str, b_gran: str, block: int = 128):
    """a @ b.T from FP8 operands of the given granularities: dequantize and multiply in FP32 (the numerics
    reference). Autocast is off inside: the layer's forward runs under the caller's autocast, and a backward
    traced by torch.compile does too, where the eager backward does not; either would turn this into a BF16
    matmul."""
    with torch.autocast(a_q.device.type, enabled=False):
        out = dequant_operand(a_q, a_s, a_gran, block) @ dequant_operand(b_q, b_s, b_gran, block).t()
    return out.to(out_dtype)


# ---------------------------------------------------------------------------------------------------------
# Native (cuBLAS via torch scaled-mm)
# ---------------------------------------------------------------------------------------------------------
def native_available(device=None) -> tuple[bool, str]:
    """(ok, reason): native FP8 GEMMs need CUDA with compute capability >= 8.9."""
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if dev.type != "cuda":
        return False, f"device {dev} is not CUDA"
    cap = torch.cuda.get_device_capability(dev)
    if cap < (8, 9):
        return False, f"GPU capability sm_{cap[0]}{cap[1]} < sm_89"
    if not hasattr(torch, "_scaled_mm"):
        return False, "this torch has no _scaled_mm"
    return True, f"sm_{cap[0]}{cap[1]}"


def blockwise_native_available() -> bool:
    return hasattr(F, "scaled_mm") and hasattr(F, "ScalingType") and torch.cuda.is_available() \
        and torch.cuda.get_device_capability() >= (9, 0)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _pad2(t: torch.Tensor, rows: int, cols: int, value=0.0) -> torch.Tensor:
    pr, pc = rows - t.shape[0], cols - t.shape[1]
    if not (pr or pc):
        return t
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        out = torch.zeros(rows, cols, dtype=t.dtype, device=t.device)
        out[:t.shape[0], :t.shape[1]] = t
        return out
    return F.pad(t, (0, pc, 0, pr), value=value)


def _col_major(s: torch.Tensor) -> torch.Tensor:
    """Same shape, stride [1, rows] ("outer-dim-major"), as cuBLAS wants for 1 x 128 scales."""
    return s.t().contiguous().t()


def _block_scales_for_b(s: torch.Tensor, k_blocks: int) -> torch.Tensor:
    """128x128 scales of b [N, K] (shape [N/128, K/128]) laid out for mat2 = b.T [K, N]:
    shape [L4, N/128] with L4 = round_up(K/128, 4) and stride [1, L4] (the K/128 dim padded to 4)."""
    L4 = _round_up(k_blocks, 4)
    buf = torch.ones(s.shape[0], L4, dtype=torch.float32, device=s.device)
    buf[:, :k_blocks] = s[:, :k_blocks]
    return buf.t()


def _scalar_scale(s: torch.Tensor) -> torch.Tensor:
    """A per-tensor scale as cuBLAS takes it: FP32, 0-d, at the start of its own allocation. cuBLAS refuses
    (CUBLAS_STATUS_NOT_SUPPORTED) a scale pointer that is not 16-byte aligned, e.g. one slot of the delayed
    recipe's ``scale_inv[3]`` buffer, so such a view is copied. (Under torch.compile the check is skipped: it
    would break the graph, and inductor would drop the copy as a no-op; traced callers pass fresh scales.)"""
    s = s.float().reshape(())
    if not torch.compiler.is_compiling() and s.storage_offset():
        s = s.clone()
    return s


def native_gemm(a_q, a_s, b_q, b_s, out_dtype, a_gran: str, b_gran: str, block: int = 128,
                fast_accum: bool = False):
    """a @ b.T with cuBLAS FP8, the operands scaled at the given granularities (tensor x tensor, row x row, or
    tile x tile / tile x block). Pads M, N, K as the kernels need (zeros contribute nothing). A row-scaled
    operand whose rows fit in one tile (K <= block) is the same as a 1 x block tile operand and takes that
    kernel. ``fast_accum``: cuBLAS's fast FP8 accumulation for the per-tensor and row-scaled kernels (the
    blockwise ones always promote)."""
    M, K = a_q.shape
    N = b_q.shape[0]
    tensorwise = a_gran == "tensor"
    rowwise = a_gran == "row" and K > block
    if tensorwise or rowwise:
        Mp, Np, Kp = _round_up(M, 16), _round_up(N, 16), _round_up(K, 16)
        a = _pad2(a_q, Mp, Kp)
        b = _pad2(b_q, Np, Kp)
        if tensorwise:
            sa, sb = _scalar_scale(a_s), _scalar_scale(b_s)
        else:
            sa = _pad2(a_s.float(), Mp, 1, 1.0).contiguous()
            sb = _pad2(b_s.float(), Np, 1, 1.0).reshape(1, Np).contiguous()
        out = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype, use_fast_accum=fast_accum)
        return out[:M, :N]
    if block != 128:
        raise YxanulError(f"native blockwise GEMMs need block_size 128, got {block}", key="recipe.block_size")
    if a_q.device.type != "meta" and not blockwise_native_available():
        raise YxanulError("native blockwise GEMMs need torch >= 2.9 (torch.nn.functional.scaled_mm) on sm_90+",
                          key="fp8_backend")
    ST, SW = F.ScalingType, F.SwizzleType
    Mp, Kp = _round_up(M, 128), _round_up(K, 128)
    kb = Kp // 128
    b_is_blocks = b_gran == "block"
    Np = _round_up(N, 128)
    a = _pad2(a_q, Mp, Kp)
    b = _pad2(b_q, Np, Kp)
    sa = _col_major(_pad2(a_s.float(), Mp, kb, 1.0))
    if b_is_blocks:
        sb = _block_scales_for_b(_pad2(b_s.float(), Np // 128, kb, 1.0), kb)
        rb = ST.BlockWise128x128
    else:
        sb = _col_major(_pad2(b_s.float(), Np, kb, 1.0))
        rb = ST.BlockWise1x128
    out = F.scaled_mm(a, b.t(), sa, ST.BlockWise1x128, sb, rb, SW.NO_SWIZZLE, SW.NO_SWIZZLE,
                      output_dtype=out_dtype)
    return out[:M, :N]


@torch.library.custom_op("yxanul::native_gemm", mutates_args=())
def _native_gemm_op(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
                    out_dtype: torch.dtype, a_gran: str, b_gran: str, block: int, fast_accum: bool) -> torch.Tensor:
    return native_gemm(a_q, a_s, b_q, b_s, out_dtype, a_gran, b_gran, block, fast_accum)


@_native_gemm_op.register_fake
def _(a_q, a_s, b_q, b_s, out_dtype, a_gran, b_gran, block, fast_accum):
    return a_q.new_empty(a_q.shape[0], b_q.shape[0], dtype=out_dtype)


def native_gemm_op(a_q, a_s, b_q, b_s, out_dtype, a_gran: str, b_gran: str, block: int = 128,
                   fast_accum: bool = False):
    """:func:`native_gemm` as one opaque custom op, so torch.compile keeps its graph whole around it; per-tensor
    scaled GEMMs are traced as they are (``torch._scaled_mm``, which inductor calls directly)."""
    if torch.compiler.is_compiling() and a_gran == "tensor":
        return native_gemm(a_q, a_s, b_q, b_s, out_dtype, a_gran, b_gran, block, fast_accum)
    return _native_gemm_op(a_q, a_s, b_q, b_s, out_dtype, a_gran, b_gran, int(block), bool(fast_accum))


# ---------------------------------------------------------------------------------------------------------
# The op table
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fp8Ops:
    """The operations one (spec, backend) pair computes with; see the module docstring.

    Quantizers take the tensor only (format, block and scale rounding are bound when the table is built);
    delayed-scaling quantizers also take ``scale_inv=`` (the per-tensor scale from the amax history).

    Optional (None: separate quantizers, or quantize-then-transpose for one scale): ``act_quant_dual`` and
    ``grad_quant_dual`` return both GEMM layouts from one read of x, ``(q, s, qT)`` (one scale) or
    ``(q, s, qT, sT)``; ``want_q=`` / ``want_qt=`` may skip a layout. ``amax``: the 0-d max |x| that
    delayed scaling records.
    """
    act_quant: Callable
    act_quant_t: Callable
    weight_quant: Callable
    weight_t: Callable
    fprop: Callable
    dgrad: Callable
    wgrad: Callable
    grad_quant: Callable
    grad_quant_t: Callable
    backend: str = "emulated"
    act_quant_dual: Callable | None = None
    grad_quant_dual: Callable | None = None
    amax: Callable | None = None

    def grad_operands(self, dy2: torch.Tensor, want_t: bool, scale_inv: torch.Tensor | None = None,
                      want_q: bool = True):
        """An output gradient's FP8 operands ``(q, s, qT, sT)``: the dgrad layout and, with `want_t`, the
        transposed wgrad layout (else None, None); from one read where the table has ``grad_quant_dual``, by
        transposing q for a given per-tensor ``scale_inv`` (delayed scaling), else with ``grad_quant_t``.
        ``want_q=False`` lets the one-read quantizer skip q."""
        kw = {"scale_inv": scale_inv} if scale_inv is not None else {}
        if want_t and self.grad_quant_dual is not None:
            out = self.grad_quant_dual(dy2, want_q=want_q, **kw)
            return out[0], out[1], out[2], out[3] if len(out) > 3 else out[1]
        q, s = self.grad_quant(dy2, **kw)
        if not want_t:
            return q, s, None, None
        if scale_inv is not None:
            return q, s, q.t().contiguous(), s
        return (q, s, *self.grad_quant_t(dy2))


def _t_from(q_fn):
    def act_t(x, **kw):
        return q_fn(x.t().contiguous(), **kw)
    return act_t


def _tensor_t(q_fn):
    # one scale for the whole tensor: the transposed copy is the same values transposed
    def act_t(x, **kw):
        q, s = q_fn(x, **kw)
        return q.t().contiguous(), s
    return act_t


def _weight_t_transpose(w, q, s):
    # a 128x128 block's transpose is the same block; a per-tensor scale is unchanged
    return q.t().contiguous(), (s.t().contiguous() if s.dim() == 2 else s)


def _quantizer(op: OperandSpec, transposed: bool = False) -> Callable:
    """The reference quantizer of one operand: rows of the tensor, or (``transposed``) rows of its transpose."""
    f = get_format(op.fmt)
    if op.granularity == "tile":
        fn = quant_tiles_t if transposed else quant_tiles
        return functools.partial(fn, fmt=f, block=op.block, pow2=op.pow2)
    if op.granularity == "block":
        return functools.partial(quant_blocks, fmt=f, block=op.block, pow2=op.pow2)
    if op.granularity == "row":
        q = functools.partial(quant_rows, fmt=f, pow2=op.pow2)
        return _t_from(q) if transposed else q
    q = functools.partial(quant_tensor, fmt=f, pow2=op.pow2)  # delayed passes scale_inv=
    return _tensor_t(q) if transposed else q


def _weight_t(spec: Fp8Spec) -> Callable:
    if spec.w.granularity == "row":  # the transposed weight has rows of its own
        wq = _quantizer(spec.w)
        return lambda w, q, s: wq(w.t().contiguous())
    return _weight_t_transpose


def fast_accum_applies(spec: Fp8Spec, backend: str, options: Fp8Options) -> bool:
    """Whether the layer's forward GEMM accumulates with cuBLAS's fast mode (``options.fprop_fast_accum``):
    on the native backend, for per-tensor and row-scaled forward operands."""
    return bool(options.fprop_fast_accum) and backend == "native" and spec.x.granularity in ("tensor", "row")


def default_ops(spec: Fp8Spec, backend: str = "emulated", options: Fp8Options | None = None) -> Fp8Ops:
    """The reference op table of a resolved recipe: pure-torch quantizers + the backend's GEMMs (the forward one
    with fast accumulation where ``options`` ask for it and it applies, :func:`fast_accum_applies`)."""
    gemm = native_gemm_op if backend == "native" else emulated_gemm
    gemms = {op: functools.partial(gemm, a_gran=a, b_gran=b, block=spec.block)
             for op in OPS for a, b in [spec.gemm_granularity(op)]}
    if fast_accum_applies(spec, backend, options or Fp8Options()):
        gemms["fprop"] = functools.partial(gemms["fprop"], fast_accum=True)
    return Fp8Ops(_quantizer(spec.x), _quantizer(spec.x, transposed=True), _quantizer(spec.w), _weight_t(spec),
                  gemms["fprop"], gemms["dgrad"], gemms["wgrad"], _quantizer(spec.dy),
                  _quantizer(spec.dy, transposed=True), backend)


_REGISTRY: dict[tuple[str, str], dict[str, Callable]] = {}


def register_ops(recipe: str, backend: str, **ops: Callable) -> None:
    """Override some operations of (recipe name, backend), e.g. ``register_ops("blockwise", "native",
    act_quant=my_act_quant)``. Later calls replace earlier ones; an op set to None restores the default."""
    valid = {f for f in Fp8Ops.__dataclass_fields__ if f != "backend"}
    bad = set(ops) - valid
    if bad:
        raise YxanulError(f"unknown FP8 op(s) {sorted(bad)} (expected: {', '.join(sorted(valid))})")
    cur = _REGISTRY.setdefault((recipe, backend), {})
    for k, v in ops.items():
        if v is None:
            cur.pop(k, None)
        else:
            cur[k] = v


def kernel_overrides(spec: Fp8Spec, backend: str, options: Fp8Options) -> dict[str, Callable]:
    """The registered fused quantizers (bit-identical to the reference ones), as ``options.kernels`` asks:
    ``auto`` on the native backend with E4M3 forward operands where Triton runs on the GPU, ``triton`` always
    (an error if none are registered), ``torch`` never."""
    if options.kernels == "torch":
        return {}
    if options.kernels == "triton":
        if not registry.quantizers_available():
            raise YxanulError("Triton kernels are not available (no importable triton, or yxanul.kernels not "
                              "imported)", key="fp8_kernels")
        return registry.quantizer_overrides(spec, "triton")
    if not (backend == "native" and spec.x.fmt == "e4m3" and torch.cuda.is_available()
            and registry.quantizers_available()):
        return {}
    return registry.quantizer_overrides(spec, None)


def build_ops(spec: Fp8Spec, backend: str = "emulated", options: Fp8Options | None = None) -> Fp8Ops:
    """A layer's op table: the reference ops of `spec` on `backend`, the registered fused quantizers as
    ``options.kernels`` allows, then anything registered with :func:`register_ops` for the recipe."""
    options = (options or Fp8Options()).validate()
    ops = default_ops(spec, backend, options)
    over = kernel_overrides(spec, backend, options)
    over.update(_REGISTRY.get((spec.recipe.name, backend), {}))
    return replace(ops, **over) if over else ops


def get_ops(recipe: Fp8Recipe, fmt: str | Fp8Format = "e4m3", backend: str = "emulated",
            options: Fp8Options | None = None) -> Fp8Ops:
    """:func:`build_ops` for a recipe not yet resolved."""
    return build_ops(resolve(recipe, get_format(fmt).name), backend, options)


# ---------------------------------------------------------------------------------------------------------
# Backend choice
# ---------------------------------------------------------------------------------------------------------
def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(backend: str, device=None, quiet: bool = False) -> str:
    """Map ``auto`` to a concrete backend; validate the others."""
    if backend not in BACKENDS:
        raise YxanulError(f"unknown FP8 backend {backend!r} (expected one of: {', '.join(BACKENDS)})",
                          key="fp8_backend")
    ok, why = native_available(device)
    if backend == "auto":
        if ok:
            return "native"
        if not quiet:
            print(f"yxanul: FP8 backend auto -> emulated ({why})", file=sys.stderr)
        return "emulated"
    if backend == "native" and not ok:
        raise YxanulError(f"native FP8 backend unavailable: {why} (use --fp8-backend emulated)", key="fp8_backend")
    if backend == "te" and not te_available():
        raise YxanulError("Transformer Engine is not importable (pip install transformer-engine, or use "
                          "--fp8-backend native|emulated)", key="fp8_backend")
    return backend


# ---------------------------------------------------------------------------------------------------------
# Self-check
# ---------------------------------------------------------------------------------------------------------
# Native and emulated GEMMs see the same FP8 values and FP32 scales, so they differ only by accumulation
# order/precision and the final BF16 rounding (relative 2**-9 per element, ~0.2% RMS). A wrong scale layout
# gives O(10%) or larger errors (a 47% error was once observed). 1e-2 sits between the two by a wide margin.
NATIVE_TOL = 1e-2
# On CPU the check compares the emulated FP8 GEMM with an unquantized FP32 GEMM: E4M3 keeps 3 mantissa bits
# (relative rounding error <= 2**-4, ~2-3% RMS per element, averaging down in a dot product), E5M2 keeps 2.
REFERENCE_TOL = {"e4m3": 0.08, "e5m2": 0.15}

OPS = ("fprop", "dgrad", "wgrad")


def model_shapes(cfg, tokens: int) -> list[tuple[str, int, int, int]]:
    """(module kind, M, K, N) of every FP8 GEMM of a model config: q, k, v, o, gate, up, down and, with the
    config's ``fused_projections``, the fused q/k/v and gate/up GEMMs (kinds ``q_proj+k_proj+v_proj`` and
    ``gate_proj+up_proj``)."""
    d, hq, hkv = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = [("q_proj", tokens, d, hq), ("k_proj", tokens, d, hkv), ("v_proj", tokens, d, hkv),
              ("o_proj", tokens, hq, d), ("gate_proj", tokens, d, cfg.ffn_hidden),
              ("up_proj", tokens, d, cfg.ffn_hidden), ("down_proj", tokens, cfg.ffn_hidden, d)]
    if getattr(cfg, "fused_projections", False):
        shapes += [("q_proj+k_proj+v_proj", tokens, d, hq + 2 * hkv),
                   ("gate_proj+up_proj", tokens, d, 2 * cfg.ffn_hidden)]
    return shapes


def _operands(op: str, M: int, K: int, N: int, ops: Fp8Ops, gen: torch.Generator, device):
    """Quantized operands of one of a linear layer's three GEMMs (x [M,K], W [N,K], dy [M,N])."""
    def rnd(*shape):
        t = torch.randn(*shape, generator=gen, dtype=torch.float32).to(device)
        # a few outlier rows/columns, like real activations
        return t * (1 + 8 * (torch.rand(shape[-1], generator=gen) < 0.02).float().to(device))
    x, w, dy = rnd(M, K), rnd(N, K) * 0.02, rnd(M, N) * 1e-3
    if op == "fprop":
        a, b = ops.act_quant(x), ops.weight_quant(w)
        ref = (x, w)
    elif op == "dgrad":
        q, s = ops.weight_quant(w)
        a, b = ops.grad_quant(dy), ops.weight_t(w, q, s)
        ref = (dy, w.t())
    else:
        a, b = ops.grad_quant_t(dy), ops.act_quant_t(x)
        ref = (dy.t(), x.t())
    return a, b, ref


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def selfcheck(shapes, recipes=("blockwise", "tensorwise", "rowwise", "delayed"), backend: str = "native",
              seed: int = 0, base: Fp8Recipe | None = None, options: Fp8Options | None = None) -> list[dict]:
    """Compare ``backend`` against the emulated reference on the same quantized inputs, for each recipe,
    shape ``(M, K, N)`` and op (fprop, dgrad, wgrad). Rows: ``{recipe, op, M, K, N, rel_err, tol, ok,
    compared, error}``; ``compared`` is ``native_vs_emulated`` or, where native is unavailable,
    ``emulated_vs_fp32`` (then ``rel_err`` is the FP8 quantization error against an FP32 GEMM). ``options``:
    the native GEMMs' :class:`Fp8Options` (``fprop_fast_accum`` checks the forward GEMM's fast accumulation)."""
    native = backend == "native"
    device = "cuda" if native else "cpu"
    rows = []
    for rname in recipes:
        rec = replace(base or Fp8Recipe(), name=rname).validate()
        spec = resolve(rec, "e4m3")
        emu = get_ops(rec, "e4m3", "emulated")
        nat = get_ops(rec, "e4m3", "native", options) if native else None
        for shape in shapes:
            M, K, N = (int(v) for v in shape[-3:])
            for op in OPS:
                gen = torch.Generator().manual_seed(seed + M * 7 + K * 13 + N * 17 + OPS.index(op))
                row = {"recipe": rname, "op": op, "M": M, "K": K, "N": N}
                try:
                    (aq, as_), (bq, bs), (ra, rb) = _operands(op, M, K, N, nat or emu, gen, device)
                    want = getattr(emu, op)(aq, as_, bq, bs, torch.float32)
                    if native:
                        got = getattr(nat, op)(aq, as_, bq, bs, torch.bfloat16)
                        err, tol, what = _rel(got, want), NATIVE_TOL, "native_vs_emulated"
                    else:
                        fmt = spec.dy.fmt if op != "fprop" else spec.x.fmt
                        err, tol, what = _rel(want, ra @ rb.t()), REFERENCE_TOL[fmt], "emulated_vs_fp32"
                    row.update(rel_err=err, tol=tol, ok=bool(err <= tol), compared=what, error=None)
                except Exception as e:  # a kernel refusing a layout is a failed check, not a crash
                    row.update(rel_err=math.nan, tol=NATIVE_TOL, ok=False,
                               compared="native_vs_emulated" if native else "emulated_vs_fp32",
                               error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                rows.append(row)
    return rows


_CHECKED: dict[tuple, bool] = {}


def native_shape_ok(recipe: Fp8Recipe, M: int, K: int, N: int) -> bool:
    """Self-check one (recipe, shape) once per process (cached); False if native disagrees with emulated."""
    key = (recipe.name, recipe.fp8_format, recipe.block_size, recipe.pow2_scales, M, K, N)
    if key not in _CHECKED:
        rows = selfcheck([(M, K, N)], [recipe.name], "native", base=recipe)
        bad = [r for r in rows if not r["ok"]]
        _CHECKED[key] = not bad
        if bad:
            detail = "; ".join(f"{r['op']} rel_err={r['rel_err']:.3g}" + (f" ({r['error']})" if r["error"] else "")
                               for r in bad)
            print(f"yxanul: WARNING: native FP8 {recipe.name} GEMM at M={M} K={K} N={N} disagrees with the "
                  f"emulated reference ({detail}); this shape falls back to the emulated backend", file=sys.stderr)
    return _CHECKED[key]
