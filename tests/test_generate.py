import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from yxanul.cli import main
from yxanul.config import load_model_config
from yxanul.checkpoint.layout import sha256_of
from yxanul.errors import YxanulError
from yxanul.generate import KVCache, SamplingOptions, generate_ids, new_caches, sample_next
from yxanul.model import Yxanul


@pytest.fixture
def ckpt(tmp_path):
    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    m = Yxanul(cfg).eval()
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    save_file(m.state_dict(), str(step / "model.safetensors"))
    w = step / "model.safetensors"
    meta = {"step": 1, "model_config": dataclasses.asdict(cfg),
            "tokenizer": {"kind": "bytes", "path": None, "vocab_size": 257, "eot_id": 256},
            "files": {"model.safetensors": {"bytes": w.stat().st_size, "sha256": sha256_of(w)}}}
    (step / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000001")
    return tmp_path / "run", m


def test_kv_cached_logits_equal_full_forward(ckpt):
    _, m = ckpt
    idx = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = m(idx)
        caches = new_caches(m, 2, 20)
        parts = [m.logits(m.hidden(idx[:, :12], kv_caches=caches, pos=0))]
        for t in range(12, 20):
            parts.append(m.logits(m.hidden(idx[:, t:t + 1], kv_caches=caches, pos=t)))
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-5)
    assert caches[0].len == 20


def test_kv_cache_overflow():
    c = KVCache(1, 2, 4, 3)
    c.update(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4))
    with pytest.raises(ValueError):
        c.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4))


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, SamplingOptions(temperature=0), g).item() == 2
    assert {sample_next(logits, SamplingOptions(temperature=5.0, top_k=1), g).item() for _ in range(20)} == {2}
    got = {sample_next(logits, SamplingOptions(temperature=5.0, top_k=2), g).item() for _ in range(200)}
    assert got == {2, 3}
    assert {sample_next(logits, SamplingOptions(temperature=1.0, top_p=0.5), g).item() for _ in range(50)} == {2}


def test_seeded_generation_reproducible_and_greedy(ckpt, capsys):
    run, m = ckpt
    opts = SamplingOptions(max_new_tokens=16, temperature=1.0, seed=7, stop_at_eot=False)
    a = list(generate_ids(m, [72, 105], opts))
    b = list(generate_ids(m, [72, 105], opts))
    c = list(generate_ids(m, [72, 105], dataclasses.replace(opts, seed=8)))
    assert a == b and len(a) == 16 and a != c
    greedy = list(generate_ids(m, [72, 105], SamplingOptions(max_new_tokens=8, temperature=0, stop_at_eot=False)))
    idx = torch.tensor([[72, 105]])
    with torch.no_grad():
        for _ in range(8):  # reference: full forward each step, no cache
            idx = torch.cat([idx, m(idx)[:, -1].argmax(-1, keepdim=True)], 1)
    assert idx[0, 2:].tolist() == greedy
    args = ["generate", str(run), "--prompt", "Hi", "--max-new-tokens", "10", "--temperature", "0.9", "--seed", "3"]
    assert main(args) == 0
    out1 = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == out1


def test_generate_errors(ckpt, tmp_path, capsys):
    run, m = ckpt
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["generate", str(run), "--prompt", "x", "--top-p", "0"]) == 2
    assert main(["generate", str(run), "--prompt", "x", "--temperature", "-1"]) == 2
    assert main(["generate", str(run), "--prompt", ""]) == 2
    with pytest.raises(YxanulError, match="tokenizer mismatch"):
        list(generate_ids(m, [300], SamplingOptions(max_new_tokens=1)))
    # a prompt that fills the context leaves no room for a token: said, not an empty answer
    for n in (m.cfg.max_seq_len, m.cfg.max_seq_len + 1):
        with pytest.raises(YxanulError, match="leaves no room"):
            list(generate_ids(m, [1] * n, SamplingOptions(max_new_tokens=1)))
    assert len(list(generate_ids(m, [1] * (m.cfg.max_seq_len - 1), SamplingOptions(max_new_tokens=5)))) == 1
    step = run / "checkpoints" / "step_00000001"
    meta = json.loads((step / "meta.json").read_text())
    meta["model_config"]["vocab_size"] = 100
    (step / "meta.json").write_text(json.dumps(meta))
    assert main(["generate", str(run), "--prompt", "x"]) == 2
    # the recorded tokenizer (257 tokens) no longer fits the model: refused before the weights' shapes are read
    assert "tokenizer.vocab_size" in capsys.readouterr().err


