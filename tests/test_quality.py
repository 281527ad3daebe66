import json
import math

import pytest
import torch

from yxanul.bench.quality import (NOISE_MODE, apply_all_fp8, format_table, parse_modes, run_quality, summarize)
from yxanul.config import load_model_config
from yxanul.errors import YxanulError
from yxanul.model import Yxanul


def test_parse_modes_rejects_unknown_and_duplicates():
    assert parse_modes("bf16,fp8-blockwise") == ["bf16", "fp8-blockwise"]
    with pytest.raises(YxanulError, match="unknown mode"):
        parse_modes("bf16,fp9")
    with pytest.raises(YxanulError, match="twice"):
        parse_modes("bf16,bf16")
    assert parse_modes("bf16,bf16-b,bf16-seed2") == ["bf16", "bf16-b", "bf16-seed2"]


def test_a_failed_mode_is_trained_again(tmp_path):
    """A mode whose run failed before its first record leaves only its result.json: the next call trains it
    again instead of meeting a folder that holds files no run writes."""
    out = tmp_path / "q"
    kw = dict(tokens=2 * 32 * 2, modes=["bf16"], seeds=1, batch=2, seq=32, device="cpu", out=str(out),
              eval_batches=1, eval_every=2, eval_windows=2)
    (out / "bf16").mkdir(parents=True)
    (out / "bf16" / "result.json").write_text('{"error": "killed", "settings": {}}')
    res = run_quality("tiny", None, **kw)
    assert res["rows"][0]["final_val_loss"] is not None
    assert (out / "bf16" / "metrics.jsonl").exists()


def test_from_scratch_twin_trains_bf16_on_the_same_data(tmp_path):
    """bf16-b from scratch: BF16 with bf16's initialization and data order, so it differs from bf16 only by
    non-determinism (none on a CPU: bit-identical, a noise not measured); bf16-seed2 reads another order."""
    out = tmp_path / "q"
    res = run_quality("tiny", None, tokens=2 * 32 * 3, modes=["bf16", "bf16-b", "bf16-seed2"], seeds=1, batch=2,
                      seq=32, device="cpu", out=str(out), eval_batches=1, eval_every=3, eval_windows=3)
    seed_of = {m: json.loads((out / m / "result.json").read_text())["settings"]["data_seed"]
               for m in ("bf16", "bf16-b", "bf16-seed2")}
    assert seed_of["bf16"] == seed_of["bf16-b"] != seed_of["bf16-seed2"]
    assert res["windows"]["bf16-b"] == res["windows"]["bf16"]
    paired = {r["mode"]: r for r in res["paired"]}
    assert paired["bf16-b"]["delta_pct"] == 0.0
    # the bit-identical twin measured nothing; bf16-seed2 then gets no borrowed noise (its own R is 1)
    assert paired["bf16-seed2"]["se_pct"] is None


def test_summarize_relative_difference_and_noise_band():
    r = {"rows": [{"mode": "bf16", "final_val_loss": 4.0}, {"mode": NOISE_MODE, "final_val_loss": 4.02},
                  {"mode": "fp8-blockwise", "final_val_loss": 4.01}, {"mode": "fp8-all", "final_val_loss": 4.2}]}
    summarize(r)
    by = {x["mode"]: x for x in r["rows"]}
    assert r["bf16_noise_pct"] == pytest.approx(0.5)
    assert by["fp8-blockwise"]["rel_diff_vs_bf16_pct"] == pytest.approx(0.25)
    assert by["fp8-all"]["rel_diff_vs_bf16_pct"] == pytest.approx(5.0)
    # one pair is one sample of the noise, not a band: "within noise" is left unjudged without repeats
    assert by["fp8-blockwise"]["within_noise"] is None and by["fp8-all"]["within_noise"] is None


def test_all_fp8_hooks_quantize_norm_outputs():
    torch.manual_seed(0)
    m = Yxanul(load_model_config("tiny"))
    names = apply_all_fp8(m)
    assert "embeddings" in names and "norm" in names and len(names) == 2 + 2 * m.cfg.n_layers
    seen = {}
    m.norm.register_forward_hook(lambda mod, i, o: seen.setdefault("out", o.detach()))
    x = torch.randint(0, 257, (1, 16))
    m(x).sum().backward()
    out = seen["out"].reshape(-1, 128)
    # every 1x128 tile holds at most 256 distinct E4M3 codes times one scale: the values are FP8 on a grid
    scale = out.abs().amax(dim=1, keepdim=True) / 448
    codes = out / scale
    snapped = codes.to(torch.float8_e4m3fn).float()
    assert (codes - snapped).abs().max() < 1e-3 * codes.abs().amax()
    raw = torch.randn(1, 16, 256).reshape(-1, 128)
    raw_codes = raw / (raw.abs().amax(dim=1, keepdim=True) / 448)
    assert (raw_codes - raw_codes.to(torch.float8_e4m3fn).float()).abs().max() > 0.1  # the check can fail
    assert m.embeddings.tok.weight.grad is not None  # straight-through gradients reach the embedding


