"""The fork protocol's report from recorded fork.json files, with the current statistics: the markdown table,
the delta-per-mode plot (2-sigma bars) and the loss curves of the first file's repeat 0. From-scratch comparisons
(`bench quality` without `--fork-at`: quality.json, with bf16 and bf16-b among its modes) are combined the same
way; runs of another seed are then repeats that differ in initialization and data order too. Fork and
from-scratch files are not mixed.

Several files (forks of the same protocol in separate processes, each with its own BF16 trunk) are combined as
repeats: file k's repeats follow file k-1's, a mode's delta is the mean over every repeat that ran it, and the
run-to-run noise is pooled over every BF16 pair and every mode's repeats. `FILE:MODE,MODE` keeps only the
listed modes of that file (bf16 and its twin bf16-b are always kept), e.g. to leave out a mode whose code has
changed since. Files must share the protocol (model, tokens, steps, fork step, batch, seq, lr, warm-up).

Usage: python scripts/fork_report.py FORK_JSON[:MODES] [FORK_JSON[:MODES] ...] --out DIR [--title TEXT]
(CPU is enough; needs matplotlib). Writes DIR/fork.md, DIR/fork-delta.png and DIR/fork-curves.png (replacing them).
"""
import argparse
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

from yxanul.bench import FP8_OPTION_FLAGS
from yxanul.bench.quality import FORK_NOISE_MODE, SE_METHOD, fork_markdown, paired_rows, plot, plot_deltas
from yxanul.errors import YxanulError


def fail(msg: str) -> None:
    print(f"fork_report: error: {msg}", file=sys.stderr)
    sys.exit(2)


# what must agree for forks to be repeats of one protocol
SAME = ("model", "tokens", "steps", "fork_at", "batch", "seq", "lr", "min_lr", "warmup", "deterministic",
        *FP8_OPTION_FLAGS)
# what a file written before the key existed ran with
ABSENT = dict.fromkeys(FP8_OPTION_FLAGS, False)


# a window list's name: MODE-rN (fork.json); in a quality.json MODE for repeat 0 and MODE-rN after it
_NAME = re.compile(r"^(?P<mode>.+)-r(?P<r>[0-9]+)$")
_HEAD = {"model": str, "device": str, "torch": str, "steps": int, "batch": int, "seq": int,
         "tokens": int, "warmup": int, "lr": (int, float)}


