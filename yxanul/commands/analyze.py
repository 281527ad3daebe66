"""`yxanul analyze`: precision distribution of a safetensors checkpoint, from its headers only."""
from __future__ import annotations

from ._common import print_json


def register(sub):
    p = sub.add_parser("analyze", help="precision distribution of a safetensors checkpoint (headers only)",
                       description="Analyze a .safetensors file, a folder of shards, a "
                                   "model.safetensors.index.json, or a training run folder (its latest "
                                   "checkpoint) without reading tensor data.")
    p.add_argument("path", metavar="PATH", help=".safetensors file, folder of shards, index json, or run folder")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--by", choices=("dtype", "component", "layer"), default="component",
                   help="breakdown shown after the distribution (default: component)")
    p.add_argument("--plot", metavar="FILE.png", default=None, help="draw the distribution to a PNG")
    p.add_argument("--overwrite", action="store_true", help="replace the --plot file if it exists")
    p.set_defaults(func=run)


def run(args):
    from ..checkpoint.analyze import analyze, plot, public_json, render
    from ..errors import YxanulError
    from ..io import check_output_file

    if args.plot is not None and not args.plot.lower().endswith(".png"):
        raise YxanulError("plot file must end in .png", key="--plot")
    if args.plot is not None:
        check_output_file(args.plot, args.overwrite, inputs=[args.path], key="--plot")
    report = analyze(args.path)
    if args.plot:
        plot(report, args.plot, overwrite=args.overwrite)
    if args.json:
        print_json(public_json(report))
    else:
        print(render(report, args.by))
        if args.plot:
            print(f"\nplot written to {args.plot}")
    return 0
