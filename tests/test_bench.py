"""`yxanul bench throughput` on the CPU: JSON schema, per-mode error rows, bad input."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from yxanul.bench.throughput import ROW_KEYS, flops_per_token, parse_modes
from yxanul.cli import main
from yxanul.errors import YxanulError

ARGS = ["bench", "throughput", "--model", "tiny", "--batch", "2", "--seq", "16", "--steps", "1", "--warmup", "1",
        "--no-compile", "--layers", "1", "--device", "cpu"]


def test_throughput_json_schema_and_error_rows(tmp_path, capsys):
    out = tmp_path / "bt.json"
    png = tmp_path / "bt.png"
    rc = main(ARGS + ["--modes", "bf16-plain,bf16,fp8,fp8-blockwise,torchao-tensorwise", "--json-out", str(out),
                      "--plot", str(png)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res) == {"device", "torch", "date", "model", "batch", "seq", "compile_mode", "tune_kernels", "compile_scope",
                        "fp8_options", "host_gc", "plain_matmul_padding", "plain_vocab_multiple", "rows"}
    assert res["host_gc"] == "freeze"
    assert res["compile_mode"] is None and res["tune_kernels"] is None and res["compile_scope"] is None
    assert res["fp8_options"] == {"kernels": "auto", "weight_cache": "graph", "fused_producers": False,
                                  "fused_tensor_projections": False,
                                  "fprop_fast_accum": False}
    assert res["batch"] == 2 and res["seq"] == 16 and res["device"] == "cpu"
    assert [r["mode"] for r in res["rows"]] == ["bf16-plain", "bf16", "fp8", "fp8-blockwise", "torchao-tensorwise"]
    for r in res["rows"]:
        assert set(ROW_KEYS) <= set(r)
        assert r.get("peak_timed_gib") is None   # CUDA only, like peak_mem_gib
    ok = {r["mode"]: r for r in res["rows"] if r["error"] is None and not r.get("skipped")}
    assert {"bf16-plain", "bf16", "fp8", "fp8-blockwise"} <= set(ok)
    # `fp8` is the policy's linears with the fastest measured recipe, not the policy's own (blockwise)
    assert "recipe delayed" in ok["fp8"]["notes"] and "recipe blockwise" in ok["fp8-blockwise"]["notes"]
    for r in ok.values():
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0
        assert r["tokens_per_s"] == pytest.approx(2 * 16 / (r["step_ms"] / 1000), rel=1e-3, abs=0.06)
    assert ok["bf16-plain"]["ratio_vs_bf16_plain"] == 1.0 and ok["bf16"]["ratio_vs_bf16"] == 1.0
    assert ok["bf16"]["ratio_vs_bf16_plain"] == pytest.approx(
        ok["bf16"]["tokens_per_s"] / ok["bf16-plain"]["tokens_per_s"], rel=1e-3, abs=1e-4)
    try:
        import torchao.float8  # noqa: F401
    except ImportError:   # skipped with a note, not a failure
        ao = res["rows"][-1]
        assert "torchao" in ao["skipped"] and ao["error"] is None and ao["tokens_per_s"] is None
    else:
        assert res["rows"][-1]["tokens_per_s"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "bf16-plain" in printed


@pytest.mark.parametrize("extra", [
    ["--modes", "bf16,fp9"],
    ["--modes", "bf16,bf16"],
    ["--modes", "bf16", "--seq", "5000"],
    ["--modes", "bf16", "--batch", "0"],
    ["--modes", "bf16", "--plot", "x.svg"],
    ["--modes", "bf16", "--model", "no-such-model"],
    ["--modes", "bf16", "--compile-mode", "fastest"],
    ["--modes", "bf16", "--tune-kernels"],  # with ARGS' --no-compile
    ["--modes", "bf16", "--plain-compile-modes", "default,fastest"],
    ["--modes", "bf16", "--compile-scope", "layers"],
])
def test_bad_input_exits_2_without_output(tmp_path, extra, capsys):
    out = tmp_path / "bt.json"
    argv = ARGS + extra + ["--json-out", str(out)]  # a later --seq/--batch overrides the one in ARGS
    assert main(argv) == 2
    assert not out.exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err


def test_parse_modes_and_flops(tiny_cfg):
    assert parse_modes("bf16, fp8") == ["bf16", "fp8"]
    with pytest.raises(YxanulError):
        parse_modes("")
    f = flops_per_token(tiny_cfg, 128)
    d, L = tiny_cfg.d_model, tiny_cfg.n_layers
    per_layer = d * 256 * 2 + d * 128 * 2 + 3 * d * 768  # q,o: 4 heads x 64; k,v: 2 x 64; SwiGLU
    assert f == 6.0 * (L * per_layer + 257 * d) + 6.0 * L * 4 * 64 * 128


def test_bench_without_subcommand_shows_help(capsys):
    assert main(["bench"]) == 2
    assert "throughput" in capsys.readouterr().out


def test_profile_summary_categories_and_idle():
    from yxanul.bench.profile import CATEGORIES, classify, summarize
    assert classify("nvjet_sm90_qqtst_128x160_128x5_2x1_v_bz_coopA_algo2_TNT") == "fp8_gemm"
    assert classify("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "gemm"
    assert classify("_lce_bwd_dw_kernel") == "cross_entropy"
    assert classify("_act_quant_t_kernel") == "fp8_quant"
    assert classify("triton_red_fused__to_copy_abs_amax_mul_silu_view_22") == "fp8_quant_fused"
    assert classify("triton_poi_fused__unsafe_view_mul_silu_8") == "fused_elementwise"
    assert classify("Memcpy DtoD (Device -> Device)") == "copy"
    assert classify("something_else") == "other"
    kern = [("nvjet_sm90_tst_x", 3000.0, 4), ("_lce_fwd_kernel", 1000.0, 2), ("weird", 0.0, 1)]
    s = summarize(kern, steps=2, step_ms=2.5)
    assert s["gpu_busy_ms"] == 2.0 and s["idle_ms"] == 0.5
    assert s["categories_ms"] == {"gemm": 1.5, "cross_entropy": 0.5}
    assert set(s["categories_ms"]) <= set(CATEGORIES)
    assert s["top_kernels"][0]["calls_per_step"] == 2.0 and len(s["kernels"]) == 2


def test_profile_counts_kernels_not_the_annotations_around_them():
    """The optimizer's record_function range shows on the GPU timeline as an event spanning its kernels:
    counted, it doubled the optimizer's time in every profile."""
    from types import SimpleNamespace as E

    from torch.autograd import DeviceType

    from yxanul.bench.profile import device_kernels
    events = [E(key="multi_tensor_apply_kernel", device_type=DeviceType.CUDA, is_user_annotation=False,
                self_device_time_total=2000.0, count=10),
              E(key="Optimizer.step#AdamW.step", device_type=DeviceType.CUDA, is_user_annotation=True,
                self_device_time_total=2100.0, count=1),
              E(key="aten::add_", device_type=DeviceType.CPU, is_user_annotation=False,
                self_device_time_total=0.0, count=5)]
    assert device_kernels(events) == [("multi_tensor_apply_kernel", 2000.0, 10)]


