"""Training loop, checkpoints, exact resume, faults, loss scaling, plots (CPU, small shapes)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from yxanul.cli import main
from yxanul.train import DynamicLossScaler, TrainConfig, lr_at

PY = sys.executable


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    from yxanul.data import bundled_dataset
    return str(bundled_dataset("bytes", cache=tmp_path_factory.mktemp("cache")))


def _args(out, model, data, steps=8, **extra):
    a = ["train", "--out", str(out), "--model", model, "--data", data, "--steps", str(steps), "--batch-size", "4",
         "--seq-len", "32", "--log-every", "1", "--eval-every", "0", "--checkpoint-every", "0", "--no-progress",
         "--warmup", "2", "--lr", "3e-3", "--precision", "bf16"]  # explicit: `auto` may pick fp32 on this CPU,
    # whose MKL FP32 GEMMs are not bit-reproducible across processes (the resume tests compare bit for bit)
    for k, v in extra.items():
        a += [f"--{k.replace('_', '-')}", str(v)]
    return a


def _metrics(run) -> list[dict]:
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def _losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _metrics(run) if "loss" in r}


def test_default_tiny_run_loss_falls_and_writes_outputs(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--out", str(out), "--data", data_dir, "--steps", "16", "--batch-size", "8", "--seq-len",
               "64", "--log-every", "4", "--eval-every", "8", "--eval-batches", "2", "--checkpoint-every", "8",
               "--warmup", "4", "--no-progress"])
    assert rc == 0
    assert f"run directory: {out}" in capsys.readouterr().out
    recs = [r for r in _metrics(out) if "loss" in r]
    assert recs[0]["loss_avg"] > 4.0 and recs[-1]["loss"] < recs[0]["loss_avg"] - 1.0  # from ln(257) = 5.5
    for k in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "skipped_steps", "memory_bytes"):
        assert k in recs[-1]
    assert recs[-1]["mfu"] is None  # no peak-FLOPs entry on CPU
    assert any(r.get("val_loss") for r in _metrics(out))
    import yaml
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    from yxanul.train import resolve_precision
    assert cfg["train"]["steps"] == 16 and cfg["model"]["vocab_size"] == 257
    assert cfg["train"]["precision"] == resolve_precision(torch.device("cpu"))[0]  # auto, resolved and recorded
    ck = out / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000016"
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == ["step_00000008", "step_00000016"]
    from yxanul.checkpoint.training import load_checkpoint, load_training_state
    mcfg, sd, meta = load_checkpoint(out)
    assert meta["step"] == 16 and meta["tokenizer"]["kind"] == "bytes" and mcfg.vocab_size == 257
    assert meta["tokens_seen"] == 16 * 8 * 64
    assert all(t.dtype == torch.float32 for t in sd.values())
    st = load_training_state(out)
    assert st["step"] == 16 and "optimizer" in st
    # the plot command draws both curves
    png = tmp_path / "loss.png"
    assert main(["plot", str(out), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sigkill_and_resume_is_bit_identical(tmp_path, micro_model, data_dir):
    steps = 30
    ref = tmp_path / "ref"
    assert main(_args(ref, micro_model, data_dir, steps=steps, checkpoint_every=4)) == 0
    ref_losses = _losses(ref)
    assert len(ref_losses) == steps

    run = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([PY, "-m", "yxanul", *_args(run, micro_model, data_dir, steps=steps,
                                                        checkpoint_every=4)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        m = run / "metrics.jsonl"
        if m.exists():
            lines = [x for x in m.read_text().splitlines() if x.strip()]
            if len(lines) >= 10:  # past the step-8 checkpoint, mid-way to the next one
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = len(lines)
                break
        time.sleep(0.05)
    proc.wait()
    assert killed_at is not None, "the run finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    assert main(["train", "--resume", "--out", str(run), "--no-progress"]) == 0
    got = _losses(run)
    assert sorted(got) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        assert got[s] == ref_losses[s], f"step {s}: {got[s]!r} != {ref_losses[s]!r}"


def test_nan_injection_skips_counts_and_stops(tmp_path, micro_model, data_dir, capsys):
    run = tmp_path / "nan1"
    assert main(_args(run, micro_model, data_dir, steps=6, inject_nan_at="3")) == 0
    recs = _metrics(run)
    assert recs[2]["loss"] is None and recs[2]["skipped_steps"] == 1
    assert recs[-1]["skipped_steps"] == 1 and recs[-1]["consecutive_bad"] == 0
    assert recs[-1]["loss"] is not None
    assert "non-finite" in capsys.readouterr().out

    # the last step's checkpoint postponed (its step was bad): the closing lines say so, not "checkpoint_every is 0"
    run3 = tmp_path / "nan3"
    assert main(_args(run3, micro_model, data_dir, steps=4, inject_nan_at="4", checkpoint_every=2)) == 0
    out = capsys.readouterr().out
    assert "step 4: checkpoint postponed" in out and "checkpoint_every is 0" not in out
    assert "not checkpointed: the checkpoint due at step 4 was postponed" in out
    assert (run3 / "checkpoints" / "latest").read_text().strip() == "step_00000002"

    run2 = tmp_path / "nan2"
    rc = main(_args(run2, micro_model, data_dir, steps=20, inject_nan_at="5-20", max_bad_steps=3,
                    checkpoint_every=2))
    assert rc == 2
    err = capsys.readouterr().err
    assert "3 consecutive steps with non-finite" in err and err.count("\n") == 1
    ck = run2 / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000004"  # the last good one, intact
    from yxanul.checkpoint.training import load_checkpoint
    _, sd, meta = load_checkpoint(run2)
    assert meta["step"] == 4 and all(torch.isfinite(t).all() for t in sd.values())


def test_loss_scaler_growth_and_backoff():
    s = DynamicLossScaler(init_scale=8.0, growth_interval=3, backoff_factor=0.5)
    ok, bad = torch.tensor(True), torch.tensor(False)
    s.update(ok); s.update(ok)
    assert float(s.scale) == 8.0 and int(s.tracker) == 2
    s.update(ok)
    assert float(s.scale) == 16.0 and int(s.tracker) == 0
    s.update(bad)
    assert float(s.scale) == 8.0 and int(s.tracker) == 0
    s.update(ok); s.update(bad)
    assert float(s.scale) == 4.0 and int(s.tracker) == 0
    sd = s.state_dict()
    t = DynamicLossScaler()
    t.load_state_dict(sd)
    assert float(t.scale) == 4.0


def test_fp16_run_scales_and_backs_off(tmp_path, micro_model, data_dir):
    run = tmp_path / "fp16"
    args = _args(run, micro_model, data_dir, steps=6, precision="fp16", inject_nan_at="5")
    args += ["--train-config", str(_yaml(tmp_path, "loss_scale_init: 1024.0\nloss_scale_growth_interval: 2\n"))]
    assert main(args) == 0
    recs = _metrics(run)
    scales = [r["loss_scale"] for r in recs]
    assert scales[:4] == [1024.0, 2048.0, 2048.0, 4096.0]  # grows every 2 clean steps
    assert scales[4] == 2048.0 and recs[4]["skipped_steps"] == 1  # backoff on the bad step
    assert recs[-1]["loss"] is not None and recs[-1]["loss"] < 6


def _yaml(tmp_path, text) -> Path:
    p = tmp_path / f"cfg{abs(hash(text))}.yaml"
    p.write_text(text)
    return p


def test_default_preset_matches_builtin_defaults():
    from yxanul.train import load_train_config
    assert load_train_config("default") == TrainConfig()
    assert load_train_config("yxanul-197m-h100").precision == "fp8"


def test_lr_schedule():
    cfg = TrainConfig(steps=101, warmup=10, lr=1.0, min_lr=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    # steps run are 0..100: the last one gets min_lr exactly
    assert lr_at(cfg, 10) == pytest.approx(1.0) and lr_at(cfg, cfg.steps - 1) == pytest.approx(0.1)
    assert lr_at(cfg, 55) == pytest.approx(0.55)


def test_bf16_optimizer_states_and_no_decay_groups(tmp_path, micro_model, data_dir):
    from yxanul.train import Trainer, param_groups
    cfg = TrainConfig(model=micro_model, data=data_dir, out=str(tmp_path / "b"), steps=3, batch_size=2, seq_len=16,
                      optimizer_states="bf16", eval_every=0, checkpoint_every=3, progress=False, log_every=1)
    tr = Trainer(cfg, log=lambda *a: None)
    groups = param_groups(tr.model, 0.1)
    names = {id(p): n for n, p in tr.model.named_parameters()}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert "embeddings.tok.weight" in no_decay and "norm.weight" in no_decay
    assert not any("proj" in n for n in no_decay)
    s = tr.fit()
    assert s["steps"] == 3
    st = next(iter(tr.opt.state.values()))
    assert st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg_sq"].dtype == torch.bfloat16


@pytest.mark.parametrize("argv,needle", [
    (["train", "--steps", "0"], "steps"),
    (["train", "--train-config", "nope-such-preset"], "train preset"),
    (["train", "--model", "nosuch"], "unknown model preset"),
    (["train", "--data", "/nonexistent/dir"], "meta.json"),
    (["train", "--resume"], "needs --out"),
    (["train", "--compile-mode", "turbo"], "compile_mode"),
])
def test_bad_config_exits_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


@pytest.mark.parametrize("speeds,expect", [((120.0, 130.0), "bf16"), ((40.0, 130.0), "bf16"), ((2.9, 39.0), "fp32"),
                                          ((0.3, 126.0), "fp32")])
def test_precision_auto_avoids_slow_cpu_bf16(monkeypatch, speeds, expect):
    """The default precision is bf16 unless the CPU multiplies BF16 more than 4x slower than FP32 (no native
    BF16, where a step took 60x longer in BF16): fp32 there, said in one line. CUDA is always bf16."""
    from yxanul import train as tr
    monkeypatch.setattr(tr, "cpu_bf16_speed", lambda: speeds)
    got, why = tr.resolve_precision(torch.device("cpu"))
    assert got == expect and (("fp32" in why and "--precision bf16" in why) if expect == "fp32" else why == "")
    assert tr.resolve_precision(torch.device("cuda"))[0] == "bf16"
    assert tr.TrainConfig().precision == "auto"
    bf16, fp32 = tr.__dict__["cpu_bf16_speed"]()
    assert (bf16, fp32) == speeds


def test_cpu_bf16_speed_takes_the_best_timing_of_each_dtype(monkeypatch):
    """The probe's rate is the best of five timed products (a slow outlier, e.g. a thread waking up, does not
    decide the precision), measured once per process."""
    from yxanul import train as tr
    ticks = iter([0.0, 1.0, 1.0, 1.5, 1.5, 1.501, 2.0, 2.5, 3.0, 3.5,      # BF16: best 1 ms
                  10.0, 10.004, 11.0, 11.004, 12.0, 12.002, 13.0, 13.5, 14.0, 14.5])  # FP32: best 2 ms
    monkeypatch.setattr(tr.time, "perf_counter", lambda: next(ticks))
    monkeypatch.setattr(tr, "_CPU_BF16", None)
    flop = 2 * 1024 * 256 * 256
    bf16, fp32 = tr.cpu_bf16_speed()
    assert bf16 == pytest.approx(flop / 1e-3 / 1e9, rel=1e-3) and fp32 == pytest.approx(flop / 2e-3 / 1e9, rel=1e-3)
    assert tr.cpu_bf16_speed() == (bf16, fp32)  # cached: no more clock reads (the iterator is exhausted)


def test_bad_tune_kernels_value_exits_2(tmp_path, capsys):
    p = _yaml(tmp_path, "steps: 10\ntune_kernels: maybe\n")
    assert main(["train", "--train-config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "tune_kernels" in err and err.count("\n") == 1


@pytest.mark.parametrize("mode,tune,expect", [
    ("default", False, {}),
    ("reduce-overhead", False, {"mode": "reduce-overhead"}),
    ("default", True, {"options": {"coordinate_descent_tuning": True}}),
    ("reduce-overhead", True, {"options": {"triton.cudagraphs": True, "coordinate_descent_tuning": True}}),
])
def test_compile_blocks_passes_mode_or_tuning_options(monkeypatch, tiny_cfg, mode, tune, expect):
    """tune_kernels turns torch.compile's mode into its inductor options plus coordinate-descent tuning (torch
    takes a mode or options, not both), so CUDA graphs stay on under reduce-overhead; every block gets them."""
    from yxanul.model import Block, Yxanul, compile_blocks
    seen = []
    monkeypatch.setattr(Block, "compile", lambda self, **kw: seen.append(kw))
    compile_blocks(Yxanul(tiny_cfg), mode=mode, tune_kernels=tune)
    assert seen == [expect] * tiny_cfg.n_layers


def test_bad_train_yaml_key(tmp_path, capsys):
    p = _yaml(tmp_path, "steps: 10\nlearning_rate: 0.1\n")
    assert main(["train", "--train-config", str(p)]) == 2
    err = capsys.readouterr().err
    assert str(p) in err and "learning_rate" in err


def test_vocab_range_rejected(tmp_path, data_dir, capsys):
    m = _yaml(tmp_path, "preset: tiny\nvocab_size: 200\n")
    assert main(["train", "--model", str(m), "--data", data_dir, "--out", str(tmp_path / "v")]) == 2
    assert "vocab" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()


def test_fp8_tiny_run_trains(tmp_path, micro_model, data_dir):
    pytest.importorskip("yxanul.fp8.linear")
    run = tmp_path / "fp8"
    assert main(_args(run, micro_model, data_dir, steps=8, precision="fp8", checkpoint_every=8)) == 0
    recs = _metrics(run)
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.5
    assert "fp8" in recs[-1] and "aggregate" in recs[-1]["fp8"]
    assert (run / "fp8_stats.jsonl").exists()
    from yxanul.checkpoint.training import load_checkpoint
    _, sd, meta = load_checkpoint(run)
    assert meta["train_config"]["precision"] == "fp8"
    from yxanul.config import load_model_config
    from yxanul.fp8.linear import convert_model
    from yxanul.model import Yxanul
    from yxanul.precision import load_policy
    m = Yxanul(load_model_config(micro_model))
    convert_model(m, load_policy(), backend="emulated")
    assert set(sd) == set(m.state_dict())  # FP32 master weights + FP8 scaling buffers, state_dict names


@pytest.mark.parametrize("recipe", ["blockwise", "delayed"])
def test_fp8_resume_is_bit_identical(tmp_path, micro_model, data_dir, recipe):
    """FP8 scaling state (delayed amax histories) travels in the checkpoint, so a resume is exact."""
    pytest.importorskip("yxanul.fp8.linear")
    run = tmp_path / recipe
    assert main(_args(run, micro_model, data_dir, steps=6, precision="fp8", fp8_recipe=recipe,
                      checkpoint_every=3)) == 0
    ref = _losses(run)
    assert main(["train", "--resume", str(run / "checkpoints" / "step_00000003"), "--no-progress"]) == 0
    got = _losses(run)
    assert sorted(got) == list(range(1, 7)) and got == ref


def test_bf16_optimizer_states_resume_is_bit_identical(tmp_path, micro_model, data_dir):
    """torch's Optimizer.load_state_dict casts state to the parameter dtype; BF16 moments must stay BF16."""
    run = tmp_path / "bf16states"
    assert main(_args(run, micro_model, data_dir, steps=6, optimizer_states="bf16", checkpoint_every=3)) == 0
    ref = _losses(run)
    assert main(["train", "--resume", str(run / "checkpoints" / "step_00000003"), "--no-progress"]) == 0
    assert _losses(run) == ref


