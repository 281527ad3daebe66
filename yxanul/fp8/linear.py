"""FP8 linear layers: :class:`Fp8Linear`, :func:`convert_model`, :func:`fp8_step`, :func:`fp8_stats`.

``Fp8Linear`` is a drop-in ``nn.Linear`` (same ``weight``/``bias`` parameters, so state dicts load either way)
whose three GEMMs run on FP8 operands quantized by the recipe:

* fprop ``y = x W^T``    x scaled along K (its rows), W as the forward copy;
* dgrad ``dx = dy W``    dy scaled along N, W's transposed copy;
* wgrad ``dW = dy^T x``  dy^T and x^T scaled along the token dim M (the reduction dim of this GEMM).

The FP32 master weight is never modified: eagerly, the quantized copies live in a cache that is rebuilt once per
optimizer step (:func:`fp8_step` invalidates it; an in-place change of the weight is also detected), so
gradient-accumulation micro-batches reuse it; inside a compiled graph the weight is quantized at every forward,
or, with the ``weight_cache="step"`` option, read from static copies that :func:`fp8_step` refreshes. Outputs are in
the autocast dtype when autocast is on, else in the input's dtype; ``dx`` in the input's dtype; ``dW`` in FP32 (accumulated into ``weight.grad``).

Non-finite values are never silently cast: every quantization folds "any NaN/Inf" into a per-module device
flag (no host sync); :func:`fp8_check` raises :class:`NonFiniteError` naming the modules, and
:func:`fp8_stats` reports them.
"""
from __future__ import annotations

import functools
import math
import sys

import torch
import torch.nn as nn

from ..errors import NonFiniteError, YxanulError
from . import scaling
from .backends import _cast, _scale_from_amax, _weight_t_transpose, build_ops, native_shape_ok, out_dtype, resolve_backend, tensor_abs_max
from .formats import get_format
from .producers import can_fuse, fp8_fusion_kind, mlp_forward
from .swiglu import swiglu_fp8_inputs
from .options import Fp8Options
from .recipe import Fp8Recipe, resolve

_SLOT = {"x": 0, "w": 1, "dy": 2}
_STAT_KEYS = ("amax", "scale_inv_min", "scale_inv_max", "saturation", "underflow")
_STATIC_W = ("_wq", "_ws", "_wtq", "_wts")


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except Exception:  # pragma: no cover - very old torch
        return False


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # noqa: BLE001 - torch without distributed
        return False
    return isinstance(t, DTensor)


class _Fp8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, wq, ws, wtq, wts, sx, mod):
        ops = mod.ops
        K = x.shape[-1]
        x2 = x.reshape(-1, K)
        delayed = sx is not None
        cache = mod.spec.recipe.cache_fp8_activations
        dual = ops.act_quant_dual is not None and cache
        if dual:  # both layouts in one pass
            out = ops.act_quant_dual(x2, scale_inv=sx) if delayed else ops.act_quant_dual(x2)
            xq, xs, xtq = out[:3]
            xts = out[3] if len(out) > 3 else xs
        else:
            xq, xs = ops.act_quant(x2, scale_inv=sx) if delayed else ops.act_quant(x2)
        if not delayed:  # delayed flags the amax it records
            mod._flag(0, xs)
        y = ops.fprop(xq, xs, wq, ws, out_dtype(x))
        if bias is not None:
            y = y + bias.to(y.dtype)
        if cache:
            if dual:
                pass  # xtq, xts from the one-pass quantizer above
            elif mod.spec.per_tensor:
                xtq, xts = xq.t().contiguous(), xs  # one scale: the transposed copy is free
            else:
                xtq, xts = ops.act_quant_t(x2)
            ctx.save_for_backward(None, xtq, xts, wtq, wts, sx)
        else:
            ctx.save_for_backward(x2, None, None, wtq, wts, sx)
        ctx.mod, ctx.x_shape, ctx.x_dtype, ctx.has_bias = mod, x.shape, x.dtype, bias is not None
        if mod._collect:
            mod._record_stats("x", x2, xq, xs)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xtq, xts, wtq, wts, sx = ctx.saved_tensors
        mod = ctx.mod
        ops = mod.ops
        N = dy.shape[-1]
        dy2 = dy.reshape(-1, N)
        delayed = sx is not None
        want_dx, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # the plain layout is needed for dgrad, and for the statistics
        dyq, dys, dytq, dyts = ops.grad_operands(dy2, want_dw, mod._delayed_scale("dy", dy2) if delayed else None,
                                                 want_q=want_dx or mod._collect)
        if not delayed:
            mod._flag(2, dys)
        if mod._collect:
            mod._record_stats("dy", dy2, dyq, dys)
        dx = dw = db = None
        if want_dx:
            dx = ops.dgrad(dyq, dys, wtq, wts, ctx.x_dtype).view(ctx.x_shape)
        if want_dw:
            if xtq is None:
                if delayed:
                    xq, xts = ops.act_quant(x2, scale_inv=sx)
                    xtq = xq.t().contiguous()
                else:
                    xtq, xts = ops.act_quant_t(x2)
            dw = ops.wgrad(dytq, dyts, xtq, xts, torch.float32)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.float().sum(0)
        return dx, dw, db, None, None, None, None, None, None


