"""Training throughput of one model under several precision modes, side by side, in one process.

Every mode builds the same model from the same seed, trains on the same random tokens with fused AdamW
under BF16 autocast, excludes warm-up (and compilation) from the timing, and times ``steps`` optimizer steps
with CUDA events (wall clock on a CPU). Modes:

  bf16-plain          the model as a user would write it: autocast BF16, F.cross_entropy over the full FP32
                      logits, fused AdamW, torch.compile of the whole model; nothing of this project's kernels
  bf16                the project's best BF16 path: fused linear cross-entropy (no logits in memory), every
                      transformer block compiled (one shared graph)
  fp8                 the policy's FP8 linears with the fastest measured recipe (tensorwise; the default policy's
                      own recipe is blockwise), native FP8 GEMMs, Triton quantizers, fused cross-entropy
  fp8-blockwise, fp8-tensorwise, fp8-rowwise, fp8-delayed
                      the same with that recipe
  fp8-head            fp8 plus the output head's GEMM in FP8 (tensorwise); the head then takes the chunked loss
  torchao-tensorwise, torchao-rowwise
                      torchao.float8.convert_to_float8_training with that recipe, whole model compiled

A mode that fails records its error in its row and the run goes on. The JSON file is rewritten after every
mode, so an interrupted run keeps the finished rows.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import math
import sys
import time
import traceback

from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: F401  (the plain mode's loss lives in Yxanul.forward)

from .. import kernels  # noqa: F401  (registers the Triton quantizers with the FP8 layers)
from ..errors import YxanulError
from ..flops import flops_per_token, peak_flops
from ..fmt import table
from ..fp8.backends import kernel_overrides
from ..fp8.options import Fp8Options
from ..fp8.recipe import resolve
from . import DEFAULT_MODES, MODES

# the recipe of the `fp8` and `fp8-head` modes: the fastest measured on the H100 (docs/benchmarks.md: delayed
# 1.00x bf16 against tensorwise's 0.97x, both under CUDA graphs); the policy decides which linears are FP8, the
# fp8-<recipe> modes measure each recipe
BEST_RECIPE = "delayed"
ROW_KEYS = ("mode", "tokens_per_s", "step_ms", "peak_mem_gib", "mfu", "ratio_vs_bf16_plain", "ratio_vs_bf16")


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in str(text).split(",") if m.strip()]
    if not modes:
        raise YxanulError("no modes given", key="--modes")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise YxanulError(f"unknown mode(s) {', '.join(bad)} (expected: {', '.join(MODES)})", key="--modes")
    if len(set(modes)) != len(modes):
        raise YxanulError("a mode is listed twice", key="--modes")
    return modes


def _empty_row(mode: str) -> dict:
    row = {k: None for k in ROW_KEYS}
    row["mode"] = mode
    row["error"] = None
    return row


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class _Run:
    """One mode's model, optimizer and step function."""

    def __init__(self, mode, cfg, device, compile_, policy_path, compile_mode=None, tune_kernels=False,
                 fp8_options=None):
        from ..kernels.linear_ce import use_fused_ce
        from ..model import Yxanul, compile_blocks, compile_kwargs, compile_mode_uses_cuda_graphs

        self.mode, self.device, self.fp8 = mode, device, False
        # the same arguments for the whole-model compile of bf16-plain and torchao as for the blocks
        ck = compile_kwargs(compile_mode, tune_kernels)
        # CUDA graphs (reduce-overhead) replay a step's kernels without launching them one by one
        self.graphs = bool(compile_ and compile_mode_uses_cuda_graphs(compile_mode))
        torch.manual_seed(0)
        with torch.device(device):
            model = Yxanul(cfg)
        self.model = model
        self.notes = []
        fwd = model
        if mode == "bf16-plain":
            fwd = torch.compile(model, **ck) if compile_ else model
        elif mode == "bf16":
            use_fused_ce(model)
            if compile_:
                compile_blocks(model, **ck)
        elif mode.startswith("fp8"):
            from ..fp8.linear import convert_model
            from ..precision import load_policy

            pol = load_policy(policy_path)
            recipe = BEST_RECIPE if mode in ("fp8", "fp8-head") else mode[len("fp8-"):]
            pol = pol.with_recipe(name=recipe, calibration_steps=0)
            self.notes.append(f"recipe {recipe}")
            backend = "native" if device.type == "cuda" else "emulated"
            pol = pol.with_fp8_options(**(fp8_options or Fp8Options()).as_dict())
            installed = sorted(kernel_overrides(resolve(pol.recipe), backend, pol.fp8_options))
            if installed:
                self.notes.append("triton quantizers: " + ",".join(installed))
            convert_model(model, pol, backend=backend, quiet=True)
            self.fp8 = True
            use_fused_ce(model, head_fp8=(mode == "fp8-head"))
            if compile_:
                compile_blocks(model, **ck)
        elif mode.startswith("torchao"):
            try:
                from torchao.float8 import Float8LinearConfig, convert_to_float8_training
            except Exception as e:  # noqa: BLE001
                raise RuntimeError(f"torchao is not importable ({type(e).__name__}: {e})") from None
            rec = mode[len("torchao-"):]
            config = Float8LinearConfig.from_recipe_name(rec) if rec != "tensorwise" else Float8LinearConfig()
            convert_to_float8_training(
                model, config=config,
                module_filter_fn=lambda m, fqn: (isinstance(m, torch.nn.Linear) and m.in_features % 16 == 0
                                                 and m.out_features % 16 == 0))
            fwd = torch.compile(model, **ck) if compile_ else model
        self.fwd = fwd
        fused = device.type == "cuda"
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)

    def step(self, x, y):
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = self.fwd(x, y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.fp8:
            from ..fp8.linear import fp8_step
            fp8_step(self.model)
        return loss


def _time_mode(mode, cfg, device, compile_, policy_path, x, y, steps, warmup, log, profile=0, compile_mode=None,
               tune_kernels=False, fp8_options=None):
    if compile_:
        torch._dynamo.reset()  # every mode compiles from scratch: no graph or guard carried over from the last
    run = _Run(mode, cfg, device, compile_, policy_path, compile_mode, tune_kernels, fp8_options)
    t0 = time.perf_counter()
    for _ in range(warmup):
        loss = run.step(x, y)
    _sync(device)
    warm_s = time.perf_counter() - t0
    if warmup and not math.isfinite(float(loss.detach())):
        raise RuntimeError(f"non-finite loss {float(loss)} during warm-up")
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            loss = run.step(x, y)
        end.record()
        torch.cuda.synchronize(device)
        ms = start.elapsed_time(end) / steps
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
    else:
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = run.step(x, y)
        ms = (time.perf_counter() - t0) * 1000 / steps
        peak = None
    final = float(loss.detach())
    notes = run.notes
    prof = None
    if profile and device.type == "cuda":
        from .profile import format_profile, profile_steps
        step_fn = run.step
        prof = profile_steps(lambda: step_fn(x, y), profile, ms)
        del step_fn
        log(format_profile(mode, prof))
    del run
    return ms, peak, warm_s, final, notes, prof


def _ratios(rows):
    base = {r["mode"]: r["tokens_per_s"] for r in rows if r.get("tokens_per_s")}
    for r in rows:
        tps = r.get("tokens_per_s")
        for key, ref in (("ratio_vs_bf16_plain", "bf16-plain"), ("ratio_vs_bf16", "bf16")):
            r[key] = round(tps / base[ref], 4) if tps and ref in base else None


def run_throughput(model: str = "yxanul-197m", batch: int = 16, seq: int = 2048, steps: int = 20, warmup: int = 5,
                   modes=DEFAULT_MODES, layers: int | None = None, compile: bool = True, device: str | None = None,
                   policy: str | None = None, json_out=None, peak_tflops: float | None = None, log=None,
                   profile: int = 0, compile_mode: str | None = None, tune_kernels: bool = False,
                   fp8_options: Fp8Options | None = None) -> dict:
    """Benchmark every mode; returns the result dict (and writes it to `json_out` after every mode).
    ``profile=N`` (CUDA only) adds each mode's kernel-time breakdown over N more steps (:mod:`.profile`).
    ``compile_mode``: torch.compile's mode (``reduce-overhead`` replays each compiled graph as a CUDA graph);
    ``tune_kernels``: inductor's coordinate-descent tuning of the generated kernels, for every compiled mode;
    ``fp8_options``: how the fp8 modes' layers compute (:class:`~yxanul.fp8.options.Fp8Options`)."""
    from ..config import load_model_config
    from ..io import atomic_write_json

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    modes = parse_modes(",".join(modes) if not isinstance(modes, str) else modes)
    for k, v in (("--batch", batch), ("--seq", seq), ("--steps", steps)):
        if not isinstance(v, int) or v < 1:
            raise YxanulError(f"must be a positive integer, got {v!r}", key=k)
    for k, v in (("--warmup", warmup), ("--profile", profile)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise YxanulError(f"must be a non-negative integer, got {v!r}", key=k)
    from ..model import COMPILE_MODES
    fp8_options = (fp8_options or Fp8Options()).validate("bench throughput")
    if compile_mode is not None and compile_mode not in COMPILE_MODES:
        raise YxanulError(f"unknown compile mode {compile_mode!r} (expected one of "
                          f"{', '.join(COMPILE_MODES)})", key="--compile-mode")
    compile_mode = None if compile_mode == "default" else compile_mode
    if tune_kernels and not compile:
        raise YxanulError("--tune-kernels needs torch.compile (drop --no-compile)", key="--tune-kernels")
    cfg = load_model_config(model)
    if layers is not None:
        if layers < 1:
            raise YxanulError(f"must be a positive integer, got {layers}", key="--layers")
        cfg = dataclasses.replace(cfg, n_layers=int(layers))
    if seq > cfg.max_seq_len:
        raise YxanulError(f"sequence length {seq} exceeds the model's max_seq_len {cfg.max_seq_len}", key="--seq")
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise YxanulError(f"unknown device {device!r} (expected cpu or cuda)", key="--device") from None
    if json_out and Path(json_out).is_dir():
        raise YxanulError("is a folder; give a file path for the JSON", source=str(json_out), key="--json-out")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise YxanulError("CUDA is not available", key="--device")
    if policy is not None:
        from ..precision import load_policy
        load_policy(policy)  # fail early on a bad policy file
    peak = peak_tflops * 1e12 if peak_tflops else peak_flops(dev)
    fpt = flops_per_token(cfg, seq)
    g = torch.Generator().manual_seed(1234)
    data = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g).to(dev)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "model": cfg.name if layers is None else f"{cfg.name} ({cfg.n_layers} layers)",
              "batch": batch, "seq": seq, "compile_mode": (compile_mode or "default") if compile else None,
              "tune_kernels": bool(tune_kernels) if compile else None,
              "fp8_options": fp8_options.as_dict(), "rows": []}
    if profile and dev.type != "cuda":
        log("bench throughput: --profile needs CUDA kernels to time; no profile on this device")
    log(f"bench throughput: {result['model']} on {result['device']}, batch {batch} x seq {seq}, "
        f"{steps} timed steps after {warmup} warm-up, compile="
        f"{(compile_mode or 'on') if compile else 'off'}")
    for mode in modes:
        row = _empty_row(mode)
        log(f"[{mode}] building and warming up ...")
        _free(dev)
        try:
            try:
                ms, pk, warm_s, final, notes, prof = _time_mode(mode, cfg, dev, compile, policy, x, y, steps, warmup,
                                                                log, profile, compile_mode, tune_kernels, fp8_options)
            except Exception as e:  # noqa: BLE001
                if (not compile or compile_mode or tune_kernels or mode == "bf16-plain"
                        or isinstance(e, torch.cuda.OutOfMemoryError)):
                    raise
                log(f"[{mode}] compiled run failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                    "retrying without torch.compile")
                _free(dev)
                ms, pk, warm_s, final, notes, prof = _time_mode(mode, cfg, dev, False, policy, x, y, steps, warmup,
                                                                log, profile, fp8_options=fp8_options)
                notes = notes + ["not compiled (compile failed)"]
            tps = batch * seq / (ms / 1000)
            row.update(tokens_per_s=round(tps, 1), step_ms=round(ms, 3),
                       peak_mem_gib=round(pk, 3) if pk is not None else None,
                       mfu=round(tps * fpt / peak, 4) if peak else None)
            if notes:
                row["notes"] = "; ".join(notes)
            if prof is not None:
                row["profile"] = prof
            log(f"[{mode}] {tps:,.0f} tok/s, {ms:.2f} ms/step, peak "
                f"{'%.2f GiB' % pk if pk is not None else 'n/a'}, warm-up {warm_s:.1f}s, final loss {final:.4f}")
        except Exception as e:  # noqa: BLE001  (one mode's failure must not end the run)
            msg = f"{type(e).__name__}: {e}".splitlines()[0][:500]
            row["error"] = msg
            log(f"[{mode}] FAILED: {msg}")
            tb = traceback.format_exc().strip().splitlines()
            log("    " + "\n    ".join(tb[-6:]))
        finally:
            _free(dev)
        result["rows"].append(row)
        _ratios(result["rows"])
        if json_out:
            atomic_write_json(json_out, result)
    return result


def format_table(result: dict) -> str:

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    rows = []
    for r in result["rows"]:
        if r.get("error"):
            rows.append([r["mode"], "failed", "", "", "", "", "", r["error"][:80]])
            continue
        rows.append([r["mode"], f(r["tokens_per_s"], ",.0f"), f(r["step_ms"], ".2f"), f(r["peak_mem_gib"], ".2f"),
                     f(r["mfu"] * 100 if r["mfu"] is not None else None, ".1f"),
                     f(r["ratio_vs_bf16_plain"], ".3f"), f(r["ratio_vs_bf16"], ".3f"), r.get("notes", "")])
    head = (f"{result['model']} on {result['device']} (torch {result['torch']}), batch {result['batch']} x "
            f"seq {result['seq']}")
    return head + "\n" + table(rows, ["mode", "tokens/s", "step ms", "peak GiB", "MFU %", "vs bf16-plain",
                                      "vs bf16", "notes"], "lrrrrrrl")


def plot(result: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_path
    ok = [r for r in result["rows"] if r.get("tokens_per_s")]
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(ok) + 2), 4))
    ax.bar([r["mode"] for r in ok], [r["tokens_per_s"] for r in ok], color="#4477aa")
    for i, r in enumerate(ok):
        if r.get("ratio_vs_bf16_plain"):
            ax.text(i, r["tokens_per_s"], f"{r['ratio_vs_bf16_plain']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("tokens / s")
    ax.set_title(f"{result['model']}, {result['batch']}x{result['seq']}, {result['device']}", fontsize=9)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
