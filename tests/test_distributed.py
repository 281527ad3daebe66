"""Multi-process tests on CPU with the Gloo backend (2 ranks launched by torchrun).

This file doubles as the worker: ``torchrun ... tests/test_distributed.py SCENARIO OUT_DIR`` runs one scenario on
every rank; each rank writes ``OUT_DIR/rank{R}.json`` and the test asserts on those.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2, timeout: int = 150, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    for attempt in range(3):  # a free port can be taken by someone else before torchrun binds it: retry
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), *args]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT)
        if r.returncode == 0 or "address already in use" not in (r.stdout + r.stderr).lower():
            return r
    return r


def run_worker(scenario: str, out: Path, *extra: str, nproc: int = 2) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    r = torchrun([__file__, scenario, str(out), *extra], nproc=nproc)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(nproc)]


def yxanul(*args: str, cwd=None, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "yxanul", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT)


# ---------------------------------------------------------------------------------------------------------
# worker scenarios (run under torchrun)
# ---------------------------------------------------------------------------------------------------------
def _tiny_model(seed: int = 0):
    from yxanul.config import load_model_config
    from yxanul.model import Yxanul

    torch.manual_seed(seed)
    return Yxanul(load_model_config("tiny", {"n_layers": 2}))


def _batch(seed: int, B: int = 2, T: int = 32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (B, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def scenario_amax(info, out: Path) -> dict:
    """Delayed-scaling FP8 under DDP: ranks see different data; after sync_fp8_amax + fp8_step the scales agree.
    The second step runs the MLPs through the fused-producer function (its scales are fixed by then), which
    records its amaxes inside the function."""
    from yxanul.distributed import sync_fp8_amax, wrap_model
    from yxanul.fp8.linear import convert_model, fp8_modules, fp8_step
    from yxanul.precision import load_policy

    model = _tiny_model()
    policy = load_policy().with_fp8(True).with_recipe(name="delayed", calibration_steps=0, amax_history_len=4) \
        .with_fp8_options(fused_producers=True)
    convert_model(model, policy, backend="emulated", quiet=True)
    ddp = wrap_model(model, "ddp", precision="fp8")
    res = {"fused_mlps": sum(getattr(m, "fp8_mlp", None) is not None for m in model.modules())}
    for step in range(2):
        x, y = _batch(100 * step + info.rank)
        x = x * (1 + info.rank)  # different token ids; the activations differ per rank
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = ddp(x.clamp_max(255), y)
        loss.backward()
        before = {n: m.amax_history[0].clone() for n, m in fp8_modules(model).items()}
        n_synced = sync_fp8_amax(ddp)
        fp8_step(model)
        res[f"step{step}"] = {
            "synced": n_synced,
            "local_row0": {n: v.tolist() for n, v in before.items()},
            "scale_inv": {n: m.scale_inv.tolist() for n, m in fp8_modules(model).items()},
            "history": {n: m.amax_history.tolist() for n, m in fp8_modules(model).items()},
        }
        ddp.zero_grad(set_to_none=True)
    return res


def scenario_nosync(info, out: Path) -> dict:
    """Without sync_fp8_amax the ranks' delayed scales differ (shows the test above can fail)."""
    from yxanul.distributed import wrap_model
    from yxanul.fp8.linear import convert_model, fp8_modules, fp8_step
    from yxanul.precision import load_policy

    model = _tiny_model()
    policy = load_policy().with_fp8(True).with_recipe(name="delayed", calibration_steps=0, amax_history_len=4)
    convert_model(model, policy, backend="emulated", quiet=True)
    ddp = wrap_model(model, "ddp", precision="fp8")
    x, y = _batch(info.rank)
    x = (x * (1 + info.rank)).clamp_max(255)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ddp(x, y).backward()
    fp8_step(model)
    return {"scale_inv": {n: m.scale_inv.tolist() for n, m in fp8_modules(model).items()}}


