"""Hostile checkpoints and generation inputs: hash records that are missing, HF folders whose index and shards
disagree, FP16 overflow on export, JSON past the parser's limits, meta.json fields of the wrong type, FP8
weights, underflowing temperatures and endless prompt files. Every refusal is one line, exit code 2, no output."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from yxanul.checkpoint.layout import sha256_of
from yxanul.cli import main
from yxanul.errors import YxanulError
from yxanul.config import load_model_config
from yxanul.generate import SamplingOptions, sample_next
from yxanul.model import Yxanul

from test_checkpoint_safety import base_run, ckpt_of, run  # noqa: F401 (fixtures: a tiny trained run)

STEP = "step_00000001"
HUGE_INT = "1" * 5000            # past Python's 4,300-digit limit for int(str): a ValueError, not JSONDecodeError
DEEP = "[" * 100_000 + "]" * 100_000  # a RecursionError in the parser


def make_ckpt(root: Path, edit=None) -> Path:
    """A run folder holding one step of the tiny preset (random weights), its meta.json hashes recorded; `edit`
    changes the state dict before it is written."""
    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    sd = {k: v.contiguous() for k, v in Yxanul(cfg).state_dict().items()}
    if edit is not None:
        edit(sd)
    step = root / "checkpoints" / STEP
    step.mkdir(parents=True)
    w = step / "model.safetensors"
    save_file(sd, str(w))
    meta = {"step": 1, "model_config": dataclasses.asdict(cfg), "train_config": {},
            "tokenizer": {"kind": "bytes", "path": None, "vocab_size": 257, "eot_id": 256},
            "files": {"model.safetensors": {"bytes": w.stat().st_size, "sha256": sha256_of(w)}}}
    (step / "meta.json").write_text(json.dumps(meta))
    (root / "checkpoints" / "latest").write_text(STEP + "\n")
    return root


@pytest.fixture
def tiny(tmp_path) -> Path:
    return make_ckpt(tmp_path / "run")


def edit_meta(step: Path, edit) -> None:
    meta = json.loads((step / "meta.json").read_text())
    edit(meta)
    (step / "meta.json").write_text(json.dumps(meta))


def refused(capsys, args, *needles) -> str:
    rc = main(list(map(str, args)))
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.splitlines() if ln.startswith("yxanul: error:")]
    assert rc == 2 and cap.out == "" and len(lines) == 1 and "Traceback" not in cap.err, (rc, cap.out, cap.err)
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def greedy(capsys, ckpt, *extra) -> str:
    assert main(["generate", str(ckpt), "--prompt", "Hello", "--max-new-tokens", "8", "--temperature", "0",
                 *map(str, extra)]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def flip_byte(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


# -- 1. a files table without a record for a file that is read ------------------------------------------------

@pytest.mark.parametrize("keep", [[], ["state.pt"]], ids=["empty", "no-weights-record"])
def test_unrecorded_weights_are_refused_by_generate_export_and_resume(run, tmp_path, capsys, keep):  # noqa: F811
    step = ckpt_of(run)
    flip_byte(step / "model.safetensors")   # damaged weights that a missing record would let through
    edit_meta(step, lambda m: m.update(files={k: m["files"][k] for k in keep}))
    refused(capsys, ["generate", run, "--prompt", "x", "--max-new-tokens", "2"], "meta.json", "model.safetensors")
    refused(capsys, ["export", run, "--out", tmp_path / "hf"], "meta.json", "model.safetensors")
    assert not (tmp_path / "hf").exists()
    refused(capsys, ["train", "--resume", run, "--no-progress", "--steps", "3"], "model.safetensors")


def test_unrecorded_training_state_is_refused_by_resume_only(run, tmp_path, capsys):  # noqa: F811
    step = ckpt_of(run)
    edit_meta(step, lambda m: m["files"].pop("state.pt"))
    n_before = len((run / "metrics.jsonl").read_text().splitlines())
    refused(capsys, ["train", "--resume", run, "--no-progress", "--steps", "3"], "meta.json", "state.pt")
    assert len((run / "metrics.jsonl").read_text().splitlines()) == n_before
    greedy(capsys, run)   # generate does not read state.pt


def test_meta_without_files_table_still_loads_with_a_notice(tiny, capsys):
    edit_meta(tiny / "checkpoints" / STEP, lambda m: m.pop("files"))
    assert main(["generate", str(tiny), "--prompt", "x", "--max-new-tokens", "2"]) == 0
    assert "loading it unverified" in capsys.readouterr().err


# -- 2. exported folders: the index decides which shards are read ---------------------------------------------

@pytest.fixture
def hf(tiny, tmp_path) -> Path:
    from yxanul.checkpoint.export import export_hf

    out = tmp_path / "hf"
    export_hf(tiny, out, max_shard_size=400_000)
    assert (out / "model.safetensors.index.json").is_file()
    return out


def test_stray_safetensors_beside_an_index_is_not_read(hf, capsys):
    want = greedy(capsys, hf)
    save_file({"model.norm.weight": torch.zeros(load_model_config("tiny").d_model)}, str(hf / "zz-stray.safetensors"))
    assert greedy(capsys, hf) == want


def test_index_and_shards_must_agree(hf, capsys):
    ip = hf / "model.safetensors.index.json"
    index = json.loads(ip.read_text())
    name = "model.norm.weight"
    del index["weight_map"][name]
    ip.write_text(json.dumps(index))
    refused(capsys, ["generate", hf, "--prompt", "x"], "not in weight_map", name)
    index = json.loads(ip.read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"][name] = next(s for s in shards if name not in load_file(str(hf / s)))  # the wrong shard
    ip.write_text(json.dumps(index))
    refused(capsys, ["generate", hf, "--prompt", "x"], "weight_map", name)


def test_duplicate_tensor_without_an_index_is_refused(tiny, tmp_path, capsys):
    from yxanul.checkpoint.export import export_hf

    out = tmp_path / "hf1"
    export_hf(tiny, out)
    assert not (out / "model.safetensors.index.json").exists()
    save_file({"model.norm.weight": torch.zeros(load_model_config("tiny").d_model)}, str(out / "zz.safetensors"))
    refused(capsys, ["generate", out, "--prompt", "x"], "model.norm.weight", "zz.safetensors")


# -- 3. FP16 export of weights past its range -----------------------------------------------------------------

def test_fp16_export_refuses_weights_past_its_range(tmp_path, capsys):
    def big(sd):
        sd["layers.1.mlp.up_proj.weight"][0, 0] = 1e5

    ck = make_ckpt(tmp_path / "run", big)
    refused(capsys, ["export", ck, "--out", tmp_path / "hf", "--dtype", "fp16"],
            "model.layers.1.mlp.up_proj.weight", "float16")
    assert not (tmp_path / "hf").exists()
    assert main(["export", str(ck), "--out", str(tmp_path / "hf"), "--dtype", "fp32"]) == 0


# -- 4. JSON past the parser's limits -------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [f'{{"step": {HUGE_INT}}}', DEEP], ids=["huge-int", "deep"])
def test_meta_json_past_parser_limits(tiny, tmp_path, capsys, bad):
    (tiny / "checkpoints" / STEP / "meta.json").write_text(bad)
    refused(capsys, ["generate", tiny, "--prompt", "x"], "meta.json")
    refused(capsys, ["export", tiny, "--out", tmp_path / "hf"], "meta.json")
    refused(capsys, ["train", "--resume", tiny, "--no-progress"], "meta.json")


@pytest.mark.parametrize("name", ["config.json", "yxanul_tokenizer.json"])
@pytest.mark.parametrize("bad", [f'{{"vocab_size": {HUGE_INT}}}', DEEP], ids=["huge-int", "deep"])
def test_hf_json_past_parser_limits(hf, capsys, name, bad):
    (hf / name).write_text(bad)
    refused(capsys, ["generate", hf, "--prompt", "x"], name)


# -- 5. meta.json fields of the wrong type --------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [("step", "x"), ("train_config", None), ("train_config", [1]),
                                       ("world_size", "two"), ("world_size", 0)])
def test_meta_field_types_on_resume(run, capsys, key, value):  # noqa: F811
    edit_meta(ckpt_of(run), lambda m: m.update({key: value}))
    refused(capsys, ["train", "--resume", run, "--no-progress", "--steps", "3"], "meta.json", key)


@pytest.mark.parametrize("value", ["many", 2.5, True, None])
def test_recorded_train_config_of_the_wrong_type_on_resume(run, capsys, value):  # noqa: F811
    """A recorded train_config field of the wrong type is named like a YAML's, not a TypeError in validation."""
    edit_meta(ckpt_of(run), lambda m: m["train_config"].update(steps=value))
    refused(capsys, ["train", "--resume", run, "--no-progress"], "meta.json", "train_config.steps")


