"""Tokenizers behind one small interface: ``encode``, ``decode``, ``vocab_size``, ``eot_id``, ``name``, ``to_meta``.

``get_tokenizer(spec)`` accepts:

* ``"bytes"``: UTF-8 bytes (ids 0..255) plus an end-of-text id 256; vocabulary 257 (the ``tiny`` preset).
* ``"o200k"`` / ``"o200k_base"``: OpenAI's o200k_base through tiktoken. The ranks file is found, in order, at
  ``$YXANUL_O200K_PATH``, then through tiktoken's own cache/download. Pass a path to use an offline copy.
* a path to a tiktoken ranks file (``*.tiktoken``): a file named ``o200k_base*`` gets o200k's pattern and
  special tokens; any other ranks file gets the same pattern and one end-of-text id right after its ranks.
* a path to a Hugging Face ``tokenizer.json`` (needs the optional ``tokenizers`` package).
* a mapping as written by ``to_meta()`` (what ``meta.json`` and checkpoints store).

Special tokens are never parsed out of the text: encoding is "ordinary", so a literal ``<|endoftext|>`` in a
document is plain text. The only special id ever emitted is ``eot_id``, appended after each document.

``vocab_size`` is the smallest model vocabulary that holds every id the tokenizer can emit (the largest
ordinary id and ``eot_id``, plus one). For o200k that is 200,000 (``<|endoftext|>`` = 199,999), which fits the
197M preset's 200,005 rows. o200k's other special, ``<|endofprompt|>`` = 200,018, is above that vocabulary; it
can never be produced by ``encode`` and :func:`check_ids` rejects it (and any other id >= the model
vocabulary) explicitly rather than remapping it.
"""
from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

import numpy as np

from ..errors import YxanulError, brief, first_line
from ..io import sha256_of

TOKENIZER_KINDS = ("bytes", "o200k", "tiktoken", "hf")  # what `to_meta()["kind"]` may be