def test_quality_bench_end_to_end_cpu(tmp_path):
    res = run_quality("tiny", None, tokens=2 * 32 * 6, modes=["bf16", "fp8-all"], batch=2, seq=32, lr=3e-3,
                      device="cpu", out=str(tmp_path / "q"), eval_batches=1, eval_every=3, eval_windows=4)
    doc = json.loads((tmp_path / "q" / "quality.json").read_text())
    assert doc["model"] == "tiny" and doc["tokens"] == 2 * 32 * 6
    modes = [r["mode"] for r in doc["rows"]]
    assert modes == ["bf16", NOISE_MODE, "fp8-all"]
    for r in doc["rows"]:
        assert r["error"] is None and r["final_val_loss"] > 0
        assert isinstance(r["rel_diff_vs_bf16_pct"], float)
    assert isinstance(doc["bf16_noise_pct"], float)
    assert doc["rows"][0]["rel_diff_vs_bf16_pct"] == 0.0
    assert "fp8-all" in format_table(res)
    # finished modes are reused, not retrained
    before = (tmp_path / "q" / "bf16" / "result.json").stat().st_mtime_ns
    run_quality("tiny", None, tokens=2 * 32 * 6, modes=["bf16"], batch=2, seq=32, device="cpu",
                out=str(tmp_path / "q"), eval_batches=1, eval_every=3, seeds=1, eval_windows=4)
    assert (tmp_path / "q" / "bf16" / "result.json").stat().st_mtime_ns == before
    # a delayed-scaling calibration override concerns FP8 modes only: BF16 results stay reusable
    run_quality("tiny", None, tokens=2 * 32 * 6, modes=["bf16"], batch=2, seq=32, device="cpu",
                out=str(tmp_path / "q"), eval_batches=1, eval_every=3, seeds=1, calibration_steps=2,
                eval_windows=4)
    assert (tmp_path / "q" / "bf16" / "result.json").stat().st_mtime_ns == before
    # a result from before a setting became mode-specific (an extra key set to null) is still reused
    done = tmp_path / "q" / "bf16" / "result.json"
    rec = json.loads(done.read_text())
    rec["settings"]["fp8_calibration_steps"] = None
    done.write_text(json.dumps(rec))
    before = done.stat().st_mtime_ns
    run_quality("tiny", None, tokens=2 * 32 * 6, modes=["bf16"], batch=2, seq=32, device="cpu",
                out=str(tmp_path / "q"), eval_batches=1, eval_every=3, seeds=1, eval_windows=4)
    assert done.stat().st_mtime_ns == before
    # how kernels are launched (CUDA graphs) is recorded but is not a setting that decides reuse
    rec = json.loads(done.read_text())
    assert rec["compile_mode"] == "default" and "compile_mode" not in rec["settings"]
    assert rec["tune_kernels"] is False and "tune_kernels" not in rec["settings"]
    with pytest.raises(YxanulError, match="needs --compile"):
        run_quality("tiny", None, tokens=2 * 32 * 6, modes=["bf16"], batch=2, seq=32, device="cpu",
                    out=str(tmp_path / "q"), seeds=1, tune_kernels=True)
    with pytest.raises(YxanulError, match="needs --compile"):
        run_quality("tiny", None, tokens=2 * 32 * 6, modes=["bf16"], batch=2, seq=32, device="cpu",
                    out=str(tmp_path / "q"), seeds=1, compile_mode="reduce-overhead")
    with pytest.raises(YxanulError):
        run_quality("tiny", None, tokens=2 * 32 * 6, modes=["bf16"], batch=2, seq=32, device="cpu",
                    out=str(tmp_path / "q"), seeds=1, compile_mode="fastest")


def test_same_settings():
    from yxanul.bench.quality import same_settings
    assert same_settings({"lr": 1e-3, "policy": None}, {"lr": 1e-3})
    assert not same_settings({"lr": 1e-3}, {"lr": 2e-3})
    assert not same_settings({"lr": 1e-3, "fp8_recipe": "delayed"}, {"lr": 1e-3})
    assert not same_settings(None, {"lr": 1e-3})


