"""`yxanul quantize` / `yxanul dequantize` on small generated checkpoints."""
from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from yxanul.checkpoint.convert import dequantize_checkpoint, quantize_checkpoint
from yxanul.checkpoint.safetensors_header import INDEX_NAME, read_header
from yxanul.cli import main
from yxanul.fp8.quant import dequantize, quantize

H, I, V, KV = 192, 320, 300, 64   # hidden 192 and intermediate 320 leave partial 128-blocks on every axis
LINEARS = {"self_attn.q_proj": (H, H), "self_attn.k_proj": (KV, H), "self_attn.v_proj": (KV, H),
           "self_attn.o_proj": (H, H), "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H), "mlp.down_proj": (H, I)}


def _load(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.fixture
def hf_ckpt(tmp_path):
    """A 2-shard Llama-style BF16 checkpoint with index, config.json and a tokenizer file."""
    g = torch.Generator().manual_seed(0)
    def r(*s):
        return (torch.randn(*s, generator=g) * 0.05).to(torch.bfloat16)
    shards = [{"model.embed_tokens.weight": r(V, H)}, {"lm_head.weight": r(V, H), "model.norm.weight": r(H)}]
    for i in range(2):
        d = shards[i]
        d.update({f"model.layers.{i}.{m}.weight": r(*s) for m, s in LINEARS.items()})
        d[f"model.layers.{i}.input_layernorm.weight"] = r(H)
        d[f"model.layers.{i}.self_attn.q_proj.bias"] = r(H)
    shards[0]["model.position_ids"] = torch.arange(8)
    root = tmp_path / "src"
    root.mkdir()
    wm = {}
    for k, sd in enumerate(shards):
        name = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file(sd, str(root / name), metadata={"format": "pt"})
        wm.update({n: name for n in sd})
    (root / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": wm}))
    from transformers import LlamaConfig
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=3,
                      num_key_value_heads=1, tie_word_embeddings=False, torch_dtype="bfloat16")
    cfg.save_pretrained(root)
    (root / "tokenizer_config.json").write_text("{}")
    return root


def test_quantize_dequantize_round_trip(hf_ckpt, tmp_path, capsys):
    src = _load(hf_ckpt)
    out = tmp_path / "fp8"
    assert main(["quantize", str(hf_ckpt), str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    q = _load(out)
    # layout: every linear weight in F8_E4M3 plus an F32 [ceil(out/128), ceil(in/128)] scale_inv
    for i in range(2):
        for m, (o, n) in LINEARS.items():
            w = f"model.layers.{i}.{m}.weight"
            assert q[w].dtype == torch.float8_e4m3fn and q[w].shape == (o, n)
            s = q[w + "_scale_inv"]
            assert s.dtype == torch.float32 and s.shape == (math.ceil(o / 128), math.ceil(n / 128))
            eq, es = quantize(src[w], (128, 128), "e4m3")     # bit-identical to the library
            assert torch.equal(q[w].view(torch.uint8), eq.view(torch.uint8)) and torch.equal(s, es)
    # the note's policy keeps embeddings, norms, lm_head, biases and integer tensors as they were
    for k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight",
              "model.layers.1.self_attn.q_proj.bias", "model.position_ids"):
        assert q[k].dtype == src[k].dtype and torch.equal(q[k], src[k]), k
    assert set(q) == set(src) | {f"model.layers.{i}.{m}.weight_scale_inv" for i in range(2) for m in LINEARS}
    # index: scales live in their weight's shard; total_size is the data size
    ix = json.loads((out / INDEX_NAME).read_text())
    assert set(ix["weight_map"]) == set(q)
    for name, shard in ix["weight_map"].items():
        assert name in read_header(out / shard).tensors
    assert ix["metadata"]["total_size"] == sum(read_header(f).data_size for f in out.glob("*.safetensors"))
    for f in out.glob("*.safetensors"):     # every tensor aligned to its item size, header padded to 8 bytes
        h = read_header(f)
        assert h.data_start % 8 == 0
        assert all(t.offsets[0] % {"F8_E4M3": 1, "BF16": 2, "F32": 4, "I64": 8}[t.dtype] == 0
                   for t in h.tensors.values())
    # config.json with quantization_config, loadable by transformers' FP8 config class
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128] and qc["fmt"] == "e4m3"
    assert qc["activation_scheme"] == "dynamic" and "lm_head" in qc["modules_to_not_convert"]
    assert not any("proj" in m for m in qc["modules_to_not_convert"])
    from transformers import AutoConfig, FineGrainedFP8Config
    hf = AutoConfig.from_pretrained(out)
    fq = FineGrainedFP8Config.from_dict(hf.quantization_config)
    assert list(fq.weight_block_size) == [128, 128] and fq.activation_scheme == "dynamic"
    assert "lm_head" in fq.modules_to_not_convert
    assert (out / "tokenizer_config.json").exists()
    # the report: per-tensor error and totals
    t = rep["totals"]
    assert t["converted"] == 14 and t["bytes_after"] < 0.6 * t["bytes_before"]
    rows = {r["name"]: r for r in rep["tensors"]}
    w = "model.layers.0.mlp.down_proj.weight"
    x = src[w].float()
    ref = float((dequantize(q[w], q[w + "_scale_inv"], (128, 128)) - x).norm() / x.norm())
    assert rows[w]["rel_l2"] == pytest.approx(ref, rel=1e-6)
    assert rows[w]["sqnr_db"] == pytest.approx(-20 * math.log10(ref), rel=1e-6)
    assert 0 < t["rel_l2"] < 2 ** -4       # E4M3: at most 2**-4 relative per normal element
    assert rows["lm_head.weight"]["action"] == "kept"
    assert any("not divisible by 128" in w for w in rep["warnings"])     # 192 and 320 leave partial blocks

    # dequantize: back to BF16, scales dropped, config without quantization_config
    back = tmp_path / "bf16"
    assert main(["dequantize", str(out), str(back)]) == 0
    text = capsys.readouterr().out
    assert "rel L2" in text and "bytes:" in text
    d = _load(back)
    assert set(d) == set(src)
    for k in src:
        assert d[k].dtype == src[k].dtype, k
    for i in range(2):
        for m in LINEARS:
            w = f"model.layers.{i}.{m}.weight"
            exact = dequantize(q[w], q[w + "_scale_inv"], (128, 128)).to(torch.bfloat16)
            assert torch.equal(d[w], exact)
            assert float((d[w].float() - src[w].float()).norm() / src[w].float().norm()) < 2 ** -4
    ix2 = json.loads((back / INDEX_NAME).read_text())
    assert set(ix2["weight_map"]) == set(src)
    assert "quantization_config" not in json.loads((back / "config.json").read_text())
    # fp32 output
    assert main(["dequantize", str(out), str(tmp_path / "f32"), "--dtype", "fp32", "--json"]) == 0
    json.loads(capsys.readouterr().out)
    assert _load(tmp_path / "f32")["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32


def test_policy_skip_pow2_and_e5m2(hf_ckpt, tmp_path):
    pol = tmp_path / "pol.yaml"
    pol.write_text("precision_strategy:\n  ffn_compute: bfloat16\n")
    rep = quantize_checkpoint(hf_ckpt, tmp_path / "a", policy=str(pol), skip=["*.layers.1.*"], pow2_scales=True)
    q = _load(tmp_path / "a")
    assert q["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert q["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16               # policy
    assert q["model.layers.1.self_attn.q_proj.weight"].dtype == torch.bfloat16          # --skip
    rows = {r["name"]: r for r in rep["tensors"]}
    assert rows["model.layers.1.self_attn.q_proj.weight"]["reason"] == "--skip"
    assert "ffn_compute" in rows["model.layers.0.mlp.up_proj.weight"]["reason"]
    s = q["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    assert torch.equal(torch.log2(s), torch.round(torch.log2(s)))
    qc = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert qc["scale_fmt"] == "ue8m0" and "model.layers.0.mlp.up_proj" in qc["modules_to_not_convert"]
    pol.write_text("precision_strategy:\n  use_fp8: false\n")
    rep = quantize_checkpoint(hf_ckpt, tmp_path / "b", policy=str(pol))
    assert rep["totals"]["converted"] == 0
    rep = quantize_checkpoint(hf_ckpt, tmp_path / "c", fmt="e5m2", block=64)
    q = _load(tmp_path / "c")
    assert q["model.layers.0.mlp.down_proj.weight"].dtype == torch.float8_e5m2
    assert q["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (3, 5)
    back = dequantize_checkpoint(tmp_path / "c", tmp_path / "c2")
    assert back["totals"]["converted"] == 14


def test_yxanul_and_deepseek_names(tmp_path):
    from yxanul.config import load_model_config
    from yxanul.model import Yxanul
    torch.manual_seed(0)
    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in Yxanul(load_model_config("tiny")).state_dict().items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    rep = quantize_checkpoint(tmp_path / "model.safetensors", tmp_path / "q")
    kinds = {r["name"]: r["action"] for r in rep["tensors"]}
    assert kinds["layers.0.attn.q_proj.weight"] == "fp8" and kinds["layers.3.mlp.down_proj.weight"] == "fp8"
    assert kinds["embeddings.tok.weight"] == "kept" and kinds["norm.weight"] == "kept"
    assert rep["totals"]["converted"] == 28 and not (tmp_path / "q" / INDEX_NAME).exists()
    # DeepSeek MLA / MoE names follow attention_compute / ffn_compute; the router gate stays BF16
    g = torch.Generator().manual_seed(1)
    ds = {n: torch.randn(*s, generator=g).to(torch.bfloat16) for n, s in {
        "model.layers.0.self_attn.q_a_proj.weight": (48, 64), "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": (40, 64),
        "model.layers.0.self_attn.kv_b_proj.weight": (96, 32), "model.layers.0.mlp.gate.weight": (8, 64),
        "model.layers.0.mlp.experts.0.up_proj.weight": (32, 64), "model.layers.0.mlp.shared_experts.down_proj.weight": (64, 32),
        "model.layers.0.self_attn.kv_a_layernorm.weight": (32,)}.items()}
    (tmp_path / "ds").mkdir()
    save_file(ds, str(tmp_path / "ds" / "model.safetensors"))
    rep = quantize_checkpoint(tmp_path / "ds", tmp_path / "dsq", block=16)
    act = {r["name"]: r["action"] for r in rep["tensors"]}
    assert act == {**{n: "fp8" for n in ds}, "model.layers.0.mlp.gate.weight": "kept",
                   "model.layers.0.self_attn.kv_a_layernorm.weight": "kept"}


def _tree(p):
    return sorted(x.name for x in p.iterdir())


def test_bad_inputs_exit_2_and_leave_nothing(hf_ckpt, tmp_path, capsys):
    def fails(argv, match):
        before = _tree(tmp_path)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err and "Traceback" not in err, err
        assert _tree(tmp_path) == before          # no OUT, no temp folder left behind
    q = tmp_path / "q"
    assert main(["quantize", str(hf_ckpt), str(q)]) == 0
    capsys.readouterr()
    # OUT exists without --overwrite; with it, it is replaced
    fails(["quantize", str(hf_ckpt), str(q)], "--overwrite")
    assert main(["quantize", str(hf_ckpt), str(q), "--overwrite", "--block", "64"]) == 0
    capsys.readouterr()
    assert json.loads((q / "config.json").read_text())["quantization_config"]["weight_block_size"] == [64, 64]
    # quantizing an already-FP8 checkpoint
    fails(["quantize", str(q), str(tmp_path / "qq")], "dequantize it first")
    for bad in ("0", "100000"):   # past MAX_BLOCK the padded tile alone would not fit in memory
        fails(["quantize", str(hf_ckpt), str(tmp_path / "x"), "--block", bad], "block")
    bad_pol = tmp_path / "bad.yaml"
    bad_pol.write_text("precision_strategy:\n  ffn_compute: int4\n")
    fails(["quantize", str(hf_ckpt), str(tmp_path / "x"), "--policy", str(bad_pol)], "ffn_compute")

    # FP8 tensor without its scale; scale inconsistent with the block; orphan scale
    def edit(fn, name):
        d = tmp_path / name
        d.mkdir()
        sd = _load(q)
        fn(sd)
        save_file(sd, str(d / "model.safetensors"))
        cfg = json.loads((q / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(cfg))
        return d
    nos = edit(lambda sd: sd.pop("model.layers.0.mlp.up_proj.weight_scale_inv"), "noscale")
    fails(["dequantize", str(nos), str(tmp_path / "x")], "has no model.layers.0.mlp.up_proj.weight_scale_inv")
    wrong = edit(lambda sd: sd.update({"model.layers.0.mlp.up_proj.weight_scale_inv": torch.ones(2, 2)}), "wrong")
    fails(["dequantize", str(wrong), str(tmp_path / "x")], "inconsistent")
    orphan = edit(lambda sd: sd.update({"ghost.weight_scale_inv": torch.ones(1, 1)}), "orphan")
    fails(["dequantize", str(orphan), str(tmp_path / "x")], "has no weight")

    # truncated and corrupt shards, in both directions
    shard = sorted(q.glob("*.safetensors"))[0]
    cut = tmp_path / "cut"
    cut.mkdir()
    for f in q.iterdir():
        (cut / f.name).write_bytes(f.read_bytes())
    (cut / shard.name).write_bytes(shard.read_bytes()[:-10])
    fails(["dequantize", str(cut), str(tmp_path / "x")], "truncated")
    src_cut = tmp_path / "srccut.safetensors"
    src_cut.write_bytes(struct.pack("<Q", 10 ** 7) + b"{}")
    fails(["quantize", str(src_cut), str(tmp_path / "x")], "srccut.safetensors")
    fails(["quantize", str(tmp_path / "missing"), str(tmp_path / "x")], "no such file")

    # NaN in a weight: refused, nothing written
    nan = tmp_path / "nan"
    nan.mkdir()
    bad = {"model.layers.0.mlp.up_proj.weight": torch.randn(64, 64)}
    bad["model.layers.0.mlp.up_proj.weight"][3, 3] = float("nan")
    save_file(bad, str(nan / "model.safetensors"))
    fails(["quantize", str(nan), str(tmp_path / "x")], "NaN")


def test_corrupt_config_is_reported(hf_ckpt, tmp_path, capsys):
    (hf_ckpt / "config.json").write_text("{broken")
    assert main(["quantize", str(hf_ckpt), str(tmp_path / "x")]) == 2
    assert "config.json" in capsys.readouterr().err and not (tmp_path / "x").exists()
