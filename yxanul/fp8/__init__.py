"""Fine-grained FP8: formats, tile/block quantization, recipes, FP8 linear layers."""
from .formats import FORMATS, Fp8Format, get_format
from .quant import dequantize, quantize, scale_shape

__all__ = ["FORMATS", "Fp8Format", "get_format", "quantize", "dequantize", "scale_shape"]

# FP8 linear layers and backends
from .backends import Fp8Ops, get_ops, register_ops, selfcheck  # noqa: E402
from .linear import Fp8Linear, convert_model, fp8_check, fp8_stats, fp8_step, unconvert_model  # noqa: E402

__all__ += ["Fp8Linear", "convert_model", "unconvert_model", "fp8_step", "fp8_stats", "fp8_check",
            "Fp8Ops", "get_ops", "register_ops", "selfcheck", "check_env_switches"]


def check_env_switches() -> None:
    """Read every FP8 environment switch once, so that a bad value is an error before any work starts (some are
    otherwise only read inside a forward pass)."""
    from ..kernels import tensor_path
    from .backends import amax_layout, block_path
    from .fused_mlp import fused_swiglu_enabled
    from .linear import weight_cache_mode
    amax_layout(), block_path(), fused_swiglu_enabled(), tensor_path(), weight_cache_mode()
