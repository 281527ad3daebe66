"""Data-parallel training on PyTorch's own engine: ``torchrun`` + DDP or FSDP2, FP8-aware, DCP checkpoints.

Launch::

    torchrun --nproc-per-node 8 -m yxanul train --parallel fsdp2 ...

* :func:`init_distributed` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT``) and starts the default process group: NCCL on CUDA, Gloo on CPU.
* :func:`wrap_model` wraps the model in ``DistributedDataParallel`` or shards it with FSDP2
  (``torch.distributed.fsdp.fully_shard``, one unit per transformer block, then the root). FSDP2 keeps the
  FP32 master weights sharded, all-gathers them in the compute dtype (BF16) and reduce-scatters gradients in
  FP32, so gradient accumulation stays FP32 as the design note requires.
* FP8 linears (:mod:`yxanul.fp8.linear`): the delayed-scaling amax histories are all-reduced (MAX) across
  ranks by :func:`sync_fp8_amax` before every ``fp8_step``, so every rank derives the same scales. The
  blockwise, rowwise and tensorwise recipes compute their scales from the tensor being quantized (just in time)
  and need no synchronization. Under FSDP2 the weights are quantized *after* the all-gather, from the
  unsharded (BF16) weight: parameters are all-gathered in BF16, not FP8 (FP8 all-gather is not supported).
* Checkpoints: :func:`save_dcp_checkpoint` writes model and optimizer through ``torch.distributed.checkpoint``
  (every rank writes its own shards in parallel) into ``RUN_DIR/checkpoints/step_XXXXXXXX/dcp/`` next to
  ``meta.json`` and ``state.pt``; the folder appears atomically (written to a temporary sibling, renamed by
  rank 0 after a barrier). DCP re-shards on load, so a run can resume on a different number of ranks.
  :func:`consolidate_checkpoint` turns any checkpoint into one safetensors file of FP32 weights.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .errors import YxanulError

PARALLEL_MODES = ("none", "ddp", "fsdp2")
DCP_FOLDER = "dcp"
_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    is_main: bool = True
    backend: str | None = None  # None: no process group (one process)

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def launched_by_torchrun() -> bool:
    """True when the torchrun/elastic environment variables are present."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(key: str) -> int:
    raw = os.environ.get(key)
    if raw is None:
        raise YxanulError("is not set; launch with torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, "
                          "MASTER_PORT)", source="environment", key=key)
    try:
        return int(raw)
    except ValueError:
        raise YxanulError(f"must be an integer, got {raw!r}", source="environment", key=key) from None


