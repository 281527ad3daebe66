"""Bounded, validated parsing of safetensors headers (never touches tensor data).

A safetensors file is ``u64 little-endian N`` + ``N`` bytes of UTF-8 JSON + the data region. The JSON maps
tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data region)
plus an optional ``"__metadata__"`` object of string -> string.

Everything read from the file is distrusted: the declared header length is checked against the file size and
a cap before anything is allocated, the JSON must be an object of well-formed entries, every dtype must be
known, every dim non-negative, every byte range inside the data region, of exactly ``numel * itemsize``
bytes, and not overlapping another tensor. Any violation raises :class:`YxanulError` naming the file.

``read_index`` validates a ``model.safetensors.index.json`` and ``collect`` turns a file, a folder of shards,
or an index into the list of validated headers.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import YxanulError

MAX_HEADER_BYTES = 100 * 1024 * 1024   # safetensors itself refuses headers above 100 MB
MAX_INDEX_BYTES = 100 * 1024 * 1024
MAX_DIMS = 64
INDEX_NAME = "model.safetensors.index.json"

# dtype string -> bits per element (sub-byte formats are packed)
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
FLOAT_DTYPES = {"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]   # relative to the data region
    numel: int
    nbytes: int


@dataclass
class SafetensorsHeader:
    path: str
    header_len: int
    data_start: int            # absolute file offset of the data region (8 + header_len)
    file_size: int
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_size(self) -> int:
        return self.file_size - self.data_start


def safe_name(name, limit: int = 200) -> str:
    """A tensor/file name fit for a one-line message: control characters escaped, long names shortened."""
    s = str(name)
    if not s.isprintable():
        s = repr(s)[1:-1]
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _err(path, msg: str, key: str | None = None) -> YxanulError:
    return YxanulError(safe_name(msg, 1000), source=safe_name(path, 1000),
                       key=None if key is None else safe_name(key))


def parse_header_bytes(raw: bytes, path: str = "<bytes>", file_size: int | None = None) -> SafetensorsHeader:
    """Validate the JSON header ``raw`` (the N bytes after the length prefix).

    ``file_size`` is the size of the whole file (default: 8 + len(raw), i.e. an empty data region).
    """
    header_len = len(raw)
    data_start = 8 + header_len
    file_size = data_start if file_size is None else file_size
    data_size = file_size - data_start
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _err(path, f"header is not valid UTF-8 (byte {e.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise _err(path, f"duplicate key {e.args[0]!r} in header") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, over-long integer literals, deep nesting
        msg = e.msg if isinstance(e, json.JSONDecodeError) else (
            "nesting too deep" if isinstance(e, RecursionError) else str(e).splitlines()[0][:120])
        raise _err(path, f"header is not valid JSON ({msg})") from None
    if not isinstance(obj, dict):
        raise _err(path, f"header must be a JSON object, got {type(obj).__name__}")

    metadata: dict[str, str] = {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in obj.items():
        if name == "__metadata__":
            if entry is None:
                continue
            if not isinstance(entry, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in entry.items()):
                raise _err(path, "__metadata__ must be an object of string -> string", "__metadata__")
            metadata = dict(entry)
            continue
        tensors[name] = _tensor_info(path, name, entry, data_size)

    # no two tensors may share bytes (zero-size tensors own no bytes)
    spans = sorted((t.offsets[0], t.offsets[1], t.name) for t in tensors.values() if t.nbytes)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise _err(path, f"tensors {n0!r} [{b0}, {e0}) and {n1!r} [{b1}, {e1}) overlap", n1)
    # and the tensors' bytes tile the data section with no gap or trailing bytes, as safetensors' loaders demand
    end = 0
    for b, e, n in spans:
        if b != end:
            raise _err(path, f"bytes [{end}, {b}) before tensor {n!r} belong to no tensor", n)
        end = e
    if end != data_size:
        raise _err(path, f"the last {data_size - end} byte(s) of the data belong to no tensor")
    return SafetensorsHeader(path=str(path), header_len=header_len, data_start=data_start, file_size=file_size,
                             tensors=tensors, metadata=metadata)


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _tensor_info(path, name: str, entry, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _err(path, "tensor entry must be an object with dtype, shape, data_offsets", name)
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise _err(path, f"tensor entry lacks {', '.join(missing)}", name)
    extra = sorted(set(entry) - {"dtype", "shape", "data_offsets"})
    if extra:
        raise _err(path, f"unexpected field(s) {', '.join(map(repr, extra))} in tensor entry", name)
    dtype, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise _err(path, f"unknown dtype {dtype!r}", name)
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(is_int(d) for d in shape):
        raise _err(path, f"shape must be a list of at most {MAX_DIMS} integers, got {_short(shape)}", name)
    if any(d < 0 for d in shape):
        raise _err(path, f"negative dimension in shape {shape}", name)
    if not isinstance(offs, list) or len(offs) != 2 or not all(is_int(o) for o in offs):
        raise _err(path, f"data_offsets must be [begin, end] integers, got {_short(offs)}", name)
    begin, end = offs
    if begin < 0 or end < begin:
        raise _err(path, f"invalid data_offsets [{begin}, {end}]", name)
    if end > data_size:
        raise _err(path, f"data_offsets [{begin}, {end}] run past the data region ({data_size} bytes; "
                         f"file truncated?)", name)
    numel = math.prod(shape)  # Python ints: no overflow; bounded by the end <= data_size check below
    bits = numel * DTYPE_BITS[dtype]
    if bits % 8:
        raise _err(path, f"{numel} elements of {dtype} do not fill whole bytes", name)
    nbytes = bits // 8
    if end - begin != nbytes:
        raise _err(path, f"data_offsets span {end - begin} bytes but {dtype} {list(shape)} needs {nbytes}", name)
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), offsets=(begin, end), numel=numel, nbytes=nbytes)


def _short(v, n: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def read_header(path: str | os.PathLike, max_header_bytes: int = MAX_HEADER_BYTES) -> SafetensorsHeader:
    """Read and validate the header of one ``.safetensors`` file. Reads at most 8 + header_len bytes."""
    p = Path(path)
    if p.is_dir():
        raise _err(p, "is a directory, expected a .safetensors file")
    if p.exists() and not p.is_file():
        raise _err(p, "not a regular file")
    try:
        with open(p, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            if file_size < 8:
                raise _err(p, f"too short to be a safetensors file ({file_size} bytes; empty or truncated)")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > max_header_bytes:
                raise _err(p, f"declared header length {n} exceeds the {max_header_bytes}-byte cap")
            if n > file_size - 8:
                raise _err(p, f"declared header length {n} runs past the end of the {file_size}-byte file "
                              f"(truncated or not a safetensors file)")
            if n == 0:
                raise _err(p, "empty header (not a safetensors file)")
            raw = f.read(n)
            if len(raw) != n:
                raise _err(p, "file shrank while reading the header")
    except FileNotFoundError:
        raise _err(p, "no such file") from None
    except IsADirectoryError:
        raise _err(p, "is a directory, expected a .safetensors file") from None
    except PermissionError:
        raise _err(p, "permission denied") from None
    return parse_header_bytes(raw, str(p), file_size)


@dataclass
class SafetensorsIndex:
    path: str
    weight_map: dict[str, str]          # tensor name -> shard file name (relative to the index's folder)
    metadata: dict

    @property
    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))


def read_index(path: str | os.PathLike, check_files: bool = True) -> SafetensorsIndex:
    """Read and validate a ``model.safetensors.index.json``; with ``check_files`` every shard must exist."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if not p.is_file():
            raise _err(p, "not a regular file")
        if size > MAX_INDEX_BYTES:
            raise _err(p, f"index is {size} bytes, above the {MAX_INDEX_BYTES}-byte cap")
        raw = p.read_bytes()
    except FileNotFoundError:
        raise _err(p, "no such file") from None
    except PermissionError:
        raise _err(p, "permission denied") from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _err(p, "index is not valid UTF-8") from None
    except (ValueError, RecursionError):
        raise _err(p, "index is not valid JSON") from None
    if not isinstance(obj, dict):
        raise _err(p, "index must be a JSON object")
    wm = obj.get("weight_map")
    if not isinstance(wm, dict):
        raise _err(p, "missing or non-object weight_map", "weight_map")
    if not wm:
        raise _err(p, "weight_map lists no tensors", "weight_map")
    for name, shard in wm.items():
        if not isinstance(shard, str) or not shard:
            raise _err(p, f"shard for {name!r} must be a file name", "weight_map")
        sp = Path(shard)
        if sp.is_absolute() or ".." in sp.parts or len(sp.parts) != 1:
            raise _err(p, f"shard {shard!r} must be a plain file name in the index's folder", "weight_map")
    meta = obj.get("metadata", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise _err(p, "metadata must be an object", "metadata")
    idx = SafetensorsIndex(path=str(p), weight_map=dict(wm), metadata=dict(meta))
    if check_files:
        missing = [s for s in idx.shards if not (p.parent / s).is_file()]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise _err(p, f"missing shard(s): {', '.join(missing[:3])}{more}", "weight_map")
    return idx


@dataclass
class Checkpoint:
    """A resolved checkpoint: its folder, validated shard headers, and the index (if sharded)."""
    root: Path
    headers: list[SafetensorsHeader]
    index: SafetensorsIndex | None = None

    def tensors(self):
        """(header, TensorInfo) for every tensor, in file order then header order."""
        for h in self.headers:
            for t in h.tensors.values():
                yield h, t


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Resolve a ``.safetensors`` file, a folder (with or without an index), or an index json."""
    p = Path(path)
    if not p.exists():
        raise _err(p, "no such file or folder")
    if p.is_dir():
        ip = p / INDEX_NAME
        if ip.is_file():
            return _from_index(ip)
        files = sorted(f for f in p.glob("*.safetensors") if f.is_file())
        if not files:
            raise _err(p, "folder holds no .safetensors files and no " + INDEX_NAME)
        ck = Checkpoint(root=p, headers=[read_header(f) for f in files])
        _check_unique(ck, p)
        return ck
    if p.name.endswith(".json"):
        return _from_index(p)
    return Checkpoint(root=p.parent, headers=[read_header(p)])


def _from_index(ip: Path) -> Checkpoint:
    idx = read_index(ip)
    headers = [read_header(ip.parent / s) for s in idx.shards]
    by_file = {Path(h.path).name: h for h in headers}
    for name, shard in idx.weight_map.items():
        if name not in by_file[shard].tensors:
            raise _err(ip, f"tensor {name!r} is mapped to {shard} but that shard does not hold it", "weight_map")
    for h in headers:
        for name in h.tensors:
            if idx.weight_map.get(name) != Path(h.path).name:
                raise _err(ip, f"tensor {name!r} in {Path(h.path).name} is not in weight_map", "weight_map")
    ck = Checkpoint(root=ip.parent, headers=headers, index=idx)
    return ck


def _check_unique(ck: Checkpoint, src: Path) -> None:
    seen: dict[str, str] = {}
    for h, t in ck.tensors():
        if t.name in seen:
            raise _err(src, f"tensor {t.name!r} appears in both {seen[t.name]} and {Path(h.path).name}")
        seen[t.name] = Path(h.path).name


def collect(path: str | os.PathLike) -> list[SafetensorsHeader]:
    """Headers of a ``.safetensors`` file, a folder of shards, or a ``model.safetensors.index.json``."""
    return open_checkpoint(path).headers
