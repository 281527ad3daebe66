"""Benchmarks: training throughput per precision mode (:mod:`yxanul.bench.throughput`).

The mode names live here (no torch import) so the command line can list them cheaply.
"""

MODES = ("bf16-plain", "bf16", "fp8", "fp8-blockwise", "fp8-tensorwise", "fp8-rowwise", "fp8-delayed", "fp8-head",
         "torchao-tensorwise", "torchao-rowwise")
DEFAULT_MODES = ("bf16-plain", "bf16", "fp8", "fp8-blockwise", "fp8-tensorwise", "fp8-delayed", "fp8-head",
                 "torchao-tensorwise", "torchao-rowwise")
