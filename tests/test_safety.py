"""Hostile and careless use: outputs never replace what they should not, inputs are bounded, write errors are
one line, and reports say what they measured."""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import struct
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from yxanul.cli import main
from yxanul.errors import YxanulError
from yxanul.io import MARKER, atomic_dir, atomic_path, atomic_write_text

W = "model.layers.0.mlp.up_proj.weight"


def _ckpt(folder, rows=256, cols=256, extra=None):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    sd = {W: (torch.randn(rows, cols, generator=g) * 0.05).to(torch.bfloat16)}
    sd.update(extra or {})
    save_file(sd, str(folder / "model.safetensors"))
    return folder


def _err_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


# ---------------------------------------------------------------------------------------------------------------
# --overwrite replaces only our own output
# ---------------------------------------------------------------------------------------------------------------
def test_overwrite_never_replaces_a_foreign_folder(tmp_path, capsys):
    src = _ckpt(tmp_path / "in")
    precious = tmp_path / "precious"
    (precious / "photos").mkdir(parents=True)
    (precious / "thesis.txt").write_text("years of work")
    assert main(["quantize", str(src), str(precious), "--overwrite"]) == 2
    err = _err_line(capsys)
    assert "not written by `yxanul quantize`" in err and "remove it yourself" in err
    assert (precious / "thesis.txt").read_text() == "years of work" and (precious / "photos").is_dir()


def test_overwrite_never_turns_a_file_into_a_folder(tmp_path, capsys):
    src = _ckpt(tmp_path / "in")
    f = tmp_path / "notes.txt"
    f.write_text("keep")
    assert main(["quantize", str(src), str(f), "--overwrite"]) == 2
    assert "is a file" in _err_line(capsys)
    assert f.read_text() == "keep"


def test_overwrite_replaces_an_empty_folder_and_our_own_output_only(tmp_path, capsys):
    src = _ckpt(tmp_path / "in")
    out = tmp_path / "q"
    out.mkdir()
    assert main(["quantize", str(src), str(out), "--overwrite"]) == 0
    marker = json.loads((out / MARKER).read_text())
    assert marker["command"] == "quantize" and marker["version"]
    assert main(["quantize", str(src), str(out), "--overwrite", "--block", "64"]) == 0
    capsys.readouterr()
    # a quantize output is not a dequantize output
    assert main(["dequantize", str(out), str(tmp_path / "in2")]) == 0
    assert main(["dequantize", str(out), str(out / ".." / "in2"), "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["quantize", str(src), str(tmp_path / "in2"), "--overwrite"]) == 2
    assert "not written by `yxanul quantize`" in _err_line(capsys)


def test_data_prepare_out_may_not_be_contain_or_lie_in_an_input(tmp_path, capsys):
    corpus = tmp_path / "parent" / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "a.txt").write_text("hello world\n" * 50)
    before = {p: p.read_bytes() for p in corpus.rglob("*") if p.is_file()}
    for out in (corpus, tmp_path / "parent", corpus / "a.txt", corpus / "shards"):
        assert main(["data", "prepare", str(corpus), "--out", str(out), "--overwrite", "--no-progress"]) == 2, out
        err = _err_line(capsys)
        assert "input" in err
        assert {p: p.read_bytes() for p in corpus.rglob("*") if p.is_file()} == before
    assert (corpus / "a.txt").is_file() and not (corpus / "shards").exists()


def test_symlinked_output_into_the_input_is_refused(tmp_path, capsys):
    src = _ckpt(tmp_path / "in")
    link = tmp_path / "link"
    link.symlink_to(src)
    assert main(["quantize", str(src / "model.safetensors"), str(link), "--overwrite"]) == 2
    assert "input" in _err_line(capsys)
    assert (src / "model.safetensors").is_file()


def test_export_never_deletes_the_run(tmp_path, capsys):
    from test_export import make_run

    run, _ = make_run(tmp_path)
    files = sorted(p.relative_to(run) for p in run.rglob("*"))
    for out in (run, run / "hf", run.parent):
        assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 2, out
        assert "input" in _err_line(capsys)
        assert sorted(p.relative_to(run) for p in run.rglob("*")) == files


def test_stale_temporaries_of_a_killed_run_are_removed_only_when_provably_ours(tmp_path):
    src = _ckpt(tmp_path / "in")
    out = tmp_path / "q"
    dead = _dead_pid()
    ours = tmp_path / f".q.{dead}-0badcafe.tmp"
    ours.mkdir()
    (ours / MARKER).write_text(json.dumps({"command": "quantize", "version": "0"}))
    (ours / "model.safetensors").write_bytes(b"x" * 1000)
    foreign = tmp_path / f".q.{dead}-deadbeef.tmp"     # right name, no marker: not provably ours
    foreign.mkdir()
    other_cmd = tmp_path / f".q.{dead}-feedf00d.tmp"   # a dequantize's temporary
    other_cmd.mkdir()
    (other_cmd / MARKER).write_text(json.dumps({"command": "dequantize"}))
    alive = tmp_path / f".q.{os.getppid()}-0123abcd.tmp"  # its writer still runs
    alive.mkdir()
    (alive / MARKER).write_text(json.dumps({"command": "quantize"}))
    assert main(["quantize", str(src), str(out)]) == 0
    assert not ours.exists() and foreign.is_dir() and other_cmd.is_dir() and alive.is_dir()


def test_stale_temporary_files_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "latest"
    stale = tmp_path / f".latest.{_dead_pid()}-0badcafe.tmp"
    stale.write_text("half")
    unrelated = tmp_path / ".latest.abc.tmp"
    unrelated.write_text("not ours")
    impossible = tmp_path / f".latest.{2 ** 70}-0badcafe.tmp"   # no process id we could have had
    impossible.write_text("not ours")
    atomic_write_text(target, "step_00000010\n")
    assert target.read_text() == "step_00000010\n" and not stale.exists()
    assert unrelated.exists() and impossible.exists()


# ---------------------------------------------------------------------------------------------------------------
# bounded inputs
# ---------------------------------------------------------------------------------------------------------------
BILLION_LAUGHS = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]) + "\n"


