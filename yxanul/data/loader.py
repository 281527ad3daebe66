"""Memory-mapped token shards and deterministic batches.

A training batch is a pure function of ``(seed, step, micro_step)``: the global batch of
``batch_size * world_size`` windows is drawn from a NumPy generator seeded with that triple, and rank ``r``
takes rows ``[r * batch_size, (r + 1) * batch_size)``. A resumed run therefore sees exactly the batches the
uninterrupted run would have seen, and N ranks with per-rank batch B see the same data as one process with
batch N * B. Validation batches are fixed, non-overlapping windows walked in order.

Every window is checked on the CPU against ``meta.json``'s ``max_token_id`` before it becomes a tensor, so a
corrupt shard is a one-line error naming it rather than an out-of-range embedding lookup.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import YxanulError, brief, clip
from ..io import parse_json
from .prepare import FORMAT, VERSION
from .tokenizers import TOKENIZER_KINDS, check_ids


def read_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise YxanulError("not a prepared data folder (no meta.json); run `yxanul data prepare` first",
                          source=str(data_dir))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise YxanulError(f"unreadable meta.json: {clip(e)}", source=str(path)) from None
    meta = parse_json(text, str(path))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "splits" not in meta:
        raise YxanulError(f"not a {FORMAT} meta.json", source=str(path))
    if meta.get("version", VERSION) != VERSION or isinstance(meta.get("version"), bool):
        raise YxanulError(f"unsupported version {brief(meta['version'])} (this yxanul reads version {VERSION})",
                          source=str(path), key="version")
    if meta.get("dtype", "uint32") != "uint32":
        raise YxanulError(f"must be 'uint32' (the shards' token type), got {brief(meta['dtype'])}",
                          source=str(path), key="dtype")
    _check_splits(meta["splits"], str(path))
    v = meta.get("vocab_size")
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise YxanulError(f"must be a positive integer, got {brief(v)}", source=str(path), key="vocab_size")
    if max_token_id(meta, str(path)) >= v:
        raise YxanulError(f"must exceed max_token_id {meta['max_token_id']}, got {v}", source=str(path),
                          key="vocab_size")
    e = meta.get("eot_id")
    if e is not None and (isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < v):
        raise YxanulError(f"must be a token id below vocab_size {v}, got {brief(e)}", source=str(path), key="eot_id")
    tok = meta.get("tokenizer")
    if not isinstance(tok, dict):
        raise YxanulError("must be an object describing the tokenizer", source=str(path), key="tokenizer")
    if tok.get("kind") not in TOKENIZER_KINDS:
        raise YxanulError(f"unknown kind {brief(tok.get('kind'))} (expected {', '.join(TOKENIZER_KINDS)})",
                          source=str(path), key="tokenizer.kind")
    return meta


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_splits(splits, source: str) -> None:
    """``splits`` maps a split name to ``{"tokens", "documents", "shards": [{"file", "tokens"}]}``; a shard file
    is a plain name inside the data folder (never a path leading out of it)."""
    if not isinstance(splits, dict):
        raise YxanulError("must map split names to their shards", source=source, key="splits")
    for name, info in splits.items():
        key = f"splits.{clip(name, 40)}"
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
            raise YxanulError("must be an object with a list of shards", source=source, key=key)
        if "tokens" in info and not _count(info["tokens"]):
            raise YxanulError("tokens must be a non-negative integer", source=source, key=key)
        for i, sh in enumerate(info["shards"]):
            f = sh.get("file") if isinstance(sh, dict) else None
            if not (isinstance(f, str) and f and Path(f).name == f and f not in (".", "..") and "\\" not in f):
                raise YxanulError(f"shard {i}: file must be a file name inside the data folder, got {brief(f)}",
                                  source=source, key=key)
            if not _count(sh.get("tokens")):
                raise YxanulError(f"shard {i}: tokens must be a non-negative integer", source=source, key=key)


def max_token_id(meta: dict, source: str) -> int:
    """The largest token id the shards may hold: ``max_token_id``, else ``vocab_size - 1``."""
    v = meta.get("max_token_id")
    if v is None and isinstance(meta.get("vocab_size"), int):
        v = meta["vocab_size"] - 1
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise YxanulError(f"needs a non-negative integer max_token_id or vocab_size, got {str(v)[:40]}",
                          source=source, key="max_token_id")
    return v


class TokenShards:
    """The shards of one split as read-only memmaps."""

    def __init__(self, data_dir: str | Path, split: str, meta: dict | None = None):
        self.dir = Path(data_dir)
        meta = meta or read_meta(data_dir)
        info = meta["splits"].get(split)
        if info is None:
            raise YxanulError(f"no {split!r} split", source=str(self.dir / "meta.json"))
        self.split = split
        self.arrays: list[np.ndarray] = []
        self.files: list[Path] = []  # parallel to `arrays`
        for sh in info["shards"]:
            p = self.dir / sh["file"]
            if not p.exists():
                raise YxanulError("shard listed in meta.json is missing", source=str(p))
            if p.stat().st_size != 4 * sh["tokens"]:
                raise YxanulError(f"shard size {p.stat().st_size} B does not match {sh['tokens']} tokens",
                                  source=str(p))
            if sh["tokens"]:
                self.arrays.append(np.memmap(p, dtype=np.uint32, mode="r"))
                self.files.append(p)
        self.lengths = np.array([a.size for a in self.arrays], dtype=np.int64)
        self.tokens = int(self.lengths.sum())

    def shard_at(self, flat_pos: int) -> tuple[Path, int]:
        """(shard, offset in it) of token `flat_pos` of the split's concatenation."""
        ends = np.cumsum(self.lengths)
        k = min(int(np.searchsorted(ends, flat_pos, side="right")), len(self.files) - 1)
        return self.files[k], int(flat_pos - (ends[k] - self.lengths[k]))

    def window_counts(self, T: int) -> np.ndarray:
        return np.maximum(self.lengths - T, 0)  # start offsets with room for T + 1 tokens