def scenario_fsdp_dcp(info, out: Path) -> dict:
    """FSDP2 train 2 steps, DCP checkpoint, 2 more steps; a fresh FSDP2 model loads the checkpoint and repeats
    the last 2 steps identically; also save for consolidation tests."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from yxanul.checkpoint.sharded import load_dcp_checkpoint, save_dcp_checkpoint
    from yxanul.distributed import wrap_model

    def build():
        m = _tiny_model()
        w = wrap_model(m, "fsdp2", precision="fp32")
        opt = torch.optim.AdamW(w.parameters(), lr=1e-2)
        return w, opt

    def steps(w, opt, start, n):
        losses = []
        for s in range(start, start + n):
            x, y = _batch(1000 * s + info.rank)
            loss = w(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t = loss.detach().clone()
            dist.all_reduce(t)
            losses.append(float(t) / info.world_size)
        return losses

    w, opt = build()
    sharded = all(isinstance(p, DTensor) for p in w.parameters())
    local_numel = sum(p.to_local().numel() for p in w.parameters())
    first = steps(w, opt, 0, 2)
    run_dir = out / "run"
    meta = {"model_config": _model_cfg_dict(), "tokenizer": {"kind": "bytes"},
            "train_config": {"batch_size": 2, "grad_accum": 1}}
    ck = save_dcp_checkpoint(run_dir, 2, w, opt, {"step": 2, "note": torch.tensor([7])}, meta)
    after = steps(w, opt, 2, 2)
    w2, opt2 = build()
    st = load_dcp_checkpoint(ck, w2, opt2)
    resumed = steps(w2, opt2, 2, 2)
    full = {n: p.full_tensor().sum().item() for n, p in w.named_parameters()}
    return {"sharded": sharded, "local_numel": local_numel, "first": first, "after": after, "resumed": resumed,
            "state_step": int(st["step"]), "note": st["note"].tolist(), "has_rng": "rng" in st,
            "ckpt": str(ck), "param_sums_after": full}


def _model_cfg_dict() -> dict:
    import dataclasses

    from yxanul.config import load_model_config
    return dataclasses.asdict(load_model_config("tiny", {"n_layers": 2}))


def scenario_precision(info, out: Path) -> dict:
    """precision auto with ranks whose CPU probes disagree (rank 0 fast BF16, rank 1 slow): both take rank 0's."""
    from yxanul import train as tr

    tr.cpu_bf16_speed = lambda: (200.0, 100.0) if info.rank == 0 else (1.0, 100.0)
    cfg = tr.load_train_config(None, {"out": str(out / "run"), "steps": 1, "model": "tiny", "device": "cpu"})
    t = tr.Trainer(cfg, rank=info.rank, world_size=info.world_size, log=lambda *a, **k: None)
    return {"precision": t.cfg.precision, "own": tr.resolve_precision(torch.device("cpu"))[0]}


def scenario_run_folder(info, out: Path) -> dict:
    """Rank 0 names and checks the run folder for every rank: the default folder (a timestamp, which the ranks
    would read at different moments) is rank 0's, and a folder rank 0 refuses is refused on every rank (rank 1
    used to go on and wait for rank 0 in its first collective)."""
    import time
    from types import SimpleNamespace

    from yxanul import train as tr
    from yxanul.errors import YxanulError

    tr.time = SimpleNamespace(strftime=lambda fmt, *a: f"stamp-rank{info.rank}", perf_counter=time.perf_counter)
    base = {"steps": 1, "model": "tiny", "device": "cpu", "precision": "fp32"}
    t = tr.Trainer(tr.load_train_config(None, base), rank=info.rank, world_size=info.world_size,
                   log=lambda *a, **k: None)
    foreign = out / "foreign"
    if info.rank == 0:
        foreign.mkdir()
        (foreign / "notes.txt").write_text("mine")
    torch.distributed.barrier()
    try:
        tr.Trainer(tr.load_train_config(None, {**base, "out": str(foreign)}), rank=info.rank,
                   world_size=info.world_size, log=lambda *a, **k: None)
        refused = None
    except YxanulError as e:
        refused = str(e)
    return {"default_dir": str(t.run_dir), "refused": refused}


