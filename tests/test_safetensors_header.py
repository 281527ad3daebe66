"""The safetensors header parser: agreement with the real library, every hostile case, and fuzzing."""
from __future__ import annotations

import json
import struct
import tracemalloc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from yxanul.checkpoint.safetensors_header import (INDEX_NAME, collect, open_checkpoint, parse_header_bytes,
                                                  read_header, read_index)
from yxanul.errors import YxanulError


def write_raw(path, header, data_size=None, raw_header: bytes | None = None, declared_len=None):
    """Write a safetensors-like file. ``data_size`` defaults to the max end offset; the data is sparse."""
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    if data_size is None:
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"] if header else []
        data_size = max(ends, default=0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if declared_len is None else declared_len))
        f.write(raw)
        f.truncate(8 + len(raw) + data_size)
    return path


def test_matches_the_safetensors_library(tmp_path):
    sd = {"a": torch.zeros(3, 5, dtype=torch.bfloat16), "b.weight": torch.ones(7), "c": torch.zeros(0, 4),
          "d": torch.zeros(2, 2, dtype=torch.float8_e4m3fn), "e": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    p = tmp_path / "m.safetensors"
    save_file(sd, str(p), metadata={"format": "pt", "x": "y"})
    h = read_header(p)
    assert h.metadata == {"format": "pt", "x": "y"}
    assert h.file_size == p.stat().st_size and h.data_start == 8 + h.header_len
    with safe_open(str(p), "pt") as f:
        assert set(f.keys()) == set(h.tensors)
        for k in f.keys():
            t = f.get_tensor(k)
            info = h.tensors[k]
            assert info.shape == tuple(t.shape) and info.numel == t.numel()
            assert info.nbytes == t.numel() * t.element_size()
    assert h.tensors["a"].dtype == "BF16" and h.tensors["d"].dtype == "F8_E4M3" and h.tensors["e"].dtype == "I64"
    assert h.tensors["c"].nbytes == 0


def _ok_header():
    return {"__metadata__": {"format": "pt"},
            "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]}}


HOSTILE = [
    ("offsets out of range", lambda h: h["w"].update(data_offsets=[0, 24]) or 16, "past the data region"),
    ("overlap", lambda h: h["b"].update(data_offsets=[20, 28]), "overlap"),
    ("size mismatch", lambda h: h["w"].update(shape=[2, 4]), "needs 32"),
    ("unknown dtype", lambda h: h["w"].update(dtype="F12"), "unknown dtype"),
    ("negative dim", lambda h: h["w"].update(shape=[-2, -3]), "negative"),
    ("bool dim", lambda h: h["w"].update(shape=[True, 3]), "shape"),
    ("float offsets", lambda h: h["w"].update(data_offsets=[0.0, 24]), "data_offsets"),
    ("reversed offsets", lambda h: h["w"].update(data_offsets=[24, 0]), "invalid data_offsets"),
    ("three offsets", lambda h: h["w"].update(data_offsets=[0, 12, 24]), "data_offsets"),
    ("missing field", lambda h: h["w"].pop("shape"), "lacks shape"),
    ("extra field", lambda h: h["w"].update(foo=1), "unexpected"),
    ("entry not object", lambda h: h.update(w=[1, 2]), "must be an object"),
    ("bad metadata", lambda h: h.update(__metadata__={"a": 1}), "__metadata__"),
    # the library refuses a file its tensors do not fully cover ("incomplete metadata"): so does the parser
    ("gap", lambda h: h["b"].update(data_offsets=[26, 34]) or 34, r"bytes \[24, 26\) before tensor 'b'"),
    ("trailing bytes", lambda h: 40, "last 8 byte"),
]


@pytest.mark.parametrize("case,mutate,match", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_entries(tmp_path, case, mutate, match):
    h = _ok_header()
    data_size = mutate(h)
    p = write_raw(tmp_path / "x.safetensors", h, data_size=data_size if isinstance(data_size, int) else 32)
    with pytest.raises(YxanulError, match=match) as ei:
        read_header(p)
    assert str(p) in str(ei.value) and "\n" not in str(ei.value)


def test_valid_header_parses(tmp_path):
    h = read_header(write_raw(tmp_path / "ok.safetensors", _ok_header()))
    assert h.tensors["w"].offsets == (0, 24) and h.tensors["b"].numel == 4 and h.metadata == {"format": "pt"}


@pytest.mark.parametrize("raw,match", [
    (b"\xff\xfe{}", "UTF-8"),
    (b'{"a": ', "JSON"),
    (b"[1, 2, 3]", "JSON object"),
    (b'{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}, "a": {}}', "duplicate"),
    (b"[" * 100000 + b"]" * 100000, "JSON"),
])
def test_hostile_json(tmp_path, raw, match):
    p = write_raw(tmp_path / "j.safetensors", None, data_size=8, raw_header=raw)
    with pytest.raises(YxanulError, match=match):
        read_header(p)


def test_hostile_lengths_and_files(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(YxanulError, match="too short"):
        read_header(empty)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02\x03")
    with pytest.raises(YxanulError, match="too short"):
        read_header(short)
    zero = write_raw(tmp_path / "zero.safetensors", None, data_size=0, raw_header=b"")
    with pytest.raises(YxanulError, match="empty header"):
        read_header(zero)
    # declared header length beyond the file: error before any allocation of that size
    past = write_raw(tmp_path / "past.safetensors", _ok_header(), declared_len=50_000_000)
    tracemalloc.start()
    with pytest.raises(YxanulError, match="runs past the end"):
        read_header(past)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1_000_000
    with pytest.raises(YxanulError, match="cap"):
        read_header(write_raw(tmp_path / "cap.safetensors", _ok_header(), declared_len=2 ** 63))
    with pytest.raises(YxanulError, match="cap"):
        read_header(write_raw(tmp_path / "cap2.safetensors", _ok_header()), max_header_bytes=16)
    # truncated: a real file cut in the data region
    p = tmp_path / "real.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(p))
    data = p.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(YxanulError, match="truncated"):
        read_header(tmp_path / "cut.safetensors")
    (tmp_path / "cut2.safetensors").write_bytes(data[:40])
    with pytest.raises(YxanulError, match="past the end"):
        read_header(tmp_path / "cut2.safetensors")
    with pytest.raises(YxanulError, match="no such file"):
        read_header(tmp_path / "nope.safetensors")
    with pytest.raises(YxanulError, match="directory"):
        read_header(tmp_path)


def _shards(tmp_path, with_index=True):
    save_file({"a.weight": torch.zeros(4, 4), "b.weight": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"c.weight": torch.zeros(3, 3, dtype=torch.bfloat16)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    if with_index:
        wm = {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00001-of-00002.safetensors",
              "c.weight": "model-00002-of-00002.safetensors"}
        (tmp_path / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": 90}, "weight_map": wm}))
    return tmp_path


def test_index_and_collect(tmp_path):
    root = _shards(tmp_path)
    idx = read_index(root / INDEX_NAME)
    assert idx.shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for target in (root, root / INDEX_NAME):
        hs = collect(target)
        assert [len(h.tensors) for h in hs] == [2, 1]
        assert open_checkpoint(target).index is not None
    single = collect(root / "model-00002-of-00002.safetensors")
    assert len(single) == 1 and "c.weight" in single[0].tensors
    (root / INDEX_NAME).unlink()
    assert sum(len(h.tensors) for h in collect(root)) == 3   # folder without an index


@pytest.mark.parametrize("mutate,match", [
    (lambda ix: ix["weight_map"].update({"d.weight": "model-00003-of-00003.safetensors"}), "missing shard"),
    (lambda ix: ix.update(weight_map=[1]), "weight_map"),
    (lambda ix: ix["weight_map"].update({"a.weight": "../evil.safetensors"}), "plain file name"),
    (lambda ix: ix["weight_map"].update({"a.weight": "/etc/passwd"}), "plain file name"),
    (lambda ix: ix["weight_map"].update({"zz.weight": "model-00002-of-00002.safetensors"}), "does not hold"),
    (lambda ix: ix["weight_map"].pop("b.weight"), "not in weight_map"),
    (lambda ix: ix["weight_map"].update({"a.weight": 3}), "file name"),
    (lambda ix: ix.update(weight_map={}), "lists no tensors"),
])
def test_hostile_index(tmp_path, mutate, match):
    root = _shards(tmp_path)
    ix = json.loads((root / INDEX_NAME).read_text())
    mutate(ix)
    (root / INDEX_NAME).write_text(json.dumps(ix))
    with pytest.raises(YxanulError, match=match) as ei:
        collect(root)
    assert INDEX_NAME in str(ei.value)


def test_hostile_index_files(tmp_path):
    p = tmp_path / INDEX_NAME
    p.write_bytes(b"\xff\xfe")
    with pytest.raises(YxanulError, match="UTF-8"):
        read_index(p)
    p.write_text("{not json")
    with pytest.raises(YxanulError, match="JSON"):
        read_index(p)
    p.write_text("[]")
    with pytest.raises(YxanulError, match="object"):
        read_index(p)
    with pytest.raises(YxanulError, match="no .safetensors"):
        collect(tmp_path / "sub") if (tmp_path / "sub").mkdir() is None else None
    _shards(tmp_path, with_index=False)
    save_file({"a.weight": torch.zeros(1)}, str(tmp_path / "dup.safetensors"))
    p.unlink()
    with pytest.raises(YxanulError, match="appears in both"):
        collect(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# fuzzing: the parser either returns a header whose invariants hold or raises YxanulError; nothing else
# ---------------------------------------------------------------------------------------------------------------
def _check_invariants(h):
    spans = []
    for t in h.tensors.values():
        b, e = t.offsets
        assert 0 <= b <= e <= h.data_size
        assert e - b == t.nbytes
        assert all(d >= 0 for d in t.shape)
        if t.nbytes:
            spans.append((b, e))
    spans.sort()
    assert all(e0 <= b1 for (_, e0), (b1, _) in zip(spans, spans[1:]))


_json = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False)
                     | st.text(max_size=8), lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                     max_leaves=20)
_entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "BF16", "F8_E4M3", "I64", "F4", "F6_E2M3", "BOOL", "X9"]),
    "shape": st.lists(st.integers(-2, 40), max_size=3),
    "data_offsets": st.lists(st.integers(-5, 400), min_size=2, max_size=2),
})
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(raw=st.binary(max_size=64), declared=st.one_of(st.none(), st.integers(0, 2 ** 64 - 1)),
       extra=st.integers(0, 64))
def test_fuzz_random_bytes(tmp_path, raw, declared, extra):
    p = write_raw(tmp_path / "f.safetensors", None, data_size=extra, raw_header=raw, declared_len=declared)
    try:
        _check_invariants(read_header(p))
    except YxanulError as e:
        assert "\n" not in str(e)


@SETTINGS
@given(obj=st.one_of(_json, st.dictionaries(st.text(max_size=6), st.one_of(_entry, _json), max_size=5)),
       data_size=st.integers(0, 500))
def test_fuzz_structured_headers(obj, data_size):
    raw = json.dumps(obj).encode()
    try:
        h = parse_header_bytes(raw, "fuzz.safetensors", file_size=8 + len(raw) + data_size)
    except YxanulError as e:
        assert str(e).startswith("fuzz.safetensors") and "\n" not in str(e)
    else:
        assert isinstance(obj, dict)
        _check_invariants(h)


@SETTINGS
@given(entries=st.lists(st.tuples(st.sampled_from(["F32", "BF16", "U8", "I64"]),
                                  st.lists(st.integers(0, 6), max_size=3)), min_size=1, max_size=5))
def test_fuzz_valid_files_agree_with_library(tmp_path, entries):
    """Well-formed packed headers are accepted, and the library reads the same names/shapes."""
    sizes = {"F32": 4, "BF16": 2, "U8": 1, "I64": 8}
    hdr, pos = {}, 0
    for i, (dt, shape) in enumerate(entries):
        n = sizes[dt]
        for d in shape:
            n *= d
        hdr[f"t{i}"] = {"dtype": dt, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    p = write_raw(tmp_path / "v.safetensors", hdr, data_size=pos)
    h = read_header(p)
    _check_invariants(h)
    with safe_open(str(p), "pt") as f:
        for k in f.keys():
            assert tuple(f.get_slice(k).get_shape()) == h.tensors[k].shape
