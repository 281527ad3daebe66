"""Tests of the tile/block FP8 quantization library (yxanul.fp8.quant).

Error bounds used below, per element, for a tile with scale ``s = amax / FMT_MAX``:

* E4M3 has 3 explicit mantissa bits, so round-to-nearest has relative error <= 2**-4 for values whose scaled
  magnitude |x|/s lies in the normal range [2**-6, 448]. Below it (subnormals, spacing 2**-9) the absolute error
  of the scaled value is <= 2**-10, i.e. <= 2**-10 * s in the original units.
* E5M2 has 2 mantissa bits: relative error <= 2**-3 over normals [2**-14, 57344]; subnormal spacing 2**-16, so
  absolute error <= 2**-17 * s.
* Because amax maps to FMT_MAX, no element saturates; the only extra error is FP32 rounding of x / s and q * s
  (relative ~2**-24 each), covered by a 1e-6 relative slack.

So ``|x - deq(q)| <= max(rel * |x|, sub * s) * (1 + 1e-6)`` holds for every element, on any data — normal or
heavy-tailed. Heavy tails only move more elements into the subnormal branch, which is why fine-grained tiles
beat one scale per tensor on such data (tested below).
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from yxanul.errors import NonFiniteError, YxanulError
from yxanul.fp8.formats import get_format
from yxanul.fp8.quant import dequantize, expand_scales, fake_quantize, quantize, scale_shape

BOUNDS = {"e4m3": (2.0 ** -4, 2.0 ** -10), "e5m2": (2.0 ** -3, 2.0 ** -17)}
TILES = [(1, 128), (128, 128), (32, 64), "row", "tensor"]


def _data(kind: str, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(shape, generator=g)
    # heavy-tailed: Student-t with 1.5 degrees of freedom (infinite variance) times a per-row log-normal factor
    z = torch.randn(shape, generator=g)
    chi = torch.distributions.Chi2(torch.tensor(1.5)).sample(shape)
    t = z / torch.sqrt(chi / 1.5)
    return t * torch.exp(2.0 * torch.randn(shape[0], 1, generator=g))


def _block(tile, shape):
    R = math.prod(shape[:-1])
    C = shape[-1]
    return {"row": (1, C), "tensor": (R, C)}.get(tile, tile)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("tile", TILES, ids=str)
@pytest.mark.parametrize("kind", ["normal", "heavy"])
def test_round_trip_elementwise_bound(fmt, tile, kind):
    shape = (200, 300)  # partial tiles on both axes for every block shape
    x = _data(kind, shape, seed=zlib.crc32(f"{fmt}{tile}{kind}".encode()) % 1000)
    q, s = quantize(x, tile, fmt)
    assert q.dtype == get_format(fmt).dtype and s.dtype == torch.float32
    assert tuple(s.shape) == scale_shape(shape, tile)
    y = dequantize(q, s, tile)
    br, bc = _block(tile, shape)
    s_full = expand_scales(s.reshape(-(-shape[0] // br), -(-shape[1] // bc)), br, bc, *shape)
    rel, sub = BOUNDS[fmt]
    bound = torch.maximum(rel * x.abs(), sub * s_full) * (1 + 1e-6)
    err = (x - y).abs()
    assert bool((err <= bound).all()), float((err / bound).max())
    # and the bound is not vacuous: the worst element uses a good part of it
    assert float((err / bound).max()) > 0.25


def test_blockwise_beats_tensorwise_on_heavy_tails():
    x = _data("heavy", (256, 512), seed=3)
    def rel_l2(tile):
        return float((fake_quantize(x, tile) - x).norm() / x.norm())
    # whole-tensor scaling pushes most small-magnitude rows into subnormals; 128x128 blocks and 1x128 tiles don't
    assert rel_l2((128, 128)) < rel_l2("tensor")
    assert rel_l2((1, 128)) < rel_l2((128, 128))
    # per-element relative error is what matters for the small rows: count elements off by more than 2**-4
    big_err = lambda t: int(((fake_quantize(x, t) - x).abs() > 2 ** -4 * x.abs() * 1.000001).sum())
    assert big_err((1, 128)) < big_err("tensor")


def _reference_loop(x, br, bc, fmt, pow2=False):
    """DeepSeek-V3 convention computed block by block with plain Python loops."""
    f = get_format(fmt)
    R, C = x.shape
    nr, nc = -(-R // br), -(-C // bc)
    s = torch.empty(nr, nc)
    q = torch.empty(R, C, dtype=f.dtype)
    for i in range(nr):
        for j in range(nc):
            blk = x[i * br:(i + 1) * br, j * bc:(j + 1) * bc].float()
            amax = max(float(blk.abs().max()), 1e-12)
            si = torch.tensor(amax, dtype=torch.float32) / f.max
            if pow2:
                si = torch.tensor(2.0 ** math.ceil(math.log2(float(si))), dtype=torch.float32)
            s[i, j] = si
            q[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = (blk / si).clamp(-f.max, f.max).to(f.dtype)
    return q, s


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("tile", [(128, 128), (1, 128), (16, 48)], ids=str)
@pytest.mark.parametrize("pow2", [False, True])
def test_convention_matches_block_loop(fmt, tile, pow2):
    x = _data("heavy", (150, 260), seed=11).to(torch.bfloat16)
    q, s = quantize(x, tile, fmt, pow2_scales=pow2)
    qr, sr = _reference_loop(x, *tile, fmt, pow2)
    assert torch.equal(s, sr)
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8))
    # dequantize is exactly q.float() * scale_inv per block
    y = dequantize(q, s, tile)
    br, bc = tile
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = q[i * br:(i + 1) * br, j * bc:(j + 1) * bc].float() * s[i, j]
            assert torch.equal(y[i * br:(i + 1) * br, j * bc:(j + 1) * bc], blk)


def test_partial_edge_tiles_have_their_own_scale():
    x = torch.randn(130, 200) * 0.01
    x[0, 0] = 100.0                       # only the first block sees the outlier
    q, s = quantize(x, (128, 128))
    assert s.shape == (2, 2)
    assert float(s[0, 0]) == pytest.approx(100.0 / 448)
    for i, j, rows, cols in [(0, 1, slice(0, 128), slice(128, 200)), (1, 0, slice(128, 130), slice(0, 128)),
                             (1, 1, slice(128, 130), slice(128, 200))]:
        assert float(s[i, j]) == pytest.approx(float(x[rows, cols].abs().max()) / 448, rel=1e-6)
    # the edge blocks reach the format max: they use the full FP8 range
    assert float(q[128:, 128:].float().abs().max()) == 448.0
    # activation tiles along the last dim of a 3-D tensor
    a = torch.randn(2, 3, 130)
    qa, sa = quantize(a, (1, 128))
    assert sa.shape == (6, 2)
    assert torch.allclose(sa[:, 1], a.reshape(6, 130)[:, 128:].abs().amax(1) / 448)


def test_pow2_scales():
    x = _data("normal", (256, 384), seed=5) * 3.7
    q, s = quantize(x, (128, 128), pow2_scales=True)
    exact = x.reshape(2, 128, 3, 128).abs().amax(dim=(1, 3)) / 448
    log = torch.log2(s)
    assert torch.equal(log, torch.round(log))                   # powers of two (ue8m0)
    assert bool((s >= exact).all()) and bool((s < 2 * exact).all())  # the next power of two up, never down
    assert float(q.float().abs().max()) <= 448                     # so nothing saturates
    y = dequantize(q, s, (128, 128))
    rel, sub = BOUNDS["e4m3"]
    sf = expand_scales(s, 128, 128, 256, 384)
    assert bool(((x - y).abs() <= torch.maximum(rel * x.abs(), sub * sf) * (1 + 1e-6)).all())


def test_zero_tiles_are_exact_and_finite():
    x = torch.randn(256, 256)
    x[:128, 128:] = 0.0
    q, s = quantize(x, (128, 128))
    assert bool(torch.isfinite(s).all()) and float(s[0, 1]) > 0
    assert bool((q[:128, 128:].float() == 0).all())
    y = dequantize(q, s, (128, 128))
    assert bool((y[:128, 128:] == 0).all())
    q0, s0 = quantize(torch.zeros(3, 7), "tensor")
    assert s0.shape == () and math.isfinite(float(s0)) and bool((dequantize(q0, s0, "tensor") == 0).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_raises_by_default(bad):
    x = torch.randn(64, 256)
    x[3, 200] = bad
    with pytest.raises(NonFiniteError, match="layers.0.w"):
        quantize(x, (1, 128), name="layers.0.w")
    assert issubclass(NonFiniteError, YxanulError)


def test_nonfinite_propagates_when_asked():
    x = torch.randn(4, 256)
    x[1, 130] = float("nan")
    q, s = quantize(x, (1, 128), nonfinite="propagate")
    y = dequantize(q, s, (1, 128))
    assert bool(torch.isnan(y[1, 128:]).all())        # the poisoned tile
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[1, 128:] = False
    assert bool(torch.isfinite(y[mask]).all())         # every other tile is untouched
    with pytest.raises(YxanulError):
        quantize(x, (1, 128), nonfinite="ignore")


def test_bad_inputs():
    with pytest.raises(YxanulError, match="2-D"):
        quantize(torch.randn(2, 3, 4), (128, 128))
    with pytest.raises(YxanulError, match="tile"):
        quantize(torch.randn(4, 4), (0, 128))
    with pytest.raises(YxanulError, match="format"):
        quantize(torch.randn(4, 4), "row", fmt="e3m4")
    with pytest.raises(YxanulError):
        quantize(torch.arange(8).reshape(2, 4), "row")
    q, s = quantize(torch.randn(130, 200), (128, 128))
    with pytest.raises(YxanulError, match="scale shape"):
        dequantize(q, s[:1], (128, 128))


def test_format_limits_reached():
    for fmt, mx in (("e4m3", 448.0), ("e5m2", 57344.0)):
        x = torch.randn(8, 128)
        q, s = quantize(x, "row", fmt)
        assert torch.equal(q.float().abs().amax(1), torch.full((8,), mx))