@pytest.mark.parametrize("argv", [["policy", "--config"], ["policy", "--model"]])
def test_billion_laughs_yaml_fails_fast(tmp_path, capsys, argv):
    p = tmp_path / "bomb.yaml"
    p.write_text(BILLION_LAUGHS)
    t0 = time.perf_counter()
    assert main(argv + [str(p)]) == 2
    assert time.perf_counter() - t0 < 1.0
    err = _err_line(capsys)
    assert "aliases" in err and len(err) < 400


def test_error_messages_hold_at_most_about_200_characters_of_user_data(tmp_path, capsys):
    from yxanul.precision import canonical_dtype

    p = tmp_path / "m.yaml"
    p.write_text("preset: tiny\nd_model: [" + ", ".join(["1234567890"] * 5000) + "]\n")
    assert main(["policy", "--model", str(p)]) == 2
    err = _err_line(capsys)
    assert len(err) < 200 + len(str(p)) + 80
    with pytest.raises(YxanulError) as e:
        canonical_dtype("x" * 100_000, source="s" * 10_000, key="k\x1b[2J" * 1000)
    assert len(str(e.value)) < 700 and "\x1b" not in str(e.value)


def _sparse_safetensors(path, shape, dtype="BF16"):
    nbytes = 2 * shape[0] * shape[1]
    hdr = json.dumps({W: {"dtype": dtype, "shape": list(shape), "data_offsets": [0, nbytes]}}).encode()
    hdr += b" " * (-len(hdr) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hdr)) + hdr)
        f.truncate(8 + len(hdr) + nbytes)


def test_sparse_file_declaring_a_terabyte_is_refused_up_front(tmp_path, capsys):
    f = tmp_path / "huge.safetensors"
    try:
        _sparse_safetensors(f, (1 << 19, 1 << 20))   # 1 TiB of BF16
    except OSError:
        pytest.skip("this file system cannot hold a 1 TiB sparse file")
    t0 = time.perf_counter()
    assert main(["quantize", str(f), str(tmp_path / "q")]) == 2
    err = _err_line(capsys)
    assert "needs" in err and "available" in err and time.perf_counter() - t0 < 10
    assert not (tmp_path / "q").exists() and not _siblings(tmp_path / "q")


