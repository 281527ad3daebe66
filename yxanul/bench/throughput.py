"""Training throughput of one model under several precision modes, side by side, in one process.

Every mode builds the same model from the same seed, trains on the same random tokens with fused AdamW
under BF16 autocast, excludes warm-up (and compilation) from the timing, and times ``steps`` optimizer steps
with CUDA events (wall clock on a CPU). Modes:

  bf16-plain          the model as a user would write it (:mod:`yxanul.bench.plain`: separate linears,
                      F.rms_norm, SDPA with enable_gqa, the factorized tied head, F.cross_entropy over FP32
                      logits; the embedding's rows padded to a multiple of ``plain_vocab_multiple``), autocast
                      BF16, fused AdamW, torch.compile of the whole model, the faster of the compile modes in
                      ``plain_compile_modes`` (default and reduce-overhead on CUDA); nothing of this project's
                      kernels
  bf16                the project's best BF16 path: fused linear cross-entropy (no logits in memory), every
                      transformer block compiled (one shared graph)
  fp8                 the policy's FP8 linears with the recipe ``BEST_RECIPE`` names (the default policy's own
                      recipe is blockwise), native FP8 GEMMs, Triton quantizers, fused cross-entropy
  fp8-blockwise, fp8-tensorwise, fp8-rowwise, fp8-delayed
                      the same with that recipe
  fp8-head            fp8 plus the output head's GEMM in FP8 (tensorwise); the head then takes the chunked loss
  torchao-tensorwise, torchao-rowwise
                      torchao.float8.convert_to_float8_training with that recipe on the plain model, whole
                      model compiled; skipped with a note when torchao is not importable

An FP8 mode may carry variants, ``MODE+VARIANT[+VARIANT]``, so that a choice is timed side by side with the
mode without it in one process: ``fast-accum`` (the ``fprop_fast_accum`` FP8 option for this row),
``fused-producers`` (the ``fused_producers`` FP8 option), ``fused-proj`` (``fused_tensor_projections``),
``swiglu-fp8`` (the recipe's ``cache_swiglu_inputs``) and ``weight-step`` (``weight_cache: step``), e.g.
``--modes bf16,fp8-delayed,fp8-delayed+fast-accum``.

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
from ..config import MAX_LAYERS
from ..flops import flops_per_token, peak_flops
from ..fmt import table
from ..fp8.backends import fast_accum_applies, kernel_overrides
from ..fp8.options import Fp8Options
from ..fp8.recipe import resolve
from ..hostgc import HOST_GC_MODES, GcWatch, release, settle
from . import DEFAULT_MODES, MODES
from .plain import PlainLM, padded_vocab

# the recipe of the `fp8` and `fp8-head` modes: the fastest measured on the H100 (docs/benchmarks.md); the
# policy decides which linears are FP8, the fp8-<recipe> modes measure each recipe
BEST_RECIPE = "delayed"
# bf16-plain's embedding rows: the vocabulary padded to a multiple of 64 (rows that are never a target), as users
# size it so that the head's GEMMs have aligned dimensions (docs/performance.md)
DEFAULT_VOCAB_MULTIPLE = (64,)
ROW_KEYS = ("mode", "tokens_per_s", "step_ms", "peak_mem_gib", "mfu", "ratio_vs_bf16_plain", "ratio_vs_bf16")


# row variants of the FP8 modes (module docstring): name -> (FP8 option, recipe field) set for that row
# variant -> (FP8 option, recipe field, value): the option or field the variant sets, for its row only
MODE_VARIANTS = {"fast-accum": ("fprop_fast_accum", None, True), "fused-producers": ("fused_producers", None, True),
                 "fused-proj": ("fused_tensor_projections", None, True),
                 "swiglu-fp8": (None, "cache_swiglu_inputs", True), "weight-step": ("weight_cache", None, "step")}


def split_mode(mode: str) -> tuple[str, tuple[str, ...]]:
    """``"fp8-delayed+fast-accum"`` -> ``("fp8-delayed", ("fast-accum",))``."""
    base, *variants = mode.split("+")
    return base, tuple(variants)


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in str(text).split(",") if m.strip()]
    if not modes:
        raise YxanulError("no modes given", key="--modes")
    bad = [m for m in modes if split_mode(m)[0] not in MODES]
    if bad:
        raise YxanulError(f"unknown mode(s) {', '.join(bad)} (expected: {', '.join(MODES)})", key="--modes")
    for m in modes:
        base, variants = split_mode(m)
        unknown = [v for v in variants if v not in MODE_VARIANTS]
        if unknown or len(set(variants)) != len(variants):
            raise YxanulError(f"{m}: unknown or repeated variant(s) (expected some of: "
                              f"{', '.join(MODE_VARIANTS)})", key="--modes")
        if variants and not base.startswith("fp8"):
            raise YxanulError(f"{m}: variants apply to the fp8 modes only", key="--modes")
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
                 fp8_options=None, compile_scope="blocks", vocab_multiple=1):
        from ..kernels.linear_ce import use_fused_ce
        from ..model import Yxanul, compile_kwargs, compile_mode_uses_cuda_graphs, compile_model

        self.mode, self.device, self.fp8 = mode, device, False
        # the same arguments for the whole-model compile of bf16-plain and torchao as for the blocks
        ck = compile_kwargs(compile_mode, tune_kernels)
        # CUDA graphs (reduce-overhead) replay a step's kernels without launching them one by one
        self.graphs = bool(compile_ and compile_mode_uses_cuda_graphs(compile_mode))
        torch.manual_seed(0)
        with torch.device(device):  # the plain and torchao modes train the plain model
            plain = mode == "bf16-plain" or mode.startswith("torchao")
            model = PlainLM(cfg, vocab_multiple=vocab_multiple) if plain else Yxanul(cfg)
        self.model = model
        self.notes = []
        fwd = model
        if mode == "bf16-plain":
            fwd = torch.compile(model, **ck) if compile_ else model
        elif mode == "bf16":
            use_fused_ce(model)
            if compile_:
                compile_model(model, compile_scope, **ck)
        elif mode.startswith("fp8"):
            from ..fp8.linear import convert_model
            from ..precision import load_policy

            base, variants = split_mode(mode)
            options = {MODE_VARIANTS[v][0]: MODE_VARIANTS[v][2] for v in variants if MODE_VARIANTS[v][0]}
            fields = {MODE_VARIANTS[v][1]: MODE_VARIANTS[v][2] for v in variants if MODE_VARIANTS[v][1]}
            pol = load_policy(policy_path)
            recipe = BEST_RECIPE if base in ("fp8", "fp8-head") else base[len("fp8-"):]
            pol = pol.with_recipe(name=recipe, calibration_steps=0, **fields)
            self.notes.append(f"recipe {recipe}")
            backend = "native" if device.type == "cuda" else "emulated"
            pol = pol.with_fp8_options(**{**(fp8_options or Fp8Options()).as_dict(), **options})
            spec = resolve(pol.recipe)
            installed = sorted(kernel_overrides(spec, backend, pol.fp8_options))
            if installed:
                self.notes.append("triton quantizers: " + ",".join(installed))
            if fast_accum_applies(spec, backend, pol.fp8_options):
                self.notes.append("fprop fast accumulation")
            if pol.recipe.cache_swiglu_inputs:
                self.notes.append("SwiGLU inputs kept in FP8")
            if pol.fp8_options.weight_cache == "step":
                self.notes.append("weights quantized once per step")
            convert_model(model, pol, backend=backend, quiet=True)
            if any(getattr(m, "fp8_mlp", None) is not None for m in model.modules()):
                self.notes.append("fused FP8 producers")
            if pol.fp8_options.fused_tensor_projections and spec.per_tensor:
                self.notes.append("per-tensor q/k/v and gate/up fused")
            self.fp8 = True
            use_fused_ce(model, head_fp8=(base == "fp8-head"))
            if compile_:
                compile_model(model, compile_scope, **ck)
        elif mode.startswith("torchao"):
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training
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


def _time_mode(*args, matmul_padding=None, **kw):
    """Build a mode, warm it up and time it (:func:`_measure`); ``matmul_padding="off"`` compiles with inductor's
    GEMM padding off (its ``shape_padding``), for the whole timing since inductor compiles lazily at the first
    call; ``vocab_multiple`` (plain-model modes) is :class:`~yxanul.bench.plain.PlainLM`'s."""
    if matmul_padding != "off":
        return _measure(*args, **kw)
    import torch._inductor.config as inductor_config
    with inductor_config.patch(shape_padding=False):
        return _measure(*args, **kw)


