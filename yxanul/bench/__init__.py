"""Benchmarks: training throughput per precision mode (:mod:`yxanul.bench.throughput`).

The mode names and the FP8 option flags live here (no torch import) so the command line can list them cheaply.
"""

MODES = ("bf16-plain", "bf16", "fp8", "fp8-blockwise", "fp8-tensorwise", "fp8-rowwise", "fp8-delayed", "fp8-head",
         "torchao-tensorwise", "torchao-rowwise")
DEFAULT_MODES = ("bf16-plain", "bf16", "fp8", "fp8-blockwise", "fp8-tensorwise", "fp8-delayed", "fp8-head",
                 "torchao-tensorwise", "torchao-rowwise")
# FP8 options (Fp8Options fields) that both benchmarks take as on/off flags; bench quality switches them on for its
# FP8 branches and records them in its result
FP8_OPTION_FLAGS = ("fprop_fast_accum", "fused_producers", "fused_tensor_projections")
