"""Where training checkpoints live and how they are checked, for both formats (single file and sharded).

``RUN_DIR/checkpoints/step_00000100/`` holds ``meta.json`` plus the weights (``model.safetensors``, or ``dcp/``
for a sharded checkpoint) and ``state.pt``. ``meta.json["files"]`` records the size and SHA-256 of every other
file of the folder, computed while it was written; :func:`verify_files` checks them before anything is loaded.
``RUN_DIR/checkpoints/latest`` holds the name of the newest folder (a plain ``step_XXXXXXXX`` name, never a path).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from ..errors import YxanulError, brief
from ..io import is_stale_temporary, read_json_file, sha256_of  # noqa: F401 (re-exported)
from .safetensors_header import is_int

STEP_RE = re.compile(r"^step_(\d{8})$")
DCP_FOLDER = "dcp"
# FP8 delayed-scaling state: not weights (checked by the FP8 layers themselves)
FP8_STATE_SUFFIXES = ("amax_history", "scale_inv", "scale_ready", "fp8_steps")
_warned_unhashed: set[str] = set()


def checkpoint_name(step: int) -> str:
    return f"step_{int(step):08d}"


class HashingWriter:
    """A binary output stream that counts and hashes (SHA-256) every byte written through it. Other attributes
    (tell, flush, fileno, ...) are the wrapped stream's; :meth:`open` opens a file for it, which closing (or
    leaving a ``with`` block) closes. Used for the single-file checkpoints and for every file DCP writes."""

    def __init__(self, stream):
        self._stream = stream
        self._h = hashlib.sha256()
        self.size = 0

    @classmethod
    def open(cls, path: str | Path) -> "HashingWriter":
        return cls(open(path, "wb"))

    def write(self, data) -> int:
        n = self._stream.write(data)  # a buffered file writes everything or raises
        view = memoryview(data).cast("B")
        self._h.update(view)
        self.size += len(view)
        return n

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def close(self) -> None:
        self._stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def record(self) -> dict:
        return {"bytes": self.size, "sha256": self._h.hexdigest()}


def write_bytes_hashed(path: str | Path, data: bytes) -> dict:
    """Write `data` to `path`; returns its ``{"bytes", "sha256"}`` record."""
    with HashingWriter.open(path) as f:
        f.write(data)
    return f.record()


def plain_meta(meta: dict, step: int) -> dict:
    """A checkpoint's meta.json contents: `meta` with its step, and its config dataclasses as plain dicts."""
    meta = dict(meta)
    meta["step"] = int(step)
    for k in ("model_config", "train_config"):
        if dataclasses.is_dataclass(meta.get(k)):
            meta[k] = dataclasses.asdict(meta[k])
    return meta


def torch_save_hashed(obj, path: str | Path) -> dict:
    """``torch.save(obj, path)`` through a :class:`HashingWriter`; returns the file's record."""
    with HashingWriter.open(path) as f:
        torch.save(obj, f)
    return f.record()