def _plain_state_from_yxanul(sd):
    """Yxanul parameter names -> PlainLM's."""
    ren = {"embeddings.tok.": "tok.", "embeddings.proj.": "proj.", "layers.": "blocks.", "attn.q_proj": "q",
           "attn.k_proj": "k", "attn.v_proj": "v", "attn.o_proj": "o", "mlp.gate_proj": "gate", "mlp.up_proj": "up",
           "mlp.down_proj": "down", "attn_norm.weight": "attn_norm", "mlp_norm.weight": "mlp_norm",
           "lm_head.": "head."}
    out = {}
    for k, v in sd.items():
        k = "norm" if k == "norm.weight" else k
        for a, b in ren.items():
            k = k.replace(a, b)
        out[k] = v
    return out


@pytest.mark.parametrize("model,overrides", [("yxanul-197m", {}), ("tiny", {}), ("tiny", {"embed_rank": 32}),
                                             ("tiny", {"tie_embeddings": False})])
def test_plain_model_is_the_same_architecture(model, overrides):
    import torch

    from yxanul.bench.plain import PlainLM
    from yxanul.config import load_model_config
    from yxanul.model import Yxanul

    cfg = load_model_config(model, overrides)
    with torch.device("meta"):
        ours, plain = Yxanul(cfg), PlainLM(cfg)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in ours.parameters())
    if model != "tiny":
        return
    torch.manual_seed(0)
    ours = Yxanul(cfg)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    plain = PlainLM(cfg)
    missing, unexpected = plain.load_state_dict(_plain_state_from_yxanul(ours.state_dict()), strict=False)
    assert missing == [] and unexpected == []
    idx = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    x, y = idx[:, :-1], idx[:, 1:]
    torch.testing.assert_close(plain(x, y), ours(x, y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"embed_rank": 0}, {"tie_embeddings": False}])
def test_plain_vocab_multiple_pads_rows_that_are_never_a_target(overrides):
    """PlainLM(vocab_multiple=64): tiny's 257-token vocabulary becomes 320 embedding (and untied head) rows; with
    the padded rows' logits at -inf it is the plain model exactly (the same loss and, on the shared rows, the
    same gradients), and with them as trained they only add to the softmax's normalizer."""
    from yxanul.bench.plain import PlainLM
    from yxanul.config import load_model_config

    cfg = load_model_config("tiny", overrides)
    torch.manual_seed(0)
    plain = PlainLM(cfg)
    padded = PlainLM(cfg, vocab_multiple=64)
    extra = 63 * (cfg.embed_rank or cfg.d_model) + (63 * cfg.d_model if not cfg.tie_embeddings else 0)
    assert sum(p.numel() for p in padded.parameters()) == sum(p.numel() for p in plain.parameters()) + extra
    state = {k: (torch.cat([v, torch.zeros(63, v.shape[1])]) if v.shape[0] == cfg.vocab_size else v)
             for k, v in plain.state_dict().items()}
    padded.load_state_dict(state)
    idx = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    x, y = idx[:, :-1], idx[:, 1:]
    z = padded.logits(x)
    assert z.shape[-1] == 320
    torch.testing.assert_close(z[..., :cfg.vocab_size], plain.logits(x), rtol=1e-5, atol=1e-6)
    # zero rows give zero logits: the padded model's loss is the plain one's with 63 more exp(0) terms
    ref = torch.logsumexp(torch.cat([plain.logits(x), torch.zeros(2, 32, 63)], -1), -1) \
        - plain.logits(x).gather(-1, y[..., None])[..., 0]
    torch.testing.assert_close(padded(x, y), ref.mean(), rtol=1e-5, atol=1e-6)
    masked = z.clone()
    masked[..., cfg.vocab_size:] = float("-inf")
    loss = torch.nn.functional.cross_entropy(masked.float().flatten(0, 1), y.flatten())
    torch.testing.assert_close(loss, plain(x, y), rtol=1e-5, atol=1e-6)
    for bad in (0, -64, 1.5, True):
        with pytest.raises(ValueError, match="vocab_multiple"):
            PlainLM(cfg, vocab_multiple=bad)


