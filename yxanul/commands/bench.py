"""`yxanul bench <what>`: benchmarks. Each subcommand is a function in SUBCOMMANDS that adds its parser to the
`bench` subparsers and sets ``func``; add one by appending to that list (or calling ``add_subcommand``)."""
from __future__ import annotations

import math
from pathlib import Path

SUBCOMMANDS = []


def _fp8_option_help(name: str) -> str:
    """The help of `yxanul train`'s field for the FP8 option `name` (yxanul.bench.FP8_OPTION_FLAGS)."""
    from dataclasses import fields
    from ..train_config import TrainConfig
    return next(f.metadata["help"] for f in fields(TrainConfig) if f.name == "fp8_" + name)


def _add_fp8_option_flags(p) -> None:
    from ..bench import FP8_OPTION_FLAGS
    for name in FP8_OPTION_FLAGS:
        p.add_argument("--fp8-" + name.replace("_", "-"), action="store_true", help=_fp8_option_help(name))


def _fp8_option_flags(args) -> dict:
    from ..bench import FP8_OPTION_FLAGS
    return {name: getattr(args, "fp8_" + name) for name in FP8_OPTION_FLAGS}


def add_subcommand(fn):
    """Register a `bench` subcommand: ``fn(bench_subparsers)`` adds its parser and sets ``func``."""
    SUBCOMMANDS.append(fn)
    return fn


@add_subcommand
def _throughput(bsub):
    from ..bench import DEFAULT_MODES, MODES
    p = bsub.add_parser("throughput", help="training tokens/s of several precision modes, side by side",
                        description="Train the same model with each mode on the same random tokens and report "
                                    "tokens/s, step time, peak memory, MFU and ratios. Modes: " + ", ".join(MODES))
    p.add_argument("--model", default="yxanul-197m", help="preset name or model YAML (default yxanul-197m)")
    p.add_argument("--config", default=None, help="precision policy YAML for the fp8 modes")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per mode")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help="comma-separated modes; an fp8 mode may add variants (+fast-accum, +fused-producers, "
                        "+fused-proj, +swiglu-fp8, +weight-step) to time that choice next to the mode without it (e.g. "
                        "fp8-delayed,fp8-delayed+fused-producers)")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers (quick iteration)")
    p.add_argument("--compile", dest="compile", action="store_true", default=True, help="torch.compile (default)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune, "
                        "max-autotune-no-cudagraphs")
    p.add_argument("--tune-kernels", action="store_true",
                   help="inductor's coordinate-descent tuning of the generated kernels, for every compiled mode "
                        "(minutes more compile time)")
    p.add_argument("--compile-scope", default="blocks",
                   help="what the project's modes compile: blocks (each block, one shared graph; default) or trunk "
                        "(embedding, blocks and final norm as one graph: fusion across blocks, one CUDA graph per "
                        "pass, a longer compile)")
    p.add_argument("--sweep", default=None, metavar="d_model=V1,V2,...",
                   help="run every mode at each width (same depth, heads scaled with width, batch halved until "
                        "the memory estimate fits the GPU); --json-out and --plot get the ratios against width")
    p.add_argument("--sweep-batch", default=None, metavar="B1,B2,...",
                   help="with --sweep: the batch at each width, one per value, instead of halving --batch until "
                        "the memory estimate fits")
    p.add_argument("--resume", action="store_true",
                   help="with --sweep: continue the sweep in --json-out, keeping the widths it already holds "
                        "(measured with the same flags on the same GPU) and running the others")
    p.add_argument("--plain-compile-modes", default="default,reduce-overhead",
                   help="compile modes bf16-plain is timed with, comma-separated; the fastest is its row "
                        "(default: default,reduce-overhead; CPU: the first)")
    p.add_argument("--plain-matmul-padding", default="default",
                   help="inductor's GEMM padding for the plain-model modes (bf16-plain, torchao-*): default, off, "
                        "or default,off to time both and keep the faster (CUDA only; default: default)")
    p.add_argument("--plain-vocab-multiple", default=None,
                   help="the plain-model modes' embedding rows: the vocabulary padded to a multiple of this (rows "
                        "that are never a target, as users size it for aligned GEMMs; 1: the vocabulary as it is); "
                        "comma-separated to time each and keep the fastest (CUDA only; default: 64)")
    p.add_argument("--host-gc", choices=("freeze", "default"), default="freeze",
                   help="Python's garbage collector in the timed steps: freeze (collect and freeze after each "
                        "mode's warm-up, so no full collection walks the compiled graphs' objects) or default "
                        "(default: freeze)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--peak-tflops", type=float, default=None, help="BF16 peak for MFU (default: from device name)")
    p.add_argument("--json-out", default=None, help="write the results JSON here (rewritten after every mode)")
    p.add_argument("--plot", default=None, help="bar chart of tokens/s (PNG; needs matplotlib)")
    p.add_argument("--overwrite", action="store_true", help="replace the --json-out and --plot files if they exist")
    p.add_argument("--fp8-kernels", default="auto",
                   help="quantizers of the fp8 modes: auto (Triton on CUDA), triton or torch (default auto)")
    p.add_argument("--fp8-weight-cache", default="graph",
                   help="graph: weights quantized in the compiled graph at every forward (default); step: once per "
                        "optimizer step into static copies")
    _add_fp8_option_flags(p)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="CUDA: profile N more steps per mode and record where the GPU time goes (kernel "
                        "categories: GEMMs, FP8 GEMMs, attention, quantization, cross-entropy, optimizer, idle)")
    p.set_defaults(func=_run_throughput)


