"""Tokenizers, `data prepare` and the deterministic loader."""
from __future__ import annotations

import base64
import gzip
import json
import lzma
from pathlib import Path

import numpy as np
import pytest
import torch

from yxanul.cli import main
from yxanul.data.loader import DataLoader, read_meta
from yxanul.data.tokenizers import ByteTokenizer, check_ids, get_tokenizer
from yxanul.errors import YxanulError

DOCS = ["In the beginning God created the heaven and the earth.",
        "And the earth was without form, and void; and darkness was upon the face of the deep.",
        "Fourscore and seven years ago — ünïcödé ✓ — our fathers brought forth."]


def _corpus(tmp_path: Path) -> Path:
    p = tmp_path / "docs.txt"
    p.write_text("\n<|endoftext|>\n".join(DOCS) + "\n", encoding="utf-8")
    return p


def _tokens(d: Path, split: str) -> np.ndarray:
    meta = read_meta(d)
    return np.concatenate([np.fromfile(d / s["file"], dtype=np.uint32) for s in meta["splits"][split]["shards"]]
                          or [np.zeros(0, np.uint32)])


def _ranks_file(path: Path, merges=(b"th", b"he", b"the", b"an", b"and", b" the")) -> Path:
    """A tiny valid tiktoken ranks file: all 256 bytes, then a few merges."""
    toks = [bytes([i]) for i in range(256)] + list(merges)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(toks)))
    return path


def test_bytes_prepare_documents_eot_and_roundtrip(tmp_path):
    out = tmp_path / "d"
    assert main(["data", "prepare", str(_corpus(tmp_path)), "--tokenizer", "bytes", "--out", str(out),
                 "--val-fraction", "0", "--no-progress"]) == 0
    meta = read_meta(out)
    assert meta["tokenizer"]["kind"] == "bytes" and meta["vocab_size"] == 257 and meta["eot_id"] == 256
    toks = _tokens(out, "train")
    expect = []
    for d in DOCS:
        expect += list(d.encode()) + [256]
    assert toks.tolist() == expect
    assert meta["splits"]["train"]["documents"] == 3 and meta["splits"]["val"]["tokens"] == 0
    tok = get_tokenizer(meta["tokenizer"])
    assert tok.decode(toks[: len(DOCS[0].encode())]) == DOCS[0]


def test_jsonl_gz_xz_inputs_val_split_and_workers(tmp_path):
    docs = [f"document number {i} " * (i % 7 + 1) for i in range(60)]
    jl = tmp_path / "a.jsonl.gz"
    with gzip.open(jl, "wt") as f:
        for d in docs[:30]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    xz = tmp_path / "b.txt.xz"
    with lzma.open(xz, "wt") as f:
        f.write("\n<|endoftext|>\n".join(docs[30:]) + "\n")
    one, two = tmp_path / "w1", tmp_path / "w2"
    from yxanul.data.prepare import prepare
    m1 = prepare([str(jl), str(xz)], "bytes", one, val_fraction=0.2, workers=1, progress=False)
    m2 = prepare([str(jl), str(xz)], "bytes", two, val_fraction=0.2, workers=2, progress=False, shard_tokens=500)
    s1, s2 = m1["splits"], m2["splits"]
    assert s1["train"]["documents"] + s1["val"]["documents"] == 60
    assert 0 < s1["val"]["documents"] < 30
    assert s1["train"]["tokens"] == s2["train"]["tokens"] and len(s2["train"]["shards"]) > 1
    for split in ("train", "val"):  # the split and the tokens do not depend on workers or shard size
        assert np.array_equal(_tokens(one, split), _tokens(two, split))
    assert sum(len(d.encode()) + 1 for d in docs) == s1["train"]["tokens"] + s1["val"]["tokens"]


