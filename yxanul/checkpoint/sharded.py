"""Sharded training checkpoints through ``torch.distributed.checkpoint`` (DCP), for ``--parallel ddp|fsdp2``.

A sharded checkpoint folder holds ``dcp/`` (model and optimizer state, each rank writing its own shards),
``state.pt`` (loss scaler, counters, every rank's RNG state) and ``meta.json`` (``format: "dcp"``,
``world_size``, file records). DCP re-shards on load, so a run resumes on another number of ranks.
:func:`consolidate_checkpoint` turns any checkpoint into one safetensors file of FP32 weights.

Reading never runs code from the checkpoint: DCP stores its ``.metadata`` and non-tensor values as pickles,
and here they are unpickled by :class:`SafeFileSystemReader` (an allow-list of the classes DCP writes) and
:class:`SafeLoadPlanner` (``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import pathlib
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import default_planner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict, set_state_dict)

from ..distributed import dist_info, unwrap_model
from ..errors import YxanulError, brief, first_line
from ..io import atomic_path, atomic_write_text, tmp_sibling
from .layout import (DCP_FOLDER, HashingWriter, checkpoint_name, check_finite, is_dcp_checkpoint, latest_checkpoint,
                     list_checkpoints, prune_checkpoints, read_meta, remove_stale_temporaries, safe_relative,
                     plain_meta, torch_save_hashed, TRAINING_STATE)

_SINGLE_PROCESS_NOTE = ".*assuming the intent is to load in a single process.*"


# -- reading DCP pickles safely ------------------------------------------------------------------------------

def _allowed_globals() -> dict[tuple[str, str], object]:
    """The classes and functions a DCP ``.metadata`` pickle may name: DCP's metadata records, torch.Size,
    dtypes and layouts, paths and plain containers. Looked up by name, so a class missing from this torch
    version is simply not admitted."""
    allowed: dict[tuple[str, str], object] = {}
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                 "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"):
        if hasattr(dcp_metadata, name):
            allowed[(dcp_metadata.__name__, name)] = getattr(dcp_metadata, name)
    from torch.distributed.checkpoint import filesystem
    if hasattr(filesystem, "_StorageInfo"):
        allowed[(filesystem.__name__, "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    for name, v in vars(torch).items():
        if isinstance(v, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = v
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for cls in (pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath,
                pathlib.Path):
        allowed[("pathlib", cls.__name__)] = cls
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    for cls in (set, frozenset, slice, complex):
        allowed[("builtins", cls.__name__)] = cls
    return allowed


class _MetadataUnpickler(pickle._Unpickler):
    """The pure-Python unpickler (its opcodes can be overridden, the C one's cannot) with two rules: globals only
    from the allow-list, and BUILD (``__setstate__`` / ``__dict__`` update) only on instances of allowed classes,
    never on a class or a function, whose attributes would then change for the whole process."""
    allowed = _allowed_globals()
    _instance_types = tuple({v for v in allowed.values() if isinstance(v, type)})
    dispatch = dict(pickle._Unpickler.dispatch)

    def load_build(self):
        target = self.stack[-2] if len(self.stack) >= 2 else None
        if isinstance(target, type) or not isinstance(target, self._instance_types):
            raise pickle.UnpicklingError(f"sets the state of a {type(target).__name__[:60]}, which a DCP checkpoint "
                                         "never does")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module: str, name: str):
        found = self.allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refers to {module[:60]}.{name[:60]}, which a DCP checkpoint never holds")
        return found

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("holds a persistent reference, which a DCP checkpoint never holds")


def load_dcp_metadata(path: str | Path):
    """Unpickle a DCP ``.metadata`` file admitting only the classes DCP writes; anything else is a one-line
    error naming the file (and nothing from it runs)."""
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise YxanulError("missing DCP metadata", source=str(path)) from None
    except Exception as e:  # any malformed pickle: UnpicklingError, EOFError, TypeError from a constructor...
        raise YxanulError(f"not a DCP checkpoint's metadata: {first_line(e)}", source=str(path)) from None
    if not isinstance(md, dcp_metadata.Metadata):
        raise YxanulError(f"not a DCP checkpoint's metadata (holds {type(md).__name__})", source=str(path))
    for info in (getattr(md, "storage_data", None) or {}).values():  # shard files must lie inside dcp/
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or not safe_relative(rel):
            raise YxanulError(f"names a shard file {str(rel)[:80]!r} outside the checkpoint", source=str(path))
    return md


class SafeFileSystemReader(dcp.FileSystemReader):
    """``FileSystemReader`` whose metadata comes through :func:`load_dcp_metadata`."""

    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        md = load_dcp_metadata(Path(self.path) / name)
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that loads non-tensor values with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            raise YxanulError(f"refused a stored value of {read_item.dest_index.fqn}: "
                              f"{first_line(e)}") from None
        if self.flatten_state_dict:
            default_planner.set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _dcp_load(sd: dict, dcp_dir: Path, **kw) -> None:
    """``dcp.load`` through the safe reader and planner. The metadata is checked first, so that a refused file
    is reported as itself rather than wrapped in DCP's per-rank exception report."""
    load_dcp_metadata(Path(dcp_dir) / ".metadata")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_NOTE)
            dcp.load(sd, storage_reader=SafeFileSystemReader(str(dcp_dir)), planner=SafeLoadPlanner(), **kw)
    except CheckpointException as e:
        lines = [ln for ln in str(e).splitlines() if "Error" in ln and ":" in ln]
        raise YxanulError(f"unreadable DCP checkpoint: {(lines[-1] if lines else str(e).splitlines()[0])[:200]}",
                          source=str(dcp_dir)) from None


