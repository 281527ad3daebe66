"""`yxanul export`: a training checkpoint as a Hugging Face LlamaForCausalLM folder (BF16, or FP8 blocks)."""
from __future__ import annotations

from ._common import print_json


def register(sub):
    p = sub.add_parser("export", help="export a checkpoint as a transformers LlamaForCausalLM folder")
    p.add_argument("ckpt", metavar="CKPT_OR_RUN_DIR", help="run folder (latest checkpoint), step folder, or .safetensors")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--fp8", action="store_true", help="FP8 E4M3 128x128-block weights with quantization_config")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it is an empty folder or an earlier `yxanul export` output")
    p.add_argument("--model", default=None, help="preset or YAML (required for a bare .safetensors file)")
    p.add_argument("--dtype", default="bf16", help="bf16 (default), fp16 or fp32 for the unquantized tensors")
    p.add_argument("--max-shard-size", type=int, default=5 * 1024**3, help="bytes per safetensors shard")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=run)


def run(args):
    from ..checkpoint.export import export_hf
    from ..errors import YxanulError

    if args.max_shard_size <= 0:
        raise YxanulError("must be positive", source="--max-shard-size")
    rep = export_hf(args.ckpt, args.out, fp8=args.fp8, overwrite=args.overwrite, model=args.model,
                    dtype=args.dtype, max_shard_size=args.max_shard_size)
    if args.json:
        print_json(rep)
        return 0
    kind = "FP8 (E4M3, 128x128 blocks)" if args.fp8 else rep["dtype"]
    print(f"exported {rep['model']} ({rep['params']:,} params, {kind}) to {rep['out']}")
    print("files: " + ", ".join(rep["files"]))
    print(f"load with: transformers.AutoModelForCausalLM.from_pretrained({rep['out']!r})")
    return 0
