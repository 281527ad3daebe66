"""`yxanul bench <what>`: benchmarks. Each subcommand is a function in SUBCOMMANDS that adds its parser to the
`bench` subparsers and sets ``func``; add one by appending to that list (or calling ``add_subcommand``)."""
from __future__ import annotations

SUBCOMMANDS = []


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
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help="comma-separated modes")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers (quick iteration)")
    p.add_argument("--compile", dest="compile", action="store_true", default=True, help="torch.compile (default)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--peak-tflops", type=float, default=None, help="BF16 peak for MFU (default: from device name)")
    p.add_argument("--json-out", default=None, help="write the results JSON here (rewritten after every mode)")
    p.add_argument("--plot", default=None, help="bar chart of tokens/s (PNG; needs matplotlib)")
    p.set_defaults(func=_run_throughput)


def _run_throughput(args):
    from ..errors import YxanulError
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise YxanulError("--plot needs matplotlib (pip install matplotlib)", key="--plot") from None
        if not str(args.plot).lower().endswith(".png"):
            raise YxanulError("the plot is written as PNG; give a .png path", key="--plot")
    from ..bench.throughput import format_table, plot, run_throughput
    result = run_throughput(model=args.model, batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup,
                            modes=args.modes, layers=args.layers, compile=args.compile, device=args.device,
                            policy=args.config, json_out=args.json_out, peak_tflops=args.peak_tflops)
    print(format_table(result), flush=True)
    if args.plot:
        plot(result, args.plot)
    return 0 if any(r.get("tokens_per_s") for r in result["rows"]) else 1


def register(sub):
    p = sub.add_parser("bench", help="benchmarks (throughput, ...)")
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCH", parser_class=type(p))
    for fn in SUBCOMMANDS:
        fn(bsub)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