def safe_relative(name: str) -> bool:
    p = Path(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name


TOKENIZER_TEXT_KEYS = ("kind", "path", "name", "eot_token", "sha256")


def check_tokenizer_spec(tok, source: str, key: str = "tokenizer"):
    """`tok` (a recorded tokenizer spec: None, a name, or an object whose text fields are strings or null and
    whose ids are integers) unless it is malformed: then a one-line error naming `source` and the key (`key`
    is the spec's own key in `source`; empty when the spec is the whole file)."""
    def bad(k, what, v):
        raise YxanulError(f"must be {what}, got {brief(v)}", source=source, key=f"{key}.{k}" if key else k)

    if tok is None or isinstance(tok, str):
        return tok
    if not isinstance(tok, dict):
        raise YxanulError(f"must be an object, a name or null, got {brief(tok)}", source=source, key=key or None)
    if not isinstance(tok.get("kind"), str):
        bad("kind", "a string", tok.get("kind"))
    for k in TOKENIZER_TEXT_KEYS[1:]:
        if tok.get(k) is not None and not isinstance(tok[k], str):
            bad(k, "a string or null", tok[k])
    for k in ("vocab_size", "eot_id"):
        if tok.get(k) is not None and not (is_int(tok[k]) and tok[k] >= 0):
            bad(k, "a non-negative integer or null", tok[k])
    return tok


def check_meta_fields(meta: dict, source: str) -> dict:
    """The fields of a checkpoint's meta.json that loaders read, of the right types (when present)."""
    if "step" in meta and not (is_int(meta["step"]) and meta["step"] >= 0):
        raise YxanulError(f"must be a non-negative integer, got {brief(meta['step'])}", source=source, key="step")
    for k in ("model_config", "train_config"):
        if k in meta and not isinstance(meta[k], dict):
            raise YxanulError(f"must be an object, got {brief(meta[k])}", source=source, key=k)
    check_tokenizer_spec(meta.get("tokenizer"), source)
    return meta


TRAINING_STATE = "state.pt"   # optimizer, RNG and loop state: only resuming reads it
# files a loader reads that a files table must record when they exist (and every file of a DCP checkpoint's
# dcp/ folder)
RECORDED_FILES = ("model.safetensors", TRAINING_STATE)


def verify_files(ckpt: Path, meta: dict, skip: tuple[str, ...] = ()) -> None:
    """Check every file ``meta.json["files"]`` lists (size, then SHA-256), except those named in `skip` (files
    the caller does not read); a mismatch or a missing file is a one-line error naming it, and so is a file the
    loader reads (weights, training state) that has no record. A checkpoint written before hashes were recorded
    (no ``files`` at all) loads with one notice."""
    files = meta.get("files")
    src = str(ckpt / "meta.json")
    if files is None:
        if str(ckpt) not in _warned_unhashed:
            _warned_unhashed.add(str(ckpt))
            print(f"{ckpt}: checkpoint has no recorded file hashes (older format); loading it unverified",
                  file=sys.stderr)
        return
    if not isinstance(files, dict):
        raise YxanulError("must be an object of file records", source=src, key="files")
    for name, rec in files.items():
        if not (isinstance(name, str) and safe_relative(name)):
            raise YxanulError(f"file name {str(name)[:100]!r} is not a relative path inside the checkpoint",
                              source=src, key="files")
        if not (isinstance(rec, dict) and isinstance(rec.get("bytes"), int) and isinstance(rec.get("sha256"), str)):
            raise YxanulError(f"record of {name} needs integer 'bytes' and string 'sha256'", source=src, key="files")
        if name in skip:
            continue
        path = ckpt / name
        if not path.is_file():
            raise YxanulError("missing (listed in meta.json)", source=str(path))
        size = path.stat().st_size
        if size != rec["bytes"]:
            raise YxanulError(f"size {size} differs from the {rec['bytes']} bytes recorded in meta.json; the file "
                              "is damaged or was replaced", source=str(path))
        if sha256_of(path) != rec["sha256"].lower():
            raise YxanulError("SHA-256 differs from the one recorded in meta.json; the file is damaged or was "
                              "replaced", source=str(path))
    held = [name for name in RECORDED_FILES if (ckpt / name).is_file()]
    if (ckpt / DCP_FOLDER).is_dir():  # a sharded checkpoint: the saver records every file of its dcp/ folder
        held += sorted(str(p.relative_to(ckpt)) for p in (ckpt / DCP_FOLDER).rglob("*") if p.is_file())
    for name in held:  # a record removed would turn checking off for the very file that is read
        if name not in files and name not in skip:
            raise YxanulError(f"has no size and SHA-256 record for {name}, which the checkpoint holds; the record "
                              "was removed or the file added, so it cannot be verified", source=src, key="files")


def read_meta(ckpt: str | Path, verify: bool = True, weights_only: bool = False) -> dict:
    """A checkpoint folder's ``meta.json`` (a dict), its listed files verified unless `verify` is false; with
    `weights_only` the training state (which the caller will not read) is not hashed."""
    ckpt = Path(ckpt)
    src = ckpt / "meta.json"
    meta = read_json_file(src, missing="missing meta.json (is this a training checkpoint?)")
    if not isinstance(meta, dict):
        raise YxanulError("must be a JSON object", source=str(src))
    check_meta_fields(meta, str(src))
    if verify:
        verify_files(ckpt, meta, skip=(TRAINING_STATE,) if weights_only else ())
    return meta


def _all_finite(t: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """Whether every value of `t` is finite; FP8 tensors (which ``isfinite`` does not take) are upcast to FP32
    a chunk at a time."""
    if t.element_size() > 1:
        return bool(torch.isfinite(t).all())
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk].float()).all()) for i in range(0, flat.numel(), chunk))