def test_slab_memory_is_checked_before_reading(tmp_path, capsys, monkeypatch):
    import yxanul.io as yio

    src = _ckpt(tmp_path / "in")
    monkeypatch.setattr(yio, "available_memory", lambda: 1000)
    assert main(["quantize", str(src), str(tmp_path / "q")]) == 2
    err = _err_line(capsys)
    assert "one row slab needs" in err and "of memory" in err and not (tmp_path / "q").exists()


def test_conversions_read_row_slabs_of_the_block_height(tmp_path, monkeypatch):
    import yxanul.checkpoint.convert as conv
    from yxanul.fp8.quant import quantize

    src = _ckpt(tmp_path / "in", rows=300, cols=200)
    reads = []
    real = conv._get

    def spy(handles, path, name, rows=None):
        t = real(handles, path, name, rows)
        reads.append((name, tuple(t.shape)))
        return t

    monkeypatch.setattr(conv, "_get", spy)
    conv.quantize_checkpoint(src, tmp_path / "q", block=128)
    assert reads and all(shape[0] <= 128 for _, shape in reads)
    with torch.no_grad():
        from safetensors import safe_open
        with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as h:
            q, s = h.get_tensor(W), h.get_tensor(W + "_scale_inv")
        with safe_open(str(src / "model.safetensors"), "pt") as h:
            rq, rs = quantize(h.get_tensor(W), (128, 128), "e4m3")
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
    reads.clear()
    conv.dequantize_checkpoint(tmp_path / "q", tmp_path / "d")
    assert reads and all(shape[0] <= 128 for _, shape in reads)


def _fp8_ckpt(folder, scale, q=None, block=None):
    folder.mkdir(parents=True, exist_ok=True)
    q = torch.ones(256, 256).to(torch.float8_e4m3fn) if q is None else q
    save_file({W: q, W + "_scale_inv": scale}, str(folder / "model.safetensors"))
    if block:
        (folder / "config.json").write_text(json.dumps({"quantization_config": {"weight_block_size": block}}))
    return folder


@pytest.mark.parametrize("case", ["3x3 scale", "negative", "zero", "inf", "nan byte", "declared block"])
def test_dequantize_refuses_bad_scales_and_nan_bytes(tmp_path, capsys, case):
    scale, q, block = torch.ones(2, 2), None, None
    if case == "3x3 scale":
        scale = torch.ones(3, 3)
    elif case == "negative":
        scale[1, 0] = -1.0
    elif case == "zero":
        scale[0, 1] = 0.0
    elif case == "inf":
        scale[1, 1] = float("inf")
    elif case == "nan byte":
        raw = torch.full((256, 256), 0x38, dtype=torch.uint8)
        raw[200, 3] = 0x7F   # E4M3 NaN
        q = raw.view(torch.float8_e4m3fn)
    elif case == "declared block":
        block = [64, 64]
    src = _fp8_ckpt(tmp_path / "in", scale, q, block)
    assert main(["dequantize", str(src), str(tmp_path / "out")]) == 2
    err = _err_line(capsys)
    assert W in err and not (tmp_path / "out").exists()
    if case == "nan byte":
        assert "NaN" in err and "200" in err


def test_dequantize_block_flag_declares_an_odd_block(tmp_path, capsys):
    src = _fp8_ckpt(tmp_path / "in", torch.ones(3, 3))
    assert main(["dequantize", str(src), str(tmp_path / "out"), "--block", "96"]) == 0
    assert main(["dequantize", str(src), str(tmp_path / "out2"), "--block", "64"]) == 2


def test_dequantize_block_flag_against_a_declared_block(tmp_path, capsys):
    src = _fp8_ckpt(tmp_path / "in", torch.ones(2, 2), block=[128, 128])
    assert main(["dequantize", str(src), str(tmp_path / "out"), "--block", "64"]) == 2
    assert "disagrees" in _err_line(capsys) and not (tmp_path / "out").exists()
    assert main(["dequantize", str(src), str(tmp_path / "out"), "--block", "128"]) == 0  # the same: fine