def _measure(mode, cfg, device, compile_, policy_path, x, y, steps, warmup, log, profile=0, compile_mode=None,
             tune_kernels=False, fp8_options=None, host_gc="freeze", compile_scope="blocks", vocab_multiple=1):
    release()  # the last mode's frozen objects become collectable
    if compile_:
        torch._dynamo.reset()  # every mode compiles from scratch: no graph or guard carried over from the last
    run = _Run(mode, cfg, device, compile_, policy_path, compile_mode, tune_kernels, fp8_options, compile_scope,
               vocab_multiple)
    t0 = time.perf_counter()
    for _ in range(warmup):
        loss = run.step(x, y)
    _sync(device)
    warm_s = time.perf_counter() - t0
    if warmup and not math.isfinite(float(loss.detach())):
        raise RuntimeError(f"non-finite loss {float(loss)} during warm-up")
    settle(host_gc)
    watch = GcWatch()
    timed_peak = None
    if device.type == "cuda":
        # the peak of building and warm-up (compilation and its autotuning included), then the timed steps' own
        warm_peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with watch:
            start.record()
            for _ in range(steps):
                loss = run.step(x, y)
            end.record()
            torch.cuda.synchronize(device)
        ms = start.elapsed_time(end) / steps
        timed_peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
        peak = max(warm_peak / 2 ** 30, timed_peak)
    else:
        t0 = time.perf_counter()
        with watch:
            for _ in range(steps):
                loss = run.step(x, y)
        ms = (time.perf_counter() - t0) * 1000 / steps
        peak = None
    final = float(loss.detach())
    notes = run.notes
    run_graphs = run.graphs
    prof = None
    if profile and device.type == "cuda":
        from .profile import format_profile, profile_steps
        step_fn = run.step
        prof = profile_steps(lambda: step_fn(x, y), profile, ms)
        del step_fn
        log(format_profile(mode, prof))
    del run
    stats = watch.summary(steps)
    # replayed CUDA graphs allocate nothing: their memory was taken at capture, in the warm-up, so the timed
    # steps' own peak would only count what lives outside the graphs' pools
    stats["peak_timed_gib"] = round(timed_peak, 3) if timed_peak is not None and not run_graphs else None
    return ms, peak, warm_s, final, notes, prof, stats


