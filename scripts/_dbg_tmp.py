import sys; sys.path.insert(0, ".")
import torch
from torch.profiler import profile, ProfilerActivity
from yxanul.kernels.linear_ce import linear_cross_entropy
bf = torch.bfloat16
M = 16384
h0 = torch.randn(M, 768, device="cuda") * 0.5
P = (torch.randn(768, 128, device="cuda") / 768 ** 0.5).requires_grad_()
W = (torch.randn(200005, 128, device="cuda") * 0.02).requires_grad_()
t = torch.randint(0, 200005, (M,), device="cuda")
def f(chunk):
    h = h0.detach().to(bf).requires_grad_()
    with torch.autocast("cuda", dtype=bf):
        loss = linear_cross_entropy(h, W, t, P=P, chunk=chunk)
    loss.backward()
import time
for chunk in (1024, 4096):
    f(chunk); torch.cuda.synchronize(); t0 = time.time()
    for _ in range(5):
        f(chunk)
    torch.cuda.synchronize(); print('chunk', chunk, 'ms/iter', (time.time() - t0) / 5 * 1000)
    f(chunk); f(chunk); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        f(chunk); torch.cuda.synchronize()
    print("chunk", chunk)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=7, max_name_column_width=60))
