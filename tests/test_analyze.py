"""`yxanul analyze`: header-only precision analysis on generated (sparse) checkpoints."""
from __future__ import annotations

import json
import math
import struct
import time

import pytest
import torch
from safetensors.torch import save_file

from yxanul.checkpoint.analyze import analyze, classify, infer_block, layer_of, render
from yxanul.checkpoint.safetensors_header import INDEX_NAME
from yxanul.cli import main

SIZES = {"F8_E4M3": 1, "BF16": 2, "F32": 4, "I64": 8}


def write_sparse(path, tensors):
    """A valid safetensors file whose data region is a hole: [(name, dtype, shape)] -> header only on disk."""
    hdr, pos = {"__metadata__": {"format": "pt"}}, 0
    for name, dt, shape in tensors:
        n = math.prod(shape) * SIZES[dt]
        hdr[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(hdr).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + pos)
    return path


def fp8_with_scale(name, shape, block=128):
    return [(name, "F8_E4M3", shape),
            (name + "_scale_inv", "F32", (-(-shape[0] // block), -(-shape[1] // block)))]


def deepseek_layer(i, moe: bool):
    p = f"model.layers.{i}"
    t = [(f"{p}.input_layernorm.weight", "BF16", (7168,)), (f"{p}.post_attention_layernorm.weight", "BF16", (7168,)),
         (f"{p}.self_attn.q_a_layernorm.weight", "BF16", (1536,)),
         (f"{p}.self_attn.kv_a_layernorm.weight", "BF16", (512,))]
    for name, shape in (("q_a_proj", (1536, 7168)), ("q_b_proj", (24576, 1536)),
                        ("kv_a_proj_with_mqa", (576, 7168)), ("kv_b_proj", (32768, 512)), ("o_proj", (7168, 16384))):
        t += fp8_with_scale(f"{p}.self_attn.{name}.weight", shape)
    if not moe:
        for name, shape in (("gate_proj", (18432, 7168)), ("up_proj", (18432, 7168)), ("down_proj", (7168, 18432))):
            t += fp8_with_scale(f"{p}.mlp.{name}.weight", shape)
        return t
    t += [(f"{p}.mlp.gate.weight", "BF16", (256, 7168)), (f"{p}.mlp.gate.e_score_correction_bias", "F32", (256,))]
    for e in range(4):
        for name, shape in (("gate_proj", (2048, 7168)), ("up_proj", (2048, 7168)), ("down_proj", (7168, 2048))):
            t += fp8_with_scale(f"{p}.mlp.experts.{e}.{name}.weight", shape)
    for name, shape in (("gate_proj", (2048, 7168)), ("up_proj", (2048, 7168)), ("down_proj", (7168, 2048))):
        t += fp8_with_scale(f"{p}.mlp.shared_experts.{name}.weight", shape)
    return t


@pytest.fixture
def deepseek_shard(tmp_path):
    tensors = [("model.embed_tokens.weight", "BF16", (129280, 7168))] + deepseek_layer(0, False) + \
        deepseek_layer(3, True) + [("model.norm.weight", "BF16", (7168,)), ("lm_head.weight", "BF16", (129280, 7168))]
    return write_sparse(tmp_path / "model-00001-of-000163.safetensors", tensors), tensors


def test_deepseek_shard(deepseek_shard, capsys):
    path, tensors = deepseek_shard
    t0 = time.perf_counter()
    rep = analyze(path)
    assert time.perf_counter() - t0 < 1.0
    assert rep["files"] == 1 and rep["tensors"] == len(tensors)
    assert rep["total_params"] == sum(math.prod(s) for _, _, s in tensors)
    assert rep["total_bytes"] == sum(math.prod(s) * SIZES[d] for _, d, s in tensors)
    bd = rep["by_dtype"]
    assert list(bd) == ["F8_E4M3", "BF16", "F32"]
    assert sum(d["params"] for d in bd.values()) == rep["total_params"]
    assert sum(d["percent"] for d in bd.values()) == pytest.approx(100.0, abs=1e-3)
    comp = rep["by_component"]
    assert set(comp) == {"embeddings", "norms", "attention", "mlp", "moe_experts", "shared_experts", "router",
                         "lm_head", "scales"}
    assert comp["attention"]["dtypes"] == ["F8_E4M3"] and comp["scales"]["dtypes"] == ["F32"]
    assert comp["router"]["dtypes"] == ["BF16", "F32"]       # gate weight + e_score_correction_bias
    assert comp["embeddings"]["params"] == 129280 * 7168 == comp["lm_head"]["params"]
    assert comp["moe_experts"]["params"] == 4 * 3 * 2048 * 7168
    # block-scale pairing and block inference, including the 576-row MLA projection (ceil(576/128) = 5)
    pairs = {p["weight"]: p for p in rep["block_scales"]}
    assert len(pairs) == sum(1 for n, _, _ in tensors if n.endswith("_scale_inv"))
    assert all(p["block"] == [128, 128] for p in pairs.values())
    assert pairs["model.layers.0.mlp.gate_proj.weight"]["scale"] == "model.layers.0.mlp.gate_proj.weight_scale_inv"
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in pairs
    assert not rep["warnings"]
    assert {v["layer"] for v in rep["by_layer"]} == {0, 3, None}
    # CLI: exactly one JSON object with the documented keys
    assert main(["analyze", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"files", "tensors", "total_params", "total_bytes", "by_dtype", "by_component", "block_scales"} <= set(out)
    assert set(out["by_dtype"]["F8_E4M3"]) == {"tensors", "params", "bytes", "percent"}
    assert set(out["by_component"]["mlp"]) == {"params", "bytes", "dtypes"}
    assert out["block_scales"][0].keys() == {"weight", "scale", "block"}
    for by, needle in (("dtype", "percent"), ("component", "MoE shared experts"), ("layer", "dtype mix")):
        assert main(["analyze", str(path), "--by", by]) == 0
        text = capsys.readouterr().out
        assert "Precision Distribution" in text and needle in text and "128x128" in text


def test_plot(deepseek_shard, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "dist.png"
    assert main(["analyze", str(deepseek_shard[0]), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["analyze", str(deepseek_shard[0]), "--plot", str(tmp_path / "x.jpg")]) == 2
    assert not (tmp_path / "x.jpg").exists()


def test_never_reads_tensor_data(tmp_path):
    # one declared tensor of 2**40 bytes (1 TiB) in a sparse file: reading it would be impossible here
    path = write_sparse(tmp_path / "huge.safetensors", [("w.weight", "BF16", (2 ** 20, 2 ** 19)),
                                                        ("n.weight", "F32", (16,))])
    t0 = time.perf_counter()
    rep = analyze(path)
    assert time.perf_counter() - t0 < 0.5
    assert rep["total_bytes"] == 2 ** 40 + 64


def test_sharded_index(tmp_path, capsys):
    names = {}
    for k in range(3):
        shard = f"model-0000{k + 1}-of-00003.safetensors"
        ts = deepseek_layer(k, moe=k == 2)
        write_sparse(tmp_path / shard, ts)
        names.update({n: shard for n, _, _ in ts})
    (tmp_path / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": names}))
    for target in (tmp_path, tmp_path / INDEX_NAME):
        rep = analyze(target)
        assert rep["files"] == 3 and rep["tensors"] == len(names)
        assert [v["layer"] for v in rep["by_layer"]] == [0, 1, 2]
    # an index naming a missing shard: one line naming the index, exit 2
    wm = dict(names, **{"extra.weight": "model-00004-of-00004.safetensors"})
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": wm}))
    assert main(["analyze", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and INDEX_NAME in err and "model-00004-of-00004.safetensors" in err


def test_many_shards_are_fast(tmp_path):
    names = {}
    for k in range(163):
        shard = f"model-{k + 1:05d}-of-00163.safetensors"
        ts = [(f"model.layers.{k}.mlp.experts.{e}.{m}.weight", "F8_E4M3", (256, 256)) for e in range(20)
              for m in ("gate_proj", "up_proj", "down_proj")]
        ts += [(n + "_scale_inv", "F32", (2, 2)) for n, _, _ in list(ts)]
        write_sparse(tmp_path / shard, ts)
        names.update({n: shard for n, _, _ in ts})
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": names}))
    t0 = time.perf_counter()
    rep = analyze(tmp_path)
    elapsed = time.perf_counter() - t0
    assert rep["files"] == 163 and rep["tensors"] == 163 * 120 and len(rep["block_scales"]) == 163 * 60
    assert elapsed < 5.0, elapsed


@pytest.mark.parametrize("content", [
    b"",                                                              # empty
    struct.pack("<Q", 10 ** 6) + b"{}",                               # declared length beyond the file
    struct.pack("<Q", 2 ** 62) + b"{}",                               # above the cap
    struct.pack("<Q", 4) + b"{oops",                                  # invalid JSON
    struct.pack("<Q", 2) + b"[]",                                     # not an object
    struct.pack("<Q", 58) + b'{"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}',      # unknown dtype
    struct.pack("<Q", 60) + b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}}' + b"\0" * 8,
    struct.pack("<Q", 60) + b'{"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}   ' + b"\0" * 8,
], ids=["empty", "past-end", "cap", "json", "array", "dtype", "range", "size"])
def test_hostile_files_exit_2(tmp_path, capsys, content):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(content)
    assert main(["analyze", str(p)]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.count("\n") == 1 and "bad.safetensors" in cap.err
    assert "Traceback" not in cap.err


def test_overlapping_offsets_exit_2(tmp_path, capsys):
    hdr = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
           "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    raw = json.dumps(hdr).encode()
    p = tmp_path / "ov.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 24)
    assert main(["analyze", str(p), "--json"]) == 2
    cap = capsys.readouterr()
    assert "overlap" in cap.err and cap.out == ""


def test_yxanul_and_hf_names(tmp_path):
    sd = {"embeddings.tok.weight": torch.zeros(10, 8), "embeddings.proj.weight": torch.zeros(16, 8),
          "layers.0.attn.q_proj.weight": torch.zeros(16, 16), "layers.0.mlp.down_proj.weight": torch.zeros(16, 32),
          "layers.0.attn_norm.weight": torch.zeros(16), "norm.weight": torch.zeros(16)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    rep = analyze(tmp_path / "m.safetensors")
    assert rep["by_component"]["embeddings"]["params"] == 80 + 128
    assert rep["by_component"]["norms"]["params"] == 32
    assert "Precision Distribution" in render(rep, "component")
    cases = {
        "transformer.h.3.attn.c_attn.weight": "attention", "transformer.h.3.mlp.c_fc.weight": "mlp",
        "transformer.h.3.attn.c_proj.weight": "attention", "transformer.h.3.mlp.c_proj.weight": "mlp",
        "transformer.wte.weight": "embeddings", "transformer.ln_f.weight": "norms",
        "model.layers.1.block_sparse_moe.gate.weight": "router",
        "model.layers.1.block_sparse_moe.experts.7.w1.weight": "moe_experts",
        "model.layers.1.mlp.shared_expert_gate.weight": "router",
        "model.layers.1.self_attn.q_proj.weight_scale_inv": "scales",
        "model.layers.1.self_attn.q_proj.input_scale": "scales",
        "model.layers.1.mlp.gate_proj.weight": "mlp", "model.layers.1.mlp.gate.weight": "router",
        "model.layers.61.shared_head.head.weight": "lm_head", "model.layers.61.shared_head.norm.weight": "norms",
        "model.layers.61.enorm.weight": "norms", "lm_head.weight": "lm_head", "rotary.inv_freq": "other",
    }
    for name, comp in cases.items():
        assert classify(name) == comp, name
    assert layer_of("model.layers.12.mlp.up_proj.weight") == 12 and layer_of("transformer.h.3.ln_1.bias") == 3
    assert layer_of("lm_head.weight") is None


def test_infer_block():
    assert infer_block((18432, 7168), (144, 56)) == [128, 128]
    assert infer_block((576, 7168), (5, 56)) == [128, 128]        # 576 = 4.5 blocks
    assert infer_block((300, 200), (3, 2)) == [128, 128]
    assert infer_block((256, 512), (4, 4)) == [64, 128]
    assert infer_block((7, 9), ()) == [7, 9]                       # per tensor
    assert infer_block((64, 32), (64, 1)) == [1, 32]               # per row
    assert infer_block((64, 32), (64,)) == [1, 32]                 # per output channel
    assert infer_block((100, 100), (3, 200)) is None               # more blocks than columns
    assert infer_block((10, 10), (2, 3, 4)) is None


def test_mismatched_scale_is_a_warning_not_a_pair(tmp_path):
    path = write_sparse(tmp_path / "m.safetensors", [("a.weight", "F8_E4M3", (256, 256)),
                                                     ("a.weight_scale_inv", "F32", (300, 2)),
                                                     ("b.weight_scale_inv", "F32", (2, 2))])
    rep = analyze(path)
    assert rep["block_scales"] == [] and len(rep["warnings"]) == 2


def test_run_folder_is_its_latest_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    for step, rows in ((1, 4), (2, 6)):
        d = run / "checkpoints" / f"step_{step:08d}"
        d.mkdir(parents=True)
        save_file({"layers.0.mlp.up_proj.weight": torch.zeros(rows, 8)}, str(d / "model.safetensors"))
        (d / "meta.json").write_text(json.dumps({"step": step}))
    (run / "checkpoints" / "latest").write_text("step_00000002")
    (run / "metrics.jsonl").write_text("")
    rep = analyze(run)
    assert rep["total_params"] == 48 and rep["path"].endswith("step_00000002/model.safetensors")
    assert main(["analyze", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == 48
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    assert main(["analyze", str(empty)]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.count("\n") == 1 and "no checkpoint" in cap.err
