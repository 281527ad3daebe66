"""Turn text into uint32 token shards: ``train_000.bin``, ``val_000.bin``, ... plus ``meta.json``.

Inputs: plain text (``.txt``/``.md``/anything else), JSON lines (``.jsonl``/``.json``, a ``text`` field per
record), parquet (``.parquet``, a ``text`` column; needs pyarrow), any of those compressed with ``.xz``/``.gz``,
a folder (its files, sorted), or a Hugging Face ``datasets`` name (``hf:NAME[:SPLIT]``, needs ``datasets`` and a
network). In text files a line that is exactly ``<|endoftext|>`` separates documents; otherwise the file is one
document. A JSON record or parquet row is one document.

Every document is followed by the tokenizer's end-of-text id. A document goes to validation when a stable hash
of (its source, its index) falls below ``val_fraction``, so the split does not depend on the worker count; if
no document lands there (tiny inputs), the last ``val_fraction`` of the training tokens are moved instead
(``meta.json`` records which: ``val_source`` is ``documents``, ``train tail`` or ``val inputs``). Explicit
validation inputs (``val_inputs``) replace the random split. ``workers`` above the CPU count
(:func:`max_workers`) are clamped to it.

Text is decoded as UTF-8. With ``errors="replace"`` (the default) invalid byte sequences become U+FFFD and are
counted (``invalid_utf8_replaced`` in ``meta.json``); with ``errors="strict"`` the first one is an error naming
the file. The output folder may not be, contain or lie inside an input; ``overwrite`` replaces only an empty
folder or an earlier output of this command.
"""
from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import lzma
import multiprocessing as mp
import os
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import YxanulError, clip, first_line
from ..io import atomic_dir, parse_json
from .tokenizers import get_tokenizer

FORMAT = "yxanul-tokens"
VERSION = 1
SEPARATOR_LINE = "<|endoftext|>"
DEFAULT_SHARD_TOKENS = 1 << 27  # 128M tokens = 512 MiB per shard
MAX_SHARDS = 10_000   # per split: more is a --shard-tokens typo (one token per file), not a dataset
ERRORS = ("strict", "replace")
_COUNTING_REPLACE = "yxanul-count-replace"
_replaced = [0]   # invalid UTF-8 sequences replaced so far (decoding happens in the main process)


def _count_replace(exc: UnicodeDecodeError):
    _replaced[0] += 1
    return "\ufffd", exc.end


codecs.register_error(_COUNTING_REPLACE, _count_replace)


def _open_text(path: Path, errors: str = "replace"):
    handler = _COUNTING_REPLACE if errors == "replace" else "strict"
    name = path.name
    if name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8", errors=handler)
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors=handler)
    return open(path, "r", encoding="utf-8", errors=handler)


def _lines(path: Path, errors: str = "replace") -> Iterator[str]:
    """Lines of a (possibly compressed) text file. An unreadable file, corrupt or truncated compressed data and,
    under ``errors="strict"``, an invalid UTF-8 sequence are one-line errors naming the file."""
    try:
        with _open_text(path, errors) as f:
            yield from f
    except UnicodeDecodeError as e:
        raise YxanulError(f"not valid UTF-8 ({e.reason}); pass --errors replace to substitute U+FFFD",
                          source=str(path)) from None
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:  # BadGzipFile is an OSError
        what = "corrupt or truncated compressed file" if path.name.endswith((".xz", ".gz")) else "unreadable"
        raise YxanulError(f"{what}: {first_line(e)}", source=str(path)) from None


def _base_suffix(path: Path) -> str:
    name = path.name
    for c in (".xz", ".gz"):
        if name.endswith(c):
            name = name[: -len(c)]
    return Path(name).suffix.lower()


