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
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import kernels  # noqa: F401  (registers the Triton quantizers with the FP8 layers)
from .config import is_model_file, load_model_config, model_differences
from .distributed import micro_batch_context, sync_fp8_amax
from .errors import NonFiniteError, YxanulError
from .evaluate import window_losses
from .flops import flops_per_token, peak_flops
from .fp8.recipe import resolve
from .generate import SamplingOptions, generate_ids, load_tokenizer, stream_decode
from .hostgc import release as release_gc, settle
from .io import atomic_write_text, write_error
from .optim import AdamWBF16States, DynamicLossScaler, lr_at, param_groups  # noqa: F401 (re-exported)
from .train_config import PRECISIONS, TRAIN_PRESET_DIR, TrainConfig, load_train_config, parse_steps  # noqa: F401

SAMPLE_PROMPT = "In the beginning"  # the prompt of --sample-every's samples and of the suggested `yxanul generate`
SAMPLE_TOKENS = 48

def cpu_bf16_speed() -> tuple[float, float]:
    """(BF16, FP32) matmul throughput of this CPU in GFLOP/s (cached): the best of five [1024, 256] x [256, 256]
    products each, after one warm-up, the size of the tiny model's GEMMs (smaller products measure thread
    wake-up more than throughput). CPUs without native BF16 instructions multiply BF16 far slower than FP32 in
    torch, which is what this detects."""
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
    (CPUs without native BF16 instructions are far slower in BF16, docs/training.md), where BF16 autocast would
    make training much slower, not faster: fp32 there. Returns (precision, message)."""
    if device.type != "cpu":
        return "bf16", ""
    bf16, fp32 = cpu_bf16_speed()
    if bf16 * 4 >= fp32:
        return "bf16", ""
    return "fp32", (f"precision auto: fp32, since this CPU multiplies BF16 at {bf16:.1f} GFLOP/s against "
                    f"{fp32:.0f} in FP32 (no native BF16); --precision bf16 forces BF16")


def _resident_memory() -> int | None:
    try:
        import resource
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except Exception:
        return None


# -- the trainer -----------------------------------------------------------------------------------------

def _fp8_api():
    try:
        from .fp8.linear import arm_fp8_stats, convert_model, fp8_stats, fp8_step, graph_state
    except ImportError as e:
        raise YxanulError(f"FP8 layers are unavailable ({e})", source="--precision", key="fp8") from None
    return convert_model, fp8_step, fp8_stats, graph_state, arm_fp8_stats


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


class StepClock:
    """Wall time of the training steps of one log window, and of everything else apart.

    The clock runs from ``start`` to ``pause``; both call ``sync`` (a CUDA synchronize) so the time is what the
    device did, and the loop calls them only where it stops for bookkeeping anyway (log, evaluation, checkpoint,
    sample), never per step. ``apart(name)`` times a block (evaluation, a compiling step) into ``other[name]``
    instead. ``take`` returns the window's fields (``tokens_per_s`` over the counted steps, ``step_s``, the apart
    times, and ``recompiled`` when a step compiled unpredicted and was timed apart with the steps before it,
    :meth:`compiled`) and opens a new window.
    """

    def __init__(self, sync: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.perf_counter):
        self.sync, self.clock = sync, clock
        self.steps, self.step_s, self.other, self.recompiled = 0, 0.0, {}, False
        self._t0: float | None = None

    def start(self) -> None:
        self.sync()
        self._t0 = self.clock()

    def pause(self) -> None:
        if self._t0 is not None:
            self.sync()
            self.step_s += self.clock() - self._t0
            self._t0 = None

    def step_done(self) -> None:
        self.steps += 1

    def compiled(self, name: str = "warmup_s") -> None:
        """The step just run compiled a graph nobody predicted: the window so far (its counted steps and this
        one) is timed apart into ``other[name]`` and the rate restarts after it, so a logged rate never holds a
        compilation. Synchronizes (rare: a compilation costs seconds anyway)."""
        self.sync()
        t = self.clock()
        if self._t0 is not None:
            self.step_s += t - self._t0
            self._t0 = t
        self.other[name] = self.other.get(name, 0.0) + self.step_s
        self.steps, self.step_s, self.recompiled = 0, 0.0, True

    @contextlib.contextmanager
    def apart(self, name: str):
        self.sync()
        t0 = self.clock()
        running = self._t0 is not None
        if running:
            self.step_s += t0 - self._t0
            self._t0 = None
        try:
            yield
        finally:
            self.sync()
            t1 = self.clock()
            self.other[name] = self.other.get(name, 0.0) + t1 - t0
            if running:
                self._t0 = t1

    def take(self, tokens_per_step: int) -> dict:
        self.pause()
        out = {"tokens_per_s": self.steps * tokens_per_step / self.step_s if self.steps and self.step_s > 0 else None,
               "step_s": self.step_s / self.steps if self.steps else None, **self.other}
        if self.recompiled:
            out["recompiled"] = True
        self.steps, self.step_s, self.other, self.recompiled = 0, 0.0, {}, False
        return out


def _compiled_graphs() -> int:
    """A count that grows whenever torch.compile does any work in this process: dynamo's graphs plus every
    recorded compilation phase (AOTAutograd compiles a backward lazily, at its first call, which the graph
    counter alone does not show). Host-side counters: reading them costs no sync. Called only when compiling,
    so torch._dynamo is imported here rather than with every training run."""
    from torch._dynamo.utils import compilation_time_metrics, counters
    return int(counters["stats"]["unique_graphs"]) + sum(len(v) for v in compilation_time_metrics.values())


class Trainer:
    def __init__(self, cfg: TrainConfig, rank: int | None = None, world_size: int | None = None,
                 resume: str | None = None, log=print, restart: bool = False):
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
        self.restart = restart  # a fresh start may replace a run that stopped before its first checkpoint
        self.clock = time.perf_counter  # the throughput clock (StepClock)
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
        """The run's set-up, in order: device and precision, run folder, data, model and precision, optimizer and
        runtime, then the checkpoint's training state when resuming."""
        self.cfg = self._absolute_paths(self.cfg)
        self.device = self._device()
        self._setup_precision()
        self._setup_run_folder()
        self._setup_data()
        self._setup_model()
        self._setup_optimizer()
        self._setup_runtime()
        if self.ckpt is not None:
            self._restore_training_state()

    @staticmethod
    def _absolute_paths(cfg):
        """The data folder, policy file and model file as absolute paths, so that the checkpoint's record of them
        means the same files from whatever folder the run is resumed (a preset name stays a name)."""
        def absolute(v):
            return str(Path(v).expanduser().resolve()) if v else v
        model = absolute(cfg.model) if is_model_file(cfg.model) else cfg.model
        return replace(cfg, data=absolute(cfg.data), policy=absolute(cfg.policy), model=model)

    def _setup_precision(self) -> None:
        """Resolve ``precision: auto`` (every rank takes rank 0's choice)."""
        if self.cfg.precision != "auto":
            return
        # all ranks must train (and build FSDP policies) in one precision: rank 0 measures its CPU and decides
        resolved, why = self._on_rank0(lambda: resolve_precision(self.device))
        self.cfg = replace(self.cfg, precision=resolved)
        if why:
            self.log(why)

    def _setup_run_folder(self) -> None:
        """The run folder and the checkpoint to resume from (``self.ckpt``, or None)."""
        from .checkpoint.training import prepare_fresh_run_dir, resolve_checkpoint
        cfg = self.cfg
        self.ckpt = None
        if self.resume_from is not None:
            self.ckpt = resolve_checkpoint(self.resume_from)
            self.run_dir = self.ckpt.parent.parent
        else:
            def decide() -> str:  # rank 0 names the folder (the default is a timestamp) and checks it
                run_dir = Path(cfg.out) if cfg.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
                if run_dir.exists() and not run_dir.is_dir():
                    raise YxanulError("exists and is not a folder", source=str(run_dir), key="--out")
                prepare_fresh_run_dir(run_dir, self.restart)
                return str(run_dir)
            self.run_dir = Path(self._on_rank0(decide))

    def _on_rank0(self, fn):
        """``fn()`` on rank 0, its result given to every rank; a YxanulError there is raised on every rank (each
        rank would otherwise wait for rank 0 in its next collective)."""
        if not (self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()):
            return fn()
        box = [None, None]
        if self.is_main:
            try:
                box[0] = fn()
            except YxanulError as e:
                box[1] = (e.detail, e.source, e.key)
        torch.distributed.broadcast_object_list(box, src=0)
        if box[1] is not None:
            detail, source, key = box[1]
            raise YxanulError(detail, source=source, key=key)
        return box[0]

    def _setup_data(self) -> None:
        """The prepared data folder (the bundled corpus, tokenized on first use, unless ``data`` is set)."""
        from .data import bundled_dataset
        from .data.loader import read_meta
        cfg = self.cfg
        if cfg.data:
            self.data_dir = Path(cfg.data)
        else:
            if self.dist is not None and not self.is_main:
                torch.distributed.barrier()  # rank 0 prepares the shared cache first
            self.data_dir = bundled_dataset(cfg.tokenizer, progress=False)
            if self.dist is not None and self.is_main:
                torch.distributed.barrier()
        self.data_meta = read_meta(self.data_dir)
        self.tokenizer_meta = self.data_meta["tokenizer"]
        self._sample_tokenizer = None

    def _setup_model(self) -> None:
        """The model on its device, FP8 layers per the policy, the fused loss, the checkpoint's weights, autocast and
        the loss scaler, then the data-parallel wrapper."""
        from .data.tokenizers import check_ids
        from .model import Yxanul
        from .precision import load_policy, policy_record
        cfg, meta = self.cfg, self.data_meta
        self.ck_meta = self._read_checkpoint_meta()
        self.model_cfg = self._model_config()
        if not cfg.fused_projections:
            self.model_cfg = replace(self.model_cfg, fused_projections=False)
        from .data.loader import max_token_id
        check_ids(max_token_id(meta, str(self.data_dir / "meta.json")) + 1, self.model_cfg.vocab_size,
                  source=f"{self.data_dir / 'meta.json'} (model {self.model_cfg.name})")
        if cfg.seq_len > self.model_cfg.max_seq_len:
            raise YxanulError(f"exceeds the model's max_seq_len {self.model_cfg.max_seq_len}", source="train config",
                              key="seq_len")
        from .memory import check_model_fits
        check_model_fits(self.model_cfg)   # the weights are built in FP32 on the CPU first
        torch.manual_seed(cfg.seed)
        model = Yxanul(self.model_cfg)
        self.policy = load_policy(cfg.policy)
        self.policy_record = policy_record(self.policy)
        if cfg.fp8_recipe or cfg.fp8_calibration_steps is not None:
            self.policy = self.policy.with_recipe(name=cfg.fp8_recipe,
                                                  calibration_steps=cfg.fp8_calibration_steps)
        self.policy = self.policy.with_fp8_options(**cfg.fp8_options().as_dict())
        self.fp8 = cfg.precision == "fp8"
        self._fp8_step = self._fp8_stats = self._graph_state = self._arm_stats = None
        self._arm_after_record = False  # the next pass's FP8 statistics are armed once this step's are read
        model.to(self.device)  # before conversion: `auto` picks the FP8 backend from where the weights live
        if self.fp8:
            convert_model, self._fp8_step, self._fp8_stats, graph_state, self._arm_stats = _fp8_api()
            convert_model(model, self.policy, backend=cfg.fp8_backend)
            if cfg.compile:
                from .fp8.linear import fp8_modules
                mods = list(fp8_modules(model).values())
                self._graph_state = lambda: graph_state(mods)
        self.model = model
        if cfg.fused_ce == "on" or (cfg.fused_ce == "auto" and self.device.type == "cuda"):
            from .kernels.linear_ce import use_fused_ce
            use_fused_ce(model)  # halves peak memory with a 200k vocabulary (docs/benchmarks.md)
        amp_dtype = {"bf16": torch.bfloat16, "fp8": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
        self.scaler = DynamicLossScaler(cfg.loss_scale_init, 2.0, cfg.loss_scale_backoff,
                                        cfg.loss_scale_growth_interval, self.device) if cfg.precision == "fp16" else None
        if self.ckpt is not None:
            from .checkpoint.sharded import check_resume_world_size
            check_resume_world_size(self.ck_meta, self.world_size, cfg.batch_size, cfg.grad_accum,
                                    source=str(self.ckpt))
        # data-parallel wrapping first (FSDP2 replaces parameters in place), then the optimizer over them
        self.train_model = self.wrap_model(model)

    def _model_config(self):
        """The model to train: ``model``'s; when resuming, the checkpoint's own ``model_config``. A model file that
        was edited since, or another ``--model``, is refused where it differs; a model file that is gone is not
        needed."""
        from .config import ModelConfig, dataclass_from_dict
        spec = self.cfg.model
        if self.ckpt is None:
            return load_model_config(spec)
        src = str(self.ckpt / "meta.json")
        mc = self.ck_meta.get("model_config")
        if not isinstance(mc, dict):
            raise YxanulError("has no model_config object", source=src, key="model_config")
        ck = dataclass_from_dict(ModelConfig, mc, src, prefix="model_config.").validate(src)
        if is_model_file(spec) and not Path(spec).exists():
            self.log(f"model file {spec} is gone; resuming with the checkpoint's model_config")
            return replace(ck, fused_projections=ModelConfig.fused_projections)
        want = load_model_config(spec)
        diff = model_differences(want, ck)
        if diff:
            raise YxanulError(f"model {spec} differs from the checkpoint's model_config in {', '.join(diff)}; a "
                              "run resumes with the model it was trained with", source=src)
        return replace(ck, fused_projections=want.fused_projections)

    def _read_checkpoint_meta(self) -> dict | None:
        """The checkpoint's meta (its files verified; None when not resuming). The weights themselves are
        restored with the optimizer state (:meth:`_restore_training_state`), for single-file and sharded
        checkpoints alike."""
        from .checkpoint.training import read_meta
        if self.ckpt is None:
            return None
        return read_meta(self.ckpt)

    def _setup_optimizer(self) -> None:
        """AdamW over the decay / no-decay groups: fused on CUDA (skips a bad step on the device), or BF16 states."""
        cfg = self.cfg
        model = self.model
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

    def _setup_runtime(self) -> None:
        """Compilation, the data loader, throughput constants and the step counters."""
        from .data.loader import DataLoader
        from .model import compile_mode_uses_cuda_graphs, compile_model
        cfg, model = self.cfg, self.model
        if cfg.compile:
            # every block compiled (one shared graph), or the whole trunk as one; the fused loss stays eager
            compile_model(model, cfg.compile_scope, mode=cfg.compile_mode, tune_kernels=cfg.tune_kernels)
        # reduce-overhead (and max-autotune) replay each compiled block as a CUDA graph; every forward pass starts
        # a new "step" of torch's graph trees, so outputs of the previous one may be overwritten once consumed
        self.graphs = cfg.compile and compile_mode_uses_cuda_graphs(cfg.compile_mode) and self.device.type == "cuda"
        for key, on in (("compile_mode", cfg.compile_mode != "default"), ("tune_kernels", cfg.tune_kernels),
                        ("compile_scope", cfg.compile_scope != "blocks")):
            if on and not cfg.compile:
                self.log(f"{key} has no effect without compile: true")
        self.loader = DataLoader(self.data_dir, cfg.batch_size, cfg.seq_len, seed=cfg.seed, rank=self.rank,
                                 world_size=self.world_size, device=self.device, meta=self.data_meta)
        self.tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * self.world_size
        self.flops_per_token = flops_per_token(self.model_cfg, cfg.seq_len)
        self.peak = peak_flops(self.device)
        self.nan_steps = parse_steps(cfg.inject_nan_at)
        # counters
        self.step = 0
        self.skipped = torch.zeros((), dtype=torch.int64, device=self.device)
        self.consecutive_bad = torch.zeros((), dtype=torch.int64, device=self.device)
        self.last_bad_module: str | None = None

    def _restore_training_state(self) -> None:
        """Weights, optimizer, loss-scaler and RNG states and the counters from the checkpoint being resumed."""
        from .checkpoint.training import restore_training_checkpoint
        # the optimizer's settings (betas, eps, weight decay, ...) are this run's validated config, flags given on
        # resume included: the checkpoint's param_groups bring only the moments' bookkeeping, never a setting
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
        st = restore_training_checkpoint(self.ckpt, self.model, self.opt, self.device, meta=self.ck_meta)
        for g, own in zip(self.opt.param_groups, settings):
            g.update(own)
        if self.scaler is not None and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        self.step = int(st["step"])
        self.skipped.fill_(int(st["skipped"]))
        self.consecutive_bad.fill_(int(st["consecutive_bad"]))

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
                "precision": self.cfg.precision, "data": str(self.data_dir), "policy": self.policy_record}

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
        from .checkpoint.training import save_training_checkpoint
        sharded = self.dist is not None  # data-parallel: every rank writes its part
        return save_training_checkpoint(self.run_dir, self.step, self.model, self.opt,
                                        self.training_state(optimizer=False),
                                        self.checkpoint_meta() | ({"parallel": self.cfg.parallel} if sharded else {}),
                                        sharded=sharded, is_main=self.is_main, keep_last=self.cfg.keep_last,
                                        device=self.device)

    # -- one optimizer step ---------------------------------------------------------------------------
    @property
    def keep_grad_buffers(self) -> bool:
        """Whether gradients live in buffers of their own, zeroed between steps (see train_step): under CUDA
        graphs with gradient accumulation."""
        return self.graphs and self.cfg.grad_accum > 1

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean loss, grad norm, ok flag) as device tensors; skips the update when not ok."""
        cfg = self.cfg
        lr = lr_at(cfg, step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        scale = self.scaler.scale if self.scaler is not None else None
        # Under CUDA graphs a gradient that autograd adopts as .grad (the first accumulation into a None grad)
        # lives in the graph's output memory, which the next replay overwrites. With several micro-batches such
        # gradients are copied out after the first one, and from then on the buffers are zeroed (not freed)
        # between steps. With one micro-batch the step consumes them before the next replay: they stay where
        # autograd put them (no copy, no accumulation kernel, no memset).
        keep = self.keep_grad_buffers
        fresh = [p for p in self.params if p.grad is None] if keep else []
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
        foreach = self.device.type == "cuda"
        if cfg.clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, cfg.clip, foreach=foreach)
        else:  # the norm is still logged and checked; clipping at infinity would scale every gradient by 1
            gnorm = torch.nn.utils.get_total_norm(grads, foreach=foreach)
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
        self.opt.zero_grad(set_to_none=not keep)  # CUDA graphs with accumulation: keep the owned buffers
        if self.scaler is not None:
            self.scaler.update(ok)
        bad = (~ok).long()
        self.skipped += bad
        self.consecutive_bad = (self.consecutive_bad + 1) * bad
        if self.fp8 and self.dist is not None:  # delayed scaling: every rank must derive the same scales
            sync_fp8_amax(self.model)
        if self.fp8:
            # arm statistics for the pass of the next step when its record reports them (1-based numbers); if
            # this step's record reports its own, arming (which resets them) waits until that record has read
            # them (_record, outside the timed window)
            nxt = self._stats_due(step + 2)
            self._arm_after_record = nxt and self._stats_due(step + 1)
            self._fp8_step(self.model, collect_stats=nxt and not self._arm_after_record)
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
        """Train to ``cfg.steps``; returns a summary. A fresh run that fails before its first record (a corrupt
        shard, a write error) takes back the folder and config it made: it leaves nothing behind."""
        fresh = self.is_main and self.ckpt is None
        made = fresh and not os.path.lexists(self.run_dir)
        try:
            return self._fit()
        except YxanulError:
            if fresh:
                self._forget_unstarted_run(made)
            raise

    def _forget_unstarted_run(self, made: bool) -> None:
        from .checkpoint.layout import RUN_CONFIG, RUN_OUTPUTS, is_run_config, list_checkpoints
        d = self.run_dir
        if any((d / n).exists() for n in RUN_OUTPUTS) or list_checkpoints(d) or not d.is_dir():
            return
        with contextlib.suppress(OSError):
            if is_run_config(d / RUN_CONFIG):
                (d / RUN_CONFIG).unlink()
            if (d / "checkpoints").is_dir() and not any((d / "checkpoints").iterdir()):
                (d / "checkpoints").rmdir()
            if made and not any(d.iterdir()):
                d.rmdir()

    def _fit(self) -> dict:
        cfg = self.cfg
        if self.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise write_error(e, self.run_dir) or YxanulError(f"cannot create: {e}", source=str(self.run_dir)) \
                    from None
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
        if cfg.warmup >= cfg.steps:
            self.log(f"warning: warmup ({cfg.warmup}) >= steps ({cfg.steps}): the learning rate never decays; "
                     f"lower --warmup or raise --steps")
        # subnormals make CPU kernels 10-25x slower and carry no signal here; restored when training ends
        flush = self.device.type == "cpu" and torch.set_flush_denormal(True)
        bar = self._progress_bar()
        self.log_lines = self.is_main and bar is None  # no bar (--no-progress, or no terminal): a line per record
        window_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        window_ok = torch.zeros((), dtype=torch.float64, device=self.device)
        clock = StepClock(self._sync, self.clock)
        warm_steps = self._warmup_steps()
        seen_states: set = set()  # compiled FP8: the layer states whose graph variants have compiled
        last: dict = {}
        first_loss = None
        self.last_checkpoint: Path | None = None
        self.postponed: int | None = None   # the step of a checkpoint postponed since the last one written
        if self.fp8 and self._stats_due(self.step + 1):  # the first pass: no earlier step armed its statistics
            self._arm_stats(self.model)
        try:
            clock.start()
            while self.step < cfg.steps:
                new_state = False
                if self._graph_state is not None:  # a pass in a new FP8 layer state compiles: timed apart
                    state = self._graph_state()
                    new_state = state not in seen_states
                    seen_states.add(state)
                if self.step in warm_steps or new_state:  # compilation and first-use costs: apart from the rate
                    with clock.apart("warmup_s"):
                        loss, gnorm, ok = self.train_step(self.step)
                        if self.step == max(warm_steps):  # the compiled graphs' objects out of the collector's way
                            settle(cfg.host_gc)
                else:
                    graphs = _compiled_graphs() if cfg.compile else 0
                    loss, gnorm, ok = self.train_step(self.step)
                    if cfg.compile and _compiled_graphs() != graphs:
                        clock.compiled("warmup_s")
                    else:
                        clock.step_done()
                self.step += 1
                window_loss += torch.where(ok, loss.double(), torch.zeros((), dtype=torch.float64, device=self.device))
                window_ok += ok.double()
                if bar is not None:
                    bar.update(1)
                do_log = self.step % cfg.log_every == 0 or self.step == cfg.steps
                do_eval = bool(cfg.eval_every) and (self.step % cfg.eval_every == 0 or self.step == cfg.steps)
                do_ckpt = bool(cfg.checkpoint_every) and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps)
                do_sample = bool(cfg.sample_every) and self.step % cfg.sample_every == 0
                if not (do_log or do_eval or do_ckpt or do_sample) and self.device_skip:
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
                if not (do_log or do_eval or do_ckpt or do_sample):
                    continue
                clock.pause()  # bookkeeping, evaluation, samples and checkpoints do not count against tokens/s
                if do_log:
                    rec = self._record(loss, gnorm, window_loss, window_ok, clock.take(self.tokens_per_step))
                    if do_eval:
                        with clock.apart("eval_s"):
                            rec["val_loss"] = self.evaluate()
                        rec["eval_s"] = clock.other.pop("eval_s")
                    if first_loss is None:
                        first_loss = rec["loss"]
                    self._write_metrics(rec, tb)
                    self._show(rec, bar, last.get("val_loss"))
                    last = rec | ({} if do_eval else {"val_loss": last.get("val_loss")})
                    window_loss.zero_()
                    window_ok.zero_()
                elif do_eval:
                    with clock.apart("eval_s"):
                        v = self.evaluate()
                    self._write_metrics({"step": self.step, "val_loss": v}, tb)
                    last["val_loss"] = v
                if do_ckpt and consecutive == 0:  # never checkpoint in the middle of a bad streak
                    with clock.apart("checkpoint_s"):
                        self.last_checkpoint = self.save() or self.last_checkpoint
                    self.postponed = None
                elif do_ckpt:
                    self.log(f"step {self.step}: checkpoint postponed ({consecutive} bad steps in a row)")
                    self.postponed = self.step
                if do_sample:
                    with clock.apart("sample_s"):
                        self._print_sample(bar)
                clock.start()
        finally:
            release_gc()  # objects frozen after the warm-up become collectable once this run is over
            if flush:
                torch.set_flush_denormal(False)
            if bar is not None:
                bar.close()
            if tb is not None:
                tb.close()
        summary = {"run_dir": str(self.run_dir), "steps": self.step, "first_loss": first_loss,
                   "final_loss": last.get("loss"), "final_val_loss": last.get("val_loss"),
                   "skipped_steps": int(self.skipped), "tokens_seen": self.step * self.tokens_per_step,
                   "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None}
        self.log(f"done: step {self.step}, loss {_fmt(summary['final_loss'])}, val loss "
                 f"{_fmt(summary['final_val_loss'])}, skipped {summary['skipped_steps']} | {self.run_dir}")
        self._print_next_steps()
        return summary

    # -- what the user sees ---------------------------------------------------------------------------
    def _progress_bar(self):
        """A tqdm bar when asked for and the output is a terminal; None otherwise (log lines instead)."""
        if not (self.is_main and self.cfg.progress and sys.stderr.isatty()):
            return None
        return tqdm(total=self.cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)

    def _show(self, rec: dict, bar, last_val: float | None) -> None:
        """A record on the bar (loss, last validation loss, tokens/s) or as one log line."""
        tps = rec.get("tokens_per_s")
        val = rec.get("val_loss")
        if bar is not None:
            shown = val if val is not None else last_val
            bar.set_postfix(loss=_fmt(rec["loss"], 3) if rec["loss"] is not None else "nan", **({"val": _fmt(shown, 3)} if shown is not None else {}),
                            **({"tok/s": f"{tps:,.0f}"} if tps else {}))
        elif self.log_lines:
            self.log(f"step {rec['step']}/{self.cfg.steps} | loss {_fmt(rec['loss']) if rec['loss'] is not None else 'nan'}"
                     + (f" | val {_fmt(val)}" if val is not None else "")
                     + f" | lr {rec['lr']:.2e} | " + (f"{tps:,.0f} tokens/s" if tps else "tokens/s -"))

    def _print_sample(self, bar) -> None:
        """A short greedy continuation of a fixed prompt from the current weights (rank 0 only)."""
        if not self.is_main:
            return
        if self._sample_tokenizer is None:  # loaded once: parsing a 200k-entry vocabulary takes a while
            self._sample_tokenizer = load_tokenizer(self.tokenizer_meta)
        tok = self._sample_tokenizer
        eot = getattr(tok, "eot_id", None)
        opts = SamplingOptions(max_new_tokens=SAMPLE_TOKENS, temperature=0.0)
        self.model.eval()
        try:
            with self.autocast():
                text = "".join(stream_decode(tok, generate_ids(self.model, tok.encode(SAMPLE_PROMPT), opts, eot), eot))
        finally:
            self.model.train()
        line = f"sample at step {self.step}: {SAMPLE_PROMPT}{text}".replace("\n", " ")
        if bar is not None:
            bar.write(line)
        else:
            self.log(line)

    def _print_next_steps(self) -> None:
        run = shlex.quote(str(self.run_dir))   # commands to copy: a path with spaces or quotes stays one word
        why = (f"the checkpoint due at step {self.postponed} was postponed: the steps before it were not finite"
               if self.postponed is not None else "checkpoint_every is 0")
        if self.last_checkpoint is None:
            self.log(f"no checkpoint written ({why}); plot the losses: yxanul plot {run} --out loss.png")
            return
        if self.postponed is not None:
            self.log(f"not checkpointed: {why}")
        self.log(f"checkpoint: {self.last_checkpoint}\n"
                 "next:\n"
                 f"  yxanul generate {run} --prompt {shlex.quote(SAMPLE_PROMPT)}   # sample from the model\n"
                 f"  yxanul plot {run} --out loss.png   # the loss curves\n"
                 f"  yxanul export {run} --out hf   # a Hugging Face folder")

    # -- timing ---------------------------------------------------------------------------------------
    def _stats_due(self, n: int) -> bool:
        """Whether the record of step `n` (1-based) reports FP8 statistics: every ``fp8_stats_every``-th logged
        step and the last one (never with 0)."""
        cfg = self.cfg
        if not cfg.fp8_stats_every or n > cfg.steps:
            return False
        return n == cfg.steps or (n % cfg.log_every == 0 and (n // cfg.log_every) % cfg.fp8_stats_every == 0)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _warmup_steps(self) -> set[int]:
        """Steps (0-based) timed apart from the rate: the first step this process runs (compilation, first-use
        allocations) and, for FP8 with calibration steps, the first FP8 step (the FP8 graphs compile then) and, for
        delayed scaling, the step after it (its scales are fixed then, and the graphs compile once more)."""
        warm = {self.step}
        cal = self.policy.recipe.calibration_steps if self.fp8 else 0
        if cal and cal > self.step:
            warm.add(cal)
        if self.fp8 and self.cfg.compile:
            # delayed scaling without calibration fixes its scales after the first FP8 step, and static weight
            # copies are first filled by it: either way the second step compiles a graph of its own
            delayed = resolve(self.policy.recipe).delayed
            if (delayed and cal <= self.step) or self.cfg.fp8_weight_cache == "step":
                warm.add(self.step + 1)
            if delayed and cal > self.step:  # the scales become fixed after the first FP8 step
                warm.add(cal + 1)
        return warm

    def _record(self, loss, gnorm, window_loss, window_ok, timing: dict) -> dict:
        """The metrics record of a log step; `timing` is the window's StepClock.take() (tokens_per_s and the
        times spent apart)."""
        loss_v, gnorm_v, wl, n_ok = float(loss), float(gnorm), float(window_loss), float(window_ok)
        if self.world_size > 1 and torch.distributed.is_initialized():
            t = torch.tensor([loss_v, wl], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(t)
            loss_v, wl = (t / self.world_size).tolist()
        skipped = int(self.skipped)
        tps = timing["tokens_per_s"]
        rec = {"step": self.step, "loss": loss_v if math.isfinite(loss_v) else None,
               "loss_avg": wl / n_ok if n_ok else None,  # mean over the good steps since the last record
               "lr": lr_at(self.cfg, self.step - 1), "grad_norm": gnorm_v if math.isfinite(gnorm_v) else None,
               "tokens_per_s": tps, "tokens_seen": self.step * self.tokens_per_step,
               "skipped_steps": skipped, "consecutive_bad": int(self.consecutive_bad),
               "mfu": (tps * self.flops_per_token / (self.peak * self.world_size)) if (tps and self.peak) else None}
        rec.update({k: v for k, v in timing.items() if k != "tokens_per_s"})
        if self.scaler is not None:
            rec["loss_scale"] = float(self.scaler.scale)
        if self.device.type == "cuda":
            rec["memory_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        else:
            rec["memory_bytes"] = _resident_memory()
        if self.last_bad_module:
            rec["last_bad_module"] = self.last_bad_module
        if self.fp8 and self._fp8_stats is not None and self._stats_due(self.step):
            try:
                stats = _jsonable(self._fp8_stats(self.model))
            except Exception as e:  # statistics must never stop training
                stats = {"error": f"{type(e).__name__}: {e}"}
            rec["fp8"] = fp8_summary(stats)
            if self.is_main and "modules" in stats:
                with open(self.run_dir / "fp8_stats.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": self.step, **stats}) + "\n")
        if self._arm_after_record:  # read: the next pass may record (and first reset) its own now
            self._arm_stats(self.model)
            self._arm_after_record = False
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
            keep, dropped = [], 0
            try:
                raw = path.read_bytes()
            except OSError as e:
                raise YxanulError(f"unreadable: {e.strerror or e}", source=str(path)) from None
            for line in raw.splitlines():
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line.decode("utf-8"))
                    step = rec.get("step", 0) if isinstance(rec, dict) else None
                except (ValueError, RecursionError):  # a line cut short by the kill (or not JSON this trainer wrote)
                    step = None
                if isinstance(step, bool) or not isinstance(step, (int, float)):
                    dropped += 1   # not a record this trainer wrote
                elif step <= self.step:
                    keep.append(line.decode("utf-8"))
            if dropped:
                self.log(f"{path}: dropped {dropped} line(s) that are not training records")
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


def _fmt(v, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def train(cfg: TrainConfig, resume: str | None = None, **kw) -> dict:
    """Train per `cfg` (optionally resuming from a checkpoint or run folder); returns a summary dict."""
    return Trainer(cfg, resume=resume, **kw).fit()