SCENARIOS = {"amax": scenario_amax, "nosync": scenario_nosync, "fsdp_dcp": scenario_fsdp_dcp,
             "precision": scenario_precision, "run_folder": scenario_run_folder}


def _worker_main(argv: list[str]) -> None:
    from yxanul.distributed import destroy_distributed, init_distributed

    torch.set_num_threads(1)
    scenario, out = argv[0], Path(argv[1])
    info = init_distributed("cpu")
    try:
        res = SCENARIOS[scenario](info, out)
        (out / f"rank{info.rank}.json").write_text(json.dumps(res))
    finally:
        destroy_distributed()


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
    # gloo's background threads can abort the interpreter's own teardown ("terminate called without an active
    # exception") after all work is done and written; leave without it, as the CLI does
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------
def test_delayed_amax_sync_makes_ranks_agree(tmp_path):
    r0, r1 = run_worker("amax", tmp_path)
    assert r0["fused_mlps"] == r1["fused_mlps"] > 0
    for step in ("step0", "step1"):
        a, b = r0[step], r1[step]
        assert a["synced"] == b["synced"] > 0
        assert a["scale_inv"] == b["scale_inv"]
        assert a["history"] == b["history"]
        # the synced history row is the elementwise max of the ranks' own observations
        name = next(iter(a["local_row0"]))
        hist_row = a["history"][name][1]  # rolled by fp8_step: the synced row is now row 1
        want = [max(u, v) for u, v in zip(a["local_row0"][name], b["local_row0"][name])]
        assert hist_row == pytest.approx(want)
    # the ranks really observed different activations (else the test proves nothing)
    differs = any(r0["step0"]["local_row0"][n] != r1["step0"]["local_row0"][n] for n in r0["step0"]["local_row0"])
    assert differs


def test_precision_auto_is_rank_zeros_choice(tmp_path):
    r0, r1 = run_worker("precision", tmp_path)
    assert (r0["own"], r1["own"]) == ("bf16", "fp32")  # the probes really disagreed
    assert r0["precision"] == r1["precision"] == "bf16"


def test_run_folder_is_rank_zeros_choice_and_refusal(tmp_path):
    r0, r1 = run_worker("run_folder", tmp_path)
    assert r0["default_dir"] == r1["default_dir"] == str(Path("runs") / "stamp-rank0")
    assert r0["refused"] == r1["refused"] and "notes.txt" in r0["refused"]


def test_without_sync_delayed_scales_diverge(tmp_path):
    r0, r1 = run_worker("nosync", tmp_path)
    assert r0["scale_inv"] != r1["scale_inv"]


