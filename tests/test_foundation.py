import json
import subprocess
import sys

import pytest
import torch

from yxanul.cli import main
from yxanul.config import load_model_config
from yxanul.errors import YxanulError
from yxanul.model import Yxanul
from yxanul.precision import distribution, load_policy


def meta_model(name):
    with torch.device("meta"):
        return Yxanul(load_model_config(name))


@pytest.mark.parametrize("name,count", [("yxanul-197m", 196_398_464), ("yxanul-197m-seed", 477_907_200)])
def test_preset_param_counts(name, count):
    assert meta_model(name).num_params() == count


def test_tiny_is_small_and_trains(tiny_cfg):
    torch.manual_seed(0)
    m = Yxanul(tiny_cfg)
    assert 1_000_000 < m.num_params() < 10_000_000
    x = torch.randint(0, tiny_cfg.vocab_size, (2, 32))
    t = torch.randint(0, tiny_cfg.vocab_size, (2, 32))
    loss = m(x, t)
    assert abs(loss.item() - torch.log(torch.tensor(float(tiny_cfg.vocab_size))).item()) < 0.5
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(20):
        opt.zero_grad()
        loss = m(x, x)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
    assert loss.item() < first - 1.0


def test_factorized_head_is_tied():
    cfg = load_model_config("tiny", {"embed_rank": 32, "vocab_size": 300})
    m = Yxanul(cfg)
    names = [n for n, _ in m.named_parameters()]
    assert not any("lm_head" in n for n in names)
    h = torch.randn(1, 3, cfg.d_model)
    E, P = m.embeddings.tok.weight, m.embeddings.proj.weight
    torch.testing.assert_close(m.logits(h), (h @ P) @ E.T)
    m.logits(h).sum().backward()
    assert m.embeddings.tok.weight.grad is not None and m.embeddings.proj.weight.grad is not None


def test_causality(tiny_cfg):
    m = Yxanul(tiny_cfg).eval()
    x = torch.randint(0, 257, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 257
    torch.testing.assert_close(m(x)[0, :10], m(y)[0, :10])


def test_policy_figures_197m():
    pol = load_policy()
    d = distribution(pol.resolve(meta_model("yxanul-197m")))
    assert d["total_params"] == 196_398_464
    assert d["by_precision"]["fp8_e4m3"]["params"] == 170_655_744
    assert round(d["by_precision"]["fp8_e4m3"]["percent"], 2) == 86.89


def test_policy_json_cli(capsys):
    assert main(["policy", "--model", "yxanul-197m", "--config", "configs/mixed_precision_config.yaml", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"total_params", "by_precision", "modules"}
    assert out["total_params"] == 196_398_464
    assert out["by_precision"]["fp8_e4m3"]["params"] == 170_655_744
    assert sum(m["params"] for m in out["modules"]) == out["total_params"]
    assert {m["precision"] for m in out["modules"] if m["name"].endswith("q_proj")} == {"fp8_e4m3"}


def write(tmp_path, text, name="p.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_policy_precedence(tmp_path):
    p = write(tmp_path, """
precision_strategy: {default_dtype: bfloat16}
fp8_components: ["model.*.q_proj", "model.*.mlp.*"]
bf16_components: ["model.layers.0.*", "model.*.rmsnorm"]
fp32_components: ["layers.0.mlp.down_proj", "optimizer.adam_m", "loss_scale"]
""")
    pol = load_policy(p)
    r = {m.name: m for m in pol.resolve(meta_model("tiny"))}
    assert r["layers.1.attn.q_proj"].precision == "fp8_e4m3"
    assert r["layers.0.attn.q_proj"].precision == "bf16"   # bf16 beats fp8
    assert r["layers.0.mlp.down_proj"].precision == "fp32"  # fp32 beats both
    assert r["layers.2.attn_norm"].precision == "bf16"      # matched by type name
    assert ("optimizer.adam_m", "fp32") in pol.runtime_components()


def test_use_fp8_false(tmp_path):
    p = write(tmp_path, "precision_strategy: {use_fp8: false}\n")
    r = load_policy(p).resolve(meta_model("tiny"))
    assert not any(m.precision.startswith("fp8") for m in r)


def test_unmatched_pattern_strict_and_lax(tmp_path):
    p = write(tmp_path, "fp8_components: ['model.*.nonexistent_proj']\n")
    with pytest.raises(YxanulError, match="matches no module"):
        load_policy(p).resolve(meta_model("tiny"))
    with pytest.warns(UserWarning, match="matches no module"):
        load_policy(p, strict=False).resolve(meta_model("tiny"))


@pytest.mark.parametrize("text,key", [
    ("precision_strategy: {embeddings: bfloat17}\n", "precision_strategy.embeddings"),
    ("precision_strategy: {tile_size: 100}\n", "precision_strategy.tile_size"),
    ("precision_strategy: {bogus: 1}\n", "precision_strategy.bogus"),
    ("whatever: 1\n", "whatever"),
    ("precision_strategy: {use_fp8: maybe}\n", "precision_strategy.use_fp8"),
    ("recipe: {name: magic}\n", "recipe.name"),
    ("precision_strategy: [1, 2\n", "malformed YAML"),
])
def test_bad_policy_yaml_exit2(tmp_path, text, key, capsys):
    p = write(tmp_path, text)
    assert main(["policy", "--model", "tiny", "--config", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(p) in err and key in err and "Traceback" not in err


def test_unknown_preset_exit2(capsys):
    assert main(["policy", "--model", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err


def test_console_entry_point_no_traceback(tmp_path):
    p = write(tmp_path, "precision_strategy: {fp8_format: e9m9}\n")
    r = subprocess.run([sys.executable, "-m", "yxanul", "policy", "--config", str(p)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "fp8_format" in r.stderr


def test_fp8_asked_of_a_module_that_is_not_linear_is_reported_in_its_real_precision(tmp_path):
    """`fp8_components: ['*']` (or FP8 for norms or embeddings): training converts Linear layers only, so the
    policy's resolution (what `yxanul policy` and `yxanul memory` report) keeps the others in BF16 and says why."""
    import torch

    from yxanul.config import load_model_config
    from yxanul.model import Yxanul
    from yxanul.precision import load_policy

    p = tmp_path / "star.yaml"
    p.write_text("fp8_components: ['*']\n")
    with torch.device("meta"):
        model = Yxanul(load_model_config("tiny"))
    mods = load_policy(p).resolve(model)
    assert {m.kind for m in mods if m.precision.startswith("fp8")} == {"Linear"}
    others = [m for m in mods if m.kind != "Linear"]
    assert others and all(m.precision == "bf16" and "Linear layers only" in m.rule for m in others)