def _to_tensor(rows: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(rows).astype(np.int64))


class DataLoader:
    """Deterministic batches of ``(x, y)`` int64 tensors of shape [batch_size, seq_len]."""

    def __init__(self, data_dir: str | Path, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: str | torch.device = "cpu", model_vocab: int | None = None,
                 meta: dict | None = None):
        self.meta = meta if meta is not None else read_meta(data_dir)  # `meta`: the caller's validated read
        self.dir = Path(data_dir)
        self.B, self.T, self.seed = int(batch_size), int(seq_len), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.device = torch.device(device)
        self.max_id = max_token_id(self.meta, str(self.dir / "meta.json"))
        if model_vocab is not None:
            check_ids(self.max_id + 1, model_vocab, source=str(self.dir / "meta.json"))
        self.train = TokenShards(data_dir, "train", self.meta)
        self.val = TokenShards(data_dir, "val", self.meta) if self.meta["splits"].get("val", {}).get("tokens") else None
        counts = self.train.window_counts(self.T)
        if counts.sum() <= 0:   # windows never span two shards
            longest = int(self.train.lengths.max()) if self.train.lengths.size else 0
            what = (f"training split has {self.train.tokens} tokens" if longest == self.train.tokens else
                    f"training split's longest shard has {longest} tokens (windows do not span shards; prepare "
                    "it again with a larger --shard-tokens)")
            raise YxanulError(f"{what}, fewer than seq_len + 1 = {self.T + 1}", source=str(self.dir), key="seq_len")
        self._probs = counts / counts.sum()
        self._counts = counts
        self._pin = self.device.type == "cuda"

    # -- training ---------------------------------------------------------------------------------
    def offsets(self, step: int, micro: int) -> list[tuple[int, int]]:
        """(shard, offset) of every window of this rank's part of the global batch."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, int(step), int(micro)])))
        n = self.B * self.world_size
        shards = rng.choice(len(self._counts), size=n, p=self._probs) if len(self._counts) > 1 else np.zeros(n, int)
        offs = (rng.random(n) * self._counts[shards]).astype(np.int64)
        lo, hi = self.rank * self.B, (self.rank + 1) * self.B
        return list(zip(shards[lo:hi].tolist(), offs[lo:hi].tolist()))

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for s, o in self.offsets(step, micro):
            rows.append(np.asarray(self.train.arrays[s][o:o + self.T + 1]))
            self._check_ids(rows[-1], self.train.files[s], o)
        return self._move(_to_tensor(rows))

    def _check_ids(self, row: np.ndarray, shard: Path, offset: int) -> None:
        """`row` was read from `shard` at `offset`: every id must be at most meta.json's max_token_id."""
        if row.size and int(row.max()) > self.max_id:
            self._bad_id(row, shard, offset)

    def _bad_id(self, row: np.ndarray, shard: Path, offset: int):
        k = int(np.argmax(row > self.max_id))
        raise YxanulError(f"token id {int(row[k])} at offset {offset + k} exceeds meta.json's max_token_id "
                          f"{self.max_id} (corrupt or foreign shard)", source=str(shard))

    # -- validation -------------------------------------------------------------------------------
    def val_batches(self, n: int):
        """The first `n` validation batches (same windows every call); wraps around a small val split."""
        if self.val is None:
            return
        T, B = self.T, self.B
        flat = self.val.arrays
        total = self.val.tokens
        if total < T + 1:
            return
        n_windows = total // (T + 1) if total >= T + 1 else 0
        for i in range(n):
            rows = []
            for j in range(B):
                w = ((i * self.world_size + self.rank) * B + j) % n_windows
                rows.append(self._read_flat(flat, w * (T + 1), T + 1))
                if rows[-1].size and int(rows[-1].max()) > self.max_id:
                    shard, at = self.val.shard_at(w * (T + 1) + int(np.argmax(rows[-1] > self.max_id)))
                    self._bad_id(rows[-1][rows[-1] > self.max_id][:1], shard, at)
            yield self._move(_to_tensor(rows))

    @staticmethod
    def _read_flat(arrays: list[np.ndarray], start: int, length: int) -> np.ndarray:
        out, pos = [], start
        for a in arrays:
            if pos >= a.size:
                pos -= a.size
                continue
            take = a[pos:pos + length - sum(x.size for x in out)]
            out.append(np.asarray(take))
            pos = 0
            if sum(x.size for x in out) >= length:
                break
        return np.concatenate(out)

    def _move(self, xy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pin:
            xy = xy.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            xy = xy.to(self.device)
        return xy[:, :-1], xy[:, 1:]