def test_resume_from_older_checkpoint_drops_the_abandoned_branch(tmp_path, micro_model, data_dir):
    from yxanul.checkpoint.training import latest_checkpoint, list_checkpoints
    run = tmp_path / "branch"
    assert main(_args(run, micro_model, data_dir, steps=6, checkpoint_every=2, keep_last=3)) == 0
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002", "step_00000004", "step_00000006"]
    assert main(["train", "--resume", str(run / "checkpoints" / "step_00000002"), "--steps", "3",
                 "--checkpoint-every", "1", "--no-progress"]) == 0
    names = [p.name for p in list_checkpoints(run)]
    assert "step_00000006" not in names and "step_00000004" not in names
    assert latest_checkpoint(run).name == "step_00000003"


@pytest.mark.parametrize("accum", [1, 2])
def test_graph_mode_accumulates_into_zeroed_gradients(tmp_path, micro_model, data_dir, accum):
    """With CUDA graphs (compile_mode reduce-overhead) and several micro-batches the trainer accumulates their
    gradients into zeroed buffers instead of letting the first micro-batch's gradient become .grad (which would
    alias the graph's output memory); with one micro-batch the gradients are consumed within the step and dropped
    after it, as without graphs (no accumulation kernel, no memset). Training must be identical either way;
    exercised here on the CPU with the flag forced."""
    from yxanul.train import Trainer

    def run(graphs, out):
        torch.manual_seed(0)
        cfg = TrainConfig(model=micro_model, data=data_dir, out=str(tmp_path / out), steps=3, batch_size=2,
                          seq_len=16, grad_accum=accum, eval_every=0, checkpoint_every=0, progress=False,
                          log_every=1)
        tr = Trainer(cfg, log=lambda *a: None)
        tr.graphs = graphs
        losses = [float(tr.train_step(s)[0]) for s in range(3)]
        grads = [p.grad for p in tr.params]
        return losses, [p.detach().clone() for p in tr.params], grads

    l0, p0, g0 = run(False, "a")
    l1, p1, g1 = run(True, "b")
    assert l0 == l1
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert all(g is None for g in g0)
    if accum > 1:
        assert all(g is not None and not g.any() for g in g1)
    else:
        assert all(g is None for g in g1)


