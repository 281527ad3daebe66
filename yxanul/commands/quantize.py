"""`yxanul quantize` / `yxanul dequantize`: FP8 block checkpoints in the HF FineGrainedFP8 / vLLM layout."""
from __future__ import annotations

from ..errors import clip
from ._common import human_bytes, print_json, table


def register(sub):
    p = sub.add_parser("quantize", help="quantize a safetensors checkpoint's linear weights to FP8 blocks",
                       description="Store every linear weight the precision policy marks FP8 as F8_E4M3 plus a "
                                   "<name>_scale_inv F32 block-scale tensor (HF FineGrainedFP8 / vLLM layout).")
    p.add_argument("src", metavar="IN", help=".safetensors file, folder of shards, or index json")
    p.add_argument("dst", metavar="OUT", help="output folder")
    p.add_argument("--block", type=int, default=128, help="square block size (default 128)")
    p.add_argument("--fmt", default="e4m3", choices=("e4m3", "e5m2"), help="FP8 format (default e4m3)")
    p.add_argument("--pow2-scales", action="store_true", help="round scales up to powers of two (ue8m0)")
    p.add_argument("--skip", nargs="+", default=[], metavar="GLOB", help="tensor/module name globs to keep")
    p.add_argument("--policy", default=None, metavar="POLICY.yaml",
                   help="precision policy (default: configs/mixed_precision_config.yaml)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it is an empty folder or an earlier `yxanul quantize` output")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_quantize)

    d = sub.add_parser("dequantize", help="turn an FP8 block checkpoint back into BF16/FP32",
                       description="Every 1-byte weight with a <name>_scale_inv becomes --dtype; scales are "
                                   "dropped; index and config.json are updated.")
    d.add_argument("src", metavar="IN", help=".safetensors file, folder of shards, or index json")
    d.add_argument("dst", metavar="OUT", help="output folder")
    d.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="output dtype (default bf16)")
    d.add_argument("--block", type=int, default=None,
                   help="square block size, when config.json declares no quantization_config.weight_block_size "
                        "(a different one from a declared size is refused; default: inferred from the shapes "
                        "when unambiguous)")
    d.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it is an empty folder or an earlier `yxanul dequantize` output")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(func=run_dequantize)


def _fmt_err(r) -> tuple[str, str]:
    if "rel_l2" not in r:
        return "-", "-"
    sq = r.get("sqnr_db")
    return f"{r['rel_l2']:.3e}", ("exact" if sq is None else f"{sq:.1f}")


def _print(rep: dict) -> None:
    rows = []
    for r in rep["tensors"]:
        e, s = _fmt_err(r)
        shape = "x".join(map(str, r["shape"])) or "scalar"
        rows.append([clip(r["name"], 80), shape, f"{r['dtype']}->{r['out_dtype']}" if r["action"] != "kept" else r["dtype"],
                     r["action"], e, s, human_bytes(r["bytes_before"]), human_bytes(r["bytes_after"])])
    err_cols = ["rel L2 vs FP8", "SQNR dB"] if rep["command"] == "dequantize" else ["rel L2", "SQNR dB"]
    print(table(rows, ["tensor", "shape", "dtype", "action", *err_cols, "before", "after"], "llllrrrr"))
    t = rep["totals"]
    print()
    rel = f"{t['rel_l2']:.3e}"
    sq = "exact" if t["sqnr_db"] is None else f"{t['sqnr_db']:.2f} dB"
    print(f"{rep['command']}: {clip(rep['input'], 400)} -> {clip(rep['output'], 400)}")
    print(f"tensors: {t['tensors']} ({t['converted']} converted, {t['kept']} kept), "
          f"{t['converted_params']:,} params converted")
    print(f"bytes: {t['bytes_before']:,} ({human_bytes(t['bytes_before'])}) -> {t['bytes_after']:,} "
          f"({human_bytes(t['bytes_after'])}), ratio {t['ratio']:.3f}")
    if rep["command"] == "dequantize":
        print(f"error measured: {rep['error_measured']}: rel L2 {rel}"
              + ("" if t["sqnr_db"] is None else f", SQNR {sq}"))
    else:
        print(f"overall error over converted tensors (original vs FP8 round trip): rel L2 {rel}, SQNR {sq}")
    for w in rep["warnings"]:
        print(f"warning: {clip(w, 1000)}")


def run_quantize(args):
    from ..checkpoint.convert import quantize_checkpoint

    rep = quantize_checkpoint(args.src, args.dst, block=args.block, fmt=args.fmt, pow2_scales=args.pow2_scales,
                              skip=args.skip, policy=args.policy, overwrite=args.overwrite)
    print_json(rep) if args.json else _print(rep)
    return 0


def run_dequantize(args):
    from ..checkpoint.convert import dequantize_checkpoint

    rep = dequantize_checkpoint(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, block=args.block)
    print_json(rep) if args.json else _print(rep)
    return 0
