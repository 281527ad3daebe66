"""Is `bench throughput`'s bf16-plain as fast as the plain model a user writes? Yxanul-197M (16 x 2048), one
process, every variant compiled whole with the default mode (no CUDA graphs), CUDA-event timing, peak memory
(over the whole run, and of the timed steps alone):

  bench         bf16-plain exactly as `bench throughput` times it (its harness: dynamo reset, frozen GC; its default
                vocabulary padded to a multiple of 64)
  loop          PlainLM with the vocabulary as it is (200,005 rows) in a minimal loop a user writes (no harness)
  step-compile  forward and loss under autocast inside one compiled function
  rope-bf16     RoPE tables in BF16 (q and k rotated in BF16, no FP32 intermediates)
  lse-loss      the same loss written as logsumexp(logits) - logits[target] (no log-probabilities tensor)
  no-ignore     F.cross_entropy without ignore_index (the plain call a user writes)
  no-pad-mm     `loop` compiled with inductor's matmul padding off (shape_padding): on CUDA, inductor may pad a
                GEMM dimension that is not a multiple of 8 (the vocabulary, 200,005) after timing both, and a
                padded backward GEMM copies the 12 GiB logit gradient into a padded buffer
  pad-mm        `loop` with that padding forced (force_shape_pad)
  pad-vocab     `loop` with the vocabulary padded to a multiple of 64 (200,064 embedding rows, never a target),
                as many users size it so that the logits' rows are aligned and no GEMM needs padding
                (PlainLM(vocab_multiple=64), what `bench` uses by default)
  V+snapshot    variant V (one of the `loop`-like ones), then one more step under the CUDA allocator's recorder:
                the tensors alive at that step's peak, largest first, with the line of inductor's generated
                code that allocated each (yxanul.bench.memtrace); in the row as "peak_live"
  bf16-params   the model cast to BF16 (parameters, AdamW states and RoPE tables; no autocast, no FP32 master
                weights): the other common way to write it, with the loss still on FP32 logits
  bf16          the project's BF16 mode (for the ratio), as `bench throughput` times it

Usage: python scripts/device_plain_variants.py OUT_JSON [VARIANTS]"""
import gc
import json
import sys
import time

import torch

from yxanul.bench.memtrace import peak_live, record_step
from yxanul.bench.plain import PlainLM
from yxanul.bench.throughput import DEFAULT_VOCAB_MULTIPLE, _time_mode
from yxanul.config import load_model_config

out = sys.argv[1]
variants = (sys.argv[2] if len(sys.argv) > 2 else "bench,loop,step-compile,rope-bf16,bf16").split(",")
B, T, STEPS, WARM = 16, 2048, 20, 5
cfg = load_model_config("yxanul-197m")
dev = torch.device("cuda")
g = torch.Generator().manual_seed(1234)
data = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g).to(dev)
x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": B, "seq": T, "rows": []}
extra = {}  # what a variant records beside its timing


# the variants that run in own_loop (bench and bf16 run in the benchmark's harness)
LOOPS = ("loop", "step-compile", "rope-bf16", "lse-loss", "no-ignore", "bf16-params", "no-pad-mm", "pad-mm",
         "pad-vocab")
# the variants that write the loss otherwise: (FP32 logits [N, V], targets [N]) -> loss
LOSSES = {"lse-loss": lambda z, t: (torch.logsumexp(z, -1) - z.gather(1, t[:, None])[:, 0]).mean(),
          "no-ignore": lambda z, t: torch.nn.functional.cross_entropy(z, t)}
# inductor settings a variant compiles with
PATCHES = {"no-pad-mm": {"shape_padding": False}, "pad-mm": {"force_shape_pad": True}}


def own_loop(name, snapshot=False):
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = PlainLM(cfg, vocab_multiple=64 if name == "pad-vocab" else 1).to(dev)
    if name == "rope-bf16":
        model.cos, model.sin = model.cos.bfloat16(), model.sin.bfloat16()
    if name == "bf16-params":
        model = model.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    if name == "step-compile":
        @torch.compile
        def fwd(a, b):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model(a, b)
    else:
        loss_fn = LOSSES.get(name)
        cm = torch.compile(model if loss_fn is None else
                           lambda a, b: loss_fn(model.logits(a).float().flatten(0, 1), b.flatten()))

        def fwd(a, b):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=name != "bf16-params"):
                return cm(a, b)

    def step():
        loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(WARM):
        step()
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    warm_peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(STEPS):
        loss = step()
    e.record()
    torch.cuda.synchronize()
    ms = s.elapsed_time(e) / STEPS
    timed = torch.cuda.max_memory_allocated()
    if snapshot:
        base = torch.cuda.memory_allocated()
        trace = peak_live(record_step(step), min_bytes=1 << 28)
        extra["peak_live"] = dict(trace, allocated_before_gib=round(base / 2 ** 30, 2),
                                  peak_gib=round((base + trace["peak_bytes"]) / 2 ** 30, 2))
    return ms, max(warm_peak, timed) / 2 ** 30, warm, float(loss.detach()), timed / 2 ** 30


for v in variants:  # every name checked before anything compiles
    name, _, tag = v.partition("+")
    if v not in ("bench", "bf16") and (name not in LOOPS or tag not in ("", "snapshot")):
        sys.exit(f"device_plain_variants: error: unknown variant {v!r} (bench, bf16, or one of {', '.join(LOOPS)}, "
                 "each of these optionally +snapshot)")

for v in variants:
    extra.clear()
    try:
        if v in ("bench", "bf16"):
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            ms, peak, warm, final, _, _, stats = _time_mode("bf16-plain" if v == "bench" else "bf16", cfg, dev, True,
                                                            None, x, y, STEPS, WARM, print,
                                                            vocab_multiple=DEFAULT_VOCAB_MULTIPLE[0])
            timed = stats["peak_timed_gib"]
        else:
            name, _, tag = v.partition("+")
            with torch._inductor.config.patch(PATCHES.get(name, {})):
                ms, peak, warm, final, timed = own_loop(name, snapshot=tag == "snapshot")
        row = {"variant": v, "step_ms": round(ms, 2), "tokens_per_s": round(B * T / ms * 1000),
               "peak_gib": round(peak, 2), "peak_timed_gib": round(timed, 2), "warmup_s": round(warm, 1),
               "final_loss": round(final, 4), **extra}
    except Exception as ex:  # noqa: BLE001 - one variant's failure is recorded, the rest still run
        row = {"variant": v, "error": f"{type(ex).__name__}: {str(ex)[:300]}"}
    print(json.dumps(row), flush=True)
    res["rows"].append(row)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