def test_fsdp2_dcp_checkpoint_resume_and_consolidate(tmp_path):
    r0, r1 = run_worker("fsdp_dcp", tmp_path)
    assert r0["sharded"] and r1["sharded"]
    model = _tiny_model()
    total = sum(p.numel() for p in model.parameters())
    assert r0["local_numel"] + r1["local_numel"] == total  # each rank holds half of every parameter
    assert r0["first"] == r1["first"] and r0["after"] == r1["after"]
    assert r0["resumed"] == pytest.approx(r0["after"], rel=1e-6, abs=1e-6)
    assert r0["state_step"] == 2 and r0["note"] == [7] and r0["has_rng"]
    ck = Path(r0["ckpt"])
    assert (ck / "dcp" / ".metadata").is_file() and (ck / "meta.json").is_file() and (ck / "state.pt").is_file()
    assert json.loads((ck / "meta.json").read_text())["world_size"] == 2
    # every rank's shard is recorded with its size and SHA-256 (hashed by the rank that wrote it)
    import hashlib
    files = json.loads((ck / "meta.json").read_text())["files"]
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "state.pt"} <= set(files)
    for name, rec in files.items():
        data = (ck / name).read_bytes()
        assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == ck.name
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]

    # consolidate (in this single process, no process group) and compare with the DCP contents
    from safetensors import safe_open

    from yxanul.checkpoint.export import load_checkpoint_weights
    from yxanul.checkpoint.sharded import consolidate_checkpoint, read_dcp_model_state

    out = tmp_path / "merged.safetensors"
    rep = consolidate_checkpoint(tmp_path / "run", out)
    assert rep["format"] == "dcp" and rep["step"] == 2 and rep["params"] == total
    ref = read_dcp_model_state(ck / "dcp")
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        assert keys == {n for n, _ in model.named_parameters()}
        for k in keys:
            t = f.get_tensor(k)
            assert t.dtype == torch.float32
            assert torch.equal(t, ref[k].float())
        assert json.loads(f.metadata()["yxanul_model_config"])["n_layers"] == 2
    # the file loads into the model and differs from the fresh init (it holds the trained weights)
    sd = {k: v for k, v in ref.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("rope") or "cos" in k or "sin" in k for k in missing)
    assert not torch.equal(model.layers[0].attn.q_proj.weight, _tiny_model().layers[0].attn.q_proj.weight)
    # yxanul export's reader accepts the bare file with --model
    yaml_path = tmp_path / "tiny2.yaml"
    import yaml
    cfg = _model_cfg_dict()
    yaml_path.write_text(yaml.safe_dump(cfg))
    _, weights, _ = load_checkpoint_weights(out, model=str(yaml_path))
    assert set(weights) == keys
    # and the run folder itself (export and generate read the sharded checkpoint without a consolidated file)
    _, direct, _ = load_checkpoint_weights(tmp_path / "run")
    assert set(direct) == keys and all(torch.equal(direct[k], ref[k]) for k in keys)

    # overwrite protection, then CLI
    from yxanul.errors import YxanulError
    with pytest.raises(YxanulError, match="exists"):
        consolidate_checkpoint(tmp_path / "run", out)
    r = yxanul("checkpoint", "consolidate", str(ck), "--out", str(out), "--overwrite", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tensors"] == len(keys)
    r = yxanul("analyze", str(out), "--json")
    assert r.returncode == 0, r.stderr


def test_consolidate_errors(tmp_path):
    r = yxanul("checkpoint", "consolidate", str(tmp_path / "nope"), "--out", str(tmp_path / "x.safetensors"))
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "run").mkdir()
    r = yxanul("checkpoint", "consolidate", str(tmp_path / "run"), "--out", str(tmp_path / "x.safetensors"))
    assert r.returncode == 2 and "no checkpoint" in r.stderr
    r = yxanul("checkpoint", "consolidate", str(tmp_path / "run"), "--out", str(tmp_path / "x.bin"))
    assert r.returncode == 2 and ".safetensors" in r.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_init_distributed_env_errors(monkeypatch):
    from yxanul.distributed import init_distributed, read_torchrun_env, wrap_model
    from yxanul.errors import YxanulError

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(YxanulError, match="torchrun"):
        init_distributed("cpu")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(YxanulError, match="RANK"):
        read_torchrun_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(YxanulError, match="integer"):
        read_torchrun_env()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_PORT")
    with pytest.raises(YxanulError, match="MASTER_PORT"):
        read_torchrun_env()
    monkeypatch.setenv("MASTER_PORT", "1")
    if not torch.cuda.is_available():
        with pytest.raises(YxanulError, match="CUDA is not available"):
            init_distributed("cuda")
    with pytest.raises(YxanulError, match="not available|unknown"):
        init_distributed("cpu", backend="nccl" if not torch.distributed.is_nccl_available() else "bogus")
    with pytest.raises(YxanulError, match="torchrun"):
        wrap_model(_tiny_model(), "ddp")
    with pytest.raises(YxanulError, match="parallel mode"):
        wrap_model(_tiny_model(), "zero3")