def _names(v) -> list[str]:
    """A comma-separated option (or a sequence of names) as a list of its non-empty, stripped names."""
    return [m.strip() for m in (v.split(",") if isinstance(v, str) else v) if m.strip()]


def _one_line(e: BaseException, limit: int | None = 200) -> str:
    """``Type: first line of the message``, cut to `limit` characters of message (None: not cut)."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:limit] if str(e) else ''}"


def torchao_missing() -> str | None:
    """Why torchao's float8 training cannot be imported here, or None when it can."""
    try:
        import torchao.float8  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a broken install raises more than ImportError
        return f"torchao is not importable ({_one_line(e, None)})"
    return None


MATMUL_PADDINGS = ("default", "off")


def plain_variants(compile_: bool, device, modes, paddings=("default",), multiples=(1,)) -> list:
    """The (compile mode, matmul padding, vocabulary multiple) triples a plain-model mode is timed with (the fastest
    is reported): eager without compile; on a device without CUDA graphs only the first compile mode, since
    reduce-overhead adds nothing there; inductor pads GEMMs and GEMM speed depends on the logits' alignment on
    CUDA, so elsewhere only the first padding and the first vocabulary multiple."""
    if not compile_:
        return [(None, "default", multiples[0])]
    modes = [None if m == "default" else m for m in modes]
    if device.type != "cuda":
        modes, paddings, multiples = modes[:1], paddings[:1], multiples[:1]
    return [(m, p, a) for m in modes for p in paddings for a in multiples]


def _variant_name(v) -> str:
    cm, pad, mult = v
    return ((cm or "default") + ("" if pad == "default" else f", matmul padding {pad}")
            + ("" if mult == 1 else f", vocabulary padded to a multiple of {mult}"))


def parse_matmul_padding(v) -> list[str]:
    """``--plain-matmul-padding``: ``default`` and/or ``off``, each once."""
    names = _names(v)
    if not names or any(m not in MATMUL_PADDINGS for m in names) or len(set(names)) < len(names):
        raise YxanulError(f"expected default and/or off, each once, got {','.join(names)!r}",
                          key="--plain-matmul-padding")
    return names


def parse_vocab_multiple(v) -> list[int]:
    """``--plain-vocab-multiple``: comma-separated positive integers, each once (1: the vocabulary as it is)."""
    names = _names(str(v) if isinstance(v, int) else v if isinstance(v, str) else [str(a) for a in v])
    try:
        mults = [int(n) for n in names]
    except ValueError:
        mults = []
    if not mults or any(m < 1 for m in mults) or len(set(mults)) < len(mults):
        raise YxanulError(f"expected positive integers, each once (1: the vocabulary as it is), got "
                          f"{','.join(names)!r}", key="--plain-vocab-multiple")
    return mults