def test_optimizer_pieces_live_in_optim_and_are_re_exported():
    from yxanul import optim, train as tr
    for name in ("AdamWBF16States", "DynamicLossScaler", "lr_at", "param_groups"):
        assert getattr(tr, name) is getattr(optim, name)


def test_step_clock_rate_is_tokens_over_counted_step_time():
    """The rate of a window is its counted steps' tokens over their measured time; evaluation (and anything else
    timed apart) is reported separately and leaves the rate alone; the device is synchronized only at window
    boundaries and around the parts timed apart, never per step."""
    from yxanul.train import StepClock
    now, syncs = [0.0], []
    clock = StepClock(sync=lambda: syncs.append(now[0]), clock=lambda: now[0])
    clock.start()
    for _ in range(3):
        now[0] += 0.5  # a 0.5 s step
        clock.step_done()
    assert len(syncs) == 1
    with clock.apart("eval_s"):
        now[0] += 7.0
    now[0] += 0.5
    clock.step_done()
    rec = clock.take(tokens_per_step=1000)
    assert rec["tokens_per_s"] == pytest.approx(4 * 1000 / 2.0) and rec["step_s"] == pytest.approx(0.5)
    assert rec["eval_s"] == pytest.approx(7.0) and "recompiled" not in rec
    assert len(syncs) == 4  # the window's start, before and after the evaluation, the window's end
    clock.start()
    assert clock.take(1000) == {"tokens_per_s": None, "step_s": None}  # no counted step: no rate