def read_torchrun_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment, validated."""
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if world < 1:
        raise YxanulError(f"must be >= 1, got {world}", source="environment", key="WORLD_SIZE")
    if not 0 <= rank < world:
        raise YxanulError(f"must be in [0, WORLD_SIZE={world}), got {rank}", source="environment", key="RANK")
    if local < 0:
        raise YxanulError(f"must be >= 0, got {local}", source="environment", key="LOCAL_RANK")
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(key):
            raise YxanulError("is not set; launch with torchrun (or set it for env:// rendezvous)",
                              source="environment", key=key)
    return rank, world, local


def _resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise YxanulError("CUDA is not available on this machine; use --device cpu (Gloo backend)",
                              key="device")
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise YxanulError(f"LOCAL_RANK {local_rank} but only {n} CUDA device(s) are visible; start at most "
                              f"{n} processes per node (--nproc-per-node)", source="environment", key="LOCAL_RANK")
        return torch.device("cuda", local_rank)
    if device != "cpu":
        raise YxanulError(f"expected cpu, cuda or auto, got {device!r}", key="device")
    return torch.device("cpu")


def init_distributed(device: str = "auto", backend: str | None = None,
                     timeout_s: float = 1800.0) -> DistInfo:
    """Join the torchrun job: validate the environment, pick the device and backend, start the process group.

    ``device`` cpu | cuda | auto; ``backend`` None picks NCCL for CUDA and Gloo for CPU. Idempotent: if the
    default process group already exists, it is reused. Raises :class:`YxanulError` for a missing or bad
    environment (not launched with torchrun), an unavailable backend or a missing GPU.
    """
    import torch.distributed as dist

    if not dist.is_available():
        raise YxanulError("this PyTorch build has no torch.distributed support", key="parallel")
    rank, world, local = read_torchrun_env()
    dev = _resolve_device(device, local)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    ok = {"nccl": dist.is_nccl_available, "gloo": dist.is_gloo_available,
          "mpi": dist.is_mpi_available}.get(backend)
    if ok is None:
        raise YxanulError(f"unknown backend {backend!r} (expected nccl, gloo or mpi)", key="backend")
    if not ok():
        hint = " (NCCL needs a CUDA build of PyTorch on Linux)" if backend == "nccl" else ""
        raise YxanulError(f"the {backend} backend is not available in this PyTorch build{hint}", key="backend")
    if backend == "nccl" and dev.type != "cuda":
        raise YxanulError("the nccl backend needs --device cuda", key="backend")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        kw = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
        if dev.type == "cuda":
            kw["device_id"] = dev
        try:
            dist.init_process_group(**kw)
        except (RuntimeError, ValueError) as e:
            raise YxanulError(f"could not join the process group: {str(e).splitlines()[0]}",
                              source=f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}") from None
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise YxanulError(f"process group has rank {dist.get_rank()}/{dist.get_world_size()}, the environment "
                          f"says {rank}/{world}", source="environment")
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev, is_main=rank == 0, backend=backend)


def destroy_distributed() -> None:
    """Tear down the default process group if this process started one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def dist_info() -> DistInfo:
    """The current rank/world size (one process when no process group exists)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        r, w = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", r))
        be = dist.get_backend()
        dev = torch.device("cuda", torch.cuda.current_device()) if be == "nccl" else torch.device("cpu")
        return DistInfo(r, w, local, dev, r == 0, be)
    return DistInfo()


# -- wrapping ------------------------------------------------------------------------------------------

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards one by one: the model's transformer blocks (``model.layers``)."""
    layers = getattr(model, "layers", None)
    if isinstance(layers, (nn.ModuleList, nn.Sequential)):
        return list(layers)
    return []