def _time_best(mode, variants, time_one, log):
    """Time `mode` under each (compile mode, matmul padding, vocabulary multiple) in `variants`; the fastest variant
    and its result, with every variant's step time and peak memory noted."""
    results = []
    for v in variants:
        if len(variants) > 1:
            log(f"[{mode}] compile mode {_variant_name(v)}")
        res = time_one(v)
        results.append((v, res))
    best_v, best = min(results, key=lambda r: r[1][0])
    ms, pk, warm_s, final, notes, prof, gcs = best
    if len(results) > 1:
        notes = notes + [f"compile mode {_variant_name(best_v)} (step ms, peak GiB: " +
                         "; ".join(f"{_variant_name(v)} {r[0]:.2f}, " + ("-" if r[1] is None else f"{r[1]:.2f}")
                                   for v, r in results) + ")"]
    return best_v, (ms, pk, warm_s, final, notes, prof, gcs)


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
                   plain_compile_modes=("default", "reduce-overhead"), fp8_options: Fp8Options | None = None,
                   host_gc: str = "freeze", compile_scope: str = "blocks", plain_matmul_padding=("default",),
                   plain_vocab_multiple=DEFAULT_VOCAB_MULTIPLE) -> dict:
    """Benchmark every mode; returns the result dict (and writes it to `json_out` after every mode).
    ``plain_compile_modes``: the compile modes bf16-plain is timed with; the fastest is its row.
    ``plain_matmul_padding``: ``default`` and/or ``off`` (inductor's GEMM padding, CUDA only): each is tried for
    bf16-plain (with every compile mode), and the fastest is the row; the torchao modes take bf16-plain's choice
    when it ran before them, else try each.
    ``plain_vocab_multiple``: the embedding sizes bf16-plain is timed with (:class:`~yxanul.bench.plain.PlainLM`'s
    ``vocab_multiple``: the vocabulary padded to a multiple of it, 1 as it is; several on CUDA only), the fastest
    kept; the torchao modes follow like the padding.
    ``profile=N`` (CUDA only) adds each mode's kernel-time breakdown over N more steps (:mod:`.profile`).
    ``compile_mode``: torch.compile's mode (``reduce-overhead`` replays each compiled graph as a CUDA graph);
    ``tune_kernels``: inductor's coordinate-descent tuning of the generated kernels, for every compiled mode;
    ``compile_scope``: what the project's modes compile, ``blocks`` or the whole ``trunk``
    (:func:`yxanul.model.compile_model`; bf16-plain and torchao always compile the whole plain model);
    ``fp8_options``: how the fp8 modes' layers compute (:class:`~yxanul.fp8.options.Fp8Options`);
    ``host_gc``: ``freeze`` collects and freezes Python's garbage after each mode's warm-up, ``default`` leaves
    the collector alone (:mod:`yxanul.hostgc`); each row records the collections inside its timed steps."""
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
    from ..model import COMPILE_MODES, COMPILE_SCOPES
    if compile_scope not in COMPILE_SCOPES:
        raise YxanulError(f"expected one of {', '.join(COMPILE_SCOPES)}, got {compile_scope!r}", key="--compile-scope")
    fp8_options = (fp8_options or Fp8Options()).validate("bench throughput")
    if host_gc not in HOST_GC_MODES:
        raise YxanulError(f"expected one of {', '.join(HOST_GC_MODES)}, got {host_gc!r}", key="--host-gc")
    if compile_mode is not None and compile_mode not in COMPILE_MODES:
        raise YxanulError(f"unknown compile mode {compile_mode!r} (expected one of "
                          f"{', '.join(COMPILE_MODES)})", key="--compile-mode")
    compile_mode = None if compile_mode == "default" else compile_mode
    plain_compile_modes = _names(plain_compile_modes)
    bad = [m for m in plain_compile_modes if m not in COMPILE_MODES]
    if bad or not plain_compile_modes:
        raise YxanulError(f"unknown or no compile mode(s) {', '.join(bad)} (expected some of: "
                          f"{', '.join(COMPILE_MODES)})", key="--plain-compile-modes")
    plain_matmul_padding = parse_matmul_padding(plain_matmul_padding)
    plain_vocab_multiple = parse_vocab_multiple(plain_vocab_multiple)
    if all(m.startswith("torchao") for m in modes) and (missing := torchao_missing()):
        raise YxanulError(f"{missing}: every mode asked for needs it (install torchao, or add other modes)",
                          key="--modes")
    if tune_kernels and not compile:
        raise YxanulError("--tune-kernels needs torch.compile (drop --no-compile)", key="--tune-kernels")
    from ..config import ModelConfig
    cfg = model if isinstance(model, ModelConfig) else load_model_config(model)
    if layers is not None:
        if not 1 <= layers <= MAX_LAYERS:
            raise YxanulError(f"must be in [1, {MAX_LAYERS}], got {layers}", key="--layers")
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
              "compile_scope": compile_scope if compile else None,
              "fp8_options": fp8_options.as_dict(), "host_gc": host_gc,
              "plain_matmul_padding": list(plain_matmul_padding), "plain_vocab_multiple": plain_vocab_multiple,
              "rows": []}
    if profile and dev.type != "cuda":
        log("bench throughput: --profile needs CUDA kernels to time; no profile on this device")
    log(f"bench throughput: {result['model']} on {result['device']}, batch {batch} x seq {seq}, "
        f"{steps} timed steps after {warmup} warm-up, compile="
        f"{(compile_mode or 'on') if compile else 'off'}")
    plain_pick = None   # the (matmul padding, vocabulary multiple) of bf16-plain's fastest variant, once it has run
    for mode in modes:
        row = _empty_row(mode)
        if mode.startswith("torchao") and (missing := torchao_missing()):
            row["skipped"] = missing
            log(f"[{mode}] skipped: {row['skipped']}")
            result["rows"].append(row)
            if json_out:
                atomic_write_json(json_out, result)
            continue
        log(f"[{mode}] building and warming up ...")
        _free(dev)
        try:
            try:
                if mode == "bf16-plain" or mode.startswith("torchao"):
                    def one(v):
                        _free(dev)
                        return _time_mode(mode, cfg, dev, compile, policy, x, y, steps, warmup, log, profile, v[0],
                                          tune_kernels, host_gc=host_gc, matmul_padding=v[1], vocab_multiple=v[2])
                    cms = plain_compile_modes if mode == "bf16-plain" else [compile_mode or "default"]
                    # torchao converts the plain model's linears, not its head: it takes the padding and vocabulary
                    # size bf16-plain chose in this run (both concern the head's GEMMs), or tries each itself
                    follow = mode != "bf16-plain" and plain_pick is not None
                    pads, mults = ([plain_pick[0]], [plain_pick[1]]) if follow else (plain_matmul_padding,
                                                                                      plain_vocab_multiple)
                    best, (ms, pk, warm_s, final, notes, prof, gcs) = _time_best(
                        mode, plain_variants(compile, dev, cms, pads, mults), one, log)
                    if mode == "bf16-plain":
                        plain_pick = best[1:]
                    elif follow and (len(plain_matmul_padding) > 1 or len(plain_vocab_multiple) > 1):
                        notes = notes + [f"matmul padding {plain_pick[0]}" + (
                            f", vocabulary padded to a multiple of {plain_pick[1]}" if plain_pick[1] != 1 else "")
                            + ", as bf16-plain's fastest"]
                else:
                    ms, pk, warm_s, final, notes, prof, gcs = _time_mode(
                        mode, cfg, dev, compile, policy, x, y, steps, warmup, log, profile, compile_mode, tune_kernels,
                        fp8_options, host_gc, compile_scope)
            except Exception as e:  # noqa: BLE001
                if (not compile or compile_mode or tune_kernels or mode == "bf16-plain" or compile_scope != "blocks"
                        or isinstance(e, torch.cuda.OutOfMemoryError)):
                    raise
                why = _one_line(e)
                log(f"[{mode}] compiled run failed ({why}); retrying without torch.compile")
                _free(dev)
                try:
                    ms, pk, warm_s, final, notes, prof, gcs = _time_mode(mode, cfg, dev, False, policy, x, y, steps,
                                                                         warmup, log, profile, fp8_options=fp8_options,
                                                                         host_gc=host_gc)
                except Exception as e2:  # noqa: BLE001  (the row names both failures, not only the retry's)
                    # an eager step saves more than a compiled one: a batch chosen for compiled blocks may not fit
                    raise RuntimeError(f"compiled run failed ({why}); the eager retry failed too "
                                       f"({_one_line(e2)})") from e2
                notes = notes + ["not compiled (compile failed)"]
            tps = batch * seq / (ms / 1000)
            row.update(tokens_per_s=round(tps, 1), step_ms=round(ms, 3),
                       peak_mem_gib=round(pk, 3) if pk is not None else None,
                       mfu=round(tps * fpt / peak, 4) if peak else None, **gcs)
            if notes:
                row["notes"] = "; ".join(notes)
            if prof is not None:
                row["profile"] = prof
            timed = gcs.get("peak_timed_gib")
            log(f"[{mode}] {tps:,.0f} tok/s, {ms:.2f} ms/step, peak "
                f"{'%.2f GiB' % pk if pk is not None else 'n/a'}"
                f"{' (timed steps %.2f)' % timed if timed is not None else ''}, warm-up {warm_s:.1f}s, "
                f"final loss {final:.4f}")
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
    release()
    return result