def test_step_clock_times_an_unpredicted_compilation_apart_with_the_steps_before_it():
    """A counted step that turned out to compile (seconds of host work) moves itself and the window's earlier
    steps into warmup_s; the rate covers the steps after it only, so it never holds a compilation."""
    from yxanul.train import StepClock
    now, syncs = [0.0], []
    clock = StepClock(sync=lambda: syncs.append(now[0]), clock=lambda: now[0])
    clock.start()
    now[0] += 0.5
    clock.step_done()
    now[0] += 4.5  # this step compiled
    clock.compiled("warmup_s")
    for _ in range(2):
        now[0] += 0.5
        clock.step_done()
    rec = clock.take(tokens_per_step=1000)
    assert rec["warmup_s"] == pytest.approx(5.0) and rec["recompiled"] is True
    assert rec["tokens_per_s"] == pytest.approx(2 * 1000 / 1.0) and rec["step_s"] == pytest.approx(0.5)
    assert len(syncs) == 3  # start, the compilation, the window's end
    clock.start()
    now[0] += 3.0
    clock.compiled("warmup_s")  # a window whose only step compiled: no rate
    rec = clock.take(1000)
    assert rec["tokens_per_s"] is None and rec["warmup_s"] == pytest.approx(3.0)


def test_logged_rate_excludes_warmup_eval_and_checkpoint_time(tmp_path, micro_model, data_dir):
    """With a clock that advances 2 s per training step, 30 s per evaluation and 50 s per checkpoint, every
    logged tokens_per_s is exactly tokens per step / 2 s; the first step (compilation, first use) and the other
    work are logged as their own fields."""
    from yxanul.train import Trainer
    cfg = TrainConfig(model=micro_model, data=data_dir, out=str(tmp_path / "t"), steps=6, batch_size=2,
                      seq_len=16, warmup=1, eval_every=2, eval_batches=1, checkpoint_every=4, progress=False,
                      log_every=2, precision="fp32")
    tr = Trainer(cfg, log=lambda *a: None)
    now = [100.0]
    tr.clock = lambda: now[0]

    def advancing(fn, seconds):
        def run(*a, **k):
            now[0] += seconds
            return fn(*a, **k)
        return run

    tr.train_step = advancing(tr.train_step, 2.0)
    tr.evaluate = advancing(tr.evaluate, 30.0)
    tr.save = advancing(tr.save, 50.0)
    tr.fit()
    recs = [r for r in _metrics(tmp_path / "t") if "loss" in r]
    assert [r["step"] for r in recs] == [2, 4, 6]
    tokens = 2 * 16
    assert all(r["tokens_per_s"] == pytest.approx(tokens / 2.0) for r in recs)
    assert recs[0]["warmup_s"] == pytest.approx(2.0) and "warmup_s" not in recs[1]
    assert all(r["eval_s"] == pytest.approx(30.0) for r in recs)
    assert recs[2]["checkpoint_s"] == pytest.approx(50.0) and "checkpoint_s" not in recs[1]