def wrap_model(model: nn.Module, parallel: str = "ddp", device: torch.device | str | None = None,
               precision: str = "bf16", reshard_after_forward: bool = True,
               fsdp_param_dtype: torch.dtype | str | None = "auto") -> nn.Module:
    """Wrap `model` (already on its device) for data-parallel training; returns the module to call.

    ``ddp``: ``DistributedDataParallel`` (rank 0's parameters are broadcast at construction; gradients are
    all-reduced in FP32, the parameters' dtype). Buffers are synced at construction but not re-broadcast at
    every forward: the FP8 delayed-scaling histories are per rank between syncs
    (:func:`sync_fp8_amax`), and the model has no other mutable buffers.

    ``fsdp2``: ``fully_shard`` on every transformer block, then on the root (embeddings, final norm, head).
    The root is the same object, now an ``FSDPModule``. ``MixedPrecisionPolicy``: parameters all-gathered in
    ``fsdp_param_dtype`` ("auto": the compute dtype of `precision`, i.e. BF16 for bf16/fp8, FP16 for fp16,
    FP32 for fp32), gradients reduce-scattered and accumulated in FP32 into the sharded FP32 master weights.
    """
    import torch.distributed as dist

    if parallel not in ("ddp", "fsdp2"):
        raise YxanulError(f"unknown parallel mode {parallel!r} (expected ddp or fsdp2)", key="parallel")
    if not (dist.is_available() and dist.is_initialized()):
        raise YxanulError(f"--parallel {parallel} needs a process group; launch with torchrun "
                          f"(torchrun --nproc-per-node N -m yxanul train --parallel {parallel} ...)", key="parallel")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        import inspect

        # no buffer broadcast at every forward (newer torch names the switch forward_sync_buffers)
        sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                else {"broadcast_buffers": False})
        return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, gradient_as_bucket_view=True,
                   **sync)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if fsdp_param_dtype == "auto":
        if precision not in COMPUTE_DTYPES:
            raise YxanulError(f"unknown precision {precision!r}", key="precision")
        pdt = COMPUTE_DTYPES[precision]
    elif isinstance(fsdp_param_dtype, str):
        pdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}.get(fsdp_param_dtype, "bad")
        if pdt == "bad":
            raise YxanulError(f"expected auto, bf16, fp16 or fp32, got {fsdp_param_dtype!r}", key="fsdp_param_dtype")
    else:
        pdt = fsdp_param_dtype
    mp = MixedPrecisionPolicy(param_dtype=pdt, reduce_dtype=torch.float32)
    # Same initial weights on every rank before sharding (every rank seeds identically; this makes it certain).
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.numel():
                dist.broadcast(t.data, src=0)
    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        # the last block is all-gathered again right away by the backward: keep it unsharded
        fully_shard(block, mp_policy=mp, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    fully_shard(model, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying model of a DDP / torch.compile wrapper (FSDP2 wraps in place)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None or not isinstance(inner, nn.Module):
            return model
        model = inner


def micro_batch_context(train_model: nn.Module, last: bool):
    """Context for one micro-batch's forward/backward under gradient accumulation.

    DDP: ``no_sync()`` on every micro-batch but the last, so gradients accumulate locally in FP32 and are
    all-reduced once per optimizer step. FSDP2: gradients are reduce-scattered after every micro-batch and
    accumulated in FP32 into the sharded gradients (skipping the reduce-scatter would accumulate unsharded
    gradients in the BF16 all-gather dtype, against the design note), so this is a no-op.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    m = getattr(train_model, "_orig_mod", train_model)
    if isinstance(m, DDP) and not last:
        return m.no_sync()
    return contextlib.nullcontext()


# -- FP8 -------------------------------------------------------------------------------------------------

def _delayed_fp8_modules(model: nn.Module) -> list[nn.Module]:
    try:
        from .fp8.linear import fp8_modules
    except ImportError:  # pragma: no cover - FP8 layers not installed
        return []
    return [m for m in fp8_modules(unwrap_model(model)).values() if m.recipe.name == "delayed"]


@torch.no_grad()
def sync_fp8_amax(model: nn.Module, group=None) -> int:
    """All-reduce (MAX) the delayed-scaling amax histories of every FP8 linear across ranks.

    Call once per optimizer step, after the last micro-batch's backward and before ``fp8_step`` (which turns
    the histories into scales): every rank then holds the same histories and derives the same scales. One
    collective for the whole model. Blockwise, rowwise and tensorwise recipes need no synchronization (their
    scales come from the tensor being quantized), and neither does a single process: both return 0.
    Returns the number of modules synchronized.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return 0
    mods = _delayed_fp8_modules(model)
    if not mods:
        return 0
    # a NaN amax is how a non-finite operand reaches the layer's flag (at fp8_step), but a MAX all-reduce may
    # drop it (NCCL's fmaxf does unless every rank has one): fold this rank's flags in first
    from .fp8.linear import _pending_nonfinite
    with torch.no_grad():
        torch._foreach_add_([m.nonfinite for m in mods], list(_pending_nonfinite(mods).unbind(0)))
        # counted now: a NaN/Inf left in the row would be counted again by fp8_step when every rank had one
        # (the MAX keeps it then). Zero is what the scale update makes of a non-finite entry anyway.
        for m in mods:
            torch.nan_to_num_(m.amax_history[0], nan=0.0, posinf=0.0, neginf=0.0)
    hist = [m.amax_history for m in mods]
    flat = torch.cat([h.reshape(-1).float() for h in hist])
    dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
    for h, part in zip(hist, torch.split(flat, [h.numel() for h in hist])):
        h.copy_(part.view_as(h))
    return len(mods)


# -- checkpoints ---------------------------------------------------------------------------------------

def is_dcp_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return (p / DCP_FOLDER / ".metadata").is_file() and (p / "meta.json").is_file()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _broadcast_obj(obj, src: int = 0):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _gather_rng(device: torch.device) -> list[dict]:
    import torch.distributed as dist

    mine = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def save_dcp_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                        state: dict, meta: dict, keep_last: int | None = None,
                        device: torch.device | None = None) -> Path:
    """Collective: every rank calls it. Writes ``RUN_DIR/checkpoints/step_XXXXXXXX/`` with

    * ``dcp/``: model and optimizer state (``get_state_dict``) through ``torch.distributed.checkpoint``,
      each rank writing its own shards (FSDP2) or rank 0 writing the replicated tensors (DDP);
    * ``state.pt`` (rank 0): `state` (loss scaler, counters, data position: plain tensors and containers)
      plus every rank's RNG state under ``rng_per_rank``;
    * ``meta.json`` (rank 0): `meta` plus ``step``, ``format: "dcp"`` and ``world_size``.

    The folder is written under a temporary name and renamed by rank 0 after a barrier, then ``latest`` is
    updated and old checkpoints pruned to `keep_last`. Returns the folder (on every rank).
    """
    import dataclasses

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from .checkpoint.training import checkpoint_name, prune_checkpoints
    from .io import atomic_write_text

    info = dist_info()
    ckpt_root = Path(run_dir) / "checkpoints"
    out = ckpt_root / checkpoint_name(step)
    tmp = None
    if info.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=ckpt_root)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
    tmp = Path(_broadcast_obj(tmp))
    base = unwrap_model(model)
    ok = True
    try:
        if optimizer is not None:
            msd, osd = get_state_dict(base, optimizer)
            sd = {"model": msd, "optim": osd}
        else:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict
            sd = {"model": get_model_state_dict(base)}
        dcp.save(sd, checkpoint_id=str(tmp / DCP_FOLDER))
        rngs = _gather_rng(device or info.device)
        if info.is_main:
            meta = dict(meta)
            meta.update(step=int(step), format="dcp", world_size=info.world_size)
            for k in ("model_config", "train_config"):
                if dataclasses.is_dataclass(meta.get(k)):
                    meta[k] = dataclasses.asdict(meta[k])
            torch.save(dict(state) | {"rng_per_rank": rngs}, tmp / "state.pt")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        ok = False
        raise
    finally:
        if info.distributed:
            flag = torch.tensor([1 if ok else 0], dtype=torch.int32,
                                device=info.device if info.backend == "nccl" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            ok = ok and bool(flag.item())
        if info.is_main:
            if ok:
                if out.exists():
                    old = out.with_name(f".{out.name}.old-{os.getpid()}")
                    os.replace(out, old)
                    os.replace(tmp, out)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(tmp, out)
                atomic_write_text(ckpt_root / "latest", out.name + "\n")
                prune_checkpoints(run_dir, out, keep_last)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
    if not ok:
        raise YxanulError("another rank failed while writing the checkpoint; nothing was written", source=str(out))
    return out


def read_checkpoint_meta(ckpt: str | Path) -> dict:
    from .io import read_checkpoint_meta_file
    return read_checkpoint_meta_file(Path(ckpt) / "meta.json")


def check_resume_world_size(meta: dict, world_size: int, batch_size: int, grad_accum: int,
                            source: str = "checkpoint") -> None:
    """Resuming on a different number of ranks is allowed when the global batch stays the same.

    DCP re-shards model and optimizer on load, and the data loader draws each step's global batch of
    ``batch_size x world_size`` windows independently of the rank count, so keeping ``per-rank batch x ranks x
    grad_accum`` unchanged continues the same training. A different global batch would silently change the
    run (learning-rate schedule and data order were tuned for the saved one): that is refused.
    """
    saved_world = int(meta.get("world_size", 1))
    if saved_world == world_size:
        return  # same ranks: a changed --batch-size / --grad-accum is the user's explicit choice
    tc = meta.get("train_config") or {}
    try:
        saved_global = int(tc["batch_size"]) * saved_world * int(tc["grad_accum"])
    except (KeyError, TypeError, ValueError):
        return
    now = batch_size * world_size * grad_accum
    if saved_global != now:
        hint = (f"; keep the global batch with --batch-size {saved_global // (world_size * grad_accum)}"
                    if saved_global % (world_size * grad_accum) == 0 else
                    " and cannot be kept with this number of ranks; resume with a number of ranks that divides it")
        raise YxanulError(f"saved with {saved_world} rank(s) and a global batch of {saved_global} sequences; "
                          f"resuming on {world_size} rank(s) would make it {now}{hint}", source=source,
                          key="world_size")


def load_dcp_checkpoint(ckpt: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                        device: torch.device | None = None) -> dict:
    """Collective (or single-process): load a DCP checkpoint into `model` (wrapped or not) and `optimizer`,
    re-sharding as needed. Returns ``state.pt`` (with this rank's ``rng`` picked from ``rng_per_rank`` when
    the world size is unchanged, rank 0's otherwise)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    p = Path(ckpt)
    if not is_dcp_checkpoint(p):
        raise YxanulError("not a distributed (DCP) checkpoint: no dcp/.metadata", source=str(p))
    import warnings

    base = unwrap_model(model)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            if optimizer is not None:
                msd, osd = get_state_dict(base, optimizer)
                sd = {"model": msd, "optim": osd}
                dcp.load(sd, checkpoint_id=str(p / DCP_FOLDER))
                set_state_dict(base, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
            else:
                from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
                sd = {"model": get_model_state_dict(base)}
                dcp.load(sd, checkpoint_id=str(p / DCP_FOLDER))
                set_model_state_dict(base, sd["model"])
    except (RuntimeError, ValueError, KeyError) as e:
        msg = str(e).strip().splitlines()
        raise YxanulError(f"checkpoint does not match this model/optimizer: {msg[0] if msg else type(e).__name__}",
                          source=str(p / DCP_FOLDER)) from None
    for m in base.modules():  # FP8 weight caches must see the loaded weights
        if hasattr(m, "invalidate") and callable(m.invalidate):
            m.invalidate()
    try:
        state = torch.load(p / "state.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise YxanulError("missing state.pt", source=str(p / "state.pt")) from None
    except Exception as e:
        raise YxanulError(f"unreadable training state: {str(e).splitlines()[0]}", source=str(p / "state.pt")) from None
    rngs = state.pop("rng_per_rank", None) or []
    info = dist_info()
    if rngs:
        state["rng"] = rngs[info.rank] if len(rngs) == info.world_size else rngs[0]
    return state


def load_plain_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, plain: dict) -> None:
    """Load a single-process ``optimizer.state_dict()`` (keyed by parameter index) into an optimizer over the
    same parameters after wrapping (DDP: loaded as is; FSDP2: every rank reads the full state and keeps its
    shard). Lets a single-process checkpoint resume under ``--parallel``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    base = unwrap_model(model)
    ids = {id(p): n for n, p in base.named_parameters()}
    order = [ids.get(id(p)) for g in optimizer.param_groups for p in g["params"]]
    sharded = any(type(p).__name__ == "DTensor" for p in base.parameters())
    if not sharded:
        optimizer.load_state_dict(plain)
        return
    if None in order:
        raise YxanulError("optimizer holds parameters that are not the model's", key="optimizer")
    try:
        fqn = {"state": {order[int(i)]: v for i, v in plain["state"].items()},
               "param_groups": [dict(g, params=[order[int(i)] for i in g["params"]]) for g in plain["param_groups"]]}
        set_optimizer_state_dict(base, optimizer, fqn, options=StateDictOptions(full_state_dict=True))
    except (KeyError, IndexError, RuntimeError, ValueError) as e:
        raise YxanulError(f"optimizer state does not match the model: {str(e).splitlines()[0] if str(e) else e!r}",
                          key="optimizer") from None


# -- consolidation -------------------------------------------------------------------------------------

def _model_config_of(meta: dict, source: str):
    from .config import ModelConfig, dataclass_from_dict

    mc = meta.get("model_config")
    if not isinstance(mc, dict):
        raise YxanulError("has no model_config object", source=source, key="model_config")
    return dataclass_from_dict(ModelConfig, mc, source, prefix="model_config.").validate(source)


def read_dcp_model_state(dcp_dir: str | Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The model tensors of a DCP checkpoint as full CPU tensors, read in this one process (no process group
    needed). `keys` (model state names) restricts what is read; default: every ``model.*`` tensor."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(dcp_dir))
    try:
        md = reader.read_metadata()
    except Exception as e:
        raise YxanulError(f"unreadable DCP metadata: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                          source=str(dcp_dir)) from None
    tensors = {k[len("model."):]: v for k, v in md.state_dict_metadata.items()
               if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}
    if keys is not None:
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise YxanulError(f"missing {len(missing)} model tensor(s), e.g. {missing[0]}", source=str(dcp_dir))
        tensors = {k: tensors[k] for k in keys}
    target = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in tensors.items()}
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load({"model": target}, storage_reader=reader, no_dist=True)
    return target


def consolidate_checkpoint(src: str | Path, out: str | Path, overwrite: bool = False,
                           with_buffers: bool = False) -> dict:
    """Write one ``.safetensors`` file holding the FP32 master weights of a checkpoint, keyed by the model's
    parameter names (``embeddings.tok.weight``, ``layers.0.attn.q_proj.weight``, ...), readable by
    ``yxanul export --model PRESET`` and ``yxanul analyze``.

    `src`: a run folder (its latest checkpoint) or a step folder, DCP (distributed) or single-file. The model
    config, step and tokenizer go into the file's metadata. ``with_buffers`` also keeps the FP8
    delayed-scaling state (amax histories, scales). Returns a summary dict.
    """
    from safetensors.torch import save_file

    from .checkpoint.training import latest_checkpoint
    from .io import atomic_path
    from .model import Yxanul

    src, out = Path(src), Path(out)
    if out.suffix != ".safetensors":
        raise YxanulError("must end in .safetensors", source=str(out), key="--out")
    if out.exists() and not overwrite:
        raise YxanulError("exists; pass --overwrite to replace it", source=str(out))
    if not src.exists():
        raise YxanulError("checkpoint not found", source=str(src))
    ckpt = src
    if not (src / "meta.json").is_file():
        found = latest_checkpoint(src) if src.is_dir() else None
        if found is None:
            # a run folder whose latest checkpoint is DCP (latest_checkpoint may only know single-file ones)
            root = src / "checkpoints"
            cands = sorted(p for p in root.glob("step_*") if is_dcp_checkpoint(p)) if root.is_dir() else []
            if not cands:
                raise YxanulError("no checkpoint found (expected a run folder or a step_XXXXXXXX folder)",
                                  source=str(src))
            found = cands[-1]
        ckpt = found
    meta = read_checkpoint_meta(ckpt)
    cfg = _model_config_of(meta, str(ckpt / "meta.json"))
    with torch.device("meta"):
        ref = Yxanul(cfg)
    names = [n for n, _ in ref.named_parameters()]
    if is_dcp_checkpoint(ckpt):
        kind = "dcp"
        sd = read_dcp_model_state(ckpt / DCP_FOLDER)
    elif (ckpt / "model.safetensors").is_file():
        from safetensors.torch import load_file
        kind = "safetensors"
        try:
            sd = load_file(str(ckpt / "model.safetensors"))
        except Exception as e:
            raise YxanulError(f"unreadable safetensors: {str(e).splitlines()[0]}",
                              source=str(ckpt / "model.safetensors")) from None
    else:
        raise YxanulError("neither dcp/ nor model.safetensors in this checkpoint", source=str(ckpt))
    shapes = {n: tuple(p.shape) for n, p in ref.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    for n in names:
        t = sd.get(n)
        if t is None:
            raise YxanulError(f"missing parameter {n} for model {cfg.name}", source=str(ckpt))
        if tuple(t.shape) != shapes[n]:
            raise YxanulError(f"{n} has shape {list(t.shape)}, the model config expects {list(shapes[n])}",
                              source=str(ckpt))
        tensors[n] = t.detach().to("cpu", torch.float32).contiguous()
    extra = sorted(k for k in sd if k not in tensors)
    if with_buffers:
        for k in extra:
            tensors[k] = sd[k].detach().cpu().contiguous()
    header = {"format": "pt", "yxanul_model_config": json.dumps(meta["model_config"]),
              "yxanul_step": str(meta.get("step", "")), "yxanul_source": kind}
    if meta.get("tokenizer") is not None:
        header["yxanul_tokenizer"] = json.dumps(meta["tokenizer"])
    with atomic_path(out, inputs=[src, ckpt / "model.safetensors", ckpt / "meta.json", ckpt / DCP_FOLDER]) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return {"source": str(ckpt), "format": kind, "step": meta.get("step"), "model": cfg.name, "out": str(out),
            "tensors": len(tensors), "params": int(sum(t.numel() for n, t in tensors.items() if n in shapes)),
            "bytes": out.stat().st_size, "dropped": [] if with_buffers else extra}
