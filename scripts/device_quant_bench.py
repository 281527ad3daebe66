"""Bandwidth of the FP8 quantization kernels at Yxanul-197M's activation shapes (M = 16 x 2048 tokens).

Times the package's Triton quantizers and variants of the per-tensor cast kernel (tile shape, warps, exact
IEEE division + explicit FP8 rounding against a reciprocal multiply, which layouts are written) against a bf16
copy of the same tensor (the bandwidth roofline). Prints a table and writes JSON.
Usage: python scripts/device_quant_bench.py OUT.json
"""
from __future__ import annotations

import json
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from yxanul import kernels
from yxanul.kernels.quant import cast_fp8


@triton.jit
def _variant(x_ptr, q_ptr, qt_ptr, s_ptr, M, K, BM: tl.constexpr, BK: tl.constexpr, EXACT: tl.constexpr,
             WRITE_Q: tl.constexpr, WRITE_QT: tl.constexpr, TRANS_LOAD: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    s = tl.load(s_ptr)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_k = pid_k * BK + tl.arange(0, BK)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    if EXACT:
        q = cast_fp8(x, s, 448.0, q_ptr.dtype.element_ty)
    else:
        q = tl.minimum(tl.maximum(x * (1.0 / s), -448.0), 448.0).to(q_ptr.dtype.element_ty)
    if WRITE_Q:
        tl.store(q_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :], q, mask=mask)
    if WRITE_QT:
        mt = (offs_k[:, None] < K) & (offs_m[None, :] < M)
        if TRANS_LOAD:  # read the tile again in transposed order (from L2) instead of transposing registers
            xt = tl.load(x_ptr + offs_m[None, :].to(tl.int64) * K + offs_k[:, None], mask=mt, other=0.0)
            if EXACT:
                qt = cast_fp8(xt.to(tl.float32), s, 448.0, q_ptr.dtype.element_ty)
            else:
                qt = tl.minimum(tl.maximum(xt.to(tl.float32) * (1.0 / s), -448.0), 448.0).to(
                    q_ptr.dtype.element_ty)
            tl.store(qt_ptr + offs_k[:, None].to(tl.int64) * M + offs_m[None, :], qt, mask=mt)
        else:
            tl.store(qt_ptr + offs_k[:, None].to(tl.int64) * M + offs_m[None, :], tl.trans(q), mask=mt)


def main(out_path):
    rows = []
    dev = torch.device("cuda")
    for K in (768, 2048):
        M = 16384
        x = torch.randn(M, K, device=dev).bfloat16()
        s = (x.float().abs().amax() / 448).reshape(())
        q = torch.empty(M, K, device=dev, dtype=torch.float8_e4m3fn)
        qt = torch.empty(K, M, device=dev, dtype=torch.float8_e4m3fn)
        nbytes_in = x.numel() * 2

        def rec(name, fn, out_bytes):
            ms = do_bench(fn, warmup=10, rep=50)
            tbps = (nbytes_in + out_bytes) / (ms * 1e-3) / 1e12
            rows.append({"K": K, "kernel": name, "us": round(ms * 1000, 1), "TB_s": round(tbps, 3)})
            print(f"K={K:5d} {name:58s} {ms * 1000:8.1f} us {tbps:6.2f} TB/s", flush=True)

        rec("bf16 copy (roofline)", lambda: x.clone(), nbytes_in)
        n = x.numel()
        rec("act_quant 1x128 (package)", lambda: kernels.act_quant(x), n + n // 128 * 4)
        rec("act_quant_t 1x128 (package)", lambda: kernels.act_quant_t(x), n + n // 128 * 4)
        rec("act_quant_dual 1x128 (package)", lambda: kernels.act_quant_dual(x), 2 * n + n // 64 * 4)
        rec("tensor_quant_dual amax+cast (package)", lambda: kernels.tensor_quant_dual(x), 2 * n)
        rec("tensor cast both layouts, given scale (package)",
            lambda: kernels.tensor_quant_dual(x, scale_inv=s), 2 * n)
        rec("tensor_amax (package)", lambda: kernels.tensor_amax(x), 0)
        cq = torch.compile(lambda a, sc: (a.float() / sc).clamp(-448, 448).to(torch.float8_e4m3fn))
        rec("inductor cast, q only", lambda: cq(x, s), n)
        cqt = torch.compile(lambda a, sc: ((a.float() / sc).clamp(-448, 448).to(torch.float8_e4m3fn),
                                           (a.float() / sc).clamp(-448, 448).to(torch.float8_e4m3fn).t().contiguous()))
        rec("inductor cast, q and qT", lambda: cqt(x, s), 2 * n)
        for (bm, bk, w) in ((128, 128, 8), (128, 128, 4), (64, 128, 4), (128, 64, 4), (64, 64, 4), (32, 128, 4),
                            (256, 64, 8)):
            for exact in (True, False):
                for wq, wqt, tl_ in ((True, False, False), (False, True, False), (True, True, False),
                                     (True, True, True)):
                    if not exact and not (wq and wqt):
                        continue
                    grid = (triton.cdiv(M, bm), triton.cdiv(K, bk))
                    name = f"variant {bm}x{bk} w{w} {'exact' if exact else 'fast '} " \
                           f"{'q' if wq else '-'}{'qT' if wqt else '--'}{' tload' if tl_ else ''}"
                    rec(name, lambda: _variant[grid](x, q, qt, s, M, K, BM=bm, BK=bk, EXACT=exact, WRITE_Q=wq,
                                                     WRITE_QT=wqt, TRANS_LOAD=tl_, num_warps=w),
                        n * (int(wq) + int(wqt)))
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "rows": rows}
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