def format_table(result: dict) -> str:

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    rows = []
    for r in result["rows"]:
        if r.get("error") or r.get("skipped"):
            rows.append([r["mode"], "failed" if r.get("error") else "skipped", "", "", "", "", "",
                         (r.get("error") or r["skipped"])[:80]])
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


# ---------------------------------------------------------------------------------------------------------------
# width sweep: where FP8 starts to pay
# ---------------------------------------------------------------------------------------------------------------
SWEEP_KEYS = ("d_model",)
SWEEP_MEMORY_FRACTION = 0.85   # the batch is the largest whose estimate fits this share of the GPU's memory


def parse_sweep(text: str) -> tuple[str, list[int]]:
    """``d_model=768,1024`` -> ("d_model", [768, 1024])."""
    key, sep, vals = str(text).partition("=")
    key = key.strip()
    if not sep or key not in SWEEP_KEYS:
        raise YxanulError(f"expected {'|'.join(SWEEP_KEYS)}=V1,V2,..., got {text!r}", key="--sweep")
    try:
        values = [int(v) for v in vals.split(",") if v.strip()]
    except ValueError:
        raise YxanulError(f"values must be integers, got {vals!r}", key="--sweep") from None
    if not values or any(v <= 0 for v in values) or len(set(values)) != len(values):
        raise YxanulError(f"needs distinct positive values, got {vals!r}", key="--sweep")
    return key, values


