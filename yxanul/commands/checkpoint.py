"""`yxanul checkpoint consolidate`: one safetensors file of FP32 weights from a (sharded) training checkpoint."""
from __future__ import annotations

from ._common import human_bytes, print_json


def register(sub):
    p = sub.add_parser("checkpoint", help="training checkpoint tools (consolidate sharded checkpoints)",
                       description="Tools for training checkpoints.")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    c = actions.add_parser("consolidate", help="merge a checkpoint (DCP shards or single file) into one safetensors",
                           description="Write the FP32 master weights of a training checkpoint (sharded DCP from "
                                       "`torchrun ... train --parallel ddp|fsdp2`, or single-process) to one "
                                       ".safetensors file keyed by model parameter names. Read it with "
                                       "`yxanul export FILE --model PRESET` or `yxanul analyze FILE`.")
    c.add_argument("ckpt", metavar="RUN_OR_CKPT", help="run folder (its latest checkpoint) or step_XXXXXXXX folder")
    c.add_argument("--out", required=True, metavar="FILE.safetensors", help="output file")
    c.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    c.add_argument("--with-buffers", action="store_true",
                   help="also keep non-parameter state (FP8 delayed-scaling histories and scales)")
    c.add_argument("--json", action="store_true", help="print the report as one JSON object")
    c.set_defaults(func=run)


def run(args) -> int:
    from ..checkpoint.sharded import consolidate_checkpoint

    rep = consolidate_checkpoint(args.ckpt, args.out, overwrite=args.overwrite, with_buffers=args.with_buffers)
    if args.json:
        print_json(rep)
        return 0
    print(f"consolidated {rep['format']} checkpoint {rep['source']} (step {rep['step']}, model {rep['model']}): "
          f"{rep['tensors']} tensors, {rep['params']:,} params, {human_bytes(rep['bytes'])} -> {rep['out']}")
    if rep["dropped"]:
        print(f"left out {len(rep['dropped'])} non-parameter tensor(s) (FP8 scaling state); --with-buffers keeps them")
    return 0
