"""Time the fused FP8 quantization kernels against what they replace, on a CUDA device: the SwiGLU kernels of the
whole-MLP function, and both 1 x 128 layouts of an operand from one read.

  python scripts/device_fused_quant_kernels.py OUT_JSON

At the SwiGLU shapes of Yxanul-197M (32,768 tokens x 2,048) and Yxanul-1B (16,384 x 5,632), BF16 inputs:
  tiles-fwd   swiglu_tiles (h in 1 x 128 tiles, both layouts) against compiled silu(g) * u followed by the
              act_quant and act_quant_t kernels (the unfused blockwise path), for several column-kernel widths and warps
  tiles-bwd   swiglu_bwd_tiles against the compiled SwiGLU backward, cat, act_quant and act_quant_t
  cast-fwd    swiglu_fwd_cast (delayed scaling) against torch.compile of the same computation
  cast-bwd    swiglu_bwd_cast against torch.compile of the same computation; and the same computation with the
              row-major FP8 layouts only, then each transposed by an FP8 copy of its own (is the transposed store
              what is slow?), against the BF16 SwiGLU backward
  norm-tiles  rmsnorm_tiles (the norm's output as 1 x 128 tiles of both layouts, from x and the row scales, plus
              the row-scale reduction) against the compiled RMSNorm followed by act_quant and act_quant_t
  dual        act_quant_dual (both 1 x 128 layouts from one read, whole 128 x 128 tile)
              against act_quant + act_quant_t, at the widths of the other blockwise operands (768, 1,024; 2,048)
Each timing is the median of 5 replays of a CUDA graph of 20 launches between CUDA events, after a check that
the variant's outputs equal the reference's bytes (FP8) and values (scales). Writes one JSON.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yxanul.fp8.producers import rms_rstd  # noqa: E402
from yxanul.kernels import quant, reference, swiglu_cast, tiles  # noqa: E402
from yxanul.model import RMSNorm  # noqa: E402

SHAPES = {"197m": (32768, 2048), "1b": (16384, 5632)}
DUAL_SHAPES = {"197m": [(32768, 768), (32768, 1024)], "1b": [(16384, 2048), (16384, 2560)]}
VARIANTS = [(16, 4), (32, 4), (32, 8), (64, 8)]  # (column-kernel width, warps)


def timed(fn, reps: int = 20, runs: int = 5) -> float:
    """GPU time per call (µs): `reps` calls captured in one CUDA graph, replayed `runs` times between CUDA events,
    the median. Eager launches would time the host: the tile kernels go through torch.library.wrap_triton,
    whose eager dispatch costs more than a kernel at these sizes."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, autotuning) outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    out = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) * 1000 / reps)
    return sorted(out)[len(out) // 2]


def same(a, b) -> bool:
    for x, y in zip(a, b):
        if x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            x, y = x.view(torch.uint8), y.view(torch.uint8)
        if x.shape != y.shape or not torch.equal(x, y):
            return False
    return True


def differing(a, b) -> float:
    """The fraction of elements (FP8 codes compared as bytes) that differ between two tuples of tensors of equal
    shapes: how far from bit-exact a comparison that is not is (1.0 where a shape differs)."""
    n = bad = 0
    for x, y in zip(a, b):
        if x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            x, y = x.view(torch.uint8), y.view(torch.uint8)
        if x.shape != y.shape:
            return 1.0
        n, bad = n + x.numel(), bad + int((x != y).sum())
    return bad / max(n, 1)


def main(path: str) -> None:
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": []}

    def row(**kw):
        res["rows"].append(kw)
        print(json.dumps(kw), flush=True)
        Path(path).write_text(json.dumps(res, indent=2))

    for name, (M, Fw) in SHAPES.items():
        gen = torch.Generator(device="cuda").manual_seed(0)
        gu = torch.randn(M, 2 * Fw, device="cuda", generator=gen).bfloat16()
        g, u = gu[:, :Fw], gu[:, Fw:]
        dh = (torch.randn(M, Fw, device="cuda", generator=gen) * 1e-3).bfloat16()

        # blockwise forward
        swi = torch.compile(lambda g, u: F.silu(g) * u)

        def unfused_fwd():
            h = swi(g, u)
            return quant.act_quant(h) + quant.act_quant_t(h)
        ref = tiles.swiglu_tiles(g, u, bn=32, num_warps=4)
        row(shape=name, kernel="tiles-fwd", variant="unfused", us=timed(unfused_fwd))
        for bn, w in VARIANTS:
            out = tiles.swiglu_tiles(g, u, bn=bn, num_warps=w)
            row(shape=name, kernel="tiles-fwd", variant=f"bn{bn}-w{w}", same_as_bn32_w4=same(out, ref),
                us=timed(lambda: tiles.swiglu_tiles(g, u, bn=bn, num_warps=w)))
        row(shape=name, kernel="tiles-fwd", variant="reference-check",
            scales_equal_reference=same(ref[1::2], reference.swiglu_tiles_quant(g, u)[1::2]))

        # blockwise backward
        def grads(g, u, dh):
            gf = g.float()
            s = torch.sigmoid(gf)
            return torch.cat([(dh.float() * u.float() * s * (1 + gf * (1 - s))).bfloat16(),
                              (dh.float() * gf * s).bfloat16()], 1)
        grads_c = torch.compile(grads)

        def unfused_bwd():
            d = grads_c(g, u, dh)
            return quant.act_quant(d) + quant.act_quant_t(d)
        ref = tiles.swiglu_bwd_tiles(g, u, dh, bn=32, num_warps=4)
        row(shape=name, kernel="tiles-bwd", variant="unfused", us=timed(unfused_bwd))
        for bn, w in VARIANTS:
            out = tiles.swiglu_bwd_tiles(g, u, dh, bn=bn, num_warps=w)
            row(shape=name, kernel="tiles-bwd", variant=f"bn{bn}-w{w}", same_as_bn32_w4=same(out, ref),
                us=timed(lambda: tiles.swiglu_bwd_tiles(g, u, dh, bn=bn, num_warps=w)))

        # delayed scaling, forward and backward, against inductor's fusion of the same computation
        gc, uc = g.contiguous(), u.contiguous()
        s = torch.tensor(0.01, device="cuda")

        def cast_fwd_torch(g, u, s):
            h = (F.silu(g.float()) * u.float()).bfloat16().float()
            q = (h / s).clamp(-448, 448).to(torch.float8_e4m3fn)
            return q, q.t().contiguous(), h.abs().amax(1).amax()
        cf = torch.compile(cast_fwd_torch)
        row(shape=name, kernel="cast-fwd", variant="inductor", us=timed(lambda: cf(gc, uc, s)))
        row(shape=name, kernel="cast-fwd", variant="triton",
            us=timed(lambda: swiglu_cast.swiglu_fwd_cast(gc, uc, s)))

        def cast_bwd_torch(g, u, d, s1, s2):
            gf, df = g.float(), d.float()
            sg = torch.sigmoid(gf)
            dg, du = df * u.float() * sg * (1 + gf * (1 - sg)), df * gf * sg
            qg = (dg / s1).clamp(-448, 448).to(torch.float8_e4m3fn)
            qu = (du / s2).clamp(-448, 448).to(torch.float8_e4m3fn)
            return qg, qg.t().contiguous(), qu, qu.t().contiguous(), dg.abs().amax(1).amax(), du.abs().amax(1).amax()
        cb = torch.compile(cast_bwd_torch)
        s2 = torch.tensor(1e-5, device="cuda")
        row(shape=name, kernel="cast-bwd", variant="inductor", us=timed(lambda: cb(gc, uc, dh, s2, s2)))
        row(shape=name, kernel="cast-bwd", variant="triton",
            us=timed(lambda: swiglu_cast.swiglu_bwd_cast(gc, uc, dh, s2, s2)))

        # is the transposed FP8 store the cost? the same backward with the row-major layouts only, then each
        # transposed by a copy of its own (a separate compiled function: inductor cannot fuse it back), and the
        # BF16 backward (the unquantized step's kernel) for scale
        def cast_bwd_rows(g, u, d, s1, s2):
            qg, _, qu, _, ag, au = cast_bwd_torch(g, u, d, s1, s2)
            return qg, qu, ag, au
        cr = torch.compile(cast_bwd_rows)
        tr = torch.compile(lambda q: q.view(torch.uint8).t().contiguous().view(q.dtype))

        def rows_then_transpose():
            qg, qu, ag, au = cr(gc, uc, dh, s2, s2)
            return qg, tr(qg), qu, tr(qu), ag, au
        both, split = cb(gc, uc, dh, s2, s2), rows_then_transpose()
        row(shape=name, kernel="cast-bwd", variant="inductor-rows", us=timed(lambda: cr(gc, uc, dh, s2, s2)))
        row(shape=name, kernel="cast-bwd", variant="inductor-rows+transposes",
            same_as_inductor=same(split[:4], both[:4]), us=timed(rows_then_transpose))
        qg = both[0]
        row(shape=name, kernel="fp8-transpose", variant="inductor", us=timed(lambda: tr(qg)),
            floor_us=M * Fw * 2 / 3.35e12 * 1e6)
        row(shape=name, kernel="cast-bwd", variant="bf16-backward", us=timed(lambda: grads_c(gc, uc, dh)))
        for Md, Kd in DUAL_SHAPES[name][:1]:
            x = torch.randn(Md, Kd, device="cuda", generator=gen).bfloat16()
            norm = RMSNorm(Kd).cuda()
            norm_c = torch.compile(norm)

            def unfused_norm():
                y = norm_c(x)
                return quant.act_quant(y) + quant.act_quant_t(y)
            ref = unfused_norm()
            rstd_c = torch.compile(rms_rstd)
            out = tiles.rmsnorm_tiles(x, rstd_c(x, 1e-6), norm.weight)
            row(shape=name, kernel=f"norm-tiles-{Kd}", variant="unfused", us=timed(unfused_norm))
            row(shape=name, kernel=f"norm-tiles-{Kd}", variant="bn32-w4", same_as_unfused=same(out, ref),
                # the unfused path computes the row scales in a reduction compiled on its own, which may round the
                # mean of squares differently: the fraction of codes and scales that differ says by how much
                differing_from_unfused=differing(out, ref),
                us=timed(lambda: tiles.rmsnorm_tiles(x, rstd_c(x, 1e-6), norm.weight)))
        for Md, Kd in DUAL_SHAPES[name]:
            x = torch.randn(Md, Kd, device="cuda", generator=gen).bfloat16()
            ref = quant.act_quant(x) + quant.act_quant_t(x)
            tag = f"dual-{Kd}"
            row(shape=name, kernel=tag, variant="act_quant+act_quant_t",
                us=timed(lambda: (quant.act_quant(x), quant.act_quant_t(x))))
            out = quant.act_quant_dual(x)
            row(shape=name, kernel=tag, variant="full-tile-w8", same=same(out, ref),
                us=timed(lambda: quant.act_quant_dual(x)))
            row(shape=name, kernel=tag, variant="floor-3.35TB/s", us=Md * Kd * (2 + 2) / 3.35e12 * 1e6)
        # traffic floor at 3.35 TB/s (H100 SXM): bytes read and written once
        for k, nbytes in (("tiles-fwd", M * Fw * (4 + 2)), ("tiles-bwd", M * Fw * (6 + 4)),
                          ("cast-fwd", M * Fw * (4 + 2)), ("cast-bwd", M * Fw * (6 + 4))):
            row(shape=name, kernel=k, variant="floor-3.35TB/s", us=nbytes / 3.35e12 * 1e6)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fused-quant-kernels.json")