def test_a_step_that_compiles_unpredicted_is_not_in_the_logged_rate(tmp_path, micro_model, data_dir,
                                                                    monkeypatch):
    """Compiled training: a counted step during which torch.compile did work (a graph variant the loop did not
    predict) is timed apart with the window's earlier steps; the window's rate is that of the steps after it."""
    import yxanul.train as tr
    from yxanul.model import Block
    monkeypatch.setattr(Block, "compile", lambda self, **kw: None)  # compiling itself is stubbed
    cfg = TrainConfig(model=micro_model, data=data_dir, out=str(tmp_path / "c"), steps=8, batch_size=2,
                      seq_len=16, warmup=1, eval_every=0, checkpoint_every=0, progress=False, log_every=4,
                      precision="fp32", compile=True)
    t = tr.Trainer(cfg, log=lambda *a: None)
    now, compiles = [100.0], [0]
    t.clock = lambda: now[0]
    monkeypatch.setattr(tr, "_compiled_graphs", lambda: compiles[0])
    step_fn = t.train_step

    def step(s):
        now[0] += 2.0
        if s == 5:  # the sixth step compiles: 9 s more
            now[0] += 9.0
            compiles[0] += 1
        return step_fn(s)
    t.train_step = step
    t.fit()
    recs = [r for r in _metrics(tmp_path / "c") if "loss" in r]
    tokens = 2 * 16
    assert recs[0]["tokens_per_s"] == pytest.approx(tokens / 2.0) and recs[0]["warmup_s"] == pytest.approx(2.0)
    # window 5-8: steps 5 and 6 (the compiling one) apart, 7 and 8 counted
    assert recs[1]["warmup_s"] == pytest.approx(2.0 + 11.0) and recs[1]["recompiled"] is True
    assert recs[1]["tokens_per_s"] == pytest.approx(tokens / 2.0) and recs[1]["step_s"] == pytest.approx(2.0)


def test_log_lines_without_a_terminal_and_next_steps(tmp_path, micro_model, data_dir, capsys):
    """Output that is not a terminal gets one line per record (step, loss, fresh val, lr, tokens/s) even with
    the progress bar asked for; the end names the checkpoint and the next commands."""
    out = tmp_path / "lines"
    a = [x for x in _args(out, micro_model, data_dir, steps=4, log_every=2, eval_every=4, checkpoint_every=4)
         if x != "--no-progress"]
    assert main(a) == 0
    text = capsys.readouterr().out
    lines = [x for x in text.splitlines() if x.startswith("step ")]
    assert len(lines) == 2
    assert lines[0].startswith("step 2/4 | loss ") and "val" not in lines[0] and "| lr " in lines[0]
    assert lines[0].endswith(" tokens/s")
    assert "| val " in lines[1]
    assert f"checkpoint: {out / 'checkpoints' / 'step_00000004'}" in text
    for cmd in (f"yxanul generate {out} --prompt", f"yxanul plot {out} --out loss.png", f"yxanul export {out} --out hf"):
        assert cmd in text


def test_warmup_not_below_steps_warns(tmp_path, micro_model, data_dir, capsys):
    assert main(_args(tmp_path / "w", micro_model, data_dir, steps=2, warmup=2)) == 0
    assert "warning: warmup (2) >= steps (2): the learning rate never decays" in capsys.readouterr().out
    assert main(_args(tmp_path / "w2", micro_model, data_dir, steps=3, warmup=2)) == 0
    assert "never decays" not in capsys.readouterr().out


def test_sample_every_prints_a_generated_sample(tmp_path, micro_model, data_dir, capsys):
    assert main(_args(tmp_path / "s", micro_model, data_dir, steps=4, sample_every=2)) == 0
    samples = [x for x in capsys.readouterr().out.splitlines() if x.startswith("sample at step")]
    assert [x.split(":")[0] for x in samples] == ["sample at step 2", "sample at step 4"]
    assert all(x.startswith(f"sample at step {s}: In the beginning") for x, s in zip(samples, (2, 4)))
    assert main(["train", "--sample-every", "-1"]) == 2
    assert "sample_every" in capsys.readouterr().err


