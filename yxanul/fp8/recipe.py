"""FP8 scaling recipes as data (the policy YAML's ``recipe:`` section).

``blockwise``  DeepSeek-V3 online scaling: activations and output grads in 1 x block tiles along the
               reduction dim, weights in block x block tiles, E4M3 everywhere, FP32 scales.
``tensorwise`` current per-tensor scaling (amax of this step's tensor).
``rowwise``    current per-row scaling (one scale per token row / weight output row).
``delayed``    Transformer Engine's delayed scaling: per-tensor scales from an amax history of previous
               steps: ``scale_inv = amax_hist / (FMT_MAX * 2**-margin)`` where amax_hist is the history's max
               (``amax_compute_algo: max``) or its latest entry (``most_recent``). The first
               ``calibration_steps`` optimizer steps scale by the current amax (as ``tensorwise``) while the
               history is recorded.

``fp8_format``: ``e4m3`` (all tensors E4M3) or ``hybrid`` (E4M3 forward, E5M2 for output gradients).

``cache_fp8_activations``: linears keep their wgrad operand (the input, transposed and quantized) instead of the
BF16 input; the same numbers. ``cache_swiglu_inputs``: an MLP whose gate and up projections are FP8 keeps the
SwiGLU's inputs for its backward as FP8 1 x ``block_size`` tiles instead of BF16 (DeepSeek-V3's choice;
:mod:`yxanul.fp8.swiglu`): less memory, and the SwiGLU gradients carry the FP8 rounding of its inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import YxanulError
from .formats import get_format

RECIPES = ("blockwise", "tensorwise", "rowwise", "delayed")


MAX_AMAX_HISTORY = 4096  # Transformer Engine's histories are at most about a thousand steps
MAX_MARGIN = 32  # 2**-32 below the format's range: every value would flush to zero long before


@dataclass(frozen=True)
class Fp8Recipe:
    name: str = "blockwise"
    fp8_format: str = "e4m3"
    block_size: int = 128
    pow2_scales: bool = False
    margin: int = 0
    amax_history_len: int = 16
    amax_compute_algo: str = "max"
    calibration_steps: int = 0
    cache_fp8_activations: bool = False
    cache_swiglu_inputs: bool = False

    def validate(self, source: str = "recipe") -> "Fp8Recipe":
        if self.name not in RECIPES:
            raise YxanulError(f"unknown recipe {self.name!r} (expected one of: {', '.join(RECIPES)})",
                              source=source, key="recipe.name")
        if self.fp8_format not in ("e4m3", "hybrid"):
            raise YxanulError(f"unknown fp8_format {self.fp8_format!r} (expected e4m3 or hybrid)",
                              source=source, key="recipe.fp8_format")
        if self.block_size <= 0 or self.block_size % 16:
            raise YxanulError(f"must be a positive multiple of 16, got {self.block_size}",
                              source=source, key="recipe.block_size")
        if not 1 <= self.amax_history_len <= MAX_AMAX_HISTORY:
            raise YxanulError(f"must be in [1, {MAX_AMAX_HISTORY}], got {self.amax_history_len}", source=source,
                              key="recipe.amax_history_len")
        if not 0 <= self.margin <= MAX_MARGIN:
            raise YxanulError(f"must be in [0, {MAX_MARGIN}] (scales are divided by 2**margin), got {self.margin}",
                              source=source, key="recipe.margin")
        if self.amax_compute_algo not in ("max", "most_recent"):
            raise YxanulError(f"expected max or most_recent, got {self.amax_compute_algo!r}",
                              source=source, key="recipe.amax_compute_algo")
        if self.calibration_steps < 0:
            raise YxanulError("must be >= 0", source=source, key="recipe.calibration_steps")
        for key in ("pow2_scales", "cache_fp8_activations", "cache_swiglu_inputs"):
            if not isinstance(getattr(self, key), bool):
                raise YxanulError(f"must be true or false, got {getattr(self, key)!r}", source=source,
                                  key=f"recipe.{key}")
        return self

    @property
    def grad_format(self) -> str:
        return "e5m2" if self.fp8_format == "hybrid" else "e4m3"

    def granularity(self) -> str:
        """A one-line description of the scaling, for reports."""
        spec = resolve(self)
        if spec.delayed:
            return f"per-tensor (delayed, history {self.amax_history_len})"
        if spec.x.granularity == spec.w.granularity:
            return f"per-{spec.x.granularity} (current)"
        return f"act {spec.x.label}, weight {spec.w.label}"


# ---------------------------------------------------------------------------------------------------------
# The resolved recipe: what each GEMM operand is scaled with
# ---------------------------------------------------------------------------------------------------------
# Granularity of one operand's scales, along its rows [R, C] (C the GEMM's reduction dim):
#   tensor  one scale                      shape []
#   row     one scale per row              shape [R, 1]
#   tile    one per row per `block` cols   shape [R, ceil(C/block)]   (1 x 128 in DeepSeek-V3)
#   block   one per block x block block    shape [ceil(R/block), ceil(C/block)]   (128 x 128)
GRANULARITIES = ("tensor", "row", "tile", "block")


@dataclass(frozen=True)
class OperandSpec:
    """How one GEMM operand (x, w or dy) is quantized."""
    granularity: str
    fmt: str            # e4m3 | e5m2
    block: int = 128
    pow2: bool = False  # scales rounded up to powers of two
    delayed: bool = False  # scale from the amax history (else from this tensor's current amax)
    margin: int = 0     # delayed only: scale = amax / (FMT_MAX / 2**margin)

    @property
    def label(self) -> str:
        b = self.block
        return {"tensor": "tensor", "row": "row", "tile": f"1x{b}", "block": f"{b}x{b}"}[self.granularity]


@dataclass(frozen=True)
class Fp8Spec:
    """A recipe resolved for one layer format: the per-operand specs and the delayed-scaling settings. Built by
    :func:`resolve` only; code after it reads these fields, never the recipe's name."""
    x: OperandSpec
    w: OperandSpec
    dy: OperandSpec
    recipe: Fp8Recipe

    @property
    def delayed(self) -> bool:
        return self.x.delayed

    @property
    def per_tensor(self) -> bool:
        """One scale per tensor for every operand (a transposed copy then keeps the scale)."""
        return all(o.granularity == "tensor" for o in (self.x, self.w, self.dy))

    @property
    def block(self) -> int:
        return self.recipe.block_size

    @property
    def operand_formats(self) -> tuple[str, str, str]:
        return self.x.fmt, self.w.fmt, self.dy.fmt

    def gemm_granularity(self, op: str) -> tuple[str, str]:
        """(a, b) granularities of one of the layer's GEMMs: fprop x @ w.T, dgrad dy @ (w.T).T, wgrad dy.T @ x.T.
        In wgrad both operands are the transposed activations, tiled along the token dim."""
        return {"fprop": (self.x.granularity, self.w.granularity),
                "dgrad": (self.dy.granularity, self.w.granularity),
                "wgrad": (self.dy.granularity, self.x.granularity)}[op]


# recipe name -> (x, w, dy) granularity, delayed
_LAYOUTS = {"blockwise": (("tile", "block", "tile"), False),
            "tensorwise": (("tensor", "tensor", "tensor"), False),
            "rowwise": (("row", "row", "row"), False),
            "delayed": (("tensor", "tensor", "tensor"), True)}


def resolve(recipe: Fp8Recipe, fmt: str = "e4m3") -> Fp8Spec:
    """The recipe as per-operand specs for a layer whose forward format is `fmt` (e4m3 or e5m2): output
    gradients take E5M2 under ``fp8_format: hybrid``, the forward format otherwise."""
    recipe = recipe.validate()
    f = get_format(fmt).name
    g = "e5m2" if recipe.fp8_format == "hybrid" else f
    (gx, gw, gdy), delayed = _LAYOUTS[recipe.name]
    common = dict(block=recipe.block_size, pow2=recipe.pow2_scales, delayed=delayed,
                  margin=recipe.margin if delayed else 0)
    return Fp8Spec(OperandSpec(gx, f, **common), OperandSpec(gw, f, **common), OperandSpec(gdy, g, **common),
                   recipe)
