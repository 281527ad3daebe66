"""FP8 formats: dtypes, largest finite values, power-of-two scale rounding."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import YxanulError


@dataclass(frozen=True)
class Fp8Format:
    name: str
    dtype: torch.dtype
    max: float          # largest finite value
    safetensors: str    # dtype string in safetensors headers


FORMATS: dict[str, Fp8Format] = {
    "e4m3": Fp8Format("e4m3", torch.float8_e4m3fn, 448.0, "F8_E4M3"),
    "e5m2": Fp8Format("e5m2", torch.float8_e5m2, 57344.0, "F8_E5M2"),
}

_ALIASES = {"e4m3": "e4m3", "fp8_e4m3": "e4m3", "float8_e4m3fn": "e4m3", "f8_e4m3": "e4m3",
            "e5m2": "e5m2", "fp8_e5m2": "e5m2", "float8_e5m2": "e5m2", "f8_e5m2": "e5m2"}


def get_format(name: str | Fp8Format) -> Fp8Format:
    if isinstance(name, Fp8Format):
        return name
    key = _ALIASES.get(str(name).lower())
    if key is None:
        raise YxanulError(f"unknown FP8 format {name!r} (expected e4m3 or e5m2)", key="fmt")
    return FORMATS[key]


def pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """Round positive values up to the next power of two (DeepSeek V3.1's ue8m0 scales)."""
    # on the float bits (frexp), not log2: log2 of a value just above a power of two can round to an integer
    m, e = torch.frexp(x)
    out = torch.ldexp(torch.ones_like(x), torch.where(m == 0.5, e - 1, e))
    return torch.where(torch.isfinite(x), out, x)  # NaN/Inf stay visible to the non-finite checks
