#!/usr/bin/env python
"""Hostile inputs against the command line: every case a subprocess, every promise checked.

Each case builds its hostile input in a temporary folder (from one tiny trained run, its Hugging Face export,
an FP8 copy and a prepared data folder, made once and copied per case), runs one ``yxanul`` command with a
timeout, and checks:

* no ``Traceback`` in its output, and the expected exit code (2 for bad input, with one ``yxanul: error:`` line);
* no payload ran (the crafted pickles would create a marker file);
* every input file is unchanged (SHA-256 before and after; above 256 MiB, the sparse files: size, modification
  time and SHA-256 of the first and last MiB), still present, and no file appeared among them;
* a refused command left no output and no temporary sibling of it; a successful one left its output.

It prints one line per case and a summary, and exits 1 on any violation. Only the standard library and the
project (with its dependencies) are used.

    python scripts/hostile_inputs.py                 # every case, two at a time
    python scripts/hostile_inputs.py --list          # the case table
    python scripts/hostile_inputs.py --only dcp-payload-resume,yaml-bomb-policy-model --keep /tmp/hostile
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import os
import pickle
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
TINY_TRAIN = ["--steps", "2", "--batch-size", "2", "--seq-len", "32", "--log-every", "1", "--eval-every", "0",
              "--checkpoint-every", "2", "--no-progress", "--warmup", "1", "--precision", "fp32"]
QUICK_TRAIN = ["--steps", "1", "--batch-size", "2", "--seq-len", "32", "--log-every", "1", "--eval-every", "0",
               "--checkpoint-every", "1", "--no-progress", "--warmup", "0", "--precision", "fp32"]
STEP = "step_00000002"


def tiny_bench(*args: str, modes: str = "bf16") -> list[str]:
    """``yxanul bench throughput`` with `args` on the tiny model: one eager CPU step of one 16-token row."""
    return ["bench", "throughput", *args, "--device", "cpu", "--model", "tiny", "--modes", modes, "--steps", "1",
            "--warmup", "0", "--batch", "1", "--seq", "16", "--no-compile"]
CKPT = f"run/checkpoints/{STEP}"
UP = "model.layers.0.mlp.up_proj.weight"
BILLION_LAUGHS = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------------------------
class Skip(Exception):
    """This machine cannot build the case (for example a file system without sparse files)."""


def yxanul_argv(args) -> list:
    return [sys.executable, "-m", "yxanul", *args]


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("PYTHONWARNINGS", None)
    return env


def run_yxanul(args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(yxanul_argv(args), cwd=cwd, env=child_env(), capture_output=True, timeout=timeout)


BIG = 1 << 28   # files above 256 MiB (the sparse cases) are fingerprinted, not read whole


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_size > BIG:   # size, modification time, first and last MiB
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            h.update(f.read(1 << 20))
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
            return h.hexdigest()
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def snapshot(path: Path) -> dict[str, str]:
    """Every entry under `path` (itself included): SHA-256 of files, link targets, 'dir' for folders."""
    out: dict[str, str] = {}

    def one(p: Path, rel: str) -> None:
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
            for c in sorted(p.iterdir()):
                one(c, f"{rel}/{c.name}")
        elif p.exists():
            out[rel] = sha256(p) if p.is_file() else "special"

    one(path, path.name)
    return out


def read_st_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return n, json.loads(f.read(n))


def write_safetensors(path: Path, tensors: dict, sparse: int | None = None) -> None:
    """A safetensors file from ``{name: (dtype, shape, bytes)}``; with `sparse`, one declared tensor of that many
    bytes whose data is a hole in the file (no disk used)."""
    hdr, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name, (dtype, shape, data) in tensors.items():
        n = len(data) if sparse is None else sparse
        hdr[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        blobs.append(data)
        off += n
    raw = json.dumps(hdr).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        if sparse is None:
            for b in blobs:
                f.write(b)
        else:
            try:
                f.truncate(8 + len(raw) + off)
            except (OSError, OverflowError) as e:
                raise Skip(f"no sparse file of {off} bytes here: {e}") from None


def rehash(ckpt: Path) -> None:
    """Record the checkpoint's current file sizes and hashes in meta.json, as if it had been written so."""
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"] = {n: {"bytes": (ckpt / n).stat().st_size, "sha256": sha256(ckpt / n)} for n in meta["files"]}
    (ckpt / "meta.json").write_text(json.dumps(meta, indent=2))


def flip_bytes(path: Path, at: float = 0.6, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    for k in range(i, min(i + count, len(data))):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))