def test_quality_repeats_are_paired_and_summarized(tmp_path):
    out = tmp_path / "q"
    res = run_quality("tiny", None, tokens=2 * 32 * 4, modes=["bf16", "fp8-tensorwise"], batch=2, seq=32,
                      device="cpu", out=str(out), eval_batches=1, eval_every=2, repeats=2, eval_windows=4)
    assert res["repeats"] == 2
    # the BF16 seed-to-seed run is repeated too, so its paired difference has an SD over repeats
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["bf16", "bf16-r1", NOISE_MODE, NOISE_MODE + "-r1",
                                                                   "fp8-tensorwise", "fp8-tensorwise-r1"]
    paired = {r["mode"]: r for r in res["paired"]}
    assert list(paired) == [NOISE_MODE, "fp8-tensorwise"]
    assert paired["fp8-tensorwise"]["R"] == 2 and paired["fp8-tensorwise"]["windows"] == 4
    assert len(res["windows"]["fp8-tensorwise-r1"]) == 4
    by = {r["mode"]: r for r in res["rows"]}
    assert list(by) == ["bf16", NOISE_MODE, "fp8-tensorwise"]
    assert by["fp8-tensorwise"]["within_noise"] == paired["fp8-tensorwise"]["within_noise"] is not None
    b, f = by["bf16"]["repeat_val_losses"], by["fp8-tensorwise"]["repeat_val_losses"]
    assert len(b) == len(f) == 2 and all(isinstance(v, float) for v in b + f)
    assert by["bf16"]["final_val_loss"] == pytest.approx(sum(b) / 2)
    pairs = [100 * (x - y) / y for x, y in zip(f, b)]
    assert by["fp8-tensorwise"]["paired_rel_diff_pct"] == pytest.approx(sum(pairs) / 2, abs=1e-3)
    assert by["fp8-tensorwise"]["paired_sem_pct"] == pytest.approx(abs(pairs[0] - pairs[1]) / 2, abs=1e-3)
    assert isinstance(res["bf16_repeat_std_pct"], float)
    # the two repeats saw different batches
    r0 = json.loads((out / "bf16" / "result.json").read_text())["settings"]["data_seed"]
    r1 = json.loads((out / "bf16-r1" / "result.json").read_text())["settings"]["data_seed"]
    assert r0 != r1
    text = format_table(res)
    # the final table's difference is the per-window paired one that decides "in noise", with its SE
    p = paired["fp8-tensorwise"]
    assert f"{p['delta_pct']:+.3f}% ± {p['se_pct']:.3f} (paired)" in text
    with pytest.raises(YxanulError):
        run_quality("tiny", None, tokens=128, modes=["bf16"], batch=2, seq=32, device="cpu", out=str(out),
                    repeats=0)


# -- per-window evaluation, paired statistics, fork protocol ---------------------------------------------

@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    """Byte-level data with a validation split of 20 windows of 33 tokens plus a partial one."""
    from pathlib import Path

    from yxanul.data.prepare import prepare
    root = tmp_path_factory.mktemp("small")
    docs = sorted((Path(__file__).parent.parent / "docs").glob("*.md"))
    train = root / "train.txt"
    train.write_text("\n".join(d.read_text(encoding="utf-8") for d in docs), encoding="utf-8")
    val = root / "val.txt"
    val.write_text("The validation text: " + "abcdefghij klmnopqrst uvwxyz. " * 22, encoding="utf-8")
    out = root / "data"
    meta = prepare([str(train)], "bytes", out, val_inputs=[str(val)], progress=False)
    assert meta["splits"]["val"]["tokens"] // 33 == 20 and meta["splits"]["val"]["tokens"] % 33
    return str(out)


def _direct_window_loss(model, loader, w):
    import numpy as np
    T = loader.T
    flat = np.concatenate([np.asarray(a) for a in loader.val.arrays])
    xy = torch.from_numpy(flat[w * (T + 1):(w + 1) * (T + 1)].astype(np.int64))[None]
    with torch.no_grad():
        logits = model(xy[:, :-1]).float()
    return float(torch.nn.functional.cross_entropy(logits[0], xy[0, 1:]))


def test_window_losses_count_order_and_cap(micro_model, small_data):
    from yxanul.data.loader import DataLoader
    from yxanul.evaluate import val_window_count, window_index, window_losses
    torch.manual_seed(0)
    model = Yxanul(load_model_config(micro_model))
    loader = DataLoader(small_data, 3, 32)
    assert val_window_count(loader) == 20
    every = window_losses(model, loader)
    assert every.dtype == torch.float64 and every.shape == (20,)  # the whole split once, the partial batch cut
    direct = [_direct_window_loss(model, loader, w) for w in range(20)]
    assert every.tolist() == pytest.approx(direct, rel=1e-5)
    assert len(set(round(v, 6) for v in direct)) > 10  # windows differ: the order check can fail
    assert window_losses(model, loader, 5).tolist() == pytest.approx(direct[:5], rel=1e-5)
    capped = window_losses(model, loader, 10 ** 12)  # more than the split: the split once, not repeated
    assert capped.tolist() == pytest.approx(direct, rel=1e-5)
    assert [window_index(loader, k) for k in (0, 4, 19, 21)] == [0, 4, 19, 1]
    assert model.training and "loss_fn" not in vars(model)  # mode and loss path restored


def test_window_losses_fused_loss_path_and_restore(micro_model, small_data):
    from yxanul.data.loader import DataLoader
    from yxanul.evaluate import window_losses
    from yxanul.kernels.linear_ce import use_fused_ce
    torch.manual_seed(0)
    model = Yxanul(load_model_config(micro_model))
    loader = DataLoader(small_data, 4, 32)
    plain = window_losses(model, loader, 8)
    use_fused_ce(model)
    fused_fn = model.loss_fn
    fused = window_losses(model, loader, 8)
    assert fused.tolist() == pytest.approx(plain.tolist(), rel=1e-5)
    assert model.loss_fn is fused_fn