@pytest.mark.parametrize("kind", ["tiktoken", "hf", "o200k"])
def test_tokenizer_path_of_the_wrong_type(tiny, tmp_path, capsys, kind):
    edit_meta(tiny / "checkpoints" / STEP, lambda m: m.update(tokenizer={"kind": kind, "path": ["a"]}))
    refused(capsys, ["generate", tiny, "--prompt", "x"], "meta.json", "tokenizer.path")
    refused(capsys, ["export", tiny, "--out", tmp_path / "hf"], "meta.json", "tokenizer.path")


def test_exported_tokenizer_spec_of_the_wrong_type(hf, capsys):
    (hf / "yxanul_tokenizer.json").write_text(json.dumps({"kind": "tiktoken", "path": ["a"]}))
    refused(capsys, ["generate", hf, "--prompt", "x"], "yxanul_tokenizer.json", "path")


# -- 6. FP8 tensors in a bare .safetensors --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_bare_fp8_safetensors(tmp_path, capsys, dtype):
    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    sd = {k: v.contiguous() for k, v in Yxanul(cfg).state_dict().items()}
    name = "layers.0.mlp.up_proj.weight"
    sd[name] = sd[name].to(dtype)
    f = tmp_path / "w.safetensors"
    save_file(sd, str(f))
    greedy(capsys, f, "--model", "tiny")
    assert main(["export", str(f), "--model", "tiny", "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    sd[name][0, 0] = float("nan")
    save_file(sd, str(f))
    refused(capsys, ["generate", f, "--model", "tiny", "--prompt", "x"], name, "NaN")
    refused(capsys, ["export", f, "--model", "tiny", "--out", tmp_path / "hf2"], name, "NaN")


def test_bare_safetensors_of_a_deeper_model_is_refused(tmp_path, capsys):
    """A bare file holding layers the named model does not have is another model's checkpoint: refused, not
    exported with those layers dropped; the FP8 layers' scaling state is still dropped quietly."""
    import dataclasses
    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    deeper = Yxanul(dataclasses.replace(cfg, n_layers=cfg.n_layers + 1))
    sd = {k: v.contiguous() for k, v in deeper.state_dict().items()}
    f = tmp_path / "w.safetensors"
    save_file(sd, str(f))
    refused(capsys, ["export", f, "--model", "tiny", "--out", tmp_path / "hf"], "does not have",
            f"layers.{cfg.n_layers}.")
    assert not (tmp_path / "hf").exists()
    sd = {k: v for k, v in sd.items() if not k.startswith(f"layers.{cfg.n_layers}.")}
    sd["layers.0.mlp.up_proj.amax_history"] = torch.zeros(16, 3)
    save_file(sd, str(f))
    assert main(["export", str(f), "--model", "tiny", "--out", str(tmp_path / "hf")]) == 0


# -- 7. temperatures below float32's range --------------------------------------------------------------------

@pytest.mark.parametrize("t", [1e-300, 5e-324, 1e-46, 1e-39])
def test_tiny_temperature_is_its_greedy_limit(tiny, capsys, t):
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.9]])
    for top_p in (1.0, 0.5):
        assert int(sample_next(logits, SamplingOptions(temperature=t, top_p=top_p), None)) == 1
    assert greedy(capsys, tiny, "--seed", "1", "--temperature", t) == greedy(capsys, tiny)