def test_tensor_names_are_escaped_in_the_table(tmp_path, capsys):
    evil = "model.layers.0.mlp.\x1b[2Jdown_proj.weight"
    src = _ckpt(tmp_path / "in", extra={evil: torch.zeros(4, 4, dtype=torch.bfloat16)})
    assert main(["quantize", str(src), str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[2J" in out


# ---------------------------------------------------------------------------------------------------------------
# write errors are one line, with no partial output
# ---------------------------------------------------------------------------------------------------------------
def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("cmd", ["quantize", "dequantize"])
def test_disk_full_during_conversion(tmp_path, capsys, monkeypatch, cmd):
    import yxanul.checkpoint.convert as conv

    src = _ckpt(tmp_path / "in")
    if cmd == "dequantize":
        conv.quantize_checkpoint(src, tmp_path / "fp8")
        src = tmp_path / "fp8"
    monkeypatch.setattr(conv, "_tensor_bytes", _enospc)
    out = tmp_path / "out"
    assert main([cmd, str(src), str(out)]) == 2
    err = _err_line(capsys)
    assert str(out) in err and "No space left on device (ENOSPC)" in err and ".tmp" not in err
    assert not out.exists() and not _siblings(out)


def test_disk_full_during_data_prepare_and_export(tmp_path, capsys, monkeypatch):
    import yxanul.checkpoint.export as exp
    import yxanul.data.prepare as prep
    from test_export import make_run

    (tmp_path / "a.txt").write_text("hello\n" * 100)
    monkeypatch.setattr(prep._ShardWriter, "write", _enospc)
    out = tmp_path / "data"
    assert main(["data", "prepare", str(tmp_path / "a.txt"), "--out", str(out), "--no-progress"]) == 2
    assert "ENOSPC" in _err_line(capsys) and not out.exists() and not _siblings(out)

    run, _ = make_run(tmp_path)
    monkeypatch.setattr(exp, "_write_weights", _enospc)
    out = tmp_path / "hf"
    assert main(["export", str(run), "--out", str(out)]) == 2
    assert "ENOSPC" in _err_line(capsys) and not out.exists() and not _siblings(out)


def test_failed_checkpoint_write_is_one_line(tmp_path, monkeypatch, tiny_cfg):
    import yxanul.checkpoint.training as tr
    from yxanul.model import Yxanul

    def torch_save_fails(*a, **k):   # what torch.save raises when the disk fills up mid-write
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(tr.torch, "save", torch_save_fails)
    model = Yxanul(dataclasses.replace(tiny_cfg, n_layers=1))
    with pytest.raises(YxanulError) as e:
        tr.save_checkpoint(tmp_path / "run", 5, model, {"step": 5}, {"model_config": tiny_cfg})
    assert "cannot write" in str(e.value) and "step_00000005" in str(e.value)
    assert not (tmp_path / "run" / "checkpoints" / "step_00000005").exists()
    assert not _siblings(tmp_path / "run" / "checkpoints" / "step_00000005")


def test_read_only_errors_name_the_path(tmp_path):
    def erofs(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "o" / "x"))

    with pytest.raises(YxanulError) as e:
        with atomic_dir(tmp_path / "out", command="test") as tmp:
            erofs(tmp)
    assert "Read-only file system (EROFS)" in str(e.value) and not (tmp_path / "out").exists()
    with pytest.raises(YxanulError) as e:
        with atomic_path(tmp_path / "f.json") as tmp:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp))
    assert str(e.value).startswith(str(tmp_path / "f.json")) and "EACCES" in str(e.value)
    assert not _siblings(tmp_path / "f.json")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tmp_path, capsys):
    src = _ckpt(tmp_path / "in")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["quantize", str(src), str(ro / "q")]) == 2
        assert "Permission denied" in _err_line(capsys)
    finally:
        ro.chmod(0o700)


