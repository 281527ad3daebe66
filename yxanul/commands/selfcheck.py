"""`yxanul selfcheck`: native FP8 GEMMs against the emulated reference for every (recipe, shape) of a model."""
from __future__ import annotations

from ._common import print_json, table

_RECIPES = ("blockwise", "tensorwise", "rowwise", "delayed")
MAX_TOKENS = 2 ** 18  # M of the checked GEMMs: 8 x a 16 x 2048 micro-batch; operands of 2 GB at K = 2048


def register(sub):
    p = sub.add_parser("selfcheck", help="check native FP8 GEMMs against the emulated reference")
    p.add_argument("--model", default="yxanul-197m", help="preset name or model YAML whose linear shapes are checked")
    p.add_argument("--tokens", type=int, default=4096, help="M: tokens per micro-batch (default 4096)")
    p.add_argument("--recipes", default=",".join(_RECIPES), help="comma-separated recipes (default: all)")
    p.add_argument("--fp8-format", default="e4m3", choices=("e4m3", "hybrid"), help="recipe fp8_format")
    p.add_argument("--backend", default="auto", choices=("auto", "native", "emulated"),
                   help="auto: native where available, else an emulated-vs-FP32 sanity check")
    p.add_argument("--fp8-fprop-fast-accum", action="store_true",
                   help="check the forward GEMMs with cuBLAS's fast FP8 accumulation (the fprop_fast_accum option; "
                        "per-tensor and row-scaled recipes)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args):
    import sys

    import torch

    from .. import kernels  # noqa: F401  (registers the Triton quantizers the native check runs)
    from ..config import load_model_config
    from ..errors import YxanulError
    from ..fp8.backends import model_shapes, native_available, selfcheck
    from ..fp8.options import Fp8Options
    from ..fp8.recipe import RECIPES, Fp8Recipe

    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    bad = [r for r in recipes if r not in RECIPES]
    if not recipes or bad:
        raise YxanulError(f"unknown recipe(s) {', '.join(bad) or '(none given)'} (expected: {', '.join(RECIPES)})",
                          key="--recipes")
    if not 1 <= args.tokens <= MAX_TOKENS:
        raise YxanulError(f"must be in [1, {MAX_TOKENS}] (M of the checked GEMMs), got {args.tokens}",
                          key="--tokens")
    cfg = load_model_config(args.model)
    ok, why = native_available()
    if args.backend == "native" and not ok:
        raise YxanulError(f"native FP8 backend unavailable: {why}", key="--backend")
    native = ok and args.backend != "emulated"
    shapes = model_shapes(cfg, args.tokens)
    uniq = list(dict.fromkeys((M, K, N) for _, M, K, N in shapes))
    users = {s: [k for k, M, K, N in shapes if (M, K, N) == s] for s in uniq}
    base = Fp8Recipe(fp8_format=args.fp8_format)
    options = Fp8Options(fprop_fast_accum=bool(args.fp8_fprop_fast_accum))
    rows = selfcheck(uniq, recipes, "native" if native else "emulated", base=base, options=options)
    for r in rows:
        r["modules"] = users[(r["M"], r["K"], r["N"])]
    failed = [r for r in rows if not r["ok"]]
    info = {"model": cfg.name, "tokens": args.tokens, "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "compared": "native_vs_emulated" if native else "emulated_vs_fp32",
            "native_available": ok, "native_reason": why, "fp8_format": args.fp8_format,
            "fprop_fast_accum": options.fprop_fast_accum,
            "all_ok": not failed, "rows": rows}
    if args.json:
        print_json(info)
    else:
        if not native:
            print(f"native FP8 backend unavailable ({why}): checking the emulated backend against an FP32 GEMM")
        trows = [[r["recipe"], r["op"], r["M"], r["K"], r["N"], ",".join(r["modules"]),
                  f"{r['rel_err']:.2e}", f"{r['tol']:.0e}", "ok" if r["ok"] else "FAIL" + (f" ({r['error']})" if r["error"] else "")]
                 for r in rows]
        print(table(trows, ["recipe", "op", "M", "K", "N", "modules", "rel_err", "tol", "result"], "llrrrlrrl"))
        print(f"{len(rows) - len(failed)}/{len(rows)} checks passed ({info['compared']}, {info['device']}, "
              f"torch {info['torch']})")
    if failed:
        print(f"yxanul: {len(failed)} self-check(s) failed; those (recipe, shape) pairs fall back to the emulated "
              f"backend", file=sys.stderr)
        return 1
    return 0