def parse_sweep_batch(text, n: int) -> list[int] | None:
    """``16,16,8`` (or a list) -> [16, 16, 8]: one positive batch per sweep value (`n` of them); None stays None."""
    if text is None:
        return None
    parts = [str(p).strip() for p in (text if isinstance(text, (list, tuple)) else str(text).split(","))]
    try:
        batches = [int(p) for p in parts]
    except ValueError:
        raise YxanulError(f"expected comma-separated integers, got {text!r}", key="--sweep-batch") from None
    if any(b <= 0 for b in batches):
        raise YxanulError(f"batches must be positive, got {text!r}", key="--sweep-batch")
    if len(batches) != n:
        raise YxanulError(f"gives {len(batches)} batches for {n} sweep values; give one per value",
                          key="--sweep-batch")
    return batches


def scaled_config(cfg, d_model: int):
    """`cfg` at width `d_model`: same depth, head size and embedding rank; query heads d_model / head_dim, KV heads
    and the SwiGLU width scaled in proportion (KV heads rounded to a divisor of the query heads, the SwiGLU width
    to a multiple of 128)."""
    if d_model % cfg.head_dim:
        raise YxanulError(f"{d_model} is not a multiple of the head size {cfg.head_dim}", key="--sweep")
    heads = d_model // cfg.head_dim
    kv = max(1, min(heads, round(cfg.n_kv_heads * heads / cfg.n_heads)))
    while heads % kv:
        kv -= 1
    ffn = max(128, round(cfg.ffn_hidden * d_model / cfg.d_model / 128) * 128)
    return dataclasses.replace(cfg, d_model=d_model, n_heads=heads, n_kv_heads=kv, ffn_hidden=ffn,
                               name=f"{cfg.name}@d{d_model}").validate("--sweep")


def fitting_batch(cfg, policy, batch: int, seq: int, budget_bytes: float | None, modes,
                  compiled: bool = False, plain_vocab_multiple=DEFAULT_VOCAB_MULTIPLE) -> int:
    """The largest batch <= `batch` (halving) whose estimated training memory fits `budget_bytes` for every mode
    in `modes` (the plain and torchao modes take full logits over the vocabulary padded to the smallest of
    `plain_vocab_multiple`, the variant that needs most), estimated as the bench runs them when `compiled`
    (the project's modes with compiled blocks, the plain ones compiled whole); `batch` itself without a budget."""
    if budget_bytes is None:
        return batch
    from ..memory import MemoryOptions, estimate
    from ..precision import load_policy

    pol = load_policy(policy)
    budget = budget_bytes
    plain_cfg = dataclasses.replace(
        cfg, vocab_size=padded_vocab(cfg.vocab_size, min(parse_vocab_multiple(plain_vocab_multiple))))
    fused = ["on"] + (["off"] if any(m == "bf16-plain" or m.startswith("torchao") for m in modes) else [])
    scope = {"on": "blocks" if compiled else "none", "off": "model" if compiled else "none"}
    model_of = {"on": cfg, "off": plain_cfg}
    b = batch
    while b > 1:
        need = max(estimate(model_of[f], pol, MemoryOptions(batch=b, seq=seq, precision="bf16", device="cuda",
                                                            fused_ce=f, compiled=scope[f]))["total_bytes"]
                   for f in fused)
        if need <= budget:
            break
        b //= 2
    return b


