"""`yxanul train`: train a model; with no arguments, `tiny` on the bundled public-domain corpus on CPU."""
from __future__ import annotations

import argparse

# flag name -> TrainConfig field (flags left unset do not override the YAML train config / checkpoint)
_FLAGS = {
    "model": str, "data": str, "out": str, "steps": int, "batch_size": int, "seq_len": int, "grad_accum": int,
    "lr": float, "min_lr": float, "warmup": int, "weight_decay": float, "clip": float, "seed": int,
    "fp8_recipe": str, "fp8_backend": str, "eval_every": int, "eval_batches": int, "log_every": int,
    "checkpoint_every": int, "keep_last": int, "device": str, "optimizer_states": str, "max_bad_steps": int,
    "tokenizer": str, "inject_nan_at": str, "parallel": str, "fused_ce": str,
    "fp8_calibration_steps": int, "compile_mode": str,
}


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model (default: tiny on the bundled corpus, CPU)",
                       description="Train with the design note's mixed-precision strategy. With no arguments: the "
                                   "tiny preset on the bundled public-domain corpus, on CPU. Flags override "
                                   "--train-config, which overrides the built-in defaults.")
    p.add_argument("--train-config", metavar="YAML", help="train config YAML or preset name (configs/train)")
    p.add_argument("--model", help="model preset or YAML (default tiny)")
    p.add_argument("--config", dest="policy", metavar="POLICY", help="precision policy YAML (default: the note's)")
    p.add_argument("--data", metavar="DIR", help="folder from `yxanul data prepare` (default: bundled corpus)")
    p.add_argument("--tokenizer", help="tokenizer for the bundled corpus when --data is not given (default bytes)")
    p.add_argument("--out", metavar="RUN_DIR", help="run folder (default runs/<timestamp>)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch per rank")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine")
    p.add_argument("--warmup", type=int, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--clip", type=float, help="global grad-norm clip (0: off)")
    p.add_argument("--seed", type=int)
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp8", "fp32"],
                   help="auto (default): bf16, or fp32 on a CPU without fast BF16 matmuls")
    p.add_argument("--fp8-recipe", help="override the policy's recipe: blockwise|tensorwise|rowwise|delayed")
    p.add_argument("--fp8-backend", help="FP8 GEMM backend (default auto)")
    p.add_argument("--fp8-calibration-steps", type=int,
                   help="BF16 steps recording amax before FP8 starts (delayed recipe; default: the policy's)")
    p.add_argument("--eval-every", type=int, help="validation every N steps and at the end (0: never)")
    p.add_argument("--eval-batches", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps and at the end (0: never)")
    p.add_argument("--keep-last", type=int, help="checkpoints to keep")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue a run: a checkpoint folder, a run folder, or (bare) --out's latest checkpoint")
    p.add_argument("--compile", dest="compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--fused-projections", dest="fused_projections", action="store_true", default=None,
                   help="q/k/v and gate/up as one GEMM each where exact (default)")
    p.add_argument("--no-fused-projections", dest="fused_projections", action="store_false")
    p.add_argument("--compile-mode", help="torch.compile mode: default | reduce-overhead (CUDA graphs: no launch "
                                          "overhead; the FP8 blockwise recipe needs it) | max-autotune | "
                                          "max-autotune-no-cudagraphs")
    p.add_argument("--tune-kernels", dest="tune_kernels", action="store_true", default=None,
                   help="tune the compiled blocks' generated kernels (inductor's coordinate descent): minutes more "
                        "compile time, faster FP8 quantization")
    p.add_argument("--no-tune-kernels", dest="tune_kernels", action="store_false")
    p.add_argument("--device", help="cpu | cuda | auto")
    p.add_argument("--parallel", choices=["none", "ddp", "fsdp2"],
                   help="data parallelism across the processes started by torchrun (see docs/distributed.md)")
    p.add_argument("--optimizer-states", choices=["fp32", "bf16"])
    p.add_argument("--fused-ce", choices=["auto", "on", "off"],
                   help="chunked linear cross-entropy without full FP32 logits (auto: on CUDA)")
    p.add_argument("--max-bad-steps", type=int, help="stop after K consecutive non-finite steps")
    p.add_argument("--inject-nan-at", metavar="STEPS", help="debugging aid: make these steps' loss NaN ('5,7-9')")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import YxanulError
    from ..train import TrainConfig, Trainer, load_train_config

    overrides = {k: getattr(args, k) for k in _FLAGS if getattr(args, k, None) is not None}
    for k in ("policy", "precision", "compile", "progress", "tune_kernels", "fused_projections"):
        if getattr(args, k, None) is not None:
            overrides[k] = getattr(args, k)
    resume = None
    base = None
    if args.resume is not None:
        from ..checkpoint.training import resolve_checkpoint
        from ..distributed import read_checkpoint_meta
        if args.resume:
            resume = args.resume
        elif args.out:
            resume = args.out
        else:
            raise YxanulError("bare --resume needs --out RUN_DIR (or pass --resume PATH)", source="--resume")
        ckpt = resolve_checkpoint(resume)
        meta = read_checkpoint_meta(ckpt)
        # how the run is launched (--parallel) is not inherited: a checkpoint resumes in any mode
        base = TrainConfig(**{k: v for k, v in meta.get("train_config", {}).items()
                              if k in TrainConfig.__dataclass_fields__ and k != "parallel"})
        overrides.pop("out", None)
        resume = str(ckpt)
    cfg = load_train_config(args.train_config, overrides, base=base)
    try:
        Trainer(cfg, resume=resume).fit()
    finally:
        if cfg.parallel != "none":
            from ..distributed import destroy_distributed
            destroy_distributed()
            args.exit_without_teardown = True  # see yxanul.cli.main
    return 0