def _run_throughput(args):
    from ..errors import YxanulError
    from ..io import check_output_file
    # refused before anything runs: the files are written only after minutes of benchmarking
    if args.resume and not (args.sweep and args.json_out):
        raise YxanulError("continues a sweep: needs --sweep and --json-out", key="--resume")
    if args.sweep_batch is not None and not args.sweep:
        raise YxanulError("sets the batch of each width of a sweep: needs --sweep", key="--sweep-batch")
    if args.peak_tflops is not None and not (math.isfinite(args.peak_tflops) and args.peak_tflops > 0):
        raise YxanulError(f"must be a positive number of TFLOP/s, got {args.peak_tflops}", key="--peak-tflops")
    if args.json_out:
        check_output_file(args.json_out, args.overwrite or args.resume, key="--json-out")
    if args.plot:
        check_output_file(args.plot, args.overwrite, key="--plot")
    if args.json_out and args.plot and Path(args.json_out).resolve() == Path(args.plot).resolve():
        raise YxanulError("--json-out and --plot name the same file", key="--plot")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise YxanulError("--plot needs matplotlib (pip install matplotlib)", key="--plot") from None
        if not str(args.plot).lower().endswith(".png"):
            raise YxanulError("the plot is written as PNG; give a .png path", key="--plot")
    from ..bench.throughput import (DEFAULT_VOCAB_MULTIPLE, format_sweep, format_table, plot, plot_sweep, run_sweep,
                                    run_throughput)
    from ..fp8.options import Fp8Options
    common = dict(model=args.model, batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup,
                  modes=args.modes, layers=args.layers, compile=args.compile, device=args.device,
                  policy=args.config, json_out=args.json_out, peak_tflops=args.peak_tflops, profile=args.profile,
                  compile_mode=args.compile_mode, tune_kernels=args.tune_kernels,
                  plain_compile_modes=args.plain_compile_modes, plain_matmul_padding=args.plain_matmul_padding,
                  plain_vocab_multiple=DEFAULT_VOCAB_MULTIPLE if args.plain_vocab_multiple is None
                  else args.plain_vocab_multiple,
                  fp8_options=Fp8Options(kernels=args.fp8_kernels, weight_cache=args.fp8_weight_cache,
                                         **_fp8_option_flags(args)),
                  host_gc=args.host_gc, compile_scope=args.compile_scope)
    if not args.sweep:
        result = run_throughput(**common)
        print(format_table(result), flush=True)
        if args.plot:
            plot(result, args.plot)
        return 0 if any(r.get("tokens_per_s") for r in result["rows"]) else 1
    res = run_sweep(args.sweep, resume=args.resume, sweep_batch=args.sweep_batch, **common)
    print(format_sweep(res), flush=True)
    if args.plot:
        plot_sweep(res, args.plot)
    ok = all(r is not None for r in res["ratio_vs_bf16"]["bf16"])
    return 0 if ok else 1


def register(sub):
    p = sub.add_parser("bench", help="benchmarks (throughput, ...)")
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCH", parser_class=type(p))
    for fn in SUBCOMMANDS:
        fn(bsub)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


