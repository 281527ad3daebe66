"""`yxanul memory`'s estimate against the peaks `bench throughput` recorded on a GPU: for every row of the given
bench JSON files (a sweep's file too), the measured peak of the timed steps (or of the whole run, in files
written before that was recorded) next to the estimate for the same model, batch, precision and recipe, eager
and compiled the way the bench compiles the mode (the project's modes: compiled blocks; bf16-plain and torchao:
the whole plain model with the full-logit loss over its vocabulary, padded as the file records (unpadded in
files written before that was recorded); the plain model's layers are estimated as the project's).

Usage: python scripts/memory_vs_measured.py BENCH_JSON [BENCH_JSON ...] [--markdown]   (CPU is enough)
"""
import argparse
import dataclasses
import json
import sys

from yxanul.bench.plain import padded_vocab
from yxanul.bench.throughput import scaled_config
from yxanul.config import load_model_config
from yxanul.errors import YxanulError
from yxanul.memory import MemoryOptions, estimate
from yxanul.precision import load_policy

GIB = 2 ** 30


def results(res):
    """(model config, batch, seq, result dict) of a bench JSON: one, or each width of a sweep."""
    if "points" in res:
        base = load_model_config(res["model"])
        layers = res.get("settings", {}).get("layers")
        for p in res["points"]:
            cfg = scaled_config(base, p["d_model"])
            if layers:
                cfg = dataclasses.replace(cfg, n_layers=int(layers))
            yield cfg, p["batch"], res["seq"], p["result"]
    else:
        yield load_model_config(res["model"]), res["batch"], res["seq"], res


def rows_of(path):
    res = json.load(open(path, encoding="utf-8"))
    for cfg, batch, seq, r in results(res):
        for row in r["rows"]:
            mode = row["mode"]
            peak = row.get("peak_timed_gib") or row.get("peak_mem_gib")
            if not isinstance(peak, (int, float)) or isinstance(peak, bool) or not peak > 0 or row.get("error") \
                    or "+" in mode:
                continue
            plain = mode == "bf16-plain" or mode.startswith("torchao")
            # the smallest multiple the file timed (several: the unpadded variant needs most); older files: 1
            mult = min(r.get("plain_vocab_multiple") or [1])
            mcfg = dataclasses.replace(cfg, vocab_size=padded_vocab(cfg.vocab_size, mult)) if plain else cfg
            if mode.startswith("fp8"):
                recipe = {"fp8": "delayed", "fp8-head": "delayed"}.get(mode, mode[len("fp8-"):])
                pol, prec = load_policy().with_recipe(name=recipe), "fp8"
            else:
                pol, prec = load_policy(), "bf16"
            kw = dict(batch=batch, seq=seq, precision=prec, device="cuda", fused_ce="off" if plain else "auto")
            eager = estimate(mcfg, pol, MemoryOptions(**kw))["total_bytes"] / GIB
            scope = "model" if plain else "blocks"
            comp = estimate(mcfg, pol, MemoryOptions(**kw, compiled=scope))["total_bytes"] / GIB
            yield {"file": path, "model": cfg.name, "batch": batch, "measured_gib": peak,
                   "mode": f"{mode} ({mcfg.vocab_size:,} rows)" if plain else mode,
                   "timed": "peak_timed_gib" in row and row["peak_timed_gib"] is not None,
                   "eager_gib": eager, "compiled_gib": comp}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    try:
        rows = [r for p in a.json for r in rows_of(p)]
    except (OSError, ValueError, KeyError, TypeError, YxanulError) as e:
        print(f"memory_vs_measured: error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
    head = ["model", "batch", "mode", "measured GiB", "compiled estimate", "ratio", "eager estimate", "ratio"]
    lines = [[r["model"], str(r["batch"]), r["mode"], f"{r['measured_gib']:.2f}" + ("" if r["timed"] else "*"),
              f"{r['compiled_gib']:.2f}", f"{r['compiled_gib'] / r['measured_gib']:.3f}",
              f"{r['eager_gib']:.2f}", f"{r['eager_gib'] / r['measured_gib']:.3f}"] for r in rows]
    if a.markdown:
        print("| " + " | ".join(head) + " |")
        print("| " + " | ".join(["---"] * 3 + ["---:"] * 5) + " |")
        for ln in lines:
            print("| " + " | ".join(ln) + " |")
    else:
        w = [max(len(x) for x in col) for col in zip(head, *lines)]
        for ln in [head] + lines:
            print("  ".join(x.rjust(n) if i > 2 else x.ljust(n) for i, (x, n) in enumerate(zip(ln, w))))
    print("* the whole run's peak (compilation included): no timed-steps peak in the file (under CUDA graphs the "
          "memory is taken at capture, in the warm-up; older files predate the field)")


if __name__ == "__main__":
    main()