# -- saving -------------------------------------------------------------------------------------------------

class _HashingFileSystem(FileSystem):
    """DCP's local file system, recording the size and SHA-256 of every file written (by path, across renames)."""

    def __init__(self):
        super().__init__()
        self.records: dict[Path, dict] = {}

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with super().create_stream(path, mode) as stream:
            if "w" not in mode and "a" not in mode:
                yield stream
                return
            hashed = HashingWriter(stream)  # not closed here: DCP's stream
            yield hashed
        self.records[Path(path)] = hashed.record()

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        if Path(path) in self.records:
            self.records[Path(new_path)] = self.records.pop(Path(path))


def _dcp_save(sd: dict, dcp_dir: Path, folder: Path) -> dict:
    """``dcp.save`` (collective) hashing what this rank writes; returns every rank's file records keyed by
    their path relative to `folder` (on every rank)."""
    writer = dcp.FileSystemWriter(str(dcp_dir))
    writer.fs = fs = _HashingFileSystem()
    dcp.save(sd, storage_writer=writer)
    mine = {str(p.relative_to(folder)): rec for p, rec in fs.records.items() if p.exists()}
    if not (dist.is_available() and dist.is_initialized()):
        return mine
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return {k: v for part in every for k, v in part.items()}

def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _broadcast_obj(obj, src: int = 0):
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _gather_rng(device: torch.device) -> list[dict]:
    mine = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def _make_tmp(ckpt_root: Path, out: Path) -> str:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(ckpt_root)
    tmp = tmp_sibling(out)  # named with this process's id: a later save removes it if this one is killed
    tmp.mkdir()
    return str(tmp)


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():
        old = tmp_sibling(out, "old")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def save_dcp_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                        state: dict, meta: dict, keep_last: int | None = None,
                        device: torch.device | None = None) -> Path:
    """Collective: every rank calls it. Writes ``RUN_DIR/checkpoints/step_XXXXXXXX/`` with

    * ``dcp/``: model and optimizer state (``get_state_dict``) through ``torch.distributed.checkpoint``,
      each rank writing its own shards (FSDP2) or rank 0 writing the replicated tensors (DDP);
    * ``state.pt`` (rank 0): `state` (loss scaler, counters, data position: plain tensors and containers)
      plus every rank's RNG state under ``rng_per_rank``;
    * ``meta.json`` (rank 0): `meta` plus ``step``, ``format: "dcp"``, ``world_size`` and the size and SHA-256
      of every file above, each hashed by the rank that wrote it as it was written.

    The folder is written under a temporary name and renamed by rank 0 after a barrier, then ``latest`` is
    updated and old checkpoints pruned to `keep_last`. Returns the folder (on every rank).
    """
    info = dist_info()
    ckpt_root = Path(run_dir) / "checkpoints"
    out = ckpt_root / checkpoint_name(step)
    tmp = Path(_broadcast_obj(_make_tmp(ckpt_root, out) if info.is_main else None))
    base = unwrap_model(model)
    ok = True
    try:
        if optimizer is not None:
            msd, osd = get_state_dict(base, optimizer)
            sd = {"model": msd, "optim": osd}
        else:
            sd = {"model": get_model_state_dict(base)}
        files = _dcp_save(sd, tmp / DCP_FOLDER, tmp)
        rngs = _gather_rng(device or info.device)
        if info.is_main:
            meta = plain_meta(meta, step) | {"format": "dcp", "world_size": info.world_size}
            files[TRAINING_STATE] = torch_save_hashed(dict(state) | {"rng_per_rank": rngs}, tmp / TRAINING_STATE)
            meta["files"] = dict(sorted(files.items()))
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
                _publish(tmp, out)
                atomic_write_text(ckpt_root / "latest", out.name + "\n")
                prune_checkpoints(run_dir, out, keep_last)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
    if not ok:
        raise YxanulError("another rank failed while writing the checkpoint; nothing was written", source=str(out))
    return out


