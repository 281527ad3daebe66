"""The training run's settings: ``TrainConfig`` (each field's metadata carries its command-line help), its
validation, and loading from a train preset or YAML plus overrides.

Free of torch, so that the command line builds ``yxanul train``'s flags from these fields without importing it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from .config import CONFIG_DIR, dataclass_from_dict, load_yaml
from .errors import YxanulError, brief
from .hostgc import HOST_GC_MODES

TRAIN_PRESET_DIR = CONFIG_DIR / "train"
PRECISIONS = ("auto", "bf16", "fp16", "fp8", "fp32")


def _opt(default, help: str, **meta):
    """A TrainConfig field with its command-line help; optional keys: flag (default --field-name), metavar,
    choices, shown_default (the default as --help words it, for a None that means something). The command line
    (yxanul/commands/train.py) builds `yxanul train`'s flags from these."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    # what to train on
    model: str = _opt("tiny", "model preset or YAML")
    policy: str | None = _opt(None, "precision policy YAML", flag="--config", metavar="POLICY",
                               shown_default="the note's")
    data: str | None = _opt(None, "folder from `yxanul data prepare`", metavar="DIR",
                             shown_default="the bundled corpus")
    tokenizer: str = _opt("bytes", "tokenizer for the bundled corpus when --data is not given")
    out: str | None = _opt(None, "run folder", metavar="RUN_DIR", shown_default="runs/<timestamp>")
    # schedule
    steps: int = _opt(120, "optimizer steps")
    batch_size: int = _opt(16, "sequences per micro-batch per rank")
    seq_len: int = _opt(256, "tokens per sequence")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    lr: float = _opt(3e-3, "peak learning rate")
    min_lr: float = _opt(3e-4, "learning rate at the end of the cosine")
    warmup: int = _opt(10, "linear warmup steps")
    weight_decay: float = _opt(0.1, "AdamW weight decay (matrices of linear layers only)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    eps: float = _opt(1e-8, "AdamW epsilon")
    clip: float = _opt(1.0, "global grad-norm clip (0: off; the norm is still computed and logged)")
    seed: int = _opt(1337, "seed of the initialization and the data order")
    # precision
    precision: str = _opt("auto", "auto: bf16, or fp32 on a CPU without fast BF16 matmuls", choices=PRECISIONS)
    fp8_recipe: str | None = _opt(None, "override the policy's recipe: blockwise | tensorwise | rowwise | "
                                          "delayed", shown_default="the policy's")
    fp8_backend: str = _opt("auto", "FP8 GEMM backend")
    fp8_calibration_steps: int | None = _opt(None, "steps scaled by the current amax while the amax histories fill (delayed recipe)",
                                             shown_default="the policy's")
    fused_projections: bool = _opt(True, "q/k/v and gate/up as one GEMM each where the result is exact "
                                         "(BF16, blockwise FP8); off: every projection on its own")
    fp8_kernels: str = _opt("auto", "FP8 quantizers: auto (Triton on CUDA), triton (always; an error where it "
                                    "cannot run) or torch", choices=("auto", "triton", "torch"))
    fp8_weight_cache: str = _opt("graph", "compiled FP8 layers' weight copies: graph (quantized in the graph at every "
                                          "forward) or step (once per optimizer step into static copies)",
                                 choices=("graph", "step"))
    fp8_fused_producers: bool = _opt(False, "delayed and blockwise recipes: FP8 operands written by the kernels that "
                                            "produce them (the SwiGLU MLP as one function; blockwise: the norms); "
                                            "measured no faster; less memory for blockwise "
                                            "(docs/benchmarks.md)")
    fp8_fused_tensor_projections: bool = _opt(False, "tensorwise and delayed recipes: q/k/v and gate/up as one GEMM "
                                                     "each, one scale per operand for the group")
    fp8_fprop_fast_accum: bool = _opt(False, "per-tensor and row-scaled recipes: the forward GEMM with cuBLAS's "
                                             "fast FP8 accumulation (torchao's default; changes the numbers)")
    fp8_stats_every: int = _opt(10, "FP8 statistics (amax, saturation, underflow per layer; fp8_stats.jsonl) at "
                                     "every N-th logged step and the last (0: never; 1: every logged step); the pass "
                                     "that records them reads every FP8 operand once more")
    optimizer_states: str = _opt("fp32", "AdamW moment precision", choices=("fp32", "bf16"))
    loss_scale_init: float = _opt(65536.0, "initial loss scale (fp16)")
    loss_scale_growth_interval: int = _opt(2000, "clean steps before the loss scale doubles (fp16)")
    loss_scale_backoff: float = _opt(0.5, "loss scale factor after a non-finite step (fp16)")
    # evaluation, logging, checkpoints
    eval_every: int = _opt(40, "validation every N steps and at the end (0: never)")
    eval_batches: int = _opt(4, "validation batches per evaluation")
    log_every: int = _opt(10, "a metrics record (and, without a progress bar, a log line) every N steps")
    checkpoint_every: int = _opt(40, "checkpoint every N steps and at the end (0: never)")
    keep_last: int = _opt(2, "checkpoints to keep (0: keep every one)")
    sample_every: int = _opt(0, "print a short generated sample every N steps (0: never)")
    # runtime
    compile: bool = _opt(False, "torch.compile the model's blocks")
    compile_scope: str = _opt("blocks", "what compile covers: blocks (each block; identical blocks share one graph) or "
                                        "trunk (embedding, every block and the final norm as one graph: fusion "
                                        "across blocks, one CUDA graph per pass, a longer compile)",
                              choices=("blocks", "trunk"))
    compile_mode: str = _opt("default", "torch.compile mode: default | reduce-overhead (CUDA graphs: no launch "
                                        "overhead; the FP8 blockwise recipe needs it) | max-autotune | "
                                        "max-autotune-no-cudagraphs")
    tune_kernels: bool = _opt(False, "tune the compiled blocks' generated kernels (inductor's coordinate descent): "
                                     "minutes more compile time, faster FP8 quantization")
    device: str = _opt("cpu", "cpu | cuda | auto")
    parallel: str = _opt("none", "data parallelism across the processes started by torchrun (see "
                                 "docs/distributed.md)", choices=("none", "ddp", "fsdp2"))
    max_bad_steps: int = _opt(10, "stop after K consecutive non-finite steps")
    inject_nan_at: str = _opt("", "debugging aid: make these steps' loss NaN ('5,7-9')", metavar="STEPS")
    progress: bool = _opt(True, "progress bar (without one, or without a terminal: a log line every --log-every)")
    tensorboard: bool = _opt(True, "TensorBoard event files in the run folder (when TensorBoard is installed)")
    fused_ce: str = _opt("auto", "chunked linear cross-entropy without full FP32 logits (auto: on CUDA)",
                         choices=("auto", "on", "off"))
    host_gc: str = _opt("freeze", "Python's garbage collector after the warm-up steps: freeze (collect once and "
                                  "freeze, so full collections do not walk the compiled graphs' objects while the "
                                  "GPU waits) or default", choices=HOST_GC_MODES)

    def validate(self, source: str = "train config") -> "TrainConfig":
        pos = ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "max_bad_steps", "eval_batches",
               "loss_scale_growth_interval")
        for k in pos:
            if getattr(self, k) <= 0:
                raise YxanulError(f"must be positive, got {getattr(self, k)}", source=source, key=k)
        if not 0 <= self.seed < 2 ** 63:
            raise YxanulError(f"must be in [0, 2**63), got {brief(self.seed)}", source=source, key="seed")
        for k in ("warmup", "eval_every", "checkpoint_every", "keep_last", "sample_every", "fp8_stats_every"):
            if getattr(self, k) < 0:
                raise YxanulError(f"must be >= 0, got {getattr(self, k)}", source=source, key=k)
        for k in ("lr", "min_lr", "weight_decay", "clip", "eps"):
            v = getattr(self, k)
            if not math.isfinite(v) or v < 0:
                raise YxanulError(f"must be a finite number >= 0, got {v}", source=source, key=k)
        if self.lr <= 0:
            raise YxanulError("must be > 0", source=source, key="lr")
        if self.min_lr > self.lr:
            raise YxanulError(f"min_lr ({self.min_lr}) exceeds lr ({self.lr})", source=source, key="min_lr")
        for k in ("beta1", "beta2"):
            if not 0 <= getattr(self, k) < 1:
                raise YxanulError("must be in [0, 1)", source=source, key=k)
        if not 0 < self.loss_scale_backoff < 1 or not 0 < self.loss_scale_init <= MAX_LOSS_SCALE:
            raise YxanulError(f"loss_scale_init must be in (0, 2**64] and loss_scale_backoff in (0, 1), got "
                              f"{self.loss_scale_init} and {self.loss_scale_backoff}", source=source)
        for k in ("lr", "min_lr"):
            if getattr(self, k) > MAX_LR:
                raise YxanulError(f"must be <= {MAX_LR} (a step of that size destroys the weights), got "
                                  f"{getattr(self, k)}", source=source, key=k)
        check_step_sizes(self.batch_size, self.seq_len, self.grad_accum, source,
                         ("batch_size", "seq_len", "grad_accum"))
        for f in fields(self):  # every field with a fixed set of values (its command-line choices)
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices is not None and value not in choices:
                raise YxanulError(f"expected one of: {', '.join(map(str, choices))}, got {brief(value)}",
                                  source=source, key=f.name)
        from .fp8.backends import BACKENDS  # here, not at module level: these modules import torch
        from .model import COMPILE_MODES
        if self.fp8_backend not in BACKENDS:
            raise YxanulError(f"unknown FP8 backend {brief(self.fp8_backend)} (expected one of: "
                              f"{', '.join(BACKENDS)})", source=source, key="fp8_backend")
        if self.compile_mode not in COMPILE_MODES:
            raise YxanulError(f"unknown compile mode {self.compile_mode!r} (expected one of: "
                              f"{', '.join(COMPILE_MODES)})", source=source, key="compile_mode")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise YxanulError(f"expected cpu, cuda or auto, got {self.device!r}", source=source, key="device")
        parse_steps(self.inject_nan_at, source)
        if self.fp8_calibration_steps is not None and self.fp8_calibration_steps < 0:
            raise YxanulError("must be >= 0", source=source, key="fp8_calibration_steps")
        if self.compile_scope == "trunk" and self.parallel == "fsdp2":
            raise YxanulError("the trunk as one compiled graph would trace FSDP2's per-block hooks: use "
                              "compile_scope blocks with fsdp2", source=source, key="compile_scope")
        if self.sample_every and self.parallel == "fsdp2":
            raise YxanulError("samples during training need the whole model on one rank: not with fsdp2",
                              source=source, key="sample_every")
        self.fp8_options().validate(source)
        return self

    def fp8_options(self):
        """The FP8 layers' :class:`~yxanul.fp8.options.Fp8Options` (imported here: the command line builds its
        parser from this module without importing torch)."""
        from .fp8.options import Fp8Options
        return Fp8Options(kernels=self.fp8_kernels, weight_cache=self.fp8_weight_cache,
                          fused_producers=self.fp8_fused_producers,
                          fused_tensor_projections=self.fp8_fused_tensor_projections,
                          fprop_fast_accum=self.fp8_fprop_fast_accum)


