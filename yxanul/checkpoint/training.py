"""Training checkpoints: ``RUN_DIR/checkpoints/step_00000100/`` holding

* ``model.safetensors``: FP32 master weights and FP8 scaling buffers, keys = ``model.state_dict()`` names;
* ``meta.json``: ``{"step", "model_config", "tokenizer", "train_config", "tokens_seen"}``;
* ``state.pt``: optimizer, loss scaler, RNG states and data position, plain tensors and containers only, so it
  loads with ``torch.load(weights_only=True)``.

Each folder is written into a temporary sibling and renamed when complete; ``RUN_DIR/checkpoints/latest`` names
the newest one, and only the last ``keep_last`` folders are kept.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import torch

from ..errors import YxanulError
from ..io import atomic_dir, atomic_write_text

STEP_RE = re.compile(r"^step_(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step_{int(step):08d}"


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
    """Write one checkpoint folder atomically, update ``latest`` and prune to `keep_last`; returns the folder."""
    from safetensors.torch import save_file

    ckpt_root = Path(run_dir) / "checkpoints"
    out = ckpt_root / checkpoint_name(step)
    meta = dict(meta)
    meta["step"] = int(step)
    for k in ("model_config", "train_config"):
        if dataclasses.is_dataclass(meta.get(k)):
            meta[k] = dataclasses.asdict(meta[k])
    if ckpt_root.is_dir():  # temporary folders of a save that was killed half-way
        for stale in ckpt_root.glob(".step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    with atomic_dir(out, overwrite=True) as tmp:
        save_file(_plain_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    atomic_write_text(ckpt_root / "latest", out.name + "\n")
    prune_checkpoints(run_dir, out, keep_last)
    return out


def prune_checkpoints(run_dir: str | Path, current: Path, keep_last: int | None) -> None:
    """Delete checkpoints newer than `current` (left by a run that was resumed from an earlier step: they belong
    to the abandoned branch), then all but the last `keep_last`."""
    ckpts = list_checkpoints(run_dir)
    for p in ckpts:
        if p.name > current.name:
            shutil.rmtree(p, ignore_errors=True)
    if keep_last and keep_last > 0:
        for p in [p for p in ckpts if p.name <= current.name][:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name)
                   and (p / "meta.json").exists()), key=lambda p: p.name)


def _has_weights(p: Path) -> bool:
    """model.safetensors (one process) or dcp/.metadata (sharded, see yxanul.distributed)."""
    return (p / "model.safetensors").exists() or (p / "dcp" / ".metadata").exists()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run (``latest`` file first, else the highest step)."""
    root = Path(run_dir) / "checkpoints"
    latest = root / "latest"
    if latest.exists():
        p = root / latest.read_text(encoding="utf-8").strip()
        if p.is_dir() and (p / "meta.json").exists() and _has_weights(p):
            return p
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its latest checkpoint)."""
    p = Path(path)
    if (p / "meta.json").exists() and _has_weights(p):
        return p
    if p.is_dir():
        found = latest_checkpoint(p)
        if found is not None:
            return found
        raise YxanulError("no checkpoint found in this run folder", source=str(p))
    raise YxanulError("checkpoint not found", source=str(p))


def load_checkpoint(path: str | Path):
    """(model_config, state_dict, meta) of a checkpoint folder (or a run folder's latest checkpoint)."""
    from safetensors.torch import load_file

    from ..config import ModelConfig, dataclass_from_dict

    p = resolve_checkpoint(path)
    if not (p / "model.safetensors").exists() and (p / "dcp" / ".metadata").exists():
        raise YxanulError("sharded (torch.distributed.checkpoint) checkpoint; make one file with `yxanul checkpoint "
                          "consolidate RUN_OR_CKPT --out FILE.safetensors`", source=str(p))
    try:
        meta = json.loads((p / "meta.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise YxanulError(f"unreadable meta.json: {e}", source=str(p / "meta.json")) from None
    if not isinstance(meta, dict) or "model_config" not in meta:
        raise YxanulError("meta.json has no model_config", source=str(p / "meta.json"))
    cfg = dataclass_from_dict(ModelConfig, meta["model_config"], source=str(p / "meta.json"),
                              prefix="model_config.").validate(str(p / "meta.json"))
    try:
        sd = load_file(str(p / "model.safetensors"))
    except Exception as e:
        raise YxanulError(f"unreadable weights: {e}", source=str(p / "model.safetensors")) from None
    return cfg, sd, meta


def load_training_state(path: str | Path) -> dict:
    """The ``state.pt`` of a checkpoint, loaded with ``weights_only=True`` (no arbitrary unpickling)."""
    p = resolve_checkpoint(path) / "state.pt"
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise YxanulError("missing state.pt", source=str(p)) from None
    except Exception as e:
        raise YxanulError(f"unreadable training state: {str(e).splitlines()[0]}", source=str(p)) from None