def test_trainer_evaluate_is_the_mean_of_the_old_batch_means(micro_model, small_data, tmp_path):
    from yxanul.train import Trainer, load_train_config
    cfg = load_train_config(None, {"model": micro_model, "data": small_data, "batch_size": 3, "seq_len": 32,
                                   "eval_batches": 3, "precision": "bf16", "out": str(tmp_path / "r"),
                                   "progress": False, "tensorboard": False})
    t = Trainer(cfg, log=lambda *a, **k: None)
    old = []
    with torch.no_grad():
        for x, y in t.loader.val_batches(3):
            with t.autocast():
                old.append(float(t.model(x, y)))
    assert t.evaluate() == pytest.approx(sum(old) / len(old), rel=1e-6)


def test_paired_delta_against_hand_computation():
    from yxanul.bench.quality import paired_delta
    ref = [2.0, 3.0, 4.0, 3.0]
    mode = [2.1, 3.0, 4.2, 3.1]
    # d = (0.1, 0, 0.2, 0.1), mean 0.1; mean ref 3 -> delta = 1/30
    # z = (d - delta * ref) / 3 = (1/90, -3/90, 2/90, 0): mean 0, sum of squares 14/8100
    delta, se = paired_delta(mode, ref)
    assert delta == pytest.approx(100 / 30)
    assert se == pytest.approx(100 * math.sqrt(14 / 8100 / 3) / 2)
    assert paired_delta(ref, ref) == (0.0, 0.0)
    with pytest.raises(YxanulError, match="differ in number"):
        paired_delta(mode[:3], ref)


def test_paired_rows_combine_repeats_and_give_verdicts():
    from yxanul.bench.quality import markdown_table, paired_delta, paired_rows, verdict
    ref0, ref1 = [2.0, 3.0, 4.0, 3.0], [2.0, 3.2, 4.0, 2.8]
    m0, m1 = [2.1, 3.0, 4.2, 3.1], [2.0, 3.2, 4.0, 2.9]
    windows = {("bf16", 0): ref0, ("bf16", 1): ref1, ("fp8-all", 0): m0, ("fp8-all", 1): m1,
               ("fp8-delayed", 0): m0}
    rows = {r["mode"]: r for r in paired_rows(windows, ["bf16", "fp8-all", "fp8-delayed"])}
    a = rows["fp8-all"]
    d0, d1 = 100 * 0.4 / 12, 100 * 0.1 / 12  # sum of differences over the sum of the reference, per repeat
    assert a["repeat_delta_pct"] == pytest.approx([d0, d1])
    assert a["delta_pct"] == pytest.approx((d0 + d1) / 2) and a["R"] == 2 and a["windows"] == 4
    assert a["sd_pct"] == pytest.approx(abs(d0 - d1) / math.sqrt(2))
    _, se_w = paired_delta([(x + y) / 2 for x, y in zip(m0, m1)], [(x + y) / 2 for x, y in zip(ref0, ref1)])
    assert a["se_pct"] == pytest.approx(math.sqrt(se_w ** 2 + a["sd_pct"] ** 2 / 2))
    assert "2-5% worse" in a["verdicts"] and "2-5% worse" not in rows["fp8-delayed"]["verdicts"]
    assert rows["fp8-delayed"]["R"] == 1 and rows["fp8-delayed"]["sd_pct"] is None
    # fp8-delayed has one repeat: its run noise is the one measured by fp8-all's two (pooled, 1 degree of freedom)
    assert rows["fp8-delayed"]["run_noise_pct"] == pytest.approx(a["sd_pct"]) and a["noise_df"] == 1
    assert rows["fp8-delayed"]["within_noise"] is None  # one degree of freedom does not judge the noise
    assert a["within_noise"] is None
    assert verdict(0.05, 0.02, -0.1, 0.1) == "confirmed"
    assert verdict(0.5, 0.1, -0.25, 0.25) == "refuted" and verdict(-0.5, 0.1, -0.25, 0.25) == "refuted"
    assert verdict(0.2, 0.05, -0.1, 0.1) == "unresolved" and verdict(0.0, None, -0.1, 0.1) == "unresolved"
    table = markdown_table(list(rows.values()))
    assert table.splitlines()[0] == "| mode | delta vs bf16 | SD | SE | R | verdict 0.1% / 0.25% |"
    assert "| fp8-all |" in table and "| 2 |" in table


def test_deterministic_algorithms_are_set_and_restored(monkeypatch):
    from yxanul.bench.quality import deterministic_algorithms
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()  # strict: cuDNN attention follows
        import os
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    import os
    assert torch.are_deterministic_algorithms_enabled() == before and "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_fork_branch_is_bit_identical_to_a_straight_run(micro_model, small_data, tmp_path):
    """Repeat 0 continues the trunk's data order: its BF16 branch, resumed from the trunk's checkpoint at step 3,
    ends bit for bit where one uninterrupted run to step 6 ends (CPU)."""
    from yxanul.bench.quality import FORK_NOISE_MODE, run_fork
    kw = dict(tokens=3 * 32 * 6, batch=3, seq=32, lr=3e-3, device="cpu", eval_every=2, eval_batches=1)
    fork = run_fork(micro_model, small_data, modes=["bf16"], fork_at=3, out=str(tmp_path / "f"), **kw)
    straight = run_quality(micro_model, small_data, modes=["bf16"], seeds=1, out=str(tmp_path / "s"), **kw)
    assert len(fork["windows"]["bf16-r0"]) == 20
    assert fork["windows"]["bf16-r0"] == straight["windows"]["bf16"]
    f_train = dict(map(tuple, fork["curves"]["bf16"]["train"]))
    s_train = dict(map(tuple, straight["curves"]["bf16"]["train"]))
    assert f_train == s_train and max(f_train) == 6 and min(f_train) <= 2  # trunk part included
    assert fork["bf16_pairs_bit_identical"] == [True]
    nf = fork["noise_floor"]
    assert nf["mode"] == FORK_NOISE_MODE and nf["delta_pct"] == 0.0 and nf["window_se_pct"] == 0.0
    assert nf["se_pct"] is None  # one repeat: the noise floor's own noise is not measured
    assert json.loads((tmp_path / "f" / "fork.json").read_text())["fork_at"] == 3
    # without the fork (a run trained from scratch on another data order) the windows differ: the check can fail
    other = run_quality(micro_model, small_data, modes=["bf16"], seeds=1, out=str(tmp_path / "o"),
                        seed=7, **kw)
    assert other["windows"]["bf16"] != straight["windows"]["bf16"]