MAX_LR = 10.0  # bounds that turn absurd numbers into one-line errors before anything is allocated
MAX_LOSS_SCALE = 2.0 ** 64
MAX_MICROBATCH_TOKENS = 2 ** 31 - 1
MAX_GRAD_ACCUM = 4096  # larger is a typo, not a batch: a step would take hours


def check_step_sizes(batch: int, seq: int, grad_accum: int, source: str | None, names: tuple[str, str, str]):
    """A step's micro-batch within int32 indexing and its accumulation within MAX_GRAD_ACCUM; `names` are the
    keys of batch, seq and grad_accum where they were given (a config's fields or a command's flags)."""
    if grad_accum > MAX_GRAD_ACCUM:
        raise YxanulError(f"must be <= {MAX_GRAD_ACCUM} micro-batches per step, got {grad_accum}", source=source,
                          key=names[2])
    if batch * seq > MAX_MICROBATCH_TOKENS:
        raise YxanulError(f"{names[0].lstrip('-')} x {names[1].lstrip('-')} = {batch * seq} tokens per micro-batch exceeds "
                          f"{MAX_MICROBATCH_TOKENS} (int32 indexing)", source=source, key=names[0])


class StepSet:
    """1-based optimizer step numbers as inclusive ranges, tested with ``in`` without expanding them."""

    def __init__(self, ranges: list[tuple[int, int]]):
        self.ranges = ranges

    def __contains__(self, step) -> bool:
        return any(a <= step <= b for a, b in self.ranges)

    def __bool__(self) -> bool:
        return bool(self.ranges)