# -- loading ------------------------------------------------------------------------------------------------

def check_resume_world_size(meta: dict, world_size: int, batch_size: int, grad_accum: int,
                            source: str = "checkpoint") -> None:
    """Resuming on a different number of ranks is allowed when the global batch stays the same.

    DCP re-shards model and optimizer on load, and the data loader draws each step's global batch of
    ``batch_size x world_size`` windows independently of the rank count, so keeping ``per-rank batch x ranks x
    grad_accum`` unchanged continues the same training. A different global batch would silently change the
    run (learning-rate schedule and data order were tuned for the saved one): that is refused.
    """
    saved_world = meta.get("world_size", 1)
    if not isinstance(saved_world, int) or isinstance(saved_world, bool) or saved_world < 1:
        raise YxanulError(f"must be a positive integer, got {brief(saved_world)}", source=f"{source}/meta.json",
                          key="world_size")
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


def _invalidate_fp8_caches(model: nn.Module) -> None:
    for m in model.modules():  # FP8 weight caches must see the loaded weights
        if hasattr(m, "invalidate") and callable(m.invalidate):
            m.invalidate()


def load_dcp_weights(ckpt: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Collective (or single-process): load a DCP checkpoint's model (and optimizer) state into `model` (wrapped
    or not) and `optimizer`, re-sharding as needed; the weights must be finite."""
    p = Path(ckpt)
    if not is_dcp_checkpoint(p):
        raise YxanulError("not a distributed (DCP) checkpoint: no dcp/.metadata", source=str(p))
    base = unwrap_model(model)
    try:
        if optimizer is not None:
            msd, osd = get_state_dict(base, optimizer)
            sd = {"model": msd, "optim": osd}
            _dcp_load(sd, p / DCP_FOLDER)
            check_finite(sd["model"], str(p / DCP_FOLDER))
            set_state_dict(base, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        else:
            sd = {"model": get_model_state_dict(base)}
            _dcp_load(sd, p / DCP_FOLDER)
            check_finite(sd["model"], str(p / DCP_FOLDER))
            set_model_state_dict(base, sd["model"])
    except (RuntimeError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise YxanulError(f"checkpoint does not match this model/optimizer: {first_line(e)}",
                          source=str(p / DCP_FOLDER)) from None
    _invalidate_fp8_caches(base)


def load_dcp_checkpoint(ckpt: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Collective (or single-process): :func:`load_dcp_weights`, then ``state.pt`` (loaded with
    ``weights_only=True``) with this rank's ``rng`` picked from ``rng_per_rank`` when the world size is
    unchanged, rank 0's otherwise."""
    p = Path(ckpt)
    read_meta(p)  # verifies the recorded files
    load_dcp_weights(p, model, optimizer)
    return pick_rank_rng(load_state_file(p / TRAINING_STATE))