# ---------------------------------------------------------------------------------------------------------------
# consistency
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_weight_files_get_the_permissions_of_the_json_beside_them(tmp_path, umask):
    from yxanul.checkpoint.convert import quantize_checkpoint

    src = _ckpt(tmp_path / "in")
    (src / "config.json").write_text("{}")
    old = os.umask(umask)
    try:
        quantize_checkpoint(src, tmp_path / "q")
        with atomic_path(tmp_path / "single.safetensors") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    mode = 0o666 & ~umask
    q = tmp_path / "q"
    assert (q / "model.safetensors").stat().st_mode & 0o777 == mode
    assert (q / "config.json").stat().st_mode & 0o777 == mode
    assert (tmp_path / "single.safetensors").stat().st_mode & 0o777 == mode


def test_dequantize_says_what_it_measured(tmp_path, capsys):
    src = _ckpt(tmp_path / "in")
    assert main(["quantize", str(src), str(tmp_path / "q")]) == 0
    assert "original vs FP8 round trip" in capsys.readouterr().out
    for dtype in ("bf16", "fp32"):
        assert main(["dequantize", str(tmp_path / "q"), str(tmp_path / f"d{dtype}"), "--dtype", dtype]) == 0
        out = capsys.readouterr().out
        assert "original weights are not available" in out and "SQNR exact" not in out


def test_plot_never_writes_over_its_input_or_a_folder(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    metrics = "".join(json.dumps({"step": s, "loss": 3.0 - s / 10}) + "\n" for s in range(1, 6))
    (run / "metrics.jsonl").write_text(metrics)
    for out in (run / "metrics.jsonl", run):
        assert main(["plot", str(run), "--out", str(out)]) == 2
        assert "Traceback" not in _err_line(capsys)
    assert (run / "metrics.jsonl").read_text() == metrics
    assert main(["plot", str(run), "--out", str(run / "loss.png")]) == 0


def test_file_outputs_refuse_an_existing_file_without_overwrite(tmp_path, capsys):
    """plot --out, analyze --plot and bench throughput --json-out/--plot: an existing file is the user's until
    --overwrite says otherwise (bench refuses before anything is benchmarked)."""
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0 - s / 10}) + "\n" for s in (1, 2)))
    src = _ckpt(tmp_path / "in")
    for args, fig in ((["plot", str(run), "--out"], tmp_path / "loss.png"),
                      (["analyze", str(src), "--plot"], tmp_path / "dist.png")):
        fig.write_bytes(b"the user's figure")
        assert main(args + [str(fig)]) == 2
        assert "--overwrite" in _err_line(capsys) and fig.read_bytes() == b"the user's figure"
        assert main(args + [str(fig), "--overwrite"]) == 0
        assert fig.read_bytes()[:4] == b"\x89PNG"

    capsys.readouterr()
    for flag, name in (("--json-out", "bt.json"), ("--plot", "bt.png")):
        f = tmp_path / name
        f.write_text("measured on another machine")
        t0 = time.perf_counter()
        assert main(["bench", "throughput", flag, str(f), "--device", "cpu", "--model", "tiny", "--modes", "bf16",
                     "--steps", "1", "--warmup", "0", "--no-compile", "--batch", "1", "--seq", "16"]) == 2
        err = _err_line(capsys)
        assert flag in err and "--overwrite" in err and time.perf_counter() - t0 < 5
        assert f.read_text() == "measured on another machine"


def test_train_never_replaces_a_users_config_yaml(tmp_path, capsys, micro_model):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "config.yaml").write_text("steps: 1\nbatch_size: 2\nseq_len: 32\n")
    argv = ["train", "--train-config", str(exp / "config.yaml"), "--out", str(exp), "--model", micro_model,
            "--no-progress", "--precision", "fp32", "--eval-every", "0", "--checkpoint-every", "0"]
    assert main(argv) == 2
    assert "config.yaml that no yxanul run wrote" in _err_line(capsys)
    assert (exp / "config.yaml").read_text() == "steps: 1\nbatch_size: 2\nseq_len: 32\n"
    assert sorted(p.name for p in exp.iterdir()) == ["config.yaml"]