def test_ordinary_temperature_unchanged():
    logits = torch.randn(4, 257, generator=torch.Generator().manual_seed(0))
    for t in (0.8, 1.0, 1e-3):
        want = torch.multinomial(torch.softmax((logits - logits.amax(-1, keepdim=True)) / t, -1), 1,
                                 generator=torch.Generator().manual_seed(3)).squeeze(-1)
        got = sample_next(logits, SamplingOptions(temperature=t), torch.Generator().manual_seed(3))
        assert torch.equal(got, want)


# -- 8. prompt files that never end ---------------------------------------------------------------------------

def test_endless_or_huge_prompt_file_is_refused_without_reading_it_whole(tiny, tmp_path, capsys):
    from yxanul.commands.generate import MAX_PROMPT_BYTES

    if os.path.exists("/dev/zero"):
        refused(capsys, ["generate", tiny, "--prompt-file", "/dev/zero"], "/dev/zero", "--prompt-file", "MiB")
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(64 * MAX_PROMPT_BYTES)  # sparse
    refused(capsys, ["generate", tiny, "--prompt-file", big], "big.txt", "MiB")
    ok = tmp_path / "ok.txt"
    ok.write_text("Hello")
    assert main(["generate", str(tiny), "--prompt-file", str(ok), "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == greedy(capsys, tiny)


def test_a_sharded_checkpoint_file_without_a_record_is_refused(tmp_path):
    """The saver records every file of a DCP checkpoint's dcp/ folder: one without a record was added or had its
    record removed, and is refused before anything is read."""
    from yxanul.checkpoint.layout import verify_files
    ck = tmp_path / "step_00000002"
    (ck / "dcp").mkdir(parents=True)
    (ck / "dcp" / "__0_0.distcp").write_bytes(b"\0" * 64)
    (ck / "dcp" / ".metadata").write_bytes(b"x")
    files = {f"dcp/{n}": {"bytes": (ck / "dcp" / n).stat().st_size, "sha256": sha256_of(ck / "dcp" / n)}
             for n in ("__0_0.distcp", ".metadata")}
    verify_files(ck, {"files": files})  # every file recorded: fine
    for name in files:
        with pytest.raises(YxanulError, match="no size and SHA-256 record for " + name.replace(".", r"\.")):
            verify_files(ck, {"files": {k: v for k, v in files.items() if k != name}})


def _edit_weights(ckpt: Path, edit) -> None:
    from test_checkpoint_safety import rehash
    sd = load_file(str(ckpt / "model.safetensors"))
    edit(sd)
    save_file(sd, str(ckpt / "model.safetensors"))
    rehash(ckpt)


def _edit_state(ckpt: Path, edit) -> None:
    from test_checkpoint_safety import rehash
    st = torch.load(ckpt / "state.pt", weights_only=True)
    edit(st)
    torch.save(st, ckpt / "state.pt")
    rehash(ckpt)


def _norm(sd: dict) -> str:
    return next(k for k, v in sd.items() if v.dim() == 1)


@pytest.mark.parametrize("case", ["int-weight", "other-shape", "half-width-fp16"])
def test_weights_of_another_type_or_shape_are_named_on_resume_and_export(run, tmp_path, capsys, case):  # noqa: F811
    """A weight stored as integers (its bits would be read as numbers), of another shape, or of a narrower float
    type (the same bytes, twice the elements) is refused naming the tensor and what is wrong with it, not as NaN."""
    names = []

    def edit(sd):
        name = _norm(sd) if case != "int-weight" else next(k for k, v in sd.items() if v.dim() == 2 and "q_proj" in k)
        names.append(name)
        v = sd[name]
        sd[name] = (v.view(torch.int32) if case == "int-weight" else v[None] if case == "other-shape"
                    else v.view(torch.float16))
    _edit_weights(ckpt_of(run), edit)
    want = "int32" if case == "int-weight" else "shape"
    refused(capsys, ["train", "--resume", run, "--no-progress", "--steps", "3"], names[0], want)
    refused(capsys, ["checkpoint", "consolidate", run, "--out", tmp_path / "w.safetensors"], names[0], want)
    refused(capsys, ["export", run, "--out", tmp_path / "hf"], names[0], want)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "w.safetensors").exists()


@pytest.mark.parametrize("case", ["nan-moment", "negative-second-moment", "negative-step"])
def test_poisoned_optimizer_state_is_refused_on_resume(run, capsys, case):  # noqa: F811
    """Moments with NaN (which would turn the weights into NaN at the first step), a negative second moment or
    step count: one line naming the state and the key, before training continues; the run is left as it was."""
    def edit(st):
        s0 = st["optimizer"]["state"][0]
        if case == "nan-moment":
            s0["exp_avg"].view(-1)[0] = float("nan")
        elif case == "negative-second-moment":
            s0["exp_avg_sq"].fill_(-1.0)
        else:
            s0["step"] = torch.tensor(-10.0)
    _edit_state(ckpt_of(run), edit)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    key = {"nan-moment": "'exp_avg'", "negative-second-moment": "'exp_avg_sq'", "negative-step": "'step'"}[case]
    refused(capsys, ["train", "--resume", run, "--no-progress", "--steps", "3"], "state.pt", key)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_resume_takes_the_optimizer_settings_from_the_config_not_the_checkpoint(run, capsys):  # noqa: F811
    """Flags given on resume reach the optimizer (and a tampered param_groups entry never does): the next
    checkpoint's param_groups hold the resumed run's betas, eps and weight decay."""
    _edit_state(ckpt_of(run), lambda st: st["optimizer"]["param_groups"][0].update(betas=(2.0, 0.95)))
    assert main(["train", "--resume", str(run), "--no-progress", "--steps", "4", "--beta1", "0.5", "--eps",
                 "1e-5", "--weight-decay", "0.3", "--checkpoint-every", "4"]) == 0, capsys.readouterr().err
    groups = torch.load(run / "checkpoints" / "step_00000004" / "state.pt", weights_only=True)["optimizer"][
        "param_groups"]
    assert [tuple(g["betas"]) for g in groups] == [(0.5, 0.95)] * 2
    assert [g["eps"] for g in groups] == [1e-5] * 2 and [g["weight_decay"] for g in groups] == [0.3, 0.0]


def test_resume_from_another_folder_uses_the_run_s_own_files(tmp_path, monkeypatch, capsys):
    """A run started with relative --data, --config and --model records them as absolute paths, so it resumes
    from any folder with the same files (not the folder's own `data/` or `p.yaml`); the model is the checkpoint's
    own model_config: a model file edited since is refused naming the field, one that is gone is not needed."""
    import shutil

    from test_checkpoint_safety import MODEL
    from yxanul.data import bundled_dataset

    shutil.copytree(bundled_dataset("bytes", cache=tmp_path / "cache"), tmp_path / "data")
    (tmp_path / "m.yaml").write_text(MODEL)
    (tmp_path / "p.yaml").write_text("recipe: {name: tensorwise}\n")
    monkeypatch.chdir(tmp_path)
    small = ["--batch-size", "2", "--seq-len", "32", "--log-every", "1", "--eval-every", "0", "--no-progress",
             "--warmup", "1", "--precision", "fp32"]
    assert main(["train", "--out", "r", "--data", "data", "--config", "p.yaml", "--model", "m.yaml", "--steps", "2",
                 "--checkpoint-every", "2", *small]) == 0, capsys.readouterr().err
    tc = json.loads((tmp_path / "r" / "checkpoints" / "step_00000002" / "meta.json").read_text())["train_config"]
    assert (tc["data"], tc["policy"], tc["model"]) == tuple(str(tmp_path / n) for n in ("data", "p.yaml", "m.yaml"))
    sub = tmp_path / "sub"
    (sub / "data").mkdir(parents=True)   # a folder of the same name that is not prepared data
    (sub / "m.yaml").write_text(MODEL.replace("n_layers: 2", "n_layers: 3"))
    monkeypatch.chdir(sub)
    capsys.readouterr()
    assert main(["train", "--resume", "../r", "--steps", "3", "--checkpoint-every", "3", "--no-progress"]) == 0, \
        capsys.readouterr().err
    (tmp_path / "m.yaml").write_text(MODEL.replace("tiny", "tiny\nrope_theta: 5.0"))
    capsys.readouterr()
    refused(capsys, ["train", "--resume", "../r", "--steps", "4", "--no-progress"], "rope_theta", "model_config")
    (tmp_path / "m.yaml").unlink()
    assert main(["train", "--resume", "../r", "--steps", "4", "--checkpoint-every", "4", "--no-progress"]) == 0
    assert "is gone; resuming with the checkpoint's model_config" in capsys.readouterr().out


def test_resume_names_recorded_settings_this_version_does_not_know(run, capsys):  # noqa: F811
    """A checkpoint of another version may record train_config settings this one lacks: the resume goes on
    without them and says which (they were dropped without a word)."""
    edit_meta(ckpt_of(run), lambda m: m["train_config"].update(future_knob=3, other_knob="x"))
    assert main(["train", "--resume", str(run), "--steps", "3", "--no-progress"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "train_config has settings this version does not know, ignored: future_knob, other_knob" in out


def test_resume_refuses_a_policy_edited_since_the_checkpoint(tmp_path, monkeypatch, capsys):
    """The layers a run converts to FP8 come from its policy file: edited since the checkpoint, a resume is
    refused naming the file and the changed setting; `--config` with it resumes deliberately, and a checkpoint
    written before the record was kept resumes unchecked."""
    from test_checkpoint_safety import MODEL

    (tmp_path / "m.yaml").write_text(MODEL)
    pol = tmp_path / "p.yaml"
    pol.write_text("precision_strategy: {attention_compute: fp8_e4m3}\nrecipe: {name: tensorwise}\n")
    monkeypatch.chdir(tmp_path)
    small = ["--batch-size", "2", "--seq-len", "32", "--log-every", "1", "--eval-every", "0", "--no-progress",
             "--warmup", "1", "--precision", "fp32"]
    assert main(["train", "--out", "r", "--config", "p.yaml", "--model", "m.yaml", "--steps", "2",
                 "--checkpoint-every", "1", *small]) == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "r" / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert meta["policy"]["source"] == str(pol) and meta["policy"]["settings"]["recipe"] == {"name": "tensorwise"}
    assert main(["train", "--resume", "r", "--steps", "3", "--checkpoint-every", "3", "--no-progress"]) == 0
    pol.write_text("precision_strategy: {attention_compute: bfloat16}\nrecipe: {name: tensorwise}\n")
    capsys.readouterr()
    err = refused(capsys, ["train", "--resume", "r", "--steps", "4", "--no-progress"],
                  "precision_strategy.attention_compute", "p.yaml")
    assert "--config" in err
    assert not (tmp_path / "r" / "checkpoints" / "step_00000004").exists()
    assert main(["train", "--resume", "r", "--config", str(pol), "--steps", "4", "--checkpoint-every", "4",
                 "--no-progress"]) == 0, capsys.readouterr().err
    pol.write_text("precision_strategy: {attention_compute: fp8_e4m3}\nrecipe: {name: tensorwise}\n")
    edit_meta(tmp_path / "r" / "checkpoints" / "step_00000004", lambda m: m.pop("policy"))
    assert main(["train", "--resume", "r", "--steps", "5", "--checkpoint-every", "5", "--no-progress"]) == 0


@pytest.mark.parametrize("key,value", [("eot_id", 999999), ("eot_id", -1), ("eot_id", "256"),
                                       ("vocab_size", 1000000)])
def test_recorded_tokenizer_outside_the_model_s_vocabulary(tiny, tmp_path, capsys, key, value):
    """An end-of-text id or tokenizer vocabulary past the model's 257 tokens would become the exported config's
    bos/eos ids and generation's stop token: export and generate both refuse it, naming the key."""
    edit_meta(tiny / "checkpoints" / STEP, lambda m: m["tokenizer"].update({key: value}))
    refused(capsys, ["export", tiny, "--out", tmp_path / "hf"], f"tokenizer.{key}")
    refused(capsys, ["generate", tiny, "--prompt", "Hi", "--max-new-tokens", "2"], f"tokenizer.{key}")
    assert not (tmp_path / "hf").exists()


def test_resume_from_a_file_of_a_checkpoint_names_its_folder(run, capsys):  # noqa: F811
    """`--resume RUN/checkpoints/step_X/model.safetensors` (a file that exists) is not "not found": the message
    names the folder to give."""
    refused(capsys, ["train", "--resume", ckpt_of(run) / "model.safetensors", "--no-progress"],
            "is a file of a checkpoint; give its folder", str(ckpt_of(run)))
