"""Checkpoints that cannot run foreign code and that are refused when damaged: DCP metadata allow-list, recorded
file sizes and hashes, the ``latest`` pointer, non-finite weights, malformed ``state.pt``, ``--restart``."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from yxanul.checkpoint import layout
from yxanul.checkpoint.export import load_checkpoint_weights
from yxanul.checkpoint.sharded import (SafeLoadPlanner, consolidate_checkpoint, load_dcp_metadata,
                                       read_dcp_model_state)
from yxanul.checkpoint.training import load_checkpoint, resolve_checkpoint
from yxanul.cli import main
from yxanul.errors import YxanulError

MODEL = ("preset: tiny\nd_model: 64\nn_layers: 2\nn_heads: 2\nn_kv_heads: 1\nhead_dim: 32\nffn_hidden: 128\n"
         "max_seq_len: 128\n")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A finished 2-step single-process run with a checkpoint at step 2."""
    from yxanul.data import bundled_dataset

    root = tmp_path_factory.mktemp("base")
    (root / "micro.yaml").write_text(MODEL)
    data = bundled_dataset("bytes", cache=root / "cache")
    rc = main(["train", "--out", str(root / "run"), "--model", str(root / "micro.yaml"), "--data", str(data),
               "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--log-every", "1", "--eval-every", "0",
               "--checkpoint-every", "2", "--no-progress", "--warmup", "1", "--precision", "fp32"])
    assert rc == 0
    return root / "run"


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst


def ckpt_of(run: Path) -> Path:
    return run / "checkpoints" / "step_00000002"


def rehash(ckpt: Path) -> None:
    """Record the current files' sizes and hashes, as if the checkpoint had been written like this."""
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"] = {n: {"bytes": (ckpt / n).stat().st_size,
                         "sha256": hashlib.sha256((ckpt / n).read_bytes()).hexdigest()} for n in meta["files"]}
    (ckpt / "meta.json").write_text(json.dumps(meta))


