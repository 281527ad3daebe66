"""`yxanul generate`: sample text from a checkpoint with a KV cache, streaming to stdout."""
from __future__ import annotations

import sys

from ..errors import YxanulError

# far above any prompt that fits a model's max_seq_len tokens (131072 tokens of 128 bytes each)
MAX_PROMPT_BYTES = 16 * 2**20


def register(sub):
    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("ckpt", metavar="CKPT", help="run folder (latest checkpoint), step folder, .safetensors, or a "
                                                "folder written by `yxanul export`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", metavar="FILE",
                     help=f"read the prompt from a UTF-8 text file (at most {MAX_PROMPT_BYTES // 2**20} MiB; "
                          "the prompt must also fit the model's max_seq_len tokens)")
    p.add_argument("--echo-prompt", action="store_true", help="print the prompt before the continuation")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--model", default=None, help="preset or YAML (required for a bare .safetensors file)")
    p.add_argument("--tokenizer", default=None, help="tokenizer spec for a bare .safetensors (default: bytes)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=run)


def read_prompt_file(path: str) -> str:
    """The prompt a file holds; a file (or pipe, or device) of more than MAX_PROMPT_BYTES is refused after
    reading that much, never read whole."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PROMPT_BYTES + 1)
    except OSError as e:
        raise YxanulError(f"cannot read: {e.strerror or e}", source=path, key="--prompt-file") from None
    if len(raw) > MAX_PROMPT_BYTES:
        raise YxanulError(f"holds more than {MAX_PROMPT_BYTES // 2**20} MiB; a prompt must fit the model's "
                          "max_seq_len tokens", source=path, key="--prompt-file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise YxanulError(f"not valid UTF-8 (byte {e.start})", source=path, key="--prompt-file") from None


def run(args):
    from ..generate import SamplingOptions, generate_text

    opts = SamplingOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed)
    if args.prompt_file is not None:
        prompt, source = read_prompt_file(args.prompt_file), args.prompt_file
    else:
        prompt, source = args.prompt, "--prompt"
    pieces = generate_text(args.ckpt, prompt, opts, model=args.model, tokenizer=args.tokenizer,
                           device=args.device, prompt_source=source)
    first = next(pieces, None)  # loading and the first token come before any output: errors leave stdout empty
    if args.echo_prompt:
        sys.stdout.write(prompt)
    for piece in ([first] if first is not None else []):
        sys.stdout.write(piece)
    sys.stdout.flush()
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