def test_resume_world_size_rule():
    from yxanul.checkpoint.sharded import check_resume_world_size
    from yxanul.errors import YxanulError

    meta = {"world_size": 2, "train_config": {"batch_size": 4, "grad_accum": 1}}
    check_resume_world_size(meta, 2, 4, 1)
    check_resume_world_size(meta, 4, 2, 1)  # same global batch on more ranks
    check_resume_world_size(meta, 1, 4, 2)  # or with accumulation
    with pytest.raises(YxanulError, match="--batch-size 8"):
        check_resume_world_size(meta, 1, 4, 1)
    with pytest.raises(YxanulError, match="cannot be kept"):
        check_resume_world_size(meta, 3, 4, 1)
    check_resume_world_size(meta, 2, 8, 1)  # same ranks: a changed batch is the user's explicit choice


# ---------------------------------------------------------------------------------------------------------
# end to end: torchrun -m yxanul train --parallel ...
# ---------------------------------------------------------------------------------------------------------
TRAIN = ["--model", "tiny", "--seq-len", "64", "--log-every", "1", "--eval-every", "0", "--warmup", "2",
         "--lr", "3e-3", "--no-progress", "--device", "cpu"]


def losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def train_ddp_vs_single(tmp_path, precision: str):
    common = TRAIN + ["--steps", "20", "--precision", precision, "--checkpoint-every", "0"]
    single = yxanul("train", *common, "--batch-size", "4", "--grad-accum", "2", "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = torchrun(["-m", "yxanul", "train", *common, "--parallel", "ddp", "--batch-size", "2", "--grad-accum", "2",
                    "--out", str(tmp_path / "ddp")])
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-3000:]
    return losses(tmp_path / "one"), losses(tmp_path / "ddp"), ddp


def test_ddp_matches_single_process(tmp_path):
    """2 ranks x batch 2 x accum 2 (no_sync on the first micro-batch) == 1 process x batch 4 x accum 2."""
    one, two, ddp = train_ddp_vs_single(tmp_path, "fp32")
    assert sorted(one) == sorted(two) == list(range(1, 21))
    for s in one:
        assert two[s] == pytest.approx(one[s], rel=2e-4, abs=2e-4), (s, one[s], two[s])
    assert one[20] < one[1] - 0.3  # it trained
    # rank 0 alone logs; tokens/s and the token count are global
    recs = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 20 and recs[-1]["tokens_seen"] == 20 * 4 * 64 * 2
    cfg = (tmp_path / "ddp" / "config.yaml").read_text()
    assert "world_size: 2" in cfg and "parallel: ddp" in cfg
    assert ddp.stdout.count("run directory") == 1


