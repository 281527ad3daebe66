"""Tile shapes of the fused SwiGLU-backward FP8 kernel at Yxanul-197M's MLP size (32768 x 2048, BF16 inputs):
CUDA-event time per call (mean of 50 after warm-up) and bytes moved per second, each variant checked against the
first for identical outputs. Usage: python scripts/device_swiglu_bwd_bench.py OUT_JSON"""
import json
import sys

import torch

from yxanul.kernels.swiglu_cast import swiglu_bwd_cast

M, F = 32768, 2048
g = torch.Generator(device="cuda").manual_seed(0)
gate, up = (torch.randn(M, F, device="cuda", generator=g).bfloat16() for _ in range(2))
dh = (torch.randn(M, F, device="cuda", generator=g) * 1e-3).bfloat16()
sg = torch.tensor(1e-3 / 448, device="cuda")
su = torch.tensor(2e-3 / 448, device="cuda")
variants = [(128, 64, 8), (64, 64, 4), (64, 128, 4), (64, 128, 8), (128, 128, 8), (32, 128, 4), (128, 32, 4),
            (64, 64, 8), (256, 32, 8), (32, 64, 4)]
ref = swiglu_bwd_cast(gate, up, dh, sg, su, "e4m3", *variants[0])
rows = []
for bm, bn, w in variants:
    out = swiglu_bwd_cast(gate, up, dh, sg, su, "e4m3", bm, bn, w)
    same = all(torch.equal(a.view(torch.uint8) if a.dtype != torch.float32 else a,
                           b.view(torch.uint8) if b.dtype != torch.float32 else b) for a, b in zip(out, ref))
    for _ in range(5):
        swiglu_bwd_cast(gate, up, dh, sg, su, "e4m3", bm, bn, w)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(50):
        swiglu_bwd_cast(gate, up, dh, sg, su, "e4m3", bm, bn, w)
    e.record()
    torch.cuda.synchronize()
    us = s.elapsed_time(e) / 50 * 1000
    rows.append({"bm": bm, "bn": bn, "warps": w, "us": round(us, 1), "tb_s": round(M * F * 10 / us / 1e6, 2),
                 "same_as_first": same})
    print(rows[-1], flush=True)
# the BF16 floor: read three tensors, write two
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
s.record()
for _ in range(50):
    torch.add(gate, up, out=dh)
e.record()
torch.cuda.synchronize()
copy_us = s.elapsed_time(e) / 50 * 1000
json.dump({"M": M, "F": F, "device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
           "bf16_add_us": round(copy_us, 1), "bf16_add_tb_s": round(M * F * 6 / copy_us / 1e6, 2)},
          open(sys.argv[1], "w"), indent=1)
