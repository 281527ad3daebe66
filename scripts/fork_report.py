"""The fork protocol's report from recorded fork.json files, with the current statistics: the markdown table,
the delta-per-mode plot (2-sigma bars) and the loss curves of the first file's repeat 0.

Several files (forks of the same protocol in separate processes, each with its own BF16 trunk) are combined as
repeats: file k's repeats follow file k-1's, a mode's delta is the mean over every repeat that ran it, and the
run-to-run noise is pooled over every BF16 pair and every mode's repeats. `FILE:MODE,MODE` keeps only the
listed modes of that file (bf16 is always kept), e.g. to leave out a mode whose code has changed since.

Usage: python scripts/fork_report.py FORK_JSON[:MODES] [FORK_JSON[:MODES] ...] --out DIR [--title TEXT]
(CPU is enough; needs matplotlib). Writes DIR/fork.md, DIR/fork-delta.png and DIR/fork-curves.png (replacing them).
"""
import argparse
import json
from pathlib import Path

from yxanul.bench.quality import FORK_NOISE_MODE, SE_METHOD, fork_markdown, paired_rows, plot, plot_deltas


def load(spec: str):
    path, _, keep = spec.partition(":")
    res = json.loads(Path(path).read_text(encoding="utf-8"))
    keep = {m.strip() for m in keep.split(",") if m.strip()} | {"bf16"} if keep else None
    return res, keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fork_json", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default=None)
    a = ap.parse_args()
    windows, modes, first, offset, sources = {}, [], None, 0, []
    for spec in a.fork_json:
        res, keep = load(spec)
        first = first or res
        reps = set()
        for name, w in res["windows"].items():
            mode, r = name.rsplit("-r", 1)
            if w is None or (keep is not None and mode not in keep):
                continue
            windows[(mode, offset + int(r))] = w
            reps.add(int(r))
            if mode not in modes:
                modes.append(mode)
        sources.append(f"{spec} ({len(reps)} repeat(s), {res.get('date', '?')})")
        offset += max(reps) + 1 if reps else 0
    rows = paired_rows(windows, modes)
    res = dict(first)
    res["repeats"] = offset
    res["noise_floor"] = next((x for x in rows if x["mode"] == FORK_NOISE_MODE), None)
    res["paired"] = [x for x in rows if x["mode"] != FORK_NOISE_MODE]
    res["se_method"] = SE_METHOD
    res["bf16_pairs_bit_identical"] = None if len(a.fork_json) > 1 else first.get("bf16_pairs_bit_identical")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    text = fork_markdown(res)
    if len(a.fork_json) > 1:
        text += "\n\nCombined as repeats, in this order: " + "; ".join(sources)
    (out / "fork.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    title = a.title or f"{res['model']}: fork at step {res['fork_at']} ({res['device']})"
    plot_deltas(([res["noise_floor"]] if res["noise_floor"] else []) + res["paired"], out / "fork-delta.png",
                title=title)
    plot({"model": res["model"], "tokens": res["tokens"], "device": res["device"], "curves": first["curves"]},
         out / "fork-curves.png")


if __name__ == "__main__":
    main()