def test_plain_takes_the_faster_compile_mode_and_matmul_padding():
    import torch

    from yxanul.bench.throughput import _time_best, plain_variants

    both, pads = ["default", "reduce-overhead"], ["default", "off"]
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert plain_variants(True, cuda, both) == [(None, "default", 1), ("reduce-overhead", "default", 1)]
    assert plain_variants(True, cuda, both[1:], pads) == [("reduce-overhead", "default", 1),
                                                          ("reduce-overhead", "off", 1)]
    assert plain_variants(True, cuda, both[:1], pads[:1], [1, 64]) == [(None, "default", 1), (None, "default", 64)]
    # GEMM padding and vocabulary size concern CUDA's GEMMs: elsewhere the first of each
    assert plain_variants(True, cpu, both, pads, [64, 1]) == [(None, "default", 64)]
    assert plain_variants(False, cuda, both, pads, [64, 1]) == [(None, "default", 64)]
    gcs = {"gc_ms_per_step": 0.0, "gc_collections": [0, 0, 0]}
    fake = {(None, "default", 1): (10.0, 30.0, 1.0, 2.0, [], None, gcs),
            ("reduce-overhead", "default", 1): (8.0, 40.0, 1.0, 2.0, [], None, gcs),
            ("reduce-overhead", "off", 1): (7.5, 28.0, 1.0, 2.0, [], None, gcs),
            ("reduce-overhead", "default", 64): (7.8, 30.0, 1.0, 2.0, [], None, gcs)}
    best, (ms, peak, _, _, notes, _, _) = _time_best("bf16-plain", list(fake), fake.__getitem__, lambda s: None)
    assert best == ("reduce-overhead", "off", 1) and (ms, peak) == (7.5, 28.0)
    assert "compile mode reduce-overhead, matmul padding off (step ms" in notes[0] and "default 10.00" in notes[0]
    assert "reduce-overhead 8.00, 40.00" in notes[0] and "peak GiB" in notes[0]
    assert "reduce-overhead, vocabulary padded to a multiple of 64 7.80, 30.00" in notes[0]


def test_plain_matmul_padding_reaches_inductor_for_the_plain_modes_only(tmp_path, monkeypatch):
    """--plain-matmul-padding off compiles bf16-plain and torchao with inductor's shape_padding off, and the
    project's modes as before; a bad value is one line, exit 2."""
    import torch._inductor.config as inductor_config

    import yxanul.bench.throughput as bt
    seen = []
    real = bt._Run.__init__

    def spy(self, mode, *a, **kw):
        seen.append((mode, inductor_config.shape_padding))
        real(self, mode, *a, **kw)
    monkeypatch.setattr(bt._Run, "__init__", spy)
    monkeypatch.setattr(bt, "plain_variants",
                        lambda c, d, cms, pads=("default",), al=(1,): [(None, p, a) for p in pads for a in al])
    out = tmp_path / "bt.json"
    assert main(ARGS + ["--modes", "bf16-plain,bf16", "--plain-matmul-padding", "default,off",
                        "--json-out", str(out)]) == 0
    default = inductor_config.shape_padding
    assert seen == [("bf16-plain", default), ("bf16-plain", False), ("bf16", default)]
    res = json.loads(out.read_text())
    assert res["plain_matmul_padding"] == ["default", "off"]
    assert "default, matmul padding off" in res["rows"][0]["notes"]
    for bad in ("on", "off,off", ""):
        assert main(ARGS + ["--modes", "bf16-plain", "--plain-matmul-padding", bad]) == 2


def test_torchao_takes_the_matmul_padding_bf16_plain_chose(tmp_path, monkeypatch):
    """With --plain-matmul-padding default,off, bf16-plain times both and keeps the faster; a torchao mode after
    it compiles with that choice only (and says so), one before it (or without bf16-plain) tries both."""
    import yxanul.bench.throughput as bt
    calls = []
    gcs = {"gc_ms_per_step": 0.0, "gc_collections": [0, 0, 0], "peak_timed_gib": None}

    def fake(mode, cfg, device, compile_, *a, matmul_padding=None, **kw):
        calls.append((mode, matmul_padding))
        return (9.0 if matmul_padding == "off" else 10.0), None, 0.0, 1.0, [], None, dict(gcs)
    monkeypatch.setattr(bt, "_time_mode", fake)
    monkeypatch.setattr(bt, "torchao_missing", lambda: None)
    monkeypatch.setattr(bt, "plain_variants",
                        lambda c, d, cms, pads=("default",), al=(1,): [(None, p, a) for p in pads for a in al])
    out = tmp_path / "bt.json"
    assert main(ARGS + ["--modes", "torchao-rowwise,bf16-plain,torchao-tensorwise", "--plain-matmul-padding",
                        "default,off", "--json-out", str(out)]) == 0
    assert calls == [("torchao-rowwise", "default"), ("torchao-rowwise", "off"), ("bf16-plain", "default"),
                     ("bf16-plain", "off"), ("torchao-tensorwise", "off")]
    rows = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    # (the vocabulary padded to a multiple of 64 is the default: the notes name it)
    assert "matmul padding off, vocabulary padded to a multiple of 64, as bf16-plain's fastest" in \
        rows["torchao-tensorwise"]["notes"]
    assert "matmul padding off, vocabulary padded to a multiple of 64 (step ms" in rows["torchao-rowwise"]["notes"]