def test_train_flags_come_from_config_fields(capsys):
    """Every TrainConfig field is a flag with help text and its default shown; the flags of earlier versions
    keep their names; an unset flag overrides nothing."""
    import argparse
    import dataclasses
    from yxanul.cli import build_parser
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f.name
        assert f.metadata.get("flag", "--" + f.name.replace("_", "-")) in help_text
    assert "--steps STEPS optimizer steps (default: 120)" in help_text
    assert "--compile, --no-compile" in help_text and "(default: off)" in help_text
    old = ["--model", "x", "--config", "p.yaml", "--data", "d", "--tokenizer", "bytes", "--out", "o", "--steps", "5",
           "--batch-size", "3", "--seq-len", "8", "--grad-accum", "2", "--lr", "0.1", "--min-lr", "0.01",
           "--warmup", "1", "--weight-decay", "0.0", "--clip", "0.5", "--seed", "1", "--precision", "fp16",
           "--fp8-recipe", "delayed", "--fp8-backend", "emulated", "--fp8-calibration-steps", "2",
           "--eval-every", "3", "--eval-batches", "1", "--log-every", "1", "--checkpoint-every", "2",
           "--keep-last", "1", "--compile", "--compile-mode", "reduce-overhead", "--tune-kernels", "--device", "cpu",
           "--parallel", "ddp", "--optimizer-states", "bf16", "--fused-ce", "off", "--max-bad-steps", "3",
           "--inject-nan-at", "2", "--no-progress", "--train-config", "default", "--resume", "r"]
    args = parser.parse_args(["train", *old])
    assert args.policy == "p.yaml" and args.batch_size == 3 and args.lr == 0.1 and args.compile is True
    assert args.fp8_calibration_steps == 2 and args.progress is False and args.tune_kernels is True
    unset = parser.parse_args(["train"])
    assert all(getattr(unset, f.name) is None for f in dataclasses.fields(TrainConfig))
    assert isinstance(unset, argparse.Namespace)


