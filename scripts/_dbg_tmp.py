import torch
from yxanul import kernels
from yxanul.kernels import reference
torch.manual_seed(0)
x = (torch.randn(16384, 768, device="cuda") * torch.rand(16384,1,device="cuda")*8).to(torch.bfloat16)
q, s = kernels.tensor_quant(x, impl="triton"); qr, sr = reference.tensor_quant(x)
d = (q.view(torch.uint8) != qr.view(torch.uint8))
print("tensor mism", int(d.sum()), "scale", float(s), float(sr))
xf = x.float()[d][:10]; print("x", xf.tolist()); print("x/s", (xf.double()/sr.double()).tolist())
print("y torch", (xf/ sr).tolist()); print("k", q[d][:10].float().tolist()); print("r", qr[d][:10].float().tolist())
y = x.float()/sr
print("direct cast mism", int((y.clamp(-448,448).to(torch.float8_e4m3fn).view(torch.uint8) != qr.view(torch.uint8)).sum()))
# scales
amax = x.float().abs().view(16384, 6, 128).amax(-1)
_, s2 = reference.act_quant(x)
inv = torch.tensor(1.0, device="cuda") / 448.0
print("ref==amax/448(tensor div)", bool((s2 == amax.clamp_min(1e-12) / torch.full_like(amax, 448.0)).all()),
      "ref==amax*inv", bool((s2 == amax.clamp_min(1e-12) * inv).all()))
