"""`yxanul generate`: sample text from a checkpoint with a KV cache, streaming to stdout."""
from __future__ import annotations

import sys


def register(sub):
    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("ckpt", metavar="CKPT", help="run folder (latest checkpoint), step folder, or .safetensors")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--model", default=None, help="preset or YAML (required for a bare .safetensors file)")
    p.add_argument("--tokenizer", default=None, help="tokenizer spec for a bare .safetensors (default: bytes)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=run)


def run(args):
    from ..generate import SamplingOptions, generate_text

    opts = SamplingOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed)
    for piece in generate_text(args.ckpt, args.prompt, opts, model=args.model, tokenizer=args.tokenizer,
                               device=args.device):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