def _greedy(m, n=8):
    return list(generate_ids(m, [72, 105], SamplingOptions(max_new_tokens=n, temperature=0, stop_at_eot=False)))


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_generate_from_exported_folder(ckpt, tmp_path, capsys, fp8):
    from yxanul.checkpoint.export import export_hf
    from yxanul.generate import load_for_generation

    run, _ = ckpt
    hf = tmp_path / "hf"
    export_hf(run, hf, fp8=fp8)
    ours, _ = load_for_generation(run)
    theirs, meta = load_for_generation(hf)
    assert meta["tokenizer"]["kind"] == "bytes"
    x = torch.randint(0, 257, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    tol = 0.15 if fp8 else 0.03  # BF16 rounding, FP8 block quantization of the linears
    assert (a - b).abs().max() < tol * a.abs().max()
    args = ["generate", str(hf), "--prompt", "Hi", "--max-new-tokens", "6", "--temperature", "0"]
    assert main(args) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert main(args + ["--model", "tiny"]) == 2
    assert "drop --model" in capsys.readouterr().err


def test_exported_folder_with_wrong_weights(ckpt, tmp_path, capsys):
    from yxanul.checkpoint.export import export_hf

    run, _ = ckpt
    hf = tmp_path / "hf"
    export_hf(run, hf)
    conf = json.loads((hf / "config.json").read_text())
    conf["intermediate_size"] = 512
    (hf / "config.json").write_text(json.dumps(conf))
    assert main(["generate", str(hf), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "do not match config.json" in err and "Traceback" not in err
    conf["model_type"] = "gpt2"
    (hf / "config.json").write_text(json.dumps(conf))
    assert main(["generate", str(hf), "--prompt", "x"]) == 2
    assert "model_type" in capsys.readouterr().err


def test_echo_prompt(ckpt, capsys):
    run, _ = ckpt
    args = ["generate", str(run), "--prompt", "Hello there", "--max-new-tokens", "5", "--temperature", "0"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--echo-prompt"]) == 0
    assert capsys.readouterr().out == "Hello there" + plain


def test_prompt_file(ckpt, tmp_path, capsys):
    run, _ = ckpt
    good = tmp_path / "p.txt"
    good.write_text("Hello there", encoding="utf-8")
    base = ["generate", str(run), "--max-new-tokens", "5", "--temperature", "0"]
    assert main(base + ["--prompt", "Hello there"]) == 0
    want = capsys.readouterr().out
    assert main(base + ["--prompt-file", str(good)]) == 0
    assert capsys.readouterr().out == want
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfeHi")
    assert main(base + ["--prompt-file", str(bad)]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.count("\n") == 1 and "bad.txt" in cap.err and "UTF-8" in cap.err


def test_hostile_generate_inputs_one_line(ckpt, capsys):
    run, _ = ckpt
    cases = [
        (["--prompt", "ok", "--device", "meta"], "--device"),
        (["--prompt", "ok", "--device", "nonsense"], "--device"),
        (["--prompt", b"\xff\xfe".decode("utf-8", "surrogateescape")], "UTF-8"),  # how Python passes bad argv
    ]
    for extra, needle in cases:
        assert main(["generate", str(run), "--max-new-tokens", "3"] + extra) == 2
        cap = capsys.readouterr()
        assert cap.out == "" and cap.err.count("\n") == 1 and needle in cap.err, (extra, cap.err)


def test_non_finite_weights_refused(ckpt, capsys):
    from safetensors.torch import load_file

    run, _ = ckpt
    f = run / "checkpoints" / "step_00000001" / "model.safetensors"
    sd = load_file(str(f))
    sd["layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(sd, str(f))
    meta_f = f.parent / "meta.json"  # a run that trained into NaN: its files are what the checkpoint recorded
    meta = json.loads(meta_f.read_text())
    meta["files"]["model.safetensors"] = {"bytes": f.stat().st_size, "sha256": sha256_of(f)}
    meta_f.write_text(json.dumps(meta))
    assert main(["generate", str(run), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.count("\n") == 1
    assert "layers.1.mlp.up_proj.weight" in cap.err and "NaN" in cap.err


@pytest.mark.gpu
def test_generate_exported_fp8_on_cuda_matches_cpu(ckpt, tmp_path, capsys):
    from yxanul.checkpoint.export import export_hf
    from yxanul.generate import load_for_generation

    run, _ = ckpt
    hf = tmp_path / "hf"
    export_hf(run, hf, fp8=True)
    m, _ = load_for_generation(hf)
    x = torch.randint(0, 257, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cpu = m(x)
        gpu = m.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-2, atol=1e-2)  # TF32 may be on
    args = ["generate", str(hf), "--prompt", "Hi", "--max-new-tokens", "6", "--temperature", "0", "--echo-prompt"]
    assert main(args + ["--device", "cuda"]) == 0
    assert capsys.readouterr().out.startswith("Hi")
