"""The kernel-time categories of a recorded `bench throughput --profile` JSON, summarized again with the current
rules: record_function annotations that show on the GPU timeline (the optimizer's "Optimizer.step#AdamW.step"
and "Optimizer.zero_grad#AdamW.zero_grad", which files written before the fix counted on top of their kernels)
are left out. Prints one line per profiled mode: step, busy and idle ms, then the categories.
Usage: python scripts/profile_report.py THROUGHPUT_JSON [...]"""
import json
import re
import sys

from yxanul.bench.profile import summarize

ANNOTATION = re.compile(r"^\w+\.\w+#\w+\.\w+$")  # record_function("Optimizer.step#AdamW.step") and the like


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                rows = json.load(f)["rows"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"profile_report: error: {path}: not a bench throughput JSON ({type(e).__name__})",
                  file=sys.stderr)
            return 2
        for r in rows:
            p = r.get("profile")
            if not p:
                continue
            steps = p["steps"]
            kernels = [(n, ms * 1000 * steps, c * steps) for n, ms, c in p["kernels"] if not ANNOTATION.match(n)]
            s = summarize(kernels, steps, p.get("step_ms"))
            cats = ", ".join(f"{k} {v:.1f}" for k, v in sorted(s["categories_ms"].items(), key=lambda kv: -kv[1]))
            print(f"{path}: {r['mode']}: step {s.get('step_ms', float('nan')):.1f} ms, busy {s['gpu_busy_ms']:.1f}, "
                  f"idle {s.get('idle_ms', float('nan')):.1f} | {cats}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
