"""Where do inductor's traced 1 x 128 quantizers and the Triton kernels part? Stages on one CUDA input:
eager reference code, compiled reference code on a BF16 tensor, compiled with a fused producer (with and without
emulate_precision_casts), each against the kernels (scales: max relative difference; values: elements more than
one FP8 step apart). Usage: python scripts/device_traced_quant_check.py OUT.json"""
import json
import sys

import torch

from yxanul import kernels
from yxanul.fp8.backends import quant_tiles_impl, quant_tiles_t_impl
from yxanul.fp8.formats import get_format
from yxanul.io import atomic_write_json

f = get_format("e4m3")
g = torch.Generator(device="cuda").manual_seed(0)
a = torch.randn(4096, 768, device="cuda", generator=g, dtype=torch.bfloat16)
b = torch.randn(4096, 768, device="cuda", generator=g, dtype=torch.bfloat16)


def produce(a, b):
    return (torch.nn.functional.silu(a.float()) * b.float()).to(torch.bfloat16)


x = produce(a, b)
want = (kernels.act_quant(x, impl="triton"), kernels.act_quant_t(x, impl="triton"))


def compare(name, got):
    row = {"stage": name}
    for tag, (gq, gs), (wq, ws) in (("rows", got[0], want[0]), ("cols", got[1], want[1])):
        row[f"{tag}_scale_max_rel"] = float(((gs - ws).abs() / ws.abs()).max())
        row[f"{tag}_scale_mismatch_frac"] = float((gs != ws).float().mean())
        step = wq.float().abs().clamp_min(2 ** -6) * 2 ** -3
        row[f"{tag}_values_beyond_one_step"] = int(((gq.float() - wq.float()).abs() > step).sum())
    print(json.dumps(row), flush=True)
    return row


rows = [compare("eager reference code", (quant_tiles_impl(x, f), quant_tiles_t_impl(x, f)))]
torch._dynamo.reset()
rows.append(compare("compiled, BF16 input", torch.compile(lambda x: (quant_tiles_impl(x, f),
                                                                      quant_tiles_t_impl(x, f)))(x)))
xe = produce(a, b)
rows.append(compare("eager producer again (determinism)", (kernels.act_quant(xe, impl="triton"),
                                                            kernels.act_quant_t(xe, impl="triton"))))
for emulate in (False, True):
    torch._dynamo.reset()
    with torch._inductor.config.patch(emulate_precision_casts=emulate):
        fn = torch.compile(lambda a, b: (quant_tiles_impl(produce(a, b), f), quant_tiles_t_impl(produce(a, b), f)))
        rows.append(compare(f"compiled with producer, emulate_precision_casts={emulate}", fn(a, b)))
    torch._dynamo.reset()
    with torch._inductor.config.patch(emulate_precision_casts=emulate):
        xc = torch.compile(produce)(a, b)
    rows.append(dict(stage=f"compiled producer alone vs eager, emulate={emulate}",
                     max_abs=float((xc.float() - x.float()).abs().max()),
                     mismatch_frac=float((xc != x).float().mean())))
    print(json.dumps(rows[-1]), flush=True)
atomic_write_json(sys.argv[1], {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows})
