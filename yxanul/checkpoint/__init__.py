"""Checkpoint tools: validated safetensors headers, precision analysis, FP8 block conversion.

Submodules: ``safetensors_header`` (bounded header/index parsing), ``analyze`` (precision distribution from
headers), ``convert`` (``quantize_checkpoint`` / ``dequantize_checkpoint``); training checkpoints: ``training``
(the trainer's save/restore, single-file format), ``sharded`` (DCP format, consolidation), ``layout`` (folders,
``latest``, recorded file hashes).
"""
from .safetensors_header import (Checkpoint, SafetensorsHeader, SafetensorsIndex, TensorInfo, collect,
                                 open_checkpoint, read_header, read_index)

__all__ = ["Checkpoint", "SafetensorsHeader", "SafetensorsIndex", "TensorInfo", "collect", "open_checkpoint",
           "read_header", "read_index", "analyze_checkpoint", "quantize_checkpoint", "dequantize_checkpoint"]


def analyze_checkpoint(path):
    """See :func:`yxanul.checkpoint.analyze.analyze`."""
    from .analyze import analyze as _analyze
    return _analyze(path)


def quantize_checkpoint(*args, **kwargs):
    """See :func:`yxanul.checkpoint.convert.quantize_checkpoint`."""
    from .convert import quantize_checkpoint as _q
    return _q(*args, **kwargs)


def dequantize_checkpoint(*args, **kwargs):
    """See :func:`yxanul.checkpoint.convert.dequantize_checkpoint`."""
    from .convert import dequantize_checkpoint as _d
    return _d(*args, **kwargs)