def _text_docs(path: Path, errors: str = "replace") -> Iterator[str]:
    buf: list[str] = []
    for line in _lines(path, errors):
        if line.rstrip("\r\n") == SEPARATOR_LINE:
            doc = "".join(buf)
            if doc.endswith("\n"):
                doc = doc[:-1]
            if doc:
                yield doc
            buf = []
        else:
            buf.append(line)
    doc = "".join(buf)
    if doc.endswith("\n"):
        doc = doc[:-1]
    if doc:
        yield doc


def _jsonl_docs(path: Path, field: str, errors: str = "replace") -> Iterator[str]:
    for n, line in enumerate(_lines(path, errors), 1):
        if not line.strip():
            continue
        rec = parse_json(line, str(path), f"line {n}: ")
        if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
            raise YxanulError(f"line {n}: expected an object with a string {field!r} field", source=str(path),
                              key=field)
        if rec[field]:
            yield rec[field]


def _parquet_docs(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise YxanulError("reading parquet needs pyarrow (pip install pyarrow)", source=str(path)) from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise YxanulError(f"not a parquet file: {e}", source=str(path)) from None
    if field not in pf.schema_arrow.names:
        raise YxanulError(f"no {field!r} column (columns: {', '.join(pf.schema_arrow.names)})", source=str(path),
                          key=field)
    for batch in pf.iter_batches(columns=[field]):
        for t in batch.column(0).to_pylist():
            if t:
                yield t


def _hf_docs(name: str, field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise YxanulError("Hugging Face dataset names need the 'datasets' package", source=name) from None
    parts = name.split(":")
    ds_name, split = parts[0], (parts[1] if len(parts) > 1 else "train")
    try:
        ds = datasets.load_dataset(ds_name, split=split, streaming=True)
    except Exception as e:
        raise YxanulError(f"cannot load dataset: {first_line(e)}",
                          source=name) from None
    for rec in ds:
        t = rec.get(field)
        if isinstance(t, str) and t:
            yield t


def resolve_inputs(inputs: list[str]) -> list[tuple[str, object]]:
    """[(source label, Path or hf name)]; raises on missing paths."""
    out: list[tuple[str, object]] = []
    for s in inputs:
        s = str(s)
        if s.startswith("hf:"):
            out.append((s, s[3:]))
            continue
        p = Path(s)
        if p.is_dir():
            files = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
            if not files:
                raise YxanulError("folder holds no files", source=s)
            out.extend((str(q), q) for q in files)
        elif p.is_file():
            out.append((s, p))
        else:
            raise YxanulError("input not found (a file, a folder, or hf:DATASET[:SPLIT])", source=s)
    return out


def iter_documents(label: str, item, field: str = "text", errors: str = "replace") -> Iterator[str]:
    if isinstance(item, str):
        yield from _hf_docs(item, field)
        return
    suf = _base_suffix(item)
    if suf in (".jsonl", ".json", ".ndjson"):
        yield from _jsonl_docs(item, field, errors)
    elif suf == ".parquet":
        yield from _parquet_docs(item, field)
    else:
        yield from _text_docs(item, errors)


def _is_val(label: str, index: int, fraction: float) -> bool:
    if fraction <= 0:
        return False
    # surrogateescape: a file name that is not UTF-8 hashes as its bytes (valid names hash as before)
    h = hashlib.blake2b(f"{label}\0{index}".encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0 ** 64 < fraction


_WORKER_TOK = None


def _init_worker(meta: dict) -> None:
    global _WORKER_TOK
    _WORKER_TOK = get_tokenizer(meta)


def _encode_batch(docs: list[str]) -> list[np.ndarray]:
    tok = _WORKER_TOK
    eot = np.array([tok.eot_id], dtype=np.uint32)
    return [np.concatenate([tok.encode_np(d), eot]) for d in docs]


class _ShardWriter:
    def __init__(self, folder: Path, split: str, shard_tokens: int):
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.shards: list[dict] = []
        self.f = None
        self.n_cur = 0
        self.tokens = 0
        self.documents = 0
        self.max_id = -1

    def _open(self):
        if len(self.shards) >= MAX_SHARDS:
            raise YxanulError(f"the {self.split} split needs more than {MAX_SHARDS:,} shards of {self.shard_tokens:,} "
                              f"tokens; give a larger --shard-tokens (default {DEFAULT_SHARD_TOKENS:,})",
                              key="--shard-tokens")
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self.shards.append({"file": name, "tokens": 0})
        self.f = open(self.folder / name, "wb")
        self.n_cur = 0

    def write(self, arr: np.ndarray, doc: bool = True) -> None:
        if doc:
            self.documents += 1
        if arr.size:
            self.max_id = max(self.max_id, int(arr.max()))
        while arr.size:
            if self.f is None or self.n_cur >= self.shard_tokens:
                self.close()
                self._open()
            take = min(arr.size, self.shard_tokens - self.n_cur)
            self.f.write(np.ascontiguousarray(arr[:take], dtype=np.uint32).tobytes())
            self.n_cur += take
            self.tokens += take
            self.shards[-1]["tokens"] += take
            arr = arr[take:]

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None

    def info(self) -> dict:
        return {"tokens": self.tokens, "documents": self.documents, "shards": self.shards}


def _doc_stream(items, val_fraction: float, forced_split: str | None, stats: dict, errors: str = "replace"):
    for label, item in items:
        n = 0
        for i, doc in enumerate(iter_documents(label, item, errors=errors)):
            split = forced_split or ("val" if _is_val(label, i, val_fraction) else "train")
            n += 1
            yield split, doc
        stats.setdefault(label, 0)
        stats[label] += n


def _batched(stream, size: int = 256, max_chars: int = 4 << 20):
    batch, chars = [], 0
    for split, doc in stream:
        batch.append((split, doc))
        chars += len(doc)
        if len(batch) >= size or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def max_workers() -> int:
    """The most tokenizer processes `prepare` starts (more are clamped to it): the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def prepare(inputs: list[str], tokenizer, out: str | Path, val_fraction: float = 0.01, workers: int = 1,
            overwrite: bool = False, val_inputs: list[str] | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
            progress: bool = True, errors: str = "replace") -> dict:
    """Tokenize `inputs` into `out` (atomically); returns the written meta.json content."""
    if errors not in ERRORS:
        raise YxanulError(f"must be one of {', '.join(ERRORS)}, got {clip(errors)}", source="data prepare",
                          key="--errors")
    if not inputs:
        raise YxanulError("no inputs given", source="data prepare")
    if not 0.0 <= val_fraction < 1.0:
        raise YxanulError(f"must be in [0, 1), got {val_fraction}", source="data prepare", key="--val-fraction")
    if workers < 1:
        raise YxanulError(f"must be >= 1, got {workers}", source="data prepare", key="--workers")
    workers = min(workers, max_workers())
    tok = get_tokenizer(tokenizer) if isinstance(tokenizer, (str, dict, os.PathLike)) else tokenizer
    meta_tok = tok.to_meta()
    items = resolve_inputs(inputs)
    val_items = resolve_inputs(val_inputs) if val_inputs else []
    from tqdm.auto import tqdm

    stats: dict[str, int] = {}
    read = [s for s in [*inputs, *(val_inputs or [])] if not str(s).startswith("hf:")]
    tok_path = meta_tok.get("path") if isinstance(meta_tok, dict) else None
    if tok_path and os.path.exists(tok_path):  # a tokenizer file is an input too: OUT must not hold it
        read.append(str(tok_path))
    _replaced[0] = 0
    with atomic_dir(out, overwrite=overwrite, command="data prepare", inputs=read) as tmp:
        writers = {"train": _ShardWriter(tmp, "train", shard_tokens), "val": _ShardWriter(tmp, "val", shard_tokens)}

        def stream():
            if val_items:
                yield from _doc_stream(items, 0.0, "train", stats, errors)
                yield from _doc_stream(val_items, 0.0, "val", stats, errors)
            else:
                yield from _doc_stream(items, val_fraction, None, stats, errors)

        bar = tqdm(desc="tokenizing", unit="tok", unit_scale=True, disable=not progress, leave=False)
        pool = None
        try:
            if workers > 1:
                pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(meta_tok,))
                inflight: list = []  # bounded number of batches in flight, written back in order
                for b in _batched(stream()):
                    inflight.append(([s for s, _ in b], pool.apply_async(_encode_batch, ([d for _, d in b],))))
                    if len(inflight) >= 4 * workers:
                        splits, res = inflight.pop(0)
                        _write(res.get(), splits, writers, bar)
                while inflight:
                    splits, res = inflight.pop(0)
                    _write(res.get(), splits, writers, bar)
            else:
                global _WORKER_TOK
                _WORKER_TOK = tok
                for b in _batched(stream()):
                    _write(_encode_batch([d for _, d in b]), [s for s, _ in b], writers, bar)
        finally:
            if pool is not None:
                pool.terminate()
            bar.close()
            for w in writers.values():
                w.close()

        train, val = writers["train"], writers["val"]
        val_source = "val inputs" if val_items else ("documents" if val.tokens else None)
        if train.tokens == 0 and val.tokens > 0 and not val_items:
            # every document hashed into val (only a few documents): they become train, and the tail of the
            # tokens moves to val below
            for sh in val.shards:
                renamed = "train_" + sh["file"][len("val_"):]
                os.replace(tmp / sh["file"], tmp / renamed)
                sh["file"] = renamed
            val.split = "train"
            train, val = val, _ShardWriter(tmp, "val", shard_tokens)
        if train.tokens == 0:
            raise YxanulError("inputs hold no text", source=", ".join(map(str, inputs)))
        if val_items and val.tokens == 0:   # asked for, and empty: a run would report no validation loss
            raise YxanulError("validation inputs hold no text", source=", ".join(map(str, val_inputs)), key="--val")
        if val.tokens == 0 and val_fraction > 0 and not val_items:
            _move_tail_to_val(tmp, train, val, val_fraction)
            val_source = "train tail" if val.tokens else None
        if max(train.max_id, val.max_id) >= tok.vocab_size:
            raise YxanulError(f"tokenizer produced id {max(train.max_id, val.max_id)} >= its vocab_size "
                              f"{tok.vocab_size}", source=str(meta_tok.get("path") or meta_tok["kind"]))
        meta = {
            "format": FORMAT, "version": VERSION, "dtype": "uint32",
            "tokenizer": meta_tok, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
            "max_token_id": max(train.max_id, val.max_id),
            "val_fraction": val_fraction if not val_items else None,
            "val_source": val_source,
            "invalid_utf8_replaced": _replaced[0],
            "splits": {"train": train.info(), "val": val.info()},
            "sources": [{"source": k, "documents": v} for k, v in stats.items()],
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def _write(arrs, splits, writers, bar):
    for split, arr in zip(splits, arrs):
        writers[split].write(arr)
        bar.update(arr.size)


def _move_tail_to_val(folder: Path, train: _ShardWriter, val: _ShardWriter, fraction: float) -> None:
    """Too few documents for a document-level split: move the last `fraction` of the train tokens to val."""
    n_val = min(max(1, int(round(train.tokens * fraction))), train.tokens - 1)
    if n_val <= 0:
        return
    tails, need = [], n_val
    while need > 0:
        last = train.shards[-1]
        path = folder / last["file"]
        data = np.fromfile(path, dtype=np.uint32)
        take = min(need, data.size)
        tails.append(data[data.size - take:])
        if take == data.size:
            path.unlink()
            train.shards.pop()
        else:
            data[: data.size - take].tofile(path)
            last["tokens"] -= take
        train.tokens -= take
        need -= take
    val.write(np.concatenate(tails[::-1]), doc=False)
    val.close()
