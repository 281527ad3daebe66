"""Training checkpoints: ``RUN_DIR/checkpoints/step_00000100/`` holding

* ``model.safetensors``: FP32 master weights and FP8 scaling buffers, keys = ``model.state_dict()`` names
  (a sharded run writes ``dcp/`` instead, see :mod:`yxanul.checkpoint.sharded`);
* ``meta.json``: ``{"step", "model_config", "tokenizer", "train_config", "tokens_seen", "files"}``, where
  ``files`` records the size and SHA-256 of the other files, computed while writing them;
* ``state.pt``: optimizer, loss scaler, RNG states and data position, plain tensors and containers only, so it
  loads with ``torch.load(weights_only=True)``.

Each folder is written into a temporary sibling and renamed when complete; ``RUN_DIR/checkpoints/latest`` names
the newest one, and only the last ``keep_last`` folders are kept.

The trainer uses two functions whatever the format: :func:`save_training_checkpoint` and
:func:`restore_training_checkpoint`. Every loader (resume, export, generate, consolidate) verifies the recorded
file hashes first and refuses non-finite weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ..errors import YxanulError, first_line
from ..io import atomic_dir, atomic_write_text, write_error
from .layout import (FP8_STATE_SUFFIXES, STEP_RE, check_finite, checkpoint_name, is_dcp_checkpoint,
                     latest_checkpoint, list_checkpoints, prepare_fresh_run_dir, prune_checkpoints, read_meta,
                     TRAINING_STATE, plain_meta, remove_stale_temporaries, resolve_checkpoint, torch_save_hashed,
                     write_bytes_hashed)
from .sharded import (load_dcp_weights, load_full_model_state, load_plain_optimizer_state,
                      load_state_file, pick_rank_rng, save_dcp_checkpoint)

__all__ = ["STEP_RE", "checkpoint_name", "latest_checkpoint", "list_checkpoints", "load_checkpoint",
           "load_training_state", "prepare_fresh_run_dir", "prune_checkpoints", "read_meta", "resolve_checkpoint",
           "restore_training_checkpoint", "save_checkpoint", "save_training_checkpoint", "check_training_state"]


def _plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd, seen = {}, {}
    for k, v in model.state_dict().items():
        t = v.detach().to("cpu")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:  # safetensors refuses shared storage: store a copy
            t = t.clone()
        elif key is not None:
            seen[key] = k
        sd[k] = t.contiguous()
    return sd


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, state: dict, meta: dict,
                    keep_last: int | None = None) -> Path:
    """Write one single-file checkpoint folder atomically, update ``latest`` and prune to `keep_last`; returns
    the folder. The size and SHA-256 of ``model.safetensors`` and ``state.pt`` go into ``meta.json``."""
    ckpt_root = Path(run_dir) / "checkpoints"
    out = ckpt_root / checkpoint_name(step)
    meta = plain_meta(meta, step)
    remove_stale_temporaries(ckpt_root)
    with atomic_dir(out, overwrite=True) as tmp:
        files = {"model.safetensors": write_bytes_hashed(tmp / "model.safetensors", safetensors_bytes(
            _plain_state_dict(model), metadata={"format": "pt"}))}
        files[TRAINING_STATE] = torch_save_hashed(state, tmp / TRAINING_STATE)
        meta["files"] = files
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    atomic_write_text(ckpt_root / "latest", out.name + "\n")
    prune_checkpoints(run_dir, out, keep_last)
    return out


def save_training_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module,
                             optimizer: torch.optim.Optimizer, state: dict, meta: dict, *, sharded: bool,
                             is_main: bool = True, keep_last: int | None = None,
                             device: torch.device | None = None) -> Path | None:
    """The trainer's one save. `sharded` (data-parallel runs): every rank calls it and writes its part through
    ``torch.distributed.checkpoint``; `state` then leaves the optimizer out. Otherwise rank 0 writes
    ``model.safetensors`` and ``state.pt`` with ``optimizer.state_dict()``; other ranks return None."""
    try:
        if sharded:
            return save_dcp_checkpoint(run_dir, step, model, optimizer, state, meta, keep_last=keep_last,
                                       device=device)
        if not is_main:
            return None
        return save_checkpoint(run_dir, step, model, dict(state) | {"optimizer": optimizer.state_dict()}, meta,
                               keep_last=keep_last)
    except YxanulError:
        raise
    except Exception as e:  # noqa: BLE001  disk full, read-only or not writable: nothing of it is left behind
        err = write_error(e, Path(run_dir) / "checkpoints" / checkpoint_name(step))
        if err is None:
            raise
        raise err from None


def _load_weights_file(p: Path, finite: bool = True) -> dict[str, torch.Tensor]:
    try:
        sd = load_file(str(p / "model.safetensors"))
    except FileNotFoundError:
        raise YxanulError("missing model.safetensors", source=str(p / "model.safetensors")) from None
    except Exception as e:
        raise YxanulError(f"unreadable weights: {first_line(e)}",
                          source=str(p / "model.safetensors")) from None
    if finite:
        check_finite(sd, str(p / "model.safetensors"))
    return sd


def load_checkpoint(path: str | Path):
    """(model_config, state_dict, meta) of a single-file checkpoint folder (or a run folder's latest checkpoint),
    its recorded file hashes verified and its weights finite."""
    from ..config import ModelConfig, dataclass_from_dict

    p = resolve_checkpoint(path)
    if not (p / "model.safetensors").exists() and is_dcp_checkpoint(p):
        raise YxanulError("sharded (torch.distributed.checkpoint) checkpoint; make one file with `yxanul checkpoint "
                          "consolidate RUN_OR_CKPT --out FILE.safetensors`", source=str(p))
    meta = read_meta(p)
    if "model_config" not in meta:
        raise YxanulError("meta.json has no model_config", source=str(p / "meta.json"))
    cfg = dataclass_from_dict(ModelConfig, meta["model_config"], source=str(p / "meta.json"),
                              prefix="model_config.").validate(str(p / "meta.json"))
    return cfg, _load_weights_file(p), meta


def load_training_state(path: str | Path) -> dict:
    """The ``state.pt`` of a checkpoint, loaded with ``weights_only=True`` (no arbitrary unpickling)."""
    return load_state_file(resolve_checkpoint(path) / TRAINING_STATE)


# -- checking state.pt before anything is restored ------------------------------------------------------------

def _need(cond: bool, what: str, source: str, key: str) -> None:
    if not cond:
        raise YxanulError(f"{what}; the file is damaged or not a yxanul training state", source=source, key=key)


def _check_rng(rng, source: str, key: str) -> None:
    _need(isinstance(rng, dict), "must be a dict of RNG states", source, key)
    want = torch.get_rng_state()
    t = rng.get("torch")
    _need(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.shape == want.shape,
          f"torch RNG state must be a uint8 tensor of shape {list(want.shape)}", source, f"{key}.torch")
    c = rng.get("cuda")
    _need(c is None or (isinstance(c, torch.Tensor) and c.dtype == torch.uint8 and c.dim() == 1),
          "CUDA RNG state must be a 1-D uint8 tensor", source, f"{key}.cuda")


def check_training_state(st, source: str, optimizer: bool = True) -> dict:
    """Refuse a ``state.pt`` of the wrong structure (one-line error naming the key) before anything is loaded."""
    _need(isinstance(st, dict), "must hold a dict", source, "state")
    for k in ("step", "skipped", "consecutive_bad"):
        _need(isinstance(st.get(k), int) and not isinstance(st.get(k), bool) and st[k] >= 0,
              "must be a non-negative integer", source, k)
    _need(isinstance(st.get("scaler", {}), dict), "must be a dict", source, "scaler")
    _check_rng(st.get("rng"), source, "rng")
    if optimizer:
        opt = st.get("optimizer")
        _need(isinstance(opt, dict) and isinstance(opt.get("state"), dict)
              and isinstance(opt.get("param_groups"), list), "must be an optimizer state_dict "
              "({'state': dict, 'param_groups': list})", source, "optimizer")
    return st


def check_optimizer_state(optimizer: torch.optim.Optimizer, source: str) -> None:
    """Every per-parameter optimizer tensor (moments) has its parameter's shape and finite values, the second
    moments are not negative and the step count is not; a bad one would only surface at the first ``step()``
    after training restarted (or silently, as NaN weights)."""
    names = {"exp_avg": "first moment", "exp_avg_sq": "second moment", "step": "step count"}
    for g in optimizer.param_groups:
        for p in g["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                if not isinstance(v, torch.Tensor):
                    continue
                if v.dim() > 0 and tuple(v.shape) != tuple(p.shape):
                    raise YxanulError(f"optimizer state {k!r} has shape {list(v.shape)}, its parameter "
                                      f"{list(p.shape)}; the checkpoint does not belong to this model",
                                      source=source, key="optimizer")
                local = v.to_local() if hasattr(v, "to_local") else v
                if not local.is_floating_point() or not local.numel():
                    continue
                bad = ("NaN or Inf" if not bool(torch.isfinite(local).all()) else
                       "negative" if k in ("exp_avg_sq", "step") and bool((local < 0).any()) else None)
                if bad:
                    raise YxanulError(f"optimizer state {k!r} ({names.get(k, k)}) holds {bad} values; this "
                                      "checkpoint cannot be used (resume from an earlier one)",
                                      source=source, key="optimizer")


def _restore_rng(rng: dict, device: torch.device, source: str) -> None:
    try:
        torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)
    except (RuntimeError, ValueError) as e:
        raise YxanulError(f"RNG state does not load: {first_line(e)}", source=source,
                          key="rng") from None


def _model_weights_for(model: torch.nn.Module, sd: dict) -> dict:
    """The checkpoint's tensors this model holds: the delayed-scaling state of an FP8 run is dropped when it
    resumes in another precision."""
    from ..distributed import unwrap_model
    own = unwrap_model(model).state_dict()
    return {k: v for k, v in sd.items() if k in own or not k.endswith(FP8_STATE_SUFFIXES)}


def restore_training_checkpoint(ckpt: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                                device: torch.device, meta: dict | None = None) -> dict:
    """The trainer's one load, for either format and any wrapping (none, DDP, FSDP2); collective when sharded.

    Verifies the recorded file hashes (unless `meta` was already read with :func:`read_meta`), checks the
    structure of ``state.pt``, loads weights (finite) and optimizer state (shapes checked) and the RNG state;
    returns the state dict (``step``, ``scaler``, counters). Every failure is a one-line error, raised before
    training continues."""
    p = Path(ckpt)
    meta = read_meta(p) if meta is None else meta
    state_src = str(p / TRAINING_STATE)
    sharded_ckpt = is_dcp_checkpoint(p) and not (p / "model.safetensors").is_file()
    st = check_training_state(pick_rank_rng(load_state_file(p / TRAINING_STATE)), state_src,
                              optimizer=not sharded_ckpt)
    if sharded_ckpt:
        load_dcp_weights(p, model, optimizer)
    else:
        sd = _model_weights_for(model, _load_weights_file(p, finite=False))   # finiteness after the shapes
        load_full_model_state(model, sd, str(p / "model.safetensors"))
        load_plain_optimizer_state(model, optimizer, st["optimizer"], source=state_src)
    check_optimizer_state(optimizer, state_src)
    if int(meta.get("step", -1)) != st["step"]:
        raise YxanulError("state.pt and meta.json disagree on the step", source=str(p))
    _restore_rng(st["rng"], device, state_src)
    return st