def load_state_file(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise YxanulError("missing state.pt", source=str(path)) from None
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise YxanulError(f"unreadable training state: {msg[0][:200] if msg else type(e).__name__}",
                          source=str(path)) from None


def pick_rank_rng(state: dict) -> dict:
    """``state["rng"]`` from ``rng_per_rank``: this rank's when the world size is unchanged, else rank 0's."""
    if not isinstance(state, dict):
        return state
    rngs = state.pop("rng_per_rank", None) or []
    if isinstance(rngs, list) and rngs:
        info = dist_info()
        state["rng"] = rngs[info.rank] if len(rngs) == info.world_size else rngs[0]
    return state


def is_sharded(model: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in unwrap_model(model).parameters())


def check_matches_model(model: nn.Module, sd: dict, source: str) -> None:
    """Every tensor of `sd` that `model` holds has its shape (checked before :func:`check_finite`, which refuses
    a weight of a non-floating type: a tensor of another shape or width is named as such, not as NaN)."""
    for name, own in unwrap_model(model).state_dict().items():
        t = sd.get(name)
        if isinstance(t, torch.Tensor) and tuple(t.shape) != tuple(own.shape):
            raise YxanulError(f"{name}: shape {list(t.shape)} in the checkpoint, {list(own.shape)} in the model; "
                              "the checkpoint does not belong to this model", source=source)


def load_full_model_state(model: nn.Module, sd: dict, source: str) -> None:
    """Load a full (unsharded) model state dict into `model`, which may be FSDP2-sharded: every rank holds the
    full tensors and keeps its shard. Missing or unexpected keys, a tensor of another shape, of a non-floating
    type or with NaN or Inf values are a one-line error naming the tensor."""
    base = unwrap_model(model)
    check_matches_model(base, sd, source)
    check_finite(sd, source)
    try:
        if is_sharded(base):
            own = set(base.state_dict())
            missing, unexpected = sorted(own - set(sd)), sorted(set(sd) - own)
            if not (missing or unexpected):
                set_model_state_dict(base, sd, options=StateDictOptions(full_state_dict=True))
        else:
            missing, unexpected = base.load_state_dict(sd, strict=False)
    except (RuntimeError, ValueError) as e:
        raise YxanulError(f"checkpoint does not match the model: {first_line(e)}",
                          source=source) from None
    if missing or unexpected:
        raise YxanulError(f"checkpoint does not match the model (missing {list(missing)[:3]}, unexpected "
                          f"{list(unexpected)[:3]})", source=source)
    _invalidate_fp8_caches(base)


def load_plain_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, plain: dict,
                               source: str | None = None) -> None:
    """Load a single-process ``optimizer.state_dict()`` (keyed by parameter index) into an optimizer over the
    same parameters after wrapping (DDP: loaded as is; FSDP2: every rank reads the full state and keeps its
    shard). Lets a single-process checkpoint resume under ``--parallel``."""
    base = unwrap_model(model)
    ids = {id(p): n for n, p in base.named_parameters()}
    order = [ids.get(id(p)) for g in optimizer.param_groups for p in g["params"]]
    try:
        if not is_sharded(base):
            optimizer.load_state_dict(plain)
            return
        if None in order:
            raise YxanulError("optimizer holds parameters that are not the model's", source=source, key="optimizer")
        fqn = {"state": {order[int(i)]: v for i, v in plain["state"].items()},
               "param_groups": [dict(g, params=[order[int(i)] for i in g["params"]]) for g in plain["param_groups"]]}
        set_optimizer_state_dict(base, optimizer, fqn, options=StateDictOptions(full_state_dict=True))
    except (KeyError, IndexError, RuntimeError, ValueError, TypeError) as e:
        raise YxanulError(f"optimizer state does not match the model: {first_line(e)}", source=source,
                          key="optimizer") from None


# -- consolidation -------------------------------------------------------------------------------------------

def _model_config_of(meta: dict, source: str):
    from ..config import ModelConfig, dataclass_from_dict

    mc = meta.get("model_config")
    if not isinstance(mc, dict):
        raise YxanulError("has no model_config object", source=source, key="model_config")
    return dataclass_from_dict(ModelConfig, mc, source, prefix="model_config.").validate(source)