def test_train_refuses_a_users_non_empty_folder_and_starts_in_an_empty_one(tmp_path, capsys, micro_model):
    """--out naming the user's own folder (files no run writes) is refused before anything is written there: a run
    would mix its records in, and --restart would delete a metrics.jsonl of the user's."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.txt").write_text("mine")
    (docs / "metrics.jsonl").write_text('{"mine": 1}\n')
    argv = ["train", "--model", micro_model, "--steps", "1", "--batch-size", "2", "--seq-len", "32", "--no-progress",
            "--precision", "fp32", "--eval-every", "0", "--checkpoint-every", "0"]
    for extra in ([], ["--restart"]):
        assert main(argv + ["--out", str(docs)] + extra) == 2
        err = _err_line(capsys)
        assert "not empty" in err and "notes.txt" in err and str(docs) in err
        assert sorted(p.name for p in docs.iterdir()) == ["metrics.jsonl", "notes.txt"]
        assert (docs / "metrics.jsonl").read_text() == '{"mine": 1}\n'
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".config.yaml.999999999-0123abcd.tmp").write_text("a killed run's temporary")  # ours: no refusal
    assert main(argv + ["--out", str(empty)]) == 0
    assert {"config.yaml", "metrics.jsonl"} <= {p.name for p in empty.iterdir()}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_and_consolidate_files_get_ordinary_permissions(tmp_path, umask):
    """safetensors writes its files 0600; outputs get 0666 less the umask, like the JSON beside them."""
    from test_export import make_run

    run, _ = make_run(tmp_path)
    old = os.umask(umask)
    try:
        assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
        assert main(["checkpoint", "consolidate", str(run), "--out", str(tmp_path / "w.safetensors")]) == 0
    finally:
        os.umask(old)
    for p in [*(tmp_path / "hf").iterdir(), tmp_path / "w.safetensors"]:
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p


def test_export_fp8_keeps_its_intermediate_inside_the_outputs_temporary(tmp_path, monkeypatch):
    """A killed `export --fp8` leaves nothing beside OUT that the next export would not remove."""
    import yxanul.checkpoint.convert as conv
    from test_export import make_run

    run, _ = make_run(tmp_path)
    beside = []
    real = conv.quantize_checkpoint

    def spy(src, dst, **kw):
        beside.append(sorted(p.name for p in tmp_path.iterdir()))
        return real(src, dst, **kw)

    monkeypatch.setattr(conv, "quantize_checkpoint", spy)
    assert main(["export", str(run), "--out", str(tmp_path / "hf8"), "--fp8"]) == 0
    assert beside and all(n == "run" or n.startswith(".hf8.") for n in beside[0]), beside
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf8", "run"]


def test_vocab_size_beyond_uint32_token_ids_is_refused(tmp_path, capsys):
    p = tmp_path / "m.yaml"
    p.write_text("preset: tiny\nvocab_size: 1000000000000\n")
    assert main(["policy", "--model", str(p)]) == 2
    assert "vocab_size" in _err_line(capsys)


def test_a_folder_that_appears_while_writing_is_not_replaced(tmp_path):
    """The check runs again at the swap: a folder created at OUT while the command ran is left alone."""
    from yxanul.io import atomic_dir

    out = tmp_path / "out"
    with pytest.raises(YxanulError, match="exists"):
        with atomic_dir(out, command="data prepare") as tmp:
            (tmp / "shard.bin").write_bytes(b"x")
            out.mkdir()
            (out / "precious.txt").write_text("keep")
    assert (out / "precious.txt").read_text() == "keep" and not _siblings(out)


def test_first_line_of_an_exception():
    from yxanul.errors import MAX_USER_CHARS, first_line
    assert first_line(RuntimeError()) == "RuntimeError"  # no message: its type, not an IndexError
    assert first_line(ValueError("  first\nsecond")) == "first"
    assert len(first_line(OSError("x" * 5000))) <= MAX_USER_CHARS + 3
    assert "\x1b" not in first_line(OSError("\x1b[31mred"))