class Fp8Linear(nn.Module):
    """``nn.Linear`` computing its forward and both backward GEMMs in FP8 (see the module docstring).

    ``recipe`` picks the scaling (blockwise, tensorwise, rowwise, delayed), ``fmt`` the forward format
    (e4m3 or e5m2; grads follow ``recipe.fp8_format``), ``backend`` the GEMM implementation
    (emulated | native; resolve ``auto`` with :func:`convert_model`), ``options`` how it computes
    (:class:`~yxanul.fp8.options.Fp8Options`), ``name`` is used in messages. The recipe is resolved once, into
    ``spec`` (:class:`~yxanul.fp8.recipe.Fp8Spec`), and the op table built from it (``ops``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, recipe: Fp8Recipe | None = None,
                 fmt: str = "e4m3", backend: str = "emulated", name: str = "", device=None, dtype=None,
                 options: Fp8Options | None = None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        fk = {"device": device, "dtype": dtype or torch.float32}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **fk))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **fk))
        else:
            self.register_parameter("bias", None)
        self.recipe = (recipe or Fp8Recipe()).validate()
        self.fmt = get_format(fmt).name
        if backend not in ("emulated", "native"):
            raise YxanulError(f"Fp8Linear backend must be emulated or native (got {backend!r}); "
                              f"use convert_model(..., backend='auto') to choose automatically", key="fp8_backend")
        self.backend = backend
        self.name = name
        self.options = (options or Fp8Options()).validate()
        self.spec = resolve(self.recipe, self.fmt)
        self.ops = build_ops(self.spec, backend, self.options)
        self._init_buffers(device)
        self._wcache = None
        self._wcache_version = None
        # compiled forwards read the weight copies from static buffers (refreshed in place by fp8_step) instead
        # of quantizing in the graph (option weight_cache="step")
        self._static_w = False
        self._collect = False
        if self.spec.delayed:
            self._fmt_max = [get_format(f).max for f in self.spec.operand_formats]
        self.reset_parameters()

    def _init_buffers(self, device) -> None:
        """(Re)create the state buffers on `device`: the non-finite flags and, for delayed, the histories."""
        self._steps = 0
        # delayed: True once every operand has a scale from its history; from then on the cast uses that
        # scale alone, so it no longer waits for the current amax (which is still recorded) and torch.compile
        # can fuse it into the kernel producing the operand. Set by fp8_step (one host sync for the model).
        self._scales_fixed = False
        self._sync_calibrating()
        self.register_buffer("nonfinite", torch.zeros(3, dtype=torch.int32, device=device), persistent=False)
        # statistics of the last armed pass, one row per operand (x, w, dy), NaN until recorded: a buffer
        # written in place, so collecting them inside a compiled graph neither breaks nor specializes it
        self.register_buffer("stats_buf", torch.full((3, len(_STAT_KEYS)), float("nan"), device=device),
                             persistent=False)
        if self.spec.delayed:
            L = self.recipe.amax_history_len
            self.register_buffer("amax_history", torch.zeros(L, 3, device=device))
            self.register_buffer("scale_inv", torch.ones(3, device=device))
            self.register_buffer("scale_ready", torch.zeros(3, device=device))
            self.register_buffer("fp8_steps", torch.zeros((), dtype=torch.int64, device=device))
            # scale_inv's entries, each as its own 0-d tensor (kept equal by fp8_step and state loading): what the
            # casts and cuBLAS read once the scales are fixed. cuBLAS needs a scale at the start of its own
            # allocation, which a view scale_inv[i] is not; computing a fresh scalar instead cost a kernel per
            # operand per pass.
            for which in _SLOT:
                self.register_buffer(f"scale_inv_{which}", torch.ones((), device=device), persistent=False)

    def reset_parameters(self) -> None:
        if self.weight.device.type == "meta":
            return
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"recipe={self.recipe.name}, fmt={self.fmt}, backend={self.backend}")

    # -- state -----------------------------------------------------------------------------------------
    @property
    def calibrating(self) -> bool:
        return self._calibrating

    def _sync_calibrating(self) -> None:
        # a bool that flips once, read by forward: torch.compile guards on it (one recompile when calibration
        # ends), where guarding on the step counter itself recompiled the block at every step
        cal = self.spec.delayed and self._steps < self.recipe.calibration_steps
        if getattr(self, "_calibrating", None) is not cal:  # nn.Module.__setattr__ is slow: fp8_step runs per step
            self._calibrating = cal

    def set_backend(self, backend: str) -> None:
        self.backend = backend
        self.ops = build_ops(self.spec, backend, self.options)
        self.invalidate()

    def _apply(self, fn, *args, **kwargs):
        # .to(dtype / device), .half(), .cuda(): the FP8 weight copies (FP8 counts as floating point, so a dtype
        # change would convert them) are rebuilt from the moved weight
        out = super()._apply(fn, *args, **kwargs)
        self.invalidate()
        return out

    def invalidate(self) -> None:
        if self._wcache is not None or self._wcache_version is not None:
            self._wcache = None
            self._wcache_version = None
        if self._static_w:  # compiled forwards quantize in the graph again until the next refresh
            self._static_w = False

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        before = len(missing_keys)
        hist = state_dict.get(prefix + "amax_history")
        own_hist = getattr(self, "amax_history", None)
        if hist is not None and own_hist is not None and hist.shape != own_hist.shape:
            raise YxanulError(f"checkpoint has an amax history of {hist.shape[0]} steps, the recipe asks for "
                              f"{own_hist.shape[0]}; resume with the same recipe.amax_history_len",
                              key="recipe.amax_history_len")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # a plain nn.Linear checkpoint has no delayed-scaling state: keep the fresh buffers
        own = {prefix + n for n in ("amax_history", "scale_inv", "scale_ready", "fp8_steps")}
        missing_keys[before:] = [k for k in missing_keys[before:] if k not in own]
        if self.spec.delayed:
            _sync_slot_scales([self])
        if self.spec.delayed and prefix + "fp8_steps" in state_dict:
            self._steps = int(state_dict[prefix + "fp8_steps"])
            self._sync_calibrating()
            ready = state_dict.get(prefix + "scale_ready")
            self._scales_fixed = bool(ready is not None and ready.device.type != "meta" and (ready > 0).all()
                                      and not self.calibrating)
        self.invalidate()

    def _flag(self, slot: int, t: torch.Tensor) -> None:
        bad = (~torch.isfinite(t.float())).any() if t.dtype.is_floating_point else None
        if bad is not None:
            self.nonfinite[slot] += bad.to(torch.int32)

    def _delayed_scale(self, which: str, t: torch.Tensor, also=()) -> torch.Tensor:
        """The scale `t` is cast with now; its amax is recorded in this layer's history and in those of the
        layers in `also` (which read the same tensor)."""
        i = _SLOT[which]
        amax = self.ops.amax(t.detach()) if self.ops.amax is not None else tensor_abs_max(t.detach())
        # a NaN/Inf propagates into the history's current row, which fp8_step (or _nonfinite before it) turns
        # into the non-finite flag: no flag kernel per operand here
        for m in (self, *also):
            scaling.record_amax(m.amax_history, i, amax)
        return self._scale_for(which, amax)

    def _scale_for(self, which: str, amax: torch.Tensor) -> torch.Tensor:
        """The scale operand `which` is cast with now, given its current amax (nothing recorded)."""
        i = _SLOT[which]
        if self._scales_fixed:
            # _scales_fixed implies scale_ready is all 1 (only fp8_step and state loading set it)
            return getattr(self, f"scale_inv_{which}")
        r = self.recipe
        if self.calibrating:  # current scaling while the history fills
            return scaling.current_scale(amax, self._fmt_max[i], r.margin, r.pow2_scales)
        return scaling.current_or_delayed(amax, self.scale_inv[i], self.scale_ready[i], self._fmt_max[i], r.margin,
                                          r.pow2_scales)

    @torch.no_grad()
    def _record_stats(self, which: str, t: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> None:
        fmax = get_format(getattr(self.spec, which).fmt).max
        qa = q.float().abs()
        nz = t != 0
        n = max(t.numel(), 1)
        self.stats_buf[_SLOT[which]].copy_(torch.stack([
            t.detach().float().abs().amax(), s.float().min(), s.float().max(),
            (qa >= fmax).float().sum() / n, (nz & (qa == 0)).float().sum() / n]))

    # -- weight cache ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _quantize_weight(self, w: torch.Tensor | None = None):
        """The FP8 copies of this layer's weight, or of `w` (the side-by-side weights of a group of per-tensor
        layers that this one leads: its state scales them, :func:`yxanul.model.fused_linear`)."""
        w = (self.weight if w is None else w).detach()
        if self.spec.delayed:
            s = self._delayed_scale("w", w)
            q, s = self.ops.weight_quant(w, scale_inv=s)
        else:
            q, s = self.ops.weight_quant(w)
            self._flag(1, s)
        qt, st = self.ops.weight_t(w, q, s)
        if st is s:  # a per-tensor scale is its own transpose; autograd.Function inputs must be distinct tensors
            st = s.clone()  # (dynamo breaks the graph at every layer otherwise)
        if self._collect:
            self._record_stats("w", w, q, s)
        return q, s, qt, st

    def weight_fp8(self):
        """(q, s, qT, sT): the FP8 forward and transposed copies; eagerly cached and rebuilt once per optimizer
        step. While torch.compile traces: the static copies when :meth:`refresh_static_weight` has filled them
        (option ``weight_cache="step"``), else quantized in the graph (at every forward)."""
        if _compiling():
            if self._static_w:
                return self._wq, self._ws, self._wtq, self._wts
            return self._quantize_weight()  # traced into the graph; a Python-side cache would break it
        ver = (self.weight._version, self.weight.data_ptr())
        if self._wcache is None or self._wcache_version != ver:
            self._wcache = self._quantize_weight()
            self._wcache_version = ver
        return self._wcache

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise YxanulError(f"input has {x.shape[-1]} features, expected {self.in_features}", key=self.name or None)
        wq, ws, wtq, wts = self.weight_fp8()
        sx = self._delayed_scale("x", x) if self.spec.delayed else None
        return _Fp8LinearFn.apply(x, self.weight, self.bias, wq, ws, wtq, wts, sx, self)

    @torch.no_grad()
    def refresh_static_weight(self) -> bool:
        """Quantize the weight now, eagerly, into the static buffers ``_wq, _ws, _wtq, _wts`` (written in place,
        so compiled graphs and CUDA graphs keep their addresses) that compiled forwards then read: the weight is
        quantized once per optimizer step, not once per micro-batch. :func:`fp8_step` calls it under the
        ``weight_cache="step"`` option. Not for calibrating layers or FSDP-sharded weights (a shard is not the
        weight). Returns whether the static copies are in use. A weight changed without a following fp8_step
        is not seen by compiled forwards (eager ones check the weight's version)."""
        if self.calibrating or self.weight.device.type == "meta" or _is_dtensor(self.weight):
            self.invalidate()
            return False
        dst, src = self._adopt_static(self._quantize_weight())
        if dst:
            torch._foreach_copy_(dst, src)
        return True

    def _adopt_static(self, parts) -> tuple[list, list]:
        """Make ``parts`` (q, s, qT, sT) this layer's static weight copies: new buffers the first time (or when a
        shape, dtype or device changed), else in place, returned as the (destinations, sources) of a copy the
        caller makes (one multi-tensor copy for many layers). Eager forwards then use the same copies (no
        second set in memory)."""
        old = [getattr(self, n, None) for n in _STATIC_W]
        if any(o is None or o.shape != t.shape or o.dtype != t.dtype or o.device != t.device
               for o, t in zip(old, parts)):
            for n, t in zip(_STATIC_W, parts):
                self.register_buffer(n, t.clone(), persistent=False)
            pairs: tuple[list, list] = ([], [])
        else:
            pairs = (old, list(parts))
        self._wcache = tuple(getattr(self, n) for n in _STATIC_W)
        self._wcache_version = (self.weight._version, self.weight.data_ptr())
        if not self._static_w:
            self._static_w = True
        return pairs

    # -- per optimizer step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """After an optimizer step: drop the weight cache (under ``weight_cache="step"``, rebuild the static
        copies); advance delayed scaling (and calibration). :func:`fp8_step` does this for a whole model with a
        fixed number of kernel launches."""
        _step_modules([self])
        _refresh_static_weights([self])

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear sharing this module's parameters."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = self.weight
        lin.bias = self.bias
        return lin


# ---------------------------------------------------------------------------------------------------------
# Model-level helpers
# ---------------------------------------------------------------------------------------------------------
def fp8_modules(model: nn.Module) -> dict[str, Fp8Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}


def graph_state(mods) -> tuple:
    """The layers' flags that compiled graphs specialize on and that change during training: calibrating,
    scales fixed (delayed scaling) and statistics armed. A state not seen before means the next pass compiles
    a graph variant of its own (a few seconds on a GPU, more on a CPU)."""
    return tuple((m.calibrating, m._scales_fixed, m._collect) for m in mods)


NATIVE_CHECK_TOKENS = 512


def convert_model(model: nn.Module, policy, backend: str = "auto", recipe: Fp8Recipe | None = None,
                  quiet: bool = False, options: Fp8Options | None = None) -> nn.Module:
    """Swap, in place, exactly the Linear modules ``policy.fp8_modules(model)`` names for Fp8Linear
    (sharing their weight Parameters, so optimizers built earlier stay valid). Returns the model.
    ``recipe`` and ``options`` default to the policy's (``policy.recipe``, ``policy.fp8_options``).

    ``backend``: auto | emulated | native. With native, every (recipe, shape) is self-checked against the
    emulated reference once per process; a failing shape falls back to emulated with a loud notice."""
    recipe = recipe or policy.recipe
    options = (options or getattr(policy, "fp8_options", None) or Fp8Options()).validate()
    names = policy.fp8_modules(model)
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    if dev.type == "meta":
        concrete = backend if backend in ("emulated", "native") else "emulated"
        if backend not in ("auto", "emulated", "native", "te"):
            resolve_backend(backend)
    else:
        concrete = resolve_backend(backend, dev, quiet=quiet)
    if concrete == "te":
        raise YxanulError("the te backend is not implemented in this version; use native or emulated",
                          key="fp8_backend")
    for name, prec in names.items():
        old = model.get_submodule(name)
        if isinstance(old, Fp8Linear):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        fmt = "e5m2" if prec == "fp8_e5m2" else "e4m3"
        layer_backend = concrete
        if fmt == "e5m2" and concrete == "native":  # cuBLAS has no E5M2 x E5M2 GEMM
            layer_backend = "emulated"
            if not quiet:
                print(f"yxanul: {name}: E5M2 weights and activations have no native GEMM; emulated",
                      file=sys.stderr)
        new = Fp8Linear(old.in_features, old.out_features, bias=old.bias is not None, recipe=recipe, fmt=fmt,
                        backend=layer_backend, name=name, device="meta", options=options)
        new.weight = old.weight
        new.bias = old.bias
        new._init_buffers(old.weight.device)
        setattr(parent, attr, new)
    if concrete == "native":
        for name, m in fp8_modules(model).items():
            if not native_shape_ok(m.recipe, NATIVE_CHECK_TOKENS, m.in_features, m.out_features):
                m.set_backend("emulated")
        _check_fused_shapes(model)
    _install_fused_mlps(model)
    return model


FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _check_fused_shapes(model: nn.Module) -> None:
    """Fused q/k/v and gate/up GEMMs (the model's ``fused`` projections) are wider than any one layer's, so their
    width is self-checked too, once per process like every native shape; a group whose fused GEMM disagrees
    with the emulated reference runs its layers separately (the module's ``fused`` turned off)."""
    for m in model.modules():
        if not getattr(m, "fused", False):
            continue
        for names in FUSED_GROUPS:
            mods = [getattr(m, n, None) for n in names]
            if not all(type(x) is Fp8Linear and x.bias is None for x in mods) or mods[0].backend != "native" \
                    or fp8_fusion_kind(mods) is None:
                continue
            width = sum(x.out_features for x in mods)
            if not native_shape_ok(mods[0].recipe, NATIVE_CHECK_TOKENS, mods[0].in_features, width):
                m.fused = False


def _install_fused_mlps(model: nn.Module) -> None:
    """SwiGLU MLPs (``gate_proj``, ``up_proj``, ``down_proj``, ``fp8_mlp`` and ``swiglu`` slots) whose three
    projections qualify for the whole-MLP function with the ``fused_producers`` option get it
    (yxanul.fp8.producers.can_fuse); those whose gate and up are FP8 layers of a recipe with
    ``cache_swiglu_inputs`` get the SwiGLU that keeps its inputs in FP8 (yxanul.fp8.swiglu)."""
    for m in model.modules():
        if not hasattr(type(m), "fp8_mlp"):
            continue
        gate, up, down = (getattr(m, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
        both = isinstance(gate, Fp8Linear) and isinstance(up, Fp8Linear)
        ok = both and isinstance(down, Fp8Linear) and can_fuse(gate, up, down, getattr(m, "fused", True))
        m.fp8_mlp = mlp_forward if ok else None
        cached = both and gate.recipe.cache_swiglu_inputs and up.recipe.cache_swiglu_inputs
        m.swiglu = functools.partial(swiglu_fp8_inputs, fmt=gate.spec.x.fmt, block=gate.spec.block) \
            if cached else None


def unconvert_model(model: nn.Module) -> nn.Module:
    """Replace every Fp8Linear with a plain nn.Linear sharing its parameters (in place); returns the model."""
    for name, m in list(fp8_modules(model).items()):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, m.to_linear())
    _install_fused_mlps(model)
    return model


def fp8_step(model: nn.Module, collect_stats: bool = False) -> None:
    """Call after every optimizer step: invalidates weight caches, advances delayed-scaling histories and
    calibration counters. ``collect_stats=True`` makes the next forward/backward record statistics
    (device-side) for :func:`fp8_stats`. Not between a forward pass and its backward: delayed layers save their
    scale buffers for the backward, and under ``weight_cache="step"`` every layer its weight copies, and this
    updates them in place (autograd then refuses the backward)."""
    mods = list(fp8_modules(model).values())
    _step_modules(mods)
    _arm_stats(mods, collect_stats)
    _refresh_static_weights(mods)  # after the statistics reset: a refresh records the weight's statistics


def arm_fp8_stats(model: nn.Module, collect_stats: bool = True) -> None:
    """Make the next forward/backward record statistics for :func:`fp8_stats` (or stop it), without the rest
    of :func:`fp8_step`: for the first pass of a run, which no earlier step armed."""
    _arm_stats(list(fp8_modules(model).values()), collect_stats)


def _arm_stats(mods, collect_stats: bool) -> None:
    for m in mods:
        if m._collect is not bool(collect_stats):
            m._collect = bool(collect_stats)
    if collect_stats:  # NaN until recorded, for every layer in one multi-tensor copy per device
        by_dev: dict = {}
        for m in mods:
            by_dev.setdefault(m.stats_buf.device, []).append(m.stats_buf)
        for dev, bufs in by_dev.items():
            nan = torch.full_like(bufs[0], float("nan"))
            torch._foreach_copy_(bufs, [nan] * len(bufs))


REFRESH_CHUNK_BYTES = 256 << 20  # weights stacked at once by the grouped refresh (its temporaries are ~4x this)


def _op_key(fn):
    """What an op-table entry computes, comparable across layers (each layer builds its own partials)."""
    if isinstance(fn, functools.partial):
        return (_op_key(fn.func), fn.args, tuple(sorted(fn.keywords.items())))
    return fn


def _groupable(m: Fp8Linear) -> bool:
    """Whether the grouped refresh computes exactly what ``m``'s own ``weight_quant`` / ``weight_t`` would:
    128 x 128 blocks through the layer's own quantizer, or per-tensor weights whose quantizer is marked as
    producing the reference bytes (``reference_bytes``; a quantizer registered with ``register_ops`` is not)."""
    w, g = m.weight, m.spec.w.granularity
    if m.calibrating or m._collect or w.device.type == "meta" or _is_dtensor(w) or w.dim() != 2:
        return False
    if _op_key(m.ops.weight_t) is not _weight_t_transpose:
        return False
    if g == "block":
        return w.shape[0] % m.spec.block == 0
    fn = m.ops.weight_quant
    return g == "tensor" and getattr(fn.func if isinstance(fn, functools.partial) else fn, "reference_bytes", False)


def _refresh_static_weights(mods: list[Fp8Linear]) -> None:
    """Under ``weight_cache="step"``: quantize the layers' weights into their static copies, the layers of one
    recipe, quantizer and weight shape together (:func:`_refresh_group`, in chunks of at most
    ``REFRESH_CHUNK_BYTES`` of weights), so the launches per optimizer step no longer grow layer by layer (one
    layer at a time, Yxanul-197M's refresh was about 1,800 small launches, docs/perf-notes.md). Row-scaled
    weights, layers collecting statistics, other quantizers and layers that cannot use static copies take the
    per-layer path."""
    groups: dict[tuple, list[Fp8Linear]] = {}
    for m in mods:
        if m.options.weight_cache != "step":
            continue
        w = m.weight
        key = ((m.spec, m.backend, m.options, _op_key(m.ops.weight_quant), tuple(w.shape), w.dtype, w.device)
               if _groupable(m) else ("one", id(m)))
        groups.setdefault(key, []).append(m)
    for key, ms in groups.items():
        if key[0] == "one" or len(ms) == 1:
            for m in ms:
                m.refresh_static_weight()
            continue
        per = max(1, REFRESH_CHUNK_BYTES // (ms[0].weight.numel() * ms[0].weight.element_size()))
        for i in range(0, len(ms), per):
            chunk = ms[i:i + per]
            if len(chunk) == 1:
                chunk[0].refresh_static_weight()
            else:
                _refresh_group(chunk)


@torch.no_grad()
def _refresh_group(ms: list[Fp8Linear]) -> None:
    """:meth:`Fp8Linear.refresh_static_weight` for layers of one spec and weight shape at once, bit for bit:
    the weights stacked, per-tensor scales computed for all of them in one reduction (delayed scaling: the amax
    recorded in every history, the scale from it), 128 x 128 blocks quantized as one taller weight (no block
    spans two layers), both layouts written, then one multi-tensor copy into the static buffers. Per-tensor
    weights are cast with the reference arithmetic (:func:`yxanul.fp8.backends.quant_tensor`, which the
    registered Triton quantizers match byte for byte), not through the layers' ``weight_quant``."""
    m0 = ms[0]
    G, (N, K) = len(ms), m0.weight.shape
    W = torch.stack([m.weight for m in ms])  # [G, N, K] (no_grad: no autograd history)
    if m0.spec.w.granularity == "block":
        q, s = m0.ops.weight_quant(W.view(G * N, K))
        q, s = q.view(G, N, K), s.view(G, -1, s.shape[-1])
        st = s.transpose(1, 2).contiguous()
        bad = ~torch.isfinite(s).flatten(1).all(1)
    else:
        amax = W.abs().amax(dim=(1, 2)).float()
        f = get_format(m0.spec.w.fmt)
        if m0.spec.delayed:
            torch._foreach_maximum_([m.amax_history[0, 1] for m in ms], list(amax.unbind(0)))
            s = torch.stack([m._scale_for("w", a) for a, m in zip(amax, ms)])
            bad = None  # delayed layers flag the amax they record (fp8_step)
        else:
            s = _scale_from_amax(amax, f, m0.spec.w.pow2)
            bad = ~torch.isfinite(s)
        q = _cast(W.float() / s.float().view(G, 1, 1), f)
        st = s.clone()  # a per-tensor scale is its own transpose (kept a distinct tensor, as the layer does)
    qt = q.transpose(1, 2).contiguous()
    if bad is not None:
        torch._foreach_add_([m.nonfinite[1] for m in ms], list(bad.to(torch.int32).unbind(0)))
    dst, src = [], []
    for m, parts in zip(ms, zip(q.unbind(0), s.unbind(0), qt.unbind(0), st.unbind(0))):
        d, t = m._adopt_static(parts)
        dst += d
        src += t
    if dst:
        torch._foreach_copy_(dst, src)


_FMT_MAX_CACHE: dict = {}


def _step_modules(mods: list[Fp8Linear]) -> None:
    """Invalidate the weight caches; advance the delayed-scaling state of all delayed layers, grouped by the
    settings that enter the update, in a few batched launches."""
    groups: dict[tuple, list[Fp8Linear]] = {}
    for m in mods:
        m.invalidate()
        if m.spec.delayed:
            r = m.recipe
            key = (r.amax_compute_algo, r.margin, r.pow2_scales, r.amax_history_len, tuple(m._fmt_max),
                   m.scale_inv.device)
            groups.setdefault(key, []).append(m)
    for (algo, margin, pow2, _, fmax, dev), ms in groups.items():
        fkey = (fmax, dev)
        if fkey not in _FMT_MAX_CACHE:
            _FMT_MAX_CACHE[fkey] = torch.tensor(fmax, dtype=torch.float32, device=dev)
        with torch.no_grad():  # the step's non-finite amaxes become flags before the history rolls them away
            torch._foreach_add_([m.nonfinite for m in ms], list(_pending_nonfinite(ms).unbind(0)))
        scaling.advance_many([m.amax_history for m in ms], [m.scale_inv for m in ms], [m.scale_ready for m in ms],
                             algo, _FMT_MAX_CACHE[fkey], margin, pow2)
        _sync_slot_scales(ms)
        with torch.no_grad():
            torch._foreach_add_([m.fp8_steps for m in ms], 1)
        for m in ms:
            m.__dict__["_steps"] += 1  # a plain int: nn.Module.__setattr__'s checks cost more than the step
            m._sync_calibrating()
    # which delayed layers now have every scale: one host sync per device, and only while some layer lacks one
    # (normally after the first step). In a layer that has run (some operand has a scale), an operand whose
    # history stayed zero for a whole history window (an output whose gradient is always zero) keeps its scale,
    # 1 unless set, as Transformer Engine does; the layer then stops waiting (and costing this sync every step).
    # A later nonzero amax updates that scale at the next step. A layer that never ran keeps waiting: its first
    # step then scales every operand by its current amax.
    pending: dict = {}
    for ms in groups.values():
        for m in ms:
            if not m._scales_fixed and not m.calibrating:  # calibrating layers scale by the current amax
                pending.setdefault(m.scale_ready.device, []).append(m)
    for ms in pending.values():
        flags = torch.stack([torch.stack([m.scale_ready.all(), m.scale_ready.any()]) for m in ms]).tolist()
        for m, (ready, ran) in zip(ms, flags):
            if not ready and ran and m._steps >= m.recipe.calibration_steps + m.recipe.amax_history_len:
                with torch.no_grad():
                    m.scale_ready.fill_(1)
                ready = True
            m._scales_fixed = bool(ready)


def _pending_nonfinite(ms: list[Fp8Linear]) -> torch.Tensor:
    """[len(ms), 3] int32: 1 where a delayed layer's current amax row holds a NaN/Inf (a non-finite operand
    this step, not yet folded into ``nonfinite`` by fp8_step)."""
    return (~torch.isfinite(torch.stack([m.amax_history[0] for m in ms]))).to(torch.int32)


@torch.no_grad()
def _sync_slot_scales(ms: list[Fp8Linear]) -> None:
    """Copy each delayed layer's scale_inv[i] into its 0-d scale_inv_{x,w,dy} buffers (one multi-tensor copy)."""
    dst = [getattr(m, f"scale_inv_{w}") for m in ms for w in _SLOT]
    if dst:  # one stack and one unbind (C++) rather than a Python-level select per scale
        torch._foreach_copy_(dst, list(torch.stack([m.scale_inv for m in ms]).reshape(-1).unbind(0)))


def fp8_check(model: nn.Module) -> None:
    """Raise NonFiniteError naming every module that quantized a NaN/Inf since the last reset."""
    bad = _nonfinite(model)
    if bad:
        raise NonFiniteError("NaN or Inf in FP8 operands: " + ", ".join(f"{n} ({'/'.join(w)})" for n, w in bad.items()))


def _nonfinite(model: nn.Module) -> dict[str, list[str]]:
    mods = fp8_modules(model)
    if not mods:
        return {}
    flags = torch.stack([(m.nonfinite + _pending_nonfinite([m])[0] if m.spec.delayed else m.nonfinite)
                         .to("cpu", non_blocking=False) for m in mods.values()]).tolist()
    return {n: [s for s, f in zip(("x", "w", "dy"), fl) if f] for n, fl in zip(mods, flags) if any(fl)}


def reset_nonfinite(model: nn.Module) -> None:
    for m in fp8_modules(model).values():
        m.nonfinite.zero_()


def fp8_stats(model: nn.Module) -> dict:
    """Per-module and aggregate FP8 statistics (one host sync). Weight statistics are computed now;
    activation (x) and output-grad (dy) statistics come from the last pass armed with
    ``fp8_step(model, collect_stats=True)``. ``saturation`` is the fraction of elements at the format's
    largest value, ``underflow`` the fraction of nonzero elements that became zero."""
    mods = fp8_modules(model)
    out: dict = {"modules": {}, "aggregate": {}, "nonfinite": _nonfinite(model)}
    for name, m in mods.items():
        rows = m.stats_buf.tolist()
        if m._collect is False or math.isnan(rows[_SLOT["w"]][0]):
            with torch.no_grad():
                w = m.weight.detach()
                if m.spec.delayed:
                    q, s = m.ops.weight_quant(w, scale_inv=m._scale_for("w", w.abs().amax()))
                else:
                    q, s = m.ops.weight_quant(w)
                m._record_stats("w", w, q, s)
            rows[_SLOT["w"]] = m.stats_buf[_SLOT["w"]].tolist()
        entry = {}
        for which, i in _SLOT.items():
            if not math.isnan(rows[i][0]):
                entry[which] = dict(zip(_STAT_KEYS, (float(v) for v in rows[i])))
        if m.spec.delayed:
            entry["delayed"] = {"scale_inv": m.scale_inv.tolist(), "ready": m.scale_ready.tolist(),
                                "steps": int(m.fp8_steps), "calibrating": m.calibrating}
        out["modules"][name] = entry
    for which in ("x", "w", "dy"):
        vals = [e[which] for e in out["modules"].values() if which in e]
        if vals:
            out["aggregate"][which] = {"amax": max(v["amax"] for v in vals),
                                       "saturation": sum(v["saturation"] for v in vals) / len(vals),
                                       "underflow": sum(v["underflow"] for v in vals) / len(vals)}
    return out