def test_plain_vocab_multiple_reaches_the_plain_model_and_torchao_follows(tmp_path, monkeypatch):
    """--plain-vocab-multiple 1,64 builds bf16-plain's PlainLM with each vocabulary size and keeps the faster; a
    torchao mode after it builds the plain model with that size (and says so); the project's modes never see it; a
    bad value is one line, exit 2, before any mode runs."""
    import yxanul.bench.plain as bp
    import yxanul.bench.throughput as bt
    built = []
    real = bp.PlainLM.__init__

    def spy(self, c, vocab_multiple=1):
        built.append(vocab_multiple)
        real(self, c, vocab_multiple)
    monkeypatch.setattr(bp.PlainLM, "__init__", spy)
    monkeypatch.setattr(bt, "plain_variants",
                        lambda c, d, cms, pads=("default",), al=(1,): [(None, p, a) for p in pads for a in al])
    real_time = bt._time_mode

    def timed(mode, *a, vocab_multiple=1, **kw):   # the padded vocabulary is the faster one here
        res = real_time(mode, *a, vocab_multiple=vocab_multiple, **kw)
        return (res[0] / 2 if vocab_multiple == 64 else res[0],) + tuple(res[1:])
    monkeypatch.setattr(bt, "_time_mode", timed)
    seen = []
    real_run = bt._Run.__init__

    def run_spy(self, mode, *a, **kw):
        seen.append(mode)
        real_run(self, mode, *a, **kw)
    monkeypatch.setattr(bt._Run, "__init__", run_spy)
    out = tmp_path / "bt.json"
    assert main(ARGS + ["--modes", "bf16-plain,bf16", "--plain-vocab-multiple", "1,64", "--json-out", str(out)]) == 0
    assert built == [1, 64] and seen == ["bf16-plain", "bf16-plain", "bf16"]
    res = json.loads(out.read_text())
    assert res["plain_vocab_multiple"] == [1, 64]
    assert "compile mode default, vocabulary padded to a multiple of 64 (step ms" in res["rows"][0]["notes"]
    assert bt.parse_vocab_multiple((1,)) == [1] and bt.parse_vocab_multiple([64, 1]) == [64, 1]  # the Python API's
    for bad in ("0", "1,1", "x", "", "64,-1"):
        built.clear()
        assert main(ARGS + ["--modes", "bf16-plain", "--plain-vocab-multiple", bad]) == 2
        assert built == []

    # torchao (its conversion faked: what is checked is the vocabulary size it is timed with)
    calls = []
    gcs = {"gc_ms_per_step": 0.0, "gc_collections": [0, 0, 0], "peak_timed_gib": None}

    def fake(mode, *a, matmul_padding=None, vocab_multiple=1, **kw):
        calls.append((mode, vocab_multiple))
        return (9.0 if vocab_multiple == 64 else 10.0), None, 0.0, 1.0, [], None, dict(gcs)
    monkeypatch.setattr(bt, "_time_mode", fake)
    monkeypatch.setattr(bt, "torchao_missing", lambda: None)
    assert main(ARGS + ["--modes", "torchao-rowwise,bf16-plain,torchao-tensorwise", "--plain-vocab-multiple", "1,64",
                        "--json-out", str(out), "--overwrite"]) == 0
    assert calls == [("torchao-rowwise", 1), ("torchao-rowwise", 64), ("bf16-plain", 1), ("bf16-plain", 64),
                     ("torchao-tensorwise", 64)]
    rows = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    follows = "matmul padding default, vocabulary padded to a multiple of 64, as bf16-plain's fastest"
    assert follows in rows["torchao-tensorwise"]["notes"]