def put_value(st_file: Path, value: float, count: int | None = None) -> None:
    """`value` into the first `count` elements (all by default) of the first F32/BF16 weight of a safetensors
    file (header untouched)."""
    n, hdr = read_st_header(st_file)
    for name, rec in hdr.items():
        if name != "__metadata__" and rec["dtype"] in ("F32", "BF16") and name.endswith("weight"):
            one = struct.pack("<f", value) if rec["dtype"] == "F32" else struct.pack("<f", value)[2:]
            lo, hi = rec["data_offsets"]
            with open(st_file, "r+b") as f:
                f.seek(8 + n + lo)
                f.write(one * ((hi - lo) // len(one) if count is None else count))
            return
    raise RuntimeError(f"no floating-point weight in {st_file}")


def put_nan(st_file: Path) -> None:
    """NaN into the first F32/BF16 weight of a safetensors file (header untouched)."""
    put_value(st_file, float("nan"), count=4)


class _Payload:
    """Unpickling it runs a shell command (what a crafted DCP .metadata would do)."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


def plant_dcp(run: Path, payload: bytes) -> None:
    """Turn the run's checkpoint into a sharded (DCP) one whose ``dcp/.metadata`` is `payload`."""
    ck = run / "checkpoints" / STEP
    (ck / "model.safetensors").unlink()
    (ck / "dcp").mkdir()
    (ck / "dcp" / ".metadata").write_bytes(payload)
    (ck / "dcp" / "__0_0.distcp").write_bytes(b"\0" * 64)
    meta = json.loads((ck / "meta.json").read_text())
    meta.update(format="dcp", world_size=1)
    meta["files"].pop("model.safetensors")
    for p in sorted((ck / "dcp").iterdir()):  # recorded as the saver records them: only the payload is foreign
        meta["files"][f"dcp/{p.name}"] = {"bytes": p.stat().st_size, "sha256": sha256(p)}
    (ck / "meta.json").write_text(json.dumps(meta))


def edit_state(ckpt: Path, edit: Callable) -> None:
    """Load state.pt (weights_only), let `edit` return the new object, save it and record its hash."""
    import torch
    st = torch.load(ckpt / "state.pt", weights_only=True)
    torch.save(edit(st), ckpt / "state.pt")
    rehash(ckpt)


def fp8_checkpoint(folder: Path, scale: list[list[float]], *, nan_at: int | None = None, name: str = UP,
                   block: list[int] | None = None) -> Path:
    """A 256x256 E4M3 weight (all 1.0) with an F32 `scale` tensor as its ``_scale_inv``."""
    folder.mkdir(parents=True, exist_ok=True)
    q = bytearray(b"\x38" * (256 * 256))
    if nan_at is not None:
        q[nan_at] = 0x7F
    s = b"".join(struct.pack("<f", v) for row in scale for v in row)
    write_safetensors(folder / "model.safetensors", {
        name: ("F8_E4M3", [256, 256], bytes(q)),
        name + "_scale_inv": ("F32", [len(scale), len(scale[0])], s)})
    if block:
        (folder / "config.json").write_text(json.dumps({"quantization_config": {"weight_block_size": block}}))
    return folder


def bf16_checkpoint(folder: Path, extra: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    one = b"\x80\x3f"   # BF16 1.0
    tensors = {UP: ("BF16", [256, 256], one * (256 * 256))}
    tensors.update(extra or {})
    write_safetensors(folder / "model.safetensors", tensors)
    return folder


def needs_matplotlib() -> None:
    import importlib.util
    if importlib.util.find_spec("matplotlib") is None:
        raise Skip("matplotlib is not installed (the plot is drawn before this check)")


def foreign_folder(path: Path) -> Path:
    (path / "photos").mkdir(parents=True)
    (path / "thesis.txt").write_text("four years of work\n")
    (path / "photos" / "a.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 100)
    return path


# ---------------------------------------------------------------------------------------------------------------
# the case table
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Spec:
    """What one case runs and what must hold afterwards."""

    argv: list                       # after `yxanul`
    rc: int = 2
    inputs: list = dataclasses.field(default_factory=list)    # unchanged, present, nothing added
    outputs: list = dataclasses.field(default_factory=list)   # absent (and no temporaries) unless rc == 0
    needles: list = dataclasses.field(default_factory=list)   # in the error line (rc 2) or the output (rc 0)
    timeout: float = 120
    check: Callable | None = None    # (case dir, completed process) -> a violation message or None
    no_escape: bool = False          # no raw ESC byte anywhere in stdout/stderr


@dataclasses.dataclass
class Case:
    name: str
    group: str
    build: Callable                  # (Ctx) -> Spec
    needs: tuple = ()                # base artefacts copied into the case folder
    quick: bool = False              # part of the subset tests run


CASES: list[Case] = []


def case(name: str, group: str, needs: tuple = (), quick: bool = False):
    def deco(fn):
        CASES.append(Case(name, group, fn, needs, quick))
        return fn
    return deco


class Ctx:
    def __init__(self, d: Path, base: Path, dead_pid: int):
        self.d, self.base, self.dead_pid = d, base, dead_pid
        self.marker = d / "PAYLOAD-RAN"

    def __truediv__(self, other) -> Path:
        return self.d / other


def _payload(ctx: Ctx) -> bytes:
    return pickle.dumps(_Payload(f"touch {shlex.quote(str(ctx.marker))}"))


# -- no foreign code ------------------------------------------------------------------------------------------
@case("dcp-payload-consolidate", "foreign code", ("run",), quick=True)
def _(ctx):
    plant_dcp(ctx / "run", _payload(ctx))
    return Spec(["checkpoint", "consolidate", "run", "--out", "w.safetensors"], inputs=["run"],
                outputs=["w.safetensors"], needles=[".metadata"])


@case("dcp-payload-resume", "foreign code", ("run",), quick=True)
def _(ctx):
    plant_dcp(ctx / "run", _payload(ctx))
    return Spec(["train", "--resume", "run", "--no-progress"], inputs=["run"], needles=[".metadata"])


@case("dcp-payload-nested-resume", "foreign code", ("run",))
def _(ctx):
    plant_dcp(ctx / "run", pickle.dumps({"storage_data": [_Payload(f"touch {shlex.quote(str(ctx.marker))}")]}))
    return Spec(["train", "--resume", "run", "--no-progress"], inputs=["run"], needles=[".metadata"])


@case("dcp-payload-export", "foreign code", ("run",))
def _(ctx):
    plant_dcp(ctx / "run", _payload(ctx))
    return Spec(["export", "run", "--out", "hf2"], inputs=["run"], outputs=["hf2"])


@case("dcp-payload-generate", "foreign code", ("run",))
def _(ctx):
    plant_dcp(ctx / "run", _payload(ctx))
    return Spec(["generate", "run", "--prompt", "Hi"], inputs=["run"])


# -- --overwrite never deletes an input or a foreign folder ---------------------------------------------------
@case("export-out-is-run", "overwrite", ("run",))
def _(ctx):
    return Spec(["export", "run", "--out", "run", "--overwrite"], inputs=["run"])


@case("export-out-holds-checkpoint", "overwrite", ("run",))
def _(ctx):
    return Spec(["export", "run", "--out", "run/checkpoints", "--overwrite"], inputs=["run"])


@case("export-step-out-is-run", "overwrite", ("run",))
def _(ctx):
    return Spec(["export", CKPT, "--out", "run", "--overwrite"], inputs=["run"])


@case("export-out-foreign", "overwrite", ("run",))
def _(ctx):
    foreign_folder(ctx / "precious")
    return Spec(["export", "run", "--out", "precious", "--overwrite"], inputs=["run", "precious"])


@case("export-out-file", "overwrite", ("run",))
def _(ctx):
    (ctx / "notes.txt").write_text("keep me\n")
    return Spec(["export", "run", "--out", "notes.txt", "--overwrite"], inputs=["run", "notes.txt"])


@case("prepare-out-is-input", "overwrite", ("corpus",), quick=True)
def _(ctx):
    return Spec(["data", "prepare", "corpus", "--out", "corpus", "--overwrite", "--no-progress"], inputs=["corpus"])


@case("prepare-out-is-parent", "overwrite", ("corpus",))
def _(ctx):
    (ctx / "src").mkdir()
    shutil.move(ctx / "corpus", ctx / "src" / "corpus")
    return Spec(["data", "prepare", "src/corpus", "--out", "src", "--overwrite", "--no-progress"], inputs=["src"])


@case("prepare-out-is-input-file", "overwrite", ("corpus",))
def _(ctx):
    return Spec(["data", "prepare", "corpus/a.txt", "--out", "corpus/a.txt", "--overwrite", "--no-progress"],
                inputs=["corpus"])


@case("prepare-out-is-tokenizer", "overwrite", ("corpus",))
def _(ctx):
    import base64
    (ctx / "ranks.tiktoken").write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    return Spec(["data", "prepare", "corpus", "--tokenizer", "ranks.tiktoken", "--out", "ranks.tiktoken",
                 "--overwrite", "--no-progress"], inputs=["corpus", "ranks.tiktoken"], needles=["input"])


@case("prepare-out-foreign", "overwrite", ("corpus",), quick=True)
def _(ctx):
    foreign_folder(ctx / "precious")
    return Spec(["data", "prepare", "corpus", "--out", "precious", "--overwrite", "--no-progress"],
                inputs=["corpus", "precious"])


@case("quantize-out-foreign", "overwrite", ("hf",))
def _(ctx):
    foreign_folder(ctx / "precious")
    return Spec(["quantize", "hf", "precious", "--overwrite"], inputs=["hf", "precious"])


@case("quantize-out-is-input", "overwrite", ("hf",))
def _(ctx):
    return Spec(["quantize", "hf", "hf", "--overwrite"], inputs=["hf"])


@case("quantize-out-inside-input", "overwrite", ("hf",))
def _(ctx):
    return Spec(["quantize", "hf", "hf/q", "--overwrite"], inputs=["hf"], outputs=["hf/q"])


@case("quantize-out-holds-input-file", "overwrite", ("hf",))
def _(ctx):
    return Spec(["quantize", "hf/model.safetensors", "hf", "--overwrite"], inputs=["hf"])


@case("dequantize-out-foreign", "overwrite", ("fp8",))
def _(ctx):
    foreign_folder(ctx / "precious")
    return Spec(["dequantize", "fp8", "precious", "--overwrite"], inputs=["fp8", "precious"])


@case("consolidate-out-is-input", "overwrite", ("run",))
def _(ctx):
    return Spec(["checkpoint", "consolidate", "run", "--out", f"{CKPT}/model.safetensors", "--overwrite"],
                inputs=["run"])


@case("consolidate-out-exists", "overwrite", ("run",))
def _(ctx):
    (ctx / "w.safetensors").write_bytes(b"user file")
    return Spec(["checkpoint", "consolidate", "run", "--out", "w.safetensors"], inputs=["run", "w.safetensors"])


@case("plot-out-is-input", "overwrite", ("run",), quick=True)
def _(ctx):
    return Spec(["plot", "run", "--out", "run/metrics.jsonl", "--overwrite"], inputs=["run"])


@case("plot-out-exists", "overwrite", ("run",), quick=True)
def _(ctx):
    (ctx / "loss.png").write_bytes(b"\x89PNG a figure the user keeps")
    return Spec(["plot", "run", "--out", "loss.png"], inputs=["run", "loss.png"], needles=["--overwrite"])


@case("analyze-plot-exists", "overwrite", ("hf",))
def _(ctx):
    (ctx / "dist.png").write_bytes(b"\x89PNG a figure the user keeps")
    return Spec(["analyze", "hf", "--plot", "dist.png"], inputs=["hf", "dist.png"], needles=["--overwrite"])


@case("bench-json-out-exists", "overwrite", quick=True)
def _(ctx):
    (ctx / "results.json").write_text('{"measured": "on the H100, keep"}\n')
    return Spec(tiny_bench("--json-out", "results.json"), inputs=["results.json"], needles=["--overwrite"])


@case("bench-sweep-resume-foreign-json", "overwrite")
def _(ctx):
    (ctx / "results.json").write_text('{"measured": "on the H100, keep"}\n')
    return Spec(tiny_bench("--json-out", "results.json", "--sweep", "d_model=128", "--resume"),
                inputs=["results.json"], needles=["results.json", "--resume"])


@case("bench-sweep-batch-count", "overwrite")
def _(ctx):
    return Spec(tiny_bench("--json-out", "s.json", "--sweep", "d_model=128,256", "--sweep-batch", "4"),
                outputs=["s.json"], needles=["--sweep-batch", "one per value"])


@case("bench-plain-matmul-padding-unknown", "overwrite")
def _(ctx):
    return Spec(tiny_bench("--json-out", "s.json", "--plain-matmul-padding", "default,on", modes="bf16-plain"),
                outputs=["s.json"], needles=["--plain-matmul-padding", "default,on"])


@case("bench-plain-vocab-multiple-bad", "overwrite")
def _(ctx):
    return Spec(tiny_bench("--json-out", "s.json", "--plain-vocab-multiple", "1,0", modes="bf16-plain"),
                outputs=["s.json"], needles=["--plain-vocab-multiple", "1,0"])


@case("bench-plot-exists", "overwrite")
def _(ctx):
    (ctx / "bars.png").write_bytes(b"\x89PNG a figure the user keeps")
    return Spec(tiny_bench("--plot", "bars.png"), inputs=["bars.png"], needles=["--overwrite"])


@case("train-out-holds-user-config", "overwrite")
def _(ctx):
    (ctx / "exp").mkdir()
    (ctx / "exp" / "config.yaml").write_text("steps: 1\nbatch_size: 2\nseq_len: 32\n")
    return Spec(["train", "--train-config", "exp/config.yaml", "--out", "exp", *QUICK_TRAIN], inputs=["exp"],
                needles=["config.yaml"])


@case("train-out-foreign-folder", "overwrite")
def _(ctx):
    foreign_folder(ctx / "precious")
    return Spec(["train", "--out", "precious", *QUICK_TRAIN], inputs=["precious"], needles=["not empty"])


@case("train-out-finished-run", "overwrite", ("run",))
def _(ctx):
    return Spec(["train", "--out", "run", *QUICK_TRAIN], inputs=["run"], needles=["--resume"])


# -- bounded inputs ---------------------------------------------------------------------------------------------
def _bomb(ctx) -> str:
    (ctx / "bomb.yaml").write_text(BILLION_LAUGHS)
    return "bomb.yaml"


@case("yaml-bomb-policy-config", "bounded", quick=True)
def _(ctx):
    return Spec(["policy", "--config", _bomb(ctx)], inputs=["bomb.yaml"], timeout=60, needles=["aliases"])


@case("yaml-bomb-policy-model", "bounded")
def _(ctx):
    return Spec(["policy", "--model", _bomb(ctx)], inputs=["bomb.yaml"], timeout=60, needles=["aliases"])


@case("yaml-bomb-train-config", "bounded")
def _(ctx):
    return Spec(["train", "--train-config", _bomb(ctx), "--out", "r"], inputs=["bomb.yaml"], outputs=["r"],
                timeout=60, needles=["aliases"])


@case("yaml-bomb-quantize-policy", "bounded", ("hf",))
def _(ctx):
    return Spec(["quantize", "hf", "q", "--policy", _bomb(ctx)], inputs=["hf", "bomb.yaml"], outputs=["q"],
                timeout=60, needles=["aliases"])


@case("sparse-1tib-quantize", "bounded", quick=True)
def _(ctx):
    write_safetensors(ctx / "huge.safetensors", {UP: ("BF16", [1 << 19, 1 << 20], b"")}, sparse=1 << 40)
    return Spec(["quantize", "huge.safetensors", "q"], inputs=["huge.safetensors"], outputs=["q"], timeout=60,
                needles=["needs", "available"])


@case("sparse-1tib-dequantize", "bounded")
def _(ctx):
    n = 1 << 40
    rows = n // (1 << 20)
    hdr = {"__metadata__": {"format": "pt"},
           UP: {"dtype": "F8_E4M3", "shape": [rows, 1 << 20], "data_offsets": [0, n]},
           UP + "_scale_inv": {"dtype": "F32", "shape": [rows // 128, (1 << 20) // 128],
                               "data_offsets": [n, n + 4 * (rows // 128) * ((1 << 20) // 128)]}}
    raw = json.dumps(hdr).encode()
    raw += b" " * (-len(raw) % 8)
    p = ctx / "huge.safetensors"
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        try:
            f.truncate(8 + len(raw) + hdr[UP + "_scale_inv"]["data_offsets"][1])
        except (OSError, OverflowError) as e:
            raise Skip(f"no sparse file here: {e}") from None
    return Spec(["dequantize", "huge.safetensors", "d"], inputs=["huge.safetensors"], outputs=["d"], timeout=60,
                needles=["needs", "available"])


@case("dequantize-scale-3x3", "bounded", quick=True)
def _(ctx):
    fp8_checkpoint(ctx / "in", [[1.0] * 3] * 3)
    return Spec(["dequantize", "in", "out"], inputs=["in"], outputs=["out"], needles=[UP])


@case("dequantize-scale-negative", "bounded")
def _(ctx):
    fp8_checkpoint(ctx / "in", [[1.0, 1.0], [-1.0, 1.0]])
    return Spec(["dequantize", "in", "out"], inputs=["in"], outputs=["out"], needles=[UP])


@case("dequantize-scale-inf", "bounded")
def _(ctx):
    fp8_checkpoint(ctx / "in", [[1.0, float("inf")], [1.0, 1.0]])
    return Spec(["dequantize", "in", "out"], inputs=["in"], outputs=["out"], needles=[UP])


@case("dequantize-nan-byte", "bounded")
def _(ctx):
    fp8_checkpoint(ctx / "in", [[1.0, 1.0], [1.0, 1.0]], nan_at=200 * 256 + 3)
    return Spec(["dequantize", "in", "out"], inputs=["in"], outputs=["out"], needles=[UP, "NaN"])


@case("dequantize-declared-block-mismatch", "bounded")
def _(ctx):
    fp8_checkpoint(ctx / "in", [[1.0, 1.0], [1.0, 1.0]], block=[64, 64])
    return Spec(["dequantize", "in", "out"], inputs=["in"], outputs=["out"], needles=[UP])


@case("escape-in-tensor-name-quantize", "bounded", quick=True)
def _(ctx):
    evil = "model.layers.0.mlp.\x1b[2Jdown_proj.weight"
    bf16_checkpoint(ctx / "in", {evil: ("BF16", [4, 4], b"\0" * 32)})
    return Spec(["quantize", "in", "q"], rc=0, inputs=["in"], outputs=["q"], no_escape=True, needles=["\\x1b[2J"])


@case("escape-in-tensor-name-error", "bounded")
def _(ctx):
    fp8_checkpoint(ctx / "in", [[1.0, 1.0], [1.0, 1.0]], nan_at=5, name="model.\x1b]0;owned\x07.up_proj.weight")
    return Spec(["dequantize", "in", "out"], inputs=["in"], outputs=["out"], no_escape=True)


@case("escape-in-tensor-name-analyze", "bounded")
def _(ctx):
    bf16_checkpoint(ctx / "in", {"model.\x1b[31mred.weight": ("BF16", [4, 4], b"\0" * 32)})
    return Spec(["analyze", "in", "--by", "layer"], rc=0, inputs=["in"], no_escape=True)


@case("train-batch-size-1e14", "bounded")
def _(ctx):
    return Spec(["train", "--out", "r", *QUICK_TRAIN, "--batch-size", "100000000000000"], outputs=["r"],
                needles=["batch_size"])


@case("train-lr-1e308", "bounded")
def _(ctx):
    return Spec(["train", "--out", "r", *QUICK_TRAIN, "--lr", "1e308"], outputs=["r"], needles=["lr"])


@case("train-lr-nan", "bounded")
def _(ctx):
    return Spec(["train", "--out", "r", *QUICK_TRAIN, "--lr", "nan"], outputs=["r"], needles=["lr"])


@case("train-vocab-size-1e12", "bounded")
def _(ctx):
    (ctx / "big.yaml").write_text("preset: tiny\nvocab_size: 1000000000000\n")
    return Spec(["train", "--out", "r", *QUICK_TRAIN, "--model", "big.yaml"], inputs=["big.yaml"], outputs=["r"],
                needles=["vocab_size"])


@case("train-d-model-huge", "bounded")
def _(ctx):
    (ctx / "big.yaml").write_text("preset: tiny\nd_model: 1048576\nn_heads: 8192\nn_kv_heads: 8192\n")
    return Spec(["train", "--out", "r", *QUICK_TRAIN, "--model", "big.yaml"], inputs=["big.yaml"], outputs=["r"])


@case("train-inject-nan-huge-range", "bounded")
def _(ctx):
    return Spec(["train", "--out", "r", *QUICK_TRAIN, "--steps", "3", "--checkpoint-every", "0",
                 "--inject-nan-at", "1-100000000000"], rc=0, outputs=["r"], timeout=120, needles=["skipped 3"])


@case("train-loss-scale-init-inf-yaml", "bounded")
def _(ctx):
    (ctx / "t.yaml").write_text("loss_scale_init: .inf\n")
    return Spec(["train", "--train-config", "t.yaml", "--out", "r", *QUICK_TRAIN], inputs=["t.yaml"],
                outputs=["r"], needles=["loss_scale_init"])


@case("train-loss-scale-init-inf-flag", "bounded")
def _(ctx):
    return Spec(["train", "--out", "r", *QUICK_TRAIN, "--loss-scale-init", "inf"], outputs=["r"],
                needles=["loss_scale_init"])


@case("train-config-not-a-mapping", "bounded")
def _(ctx):
    (ctx / "t.yaml").write_text("- steps\n- 3\n")
    return Spec(["train", "--train-config", "t.yaml", "--out", "r"], inputs=["t.yaml"], outputs=["r"])


@case("train-config-unknown-key", "bounded")
def _(ctx):
    (ctx / "t.yaml").write_text("stepz: 3\n")
    return Spec(["train", "--train-config", "t.yaml", "--out", "r"], inputs=["t.yaml"], outputs=["r"],
                needles=["stepz"])


@case("generate-max-new-tokens-huge", "bounded", ("hf",))
def _(ctx):
    return Spec(["generate", "hf", "--prompt", "Hi", "--max-new-tokens", "1000000000000"], rc=0, inputs=["hf"],
                timeout=120)   # stops at the model's context length


@case("generate-sampling-nan", "bounded", ("hf",))
def _(ctx):
    return Spec(["generate", "hf", "--prompt", "Hi", "--temperature", "nan"], inputs=["hf"], needles=["temperature"])


# -- checkpoints you can trust ----------------------------------------------------------------------------------
def _flipped(name: str, file: str, argv: list, outputs: tuple = (), quick: bool = False) -> None:
    """A case: bytes of the checkpoint's `file` flipped, then `yxanul argv` must refuse it naming the file."""
    @case(name, "checkpoint", ("run",), quick=quick)
    def _(ctx):
        flip_bytes(ctx / CKPT / file)
        return Spec(list(argv), inputs=["run"], outputs=list(outputs), needles=[file])


_flipped("flipped-model-resume", "model.safetensors", ["train", "--resume", "run", "--no-progress"], quick=True)
_flipped("flipped-state-resume", "state.pt", ["train", "--resume", "run", "--no-progress"])
_flipped("flipped-model-export", "model.safetensors", ["export", "run", "--out", "hf2"], outputs=("hf2",))
_flipped("flipped-model-generate", "model.safetensors", ["generate", "run", "--prompt", "Hi"])
_flipped("flipped-model-consolidate", "model.safetensors",
         ["checkpoint", "consolidate", "run", "--out", "w.safetensors"], outputs=("w.safetensors",))


@case("truncated-model-resume", "checkpoint", ("run",))
def _(ctx):
    p = ctx / CKPT / "model.safetensors"
    p.write_bytes(p.read_bytes()[:1000])
    return Spec(["train", "--resume", "run", "--no-progress"], inputs=["run"], needles=["model.safetensors"])


@case("flipped-header-analyze", "checkpoint", ("hf",))
def _(ctx):
    p = ctx / "hf" / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[8:40] = b"\xff" * 32
    p.write_bytes(bytes(data))
    return Spec(["analyze", "hf"], inputs=["hf"], needles=["model.safetensors"])


def _nan_run(ctx):
    put_nan(ctx / CKPT / "model.safetensors")
    rehash(ctx / CKPT)


@case("nan-weights-resume", "checkpoint", ("run",), quick=True)
def _(ctx):
    _nan_run(ctx)
    return Spec(["train", "--resume", "run", "--no-progress"], inputs=["run"], needles=["NaN"])


@case("nan-weights-generate", "checkpoint", ("run",))
def _(ctx):
    _nan_run(ctx)
    return Spec(["generate", "run", "--prompt", "Hi"], inputs=["run"], needles=["NaN"])


@case("nan-weights-export", "checkpoint", ("run",))
def _(ctx):
    _nan_run(ctx)
    return Spec(["export", "run", "--out", "hf2"], inputs=["run"], outputs=["hf2"], needles=["NaN"])


@case("nan-weights-consolidate", "checkpoint", ("run",))
def _(ctx):
    _nan_run(ctx)
    return Spec(["checkpoint", "consolidate", "run", "--out", "w.safetensors"], inputs=["run"],
                outputs=["w.safetensors"], needles=["NaN"])


@case("nan-weights-generate-hf", "checkpoint", ("hf",))
def _(ctx):
    put_nan(ctx / "hf" / "model.safetensors")
    return Spec(["generate", "hf", "--prompt", "Hi"], inputs=["hf"], needles=["NaN"])


@case("latest-points-to-other-run", "checkpoint", ("run",))
def _(ctx):
    shutil.copytree(ctx / "run", ctx / "other")
    (ctx / "run" / "checkpoints" / "latest").write_text(str((ctx / "other" / "checkpoints" / STEP).resolve()))
    shutil.rmtree(ctx / CKPT)
    return Spec(["train", "--resume", "run", "--no-progress", "--steps", "3"], inputs=["run", "other"],
                needles=["latest"])


@case("latest-dotdot", "checkpoint", ("run",))
def _(ctx):
    shutil.copytree(ctx / "run", ctx / "other")
    (ctx / "run" / "checkpoints" / "latest").write_text(f"../../other/checkpoints/{STEP}\n")
    shutil.rmtree(ctx / CKPT)
    return Spec(["export", "run", "--out", "hf2"], inputs=["run", "other"], outputs=["hf2"], needles=["latest"])


def _bad_latest(kind):
    def build(ctx):
        latest = ctx / "run" / "checkpoints" / "latest"
        if kind == "folder":
            latest.unlink()
            latest.mkdir()
        else:
            latest.write_bytes(b"\xff\xfe step \x80\n")
        return latest
    return build


for _kind in ("non-utf8", "folder"):
    for _cmd, _argv, _out in (("resume", ["train", "--resume", "run", "--no-progress"], None),
                              ("export", ["export", "run", "--out", "hf2"], "hf2"),
                              ("consolidate", ["checkpoint", "consolidate", "run", "--out", "w.safetensors"],
                               "w.safetensors"),
                              ("generate", ["generate", "run", "--prompt", "Hi"], None)):
        def _mk(kind=_kind, argv=_argv, out=_out):
            def build(ctx):
                _bad_latest(kind)(ctx)
                return Spec(list(argv), inputs=["run"], outputs=[out] if out else [], needles=["latest"])
            return build
        case(f"latest-{_kind}-{_cmd}", "checkpoint", ("run",), quick=(_kind, _cmd) == ("non-utf8", "resume"))(_mk())


def _state_case(name, edit, needle, quick=False):
    @case(f"state-{name}", "checkpoint", ("run",), quick=quick)
    def _(ctx):
        edit_state(ctx / CKPT, edit)
        return Spec(["train", "--resume", "run", "--no-progress", "--steps", "3"], inputs=["run"],
                    needles=["state.pt", needle])


def _no_optimizer(st):
    st.pop("optimizer")
    return st


def _optimizer_shape(st):
    import torch
    for s in st["optimizer"]["state"].values():
        s["exp_avg"] = torch.zeros(3)
        break
    return st


def _rng_shape(st):
    import torch
    st["rng"]["torch"] = torch.zeros(7, dtype=torch.uint8)
    return st


def _param_groups(st):
    st["optimizer"]["param_groups"] = st["optimizer"]["param_groups"][:1] * 5
    return st


_state_case("a-list", lambda st: [1, 2, 3], "state", quick=True)
_state_case("without-optimizer", _no_optimizer, "optimizer")
_state_case("optimizer-shape", _optimizer_shape, "optimizer")
_state_case("optimizer-groups", _param_groups, "optimizer")
_state_case("rng-shape", _rng_shape, "rng")
_state_case("step-text", lambda st: {**st, "step": "2"}, "step")


@case("meta-json-not-json", "checkpoint", ("run",))
def _(ctx):
    (ctx / CKPT / "meta.json").write_text("{not json")
    return Spec(["train", "--resume", "run", "--no-progress"], inputs=["run"], needles=["meta.json"])


@case("meta-json-a-list", "checkpoint", ("run",))
def _(ctx):
    (ctx / CKPT / "meta.json").write_text("[1, 2]")
    return Spec(["export", "run", "--out", "hf2"], inputs=["run"], outputs=["hf2"], needles=["meta.json"])


@case("meta-json-bad-model-config", "checkpoint", ("run",))
def _(ctx):
    meta = json.loads((ctx / CKPT / "meta.json").read_text())
    meta["model_config"]["d_model"] = "wide"
    (ctx / CKPT / "meta.json").write_text(json.dumps(meta))
    return Spec(["generate", "run", "--prompt", "Hi"], inputs=["run"], needles=["d_model"])


@case("meta-json-files-outside", "checkpoint", ("run",))
def _(ctx):
    meta = json.loads((ctx / CKPT / "meta.json").read_text())
    meta["files"]["../../../../etc/hostname"] = {"bytes": 1, "sha256": "0" * 64}
    (ctx / CKPT / "meta.json").write_text(json.dumps(meta))
    return Spec(["export", "run", "--out", "hf2"], inputs=["run"], outputs=["hf2"], needles=["meta.json"])


@case("meta-json-huge-model-generate", "checkpoint", ("run",))
def _(ctx):
    meta = json.loads((ctx / CKPT / "meta.json").read_text())
    meta["model_config"].update(d_model=1 << 20, n_heads=8192, n_kv_heads=8192, head_dim=128)
    (ctx / CKPT / "meta.json").write_text(json.dumps(meta))
    return Spec(["generate", "run", "--prompt", "Hi"], inputs=["run"])


@case("hf-config-huge-generate", "checkpoint", ("hf",))
def _(ctx):
    conf = json.loads((ctx / "hf" / "config.json").read_text())
    conf.update(hidden_size=1 << 20, num_attention_heads=8192, num_key_value_heads=8192, head_dim=128)
    (ctx / "hf" / "config.json").write_text(json.dumps(conf))
    return Spec(["generate", "hf", "--prompt", "Hi"], inputs=["hf"])


@case("hf-config-mismatch-generate", "checkpoint", ("hf",))
def _(ctx):
    conf = json.loads((ctx / "hf" / "config.json").read_text())
    conf.update(intermediate_size=conf["intermediate_size"] * 2)
    (ctx / "hf" / "config.json").write_text(json.dumps(conf))
    return Spec(["generate", "hf", "--prompt", "Hi"], inputs=["hf"])


@case("hf-config-not-json", "checkpoint", ("hf",))
def _(ctx):
    (ctx / "hf" / "config.json").write_bytes(b"\xff{")
    return Spec(["generate", "hf", "--prompt", "Hi"], inputs=["hf"], needles=["config.json"])


@case("safetensors-header-length-huge", "checkpoint")
def _(ctx):
    (ctx / "w.safetensors").write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    return Spec(["analyze", "w.safetensors"], inputs=["w.safetensors"], needles=["w.safetensors"])


@case("safetensors-offsets-beyond-file", "checkpoint")
def _(ctx):
    write_safetensors(ctx / "w.safetensors", {UP: ("BF16", [256, 256], b"\0" * 100)})
    raw = (ctx / "w.safetensors").read_bytes().replace(b'"data_offsets": [0, 100]', b'"data_offsets": [0, 131072]')
    (ctx / "w.safetensors").write_bytes(raw)
    return Spec(["quantize", "w.safetensors", "q"], inputs=["w.safetensors"], outputs=["q"],
                needles=["w.safetensors"])


@case("meta-json-bad-train-config", "checkpoint", ("run",))
def _(ctx):
    meta = json.loads((ctx / CKPT / "meta.json").read_text())
    meta["train_config"]["batch_size"] = -4
    (ctx / CKPT / "meta.json").write_text(json.dumps(meta))
    return Spec(["train", "--resume", "run", "--no-progress"], inputs=["run"], needles=["batch_size"])


# -- malformed records and data ---------------------------------------------------------------------------------
@case("metrics-non-object-plot", "records", ("run",), quick=True)
def _(ctx):
    needs_matplotlib()
    with open(ctx / "run" / "metrics.jsonl", "a") as f:
        f.write("[1, 2]\n")
    return Spec(["plot", "run", "--out", "loss.png"], inputs=["run"], outputs=["loss.png"], needles=["line"])


@case("metrics-non-object-resume", "records", ("run",))
def _(ctx):
    with open(ctx / "run" / "metrics.jsonl", "a") as f:
        f.write('"text"\n')
    def check(d, proc):
        lines = (d / "run" / "metrics.jsonl").read_text().splitlines()
        return None if all(ln.startswith("{") for ln in lines) else "metrics.jsonl still holds a non-record"
    # a torn or foreign line must not block a resume: it is dropped, and said so
    return Spec(["train", "--resume", "run", "--no-progress", "--steps", "3"], rc=0, inputs=[CKPT],
                outputs=["run/checkpoints/step_00000003"], needles=["dropped 1 line"], check=check)


@case("metrics-not-utf8-plot", "records", ("run",))
def _(ctx):
    needs_matplotlib()
    with open(ctx / "run" / "metrics.jsonl", "ab") as f:
        f.write(b"\xff\xfe\n")
    return Spec(["plot", "run", "--out", "loss.png"], inputs=["run"], outputs=["loss.png"],
                needles=["metrics.jsonl"])


@case("shard-id-above-max", "records", ("data",), quick=True)
def _(ctx):
    p = ctx / "data" / "train_000.bin"
    p.write_bytes(struct.pack("<I", 300) * (p.stat().st_size // 4))   # every id beyond the vocabulary
    return Spec(["train", "--data", "data", "--out", "r", *QUICK_TRAIN], inputs=["data"], outputs=["r"],
                needles=["train_000.bin"])


@case("shard-truncated", "records", ("data",))
def _(ctx):
    p = ctx / "data" / "train_000.bin"
    p.write_bytes(p.read_bytes()[:-3])
    return Spec(["train", "--data", "data", "--out", "r", *QUICK_TRAIN], inputs=["data"], outputs=["r"],
                needles=["train_000.bin"])


@case("ckpt-files-table-emptied", "records", ("run",), quick=True)
def _(ctx):
    ck = ctx / "run" / "checkpoints" / STEP
    meta = json.loads((ck / "meta.json").read_text())
    meta["files"] = {}  # the records gone, then the weights damaged
    (ck / "meta.json").write_text(json.dumps(meta))
    flip_bytes(ck / "model.safetensors")
    return Spec(["generate", "run", "--prompt", "Hi"], inputs=["run"], needles=["no size and SHA-256 record"])


@case("ckpt-meta-number-past-digit-limit", "records", ("run",))
def _(ctx):
    meta = ctx / "run" / "checkpoints" / STEP / "meta.json"
    meta.write_text('{"z": ' + "1" * 5000 + ", " + meta.read_text().lstrip()[1:])
    return Spec(["export", "run", "--out", "hf2"], inputs=["run"], outputs=["hf2"], needles=["meta.json"])


@case("export-fp16-overflow", "records", ("run",))
def _(ctx):
    ck = ctx / "run" / "checkpoints" / STEP
    put_value(ck / "model.safetensors", 1e30)  # finite, beyond fp16's 65504
    rehash(ck)
    return Spec(["export", "run", "--out", "hf2", "--dtype", "fp16"], inputs=["run"], outputs=["hf2"],
                needles=["range"])


@case("tiktoken-ranks-empty", "records")
def _(ctx):
    (ctx / "corpus").mkdir()
    (ctx / "corpus" / "a.txt").write_text("hello\n")
    (ctx / "e.tiktoken").write_bytes(b"")
    return Spec(["data", "prepare", "corpus", "--out", "d", "--tokenizer", "e.tiktoken", "--no-progress"],
                inputs=["corpus", "e.tiktoken"], outputs=["d"], needles=["e.tiktoken"])


@case("data-gzip-truncated", "records")
def _(ctx):
    import gzip
    (ctx / "c.txt.gz").write_bytes(gzip.compress(b"hello world\n" * 100)[:30])
    return Spec(["data", "prepare", "c.txt.gz", "--out", "d", "--no-progress"], inputs=["c.txt.gz"],
                outputs=["d"], needles=["c.txt.gz"])


@case("yaml-duplicate-key", "records")
def _(ctx):
    (ctx / "t.yaml").write_text("steps: 1\nsteps: 2\n")
    return Spec(["train", "--train-config", "t.yaml", "--out", "r"], inputs=["t.yaml"], outputs=["r"],
                needles=["twice"])


@case("config-endless-device", "bounded")
def _(ctx):
    return Spec(["policy", "--config", "/dev/zero"], timeout=60, needles=["larger than"])


@case("prompt-file-endless-device", "bounded", ("run",))
def _(ctx):
    return Spec(["generate", "run", "--prompt-file", "/dev/zero"], inputs=["run"], timeout=60, needles=["MiB"])


@case("data-meta-not-json", "records", ("data",))
def _(ctx):
    (ctx / "data" / "meta.json").write_text("{oops")
    return Spec(["train", "--data", "data", "--out", "r", *QUICK_TRAIN], inputs=["data"], outputs=["r"],
                needles=["meta.json"])


@case("data-meta-shard-outside", "records", ("data",))
def _(ctx):
    meta = json.loads((ctx / "data" / "meta.json").read_text())
    meta["splits"]["train"]["shards"][0]["file"] = "../../../../etc/passwd"
    (ctx / "data" / "meta.json").write_text(json.dumps(meta))
    return Spec(["train", "--data", "data", "--out", "r", *QUICK_TRAIN], inputs=["data"], outputs=["r"],
                needles=["meta.json"])


@case("data-meta-not-utf8", "records", ("data",))
def _(ctx):
    (ctx / "data" / "meta.json").write_bytes(b'{"format": "\xff"}')
    return Spec(["train", "--data", "data", "--out", "r", *QUICK_TRAIN], inputs=["data"], outputs=["r"],
                needles=["meta.json"])


@case("data-meta-shard-wrong-type", "records", ("data",))
def _(ctx):
    meta = json.loads((ctx / "data" / "meta.json").read_text())
    meta["splits"]["train"]["shards"] = [{"file": 7, "tokens": "many"}]
    (ctx / "data" / "meta.json").write_text(json.dumps(meta))
    return Spec(["train", "--data", "data", "--out", "r", *QUICK_TRAIN], inputs=["data"], outputs=["r"],
                needles=["meta.json"])


@case("data-info-splits-a-list", "records", ("data",))
def _(ctx):
    meta = json.loads((ctx / "data" / "meta.json").read_text())
    meta["splits"] = ["train", "val"]
    (ctx / "data" / "meta.json").write_text(json.dumps(meta))
    return Spec(["data", "info", "data"], inputs=["data"], needles=["meta.json"])


@case("prepare-not-utf8-strict", "records")
def _(ctx):
    (ctx / "c").mkdir()
    (ctx / "c" / "a.txt").write_bytes(b"good text\n\xff\xfe bad\n")
    return Spec(["data", "prepare", "c", "--out", "d", "--errors", "strict", "--no-progress"], inputs=["c"],
                outputs=["d"], needles=["a.txt"])


@case("generate-device-meta", "records", ("run",))
def _(ctx):
    return Spec(["generate", "run", "--prompt", "Hi", "--device", "meta"], inputs=["run"], needles=["--device"])


@case("generate-prompt-not-utf8", "records", ("run",), quick=True)
def _(ctx):
    return Spec([b"generate", b"run", b"--prompt", b"caf\xe9 \xff"], inputs=["run"], needles=["--prompt"])


@case("generate-prompt-file-not-utf8", "records", ("run",))
def _(ctx):
    (ctx / "p.txt").write_bytes(b"caf\xe9 \xff\n")
    return Spec(["generate", "run", "--prompt-file", "p.txt"], inputs=["run", "p.txt"], needles=["p.txt"])


# -- write errors ------------------------------------------------------------------------------------------------
def _unwritable(ctx) -> str:
    """A folder this process cannot create entries in."""
    if os.geteuid() != 0:
        ro = ctx / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return "ro"
    return "/sys/yxanul-hostile-inputs"   # root ignores permissions; sysfs refuses new entries


@case("quantize-read-only-out", "write errors", ("hf",))
def _(ctx):
    ro = _unwritable(ctx)
    return Spec(["quantize", "hf", f"{ro}/q"], inputs=["hf"], outputs=[f"{ro}/q"], needles=[f"{ro}/q"])


@case("export-read-only-out", "write errors", ("run",))
def _(ctx):
    ro = _unwritable(ctx)
    return Spec(["export", "run", "--out", f"{ro}/hf"], inputs=["run"], outputs=[f"{ro}/hf"], needles=[ro])


@case("plot-read-only-out", "write errors", ("run",))
def _(ctx):
    needs_matplotlib()
    ro = _unwritable(ctx)
    return Spec(["plot", "run", "--out", f"{ro}/loss.png"], inputs=["run"], outputs=[f"{ro}/loss.png"],
                needles=[ro])


@case("train-read-only-out", "write errors")
def _(ctx):
    ro = _unwritable(ctx)
    return Spec(["train", "--out", f"{ro}/run", *QUICK_TRAIN], outputs=[f"{ro}/run"], needles=[ro])


@case("quantize-out-under-a-file", "write errors", ("hf",))
def _(ctx):
    (ctx / "notes.txt").write_text("keep\n")
    return Spec(["quantize", "hf", "notes.txt/q"], inputs=["hf", "notes.txt"], needles=["notes.txt"])


@case("train-checkpoints-is-a-file", "write errors")
def _(ctx):
    (ctx / "r").mkdir()
    (ctx / "r" / "checkpoints").write_text("not a folder\n")
    return Spec(["train", "--out", "r", *QUICK_TRAIN], inputs=["r/checkpoints"], needles=["checkpoints"])


@case("consolidate-out-fifo", "write errors", ("run",))
def _(ctx):
    os.mkfifo(ctx / "pipe.safetensors")
    return Spec(["checkpoint", "consolidate", "run", "--out", "pipe.safetensors", "--overwrite"],
                inputs=["run", "pipe.safetensors"], needles=["pipe.safetensors"])


@case("plot-out-symlink", "write errors", ("run",))
def _(ctx):
    (ctx / "keep.png").write_bytes(b"\x89PNG the user's figure")
    os.symlink("keep.png", ctx / "link.png")
    return Spec(["plot", "run", "--out", "link.png", "--overwrite"], inputs=["run", "keep.png", "link.png"],
                needles=["link.png"])


# -- killed runs ----------------------------------------------------------------------------------------------
@case("killed-before-checkpoint-resume", "killed", ("killed",))
def _(ctx):
    return Spec(["train", "--resume", "killed", "--no-progress"], inputs=["killed"], needles=["--restart"])


@case("killed-before-checkpoint-fresh", "killed", ("killed",))
def _(ctx):
    return Spec(["train", "--out", "killed", *QUICK_TRAIN], inputs=["killed"], needles=["--restart"])


@case("killed-before-checkpoint-restart", "killed", ("killed",))
def _(ctx):
    return Spec(["train", "--out", "killed", "--restart", *QUICK_TRAIN], rc=0, outputs=["killed/checkpoints"])


@case("stale-temporaries-resume", "killed", ("run",))
def _(ctx):
    ck = ctx / "run" / "checkpoints"
    stale = ck / f".step_00000003.{ctx.dead_pid}-deadbeef.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 4096)
    (ck / f".latest.{ctx.dead_pid}-deadbeef.tmp").write_text("step_00000003\n")

    def check(d, proc):
        left = [p.name for p in (d / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
        return f"temporaries left: {left}" if left else None
    return Spec(["train", "--resume", "run", "--no-progress", "--steps", "3", "--checkpoint-every", "1"], rc=0,
                outputs=["run/checkpoints/step_00000003"], check=check)


@case("stale-temporaries-quantize", "killed", ("hf",))
def _(ctx):
    stale = ctx / f".q.{ctx.dead_pid}-deadbeef.tmp"
    stale.mkdir()
    (stale / ".yxanul-output.json").write_text('{"command": "quantize", "version": "0"}\n')
    (stale / "model.safetensors").write_bytes(b"\0" * 4096)

    def check(d, proc):
        return "the stale temporary folder is still there" if stale.exists() else None
    return Spec(["quantize", "hf", "q"], rc=0, inputs=["hf"], outputs=["q"], check=check)


# -- what must keep working --------------------------------------------------------------------------------------
def _modes(folder: str):
    def check(d, proc):
        want = 0o666 & ~current_umask()
        bad = [f"{p.relative_to(d)} {oct(p.stat().st_mode & 0o777)}" for p in (d / folder).rglob("*")
               if p.is_file() and p.stat().st_mode & 0o777 != want]
        return f"file modes differ from {oct(want)}: {bad}" if bad else None
    return check


@case("control-export", "controls", ("run",))
def _(ctx):
    return Spec(["export", "run", "--out", "hf2"], rc=0, inputs=["run"], outputs=["hf2"], check=_modes("hf2"))


@case("control-export-fp8", "controls", ("run",))
def _(ctx):
    def check(d, proc):
        left = [p.name for p in d.iterdir() if p.name.startswith(".")]
        return f"left behind: {left}" if left else _modes("hf8")(d, proc)
    return Spec(["export", "run", "--out", "hf8", "--fp8"], rc=0, inputs=["run"], outputs=["hf8"], check=check)


@case("control-consolidate", "controls", ("run",))
def _(ctx):
    def check(d, proc):
        mode = (d / "w.safetensors").stat().st_mode & 0o777
        return None if mode == 0o666 & ~current_umask() else f"w.safetensors has mode {oct(mode)}"
    return Spec(["checkpoint", "consolidate", "run", "--out", "w.safetensors"], rc=0, inputs=["run"],
                outputs=["w.safetensors"], check=check)


@case("control-plot-overwrite", "controls", ("run",))
def _(ctx):
    needs_matplotlib()
    (ctx / "loss.png").write_bytes(b"\x89PNG an earlier figure")
    return Spec(["plot", "run", "--out", "loss.png", "--overwrite"], rc=0, inputs=["run"], outputs=["loss.png"])


@case("control-analyze-run", "controls", ("run",))
def _(ctx):
    return Spec(["analyze", "run"], rc=0, inputs=["run"])


@case("control-generate-hf", "controls", ("hf",))
def _(ctx):
    return Spec(["generate", "hf", "--prompt", "Hi", "--max-new-tokens", "4", "--seed", "1"], rc=0, inputs=["hf"])


@case("control-quantize-overwrite-own", "controls", ("hf", "fp8"))
def _(ctx):
    shutil.copytree(ctx / "fp8", ctx / "q")
    (ctx / "q" / ".yxanul-output.json").write_text('{"command": "quantize", "version": "0"}\n')
    return Spec(["quantize", "hf", "q", "--overwrite"], rc=0, inputs=["hf"], outputs=["q"], check=_modes("q"))


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    case: Case
    argv: list
    rc: int | None
    seconds: float
    violations: list
    skipped: str | None = None
    error_line: str = ""


BASE_STEPS = [("run", ["train", "--out", "run", *TINY_TRAIN]),
              ("hf", ["export", "run", "--out", "hf"]),
              ("fp8", ["quantize", "hf", "fp8"]),
              ("data", ["data", "prepare", "corpus", "--out", "data", "--no-progress"])]
BASE_NEEDS = {"hf": {"run"}, "fp8": {"hf", "run"}}


def build_base(base: Path, needs: set | None = None, log=print) -> int:
    """The artefacts cases copy (all, or those in `needs`): a tiny trained run, its export, an FP8 copy, a
    prepared data folder and a run killed before its first checkpoint. Returns a dead process id (for stale
    temporaries)."""
    needs = {"run", "hf", "fp8", "data", "killed"} if needs is None else set(needs)
    for n in list(needs):
        needs |= BASE_NEEDS.get(n, set())
    base.mkdir(parents=True, exist_ok=True)
    (base / "corpus").mkdir()
    docs = [f"Document {i}. " + "The quick brown fox jumps over the lazy dog. " * 6 for i in range(12)]
    (base / "corpus" / "a.txt").write_text("\n<|endoftext|>\n".join(docs) + "\n")
    for name, argv in BASE_STEPS:
        if name not in needs:
            continue
        t0 = time.perf_counter()
        p = run_yxanul(argv, base)
        if p.returncode != 0:
            raise RuntimeError(f"building {name} failed ({p.returncode}): {p.stderr.decode(errors='replace')[-2000:]}")
        log(f"  built {name:6s} in {time.perf_counter() - t0:5.1f}s: yxanul {' '.join(argv)}")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    if "killed" not in needs:
        return dead.pid
    # a run killed (SIGKILL) after its first logged step, before any checkpoint
    t0 = time.perf_counter()
    proc = subprocess.Popen(yxanul_argv(["train", "--out", "killed", *TINY_TRAIN, "--steps", "100000",
                                         "--checkpoint-every", "100000"]), cwd=base, env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = base / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (metrics.exists() and metrics.stat().st_size):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not metrics.exists():
        raise RuntimeError("the run to kill never logged a step")
    log(f"  built killed in {time.perf_counter() - t0:5.1f}s: a run SIGKILLed after its first step")
    return proc.pid


def _printable(argv) -> str:
    return " ".join(shlex.quote(a if isinstance(a, str) else a.decode("utf-8", "backslashreplace")) for a in argv)


def run_case(c: Case, root: Path, base: Path, dead_pid: int) -> Result:
    d = root / c.name
    d.mkdir(parents=True)
    for n in c.needs:
        shutil.copytree(base / n, d / n, symlinks=True)
    ctx = Ctx(d, base, dead_pid)
    try:
        spec = c.build(ctx)
    except Skip as e:
        return Result(c, [], None, 0.0, [], skipped=str(e))
    inputs = [d / p for p in spec.inputs]
    before = {str(p): snapshot(p) for p in inputs}
    outs = [(d / p if not os.path.isabs(p) else Path(p)) for p in spec.outputs]
    t0 = time.perf_counter()
    violations = []
    try:
        proc = subprocess.run(yxanul_argv(spec.argv), cwd=d, env=child_env(), capture_output=True,
                              timeout=spec.timeout)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        proc, rc, out, err = None, None, e.stdout or b"", e.stderr or b""
        violations.append(f"timed out after {spec.timeout:.0f}s")
    secs = time.perf_counter() - t0
    text = out.decode("utf-8", "replace") + err.decode("utf-8", "replace")
    errs = [ln for ln in err.decode("utf-8", "replace").splitlines() if ln.startswith("yxanul: error:")]
    if "Traceback" in text:
        tail = [ln for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()][-1:]
        violations.append(f"traceback ({tail[0][:160] if tail else ''})")
    if rc is not None and rc != spec.rc:
        violations.append(f"exit {rc}, expected {spec.rc}")
    if spec.rc == 2 and rc == 2 and len(errs) != 1:
        violations.append(f"{len(errs)} 'yxanul: error:' lines, expected one")
    for n in spec.needles:
        hay = errs[0] if spec.rc == 2 and errs else text
        if rc == spec.rc and n not in hay:
            violations.append(f"{n!r} not in {'the error line' if spec.rc == 2 else 'the output'}")
    if ctx.marker.exists():
        violations.append("PAYLOAD RAN")
    if spec.no_escape and (b"\x1b" in out or b"\x1b" in err):
        violations.append("raw ESC byte printed")
    for p in inputs:
        now = snapshot(p)
        was = before[str(p)]
        gone = sorted(set(was) - set(now))
        changed = sorted(k for k in was if k in now and now[k] != was[k])
        added = sorted(set(now) - set(was))
        if gone:
            violations.append(f"input deleted: {', '.join(gone[:3])}{' ...' if len(gone) > 3 else ''}")
        if changed:
            violations.append(f"input changed: {', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}")
        if added and spec.rc != 0:
            violations.append(f"files appeared in an input: {', '.join(added[:3])}")
    for o in outs:
        if rc == 0 and spec.rc == 0 and not o.exists():
            violations.append(f"no output {o.name}")
        if spec.rc != 0 and rc != 0:
            if os.path.lexists(o) and str(o) not in before:
                violations.append(f"partial output left: {o.relative_to(d) if o.is_relative_to(d) else o}")
            try:
                tmps = [s.name for s in o.parent.iterdir() if s.name.startswith(f".{o.name}.")]
            except OSError:
                tmps = []
            if tmps:
                violations.append(f"temporaries left: {tmps}")
    if spec.check is not None and rc == spec.rc:
        msg = spec.check(d, proc)
        if msg:
            violations.append(msg)
    return Result(c, spec.argv, rc, secs, violations, error_line=errs[0] if errs else "")


def select(names: str | None = None, groups: str | None = None, quick: bool = False) -> list[Case]:
    chosen = CASES
    if quick:
        chosen = [c for c in chosen if c.quick]
    if groups:
        want = {g.strip() for g in groups.split(",")}
        chosen = [c for c in chosen if c.group in want]
    if names:
        want = {n.strip() for n in names.split(",") if n.strip()}
        unknown = want - {c.name for c in CASES}
        if unknown:
            raise SystemExit(f"unknown case(s): {', '.join(sorted(unknown))}")
        chosen = [c for c in chosen if c.name in want]
    return chosen


def run_cases(cases: list[Case], root: Path, jobs: int = 2, log=print) -> list[Result]:
    base = root / "_base"
    t0 = time.perf_counter()
    dead_pid = build_base(base, {n for c in cases for n in c.needs}, log=log)
    log(f"base artefacts in {time.perf_counter() - t0:.1f}s; {len(cases)} cases, {jobs} at a time")
    results: dict[str, Result] = {}
    with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
        futs = {pool.submit(run_case, c, root, base, dead_pid): c for c in cases}
        for fut in cf.as_completed(futs):
            c = futs[fut]
            try:
                r = fut.result()
            except Exception as e:  # noqa: BLE001 - a broken case is reported, the others still run
                r = Result(c, [], None, 0.0, [f"the case could not be built: {type(e).__name__}: {e}"])
            results[c.name] = r
            log(format_result(r))
    return [results[c.name] for c in cases]


def format_result(r: Result) -> str:
    status = "SKIP" if r.skipped else ("ok  " if not r.violations else "FAIL")
    what = r.skipped or ("; ".join(r.violations) if r.violations else (r.error_line[:110] or f"exit {r.rc}"))
    return f"{status} {r.case.name:40s} rc={r.rc!s:4s} {r.seconds:5.1f}s  {what}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run the hostile-input cases against the yxanul command line.")
    ap.add_argument("--only", metavar="NAME,...", help="run these cases only")
    ap.add_argument("--group", metavar="GROUP,...", help="run these groups only")
    ap.add_argument("--quick", action="store_true", help="the quick subset the tests run")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="cases run at once (default 2)")
    ap.add_argument("--keep", metavar="DIR", help="build the cases in DIR (must not exist) and keep them")
    ap.add_argument("--list", action="store_true", help="print the cases (group, name; quick ones marked) and exit")
    args = ap.parse_args(argv)
    cases = select(args.only, args.group, args.quick)
    if args.list:
        for c in cases:
            print(f"{c.group:13s} {c.name:40s}{' (quick)' if c.quick else ''}")
        return 0
    if args.keep:
        root = Path(args.keep)
        root.mkdir(parents=True)
        ctx_root = None
    else:
        ctx_root = tempfile.TemporaryDirectory(prefix="yxanul-hostile-")
        root = Path(ctx_root.name)
    t0 = time.perf_counter()
    try:
        results = run_cases(cases, root, jobs=max(1, args.jobs))
    finally:
        if ctx_root is not None:
            for p in root.rglob("ro"):   # folders made read-only for a case
                p.chmod(0o755)
            ctx_root.cleanup()
    failed = [r for r in results if r.violations]
    skipped = [r for r in results if r.skipped]
    print(f"\n{len(results)} cases in {time.perf_counter() - t0:.0f}s: {len(results) - len(failed) - len(skipped)} "
          f"ok, {len(failed)} with violations, {len(skipped)} skipped")
    tracebacks = sum(any(v.startswith("traceback") for v in r.violations) for r in results)
    payloads = sum("PAYLOAD RAN" in r.violations for r in results)
    deleted = sum(any(v.startswith("input deleted") for v in r.violations) for r in results)
    print(f"tracebacks: {tracebacks}, executed payloads: {payloads}, deleted inputs: {deleted}")
    for r in failed:
        print(f"  {r.case.name}: yxanul {_printable(r.argv)}\n    " + "\n    ".join(r.violations))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
