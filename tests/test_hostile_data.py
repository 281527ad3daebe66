"""Hostile inputs to `data prepare`, `data info` / the data loader and `plot`: one-line errors naming the file or
key (exit 2, no partial output), or, where the input is usable, a normal result."""
from __future__ import annotations

import base64
import gzip
import json
import lzma
import os
from pathlib import Path

import pytest

from yxanul.errors import YxanulError

from yxanul.cli import main

HUGE_NUMBER = "1" * 5000    # past Python's 4300-digit limit for int(str): a ValueError, not a JSONDecodeError
DEEP = "[" * 100_000        # a RecursionError in the JSON parser


def _one_line_error(capsys, *needles) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("yxanul: error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def _text(tmp_path: Path) -> Path:
    p = tmp_path / "t.txt"
    p.write_text("hello world\n")
    return p


def _prepared(tmp_path: Path) -> Path:
    from yxanul.data.prepare import prepare
    prepare([str(_text(tmp_path))], "bytes", tmp_path / "d", val_fraction=0.2, progress=False)
    return tmp_path / "d"


def _prepare_fails(tmp_path, capsys, inputs, *needles, extra=()):
    out = tmp_path / "out"
    before = sorted(os.listdir(tmp_path))
    assert main(["data", "prepare", *map(str, inputs), "--out", str(out), "--no-progress", *extra]) == 2
    _one_line_error(capsys, *needles)
    assert sorted(os.listdir(tmp_path)) == before   # no output folder, no temporary left behind


# -- 1. JSON past the digit limit or nested too deeply --------------------------------------------------------

@pytest.mark.parametrize("value", [HUGE_NUMBER, DEEP])
def test_data_meta_json_huge_number_or_deep_nesting(tmp_path, capsys, value):
    d = _prepared(tmp_path)
    (d / "meta.json").write_text('{"format": "yxanul-tokens", "n": ' + value + "}")
    assert main(["data", "info", str(d)]) == 2
    _one_line_error(capsys, "meta.json")


@pytest.mark.parametrize("value", [HUGE_NUMBER, DEEP])
def test_prepare_jsonl_huge_number_or_deep_nesting(tmp_path, capsys, value):
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "hi", "n": ' + value + "}\n")
    _prepare_fails(tmp_path, capsys, [src], "a.jsonl", "line 1: invalid JSON")


@pytest.mark.parametrize("value", [HUGE_NUMBER, DEEP])
def test_plot_metrics_huge_number_or_deep_nesting(tmp_path, capsys, value):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": ' + value + "}\n")
    assert main(["plot", str(run), "--out", str(tmp_path / "l.png")]) == 2
    _one_line_error(capsys, "metrics.jsonl", "line 2: invalid JSON")
    assert not (tmp_path / "l.png").exists()


# -- 2. malformed tiktoken ranks files --------------------------------------------------------------------------

def _ranks(*extra: tuple[bytes, int], skip: int | None = None) -> str:
    toks = [(bytes([i]), i) for i in range(256) if i != skip] + list(extra)
    return "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in toks)


@pytest.mark.parametrize("content, needle", [
    ("", "no ranks"),
    ("AA== 5\n", "single byte"),
    (_ranks(skip=7), "single byte 0x07"),
    (_ranks((b"ab", 3)), "rank 3 is given to more than one token"),
    (_ranks((b"ab", -1)), "rank -1"),
    (_ranks((b"ab", 5_000_000_000)), "rank 5000000000"),
    (_ranks((b"ab", 10 ** 30)), "outside"),
])
def test_prepare_malformed_tiktoken_ranks(tmp_path, capsys, content, needle):
    tok = tmp_path / "r.tiktoken"
    tok.write_text(content)
    _prepare_fails(tmp_path, capsys, [_text(tmp_path)], "r.tiktoken", needle, extra=["--tokenizer", str(tok)])


def test_valid_sparse_tiktoken_ranks_still_work(tmp_path, capsys):
    tok = tmp_path / "r.tiktoken"
    tok.write_text(_ranks((b"he", 300)))
    out = tmp_path / "out"
    assert main(["data", "prepare", str(_text(tmp_path)), "--tokenizer", str(tok), "--out", str(out),
                 "--no-progress"]) == 0
    assert json.loads((out / "meta.json").read_text())["eot_id"] == 301


# -- 3. corrupt or truncated compressed inputs ---------------------------------------------------------------------