def load(spec: str):
    """(path, fork.json contents, the modes to keep or None for all). `spec` is a path, or PATH:MODES; bf16 and
    its twin bf16-b (the file's noise measurement) are always kept."""
    path, keep = spec, ""
    if not Path(spec).exists() and ":" in spec:
        path, _, keep = spec.rpartition(":")
    try:
        res = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        fail(f"{path}: cannot read a fork.json ({type(e).__name__}: {str(e)[:100]})")
    if not isinstance(res, dict) or not isinstance(res.get("windows"), dict):
        fail(f"{path}: not a fork.json (no per-window losses)")
    for key, typ in _HEAD.items():
        if not isinstance(res.get(key), typ) or isinstance(res.get(key), bool):
            fail(f"{path}: {key}: missing or not a {getattr(typ, '__name__', 'number')}")
    if "fork_at" not in res:  # a from-scratch quality.json
        res["fork_at"] = None
    elif not isinstance(res["fork_at"], int) or isinstance(res["fork_at"], bool):
        fail(f"{path}: fork_at: not an int")
    # a quality.json names its modes in its rows: a window list named by one is that mode's repeat 0 (even if
    # the mode's own name ends in -rN)
    rows = res.get("rows") if res["fork_at"] is None else None
    known = {r["mode"] for r in rows if isinstance(r, dict) and isinstance(r.get("mode"), str)} \
        if isinstance(rows, list) else set()
    res["_names"] = {}
    for name, w in res["windows"].items():
        ok = w is None or (isinstance(w, list) and w and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v < 1e6
            for v in w) and sum(w) > 0)
        m = _NAME.match(name)
        if res["fork_at"] is None and (name in known or (not known and not m)):
            res["_names"][name] = (name, 0)
        elif m and (res["fork_at"] is not None or not known or m["mode"] in known):
            res["_names"][name] = (m["mode"], int(m["r"]))
        else:
            ok = False
        if not ok:
            fail(f"{path}: windows.{name}: expected "
                 + ("MODE-rN" if res["fork_at"] is not None else "MODE or MODE-rN (MODE one of the file's modes)")
                 + " with a list of finite, non-negative losses")
    if not isinstance(res.get("curves"), dict):
        res["curves"] = {}
    keep = {m.strip() for m in keep.split(",") if m.strip()} | {"bf16", FORK_NOISE_MODE} if keep else None
    return path, res, keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fork_json", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default=None)
    a = ap.parse_args()
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        fail(f"{out}: exists and is not a folder")
    windows, modes, first, offset, sources, seen, identical = {}, [], None, 0, [], set(), []
    for spec in a.fork_json:
        path, res, keep = load(spec)
        if Path(path).resolve() in seen:
            fail(f"{path}: given twice (one fork counted as two repeats)")
        seen.add(Path(path).resolve())
        first = first or res
        differ = [k for k in SAME if res.get(k, ABSENT.get(k)) != first.get(k, ABSENT.get(k))]
        if differ:
            fail(f"{path}: not the same protocol as {a.fork_json[0]} (differs in {', '.join(differ)})")
        reps = set()
        for name, w in res["windows"].items():
            mode, r = res["_names"][name]
            if w is None or (keep is not None and mode not in keep):
                continue
            windows[(mode, offset + r)] = w
            reps.add(r)
            if mode not in modes:
                modes.append(mode)
        sources.append(f"{spec} ({len(reps)} repeat(s), {res.get('date', '?')})")
        n_reps = max(reps) + 1 if reps else 0
        flags = res.get("bf16_pairs_bit_identical")
        identical += list(flags)[:n_reps] if isinstance(flags, list) else [None] * n_reps
        offset += n_reps
    if "bf16" not in modes:
        fail("no bf16 windows to compare with")
    try:  # everything is computed and drawn before anything in --out is replaced
        rows = paired_rows(windows, modes)
        res = dict(first)
        res["repeats"] = len({r for _, r in windows})
        res["noise_floor"] = next((x for x in rows if x["mode"] == FORK_NOISE_MODE), None)
        res["paired"] = [x for x in rows if x["mode"] != FORK_NOISE_MODE]
        res["se_method"] = SE_METHOD
        res["bf16_pairs_bit_identical"] = identical
        text = fork_markdown(res)
        if len(a.fork_json) > 1:
            text += "\n\nCombined as repeats, in this order: " + "; ".join(sources)
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out, prefix=".fork_report-") as tmp:
            tmp = Path(tmp)
            title = a.title or (f"{res['model']}: fork at step {res['fork_at']} ({res['device']})"
                                if res["fork_at"] is not None else f"{res['model']}: from scratch ({res['device']})")
            plot_deltas(([res["noise_floor"]] if res["noise_floor"] else []) + res["paired"],
                        tmp / "fork-delta.png", title=title)
            names = ["fork-delta.png"]
            if first["curves"]:
                plot({"model": res["model"], "tokens": res["tokens"], "device": res["device"],
                      "curves": first["curves"]}, tmp / "fork-curves.png")
                names.append("fork-curves.png")
            (tmp / "fork.md").write_text(text + "\n", encoding="utf-8")
            for n in names + ["fork.md"]:
                os.replace(tmp / n, out / n)
    except YxanulError as e:
        fail(f"{e}")
    except OSError as e:
        fail(f"{out}: cannot write the report ({e.strerror or e})")
    except Exception as e:  # noqa: BLE001 - a recorded file this script cannot render: one line, not a traceback
        fail(f"cannot render the report ({type(e).__name__}: {str(e)[:200]})")
    print(text)


if __name__ == "__main__":
    main()