def cli(capsys, *args) -> tuple[int, str]:
    rc = main(list(args))
    err = capsys.readouterr().err.strip()
    return rc, err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("yxanul: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant_dcp(run: Path, payload: bytes) -> Path:
    """Turn the run's checkpoint into a sharded one whose ``dcp/.metadata`` is `payload`."""
    ck = ckpt_of(run)
    (ck / "model.safetensors").unlink()
    (ck / "dcp").mkdir()
    (ck / "dcp" / ".metadata").write_bytes(payload)
    meta = json.loads((ck / "meta.json").read_text())
    meta.update(format="dcp", world_size=1)
    meta["files"].pop("model.safetensors")
    for p in sorted((ck / "dcp").iterdir()):  # recorded as the saver records them: only the payload is foreign
        meta["files"][f"dcp/{p.name}"] = {"bytes": p.stat().st_size,
                                          "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    (ck / "meta.json").write_text(json.dumps(meta))
    return ck


# -- no foreign code -----------------------------------------------------------------------------------------

def test_dcp_metadata_payload_is_not_run_by_consolidate(run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    plant_dcp(run, pickle.dumps(_Payload(marker)))
    rc, err = cli(capsys, "checkpoint", "consolidate", str(run), "--out", str(tmp_path / "w.safetensors"))
    assert not marker.exists()
    assert_one_line_error(rc, err, ".metadata", "posix.system")
    assert not (tmp_path / "w.safetensors").exists()


def test_dcp_metadata_payload_is_not_run_by_resume(run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    plant_dcp(run, pickle.dumps(_Payload(marker)))
    rc, err = cli(capsys, "train", "--resume", str(run), "--no-progress")
    assert not marker.exists()
    assert_one_line_error(rc, err, ".metadata")


def test_dcp_stored_values_load_without_unpickling_code(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    buf.seek(0)
    planner = SafeLoadPlanner()
    planner.flatten_state_dict = False
    planner.state_dict = {}
    with pytest.raises(YxanulError, match="optim.param_groups"):
        planner.load_bytes(SimpleNamespace(dest_index=SimpleNamespace(fqn="optim.param_groups")), buf)
    assert not marker.exists()
    ok = io.BytesIO()
    torch.save({"lr": 0.1, "betas": (0.9, 0.95)}, ok)
    ok.seek(0)
    planner.load_bytes(SimpleNamespace(dest_index=SimpleNamespace(fqn="x")), ok)
    assert planner.state_dict["x"] == {"lr": 0.1, "betas": (0.9, 0.95)}


def test_real_dcp_checkpoint_passes_the_allow_list(tmp_path):
    """What this torch's DCP writes (model and optimizer state, BF16 and FP32, non-tensor values) is admitted."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2).to(torch.bfloat16))
    opt = torch.optim.AdamW(m.parameters())
    m[1](m[0](torch.randn(2, 4)).bfloat16()).float().sum().backward()
    opt.step()
    msd, osd = get_state_dict(m, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    md = load_dcp_metadata(tmp_path / "dcp" / ".metadata")
    assert "model.0.weight" in md.state_dict_metadata
    got = read_dcp_model_state(tmp_path / "dcp")
    assert torch.equal(got["1.weight"], m[1].weight.detach()) and got["1.weight"].dtype == torch.bfloat16


def test_malformed_dcp_metadata_is_one_line_error(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(YxanulError, match="holds dict"):
        load_dcp_metadata(tmp_path / ".metadata")
    (tmp_path / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(YxanulError, match=r"\.metadata"):
        load_dcp_metadata(tmp_path / ".metadata")


# -- recorded sizes and hashes --------------------------------------------------------------------------------

def test_meta_records_size_and_sha256_of_every_file(run):
    ck = ckpt_of(run)
    files = json.loads((ck / "meta.json").read_text())["files"]
    assert set(files) == {"model.safetensors", "state.pt"}
    for name, rec in files.items():
        data = (ck / name).read_bytes()
        assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _flip_byte(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.safetensors", "state.pt"])
def test_flipped_byte_is_refused_by_resume(run, capsys, name):
    _flip_byte(ckpt_of(run) / name)
    rc, err = cli(capsys, "train", "--resume", str(run), "--no-progress")
    assert_one_line_error(rc, err, name, "SHA-256")


def test_damaged_weights_refused_by_export_generate_and_consolidate(run, tmp_path, capsys):
    _flip_byte(ckpt_of(run) / "model.safetensors")
    for load in (load_checkpoint_weights, load_checkpoint):
        with pytest.raises(YxanulError, match="model.safetensors: SHA-256"):
            load(run)
    with pytest.raises(YxanulError, match="model.safetensors: SHA-256"):
        consolidate_checkpoint(run, tmp_path / "w.safetensors")
    rc, err = cli(capsys, "generate", str(run), "--prompt", "a", "--max-new-tokens", "2")
    assert_one_line_error(rc, err, "model.safetensors", "SHA-256")
    rc, err = cli(capsys, "export", str(run), "--out", str(tmp_path / "hf"))
    assert_one_line_error(rc, err, "model.safetensors", "SHA-256")
    assert not (tmp_path / "hf").exists()


def test_weight_readers_do_not_hash_the_training_state(run, tmp_path, capsys, monkeypatch):
    """export, generate and consolidate read the weights only: state.pt is neither hashed nor needed by them."""
    hashed = []
    real = layout.sha256_of
    monkeypatch.setattr(layout, "sha256_of", lambda p: hashed.append(Path(p).name) or real(p))
    _flip_byte(ckpt_of(run) / "state.pt")
    load_checkpoint_weights(run)
    consolidate_checkpoint(run, tmp_path / "w.safetensors")
    assert hashed and "state.pt" not in hashed
    rc, err = cli(capsys, "train", "--resume", str(run), "--no-progress")
    assert_one_line_error(rc, err, "state.pt", "SHA-256")


def test_truncated_file_is_a_size_mismatch(run):
    p = ckpt_of(run) / "state.pt"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(YxanulError, match="state.pt: size"):
        layout.read_meta(ckpt_of(run))


def test_checkpoint_without_hashes_loads_with_one_notice(run, capsys):
    ck = ckpt_of(run)
    meta = json.loads((ck / "meta.json").read_text())
    del meta["files"]
    (ck / "meta.json").write_text(json.dumps(meta))
    for _ in range(3):
        load_checkpoint(run)
    assert capsys.readouterr().err.count("no recorded file hashes") == 1


# -- latest ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", ["ABS", "../../other/checkpoints/step_00000002", "step_00000002/../..",
                                     b"\xff\xfe\x00step", "DIR"])
def test_latest_must_name_a_folder_of_this_run(run, base_run, tmp_path, capsys, content):
    latest = run / "checkpoints" / "latest"
    if content == "ABS":
        latest.write_text(str(ckpt_of(base_run)) + "\n")
    elif content == "DIR":
        latest.unlink()
        latest.mkdir()
    elif isinstance(content, bytes):
        latest.write_bytes(content)
    else:
        latest.write_text(content + "\n")
    with pytest.raises(YxanulError, match="latest"):
        resolve_checkpoint(run)
    rc, err = cli(capsys, "train", "--resume", str(run), "--no-progress")
    assert_one_line_error(rc, err, "latest")


# -- weights and state.pt --------------------------------------------------------------------------------------

def test_nan_weights_are_refused(run, tmp_path, capsys):
    ck = ckpt_of(run)
    sd = load_file(str(ck / "model.safetensors"))
    name = next(k for k in sd if k.endswith("q_proj.weight"))
    sd[name][0, 0] = float("nan")
    save_file(sd, str(ck / "model.safetensors"), metadata={"format": "pt"})
    rehash(ck)
    with pytest.raises(YxanulError, match=f"{name} holds NaN"):
        load_checkpoint(run)
    with pytest.raises(YxanulError, match="NaN"):
        load_checkpoint_weights(run)
    rc, err = cli(capsys, "train", "--resume", str(run), "--no-progress")
    assert_one_line_error(rc, err, "NaN", "model.safetensors")
    rc, err = cli(capsys, "generate", str(run), "--prompt", "a", "--max-new-tokens", "2")
    assert_one_line_error(rc, err, "NaN")


def _edit_state(run: Path, edit) -> None:
    ck = ckpt_of(run)
    st = torch.load(ck / "state.pt", weights_only=True)
    edit(st)
    torch.save(st, ck / "state.pt")
    rehash(ck)


def _bad_moment_shape(st):
    k = next(iter(st["optimizer"]["state"]))
    st["optimizer"]["state"][k]["exp_avg"] = torch.zeros(3, 3)


@pytest.mark.parametrize("edit,needle", [
    (lambda st: st.pop("optimizer"), "optimizer"),
    (lambda st: st.update(optimizer=[1, 2]), "optimizer"),
    (lambda st: st.update(step="2"), "step"),
    (lambda st: st["rng"].update(torch=torch.zeros(10, dtype=torch.uint8)), "rng.torch"),
    (lambda st: st.update(rng=None), "rng"),
    (_bad_moment_shape, "exp_avg"),
    (lambda st: st["optimizer"]["param_groups"].pop(), "optimizer"),
])
def test_malformed_state_is_refused_before_training(run, capsys, edit, needle):
    _edit_state(run, edit)
    n_before = len((run / "metrics.jsonl").read_text().splitlines())
    rc, err = cli(capsys, "train", "--resume", str(run), "--no-progress", "--steps", "4")
    assert_one_line_error(rc, err, needle)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == n_before  # no step was taken


# -- a run stopped before its first checkpoint ----------------------------------------------------------------

def test_resume_drops_metrics_lines_that_are_not_records(run, capsys):
    """A torn or foreign line in metrics.jsonl does not block a resume: it is dropped, and said so."""
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'[1, 2]\n"text"\n\xff\xfe\n{"step": "x"}\n')
    assert main(["train", "--resume", str(run), "--no-progress", "--steps", "3"]) == 0
    assert "dropped 4 line(s) that are not training records" in capsys.readouterr().out
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(r, dict) for r in recs) and recs[-1]["step"] == 3


def test_run_without_checkpoint_can_be_restarted(run, capsys):
    shutil.rmtree(run / "checkpoints")
    import yaml
    train = yaml.safe_load((run / "config.yaml").read_text())["train"]
    args = ["train", "--out", str(run), "--model", train["model"], "--data", train["data"], "--steps", "1",
            "--batch-size", "2", "--seq-len", "32", "--eval-every", "0", "--no-progress", "--precision", "fp32",
            "--warmup", "1"]
    rc, err = cli(capsys, *args)
    assert_one_line_error(rc, err, "--restart")
    rc, err = cli(capsys, "train", "--resume", str(run), "--no-progress")
    assert_one_line_error(rc, err, "--restart")
    rc, err = cli(capsys, *args, "--restart")
    assert rc == 0, err
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1]  # the stopped run's records were replaced
    assert (ckpt_of(run).parent / "step_00000001").is_dir()


def test_restart_never_replaces_a_run_with_checkpoints(run, capsys):
    import yaml
    train = yaml.safe_load((run / "config.yaml").read_text())["train"]
    rc, err = cli(capsys, "train", "--out", str(run), "--model", train["model"], "--data", train["data"],
                  "--steps", "1", "--no-progress", "--restart")
    assert_one_line_error(rc, err, "--resume", "step_00000002")
    assert (ckpt_of(run) / "model.safetensors").is_file()


def test_sharded_checkpoint_records_and_verifies_every_file(tmp_path):
    """Single process (no process group): DCP shards, .metadata and state.pt are hashed as written; a flipped
    byte in a shard is refused before DCP reads it."""
    from yxanul.checkpoint.sharded import load_dcp_checkpoint, save_dcp_checkpoint

    torch.manual_seed(0)
    m = torch.nn.Linear(8, 4)
    ck = save_dcp_checkpoint(tmp_path / "run", 3, m, None, {"step": 3}, {"model_config": {}})
    files = json.loads((ck / "meta.json").read_text())["files"]
    assert {"dcp/.metadata", "state.pt"} <= set(files) and any(n.endswith(".distcp") for n in files)
    for name, rec in files.items():
        data = (ck / name).read_bytes()
        assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    fresh = torch.nn.Linear(8, 4)
    assert load_dcp_checkpoint(ck, fresh)["step"] == 3 and torch.equal(fresh.weight, m.weight)
    shard = next(ck / n for n in files if n.endswith(".distcp"))
    _flip_byte(shard, 20)
    with pytest.raises(YxanulError, match=r"\.distcp: SHA-256"):
        load_dcp_checkpoint(ck, torch.nn.Linear(8, 4))


def test_disk_full_while_checkpointing_is_one_line_and_leaves_nothing(base_run, tmp_path, capsys, monkeypatch):
    def full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(layout.HashingWriter, "write", full)
    import yaml
    train = yaml.safe_load((base_run / "config.yaml").read_text())["train"]
    out = tmp_path / "r"
    rc, err = cli(capsys, "train", "--out", str(out), "--model", train["model"], "--data", train["data"],
                  "--steps", "1", "--batch-size", "2", "--seq-len", "32", "--eval-every", "0", "--no-progress",
                  "--precision", "fp32", "--warmup", "1")
    assert_one_line_error(rc, err, "cannot write", "No space left on device")
    ckpt_root = out / "checkpoints"
    assert not ckpt_root.exists() or not any(ckpt_root.iterdir())  # no folder, no temporary, no `latest`


def test_dcp_metadata_cannot_change_an_allowed_class(tmp_path):
    """BUILD on an allowed class (not an instance) would set attributes on it for the whole process."""
    import pathlib

    from yxanul.checkpoint.sharded import load_dcp_metadata

    stat = pathlib.PosixPath.stat
    f = tmp_path / ".metadata"
    f.write_bytes(b"cpathlib\nPosixPath\n(N}S'stat'\ncbuiltins\nfrozenset\nstb0N.")
    with pytest.raises(YxanulError, match="sets the state"):
        load_dcp_metadata(f)
    assert pathlib.PosixPath.stat is stat


def test_dcp_shard_paths_must_stay_inside_the_checkpoint(tmp_path):
    import pickle

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex

    from yxanul.checkpoint.sharded import load_dcp_metadata

    for rel in ("../../outside/__0_0.distcp", "/abs/__0_0.distcp"):
        md = Metadata(state_dict_metadata={},
                      storage_data={MetadataIndex("w"): _StorageInfo(relative_path=rel, offset=0, length=1)})
        f = tmp_path / ".metadata"
        f.write_bytes(pickle.dumps(md))
        with pytest.raises(YxanulError, match="outside the checkpoint"):
            load_dcp_metadata(f)


def test_a_newer_complete_checkpoint_wins_over_a_stale_latest(tmp_path):
    """Killed after the step folder was renamed into place but before `latest` was rewritten: resuming must take
    the newer folder (the older one would be resumed, and the newer pruned at the next save)."""
    from yxanul.checkpoint.layout import latest_checkpoint

    root = tmp_path / "run" / "checkpoints"
    for step in (10, 20):
        d = root / f"step_{step:08d}"
        d.mkdir(parents=True)
        (d / "meta.json").write_text(json.dumps({"step": step}))
        (d / "model.safetensors").write_bytes(b"x")
    (root / "latest").write_text("step_00000010\n")
    assert latest_checkpoint(tmp_path / "run").name == "step_00000020"
    (root / "latest").write_text("step_00000020\n")
    assert latest_checkpoint(tmp_path / "run").name == "step_00000020"
    (root / "step_00000020" / "model.safetensors").unlink()  # incomplete: the older one
    assert latest_checkpoint(tmp_path / "run").name == "step_00000010"


def test_only_temporaries_of_dead_savers_are_removed(tmp_path):
    import os
    import subprocess
    import sys

    from yxanul.checkpoint.layout import remove_stale_temporaries

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    root = tmp_path / "checkpoints"
    dead = root / f".step_00000010.{p.pid}-0123abcd.tmp"
    live = root / f".step_00000020.{os.getpid()}-0123abcd.tmp"  # a save in progress
    for d in (dead, live):
        d.mkdir(parents=True)
    remove_stale_temporaries(root)
    assert not dead.exists() and live.exists()


def test_a_killed_sharded_save_leaves_a_temporary_the_next_save_removes(tmp_path):
    """The DCP save's temporary folder is named like every other writer's (with its process id), so
    remove_stale_temporaries tells a killed save's leftover from a save in progress."""
    import os
    import subprocess
    import sys

    from yxanul.checkpoint.layout import remove_stale_temporaries
    from yxanul.checkpoint.sharded import _make_tmp

    root = tmp_path / "checkpoints"
    tmp = Path(_make_tmp(root, root / "step_00000010"))
    assert tmp.is_dir() and f".{os.getpid()}-" in tmp.name
    remove_stale_temporaries(root)
    assert tmp.exists()  # this process is alive: a save in progress
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    dead = tmp.with_name(tmp.name.replace(f".{os.getpid()}-", f".{p.pid}-"))
    tmp.rename(dead)
    remove_stale_temporaries(root)
    assert not dead.exists()