def test_building_the_command_line_does_not_import_torch():
    """`yxanul --help` (and every command's start) stays fast: the train flags come from a torch-free module."""
    code = ("import sys; from yxanul.cli import build_parser; build_parser(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert r.returncode == 0, r.stderr[-500:]


@pytest.mark.gpu
def test_cuda_logged_rate_is_synchronized_and_compile_is_apart(tmp_path, data_dir):
    """On CUDA with torch.compile and FP8 delayed scaling: the first step and the first FP8 step (the graphs
    compile) are logged as warmup_s, not in the rate; the FP8 windows' rates agree once compiled."""
    out = tmp_path / "cuda"
    assert main(["train", "--out", str(out), "--data", data_dir, "--device", "cuda", "--compile", "--precision", "fp8",
                 "--fp8-recipe", "delayed", "--fp8-calibration-steps", "10", "--steps", "40", "--log-every", "10",
                 "--eval-every", "0", "--checkpoint-every", "0", "--no-progress", "--batch-size", "8"]) == 0
    recs = [r for r in _metrics(out) if "loss" in r]
    assert recs[0]["warmup_s"] > 0 and recs[1]["warmup_s"] > 0  # step 1, and steps 11-12 (the first FP8 steps)
    rates = [r["tokens_per_s"] for r in recs[1:] if r["tokens_per_s"]]  # an unpredicted compilation is apart
    assert len(rates) >= 2 and max(rates) < 1.5 * min(rates), recs


@pytest.mark.parametrize("cal, options, want", [(0, {}, {0, 1}), (3, {}, {0, 3, 4}),
                                                 (3, {"fp8_weight_cache": "step"}, {0, 1, 3, 4})])
def test_compiling_fp8_steps_are_timed_apart(tmp_path, micro_model, data_dir, cal, options, want):
    """The steps that compile a graph of their own are kept out of the logged rate: the first, the first FP8 step
    after calibration, and the step after the first FP8 step where delayed scales become fixed or static weight
    copies are first filled."""
    from yxanul.train import Trainer, TrainConfig
    cfg = TrainConfig(model=micro_model, data=data_dir, out=str(tmp_path / "r"), precision="fp8", compile=True,
                      fp8_recipe="delayed", fp8_calibration_steps=cal, steps=8, batch_size=2, seq_len=32,
                      progress=False, **options).validate()
    assert Trainer(cfg, log=lambda *a, **k: None)._warmup_steps() == want


@pytest.mark.parametrize("field", ["precision", "optimizer_states", "parallel", "fused_ce", "host_gc",
                                   "fp8_kernels", "fp8_weight_cache", "compile_scope"])
def test_every_train_config_field_with_choices_rejects_other_values(field):
    from yxanul.errors import YxanulError
    from yxanul.train_config import TrainConfig
    with pytest.raises(YxanulError, match=f"{field}.*expected one of"):
        TrainConfig(**{field: "nonsense"}).validate()


def test_steps_in_a_new_fp8_graph_state_are_timed_apart(tmp_path, micro_model, data_dir, monkeypatch):
    """Compiled FP8 graphs specialize on each layer's calibrating / scales-fixed / statistics-armed flags: the
    first pass in a new combination compiles (the "recompiled" windows of the H100 training log), so it is timed
    apart from the logged rate; every later pass in a seen state is counted. Compilation itself is stubbed out
    (the blocks run eagerly): what is checked is which steps the clock counts."""
    import yxanul.train as tr
    from yxanul.fp8.linear import fp8_modules, graph_state
    from yxanul.model import Block
    monkeypatch.setattr(Block, "compile", lambda self, **kw: None)
    cfg = TrainConfig(model=micro_model, data=data_dir, out=str(tmp_path / "g"), steps=12, batch_size=2, seq_len=16,
                      precision="fp8", fp8_recipe="delayed", fp8_backend="emulated", fp8_calibration_steps=2,
                      compile=True, eval_every=0, checkpoint_every=0, progress=False, log_every=5,
                      fp8_stats_every=1)
    t = tr.Trainer(cfg, log=lambda *a: None)
    mods = list(fp8_modules(t.model).values())
    states, counted = [], []
    step_fn = t.train_step
    monkeypatch.setattr(t, "train_step", lambda s: (states.append(graph_state(mods)), step_fn(s))[1])
    done = tr.StepClock.step_done
    monkeypatch.setattr(tr.StepClock, "step_done", lambda self, **kw: (counted.append(len(states) - 1),
                                                                       done(self, **kw))[1])
    warm = t._warmup_steps()  # the fixed ones: the first step, the first FP8 step and the one after it
    t.fit()
    firsts = {states.index(s) for s in set(states)}
    # calibrating (steps 0-1), FP8 with fixed scales (step 2), statistics armed for the first logged FP8 pass
    # (step 4, which the fixed warm-up steps 0, 2 and 3 miss)
    assert firsts == {0, 2, 4}
    assert not firsts & set(counted)
    assert set(counted) == set(range(12)) - firsts - warm


def test_fp8_statistics_are_armed_for_every_logged_step_including_the_last(tmp_path, micro_model, data_dir,
                                                                           monkeypatch):
    """The pass of each logged step records the FP8 statistics its record reports; the last step is logged
    even when it is not a multiple of log_every, so it is armed too (its record used to repeat older ones)."""
    import yxanul.train as tr
    cfg = TrainConfig(model=micro_model, data=data_dir, out=str(tmp_path / "s"), steps=7, batch_size=2, seq_len=16,
                      precision="fp8", fp8_recipe="tensorwise", fp8_backend="emulated", eval_every=0,
                      checkpoint_every=0, progress=False, log_every=5, fp8_stats_every=1)
    t = tr.Trainer(cfg, log=lambda *a: None)
    armed = []
    step_fn = t._fp8_step
    monkeypatch.setattr(t, "_fp8_step", lambda model, collect_stats=False: (armed.append(collect_stats),
                                                                            step_fn(model, collect_stats))[1])
    t.fit()
    # the call after step s (1-based) arms step s + 1: steps 5 and 7 are logged
    assert [i + 2 for i, a in enumerate(armed) if a] == [5, 7]


def test_the_first_logged_step_records_fp8_statistics(tmp_path, micro_model, data_dir):
    """The first step of a run is armed before it runs (no earlier step's fp8_step did it): with log_every 1 its
    record reports activation and gradient statistics, not the weight's alone."""
    import json
    import yxanul.train as tr
    cfg = TrainConfig(model=micro_model, data=data_dir, out=str(tmp_path / "s"), steps=2, batch_size=2, seq_len=16,
                      precision="fp8", fp8_recipe="tensorwise", fp8_backend="emulated", eval_every=0,
                      checkpoint_every=0, progress=False, log_every=1, fp8_stats_every=1).validate()
    tr.Trainer(cfg, log=lambda *a: None).fit()
    first = json.loads((tmp_path / "s" / "fp8_stats.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    mod = next(iter(first["modules"].values()))
    assert all(mod[k]["amax"] is not None for k in ("x", "w", "dy")), mod


@pytest.mark.parametrize("every,want", [(2, [4, 8, 9]), (0, []), (None, [9])])  # None: the default, 10
def test_fp8_stats_every_n_th_logged_step(tmp_path, micro_model, data_dir, every, want):
    """fp8_stats_every N: the FP8 statistics are armed for, and reported by, every N-th logged step and the last
    (0: none); the other records carry no "fp8" entry and fp8_stats.jsonl holds only the reported steps."""
    import json
    import yxanul.train as tr
    from yxanul.fp8.linear import fp8_modules
    cfg = TrainConfig(model=micro_model, data=data_dir, out=str(tmp_path / "s"), steps=9, batch_size=2, seq_len=16,
                      precision="fp8", fp8_recipe="tensorwise", fp8_backend="emulated", eval_every=0,
                      checkpoint_every=0, progress=False, log_every=2,
                      **({} if every is None else {"fp8_stats_every": every})).validate()
    t = tr.Trainer(cfg, log=lambda *a: None)
    t.fit()
    # never armed past the last step (step 10 would be an every-2nd logged step): the model ends unarmed
    assert not t._stats_due(10) and not any(m._collect for m in fp8_modules(t.model).values())
    recs = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 4, 6, 8, 9]
    assert [r["step"] for r in recs if "fp8" in r] == want
    stats = tmp_path / "s" / "fp8_stats.jsonl"
    got = [json.loads(line)["step"] for line in stats.read_text().splitlines()] if stats.exists() else []
    assert got == want
    # every reported step has its own pass's activation and gradient statistics, also step 8, after which the
    # last step (9) is armed at once
    for line in (stats.read_text().splitlines() if stats.exists() else []):
        mod = next(iter(json.loads(line)["modules"].values()))
        assert {"x", "w", "dy"} <= set(mod), (json.loads(line)["step"], mod)


@pytest.mark.parametrize("precision", ["fp32", "fp8"])
def test_trunk_compile_scope_trains_as_the_eager_model(precision, tiny_cfg):
    """compile_scope "trunk": embedding, every block and the final norm compiled as one graph (dynamo and
    AOTAutograd, the graphs inductor receives, run eagerly), the blocks themselves left uncompiled; losses and
    gradients of two steps equal the eager model's, FP8 (delayed scaling, emulated) included, and its scaling
    state too. (Inductor's CPU code agrees to rounding: FP8 gradients up to about 1e-2 relative.)"""
    import torch._dynamo
    from yxanul.fp8.linear import convert_model, fp8_step
    from yxanul.model import Block, Yxanul, compile_model
    from yxanul.precision import load_policy
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = Yxanul(tiny_cfg)
    comp = Yxanul(tiny_cfg)
    comp.load_state_dict(eager.state_dict())
    if precision == "fp8":
        pol = load_policy().with_recipe(name="delayed", calibration_steps=0)
        for m in (eager, comp):
            convert_model(m, pol, backend="emulated", quiet=True)
    from torch._dynamo.backends.debugging import aot_eager
    graphs = []
    compile_model(comp, "trunk", backend=lambda gm, ex: (graphs.append(gm), aot_eager(gm, ex))[1])
    assert comp.compiled_hidden is not None and eager.compiled_hidden is None
    assert not any(getattr(b, "_compiled_call_impl", None) for b in comp.modules() if isinstance(b, Block))
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        idx = torch.randint(0, tiny_cfg.vocab_size, (2, 16), generator=g)
        tgt = torch.randint(0, tiny_cfg.vocab_size, (2, 16), generator=g)
        losses = []
        for m in (eager, comp):
            loss = m(idx, tgt)
            loss.backward()
            losses.append(loss.detach())
            if precision == "fp8":
                fp8_step(m)
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
        for (n, a), b in zip(eager.named_parameters(), comp.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=n)
            a.grad = b.grad = None
    if precision == "fp8":
        for (n, a), b in zip(eager.state_dict().items(), comp.state_dict().values()):
            torch.testing.assert_close(a, b, msg=n)
    if precision == "fp32":
        assert len(graphs) == 1, f"the trunk broke into {len(graphs)} graphs"  # one graph, no breaks
    assert graphs, "the trunk was not compiled"
    import copy
    twin = copy.deepcopy(comp)  # the compiled trunk is the original's: a copy runs its own trunk eagerly
    assert twin.compiled_hidden is None and comp.compiled_hidden is not None
    torch._dynamo.reset()


def test_compile_scope_validation():
    from yxanul.errors import YxanulError
    from yxanul.model import compile_model
    with pytest.raises(YxanulError, match="compile_scope"):
        TrainConfig(compile_scope="trunk", parallel="fsdp2").validate()
    with pytest.raises(ValueError, match="unknown compile scope"):
        compile_model(torch.nn.Linear(2, 2), "layers")



def test_clip_zero_logs_the_norm_without_scaling_the_gradients(tmp_path, micro_model, data_dir, monkeypatch):
    """--clip 0 computes and checks the gradient norm but does not clip: no scaling kernel over every gradient
    (clipping at infinity multiplied each by 1). The steps equal those with a clip threshold never reached."""
    from yxanul.train import Trainer

    def run(clip, out):
        torch.manual_seed(0)
        cfg = TrainConfig(model=micro_model, data=data_dir, out=str(tmp_path / out), steps=2, batch_size=2,
                          seq_len=16, clip=clip, eval_every=0, checkpoint_every=0, progress=False)
        tr = Trainer(cfg, log=lambda *a: None)
        out = [tr.train_step(s) for s in range(2)]
        return [float(g) for _, g, _ in out], [p.detach().clone() for p in tr.params]

    n_big, p_big = run(1e9, "big")
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: pytest.fail("clipped with --clip 0"))
    n0, p0 = run(0.0, "zero")
    assert n0 == pytest.approx(n_big, rel=1e-6) and all(torch.equal(a, b) for a, b in zip(p0, p_big))


@pytest.mark.gpu
@pytest.mark.parametrize("accum", [1, 2])
def test_cuda_graph_steps_match_uncompiled_steps(tmp_path, micro_model, data_dir, accum):
    """Under CUDA graphs (compile_mode reduce-overhead) the gradients either stay in the graphs' memory (one
    micro-batch: consumed before the next replay) or are accumulated in buffers of their own (several): a
    gradient overwritten by the next replay would change the update's direction, which AdamW's first steps
    follow element by element. The graph steps must match uncompiled steps to compile-level tolerance."""
    from yxanul.train import Trainer

    def run(compile_, out):
        torch.manual_seed(0)
        cfg = TrainConfig(model=micro_model, data=data_dir, out=str(tmp_path / out), steps=3, batch_size=2,
                          seq_len=32, grad_accum=accum, eval_every=0, checkpoint_every=0, progress=False,
                          device="cuda", precision="bf16", compile=compile_,
                          compile_mode="reduce-overhead" if compile_ else "default")
        tr = Trainer(cfg, log=lambda *a: None)
        assert tr.graphs == compile_ and tr.keep_grad_buffers == (compile_ and accum > 1)
        before = [p.detach().float().clone() for p in tr.params]
        losses = [float(tr.train_step(s)[0]) for s in range(3)]
        return losses, [p.detach().float() - b for p, b in zip(tr.params, before)]

    l_eager, d_eager = run(False, "eager")
    l_graph, d_graph = run(True, "graphs")
    assert l_graph == pytest.approx(l_eager, rel=2e-2)
    for a, b in zip(d_eager, d_graph):  # the updates, not the parameters (3 small steps hide in the latter)
        assert (a - b).norm() <= 0.2 * a.norm(), "graph-step updates differ from the uncompiled ones"