def test_bench_quality_fork_cli_end_to_end(micro_model, small_data, tmp_path):
    from yxanul.cli import main
    out = tmp_path / "fork"
    args = ["bench", "quality", "--model", micro_model, "--data", small_data, "--tokens", str(2 * 32 * 6),
            "--batch", "2", "--seq", "32", "--fork-at", "3", "--repeats", "2", "--modes", "bf16,fp8-tensorwise",
            "--eval-windows", "6", "--eval-every", "3", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    doc = json.loads((out / "fork.json").read_text())
    assert sorted(doc["branches"]) == ["bf16-b-r0", "bf16-b-r1", "bf16-r0", "bf16-r1", "fp8-tensorwise-r0",
                                       "fp8-tensorwise-r1"]
    assert all(len(w) == 6 for w in doc["windows"].values())
    assert doc["windows"]["bf16-r0"] != doc["windows"]["bf16-r1"]  # repeats draw other batches after the fork
    row = doc["paired"][0]
    assert row["mode"] == "fp8-tensorwise" and row["R"] == 2 and row["sd_pct"] is not None
    assert set(row["verdicts"]) == {"0.1%", "0.25%"}
    assert doc["bf16_pairs_bit_identical"] == [True, True]
    assert "| mode | delta vs bf16 | SD | SE | R | verdict 0.1% / 0.25% |" in (out / "fork.md").read_text()
    for png in ("fork-delta.png", "fork-curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second call reuses the trunk and every finished branch
    stamp = (out / "fp8-tensorwise-r1" / "result.json").stat().st_mtime_ns
    trunk = (out / "trunk" / "trunk.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "fp8-tensorwise-r1" / "result.json").stat().st_mtime_ns == stamp
    assert (out / "trunk" / "trunk.json").stat().st_mtime_ns == trunk
    assert doc["fprop_fast_accum"] is False
    # FP8 forward GEMMs with fast accumulation are another FP8 computation: its branches train again, the BF16
    # ones are reused, and the record says so
    bf16_stamp = (out / "bf16-r1" / "result.json").stat().st_mtime_ns
    assert main(args + ["--fp8-fprop-fast-accum"]) == 0
    assert (out / "fp8-tensorwise-r1" / "result.json").stat().st_mtime_ns != stamp
    assert (out / "bf16-r1" / "result.json").stat().st_mtime_ns == bf16_stamp
    assert json.loads((out / "fork.json").read_text())["fprop_fast_accum"] is True
    # so are the fused FP8 producers (both options on: every FP8 branch again, BF16 still reused)
    stamp = (out / "fp8-tensorwise-r1" / "result.json").stat().st_mtime_ns
    assert main(args + ["--fp8-fprop-fast-accum", "--fp8-fused-producers"]) == 0
    assert (out / "fp8-tensorwise-r1" / "result.json").stat().st_mtime_ns != stamp
    assert (out / "bf16-r1" / "result.json").stat().st_mtime_ns == bf16_stamp
    doc = json.loads((out / "fork.json").read_text())
    assert doc["fprop_fast_accum"] is True and doc["fused_producers"] is True
    assert "fused FP8 producers" in (out / "fork.md").read_text()
    # bad input: one-line errors, exit code 2
    assert main(args[:-6] + ["--fork-at", "6", "--out", str(tmp_path / "x")]) == 2
    assert main(args[:-6] + ["--fork-at", "0", "--out", str(tmp_path / "x")]) == 2
    i = args.index("--fork-at")
    no_fork = args[:i] + args[i + 2:] + ["--deterministic"]
    assert main(no_fork) == 2
    assert main(args + ["--eval-windows", "1"]) == 2
    assert not (tmp_path / "x").exists()


def test_one_repeat_rows_take_their_run_noise_from_the_bf16_pair():
    """With one repeat the per-window SE alone would call a BF16 twin 0.15% apart a refutation (it measured
    5-10x below the run-to-run noise on the H100): the twin's delta enters every other row's SE, and the twin's
    own row, whose noise nothing measures, stays unresolved."""
    from yxanul.bench.quality import FORK_NOISE_MODE, paired_delta, paired_rows
    ref = [3.0, 3.1, 2.9, 3.0, 3.05]
    twin = [x * 1.0015 for x in ref]                       # +0.15%, as in the first H100 fork
    mode = [x * (1.0 + 0.0018 * (-1) ** i) for i, x in enumerate(ref)]
    windows = {("bf16", 0): ref, (FORK_NOISE_MODE, 0): twin, ("fp8-tensorwise", 0): mode}
    rows = {r["mode"]: r for r in paired_rows(windows, ["bf16", FORK_NOISE_MODE, "fp8-tensorwise"])}
    t, b = rows["fp8-tensorwise"], rows[FORK_NOISE_MODE]
    noise = paired_delta(twin, ref)[0]
    assert noise == pytest.approx(0.15)
    # against the mean of the two BF16 runs: 1.5 run variances, 0.75 of the pair's delta variance
    assert t["reference"] == "mean of bf16 and bf16-b" and b["reference"] == "bf16"
    assert t["delta_pct"] == pytest.approx(paired_delta(mode, [(x + y) / 2 for x, y in zip(ref, twin)])[0])
    assert t["run_noise_pct"] == pytest.approx(noise * math.sqrt(0.75)) and t["noise_df"] == 1
    assert t["se_pct"] == pytest.approx(math.sqrt(t["window_se_pct"] ** 2 + 0.75 * noise ** 2))
    assert t["verdicts"]["0.1%"] == "unresolved"           # |delta| + 2 SE spans more than 0.1%
    assert b["se_pct"] is None and set(b["verdicts"].values()) == {"unresolved"}
    assert t["within_noise"] is None                       # measured noise needs repeats
    # a pair that happened to agree (0.002%, as one H100 from-scratch pair did) measures the noise to one degree
    # of freedom: a mode 0.4% off is then unresolved, not refuted, until the noise is known to two or more
    close = [x * 1.00002 for x in ref]
    far = [x * 0.996 for x in ref]
    rows = {r["mode"]: r for r in paired_rows({("bf16", 0): ref, (FORK_NOISE_MODE, 0): close, ("fp8-b", 0): far},
                                              ["bf16", FORK_NOISE_MODE, "fp8-b"])}
    f = rows["fp8-b"]
    assert f["delta_pct"] - 2 * f["se_pct"] > -0.5 and f["delta_pct"] + 2 * f["se_pct"] < -0.25  # 2 SE: "refuted"
    assert f["noise_df"] == 1 and set(f["verdicts"].values()) == {"unresolved"}
    rows = {r["mode"]: r for r in paired_rows({("bf16", 0): ref, (FORK_NOISE_MODE, 0): close, ("fp8-b", 0): far,
                                               ("bf16", 1): ref, (FORK_NOISE_MODE, 1): close, ("fp8-b", 1): far},
                                              ["bf16", FORK_NOISE_MODE, "fp8-b"])}
    assert rows["fp8-b"]["noise_df"] >= 2 and rows["fp8-b"]["verdicts"]["0.25%"] == "refuted"


def test_run_noise_pools_bf16_pairs_and_repeats_by_hand():
    """The run-to-run noise is pooled: every BF16 pair's delta squared (mean zero) and every mode's squared
    deviations from its own mean, over their degrees of freedom; a bit-identical pair adds nothing."""
    from yxanul.bench.quality import FORK_NOISE_MODE, paired_delta, paired_rows, pooled_run_noise
    assert pooled_run_noise([0.2, -0.1], [[0.3, 0.1], [0.5]]) == pytest.approx(
        (math.sqrt((0.04 + 0.01 + 0.01 + 0.01) / 3), 3))
    assert pooled_run_noise([0.0], [[0.2]]) == (None, 0)
    assert pooled_run_noise([0.1], [[0.2, 0.2, 0.2]]) == pytest.approx((0.1, 1))  # bit-identical repeats: no df
    ref = [[3.0, 3.1, 2.9, 3.0], [3.02, 3.1, 2.88, 3.01], [2.99, 3.12, 2.9, 3.0]]
    windows = {}
    for r, w in enumerate(ref):
        windows[("bf16", r)] = w
        windows[(FORK_NOISE_MODE, r)] = [x * (1 + 0.001 * (r - 1)) + 0.002 * (i % 2) for i, x in enumerate(w)]
        windows[("fp8-tensorwise", r)] = [x * (1.0005 + 0.0007 * r * (-1) ** i) for i, x in enumerate(w)]
    windows[("fp8-all", 0)] = [x * 1.003 for x in ref[0]]
    rows = {r["mode"]: r for r in paired_rows(windows, ["bf16", FORK_NOISE_MODE, "fp8-tensorwise", "fp8-all"])}
    twin = [paired_delta(windows[(FORK_NOISE_MODE, r)], ref[r])[0] for r in range(3)]
    pair_mean = [[(x + y) / 2 for x, y in zip(ref[r], windows[(FORK_NOISE_MODE, r)])] for r in range(3)]
    tw = [paired_delta(windows[("fp8-tensorwise", r)], pair_mean[r])[0] for r in range(3)]
    m = sum(tw) / 3
    # tensorwise's deviations measure 0.75 of the pair variance (it is against the BF16 pair's mean)
    noise = math.sqrt((sum(d * d for d in twin) + sum((d - m) ** 2 for d in tw) / 0.75) / 5)
    t, a = rows["fp8-tensorwise"], rows["fp8-all"]
    assert t["repeat_delta_pct"] == pytest.approx(tw)
    assert t["run_noise_pct"] == pytest.approx(noise * math.sqrt(0.75)) and t["noise_df"] == 5 and a["noise_df"] == 5
    assert t["se_pct"] == pytest.approx(math.sqrt(t["window_se_pct"] ** 2 + 0.75 * noise ** 2 / 3))
    assert a["se_pct"] == pytest.approx(math.sqrt(a["window_se_pct"] ** 2 + 0.75 * noise ** 2))
    assert t["within_noise"] == (abs(t["delta_pct"]) <= 2 * t["se_pct"])
    b = rows[FORK_NOISE_MODE]  # the twin's own row: its SD over its repeats
    assert b["run_noise_pct"] == pytest.approx(b["sd_pct"]) and b["noise_df"] == 2


def test_fork_report_rerenders_a_recorded_fork(tmp_path):
    """scripts/fork_report.py: a recorded fork.json's table recomputed with the current statistics (the BF16
    pair's noise in the one-repeat SE) and its two plots written."""
    import subprocess
    import sys
    from pathlib import Path
    ref = [3.0, 3.1, 2.9, 3.0]
    curves = {"train": [[1, 5.0], [2, 4.0]], "val": [[2, 4.1]]}
    fork = {"model": "tiny", "fork_at": 1, "steps": 2, "batch": 2, "seq": 8, "lr": 1e-3, "warmup": 1, "repeats": 1,
            "device": "cpu", "torch": torch.__version__, "tokens": 32, "se_method": "old text",
            "bf16_pairs_bit_identical": [False],
            "windows": {"bf16-r0": ref, "bf16-b-r0": [x * 1.001 for x in ref],
                        "fp8-tensorwise-r0": [x * 1.002 for x in ref]},
            "curves": {"bf16": curves, "bf16-b": curves, "fp8-tensorwise": curves}}
    src = tmp_path / "fork.json"
    src.write_text(json.dumps(fork))
    script = Path(__file__).resolve().parents[1] / "scripts" / "fork_report.py"
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, str(script), str(src), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    md = (out / "fork.md").read_text()
    # against the BF16 pair's mean (+0.05%): +0.150%; SE sqrt(0.75) x the pair's 0.1%
    assert "| fp8-tensorwise | +0.150% | - | 0.087% | 1 |" in md and "old text" not in md
    assert (out / "fork-delta.png").stat().st_size > 1000 and (out / "fork-curves.png").stat().st_size > 1000
    # a second fork combined as repeat 1, its fp8-tensorwise left out: the mode keeps R=1, the pair R=2 and the
    # noise is pooled from both pairs (+0.1% and +0.3%: sqrt((0.01 + 0.09) / 2)), x sqrt(0.75) for the mode
    second = dict(fork, windows={"bf16-r0": ref, "bf16-b-r0": [x * 1.003 for x in ref],
                                 "fp8-tensorwise-r0": [x * 1.1 for x in ref]})
    src2 = tmp_path / "fork2.json"
    src2.write_text(json.dumps(second))
    r = subprocess.run([sys.executable, str(script), str(src), f"{src2}:bf16-b", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    md = (out / "fork.md").read_text()
    assert f"| fp8-tensorwise | +0.150% | - | {math.sqrt(0.05 * 0.75):.3f}% | 1 |" in md, md
    assert "| bf16-b | +0.200% |" in md and "| 2 |" in md and "(2 degrees of freedom)" in md
    assert "At this noise a mode's SE against the BF16 pair's mean reaches 0.08% with R = " in md
    assert "bit-identical per repeat: [" in md  # one entry per combined repeat, from each file's own list
    # forks of another protocol, or one fork given twice, are refused (exit 2, one line, nothing written)
    other = tmp_path / "other.json"
    other.write_text(json.dumps(dict(fork, steps=3)))
    fast = tmp_path / "fast.json"  # FP8 forward GEMMs with fast accumulation: other FP8 branches
    fast.write_text(json.dumps(dict(fork, fprop_fast_accum=True)))
    producers = tmp_path / "producers.json"  # fused FP8 producers: other FP8 branches too
    producers.write_text(json.dumps(dict(fork, fused_producers=True)))
    before = (out / "fork.md").read_text()
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(dict(fork, windows={"bf16-r0": ref, "fp8-tensorwise-r0": [3.0, "x", 1.0, 2.0]})))
    zeros = tmp_path / "zeros.json"
    zeros.write_text(json.dumps(dict(fork, windows={"bf16-r0": [0.0] * 4, "fp8-tensorwise-r0": ref})))
    headless = tmp_path / "headless.json"
    headless.write_text(json.dumps({k: v for k, v in fork.items() if k != "model"}))
    for args in ([str(src), str(other)], [str(src), str(fast)], [str(src), str(producers)], [str(src), str(src)],
                 [str(broken)], [str(zeros)], [str(headless)]):
        r = subprocess.run([sys.executable, str(script), *args, "--out", str(out)], capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "error" in r.stderr, r.stderr
    assert (out / "fork.md").read_text() == before
    r = subprocess.run([sys.executable, str(script), str(src), "--out", str(src)], capture_output=True, text=True)
    assert r.returncode == 2 and "not a folder" in r.stderr


def test_fork_report_combines_from_scratch_runs_of_two_seeds(tmp_path):
    """scripts/fork_report.py on `bench quality` results without a fork (quality.json: window lists named by mode
    for repeat 0): runs of two seeds combine as two repeats; a fork is not mixed with them."""
    import subprocess
    import sys
    from pathlib import Path
    ref = [3.0, 3.1, 2.9, 3.0]
    run = {"model": "tiny", "steps": 2, "batch": 2, "seq": 8, "lr": 6e-4, "warmup": 1, "repeats": 1, "seed": 1,
           "device": "cpu", "torch": torch.__version__, "tokens": 32, "se_method": "old text", "curves": {},
           "windows": {"bf16": ref, "bf16-b": [x * 1.001 for x in ref], "fp8-delayed": [x * 1.004 for x in ref]}}
    other = dict(run, seed=2, windows={"bf16": ref, "bf16-b": [x * 1.003 for x in ref],
                                       "fp8-delayed": [x * 0.999 for x in ref]})
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(run))
    b.write_text(json.dumps(other))
    script = Path(__file__).resolve().parents[1] / "scripts" / "fork_report.py"
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, str(script), str(a), str(b), "--out", str(out)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    md = (out / "fork.md").read_text()
    # against each seed's pair mean: +0.35% and -0.25%, mean +0.05%; the twin +0.1% and +0.3%, mean +0.2%
    assert "from scratch, 2 steps" in md and "BF16 trunk" not in md
    assert "| fp8-delayed | +0.050% |" in md and "| 2 |" in md, md
    assert "| bf16-b | +0.200% |" in md, md
    # a mode whose own name ends in -rN is that mode (the file's rows name its modes), not a repeat of another
    odd = dict(run, rows=[{"mode": m} for m in ("bf16", "bf16-b", "fp8-r2")],
               windows={"bf16": ref, "bf16-b": run["windows"]["bf16-b"], "fp8-r2": run["windows"]["fp8-delayed"]})
    c = tmp_path / "odd.json"
    c.write_text(json.dumps(odd))
    r = subprocess.run([sys.executable, str(script), str(c), "--out", str(tmp_path / "odd")], capture_output=True,
                       text=True)
    assert r.returncode == 0 and "| fp8-r2 | +0.350% |" in r.stdout, r.stdout + r.stderr
    stray = dict(odd, windows=dict(odd["windows"], **{"fp8-x-r1": ref}))   # no mode fp8-x in its rows
    c.write_text(json.dumps(stray))
    r = subprocess.run([sys.executable, str(script), str(c), "--out", str(tmp_path / "odd")], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "windows.fp8-x-r1" in r.stderr, r.stderr
    fork = dict(run, fork_at=1, windows={f"{k}-r0": v for k, v in run["windows"].items()})
    f = tmp_path / "fork.json"
    f.write_text(json.dumps(fork))
    r = subprocess.run([sys.executable, str(script), str(a), str(f), "--out", str(out)], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "fork_at" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_a_bit_identical_bf16_pair_measures_no_noise():
    """A deterministic (or CPU) BF16 pair is bit-identical: it says nothing about run-to-run noise, so one
    repeat's verdicts stay unresolved instead of trusting the per-window SE alone."""
    from yxanul.bench.quality import FORK_NOISE_MODE, paired_rows
    ref = [3.0, 3.1, 2.9, 3.0, 3.05]
    windows = {("bf16", 0): ref, (FORK_NOISE_MODE, 0): list(ref), ("fp8-tensorwise", 0): [x * 1.0015 for x in ref]}
    row = next(r for r in paired_rows(windows, ["bf16", FORK_NOISE_MODE, "fp8-tensorwise"])
               if r["mode"] == "fp8-tensorwise")
    assert row["run_noise_pct"] is None and row["se_pct"] is None
    assert set(row["verdicts"].values()) == {"unresolved"}


def test_repeats_for_a_target_se_by_hand():
    """R such that sqrt(window_se^2 + 0.75 noise^2 / R) <= target: at the recorded 0.156% pair noise and a
    0.01% window SE, 0.08% takes 3 repeats (0.75 * 0.0243 / 0.0063 = 2.9) and 0.05% takes 8 (7.6); a target
    below the window SE cannot be reached by repeats."""
    from yxanul.bench.quality import repeats_for_se
    assert repeats_for_se(0.08, 0.156, 0.01) == 3
    assert repeats_for_se(0.05, 0.156, 0.01) == 8
    assert repeats_for_se(0.05, 0.156, 0.06) is None
    assert repeats_for_se(0.2, 0.156, 0.01) == 1
    # against one BF16 run instead of the pair's mean: the full pair variance
    assert repeats_for_se(0.05, 0.156, 0.01, factor=1.0) == 11
