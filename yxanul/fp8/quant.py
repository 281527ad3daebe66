"""Tile and block FP8 quantization in DeepSeek-V3's convention (pure torch, vectorized).

For each tile: ``scale_inv = amax / FMT_MAX``, ``q = cast(x / scale_inv)``, ``x ~= q.float() * scale_inv``.
Scales are FP32 with shape ``[ceil(rows / br), ceil(cols / bc)]``: a partial edge tile gets its own scale
and no padding is stored.

Tile specs:
  ``(1, 128)``   activation tiles: one scale per row per 128 columns (the reduction dim is the last dim)
  ``(128, 128)`` weight blocks
  ``(br, bc)``   any positive block shape
  ``"row"``      one scale per row (shape ``[rows, 1]``)
  ``"tensor"``   one scale for the whole tensor (shape ``[]``)

Tensors with more than two dims are treated as ``[prod(leading dims), last dim]`` for row-like tiles
(``(1, bc)``, ``"row"``, ``"tensor"``); 2-D blocks need a 2-D tensor.

Non-finite input: by default a NaN or Inf raises :class:`NonFiniteError` (it would otherwise poison a whole
tile's scale); ``nonfinite="propagate"`` skips the check (no host sync) and lets NaN flow into the output.

All-zero tiles: amax is clamped to ``AMAX_EPS`` so the scale is finite and the tile quantizes to exact zeros.
"""
from __future__ import annotations

import math

import torch

from ..errors import NonFiniteError, YxanulError
from .formats import Fp8Format, get_format, pow2_ceil

AMAX_EPS = 1e-12
Tile = tuple[int, int] | str


def _block(tile: Tile, shape: tuple[int, ...]) -> tuple[int, int]:
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    cols = shape[-1] if shape else 1
    if tile == "tensor":
        return max(rows, 1), max(cols, 1)
    if tile == "row":
        return 1, max(cols, 1)
    if isinstance(tile, (tuple, list)) and len(tile) == 2 and all(isinstance(t, int) and t > 0 for t in tile):
        br, bc = int(tile[0]), int(tile[1])
        if br != 1 and len(shape) != 2:
            raise YxanulError(f"block tile {tuple(tile)} needs a 2-D tensor, got shape {tuple(shape)}", key="tile")
        return br, bc
    raise YxanulError(f"unknown tile spec {tile!r} (expected (1,128), (128,128), (br,bc), 'row' or 'tensor')",
                      key="tile")


def scale_shape(shape: tuple[int, ...], tile: Tile) -> tuple[int, ...]:
    """Shape of the scale tensor for a tensor of `shape` quantized with `tile`."""
    if tile == "tensor":
        return ()
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    br, bc = _block(tile, tuple(shape))
    return (-(-rows // br), -(-shape[-1] // bc))


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x


def tile_amax(x2: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    """Per-tile max |x| of a 2-D tensor, shape [ceil(R/br), ceil(C/bc)], FP32."""
    R, C = x2.shape
    pr, pc = (-R) % br, (-C) % bc
    a = x2.float().abs()
    if pr or pc:
        a = torch.nn.functional.pad(a, (0, pc, 0, pr))
    return a.view((R + pr) // br, br, (C + pc) // bc, bc).amax(dim=(1, 3))


def expand_scales(s: torch.Tensor, br: int, bc: int, R: int, C: int) -> torch.Tensor:
    """Broadcast a [ceil(R/br), ceil(C/bc)] tile tensor back to [R, C]."""
    return s.repeat_interleave(br, 0)[:R].repeat_interleave(bc, 1)[:, :C]


def compute_scale_inv(amax: torch.Tensor, fmt: Fp8Format, pow2_scales: bool = False) -> torch.Tensor:
    s = amax.float().clamp_min(AMAX_EPS) / fmt.max
    return pow2_ceil(s) if pow2_scales else s


def quantize(x: torch.Tensor, tile: Tile = (1, 128), fmt: str | Fp8Format = "e4m3", pow2_scales: bool = False,
             nonfinite: str = "raise", name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `x` tile by tile. Returns ``(q, scale_inv)`` with q in the FP8 dtype and x's shape."""
    f = get_format(fmt)
    if nonfinite not in ("raise", "propagate"):
        raise YxanulError(f"nonfinite must be 'raise' or 'propagate', got {nonfinite!r}")
    if not x.is_floating_point():
        raise YxanulError(f"cannot quantize a {x.dtype} tensor", key=name)
    if x.dim() == 0:
        x = x.reshape(1)
    if x.numel() == 0:
        f0 = get_format(fmt)
        return torch.empty(x.shape, dtype=f0.dtype, device=x.device), \
            torch.ones(scale_shape(tuple(x.shape), tile), dtype=torch.float32, device=x.device)
    shape = tuple(x.shape)
    br, bc = _block(tile, shape)
    x2 = _as_2d(x)
    R, C = x2.shape
    amax = tile_amax(x2, br, bc)
    if nonfinite == "raise" and not bool(torch.isfinite(amax).all()):
        where = f" in {name}" if name else ""
        raise NonFiniteError(f"NaN or Inf in the input{where}; refusing to quantize")
    scale_inv = compute_scale_inv(amax, f, pow2_scales)
    y = x2.float() / expand_scales(scale_inv, br, bc, R, C)
    q = y.clamp(-f.max, f.max).to(f.dtype).view(shape)
    return q, scale_inv.reshape(scale_shape(shape, tile))


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, tile: Tile = (1, 128),
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``q.float() * scale_inv`` per tile."""
    shape = tuple(q.shape)
    br, bc = _block(tile, shape)
    expected = scale_shape(shape, tile)
    if tuple(scale_inv.shape) != tuple(expected):
        raise YxanulError(f"scale shape {tuple(scale_inv.shape)} does not match weight {shape} "
                          f"with tile {tile} (expected {tuple(expected)})", key="scale_inv")
    q2 = _as_2d(q)
    R, C = q2.shape
    s = scale_inv.float().reshape(-(-R // br), -(-C // bc))
    return (q2.float() * expand_scales(s, br, bc, R, C)).to(dtype).view(shape)


def fake_quantize(x: torch.Tensor, tile: Tile = (1, 128), fmt: str | Fp8Format = "e4m3",
                  pow2_scales: bool = False, nonfinite: str = "propagate") -> torch.Tensor:
    """quantize -> dequantize in one call (FP32 result): the emulated FP8 numerics."""
    q, s = quantize(x, tile, fmt, pow2_scales, nonfinite)
    return dequantize(q, s, tile)