def test_small_input_moves_tail_to_val(tmp_path):
    p = tmp_path / "one.txt"
    p.write_text("x" * 999)
    from yxanul.data.prepare import prepare
    m = prepare([str(p)], "bytes", tmp_path / "o", val_fraction=0.1, progress=False)
    assert m["splits"]["val"]["tokens"] == 100 and m["splits"]["train"]["tokens"] == 900


def test_carved_validation_is_reported(tmp_path, capsys):
    p = tmp_path / "one.txt"
    p.write_text("x" * 999)
    assert main(["data", "prepare", str(p), "--out", str(tmp_path / "o"), "--val-fraction", "0.1",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "carved from its tail" in out and "last 100 tokens" in out
    assert json.loads((tmp_path / "o" / "meta.json").read_text())["val_source"] == "train tail"
    assert main(["data", "prepare", str(p), "--val", str(p), "--out", str(tmp_path / "o2"), "--no-progress"]) == 0
    assert "carved from its tail" not in capsys.readouterr().out
    assert json.loads((tmp_path / "o2" / "meta.json").read_text())["val_source"] == "val inputs"


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".txt.gz"])
def test_invalid_utf8_is_counted_or_refused(tmp_path, capsys, suffix):
    raw = b"good text\n\xff\xfe bad \xc3( bytes\n" if suffix != ".jsonl" else \
        b'{"text": "ok \xff here"}\n{"text": "fine"}\n'
    p = tmp_path / f"in{suffix}"
    p.write_bytes(gzip.compress(raw) if suffix.endswith(".gz") else raw)
    n = 3 if suffix != ".jsonl" else 1   # \xff, \xfe and the \xc3 that starts no valid sequence
    assert main(["data", "prepare", str(p), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert f"{n} invalid UTF-8 sequence(s) replaced" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "meta.json").read_text())["invalid_utf8_replaced"] == n
    assert main(["data", "prepare", str(p), "--out", str(tmp_path / "s"), "--errors", "strict",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(p) in err and "not valid UTF-8" in err and "--errors replace" in err
    assert not (tmp_path / "s").exists()


def test_prepare_errors_and_atomicity(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["data", "prepare", str(tmp_path / "missing.txt"), "--out", str(out), "--no-progress"]) == 2
    assert "input not found" in capsys.readouterr().err and not out.exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    assert main(["data", "prepare", str(bad), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and str(bad) in err and not out.exists()
    assert not list(tmp_path.glob(".o.*"))  # no temp folder left behind
    good = _corpus(tmp_path)
    assert main(["data", "prepare", str(good), "--out", str(out), "--no-progress"]) == 0
    assert main(["data", "prepare", str(good), "--out", str(out), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["data", "prepare", str(good), "--out", str(out), "--tokenizer", "nosuch", "--no-progress"]) == 2
    assert main(["data", "prepare", str(good), "--out", str(out), "--val-fraction", "1.5", "--overwrite"]) == 2


def test_o200k_style_ranks_file(tmp_path):
    ranks = _ranks_file(tmp_path / "o200k_base.tiktoken")
    tok = get_tokenizer(str(ranks))
    assert tok.kind == "o200k" and tok.eot_id == 199999 and tok.vocab_size == 200000
    ids = tok.encode("and the <|endoftext|> heathen")
    assert 199999 not in ids and 200018 not in ids  # specials in text stay ordinary text
    assert tok.decode(ids) == "and the <|endoftext|> heathen"
    assert 260 in ids  # the " the" merge
    out = tmp_path / "d"
    from yxanul.data.prepare import prepare
    meta = prepare([str(_corpus(tmp_path))], str(ranks), out, val_fraction=0, progress=False)
    assert meta["tokenizer"]["kind"] == "o200k" and meta["tokenizer"]["sha256"]
    toks = _tokens(out, "train")
    assert (toks == 199999).sum() == 3 and toks.max() == 199999
    # the 197M vocabulary (200,005) holds every id; the tiny one (257) does not
    check_ids(meta["max_token_id"] + 1, 200005)
    with pytest.raises(YxanulError, match="vocab"):
        check_ids(meta["max_token_id"] + 1, 257)
    with pytest.raises(YxanulError, match="vocab"):
        DataLoader(out, 1, 4, model_vocab=257)
    assert get_tokenizer(meta["tokenizer"]).encode("the") == tok.encode("the")


def test_custom_tiktoken_ranks(tmp_path):
    tok = get_tokenizer(str(_ranks_file(tmp_path / "mini.tiktoken")))
    assert tok.kind == "tiktoken" and tok.eot_id == 262 and tok.vocab_size == 263
    assert tok.decode(tok.encode("the end")) == "the end"
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("not base64 at all\n")
    with pytest.raises(YxanulError):
        get_tokenizer(str(bad))


def test_real_o200k_if_available():
    path = Path("/work/shared/data/tokenizers/o200k_base.tiktoken")
    if not path.exists():
        pytest.skip("no offline o200k_base ranks file")
    tok = get_tokenizer(str(path))
    ids = tok.encode("Hello, world!")
    assert tok.decode(ids) == "Hello, world!" and max(ids) < 200000 and tok.eot_id == 199999


def test_hf_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers
    t = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(DOCS * 5, trainer)
    from tokenizers import decoders
    t.decoder = decoders.ByteLevel()
    path = tmp_path / "tokenizer.json"
    t.save(str(path))
    tok = get_tokenizer(str(path))
    assert tok.kind == "hf" and tok.eot_id == 1 and tok.vocab_size <= 300
    assert tok.decode(tok.encode(DOCS[0])) == DOCS[0]
    out = tmp_path / "d"
    assert main(["data", "prepare", str(_corpus(tmp_path)), "--tokenizer", str(path), "--out", str(out),
                 "--val-fraction", "0", "--no-progress"]) == 0
    toks = _tokens(out, "train")
    assert (toks == 1).sum() == 3 and toks[-1] == 1
    assert read_meta(out)["tokenizer"]["kind"] == "hf"
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(YxanulError):
        get_tokenizer(str(bad))
    # the tokenizer file is an input: an OUT that holds it is refused, even with --overwrite
    inside = out / "tokenizer.json"
    inside.write_bytes(path.read_bytes())
    assert main(["data", "prepare", str(_corpus(tmp_path)), "--tokenizer", str(inside), "--out", str(out),
                 "--overwrite", "--val-fraction", "0", "--no-progress"]) == 2
    assert inside.exists()


def test_loader_is_deterministic_and_shards_by_rank(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("".join(chr(97 + i % 26) for i in range(5000)))
    from yxanul.data.prepare import prepare
    prepare([str(p)], ByteTokenizer(), tmp_path / "d", val_fraction=0.1, progress=False, shard_tokens=1000)
    a = DataLoader(tmp_path / "d", 4, 16, seed=3)
    b = DataLoader(tmp_path / "d", 4, 16, seed=3)
    x1, y1 = a.batch(7, 1)
    x2, y2 = b.batch(7, 1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the next tokens
    assert not torch.equal(a.batch(7, 0)[0], x1) and not torch.equal(a.batch(8, 1)[0], x1)
    assert not torch.equal(DataLoader(tmp_path / "d", 4, 16, seed=4).batch(7, 1)[0], x1)
    # two ranks with batch 2 see exactly the rows of one process with batch 4
    r0 = DataLoader(tmp_path / "d", 2, 16, seed=3, rank=0, world_size=2).batch(7, 1)[0]
    r1 = DataLoader(tmp_path / "d", 2, 16, seed=3, rank=1, world_size=2).batch(7, 1)[0]
    assert torch.equal(torch.cat([r0, r1]), x1)
    v1 = [x for x, _ in a.val_batches(3)]
    v2 = [x for x, _ in a.val_batches(3)]
    assert len(v1) == 3 and all(torch.equal(u, w) for u, w in zip(v1, v2))
    with pytest.raises(YxanulError, match="seq_len"):
        DataLoader(tmp_path / "d", 2, 100000)


def test_bundled_corpus_is_small_and_cached(tmp_path):
    from yxanul.data import CORPUS_DIR, bundled_dataset
    size = sum(p.stat().st_size for p in CORPUS_DIR.iterdir())
    assert size < 2_200_000 and (CORPUS_DIR / "README.md").exists()
    d1 = bundled_dataset("bytes", cache=tmp_path)
    d2 = bundled_dataset("bytes", cache=tmp_path)
    assert d1 == d2
    meta = read_meta(d1)
    assert meta["splits"]["train"]["tokens"] > 5_000_000 and meta["splits"]["val"]["tokens"] > 100_000
    text = ByteTokenizer().decode(np.fromfile(d1 / "val_000.bin", dtype=np.uint32, count=2000))
    assert sum(c.isalpha() for c in text) > 1000  # real text


def test_bundled_dataset_falls_back_when_the_cache_cannot_be_written(tmp_path, monkeypatch):
    import errno

    import yxanul.data.prepare as prep
    from yxanul.data import bundled_dataset

    cache = tmp_path / "cache"
    real = prep._ShardWriter.write

    def full_in_cache(self, arr, doc=True):
        if str(self.folder).startswith(str(cache)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, arr, doc)

    monkeypatch.setattr(prep._ShardWriter, "write", full_in_cache)
    out = bundled_dataset(cache=cache)
    assert (out / "meta.json").is_file() and not str(out).startswith(str(cache))


def test_bundled_dataset_fallback_folder_is_removed_when_the_process_exits(tmp_path):
    import subprocess
    import sys
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")  # the cache can't be created
    code = ("from yxanul.data import bundled_dataset; d = bundled_dataset('bytes', cache=%r); "
            "assert (d / 'meta.json').is_file(); print(d)" % str(blocker))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = Path(r.stdout.strip().splitlines()[-1])
    assert out.name.startswith("corpus-bytes-") and not str(out).startswith(str(blocker))
    assert not out.exists() and not out.parent.exists()


def test_shards_shorter_than_a_window_are_named_as_such(tmp_path, capsys):
    """Windows never span shards: a split of many tokens in shards shorter than seq_len + 1 is refused saying
    so (and how to prepare it), not as a split with fewer tokens than one window."""
    out = tmp_path / "d"
    assert main(["data", "prepare", str(_corpus(tmp_path)), "--tokenizer", "bytes", "--out", str(out),
                 "--shard-tokens", "20", "--no-progress"]) == 0
    capsys.readouterr()
    with pytest.raises(YxanulError, match=r"longest shard has 20 tokens .*--shard-tokens.*fewer than seq_len \+ 1"):
        DataLoader(out, 2, 32)


def test_a_shard_size_that_would_write_too_many_files_is_refused(tmp_path, capsys, monkeypatch):
    """`--shard-tokens 1` would write a file per token: past MAX_SHARDS files per split the run stops with one
    line naming the flag, and no output folder is left."""
    import yxanul.data.prepare as prep
    monkeypatch.setattr(prep, "MAX_SHARDS", 50)
    out = tmp_path / "d"
    rc = main(["data", "prepare", str(_corpus(tmp_path)), "--tokenizer", "bytes", "--out", str(out),
               "--shard-tokens", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--shard-tokens" in err and "more than 50 shards of 1 tokens" in err and "Traceback" not in err
    assert not out.exists()
    assert main(["data", "prepare", str(_corpus(tmp_path)), "--tokenizer", "bytes", "--out", str(out),
                 "--no-progress"]) == 0


def test_an_empty_validation_input_is_refused(tmp_path, capsys):
    """--val naming a file with no text would give a 0-token validation split (and `val loss None` in training)."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "d"
    assert main(["data", "prepare", str(_corpus(tmp_path)), "--val", str(empty), "--tokenizer", "bytes", "--out",
                 str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "validation inputs hold no text" in err and str(empty) in err and err.count("\n") == 1
    assert not out.exists()
