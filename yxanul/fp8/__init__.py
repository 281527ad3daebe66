"""Fine-grained FP8: formats, tile/block quantization, recipes, FP8 linear layers."""
from .formats import FORMATS, Fp8Format, get_format
from .quant import dequantize, quantize, scale_shape

__all__ = ["FORMATS", "Fp8Format", "get_format", "quantize", "dequantize", "scale_shape"]