def parse_steps(spec: str, source: str = "train config") -> StepSet:
    """"3,5-7" -> steps {3, 5, 6, 7} (1-based optimizer step numbers); a range of any length costs nothing."""
    ranges: list[tuple[int, int]] = []
    for part in (spec or "").replace(" ", "").split(","):
        if not part:
            continue
        try:
            a, b = part.split("-", 1) if "-" in part else (part, part)
            a, b = int(a), int(b)
        except ValueError:
            raise YxanulError(f"expected steps like '5' or '5,7-9', got {spec[:80]!r}", source=source,
                              key="inject_nan_at") from None
        if a < 1 or b < a:
            raise YxanulError(f"{part[:80]!r}: steps start at 1 and a range runs low-high", source=source,
                              key="inject_nan_at")
        ranges.append((a, b))
    return StepSet(ranges)


def load_train_config(spec: str | Path | None = None, overrides: dict | None = None,
                      base: TrainConfig | None = None) -> TrainConfig:
    """A train preset name (configs/train/NAME.yaml) or YAML path, then `overrides` (e.g. CLI flags)."""
    cfg = base or TrainConfig()
    if spec:
        path = Path(spec)
        if not path.exists() and (TRAIN_PRESET_DIR / f"{spec}.yaml").exists():
            path = TRAIN_PRESET_DIR / f"{spec}.yaml"
        elif not path.exists():
            known = ", ".join(sorted(p.stem for p in TRAIN_PRESET_DIR.glob("*.yaml")))
            raise YxanulError(f"no such file or train preset (presets: {known})", source="--train-config",
                              key=str(spec))
        cfg = dataclass_from_dict(TrainConfig, load_yaml(path), source=str(path), base=cfg).validate(str(path))
    if overrides:
        cfg = dataclass_from_dict(TrainConfig, overrides, source="command line", base=cfg)
    return cfg.validate("command line" if overrides else "train config")