def check_finite(tensors: dict, source: str) -> None:
    """Every weight of a floating-point type and finite; the FP8 scaling state is not checked here."""
    for name, t in tensors.items():
        if name.endswith(FP8_STATE_SUFFIXES) or not isinstance(t, torch.Tensor):
            continue
        if not t.is_floating_point():
            raise YxanulError(f"{name}: dtype {str(t.dtype).removeprefix('torch.')}, expected a floating-point "
                              "type; the file is damaged or not a yxanul checkpoint", source=source)
        local = t.to_local() if hasattr(t, "to_local") else t
        if local.numel() and not _all_finite(local):
            raise YxanulError(f"{name} holds NaN or Inf values; this checkpoint cannot be used (resume from an "
                              "earlier one)", source=source)


# -- the run folder ---------------------------------------------------------------------------------------

def is_dcp_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return (p / DCP_FOLDER / ".metadata").is_file() and (p / "meta.json").is_file()


def has_weights(p: Path) -> bool:
    """model.safetensors (one process) or dcp/.metadata (sharded)."""
    return (p / "model.safetensors").is_file() or (p / DCP_FOLDER / ".metadata").is_file()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name)
                   and (p / "meta.json").exists()), key=lambda p: p.name)


def read_latest(root: Path) -> str | None:
    """The folder name ``checkpoints/latest`` holds (None when there is no such file); anything but a
    ``step_XXXXXXXX`` name (a path, ``..``, bytes that are not UTF-8, a folder) is a one-line error."""
    latest = root / "latest"
    if not latest.exists() and not latest.is_symlink():
        return None
    if not latest.is_file():
        raise YxanulError("is not a file; it should hold the name of the newest checkpoint folder (delete it to "
                          "fall back to the highest step)", source=str(latest))
    try:
        name = latest.read_bytes()[:256].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise YxanulError("is not UTF-8 text; it should hold a name like step_00000100", source=str(latest)) from None
    except OSError as e:
        raise YxanulError(f"unreadable: {e.strerror or e}", source=str(latest)) from None
    if not STEP_RE.match(name):
        raise YxanulError(f"must name a checkpoint folder of this run (like step_00000100), got {name[:80]!r}",
                          source=str(latest))
    return name


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run: the one ``latest`` names, unless a complete folder of a
    higher step exists (a run killed after its checkpoint folder was renamed into place but before ``latest``
    was rewritten; resuming the older one would later prune the newer)."""
    root = Path(run_dir) / "checkpoints"
    name = read_latest(root)
    found = [p for p in list_checkpoints(run_dir) if has_weights(p) and (p / "meta.json").exists()]
    newest = found[-1] if found else None
    if name is not None:
        p = root / name
        if p.is_dir() and (p / "meta.json").exists() and has_weights(p) and (newest is None or newest.name <= p.name):
            return p
    return newest


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its latest checkpoint)."""
    p = Path(path)
    if (p / "meta.json").exists() and has_weights(p):
        return p
    if p.is_dir():
        found = latest_checkpoint(p)
        if found is not None:
            return found
        hint = (f"; it stopped before its first checkpoint: start it over with `yxanul train --out {p} --restart`"
                if (p / "metrics.jsonl").exists() else "")
        raise YxanulError(f"no checkpoint found in this run folder{hint}", source=str(p))
    if p.is_file() and (p.parent / "meta.json").exists() and has_weights(p.parent):
        raise YxanulError(f"is a file of a checkpoint; give its folder ({p.parent}) or the run folder", source=str(p))
    raise YxanulError("checkpoint not found", source=str(p))


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


