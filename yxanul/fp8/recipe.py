"""FP8 scaling recipes as data (the policy YAML's ``recipe:`` section).

``blockwise``  DeepSeek-V3 online scaling: activations and output grads in 1 x block tiles along the
               reduction dim, weights in block x block tiles, E4M3 everywhere, FP32 scales.
``tensorwise`` current per-tensor scaling (amax of this step's tensor).
``rowwise``    current per-row scaling (one scale per token row / weight output row).
``delayed``    Transformer Engine's delayed scaling: per-tensor scales from an amax history of previous
               steps: ``scale_inv = amax_hist / (FMT_MAX * 2**-margin)`` where amax_hist is the history's max
               (``amax_compute_algo: max``) or its latest entry (``most_recent``). The first
               ``calibration_steps`` optimizer steps run in BF16 while the history is recorded.

``fp8_format``: ``e4m3`` (all tensors E4M3) or ``hybrid`` (E4M3 forward, E5M2 for output gradients).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import YxanulError

RECIPES = ("blockwise", "tensorwise", "rowwise", "delayed")


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
        if self.amax_history_len < 1:
            raise YxanulError("must be >= 1", source=source, key="recipe.amax_history_len")
        if self.amax_compute_algo not in ("max", "most_recent"):
            raise YxanulError(f"expected max or most_recent, got {self.amax_compute_algo!r}",
                              source=source, key="recipe.amax_compute_algo")
        if self.calibration_steps < 0:
            raise YxanulError("must be >= 0", source=source, key="recipe.calibration_steps")
        return self

    @property
    def grad_format(self) -> str:
        return "e5m2" if self.fp8_format == "hybrid" else "e4m3"

    def granularity(self) -> str:
        b = self.block_size
        return {"blockwise": f"act 1x{b}, weight {b}x{b}", "tensorwise": "per-tensor (current)",
                "rowwise": "per-row (current)",
                "delayed": f"per-tensor (delayed, history {self.amax_history_len})"}[self.name]
