"""Fine-grained FP8: formats, tile/block quantization, recipes, FP8 linear layers.

Implementations of the quantizers beyond the pure-torch references live in :mod:`yxanul.kernels`, which
registers them into :mod:`yxanul.fp8.registry` when imported; this package never imports it.
"""
from .backends import Fp8Ops, build_ops, get_ops, register_ops, selfcheck
from .formats import FORMATS, Fp8Format, get_format
from .linear import Fp8Linear, convert_model, fp8_check, fp8_stats, fp8_step, unconvert_model
from .options import Fp8Options
from .quant import dequantize, quantize, scale_shape
from .recipe import Fp8Recipe, Fp8Spec, OperandSpec, resolve

__all__ = ["FORMATS", "Fp8Format", "get_format", "quantize", "dequantize", "scale_shape",
           "Fp8Recipe", "Fp8Spec", "OperandSpec", "resolve", "Fp8Options",
           "Fp8Linear", "convert_model", "unconvert_model", "fp8_step", "fp8_stats", "fp8_check",
           "Fp8Ops", "build_ops", "get_ops", "register_ops", "selfcheck"]