class ByteTokenizer:
    kind = "bytes"
    name = "bytes"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_np(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def to_meta(self) -> dict:
        return {"kind": "bytes", "name": self.name, "path": None, "vocab_size": self.vocab_size,
                "eot_id": self.eot_id}


_RANK_LIMIT = 2 ** 32 - 1  # ranks and the end-of-text id after them must fit the uint32 shards (and tiktoken's u32)


def _check_ranks(ranks: dict, source: str) -> None:
    """Refuse a ranks file tiktoken cannot take: it panics (pyo3's PanicException is a BaseException, so it is
    not caught as an error) on a missing single byte or a rank used twice, and overflows on a rank out of u32."""
    if not ranks:
        raise YxanulError("not a tiktoken ranks file: no ranks", source=source)
    bad = next((r for r in ranks.values() if not 0 <= r < _RANK_LIMIT), None)
    if bad is not None:
        raise YxanulError(f"rank {brief(bad)} is outside [0, 2**32 - 1)", source=source)
    if len(set(ranks.values())) != len(ranks):
        seen: set[int] = set()
        dup = next(r for r in ranks.values() if r in seen or seen.add(r))
        raise YxanulError(f"rank {dup} is given to more than one token", source=source)
    missing = next((b for b in range(256) if bytes([b]) not in ranks), None)
    if missing is not None:
        raise YxanulError(f"no rank for the single byte 0x{missing:02x} (every one of the 256 bytes needs one)",
                          source=source)


def read_ranks(path: str | Path) -> dict:
    """A tiktoken ranks file (a line ``base64(token) rank`` per token), read from the file itself: tiktoken's own
    loader caches files by their path under the temporary folder, so an edited or replaced file at the same path
    would be read as it was. Malformed lines and rank sets tiktoken cannot take are one-line errors."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise YxanulError("tokenizer ranks file not found", source=str(path)) from None
    except OSError as e:
        raise YxanulError(f"unreadable: {first_line(e)}", source=str(path)) from None
    ranks = {}
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise YxanulError(f"not a tiktoken ranks file: line {n} is not 'base64-token rank'",
                              source=str(path)) from None
    _check_ranks(ranks, str(path))
    return ranks


class TiktokenTokenizer:
    """tiktoken BPE from a ranks file; ``kind`` is ``o200k`` for o200k_base, ``tiktoken`` otherwise."""

    def __init__(self, path: str | Path | None, o200k: bool, name: str | None = None):
        import tiktoken
        from tiktoken_ext import openai_public

        self.path = str(path) if path is not None else None
        if path is not None:
            ranks = read_ranks(path)
            # Reuse tiktoken's own o200k definition (pattern and specials) with the offline ranks.
            real = openai_public.load_tiktoken_bpe
            openai_public.load_tiktoken_bpe = lambda *a, **k: ranks
            try:
                spec = openai_public.o200k_base()
            finally:
                openai_public.load_tiktoken_bpe = real
        else:
            try:
                enc = tiktoken.get_encoding("o200k_base")
            except Exception as e:
                raise YxanulError(f"o200k_base is not available offline ({type(e).__name__}); pass the ranks "
                                  "file by path (--tokenizer PATH/o200k_base.tiktoken) or set YXANUL_O200K_PATH",
                                  source="--tokenizer", key="o200k") from None
            spec = {"pat_str": enc._pat_str, "mergeable_ranks": enc._mergeable_ranks,
                    "special_tokens": dict(enc._special_tokens)}
        ranks = spec["mergeable_ranks"]
        n_ranks = max(ranks.values()) + 1 if ranks else 0
        if o200k:
            specials = spec["special_tokens"]
            self.kind, self.eot_id = "o200k", specials["<|endoftext|>"]
        else:
            specials = {"<|endoftext|>": n_ranks}
            self.kind, self.eot_id = "tiktoken", n_ranks
        self.name = name or ("o200k_base" if o200k else Path(str(path)).stem)
        try:
            self._enc = tiktoken.Encoding(name=self.name, pat_str=spec["pat_str"], mergeable_ranks=ranks,
                                          special_tokens=specials)
        except Exception as e:
            raise YxanulError(f"not a usable tiktoken ranks file: {first_line(e)}",
                              source=self.path or "o200k_base") from None
        self.vocab_size = max(n_ranks, self.eot_id + 1)

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_np(self, text: str) -> np.ndarray:
        return np.asarray(self._enc.encode_ordinary(text), dtype=np.uint32)

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])

    def to_meta(self) -> dict:
        meta = {"kind": self.kind, "name": self.name, "path": self.path, "vocab_size": self.vocab_size,
                "eot_id": self.eot_id}
        if self.path:
            meta["sha256"] = sha256_of(self.path)
        return meta


_HF_EOT_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>", "[SEP]", "<|eot_id|>")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` library (optional dependency)."""

    kind = "hf"

    def __init__(self, path: str | Path, eot_token: str | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise YxanulError("reading tokenizer.json needs the 'tokenizers' package (pip install tokenizers)",
                              source=str(path)) from None
        self.path = str(path)
        try:
            self._tok = Tokenizer.from_file(self.path)
        except Exception as e:
            raise YxanulError(f"not a tokenizer.json: {first_line(e)}",
                              source=self.path) from None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        names = (eot_token,) if eot_token else _HF_EOT_CANDIDATES
        found = next((t for t in names if t in vocab), None)
        if found is None:
            raise YxanulError(f"no end-of-text token found (looked for {', '.join(names)})", source=self.path)
        self.eot_token, self.eot_id = found, vocab[found]
        self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
        self.name = Path(self.path).parent.name or "tokenizer"

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_np(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.uint32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_meta(self) -> dict:
        return {"kind": "hf", "name": self.name, "path": self.path, "vocab_size": self.vocab_size,
                "eot_id": self.eot_id, "eot_token": self.eot_token, "sha256": sha256_of(self.path)}


def get_tokenizer(spec):
    """Build a tokenizer from a name, a file path or a ``to_meta()`` mapping (see the module docstring)."""
    if isinstance(spec, dict):
        kind = spec.get("kind")
        if kind == "bytes":
            return ByteTokenizer()
        if kind in ("o200k", "tiktoken"):
            path = spec.get("path")
            if path and not Path(path).exists():
                env = os.environ.get("YXANUL_O200K_PATH") if kind == "o200k" else None
                path = env if env and Path(env).exists() else path
            return TiktokenTokenizer(path if path else None, o200k=(kind == "o200k"), name=spec.get("name"))
        if kind == "hf":
            return HFTokenizer(spec.get("path"), eot_token=spec.get("eot_token"))
        raise YxanulError(f"unknown tokenizer kind {kind!r} (expected {', '.join(TOKENIZER_KINDS)})",
                          source="tokenizer", key="kind")
    if not isinstance(spec, (str, os.PathLike)):
        raise YxanulError(f"expected a tokenizer name or path, got {spec!r}", source="tokenizer")
    s = str(spec)
    if s in ("bytes", "byte"):
        return ByteTokenizer()
    if s in ("o200k", "o200k_base"):
        env = os.environ.get("YXANUL_O200K_PATH")
        return TiktokenTokenizer(env if env else None, o200k=True)
    p = Path(s)
    if not p.exists():
        raise YxanulError("unknown tokenizer: not 'bytes', 'o200k', or an existing tokenizer file",
                          source="--tokenizer", key=s)
    if p.is_dir() and (p / "tokenizer.json").exists():
        p = p / "tokenizer.json"
    if p.suffix == ".json":
        return HFTokenizer(p)
    return TiktokenTokenizer(p, o200k=p.name.startswith("o200k"))


def check_ids(tokenizer_vocab: int, model_vocab: int, source: str = "data") -> None:
    """Raise unless every id the tokenizer can emit fits the model's embedding table."""
    if tokenizer_vocab > model_vocab:
        raise YxanulError(f"tokenizer emits ids up to {tokenizer_vocab - 1} but the model vocabulary is "
                          f"{model_vocab}; use a model with vocab_size >= {tokenizer_vocab} or another tokenizer",
                          source=source, key="vocab_size")
