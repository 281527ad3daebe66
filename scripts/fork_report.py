"""The fork protocol's report from a recorded fork.json, with the current statistics: the markdown table, the
delta-per-mode plot (2-sigma bars) and the loss curves of repeat 0.

Usage: python scripts/fork_report.py FORK_JSON --out DIR [--title TEXT]   (CPU is enough; needs matplotlib)
Writes DIR/fork.md, DIR/fork-delta.png and DIR/fork-curves.png (replacing them).
"""
import argparse
import json
from pathlib import Path

from yxanul.bench.quality import FORK_NOISE_MODE, SE_METHOD, fork_markdown, paired_rows, plot, plot_deltas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fork_json")
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default=None)
    a = ap.parse_args()
    res = json.loads(Path(a.fork_json).read_text(encoding="utf-8"))
    windows, modes = {}, []
    for name, w in res["windows"].items():
        mode, r = name.rsplit("-r", 1)
        windows[(mode, int(r))] = w
        if mode not in modes:
            modes.append(mode)
    rows = paired_rows(windows, modes)
    res["noise_floor"] = next((x for x in rows if x["mode"] == FORK_NOISE_MODE), None)
    res["paired"] = [x for x in rows if x["mode"] != FORK_NOISE_MODE]
    res["se_method"] = SE_METHOD
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    text = fork_markdown(res)
    (out / "fork.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    title = a.title or f"{res['model']}: fork at step {res['fork_at']} ({res['device']})"
    plot_deltas(([res["noise_floor"]] if res["noise_floor"] else []) + res["paired"], out / "fork-delta.png",
                title=title)
    plot({"model": res["model"], "tokens": res["tokens"], "device": res["device"], "curves": res["curves"]},
         out / "fork-curves.png")


if __name__ == "__main__":
    main()