def read_dcp_model_state(dcp_dir: str | Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The model tensors of a DCP checkpoint as full CPU tensors, read in this one process (no process group
    needed). `keys` (model state names) restricts what is read; default: every ``model.*`` tensor."""
    dcp_dir = Path(dcp_dir)
    md = load_dcp_metadata(dcp_dir / ".metadata")
    tensors = {k[len("model."):]: v for k, v in md.state_dict_metadata.items()
               if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}
    if keys is not None:
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise YxanulError(f"missing {len(missing)} model tensor(s), e.g. {missing[0]}", source=str(dcp_dir))
        tensors = {k: tensors[k] for k in keys}
    target = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in tensors.items()}
    try:
        _dcp_load({"model": target}, dcp_dir, no_dist=True)
    except (RuntimeError, ValueError, KeyError, OSError, AssertionError) as e:
        msg = str(e).strip().splitlines()
        raise YxanulError(f"unreadable DCP checkpoint: {msg[0][:200] if msg else type(e).__name__}",
                          source=str(dcp_dir)) from None
    return target


def _find_checkpoint(src: Path) -> Path:
    if (src / "meta.json").is_file():
        return src
    found = latest_checkpoint(src) if src.is_dir() else None
    if found is None:
        cands = [p for p in list_checkpoints(src) if is_dcp_checkpoint(p)] if src.is_dir() else []
        if not cands:
            raise YxanulError("no checkpoint found (expected a run folder or a step_XXXXXXXX folder)", source=str(src))
        found = cands[-1]
    return found


def _read_weights(ckpt: Path) -> tuple[str, dict]:
    if is_dcp_checkpoint(ckpt):
        return "dcp", read_dcp_model_state(ckpt / DCP_FOLDER)
    if (ckpt / "model.safetensors").is_file():
        from safetensors.torch import load_file
        try:
            return "safetensors", load_file(str(ckpt / "model.safetensors"))
        except Exception as e:
            raise YxanulError(f"unreadable safetensors: {first_line(e)}",
                              source=str(ckpt / "model.safetensors")) from None
    raise YxanulError("neither dcp/ nor model.safetensors in this checkpoint", source=str(ckpt))


def consolidate_checkpoint(src: str | Path, out: str | Path, overwrite: bool = False,
                           with_buffers: bool = False) -> dict:
    """Write one ``.safetensors`` file holding the FP32 master weights of a checkpoint, keyed by the model's
    parameter names (``embeddings.tok.weight``, ``layers.0.attn.q_proj.weight``, ...), readable by
    ``yxanul export --model PRESET`` and ``yxanul analyze``.

    `src`: a run folder (its latest checkpoint) or a step folder, DCP (distributed) or single-file; its recorded
    file hashes are verified and its weights must be finite. The model config, step and tokenizer go into the
    file's metadata. ``with_buffers`` also keeps the FP8 delayed-scaling state (amax histories, scales).
    Returns a summary dict.
    """
    from safetensors.torch import save_file

    from ..model import Yxanul

    src, out = Path(src), Path(out)
    if out.suffix != ".safetensors":
        raise YxanulError("must end in .safetensors", source=str(out), key="--out")
    if out.exists() and not overwrite:
        raise YxanulError("exists; pass --overwrite to replace it", source=str(out))
    if not src.exists():
        raise YxanulError("checkpoint not found", source=str(src))
    ckpt = _find_checkpoint(src)
    meta = read_meta(ckpt, weights_only=True)
    cfg = _model_config_of(meta, str(ckpt / "meta.json"))
    with torch.device("meta"):
        ref = Yxanul(cfg)
    kind, sd = _read_weights(ckpt)
    check_matches_model(ref, sd, str(ckpt))   # another shape or type is named as such before finiteness
    check_finite(sd, str(ckpt))
    shapes = {n: tuple(p.shape) for n, p in ref.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    for n, shape in shapes.items():
        t = sd.get(n)
        if t is None:
            raise YxanulError(f"missing parameter {n} for model {cfg.name}", source=str(ckpt))
        if tuple(t.shape) != shape:
            raise YxanulError(f"{n} has shape {list(t.shape)}, the model config expects {list(shape)}",
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
