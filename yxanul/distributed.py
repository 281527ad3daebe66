"""Data-parallel training on PyTorch's own engine: ``torchrun`` + DDP or FSDP2, FP8-aware.

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
* Sharded checkpoints (``torch.distributed.checkpoint``) live in :mod:`yxanul.checkpoint.sharded`.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from .errors import YxanulError, first_line

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
            raise YxanulError(f"could not join the process group: {first_line(e)}",
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
    return [m for m in fp8_modules(unwrap_model(model)).values() if m.spec.delayed]


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
