"""Where the 1x128 quantizers' time goes, at 16384 x K BF16 (K = 768, 2048): the package's act_quant / act_quant_t
against variants (rows or columns per program, warps, IEEE division or multiplication by the reciprocal,
NaN-aware or plain tile maxima), and a BF16 copy (the bandwidth roofline). Prints a table and writes JSON.
Usage: python scripts/device_tile_quant_bench.py OUT.json
"""
from __future__ import annotations

import json
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from yxanul import kernels
from yxanul.kernels.quant import nan_max


@triton.jit
def _q(x, s, DIV: tl.constexpr, out_ty: tl.constexpr):
    y = tl.div_rn(x, s) if DIV else x * (1.0 / s)
    return tl.minimum(tl.maximum(y, -448.0), 448.0).to(out_ty, fp_downcast_rounding="rtne")


@triton.jit
def _rows(x_ptr, q_ptr, s_ptr, M, K, NKB, BM: tl.constexpr, DIV: tl.constexpr, NAN: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_k = pid_k * 128 + tl.arange(0, 128)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    a = nan_max(tl.abs(x), 1) if NAN else tl.max(tl.abs(x), axis=1)
    s = tl.maximum(a, 1e-12) / 448.0
    tl.store(q_ptr + offs_m[:, None] * K + offs_k[None, :], _q(x, s[:, None], DIV, q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + offs_m * NKB + pid_k, s, mask=offs_m < M)


@triton.jit
def _cols(x_ptr, q_ptr, s_ptr, M, K, NMB, BK: tl.constexpr, DIV: tl.constexpr, NAN: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * 128 + tl.arange(0, 128)
    offs_k = pid_k * BK + tl.arange(0, BK)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    a = nan_max(tl.abs(x), 0) if NAN else tl.max(tl.abs(x), axis=0)
    s = tl.maximum(a, 1e-12) / 448.0
    q = _q(x, s[None, :], DIV, q_ptr.dtype.element_ty)
    tl.store(q_ptr + offs_k[:, None] * M + offs_m[None, :], tl.trans(q),
             mask=(offs_k[:, None] < K) & (offs_m[None, :] < M))
    tl.store(s_ptr + offs_k * NMB + pid_m, s, mask=offs_k < K)


def main(out_path):
    rows = []
    for K in (768, 2048):
        M = 16384
        x = torch.randn(M, K, device="cuda").bfloat16()
        n = x.numel()
        q = torch.empty(M, K, device="cuda", dtype=torch.float8_e4m3fn)
        qt = torch.empty(K, M, device="cuda", dtype=torch.float8_e4m3fn)
        s = torch.empty(M, K // 128, device="cuda")
        st = torch.empty(K, M // 128, device="cuda")

        def rec(name, fn, nbytes):
            ms = do_bench(fn, warmup=10, rep=50)
            rows.append({"K": K, "kernel": name, "us": round(ms * 1000, 1),
                         "TB_s": round(nbytes / (ms * 1e-3) / 1e12, 3)})
            print(f"K={K:5d} {name:44s} {ms * 1000:7.1f} us {rows[-1]['TB_s']:5.2f} TB/s", flush=True)

        rec("bf16 copy", lambda: x.clone(), 4 * n)
        rec("act_quant (package)", lambda: kernels.act_quant(x), 3 * n)
        rec("act_quant_t (package)", lambda: kernels.act_quant_t(x), 3 * n)
        for bm in (8, 16, 32, 64):
            for w in (2, 4, 8):
                for div, nan in ((True, True), (False, True), (True, False)):
                    g = (triton.cdiv(M, bm), K // 128)
                    rec(f"rows BM={bm} w{w} {'div' if div else 'rcp'} {'nan' if nan else 'max'}",
                        lambda: _rows[g](x, q, s, M, K, K // 128, BM=bm, DIV=div, NAN=nan, num_warps=w), 3 * n)
        for bk in (16, 32, 64, 128):
            for w in (4, 8):
                for div, nan in ((True, True), (False, True), (True, False)):
                    g = (M // 128, triton.cdiv(K, bk))
                    rec(f"cols BK={bk} w{w} {'div' if div else 'rcp'} {'nan' if nan else 'max'}",
                        lambda: _cols[g](x, qt, st, M, K, M // 128, BK=bk, DIV=div, NAN=nan, num_warps=w), 3 * n)
    with open(out_path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
