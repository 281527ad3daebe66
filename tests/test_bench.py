"""`yxanul bench throughput` on the CPU: JSON schema, per-mode error rows, bad input."""
from __future__ import annotations

import json

import pytest

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
    assert set(res) == {"device", "torch", "date", "model", "batch", "seq", "compile_mode", "tune_kernels",
                        "fp8_options", "rows"}
    assert res["compile_mode"] is None and res["tune_kernels"] is None
    assert res["fp8_options"] == {"kernels": "auto", "weight_cache": "graph", "fused_swiglu": False}
    assert res["batch"] == 2 and res["seq"] == 16 and res["device"] == "cpu"
    assert [r["mode"] for r in res["rows"]] == ["bf16-plain", "bf16", "fp8", "fp8-blockwise", "torchao-tensorwise"]
    for r in res["rows"]:
        assert set(ROW_KEYS) <= set(r)
    ok = {r["mode"]: r for r in res["rows"] if r["error"] is None}
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
        import torchao  # noqa: F401
    except ImportError:
        ao = res["rows"][-1]
        assert "torchao" in ao["error"] and ao["tokens_per_s"] is None
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