@pytest.mark.parametrize("name, data", [
    ("c.txt.gz", gzip.compress(b"hello\n")[:15]),
    ("b.txt.gz", b"junk\n"),
    ("c.txt.xz", lzma.compress(b"hello\n")[:20]),
    ("b.txt.xz", b"junk\n"),
    ("c.jsonl.gz", gzip.compress(b'{"text": "hello"}\n' * 50)[:30]),
])
def test_prepare_corrupt_compressed_input(tmp_path, capsys, name, data):
    src = tmp_path / name
    src.write_bytes(data)
    _prepare_fails(tmp_path, capsys, [src], name, "corrupt or truncated")


# -- 4. a file name that is not UTF-8 ------------------------------------------------------------------------------

def test_prepare_folder_with_non_utf8_file_name(tmp_path, capsys):
    folder = tmp_path / "nu"
    folder.mkdir()
    try:
        with open(os.path.join(os.fsencode(folder), b"\xff.txt"), "wb") as f:
            f.write(b"hi\n")
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    out = tmp_path / "out"
    assert main(["data", "prepare", str(folder), "--out", str(out), "--no-progress"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == 3   # "hi" + end of text
    assert main(["data", "info", str(out)]) == 0


# -- 5. --workers beyond the CPUs ----------------------------------------------------------------------------------

def test_prepare_workers_are_bounded_by_the_cpus(tmp_path, capsys, monkeypatch):
    import yxanul.data.prepare as prep

    monkeypatch.setattr(prep, "max_workers", lambda: 1)
    monkeypatch.setattr(prep.mp, "get_context", lambda *a: pytest.fail("started a process pool"))
    out = tmp_path / "out"
    assert main(["data", "prepare", str(_text(tmp_path)), "--workers", "100000", "--out", str(out),
                 "--no-progress"]) == 0
    assert "--workers 100000" in capsys.readouterr().out and (out / "meta.json").is_file()
    assert "CPU" in prep.prepare.__doc__ + " " + prep.__doc__


# -- 6. plot: huge or non-finite values, non-UTF-8 text, a non-PNG output -----------------------------------------

def test_plot_skips_non_finite_and_huge_values(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "loss": 3.0}, {"step": 2, "loss": float("inf")}, {"step": 3, "loss": 1e308},
        {"step": 4, "loss": -1e308, "val_loss": float("nan")}, {"step": 5, "loss": 2.5, "val_loss": 2.6}]))
    out = tmp_path / "l.png"
    assert main(["plot", str(run), "--out", str(out), "--smooth", "2"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and "skipped 4 point(s)" in capsys.readouterr().out


def test_plot_non_utf8_title_and_run_name(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    try:
        run = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"r\xff$x")))
        run.mkdir()
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n')
    out = tmp_path / "l.png"
    assert main(["plot", str(run), "--out", str(out), "--title", os.fsdecode(b"\xff $\\foo")]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_plot_refuses_a_non_png_output(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    assert main(["plot", str(run), "--out", str(tmp_path / "l.txt")]) == 2
    _one_line_error(capsys, "--out", ".png")
    assert sorted(os.listdir(tmp_path)) == ["run"]


# -- 7. data meta.json values the loader relies on -----------------------------------------------------------------

@pytest.mark.parametrize("edit, key", [
    ({"dtype": "uint16"}, "dtype"),
    ({"dtype": "complex"}, "dtype"),
    ({"version": 99}, "version"),
    ({"vocab_size": 100}, "vocab_size"),
    ({"eot_id": -1}, "eot_id"),
    ({"eot_id": 10 ** 6}, "eot_id"),
    ({"tokenizer": {"kind": "nope"}}, "tokenizer.kind"),
])
def test_data_meta_values_are_checked(tmp_path, capsys, edit, key):
    from yxanul.data.loader import read_meta
    from yxanul.errors import YxanulError

    d = _prepared(tmp_path)
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({**meta, **edit}))
    assert main(["data", "info", str(d)]) == 2
    _one_line_error(capsys, "meta.json", key)
    with pytest.raises(YxanulError, match=key):   # what train, evaluate and the loader read
        read_meta(d)


def test_a_ranks_file_edited_at_the_same_path_is_read_anew(tmp_path):
    """tiktoken's loader caches a ranks file by its path; the project reads the file itself, so a file replaced
    at the same path is never read as it was."""
    import base64

    from yxanul.data.tokenizers import get_tokenizer
    p = tmp_path / "r.tiktoken"
    p.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    assert get_tokenizer(str(p)).vocab_size == 257
    p.write_bytes(b"")
    with pytest.raises(YxanulError, match="no ranks"):
        get_tokenizer(str(p))