def remove_stale_temporaries(ckpt_root: Path) -> None:
    """Temporary folders of a save that was killed half-way (its process gone: a save in progress in another
    process on the same run folder is left alone)."""
    if ckpt_root.is_dir():
        for stale in ckpt_root.glob(".step_*"):
            if is_stale_temporary(stale):
                shutil.rmtree(stale, ignore_errors=True)


RUN_OUTPUTS = ("metrics.jsonl", "fp8_stats.jsonl")
RUN_CONFIG = "config.yaml"
# everything a training run writes into its folder: a fresh run starts only in a folder holding nothing else
RUN_ENTRIES = frozenset(RUN_OUTPUTS + (RUN_CONFIG, "checkpoints", "tensorboard"))
_RUN_CONFIG_HEAD = b"train:\n"   # how the trainer's resolved config (yaml.safe_dump, keys in order) begins


def is_run_config(path: Path) -> bool:
    """Whether `path` is the resolved config a run writes (``train:``, ``model:``, ... sections), not a file
    of the user's that happens to bear its name."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
    except OSError:
        return False
    return head.startswith(_RUN_CONFIG_HEAD) and b"\nmodel:\n" in head


def _own_temporary(p: Path) -> bool:
    """A killed run's temporary copy of one of its own files (``.config.yaml.PID-XXXXXXXX.tmp``)."""
    from ..io import is_stale_temporary
    return is_stale_temporary(p) and any(p.name.startswith(f".{n}.") for n in RUN_ENTRIES)


def prepare_fresh_run_dir(run_dir: Path, restart: bool) -> None:
    """A fresh start in `run_dir`. A folder that already holds a run is refused, unless it has no checkpoint
    and `restart` is set: then the records of the stopped run (``metrics.jsonl``, ``fp8_stats.jsonl``) are
    removed and it starts over. A run with checkpoints is never started over (resume it). A ``config.yaml``
    that no run wrote (the user's own, perhaps the very train config given) is never replaced."""
    cfg = run_dir / RUN_CONFIG
    if os.path.lexists(cfg) and not (cfg.is_file() and not cfg.is_symlink() and is_run_config(cfg)):
        raise YxanulError(f"holds a {RUN_CONFIG} that no yxanul run wrote (a run writes its resolved config "
                          f"there); choose another --out", source=str(run_dir))
    try:
        foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_ENTRIES
                         and not _own_temporary(p)) if run_dir.is_dir() else []
    except OSError as e:
        raise YxanulError(f"cannot list the run folder: {e.strerror or e}", source=str(run_dir)) from None
    if foreign:  # the user's own folder: a run would mix its files in (and --restart would delete its records)
        raise YxanulError(f"is not empty and holds files no yxanul run writes ({', '.join(foreign[:3])}"
                          f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty --out", source=str(run_dir))
    if not any((run_dir / n).exists() for n in RUN_OUTPUTS):
        return
    ckpts = [p for p in list_checkpoints(run_dir) if has_weights(p)]
    if ckpts:
        raise YxanulError(f"run folder holds a run with checkpoints (latest {ckpts[-1].name}); pass --resume to "
                          "continue it, or another --out", source=str(run_dir))
    if not restart:
        raise YxanulError("run folder holds a run that stopped before its first checkpoint; pass --restart to "
                          "start it over, or another --out", source=str(run_dir))
    for n in RUN_OUTPUTS:
        (run_dir / n).unlink(missing_ok=True)