def test_fsdp2_fp8_delayed_train_checkpoint_resume(tmp_path):
    run = tmp_path / "run"
    args = TRAIN + ["--steps", "6", "--batch-size", "2", "--grad-accum", "2", "--precision", "fp8",
                    "--fp8-recipe", "delayed", "--fp8-backend", "emulated", "--checkpoint-every", "3",
                    "--keep-last", "3"]
    r = torchrun(["-m", "yxanul", "train", *args, "--parallel", "fsdp2", "--out", str(run)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    full = losses(run)
    assert sorted(full) == list(range(1, 7)) and all(v is not None for v in full.values())
    ck3, ck6 = run / "checkpoints" / "step_00000003", run / "checkpoints" / "step_00000006"
    for ck in (ck3, ck6):
        assert (ck / "dcp" / ".metadata").is_file() and (ck / "state.pt").is_file()
        meta = json.loads((ck / "meta.json").read_text())
        assert meta["format"] == "dcp" and meta["world_size"] == 2 and meta["parallel"] == "fsdp2"
    # the amax histories were saved and are the synchronized ones
    from yxanul.checkpoint.sharded import read_dcp_model_state
    st = read_dcp_model_state(ck6 / "dcp")
    hist = [k for k in st if k.endswith("amax_history")]
    assert hist and any(float(st[k].abs().max()) > 0 for k in hist)

    # resume from step 3 on 2 ranks: steps 4-6 repeat exactly
    r = torchrun(["-m", "yxanul", "train", "--parallel", "fsdp2", "--no-progress", "--resume", str(ck3)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    resumed = losses(run)
    for s in (4, 5, 6):
        assert resumed[s] == pytest.approx(full[s], rel=1e-5, abs=1e-5), (s, full[s], resumed[s])

    # the sharded checkpoint resumes in one process too (DCP re-shards), same global batch: batch 4
    r = yxanul("train", "--resume", str(ck3), "--batch-size", "4", "--no-progress", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "--out" in r.stderr and "Traceback" not in r.stderr  # it goes on in `run`
    r = yxanul("train", "--resume", str(ck3), "--batch-size", "4", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    one = losses(run)
    for s in (4, 5, 6):
        assert one[s] == pytest.approx(full[s], rel=2e-2, abs=2e-2), (s, full[s], one[s])
    # ... but not with a different global batch
    r = yxanul("train", "--resume", str(ck3), "--no-progress")
    assert r.returncode == 2 and "--batch-size 4" in r.stderr and "Traceback" not in r.stderr

    # consolidate -> export reads it
    out = tmp_path / "w.safetensors"
    r = yxanul("checkpoint", "consolidate", str(run), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "left out" in r.stdout  # the FP8 buffers
    r = yxanul("export", str(out), "--model", "tiny", "--out", str(tmp_path / "hf"), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "hf" / "config.json").is_file()


def test_parallel_cli_errors(tmp_path):
    r = yxanul("train", *TRAIN, "--steps", "2", "--parallel", "ddp", "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "torchrun" in r.stderr and "Traceback" not in r.stderr
    r = torchrun(["-m", "yxanul", "train", *TRAIN, "--steps", "2", "--out", str(tmp_path / "b")])
    # each worker prints one error line and exits 2 (torchrun then reports the failed workers)
    assert r.returncode != 0 and "yxanul: error: parallel: launched with 2 processes" in r.stderr
    assert "exitcode  : 2" in r.stderr or "exit code 2" in r.stderr.lower() or "exitcode: 2" in r.stderr
    assert not (tmp_path / "a").exists()


def test_single_process_checkpoint_resumes_under_fsdp2(tmp_path):
    """A one-process checkpoint (model.safetensors + state.pt) continues on 2 FSDP2 ranks with the same global
    batch: weights and AdamW states are loaded in full and sharded; losses follow the uninterrupted run."""
    run = tmp_path / "run"
    r = yxanul("train", *TRAIN, "--steps", "5", "--batch-size", "4", "--precision", "fp32", "--checkpoint-every", "3",
               "--keep-last", "3", "--out", str(run))
    assert r.returncode == 0, r.stderr[-3000:]
    full = losses(run)
    ck3 = run / "checkpoints" / "step_00000003"
    assert (ck3 / "model.safetensors").is_file()
    r = torchrun(["-m", "yxanul", "train", "--parallel", "fsdp2", "--batch-size", "2", "--no-progress",
                  "--resume", str(ck3)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    resumed = losses(run)
    assert sorted(resumed) == [1, 2, 3, 4, 5]
    for s in (4, 5):
        assert resumed[s] == pytest.approx(full[s], rel=1e-4, abs=1e-4), (s, full[s], resumed[s])
    assert json.loads((run / "checkpoints" / "step_00000005" / "meta.json").read_text())["format"] == "dcp"