@add_subcommand
def _quality(bsub):
    p = bsub.add_parser("quality", help="loss parity on real text: BF16 vs FP8 policies, same init and batches",
                        description="Train each mode from the same initialization on the same batch order, "
                                    "evaluate on fixed validation windows, and compare final validation loss with "
                                    "BF16, with paired per-window statistics and the run-to-run noise of BF16 pairs and repeats.")
    p.add_argument("--model", default="yxanul-197m", help="preset name or model YAML")
    p.add_argument("--data", default=None, help="prepared data folder (default: the bundled corpus, bytes)")
    p.add_argument("--tokens", type=int, required=True, help="training tokens per mode")
    p.add_argument("--modes", default="bf16,fp8-blockwise,fp8-delayed,fp8-all",
                   help="comma-separated: bf16, fp8, fp8-blockwise, fp8-tensorwise, fp8-rowwise, fp8-delayed, "
                        "fp8-head, fp8-all; bf16-b (BF16 on the same data: the noise floor), bf16-seed2 (BF16 on "
                        "another data order)")
    p.add_argument("--seeds", type=int, default=2,
                   help="1, or 2 (the default) to add a BF16 run with another data order")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr", type=float, default=None)
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default 5%% of the steps)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default steps/20)")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--last-evals", type=int, default=3, help="final loss = mean of the last N evaluations")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--config", default=None, help="precision policy YAML")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", dest="compile", action="store_true", default=False,
                   help="torch.compile the runs")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode of the runs (reduce-overhead: CUDA graphs); not part of the settings "
                        "compared when reusing results")
    p.add_argument("--tune-kernels", action="store_true",
                   help="inductor's coordinate-descent tuning of the compiled kernels (like --compile-mode, not "
                        "part of the compared settings)")
    p.add_argument("--fp8-backend", default="auto")
    p.add_argument("--calibration-steps", type=int, default=None,
                   help="delayed recipe: calibration steps, scaled by the current amax (default: the policy's; the note says 100)")
    _add_fp8_option_flags(p)
    p.add_argument("--repeats", type=int, default=1,
                   help="train every mode this many times with different data orders (paired across modes) and "
                        "report mean differences with standard errors")
    p.add_argument("--fp8-all-recipe", default="blockwise",
                   help="recipe of the fp8-all mode's linears (default blockwise, the note's)")
    p.add_argument("--eval-windows", type=int, default=None, metavar="N",
                   help="final per-window evaluation of every run on the first N validation windows (default: the "
                        "whole validation split); paired statistics against bf16 come from these")
    p.add_argument("--fork-at", type=int, default=None, metavar="STEP",
                   help="fork protocol: train one BF16 trunk to STEP, then every mode from that checkpoint to the "
                        "end; --repeats R repeats with their own data order after the fork, and two BF16 branches "
                        "per repeat for the noise floor")
    p.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms (strict) and cuBLAS's fixed workspace, set before "
                        "CUDA starts; the fork report says whether the two BF16 branches became bit-identical")
    p.add_argument("--out", default="runs/quality", help="folder for the runs, quality.json and the plot")
    p.add_argument("--fresh", action="store_true", help="retrain modes that already have a result in --out")
    p.add_argument("--plot", default=None, help="PNG of train and validation curves (default OUT/quality.png; "
                                                 "with --fork-at OUT/fork-curves.png, repeat 0)")
    p.add_argument("--overwrite", action="store_true", help="replace the --plot file if it exists (the plots inside "
                                                            "OUT are the bench's own and always rewritten)")
    p.set_defaults(func=_run_quality)


def _run_quality(args):
    from pathlib import Path

    from ..bench.quality import format_table, parse_modes, plot, run_quality
    from ..errors import YxanulError
    if args.tokens <= 0 or args.batch <= 0 or args.seq <= 0:
        raise YxanulError("--tokens, --batch and --seq must be positive", key="--tokens")
    if args.deterministic and args.fork_at is None:
        raise YxanulError("--deterministic applies to the fork protocol; add --fork-at STEP", key="--deterministic")
    if args.plot:
        from ..io import check_output_file
        check_output_file(args.plot, args.overwrite, key="--plot")
    modes = parse_modes(args.modes)
    common = dict(batch=args.batch, seq=args.seq, lr=args.lr, min_lr=args.min_lr, warmup=args.warmup,
                  eval_every=args.eval_every, eval_batches=args.eval_batches, eval_windows=args.eval_windows,
                  seed=args.seed, policy=args.config, out=args.out, device=args.device, compile=args.compile,
                  fp8_backend=args.fp8_backend, reuse=not args.fresh, calibration_steps=args.calibration_steps,
                  fp8_all_recipe=args.fp8_all_recipe, repeats=args.repeats, compile_mode=args.compile_mode,
                  tune_kernels=args.tune_kernels,
                  fp8_options=_fp8_option_flags(args))
    if args.fork_at is not None:
        return _run_fork(args, modes, common)
    res = run_quality(args.model, args.data, args.tokens, modes, seeds=args.seeds, last_evals=args.last_evals,
                      **common)
    print(format_table(res), flush=True)
    try:
        plot(res, args.plot or str(Path(args.out) / "quality.png"))
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
    return 0 if all(r.get("error") is None for r in res["rows"]) else 1


def _run_fork(args, modes, common):
    from pathlib import Path

    from ..bench.quality import fork_markdown, plot, plot_deltas, run_fork
    res = run_fork(args.model, args.data, args.tokens, modes, args.fork_at, deterministic=args.deterministic,
                   **common)
    print(fork_markdown(res), flush=True)
    out = Path(args.out)
    try:
        rows = ([res["noise_floor"]] if res["noise_floor"] else []) + res["paired"]
        if rows:
            plot_deltas(rows, out / "fork-delta.png", title=f"{res['model']}: fork at step {res['fork_at']}")
        plot({"model": res["model"], "tokens": res["tokens"], "device": res["device"], "curves": res["curves"]},
             args.plot or str(out / "fork-curves.png"))
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
    return 0 if all(b.get("error") is None for b in res["branches"].values()) else 1
