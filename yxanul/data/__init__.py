"""Data: tokenizers, `data prepare` (text -> uint32 shards), the deterministic loader and the bundled corpus."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import YxanulError
from ..io import WriteError

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"


def bundled_corpus_files() -> tuple[Path, Path]:
    """(train, val) xz-compressed text files of the bundled public-domain corpus."""
    train, val = CORPUS_DIR / "train.txt.xz", CORPUS_DIR / "val.txt.xz"
    if not train.exists() or not val.exists():
        raise YxanulError("the bundled corpus is missing from the installed package", source=str(CORPUS_DIR))
    return train, val


def cache_dir() -> Path:
    base = os.environ.get("YXANUL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "yxanul")
    return Path(base)


def bundled_dataset(tokenizer="bytes", cache: str | Path | None = None, progress: bool = False) -> Path:
    """The bundled corpus tokenized with `tokenizer`, prepared once and cached; returns the data folder.

    The cache key is the corpus content hash plus the tokenizer metadata, so a changed corpus or tokenizer
    never reuses stale shards. Falls back to a temporary folder if the cache is not writable; that folder is
    removed when the process exits, so a run without a writable cache leaves nothing behind.
    """
    from .prepare import prepare
    from .tokenizers import get_tokenizer

    tok = get_tokenizer(tokenizer) if isinstance(tokenizer, (str, dict, os.PathLike)) else tokenizer
    train, val = bundled_corpus_files()
    h = hashlib.sha256()
    for p in (train, val):
        h.update(p.read_bytes())
    h.update(repr(sorted((k, str(v)) for k, v in tok.to_meta().items())).encode())
    key = f"corpus-{tok.to_meta()['kind']}-{h.hexdigest()[:16]}"
    roots = [Path(cache)] if cache else [cache_dir()]
    for root in roots:
        out = root / key
        if (out / "meta.json").exists():
            return out
        try:
            root.mkdir(parents=True, exist_ok=True)
            prepare([str(train)], tok, out, val_inputs=[str(val)], overwrite=True, progress=progress)
            return out
        except (OSError, WriteError):
            continue
    import atexit
    import shutil
    import tempfile
    tmp = tempfile.mkdtemp(prefix="yxanul-corpus-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    out = Path(tmp) / key
    prepare([str(train)], tok, out, val_inputs=[str(val)], overwrite=True, progress=progress)
    return out