def _sweep_settings(model: str, batch: int, seq: int, modes, policy, kw: dict) -> dict:
    """What a width's result depends on besides the width and the device: a resumed sweep reuses a width only
    where these are equal."""
    keep = ("steps", "warmup", "compile", "compile_mode", "compile_scope", "tune_kernels", "plain_compile_modes",
            "host_gc", "fp8_options", "layers", "profile")
    out = {"model": str(model), "batch": batch, "seq": seq, "modes": list(modes), "policy": policy}
    for k in keep:
        v = kw.get(k)
        out[k] = v if v is None or isinstance(v, (bool, int, float, str)) else repr(v)
    return out


def _resumed_points(path, key: str, values, settings: dict, device_name: str) -> dict:
    """The finished widths of the sweep JSON at `path` ({value: point}); a file of another sweep, other settings
    or another device is refused with one line naming it."""
    import json
    src = str(path)
    try:
        old = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise YxanulError(f"cannot resume from it: {e.__class__.__name__}", source=src, key="--resume") from None
    if not isinstance(old, dict) or old.get("sweep") != key or not isinstance(old.get("points"), list):
        raise YxanulError(f"is not a {key} sweep; cannot resume from it", source=src, key="--resume")
    if old.get("settings") != settings:
        diff = sorted(k for k in set(settings) | set(old.get("settings") or {})
                      if (old.get("settings") or {}).get(k) != settings.get(k))
        raise YxanulError("was run with other settings (" + ", ".join(diff or ["none recorded"]) + "); "
                          "resume with the same flags or start a new file", source=src, key="--resume")
    if old["points"] and old.get("device") != device_name:
        raise YxanulError(f"was measured on {old.get('device')!r}, this is {device_name!r}; ratios are compared "
                          "within one machine", source=src, key="--resume")
    def number(v, none_ok=False):
        return (v is None and none_ok) or (isinstance(v, (int, float)) and not isinstance(v, bool) and v == v)

    def finished(r):   # a measured row (a width where a mode failed runs again)
        return (isinstance(r, dict) and isinstance(r.get("mode"), str) and number(r.get("tokens_per_s"))
                and r["tokens_per_s"] > 0 and not r.get("error")
                and all(number(r.get(k), True) for k in ("ratio_vs_bf16", "ratio_vs_bf16_plain")))

    done = {}
    for pt in old["points"]:
        if (not isinstance(pt, dict) or not isinstance(pt.get("result"), dict) or not number(pt.get(key))
                or pt[key] not in values or not all(number(pt.get(k)) for k in ("params", "batch"))):
            continue
        rows = pt["result"].get("rows")
        if isinstance(rows, list) and all(finished(r) for r in rows):
            done[pt[key]] = pt
    return done


