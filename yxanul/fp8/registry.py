"""Where faster implementations plug into the FP8 layers.

This package owns the registry and never imports an implementation: :mod:`yxanul.kernels` registers its Triton
quantizers and fused kernels here when it is imported (the training, benchmark and self-check layers import
it before building FP8 models). Without a registration the layers use their pure-torch reference ops.

``quantizers``  a function ``(spec, impl) -> {op name: callable}`` giving fused quantizers for a resolved recipe
                (:class:`~yxanul.fp8.recipe.Fp8Spec`), ``impl`` None (the provider chooses by device) or
                ``"triton"`` (always its kernels); the op names are :class:`~yxanul.fp8.backends.Fp8Ops` fields
``kernels``     named fused kernels with a reference fallback, e.g. ``swiglu_bwd_quant``
"""
from __future__ import annotations

from typing import Callable

_QUANTIZERS: list[Callable] = []
_KERNELS: dict[str, Callable] = {}


def register_quantizers(provider: Callable) -> None:
    """Install the quantizer provider (replacing an earlier one)."""
    _QUANTIZERS[:] = [provider]


def quantizers_available() -> bool:
    return bool(_QUANTIZERS)


def quantizer_overrides(spec, impl: str | None) -> dict[str, Callable]:
    return dict(_QUANTIZERS[0](spec, impl)) if _QUANTIZERS else {}


def register_kernel(name: str, fn: Callable) -> None:
    _KERNELS[name] = fn


def kernel(name: str, default: Callable) -> Callable:
    """The registered kernel `name`, or `default` (the reference) when none is registered."""
    return _KERNELS.get(name, default)
