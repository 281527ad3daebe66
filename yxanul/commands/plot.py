"""`yxanul plot RUN_DIR... --out FILE.png`: train and validation loss curves of one or several runs."""
from __future__ import annotations

import argparse

PLOTTED = ("step", "tokens_seen", "loss", "loss_avg", "val_loss")  # the record fields a chart reads
MAX_PLOTTED = 1e38  # beyond float32's range no logged value can come from a run; larger ones are skipped


def _plottable(*values) -> bool:
    """Every value finite and within MAX_PLOTTED (matplotlib fails on axis ranges near float64's limit)."""
    try:
        return all(abs(float(v)) <= MAX_PLOTTED for v in values)
    except OverflowError:  # an integer beyond float64
        return False


def _shown(text: str) -> str:
    """`text` fit for a chart: bytes that were not UTF-8 (a folder name, an argument) become U+FFFD and ``$`` is
    literal (matplotlib would parse ``$...$`` as math)."""
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text.replace("$", r"\$")


def register(sub) -> None:
    p = sub.add_parser("plot", help="plot loss curves of runs", description="Draw train (solid) and validation "
                       "(dashed, markers) loss against tokens seen for one or several run folders on one chart.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, metavar="FILE.png", help="the chart, written as PNG")
    p.add_argument("--overwrite", action="store_true", help="replace FILE.png if it exists")
    p.add_argument("--x", choices=["step", "tokens"], default="step", help="x axis (default step)")
    p.add_argument("--smooth", type=int, default=1, help="moving average over N logged points")
    p.add_argument("--title", default=None)
    p.set_defaults(func=run)


def read_metrics(run_dir):
    from pathlib import Path

    from ..errors import YxanulError
    from ..io import parse_json

    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise YxanulError("no metrics.jsonl (not a run folder?)", source=str(run_dir))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise YxanulError(f"unreadable: {str(e)[:200]}", source=str(path)) from None
    recs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        rec = parse_json(line, str(path), f"line {n}: ")
        if not isinstance(rec, dict):
            raise YxanulError(f"line {n}: expected a JSON object, got {type(rec).__name__}", source=str(path))
        for key in PLOTTED:
            v = rec.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise YxanulError(f"line {n}: {key} must be a number, got {type(v).__name__}", source=str(path))
        recs.append(rec)
    return recs


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import YxanulError, clip
    from ..io import atomic_path, check_output_file

    if args.smooth < 1:
        raise YxanulError("must be >= 1", source="plot", key="--smooth")
    if not args.out.lower().endswith(".png"):
        raise YxanulError("the chart is written as PNG; give a .png path", key="--out")
    inputs = [Path(r) / "metrics.jsonl" for r in args.runs]
    check_output_file(args.out, args.overwrite, inputs=inputs)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise YxanulError("plotting needs matplotlib (pip install 'yxanul[plot]')", source="plot") from None
    data = [(Path(r), read_metrics(r)) for r in args.runs]
    fig, ax = plt.subplots(figsize=(8, 5))
    xkey = "tokens_seen" if args.x == "tokens" else "step"
    drew = 0
    for i, (run_dir, recs) in enumerate(data):
        color = f"C{i % 10}"
        label = _shown(run_dir.name or str(run_dir))
        tr = [(r[xkey], r["loss"] if r.get("loss_avg") is None else r["loss_avg"]) for r in recs
              if r.get("loss") is not None and r.get(xkey) is not None]
        va = [(r[xkey], r["val_loss"]) for r in recs if r.get("val_loss") is not None and r.get(xkey) is not None]
        n = len(tr) + len(va)
        tr, va = [p for p in tr if _plottable(*p)], [p for p in va if _plottable(*p)]
        if len(tr) + len(va) < n:
            print(f"note: {clip(run_dir / 'metrics.jsonl')}: skipped {n - len(tr) - len(va)} point(s) with a "
                  f"non-finite or out-of-range value (beyond {MAX_PLOTTED:g})")
        if tr:
            xs, ys = zip(*tr)
            k = args.smooth
            ys = [sum(ys[max(0, j - k + 1):j + 1]) / len(ys[max(0, j - k + 1):j + 1]) for j in range(len(ys))]
            ax.plot(xs, ys, color=color, label=f"{label} train", marker="o" if len(xs) == 1 else None)
            drew += 1
        if va:
            xs, ys = zip(*va)
            ax.plot(xs, ys, color=color, linestyle="--", marker="o", markersize=3, label=f"{label} val")
            drew += 1
    if not drew:
        raise YxanulError("no loss records to plot", source=", ".join(args.runs))
    ax.set_xlabel("tokens seen" if args.x == "tokens" else "step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(_shown(args.title or "loss"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.out)
    with atomic_path(out, inputs=inputs, overwrite=args.overwrite) as tmp:
        fig.savefig(tmp, format=out.suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)
    print(f"wrote {clip(out)}")
    return 0
