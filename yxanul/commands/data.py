"""`yxanul data prepare`: text / jsonl / parquet (optionally .xz/.gz) -> uint32 token shards + meta.json."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("data", help="prepare training data", description="Prepare training data.")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=type(p))
    q = dsub.add_parser("prepare", help="tokenize inputs into uint32 shards",
                        description="Tokenize text (.txt/.md, optionally .xz/.gz), JSON lines (`text` field), "
                                    "parquet (`text` column) or hf:DATASET[:SPLIT] into train_NNN.bin / "
                                    "val_NNN.bin shards and meta.json. In text files a line `<|endoftext|>` "
                                    "separates documents; each document gets the tokenizer's end-of-text id.")
    q.add_argument("inputs", nargs="+", metavar="INPUT")
    q.add_argument("--tokenizer", default="bytes", help="bytes | o200k | PATH (tiktoken ranks or tokenizer.json)")
    q.add_argument("--out", required=True, metavar="DIR")
    q.add_argument("--val", nargs="+", metavar="INPUT", help="explicit validation inputs (no random split)")
    q.add_argument("--val-fraction", type=float, default=0.01, help="share of documents for validation")
    q.add_argument("--workers", type=int, default=1,
                   help="tokenizer processes (default 1; more than the available CPUs are clamped to their number)")
    q.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard (default 2^27)")
    q.add_argument("--errors", choices=("strict", "replace"), default="replace",
                   help="invalid UTF-8 in text inputs: replace with U+FFFD and count (default), or stop (strict)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace DIR if it is an empty folder or an earlier `yxanul data prepare` output")
    q.add_argument("--no-progress", dest="progress", action="store_false")
    q.set_defaults(func=run_prepare)
    i = dsub.add_parser("info", help="summarize a prepared data folder")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=run_info)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_prepare(args: argparse.Namespace) -> int:
    from ..data.prepare import DEFAULT_SHARD_TOKENS, max_workers, prepare
    from ..errors import YxanulError

    if args.shard_tokens is not None and args.shard_tokens <= 0:
        raise YxanulError("must be positive", source="data prepare", key="--shard-tokens")
    cpus = max_workers()
    if args.workers > cpus:
        print(f"note: --workers {args.workers} is more than the {cpus} available CPU(s); using {cpus}")
    meta = prepare(args.inputs, args.tokenizer, args.out, val_fraction=args.val_fraction, workers=args.workers,
                   overwrite=args.overwrite, val_inputs=args.val, shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS,
                   progress=args.progress, errors=args.errors)
    s = meta["splits"]
    print(f"{args.out}: tokenizer {meta['tokenizer']['name']} (vocab {meta['vocab_size']}, eot {meta['eot_id']}) | "
          f"train {s['train']['tokens']:,} tokens / {s['train']['documents']:,} docs | "
          f"val {s['val']['tokens']:,} tokens / {s['val']['documents']:,} docs")
    if meta.get("val_source") == "train tail":
        print(f"note: no document fell into validation (too few documents for --val-fraction "
              f"{meta['val_fraction']}); validation is the last {s['val']['tokens']:,} tokens of the training "
              f"text, carved from its tail; pass --val FILE for a separate validation set")
    if meta.get("invalid_utf8_replaced"):
        print(f"note: {meta['invalid_utf8_replaced']:,} invalid UTF-8 sequence(s) replaced with U+FFFD "
              f"(--errors strict refuses them)")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from ..data.loader import read_meta
    from ._common import print_json, table

    meta = read_meta(args.dir)
    if args.json:
        print_json(meta)
        return 0
    from ..errors import clip

    def num(v) -> str:
        return f"{v:,}" if isinstance(v, int) else "-"

    rows = [[clip(k, 40), num(v.get("tokens")), num(v.get("documents")), len(v["shards"])]
            for k, v in meta["splits"].items()]
    tok = meta["tokenizer"]
    print(f"tokenizer: {clip(tok.get('name'), 80)} ({clip(tok.get('kind'), 40)}), vocab {meta['vocab_size']}, "
          f"eot {clip(meta.get('eot_id'), 40)}")
    print(table(rows, ["split", "tokens", "documents", "shards"], "lrrr"))
    return 0