def run_sweep(sweep: str, model: str = "yxanul-197m", batch: int = 16, seq: int = 2048, modes=DEFAULT_MODES,
              device: str | None = None, policy: str | None = None, json_out=None, log=None, resume: bool = False,
              sweep_batch=None, **kw) -> dict:
    """Run :func:`run_throughput` at each width of `sweep` (``d_model=768,1024,...``) and collect each mode's
    tokens/s ratio against the project's BF16 and plain BF16. The batch at a width is `batch` halved until the
    memory estimate fits the GPU, or the width's entry of `sweep_batch` (``"16,16,8,8"`` or a list, one per
    width). The JSON is rewritten after every width; with `resume`, the widths an earlier run of the same sweep
    wrote to `json_out` (same settings, same device) are kept and only the others run, so a sweep longer than one
    sitting finishes in several."""
    from ..model import param_count
    from ..config import load_model_config
    from ..io import atomic_write_json

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    key, values = parse_sweep(sweep)
    batches = parse_sweep_batch(sweep_batch, len(values))
    modes = parse_modes(",".join(modes) if not isinstance(modes, str) else modes)
    if "bf16" not in modes:
        raise YxanulError("a sweep compares against the project's bf16: include it in --modes", key="--modes")
    settings = _sweep_settings(model, batch, seq, modes, policy, kw)
    if batches is not None:  # only when given: files written before the option resume as before
        settings["sweep_batch"] = batches
    padding = parse_matmul_padding(kw.get("plain_matmul_padding", "default"))
    if padding != ["default"]:  # likewise
        settings["plain_matmul_padding"] = ",".join(padding)
    mults = parse_vocab_multiple(kw.get("plain_vocab_multiple", DEFAULT_VOCAB_MULTIPLE))
    settings["plain_vocab_multiple"] = ",".join(map(str, mults))
    base = load_model_config(model)
    if kw.get("layers") is not None:
        base = dataclasses.replace(base, n_layers=int(kw.pop("layers")))
    kw.pop("layers", None)
    cfgs = [scaled_config(base, v) for v in values]   # every width checked before any run
    if json_out and Path(json_out).is_dir():
        raise YxanulError("is a folder; give a file path for the JSON", source=str(json_out), key="--json-out")
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise YxanulError(f"unknown device {device!r} (expected cpu or cuda)", key="--device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise YxanulError("CUDA is not available on this machine", key="--device")
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    done = {}
    if resume:
        if not json_out:
            raise YxanulError("needs --json-out: the sweep file to continue", key="--resume")
        if Path(json_out).exists():
            done = _resumed_points(json_out, key, values, settings, device_name)
    out = {"sweep": key, "values": values, "model": base.name, "seq": seq, "modes": modes, "settings": settings,
           "points": [], "ratio_vs_bf16": {m: [] for m in modes}, "ratio_vs_bf16_plain": {m: [] for m in modes}}
    budget = (SWEEP_MEMORY_FRACTION * torch.cuda.get_device_properties(dev).total_memory
              if dev.type == "cuda" else None)
    for i, (v, cfg) in enumerate(zip(values, cfgs)):
        if v in done:
            point = done[v]
            log(f"== sweep {key}={v}: kept from {json_out} (measured earlier, same settings and device)")
        else:
            b = batches[i] if batches is not None else fitting_batch(
                cfg, policy, batch, seq, budget, modes, compiled=kw.get("compile", True),
                plain_vocab_multiple=kw.get("plain_vocab_multiple", DEFAULT_VOCAB_MULTIPLE))
            log(f"== sweep {key}={v}: {cfg.n_heads} heads ({cfg.n_kv_heads} KV), SwiGLU {cfg.ffn_hidden}, "
                f"batch {b}" + (" (--sweep-batch)" if batches is not None else ""))
            res = run_throughput(model=cfg, batch=b, seq=seq, modes=modes, device=device, policy=policy, log=log,
                                 **kw)
            point = {key: v, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
                     "ffn_hidden": cfg.ffn_hidden, "params": param_count(cfg), "batch": b, "result": res}
        rows = {r["mode"]: r for r in point["result"]["rows"]}
        for m in modes:
            out["ratio_vs_bf16"][m].append(rows.get(m, {}).get("ratio_vs_bf16"))
            out["ratio_vs_bf16_plain"][m].append(rows.get(m, {}).get("ratio_vs_bf16_plain"))
        out["device"], out["torch"] = point["result"].get("device", device_name), point["result"].get("torch")
        out["points"].append(point)
        if json_out:
            atomic_write_json(json_out, out)
    return out


def format_sweep(res: dict) -> str:
    key = res["sweep"]
    head = [key, "params", "batch"] + [f"{m} / bf16" for m in res["modes"]]
    rows = []
    for i, p in enumerate(res["points"]):
        rows.append([str(p[key]), f"{p['params']:,}", str(p["batch"])] +
                    ["-" if res["ratio_vs_bf16"][m][i] is None else f"{res['ratio_vs_bf16'][m][i]:.3f}"
                     for m in res["modes"]])
    return (f"{res['model']} width sweep on {res.get('device', '?')}, seq {res['seq']}: tokens/s against the "
            f"project's bf16\n" + table(rows, head, "l" + "r" * (len(head) - 1)))


def plot_sweep(res: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_path
    key = res["sweep"]
    xs = [p[key] for p in res["points"]]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for m in res["modes"]:
        pts = [(x, r) for x, r in zip(xs, res["ratio_vs_bf16"][m]) if r is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m,
                    linestyle="--" if m == "bf16" else "-")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel(key)
    ax.set_ylabel("tokens/s vs project bf16")
    ax.set_xticks(xs)
    ax.set_title(f"{res['model']} width sweep, seq {res['seq']}, {res.get('device', '')}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
