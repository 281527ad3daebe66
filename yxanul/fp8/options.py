"""How the FP8 layers compute, as opposed to what (the recipe): implementation choices that leave the numbers
unchanged or change them only within the recipe's own rounding (``fused_tensor_projections`` and
``fprop_fast_accum`` excepted, below).

``kernels``       ``auto`` (the Triton quantizers where Triton runs on a CUDA device, the pure-torch ones
                  elsewhere), ``triton`` (always the Triton quantizers: an error where they cannot run; on a
                  CPU they run under ``TRITON_INTERPRET=1``) or ``torch`` (always the pure-torch quantizers)
``weight_cache``  where compiled forwards get the FP8 weight copies: ``graph`` quantizes the weight inside the
                  compiled graph at every forward; ``step`` reads static copies that ``fp8_step`` quantizes
                  once per optimizer step (fewer quantizations with gradient accumulation; eager launches in
                  their place, a few per distinct weight shape)
``fused_producers``
                  FP8 operands written by the kernels that produce them (:mod:`yxanul.fp8.producers`): the SwiGLU
                  MLP as one function whose SwiGLU kernels write h and the gate/up output gradients in FP8, both
                  GEMM layouts (delayed scaling and the blockwise recipe), and for the blockwise recipe the
                  RMSNorms writing the q/k/v and gate/up inputs only as FP8 tiles. Measured no faster than the
                  unfused layers; for blockwise, less peak memory (docs/benchmarks.md, "FP8 options")
``fused_tensor_projections``
                  q/k/v and gate/up of the per-tensor recipes (tensorwise, delayed) as one GEMM each, the group's
                  operands with one scale each, kept by its first layer (``q_proj``, ``gate_proj``), as Transformer
                  Engine scales a fused QKV weight; the other layers' delayed states are then not updated. The
                  values change only where a shared scale moves some of them into FP8's subnormal range
``fprop_fast_accum``
                  the forward GEMM (x @ w.T) of per-tensor and row-scaled recipes with cuBLAS's fast FP8
                  accumulation (``use_fast_accum``: no periodic promotion of the tensor cores' partial sums to
                  FP32), as torchao's default recipe does; the backward GEMMs, whose K is up to the batch's token
                  count, and every blockwise GEMM keep the promoted accumulation DeepSeek-V3 prescribes. Native
                  backend only (the emulated reference accumulates in FP32). This one changes the numbers beyond
                  the recipe's rounding: check loss parity before relying on it

docs/perf-notes.md records how each choice measured.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import YxanulError

KERNEL_IMPLS = ("auto", "triton", "torch")
WEIGHT_CACHE_MODES = ("graph", "step")


@dataclass(frozen=True)
class Fp8Options:
    kernels: str = "auto"
    weight_cache: str = "graph"
    fused_producers: bool = False
    fused_tensor_projections: bool = False
    fprop_fast_accum: bool = False

    def validate(self, source: str = "fp8 options") -> "Fp8Options":
        for key, choices in (("kernels", KERNEL_IMPLS), ("weight_cache", WEIGHT_CACHE_MODES)):
            v = getattr(self, key)
            if v not in choices:
                raise YxanulError(f"must be one of {', '.join(choices)}, got {v!r}", source=source,
                                  key=f"fp8_{key}")
        for key in ("fused_producers", "fused_tensor_projections", "fprop_fast_accum"):
            if not isinstance(getattr(self, key), bool):
                raise YxanulError(f"must be true or false, got {getattr(self, key)!r}", source=source,
                                  key=f"fp8_{key}")
        return self

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