def test_width_sweep_json_and_png(tmp_path, capsys):
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    argv = ARGS + ["--modes", "bf16-plain,bf16,fp8-tensorwise,torchao-tensorwise", "--sweep", "d_model=128,256",
                   "--json-out", str(out), "--plot", str(png)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert res["sweep"] == "d_model" and res["values"] == [128, 256]
    pts = res["points"]
    assert [(p["d_model"], p["n_heads"], p["n_kv_heads"]) for p in pts] == [(128, 2, 1), (256, 4, 2)]
    assert pts[0]["params"] < pts[1]["params"] and all(p["batch"] == 2 for p in pts)   # CPU: the batch asked for
    assert res["ratio_vs_bf16"]["bf16"] == [1.0, 1.0]
    for i, p in enumerate(pts):
        rows = {r["mode"]: r for r in p["result"]["rows"]}
        assert p["result"]["model"] == f"tiny@d{p['d_model']}" and p["n_layers"] == 1   # --layers kept
        tps = rows["fp8-tensorwise"]["tokens_per_s"] / rows["bf16"]["tokens_per_s"]
        assert res["ratio_vs_bf16"]["fp8-tensorwise"][i] == pytest.approx(tps, rel=1e-3, abs=1e-4)
        assert res["ratio_vs_bf16_plain"]["bf16-plain"][i] == 1.0
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        assert res["ratio_vs_bf16"]["torchao-tensorwise"] == [None, None]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "width sweep" in capsys.readouterr().out


def test_compile_scope_reaches_the_projects_modes_only(tmp_path, monkeypatch):
    """--compile-scope trunk compiles the project's modes (bf16, fp8-*) as one trunk graph; bf16-plain keeps its
    whole-model compile. Compilation is recorded, not run (the modes then run eagerly on the CPU)."""
    import yxanul.model as ym
    seen = []
    monkeypatch.setattr(ym, "compile_model", lambda m, scope, **kw: seen.append((type(m).__name__, scope)) or m)
    monkeypatch.setattr(torch, "compile", lambda m, **kw: seen.append((type(m).__name__, "whole")) or m)
    out = tmp_path / "bt.json"
    args = [a for a in ARGS if a != "--no-compile"]
    assert main(args + ["--modes", "bf16-plain,bf16,fp8-tensorwise", "--compile-scope", "trunk",
                        "--json-out", str(out)]) == 0
    assert seen == [("PlainLM", "whole"), ("Yxanul", "trunk"), ("Yxanul", "trunk")]
    assert json.loads(out.read_text())["compile_scope"] == "trunk"


def test_width_sweep_keeps_the_fp8_and_host_gc_options(tmp_path):
    out = tmp_path / "sweep.json"
    assert main(ARGS + ["--modes", "bf16", "--sweep", "d_model=128", "--host-gc", "default",
                        "--fp8-weight-cache", "step", "--json-out", str(out)]) == 0
    result = json.loads(out.read_text())["points"][0]["result"]
    assert result["host_gc"] == "default" and result["fp8_options"]["weight_cache"] == "step"


def test_width_sweep_resume_keeps_finished_widths_and_runs_the_rest(tmp_path):
    out = tmp_path / "sweep.json"
    base = ARGS + ["--modes", "bf16,fp8-tensorwise", "--json-out", str(out)]
    assert main(base + ["--sweep", "d_model=128"]) == 0
    first = json.loads(out.read_text())["points"][0]
    assert main(base + ["--sweep", "d_model=128,256", "--resume"]) == 0
    res = json.loads(out.read_text())
    assert [p["d_model"] for p in res["points"]] == [128, 256]
    assert res["points"][0] == first                     # kept as measured, not run again
    rows = {r["mode"]: r for r in res["points"][1]["result"]["rows"]}
    assert rows["fp8-tensorwise"]["tokens_per_s"] > 0 and len(res["ratio_vs_bf16"]["fp8-tensorwise"]) == 2
    assert res["ratio_vs_bf16"]["fp8-tensorwise"][0] == first["result"]["rows"][1]["ratio_vs_bf16"]
    # a width whose recorded row is malformed is measured again, not formatted
    res["points"][0]["result"]["rows"][1]["ratio_vs_bf16"] = "fast"
    out.write_text(json.dumps(res))
    assert main(base + ["--sweep", "d_model=128,256", "--resume"]) == 0
    assert isinstance(json.loads(out.read_text())["ratio_vs_bf16"]["fp8-tensorwise"][0], float)
    res = json.loads(out.read_text())
    first = res["points"][0]
    # a width where a mode failed is measured again
    res["points"][1]["result"]["rows"][1].update(tokens_per_s=None, error="RuntimeError: out of memory")
    out.write_text(json.dumps(res))
    assert main(base + ["--sweep", "d_model=128,256", "--resume"]) == 0
    again = json.loads(out.read_text())
    assert again["points"][0] == first and again["points"][1]["result"]["rows"][1]["tokens_per_s"] > 0


@pytest.mark.parametrize("case", ["other-steps", "other-modes", "other-padding", "other-vocab-multiple", "corrupt",
                                  "not-a-sweep", "no-sweep-flag"])
def test_width_sweep_resume_refuses_another_sweep(tmp_path, case, capsys):
    out = tmp_path / "sweep.json"
    base = ARGS + ["--modes", "bf16", "--json-out", str(out)]
    if case == "other-padding":   # a file written before --plain-matmul-padding resumes only without it
        assert main(base + ["--sweep", "d_model=128"]) == 0
        assert "plain_matmul_padding" not in json.loads(out.read_text())["settings"]
        base = base + ["--plain-matmul-padding", "default,off"]
    elif case == "other-vocab-multiple":   # recorded always (a file without it was the unpadded vocabulary)
        assert main(base + ["--sweep", "d_model=128", "--plain-vocab-multiple", "1"]) == 0
        assert json.loads(out.read_text())["settings"]["plain_vocab_multiple"] == "1"
    elif case in ("other-steps", "other-modes"):
        assert main(base + ["--sweep", "d_model=128"]) == 0
    else:
        out.write_text("{not json" if case == "corrupt" else '{"rows": []}')
    before = out.read_bytes()
    argv = base + ["--sweep", "d_model=128,256", "--resume"]
    if case == "other-steps":
        argv[argv.index("--steps") + 1] = "2"
    elif case == "other-modes":
        argv[argv.index("--modes") + 1] = "bf16,fp8-tensorwise"
    elif case == "no-sweep-flag":
        argv.remove("--sweep"), argv.remove("d_model=128,256")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert out.read_bytes() == before and "--resume" in err and "Traceback" not in err
    if case == "other-steps":
        assert "steps" in err


@pytest.mark.parametrize("sweep", ["width=128", "d_model=", "d_model=100", "d_model=128,128", "d_model=x"])
def test_sweep_bad_input(tmp_path, sweep, capsys):
    out = tmp_path / "s.json"
    assert main(ARGS + ["--modes", "bf16", "--sweep", sweep, "--json-out", str(out)]) == 2
    assert not out.exists() and "--sweep" in capsys.readouterr().err


def test_scaled_config_keeps_depth_and_scales_heads():
    from yxanul.bench.throughput import scaled_config
    from yxanul.config import load_model_config

    base = load_model_config("yxanul-197m")
    got = [(c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_hidden, c.embed_rank)
           for c in (scaled_config(base, d) for d in (768, 1024, 1536, 2048))]
    assert got == [(28, 12, 2, 2048, 128), (28, 16, 2, 2688, 128), (28, 24, 4, 4096, 128), (28, 32, 4, 5504, 128)]


def test_sweep_batch_fits_the_memory_estimate():
    from yxanul.bench.throughput import fitting_batch, scaled_config
    from yxanul.config import load_model_config
    from yxanul.memory import MemoryOptions, estimate
    from yxanul.precision import load_policy

    cfg = scaled_config(load_model_config("yxanul-197m"), 2048)
    budget = 0.85 * 80e9

    def need(b, fused):
        return estimate(cfg, load_policy(), MemoryOptions(batch=b, seq=2048, precision="bf16", fused_ce=fused))[
            "total_bytes"]

    b = fitting_batch(cfg, None, 16, 2048, budget, ["bf16", "fp8"])
    assert need(b, "on") <= budget < need(2 * b, "on") and b < 16
    plain = fitting_batch(cfg, None, 16, 2048, budget, ["bf16-plain", "bf16"])   # full logits: a smaller batch
    assert plain <= b and max(need(plain, "on"), need(plain, "off")) <= budget < need(2 * plain, "off")
    # compiled, as the bench runs the modes: the project's with compiled blocks, the plain one compiled whole
    def need_c(b_, fused, scope):
        return estimate(cfg, load_policy(), MemoryOptions(batch=b_, seq=2048, precision="bf16", fused_ce=fused,
                                                          compiled=scope))["total_bytes"]

    bc = fitting_batch(cfg, None, 16, 2048, budget, ["bf16", "fp8"], compiled=True)
    assert bc >= b and need_c(bc, "on", "blocks") <= budget < need_c(2 * bc, "on", "blocks")
    # the plain model as the bench builds it: the vocabulary padded to a multiple of 64, so the loss's gradient
    # takes the saved logits' buffer; unpadded (1, or 1 among several timed) inductor's padded copy sits beside
    plain_cfg = dataclasses.replace(cfg, vocab_size=200064)

    def need_p(b_, c=plain_cfg):
        return estimate(c, load_policy(), MemoryOptions(batch=b_, seq=2048, precision="bf16", fused_ce="off",
                                                        compiled="model", device="cuda"))["total_bytes"]

    pc = fitting_batch(cfg, None, 16, 2048, budget, ["bf16-plain", "bf16"], compiled=True)
    assert plain <= pc <= bc and need_p(pc) <= budget < need_p(2 * pc)
    # Yxanul-197M in 25.5 GB: the unpadded plain model's two logit tensors halve its batch
    c197 = load_model_config("yxanul-197m")
    p197 = dataclasses.replace(c197, vocab_size=200064)
    small = 25.5e9
    pu = fitting_batch(c197, None, 16, 2048, small, ["bf16-plain"], compiled=True, plain_vocab_multiple="64,1")
    pp = fitting_batch(c197, None, 16, 2048, small, ["bf16-plain"], compiled=True, plain_vocab_multiple=64)
    assert (pu, pp) == (4, 8)
    assert need_p(pu, c197) <= small < need_p(2 * pu, c197) and need_p(pp, p197) <= small < need_p(2 * pp, p197)
    assert fitting_batch(cfg, None, 16, 2048, None, ["bf16"]) == 16


def test_quality_plot_refuses_an_existing_file_without_overwrite(tmp_path, capsys):
    png = tmp_path / "mine.png"
    png.write_bytes(b"a user's file")
    argv = ["bench", "quality", "--model", "tiny", "--tokens", "1000", "--out", str(tmp_path / "q"), "--plot", str(png)]
    assert main(argv) == 2
    assert "--plot" in capsys.readouterr().err and png.read_bytes() == b"a user's file"
    assert not (tmp_path / "q").exists()  # refused before any training


def test_profile_report_resummarizes_recorded_profiles_without_annotations(tmp_path):
    """scripts/profile_report.py re-reads a recorded bench JSON: the optimizer's GPU annotation (counted on top
    of its kernels by files written before the fix) is dropped from busy time and the optimizer category."""
    import subprocess
    import sys
    from pathlib import Path
    prof = {"steps": 2, "step_ms": 10.0,
            "kernels": [["multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata<4>>", 1.0, 5.0],
                        ["Optimizer.step#AdamW.step", 1.1, 1.0], ["nvjet_sm90_tst_x", 6.0, 4.0]]}
    src = tmp_path / "tp.json"
    src.write_text(json.dumps({"rows": [{"mode": "bf16", "profile": prof}, {"mode": "fp8", "profile": None}]}))
    script = Path(__file__).resolve().parents[1] / "scripts" / "profile_report.py"
    r = subprocess.run([sys.executable, str(script), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "bf16: step 10.0 ms, busy 7.0, idle 3.0 | gemm 6.0, optimizer 1.0" in r.stdout and "fp8" not in r.stdout
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    r = subprocess.run([sys.executable, str(script), str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and str(bad) in r.stderr


def test_fp8_mode_variants_run_side_by_side_in_one_process(tmp_path):
    """``MODE+fast-accum`` / ``MODE+swiglu-fp8`` time an FP8 choice next to the mode without it: the row keeps
    its name, notes what it changed (fast accumulation only where it applies: not on the CPU's emulated GEMMs),
    and bad variants are one-line errors."""
    from yxanul.bench.throughput import split_mode
    assert split_mode("fp8-delayed+fast-accum+swiglu-fp8") == ("fp8-delayed", ("fast-accum", "swiglu-fp8"))
    assert parse_modes("bf16,fp8-delayed,fp8-delayed+fast-accum") == ["bf16", "fp8-delayed", "fp8-delayed+fast-accum"]
    for bad in ("bf16+fast-accum", "fp8+bogus", "fp8+fast-accum+fast-accum", "nope+swiglu-fp8"):
        with pytest.raises(YxanulError, match="--modes"):
            parse_modes(bad)
    out = tmp_path / "v.json"
    assert main(ARGS + ["--modes", "fp8-tensorwise,fp8-tensorwise+swiglu-fp8,fp8-tensorwise+fast-accum",
                        "--json-out", str(out)]) == 0
    rows = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    assert all(r["error"] is None and r["tokens_per_s"] for r in rows.values())
    assert "SwiGLU inputs kept in FP8" in rows["fp8-tensorwise+swiglu-fp8"]["notes"]
    assert "SwiGLU" not in rows["fp8-tensorwise"]["notes"]
    assert "fast accumulation" not in rows["fp8-tensorwise+fast-accum"]["notes"]  # emulated GEMMs: no such mode


@pytest.mark.gpu
def test_timed_peak_is_the_steady_state_within_the_whole_peak(tmp_path):
    """peak_mem_gib spans building, warm-up (compilation) and the timed steps; peak_timed_gib the timed steps
    alone: positive and never above the whole; null under CUDA graphs, whose memory is taken at capture."""
    out = tmp_path / "bt.json"
    args = ["bench", "throughput", "--model", "tiny", "--batch", "4", "--seq", "256", "--steps", "3", "--warmup", "2",
            "--modes", "bf16-plain,bf16", "--device", "cuda", "--json-out", str(out)]
    assert main(args) == 0
    for r in json.loads(out.read_text())["rows"]:
        assert 0 < r["peak_timed_gib"] <= r["peak_mem_gib"], r
    graphs = tmp_path / "graphs.json"
    assert main(args[:-1] + [str(graphs), "--compile-mode", "reduce-overhead",
                             "--plain-compile-modes", "reduce-overhead"]) == 0
    for r in json.loads(graphs.read_text())["rows"]:
        assert r["peak_timed_gib"] is None and r["peak_mem_gib"] > 0, r


def test_weight_step_variant_changes_only_its_row(tmp_path):
    out = tmp_path / "bt.json"
    assert main(ARGS + ["--modes", "fp8-tensorwise,fp8-tensorwise+weight-step", "--json-out", str(out)]) == 0
    rows = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["fp8-tensorwise+weight-step"]["tokens_per_s"] > 0
    assert "weights quantized once per step" in rows["fp8-tensorwise+weight-step"]["notes"]
    assert "once per step" not in rows["fp8-tensorwise"]["notes"]


def test_peak_live_replays_an_allocator_trace_by_hand():
    """memtrace.peak_live: the live set at the traced peak, largest first, with frames; a block freed (requested
    or completed, whichever comes first) no longer counts; freeing a block from before recording lowers the
    count by its size, once."""
    from yxanul.bench.memtrace import peak_live
    f = [{"filename": __file__, "line": 1, "name": "call"}]
    ev = [{"action": "alloc", "addr": 1, "size": 100, "frames": f},
          {"action": "alloc", "addr": 2, "size": 400, "frames": f},
          {"action": "free_requested", "addr": 1},
          {"action": "free_completed", "addr": 1},           # already freed: not subtracted twice
          {"action": "alloc", "addr": 3, "size": 300, "frames": []},
          {"action": "free_requested", "addr": 99, "size": 250},   # allocated before recording: -250
          {"action": "free_completed", "addr": 99, "size": 250},   # the same free completing: not again
          {"action": "free_completed", "addr": 2},
          {"action": "alloc", "addr": 4, "size": 500}]
    r = peak_live(ev, min_bytes=200)
    assert r["peak_bytes"] == 700 and r["at_event"] == 4     # 400 + 300; after it 300 - 250 + 500 = 550
    ev.append({"action": "alloc", "addr": 5, "size": 200})
    r = peak_live(ev, min_bytes=200)
    assert r["peak_bytes"] == 750 and r["at_event"] == 9
    assert [b["bytes"] for b in r["live"]] == [500, 300, 200]
    r = peak_live(ev[:5], min_bytes=1)
    assert r["peak_bytes"] == 700 and [b["bytes"] for b in r["live"]] == [400, 300]
    assert r["live"][0]["frames"][0].startswith(f"{__file__}:1 call | ")  # the source line read back
    assert peak_live([])["peak_bytes"] == 0 and peak_live([])["live"] == []


@pytest.mark.gpu
def test_record_step_names_the_compiled_buffer_at_the_peak():
    """memtrace on CUDA: a compiled function's largest intermediate is alive at its peak, allocated by a line of
    inductor's generated code."""
    from yxanul.bench.memtrace import peak_live, record_step
    x = torch.randn(4096, 4096, device="cuda", requires_grad=True)
    f = torch.compile(lambda a: ((a @ a).float().exp().sum()))
    f(x).backward()
    r = peak_live(record_step(lambda: f(x).backward()), min_bytes=32 << 20)
    assert r["peak_bytes"] >= 4096 * 4096 * 4 and r["live"]
    assert any("empty_strided" in fr or "torchinductor" in fr for b in r["live"] for fr in b["frames"]), r


def test_sweep_batch_sets_each_widths_batch_and_is_part_of_the_settings(tmp_path, capsys):
    """--sweep-batch: one batch per width, recorded per point and in the settings a resume compares: a sweep run
    with it does not resume without it, and a file written without the option (no such key) resumes as before."""
    out = tmp_path / "sweep.json"
    base = ARGS + ["--modes", "bf16", "--json-out", str(out), "--sweep", "d_model=128,256"]
    assert main(base + ["--sweep-batch", "1,3"]) == 0
    res = json.loads(out.read_text())
    assert [p["batch"] for p in res["points"]] == [1, 3] and res["settings"]["sweep_batch"] == [1, 3]
    assert [p["result"]["batch"] for p in res["points"]] == [1, 3]
    before = out.read_bytes()
    capsys.readouterr()
    assert main(base + ["--resume"]) == 2 and "sweep_batch" in capsys.readouterr().err
    assert out.read_bytes() == before
    # a sweep without the option records no sweep_batch key, so older files resume: the first width is kept
    old = tmp_path / "old.json"
    argv = ARGS + ["--modes", "bf16", "--json-out", str(old)]
    assert main(argv + ["--sweep", "d_model=128"]) == 0
    first = json.loads(old.read_text())
    assert "sweep_batch" not in first["settings"]
    assert main(argv + ["--sweep", "d_model=128,256", "--resume"]) == 0
    assert json.loads(old.read_text())["points"][0] == first["points"][0]


@pytest.mark.parametrize("value,extra", [("1", []), ("1,x", []), ("1,0", []), ("2,2", ["nosweep"])])
def test_sweep_batch_bad_input(tmp_path, value, extra, capsys):
    out = tmp_path / "s.json"
    argv = ARGS + ["--modes", "bf16", "--json-out", str(out), "--sweep-batch", value]
    if not extra:
        argv += ["--sweep", "d_model=128,256"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert not out.exists() and "--sweep-batch" in err and "Traceback" not in err


def test_a_failed_eager_retry_names_the_compile_failure_too(tmp_path, monkeypatch):
    """When the compiled blocks fail and the eager retry fails as well (an eager step saves more, so a batch
    chosen for compiled blocks may not fit), the row's error names both failures; the run ends with status 1."""
    import yxanul.bench.throughput as bt
    real = bt._time_mode

    def fake(mode, cfg, device, compile_, *a, **kw):
        if mode == "bf16":
            raise (RuntimeError("inductor lowering broke") if compile_ else MemoryError("eager step too big"))
        return real(mode, cfg, device, compile_, *a, **kw)
    monkeypatch.setattr(bt, "_time_mode", fake)
    out = tmp_path / "bt.json"
    args = [a for a in ARGS if a != "--no-compile"]
    assert main(args + ["--modes", "bf16", "--json-out", str(out)]) == 1
    row = json.loads(out.read_text())["rows"][0]
    assert "inductor lowering broke" in row["error"] and "MemoryError: eager step too big" in row["error"]
    assert row["tokens_per_s"] is None


def test_only_torchao_modes_without_torchao_is_refused_up_front(tmp_path, monkeypatch, capsys):
    """Every mode asked for needs torchao and it is missing: one line, exit 2, no JSON (with another mode beside
    them the torchao rows are recorded as skipped instead)."""
    import yxanul.bench.throughput as bt
    monkeypatch.setattr(bt, "torchao_missing", lambda: "torchao is not importable (test)")
    out = tmp_path / "t.json"
    assert main(ARGS + ["--modes", "torchao-tensorwise,torchao-rowwise", "--json-out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("yxanul: error: --modes: torchao is not importable") and err.count("\n") == 1
    assert not out.exists()
