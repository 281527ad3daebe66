"""The training loop: the design note's precision strategy end to end.

* FP32 master weights; forward/backward under autocast (BF16, or FP16 with a dynamic loss scaler), FP8 linears
  per the policy and recipe (``--precision fp8``), or plain FP32.
* AdamW with FP32 states (fused on CUDA) or BF16 states; FP32 gradient accumulation across micro-batches
  (the ``.grad`` of an FP32 parameter is FP32); global-norm clipping; linear warmup then cosine to ``min_lr``;
  no weight decay on norms, embeddings and biases.
* Deterministic data (:mod:`yxanul.data.loader`), so a resumed run is bit-identical on CPU.
* Non-finite loss or gradients: the step is skipped (weights and optimizer untouched), counted and logged; after
  ``max_bad_steps`` consecutive bad steps the run stops with :class:`NonFiniteError` and no new checkpoint.

Use from Python: ``train(TrainConfig(...))`` or ``Trainer(cfg).fit()``. Distributed launchers set
``rank``/``world_size`` (read from ``torch.distributed`` when it is initialized): every rank draws its slice of
the same global batch; only rank 0 logs and writes.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from .config import CONFIG_DIR, dataclass_from_dict, load_model_config, load_yaml
from .distributed import micro_batch_context, sync_fp8_amax
from .errors import NonFiniteError, YxanulError
from .evaluate import window_losses
from .flops import flops_per_token, peak_flops
from .io import atomic_write_text
from .model import COMPILE_MODES

TRAIN_PRESET_DIR = CONFIG_DIR / "train"
PRECISIONS = ("auto", "bf16", "fp16", "fp8", "fp32")


@dataclass
class TrainConfig:
    # what to train on
    model: str = "tiny"
    policy: str | None = None  # precision policy YAML (--config); None: the shipped note config
    data: str | None = None  # prepared data folder; None: the bundled corpus, tokenized with `tokenizer`
    tokenizer: str = "bytes"  # only for the bundled corpus
    out: str | None = None  # run folder; None: runs/<timestamp>
    # schedule
    steps: int = 250
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip: float = 1.0  # 0 disables clipping (the norm is still computed and logged)
    seed: int = 1337
    # precision
    precision: str = "auto"  # auto: bf16, or fp32 on a CPU without fast BF16 matmuls (see resolve_precision)
    fp8_recipe: str | None = None  # override the policy's recipe name
    fp8_backend: str = "auto"
    fp8_calibration_steps: int | None = None  # override the policy's calibration_steps (delayed recipe only)
    optimizer_states: str = "fp32"  # fp32 | bf16
    loss_scale_init: float = 65536.0
    loss_scale_growth_interval: int = 2000
    loss_scale_backoff: float = 0.5
    # evaluation, logging, checkpoints
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 10
    checkpoint_every: int = 50
    keep_last: int = 2
    # runtime
    compile: bool = False
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    tune_kernels: bool = False  # inductor's coordinate-descent tuning of the compiled blocks' kernels (slower compile)
    device: str = "cpu"  # cpu | cuda | auto
    parallel: str = "none"  # none | ddp | fsdp2 (ddp/fsdp2: launched by torchrun, see docs/distributed.md)
    max_bad_steps: int = 10
    inject_nan_at: str = ""  # debugging aid: "5" or "5,7-9" makes those steps' loss NaN
    progress: bool = True
    tensorboard: bool = True
    fused_ce: str = "auto"  # auto (on for CUDA) | on | off: chunked linear cross-entropy, no full FP32 logits

    def validate(self, source: str = "train config") -> "TrainConfig":
        pos = ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "max_bad_steps", "eval_batches",
               "loss_scale_growth_interval")
        for k in pos:
            if getattr(self, k) <= 0:
                raise YxanulError(f"must be positive, got {getattr(self, k)}", source=source, key=k)
        for k in ("warmup", "eval_every", "checkpoint_every", "keep_last"):
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
        if not 0 < self.loss_scale_backoff < 1 or self.loss_scale_init <= 0:
            raise YxanulError("loss_scale_init must be > 0 and loss_scale_backoff in (0, 1)", source=source)
        if self.compile_mode not in COMPILE_MODES:
            raise YxanulError(f"unknown compile mode {self.compile_mode!r} (expected one of: "
                              f"{', '.join(COMPILE_MODES)})", source=source, key="compile_mode")
        if self.precision not in PRECISIONS:
            raise YxanulError(f"unknown precision {self.precision!r} (expected one of: {', '.join(PRECISIONS)})",
                              source=source, key="precision")
        if self.optimizer_states not in ("fp32", "bf16"):
            raise YxanulError(f"expected fp32 or bf16, got {self.optimizer_states!r}", source=source,
                              key="optimizer_states")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise YxanulError(f"expected cpu, cuda or auto, got {self.device!r}", source=source, key="device")
        if self.parallel not in ("none", "ddp", "fsdp2"):
            raise YxanulError(f"expected none, ddp or fsdp2, got {self.parallel!r}", source=source, key="parallel")
        parse_steps(self.inject_nan_at, source)
        if self.fp8_calibration_steps is not None and self.fp8_calibration_steps < 0:
            raise YxanulError("must be >= 0", source=source, key="fp8_calibration_steps")
        if self.fused_ce not in ("auto", "on", "off"):
            raise YxanulError(f"expected auto, on or off, got {self.fused_ce!r}", source=source, key="fused_ce")
        return self


def parse_steps(spec: str, source: str = "train config") -> set[int]:
    """"3,5-7" -> {3, 5, 6, 7} (1-based optimizer step numbers)."""
    out: set[int] = set()
    for part in (spec or "").replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                out.update(range(int(a), int(b) + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise YxanulError(f"expected steps like '5' or '5,7-9', got {spec!r}", source=source,
                              key="inject_nan_at") from None
    return out


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


def cpu_bf16_speed() -> tuple[float, float]:
    """(BF16, FP32) matmul throughput of this CPU in GFLOP/s (cached): the best of five [1024, 256] x [256, 256]
    products each, after one warm-up, the size of the tiny model's GEMMs. (Three 128 x 128 products measured
    thread wake-up more than throughput: under load they put BF16 at under 1% of FP32 on a CPU where at this
    size BF16 is the faster one.) CPUs without native BF16 instructions multiply BF16 tens to hundreds
    of times slower than FP32 in torch; the worst case costs about a second here."""
    global _CPU_BF16
    if _CPU_BF16 is None:
        a, b = torch.randn(1024, 256), torch.randn(256, 256)
        rates = []
        for dt in (torch.bfloat16, torch.float32):
            x, y = a.to(dt), b.to(dt)
            x @ y
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                x @ y
                best = min(best, time.perf_counter() - t0)
            rates.append(2 * 1024 * 256 * 256 / max(best, 1e-9) / 1e9)
        _CPU_BF16 = (rates[0], rates[1])
    return _CPU_BF16


_CPU_BF16: tuple[float, float] | None = None


def resolve_precision(device: torch.device) -> tuple[str, str]:
    """``precision: auto``: bf16, except on a CPU whose BF16 matmuls are more than 4x slower than its FP32 ones
    (without native BF16 instructions they measured 13-400x slower; with them BF16 is as fast or faster), where
    BF16 autocast would make training much slower, not faster: fp32 there. Returns (precision, message)."""
    if device.type != "cpu":
        return "bf16", ""
    bf16, fp32 = cpu_bf16_speed()
    if bf16 * 4 >= fp32:
        return "bf16", ""
    return "fp32", (f"precision auto: fp32, since this CPU multiplies BF16 at {bf16:.1f} GFLOP/s against "
                    f"{fp32:.0f} in FP32 (no native BF16); --precision bf16 forces BF16")


# -- learning rate, loss scaling, optimizer -------------------------------------------------------------

def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay from lr to min_lr at the last step."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - 1 - cfg.warmup)  # the last step run is steps - 1: it gets min_lr
    t = min(1.0, (step - cfg.warmup) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


class DynamicLossScaler:
    """FP16 loss scaling: multiply the loss by `scale`; on non-finite grads back off and skip the step;
    after `growth_interval` clean steps in a row multiply the scale by `growth_factor`.

    Written here rather than using ``torch.amp.GradScaler`` so that one device-side finiteness flag drives both
    the scaler and the project's skipped-step accounting (and the fused optimizer's ``found_inf``), and so that
    its state is two plain tensors in ``state.pt``.
    """

    def __init__(self, init_scale: float = 65536.0, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, device="cpu", min_scale: float = 2.0 ** -24,
                 max_scale: float = 2.0 ** 24):
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval, self.min_scale, self.max_scale = growth_interval, min_scale, max_scale
        self.scale = torch.tensor(float(init_scale), dtype=torch.float32, device=device)
        self.tracker = torch.zeros((), dtype=torch.int64, device=device)

    def update(self, ok: torch.Tensor) -> None:
        grown = self.tracker + 1 >= self.growth_interval
        new = torch.where(ok, torch.where(grown, self.scale * self.growth_factor, self.scale),
                          self.scale * self.backoff_factor)
        self.scale = new.clamp(self.min_scale, self.max_scale)
        self.tracker = torch.where(ok & ~grown, self.tracker + 1, torch.zeros_like(self.tracker))

    def state_dict(self) -> dict:
        return {"scale": self.scale.detach().cpu(), "tracker": self.tracker.detach().cpu()}

    def load_state_dict(self, sd: dict) -> None:
        self.scale = sd["scale"].to(self.scale.device)
        self.tracker = sd["tracker"].to(self.tracker.device)


class AdamWBF16States(torch.optim.Optimizer):
    """AdamW whose moments are stored in BF16 (as DeepSeek-V3 does) and updated in FP32.

    torch's AdamW keeps its moments in the parameter's dtype (FP32 here), so halving optimizer memory needs
    this small variant: each step upcasts the moments, updates them and the FP32 weights in FP32, and rounds
    the moments back to BF16 (round-to-nearest).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)  # casts the moments to the parameters' dtype (FP32): undo that
        for st in self.state.values():
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    st[k] = st[k].to(torch.bfloat16)  # exact: the saved values were BF16

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                st["step"] += 1
                t = float(st["step"])
                g = p.grad.float()
                m = st["exp_avg"].float().lerp_(g, 1 - b1)
                v = st["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                if wd:
                    p.mul_(1 - lr * wd)
                denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
                st["exp_avg"].copy_(m)
                st["exp_avg_sq"].copy_(v)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices of linear layers only; none on norms, embeddings and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.startswith("embeddings.") or name.endswith(".bias"):  # norms and biases are 1-D
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _resident_memory() -> int | None:
    try:
        import resource
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except Exception:
        return None


# -- the trainer -----------------------------------------------------------------------------------------

def _fp8_api():
    try:
        from .fp8.linear import convert_model, fp8_stats, fp8_step
    except ImportError as e:
        raise YxanulError(f"FP8 layers are unavailable ({e})", source="--precision", key="fp8") from None
    return convert_model, fp8_step, fp8_stats


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _env_int(name: str, default: int = 1) -> int:
    v = os.environ.get(name, "") or str(default)
    try:
        return int(v)
    except ValueError:
        raise YxanulError(f"expected an integer, got {v!r}", source="environment", key=name) from None


class Trainer:
    def __init__(self, cfg: TrainConfig, rank: int | None = None, world_size: int | None = None,
                 resume: str | None = None, log=print):
        self.cfg = cfg.validate()
        self.dist = None  # DistInfo when data-parallel (--parallel ddp|fsdp2)
        if cfg.parallel != "none":
            from .distributed import init_distributed
            self.dist = init_distributed(cfg.device)
        elif rank is None and world_size is None and _env_int("WORLD_SIZE") > 1:
            raise YxanulError(f"launched with {os.environ['WORLD_SIZE']} processes (torchrun) but --parallel is none: "
                              "each would train alone; pass --parallel ddp or --parallel fsdp2", key="parallel")
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if dist else 0)
        self.world_size = world_size if world_size is not None else (
            torch.distributed.get_world_size() if dist else 1)
        self.is_main = self.rank == 0
        self.log = log if self.is_main else (lambda *a, **k: None)
        self.resume_from = resume
        self._setup()

    # -- setup --------------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        if self.dist is not None:
            return self.dist.device
        d = self.cfg.device
        if d == "auto":
            d = "cuda" if torch.cuda.is_available() else "cpu"
        if d.startswith("cuda") and not torch.cuda.is_available():
            raise YxanulError("CUDA is not available on this machine", source="--device", key=d)
        if d == "cuda" and self.world_size > 1:
            d = f"cuda:{int(os.environ.get('LOCAL_RANK', self.rank))}"
        return torch.device(d)

    def _setup(self) -> None:
        from .checkpoint.training import load_checkpoint, load_training_state, resolve_checkpoint
        from .distributed import (check_resume_world_size, is_dcp_checkpoint, load_dcp_checkpoint,
                                  load_plain_optimizer_state, read_checkpoint_meta)
        from .data import bundled_dataset
        from .data.loader import DataLoader, read_meta
        from .data.tokenizers import check_ids
        from .model import Yxanul
        from .precision import load_policy

        from .fp8 import check_env_switches
        check_env_switches()
        self.device = self._device()
        if self.cfg.precision == "auto":
            resolved, why = resolve_precision(self.device)
            if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
                # every rank measured its own CPU; all must train (and build FSDP policies) in rank 0's precision
                choice = [resolved, why]
                torch.distributed.broadcast_object_list(choice, src=0)
                resolved, why = choice
            self.cfg = replace(self.cfg, precision=resolved)
            if why:
                self.log(why)
        cfg = self.cfg
        # run folder and resume point
        self.ckpt = None
        if self.resume_from is not None:
            self.ckpt = resolve_checkpoint(self.resume_from)
            self.run_dir = self.ckpt.parent.parent
        else:
            self.run_dir = Path(cfg.out) if cfg.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
            if self.run_dir.exists() and not self.run_dir.is_dir():
                raise YxanulError("exists and is not a folder", source=str(self.run_dir), key="--out")
            if self.is_main and (self.run_dir / "metrics.jsonl").exists():
                raise YxanulError("run folder already holds a run; pass --resume to continue it or another --out",
                                  source=str(self.run_dir))
        # data
        if cfg.data:
            self.data_dir = Path(cfg.data)
            read_meta(self.data_dir)
        else:
            if self.dist is not None and not self.is_main:
                torch.distributed.barrier()  # rank 0 prepares the shared cache first
            self.data_dir = bundled_dataset(cfg.tokenizer, progress=False)
            if self.dist is not None and self.is_main:
                torch.distributed.barrier()
        meta = read_meta(self.data_dir)
        self.tokenizer_meta = meta["tokenizer"]
        # model
        self.model_cfg = load_model_config(cfg.model)
        check_ids(int(meta.get("max_token_id", meta["vocab_size"] - 1)) + 1, self.model_cfg.vocab_size,
                  source=f"{self.data_dir / 'meta.json'} (model {self.model_cfg.name})")
        if cfg.seq_len > self.model_cfg.max_seq_len:
            raise YxanulError(f"exceeds the model's max_seq_len {self.model_cfg.max_seq_len}", source="train config",
                              key="seq_len")
        torch.manual_seed(cfg.seed)
        model = Yxanul(self.model_cfg)
        # precision
        self.policy = load_policy(cfg.policy)
        if cfg.fp8_recipe or cfg.fp8_calibration_steps is not None:
            self.policy = self.policy.with_recipe(name=cfg.fp8_recipe,
                                                  calibration_steps=cfg.fp8_calibration_steps)
        self.fp8 = cfg.precision == "fp8"
        self._fp8_step = self._fp8_stats = None
        model.to(self.device)  # before conversion: `auto` picks the FP8 backend from where the weights live
        if self.fp8:
            convert_model, self._fp8_step, self._fp8_stats = _fp8_api()
            convert_model(model, self.policy, backend=cfg.fp8_backend)
        self.model = model
        if cfg.fused_ce == "on" or (cfg.fused_ce == "auto" and self.device.type == "cuda"):
            from .kernels.linear_ce import use_fused_ce
            use_fused_ce(model)  # halves peak memory with a 200k vocabulary (docs/benchmarks.md)
        self.ckpt_dcp = self.ckpt is not None and is_dcp_checkpoint(self.ckpt)
        if self.ckpt is not None and self.ckpt_dcp:
            ck_meta = read_checkpoint_meta(self.ckpt)  # weights come through DCP once the model is wrapped
        elif self.ckpt is not None:
            _, sd, ck_meta = load_checkpoint(self.ckpt)
            own = model.state_dict()
            fp8_state = ("amax_history", "scale_inv", "scale_ready", "fp8_steps")
            # delayed-scaling state of an FP8 run is dropped when resuming it in another precision
            sd = {k: v for k, v in sd.items() if k in own or not k.endswith(fp8_state)}
            missing, unexpected = model.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise YxanulError(f"checkpoint does not match the model (missing {missing[:3]}, unexpected "
                                  f"{unexpected[:3]})", source=str(self.ckpt))
        amp_dtype = {"bf16": torch.bfloat16, "fp8": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
        self.scaler = DynamicLossScaler(cfg.loss_scale_init, 2.0, cfg.loss_scale_backoff,
                                        cfg.loss_scale_growth_interval, self.device) if cfg.precision == "fp16" else None
        if self.ckpt is not None:
            check_resume_world_size(ck_meta, self.world_size, cfg.batch_size, cfg.grad_accum, source=str(self.ckpt))
        # data-parallel wrapping first (FSDP2 replaces parameters in place), then the optimizer over them
        self.train_model = self.wrap_model(model)
        groups = param_groups(model, cfg.weight_decay)
        self.params = [p for g in groups for p in g["params"]]
        self.param_names = {id(p): n for n, p in model.named_parameters()}
        if cfg.optimizer_states == "bf16":
            self.opt = AdamWBF16States(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
            self.device_skip = False
        else:
            fused = self.device.type == "cuda"
            self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                         fused=fused, foreach=None if fused else False)
            # The fused CUDA kernel skips the update itself when `found_inf` is set: no host sync per step.
            self.device_skip = fused
        if cfg.compile:
            # every block compiled (one shared graph); embedding, final norm and the fused loss stay eager
            from .model import compile_blocks
            compile_blocks(model, mode=cfg.compile_mode, tune_kernels=cfg.tune_kernels)
        # reduce-overhead (and max-autotune) replay each compiled block as a CUDA graph; every forward pass starts
        # a new "step" of torch's graph trees, so outputs of the previous one may be overwritten once consumed
        from .model import compile_mode_uses_cuda_graphs
        self.graphs = cfg.compile and compile_mode_uses_cuda_graphs(cfg.compile_mode) and self.device.type == "cuda"
        for key, on in (("compile_mode", cfg.compile_mode != "default"), ("tune_kernels", cfg.tune_kernels)):
            if on and not cfg.compile:
                self.log(f"{key} has no effect without compile: true")
        self.loader = DataLoader(self.data_dir, cfg.batch_size, cfg.seq_len, seed=cfg.seed, rank=self.rank,
                                 world_size=self.world_size, device=self.device)
        self.tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * self.world_size
        self.flops_per_token = flops_per_token(self.model_cfg, cfg.seq_len)
        self.peak = peak_flops(self.device)
        self.nan_steps = parse_steps(cfg.inject_nan_at)
        # counters
        self.step = 0
        self.skipped = torch.zeros((), dtype=torch.int64, device=self.device)
        self.consecutive_bad = torch.zeros((), dtype=torch.int64, device=self.device)
        self.last_bad_module: str | None = None
        if self.ckpt is not None:
            if self.ckpt_dcp:
                st = load_dcp_checkpoint(self.ckpt, self.model, self.opt)
            else:
                st = load_training_state(self.ckpt)
                load_plain_optimizer_state(self.model, self.opt, st["optimizer"])
            if self.scaler is not None and st.get("scaler"):
                self.scaler.load_state_dict(st["scaler"])
            torch.set_rng_state(st["rng"]["torch"])
            if self.device.type == "cuda" and st["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(st["rng"]["cuda"], self.device)
            self.step = int(st["step"])
            self.skipped.fill_(int(st["skipped"]))
            self.consecutive_bad.fill_(int(st["consecutive_bad"]))
            if self.step != int(ck_meta["step"]):
                raise YxanulError("state.pt and meta.json disagree on the step", source=str(self.ckpt))

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module the training step calls: DDP or FSDP2 (``--parallel``), else the model itself."""
        if self.cfg.parallel == "none":
            return model
        from .distributed import wrap_model
        return wrap_model(model, self.cfg.parallel, self.device, precision=self.cfg.precision)

    # -- bookkeeping --------------------------------------------------------------------------------
    def resolved_config(self) -> dict:
        return {
            "train": asdict(self.cfg) | {"out": str(self.run_dir)},
            "model": asdict(self.model_cfg),
            "policy": {"source": str(self.policy.source), "recipe": asdict(self.policy.recipe),
                       "fp8_modules": sorted(self.policy.fp8_modules(self.model)) if self.fp8 else []},
            "data": {"dir": str(self.data_dir), "tokenizer": self.tokenizer_meta},
            "runtime": {"device": str(self.device), "world_size": self.world_size, "torch": str(torch.__version__),
                        "tokens_per_step": self.tokens_per_step, "params": self.model.num_params()},
        }

    def checkpoint_meta(self) -> dict:
        return {"model_config": asdict(self.model_cfg), "tokenizer": self.tokenizer_meta,
                "train_config": asdict(self.cfg), "tokens_seen": self.step * self.tokens_per_step,
                "precision": self.cfg.precision, "data": str(self.data_dir)}

    def training_state(self, optimizer: bool = True) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"step": self.step, **({"optimizer": self.opt.state_dict()} if optimizer else {}),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "rng": rng, "skipped": int(self.skipped), "consecutive_bad": int(self.consecutive_bad),
                "data": {"seed": self.cfg.seed, "next_step": self.step, "micro_step": 0,
                         "tokens_seen": self.step * self.tokens_per_step}}

    def save(self) -> Path | None:
        from .checkpoint.training import save_checkpoint
        if self.dist is not None:  # sharded: every rank writes its part through torch.distributed.checkpoint
            from .distributed import save_dcp_checkpoint
            return save_dcp_checkpoint(self.run_dir, self.step, self.model, self.opt,
                                       self.training_state(optimizer=False),
                                       self.checkpoint_meta() | {"parallel": self.cfg.parallel},
                                       keep_last=self.cfg.keep_last, device=self.device)
        if not self.is_main:
            return None
        return save_checkpoint(self.run_dir, self.step, self.model, self.training_state(), self.checkpoint_meta(),
                               keep_last=self.cfg.keep_last)

    # -- one optimizer step ---------------------------------------------------------------------------
    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean loss, grad norm, ok flag) as device tensors; skips the update when not ok."""
        cfg = self.cfg
        lr = lr_at(cfg, step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        scale = self.scaler.scale if self.scaler is not None else None
        # Under CUDA graphs a gradient that autograd adopts as .grad (the first accumulation into a None grad)
        # lives in the graph's output memory, which the next replay overwrites: such gradients are copied out
        # after the first micro-batch, and from then on the buffers are zeroed (not freed) between steps.
        fresh = [p for p in self.params if p.grad is None] if self.graphs else []
        for micro in range(cfg.grad_accum):
            x, y = self.loader.batch(step, micro)
            # DDP: all-reduce the FP32 gradients once, after the last micro-batch
            with micro_batch_context(self.train_model, micro == cfg.grad_accum - 1):
                if self.graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                with self.autocast():
                    loss = self.train_model(x, y)
                if (step + 1) in self.nan_steps:
                    loss = loss * float("nan")
                loss_sum += loss.detach().float()
                scaled = loss / cfg.grad_accum
                if scale is not None:
                    scaled = scaled * scale
                scaled.backward()
            if fresh and micro == 0:
                for p in fresh:
                    if p.grad is not None:
                        p.grad = p.grad.clone()
        grads = [p.grad for p in self.params if p.grad is not None]
        if scale is not None:
            torch._foreach_mul_(grads, (1.0 / scale).to(grads[0].dtype))
        max_norm = cfg.clip if cfg.clip > 0 else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=self.device.type == "cuda")
        if hasattr(gnorm, "to_local"):  # FSDP2: the global norm as a replicated DTensor
            gnorm = gnorm.to_local()
        loss_mean = loss_sum / cfg.grad_accum
        ok = torch.isfinite(gnorm) & torch.isfinite(loss_mean)
        if self.device_skip:
            self.opt.found_inf = (~ok).float()
            self.opt.step()
            del self.opt.found_inf
        elif bool(ok):
            self.opt.step()
            self.last_bad_module = None
        else:
            self.last_bad_module = self._offending_module()
        self.opt.zero_grad(set_to_none=not self.graphs)  # CUDA graphs: keep the owned buffers (see above)
        if self.scaler is not None:
            self.scaler.update(ok)
        bad = (~ok).long()
        self.skipped += bad
        self.consecutive_bad = (self.consecutive_bad + 1) * bad
        if self.fp8 and self.dist is not None:  # delayed scaling: every rank must derive the same scales
            sync_fp8_amax(self.model)
        if self.fp8:  # arm statistics for the pass of the next logged step
            self._fp8_step(self.model, collect_stats=(step + 2) % cfg.log_every == 0)
        return loss_mean, gnorm, ok

    def _offending_module(self) -> str | None:
        for p in self.params:
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # FSDP2: this rank's shard
            if g is not None and not torch.isfinite(g).all():
                return self.param_names.get(id(p), "?").rsplit(".", 1)[0]
        return None

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over this rank's first ``eval_batches`` validation batches (averaged over ranks)."""
        losses = window_losses(self.model, self.loader, self.cfg.eval_batches * self.cfg.batch_size,
                               self.autocast, torch.compiler.cudagraph_mark_step_begin if self.graphs else None)
        if losses.numel() == 0:
            return None
        total = losses.mean().to(self.device)
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
            total /= self.world_size
        return float(total)

    # -- the loop -------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            import yaml
            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(self.resolved_config(), sort_keys=False))
            self._trim_metrics()
        tb = self._tensorboard()
        self.log(f"run directory: {self.run_dir}")
        self.log(f"model {self.model_cfg.name}: {self.model.num_params() / 1e6:.2f}M params | precision "
                 f"{cfg.precision}{' (' + self.policy.recipe.name + ')' if self.fp8 else ''} | device {self.device} | "
                 + (f"{cfg.parallel} x {self.world_size} ranks (global batch "
                    f"{cfg.batch_size * self.world_size * cfg.grad_accum}) | " if self.dist is not None else "")
                 + f"{self.tokens_per_step} tokens/step | data {self.data_dir}"
                 + (f" | resumed from step {self.step}" if self.ckpt is not None else ""))
        # subnormals make CPU kernels 10-25x slower and carry no signal here; restored when training ends
        flush = self.device.type == "cpu" and torch.set_flush_denormal(True)
        bar = None
        if self.is_main and cfg.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        window_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        window_ok = torch.zeros((), dtype=torch.float64, device=self.device)
        t_last, tokens_last = time.perf_counter(), self.step
        last: dict = {}
        first_loss = None
        try:
            while self.step < cfg.steps:
                loss, gnorm, ok = self.train_step(self.step)
                self.step += 1
                window_loss += torch.where(ok, loss.double(), torch.zeros((), dtype=torch.float64, device=self.device))
                window_ok += ok.double()
                if bar is not None:
                    bar.update(1)
                do_log = self.step % cfg.log_every == 0 or self.step == cfg.steps
                do_eval = bool(cfg.eval_every) and (self.step % cfg.eval_every == 0 or self.step == cfg.steps)
                do_ckpt = bool(cfg.checkpoint_every) and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps)
                if not (do_log or do_eval or do_ckpt) and self.device_skip:
                    continue
                consecutive = int(self.consecutive_bad)  # host sync: every step on CPU, at log points on CUDA
                if not bool(ok) and self.is_main and not self.device_skip:
                    self.log(f"step {self.step}: non-finite loss/grad, update skipped"
                             + (f" (first non-finite grad in {self.last_bad_module})" if self.last_bad_module else "")
                             + f" [{consecutive} in a row, {int(self.skipped)} total]")
                if consecutive >= cfg.max_bad_steps:
                    raise NonFiniteError(f"{consecutive} consecutive steps with non-finite loss or gradients "
                                         f"(last at step {self.step}"
                                         + (f", first bad module {self.last_bad_module}" if self.last_bad_module else "")
                                         + "); stopping. The last good checkpoint is intact; lower --lr, try "
                                         "--precision bf16 or resume from it", source=str(self.run_dir))
                t_book = time.perf_counter()
                if do_log:
                    now = t_book
                    rec = self._record(loss, gnorm, window_loss, window_ok, now - t_last,
                                       (self.step - tokens_last) * self.tokens_per_step)
                    if do_eval:
                        rec["val_loss"] = self.evaluate()
                    if first_loss is None:
                        first_loss = rec["loss"]
                    self._write_metrics(rec, tb)
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['loss']:.3f}" if rec["loss"] is not None else "nan",
                                        **({"val": f"{rec['val_loss']:.3f}"} if rec.get("val_loss") else {}))
                    last = rec
                    window_loss.zero_()
                    window_ok.zero_()
                    t_last, tokens_last = time.perf_counter(), self.step
                elif do_eval:
                    v = self.evaluate()
                    self._write_metrics({"step": self.step, "val_loss": v}, tb)
                    last["val_loss"] = v
                if do_ckpt and consecutive == 0:  # never checkpoint in the middle of a bad streak
                    self.save()
                elif do_ckpt:
                    self.log(f"step {self.step}: checkpoint postponed ({consecutive} bad steps in a row)")
                if not do_log:  # evaluation and checkpoint time do not count against tokens/s
                    t_last += time.perf_counter() - t_book
                else:
                    t_last = time.perf_counter()
        finally:
            if flush:
                torch.set_flush_denormal(False)
            if bar is not None:
                bar.close()
            if tb is not None:
                tb.close()
        summary = {"run_dir": str(self.run_dir), "steps": self.step, "first_loss": first_loss,
                   "final_loss": last.get("loss"), "final_val_loss": last.get("val_loss"),
                   "skipped_steps": int(self.skipped), "tokens_seen": self.step * self.tokens_per_step}
        self.log(f"done: step {self.step}, loss {_fmt(summary['final_loss'])}, val loss "
                 f"{_fmt(summary['final_val_loss'])}, skipped {summary['skipped_steps']} | {self.run_dir}")
        return summary

    def _record(self, loss, gnorm, window_loss, window_ok, dt, tokens) -> dict:
        loss_v, gnorm_v, wl, n_ok = float(loss), float(gnorm), float(window_loss), float(window_ok)
        if self.world_size > 1 and torch.distributed.is_initialized():
            t = torch.tensor([loss_v, wl], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(t)
            loss_v, wl = (t / self.world_size).tolist()
        skipped = int(self.skipped)
        tps = tokens / dt if dt > 0 else None
        rec = {"step": self.step, "loss": loss_v if math.isfinite(loss_v) else None,
               "loss_avg": wl / n_ok if n_ok else None,  # mean over the good steps since the last record
               "lr": lr_at(self.cfg, self.step - 1), "grad_norm": gnorm_v if math.isfinite(gnorm_v) else None,
               "tokens_per_s": tps, "tokens_seen": self.step * self.tokens_per_step,
               "skipped_steps": skipped, "consecutive_bad": int(self.consecutive_bad),
               "mfu": (tps * self.flops_per_token / (self.peak * self.world_size)) if (tps and self.peak) else None}
        if self.scaler is not None:
            rec["loss_scale"] = float(self.scaler.scale)
        if self.device.type == "cuda":
            rec["memory_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        else:
            rec["memory_bytes"] = _resident_memory()
        if self.last_bad_module:
            rec["last_bad_module"] = self.last_bad_module
        if self.fp8 and self._fp8_stats is not None:
            try:
                stats = _jsonable(self._fp8_stats(self.model))
            except Exception as e:  # statistics must never stop training
                stats = {"error": f"{type(e).__name__}: {e}"}
            rec["fp8"] = fp8_summary(stats)
            if self.is_main and "modules" in stats:
                with open(self.run_dir / "fp8_stats.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": self.step, **stats}) + "\n")
        return rec

    def _write_metrics(self, rec: dict, tb) -> None:
        if not self.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(_jsonable(rec)) + "\n")
        if tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step" and v is not None:
                    tb.add_scalar(k, v, rec["step"])

    def _trim_metrics(self) -> None:
        """On resume keep only the records up to the checkpoint's step (a killed run may have logged more)."""
        if self.ckpt is None:
            return
        for name in ("metrics.jsonl", "fp8_stats.jsonl"):
            path = self.run_dir / name
            if not path.exists():
                continue
            keep = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= self.step:
                        keep.append(line)
                except json.JSONDecodeError:  # a line cut short by the kill
                    continue
            atomic_write_text(path, "".join(x + "\n" for x in keep))

    def _tensorboard(self):
        if not (self.is_main and self.cfg.tensorboard):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))


def fp8_summary(stats: dict) -> dict:
    """The aggregate FP8 statistics plus the module with the highest saturation (per-module detail goes to
    ``fp8_stats.jsonl``)."""
    if "modules" not in stats:
        return stats
    out = {"aggregate": stats.get("aggregate", {}), "nonfinite": stats.get("nonfinite", {})}
    worst = None
    for name, entry in stats["modules"].items():
        for which, v in entry.items():
            if isinstance(v, dict) and isinstance(v.get("saturation"), (int, float)):
                if worst is None or v["saturation"] > worst["saturation"]:
                    worst = {"module": name, "tensor": which, "saturation": v["saturation"],
                             "underflow": v.get("underflow")}
    out["max_saturation"] = worst
    return out


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def train(cfg: TrainConfig, resume: str | None = None, **kw) -> dict:
    """Train per `cfg` (optionally resuming from a checkpoint or run folder); returns a summary dict."""
    return Trainer(cfg, resume=resume, **kw).fit()
