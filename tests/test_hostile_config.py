"""Bad values in configs and options of the training, benchmark and self-check commands: one line, exit 2,
nothing written."""
from __future__ import annotations

from pathlib import Path

import pytest

from yxanul.cli import main
from yxanul.config import load_model_config, load_yaml
from yxanul.errors import YxanulError, brief
from yxanul.fp8.recipe import Fp8Recipe
from yxanul.train_config import load_train_config

ROOT = Path(__file__).resolve().parents[1]


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("yxanul: error:"), err
    return err[0]


@pytest.mark.parametrize("text, says", [
    ("steps: " + "1" * 5000 + "\n", "malformed YAML"),  # past Python's digit limit for int()
    ("a: " + "[" * 100000 + "\n", "malformed YAML"),
    ("steps: 1\nsteps: 2\n", "'steps' appears twice"),
])
def test_yaml_that_python_cannot_build_is_one_error(tmp_path, text, says):
    p = tmp_path / "t.yaml"
    p.write_text(text)
    with pytest.raises(YxanulError, match=says) as e:
        load_yaml(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_a_float_key_given_an_integer_too_large_for_a_float(tmp_path, capsys):
    p = tmp_path / "t.yaml"
    p.write_text("lr: 1" + "0" * 400 + "\n")
    assert main(["train", "--train-config", str(p), "--out", str(tmp_path / "r")]) == 2
    assert "lr" in _err(capsys) and not (tmp_path / "r").exists()


def test_a_config_that_never_ends_is_refused_at_the_size_limit(monkeypatch):
    import yxanul.config as config
    monkeypatch.setattr(config, "MAX_YAML_BYTES", 4096)
    with pytest.raises(YxanulError, match="larger than"):
        load_yaml("/dev/zero")  # not a regular file: its size is unknown until it is read


def test_brief_of_an_integer_past_the_digit_limit():
    assert brief(10 ** 5000).startswith("an integer of about 5000 digits")


@pytest.mark.parametrize("seed", [-1, 2 ** 64])
def test_seed_out_of_range(tmp_path, capsys, seed):
    with pytest.raises(YxanulError, match="seed"):
        load_train_config(None, {"seed": seed})
    assert main(["train", "--out", str(tmp_path / "r"), "--steps", "1", "--seed", str(seed)]) == 2
    assert "seed" in _err(capsys) and not (tmp_path / "r").exists()


@pytest.mark.parametrize("over, key", [({"margin": -1}, "margin"), ({"margin": 100000}, "margin"),
                                       ({"amax_history_len": 10 ** 12}, "amax_history_len")])
def test_recipe_values_out_of_range(over, key):
    with pytest.raises(YxanulError, match=key):
        Fp8Recipe(name="delayed", **over).validate()


def test_embed_rank_has_an_upper_bound(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("preset: tiny\nembed_rank: " + "1" + "0" * 30 + "\n")
    with pytest.raises(YxanulError, match="embed_rank"):
        load_model_config(str(p))


def test_unknown_fp8_backend_is_a_config_error():
    with pytest.raises(YxanulError, match="fp8_backend"):
        load_train_config(None, {"fp8_backend": "bogus"})


@pytest.mark.parametrize("extra, key", [(["--last-evals", "-3"], "--last-evals"), (["--last-evals", "0"], "--last-evals"),
                                        (["--fp8-backend", "bogus"], "fp8_backend"),
                                        (["--data", "/nonexistent-yxanul"], "nonexistent"),
                                        (["--seed", "-1"], "seed"), (["--seeds", "7"], "--seeds"),
                                        (["--seeds", "0"], "--seeds")])
def test_bench_quality_checks_shared_settings_before_any_run(tmp_path, capsys, extra, key):
    out = tmp_path / "qo"
    rc = main(["bench", "quality", "--model", "tiny", "--device", "cpu", "--no-compile", "--batch", "2",
               "--seq", "32", "--tokens", "64", "--modes", "bf16", "--out", str(out), *extra])
    assert rc == 2 and key in _err(capsys) and not out.exists()


def test_output_file_under_a_regular_file_is_refused_before_the_benchmark(tmp_path, capsys):
    blocker = tmp_path / "a.safetensors"
    blocker.write_bytes(b"x")
    for flag in ("--json-out", "--plot"):
        rc = main(["bench", "throughput", "--device", "cpu", "--model", "tiny", "--steps", "1", "--warmup", "0",
                   "--batch", "1", "--seq", "16", "--no-compile", "--modes", "bf16", flag, str(blocker / "x.png")])
        assert rc == 2 and "is not a folder" in _err(capsys)
    assert blocker.read_bytes() == b"x"


@pytest.mark.parametrize("tokens", ["0", "1000000000", "100000000000000000000"])
def test_selfcheck_tokens_out_of_range(capsys, tokens):
    assert main(["selfcheck", "--model", "tiny", "--backend", "emulated", "--tokens", tokens]) == 2
    assert "--tokens" in _err(capsys)


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf"])
def test_bench_peak_tflops_must_be_positive_and_finite(capsys, value):
    rc = main(["bench", "throughput", "--device", "cpu", "--model", "tiny", "--steps", "1", "--warmup", "0",
               "--batch", "1", "--seq", "16", "--no-compile", "--modes", "bf16", f"--peak-tflops={value}"])
    assert rc == 2 and "--peak-tflops" in _err(capsys)


def test_resume_with_another_out_folder_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--steps", "1", "--batch-size", "2", "--seq-len", "32", "--log-every", "1", "--eval-every", "0",
            "--checkpoint-every", "1", "--no-progress", "--warmup", "0", "--precision", "fp32"]
    assert main(["train", "--out", str(run), *args]) == 0
    capsys.readouterr()
    before = sorted(p.name for p in run.rglob("*"))
    assert main(["train", "--resume", str(run), "--out", str(tmp_path / "other"), "--steps", "2"]) == 2
    assert "--out" in _err(capsys) and not (tmp_path / "other").exists()
    assert sorted(p.name for p in run.rglob("*")) == before
    # the run's own folder named again is fine
    assert main(["train", "--resume", str(run), "--out", str(run), "--steps", "2", "--no-progress"]) == 0


@pytest.mark.parametrize("argv, says", [
    (["memory", "--batch", str(10 ** 20)], "--batch: batch x seq"),
    (["memory", "--grad-accum", "100000"], "--grad-accum: must be <= 4096"),
    (["bench", "throughput", "--layers", "100000", "--device", "cpu"], "--layers: must be in [1, 1024]"),
    (["train", "--grad-accum", "100000", "--steps", "1"], "grad_accum: must be <= 4096"),
])
def test_absurd_sizes_are_refused_up_front(tmp_path, monkeypatch, capsys, argv, says):
    monkeypatch.chdir(tmp_path)  # nothing may be written, not even a default run folder
    assert main(argv) == 2
    assert says in _err(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overrides", [{"n_layers": 3}, {"n_layers": 1, "tie_embeddings": False},
                                       {"n_layers": 5, "embed_rank": 0}])
def test_param_count_is_the_built_model_s(overrides):
    """param_count counts one and two layers and extrapolates (so a deep config costs nothing to count): the
    same number as the model built whole."""
    from yxanul.config import load_model_config
    from yxanul.model import Yxanul, param_count

    cfg = load_model_config("tiny", overrides)
    assert param_count(cfg) == Yxanul(cfg).num_params()


def test_a_model_deeper_than_the_limit_is_refused_at_once(tmp_path, capsys):
    """n_layers: 100000 used to build the whole model on the meta device before any check (minutes, memory
    growing); it is one line, exit 2, for train, memory and policy alike."""
    import time

    from yxanul.config import MAX_LAYERS
    deep = tmp_path / "deep.yaml"
    deep.write_text(f"preset: tiny\nn_layers: {MAX_LAYERS + 1}\n")
    for args in (["train", "--model", str(deep), "--out", str(tmp_path / "r"), "--steps", "1"],
                 ["memory", "--model", str(deep)], ["policy", "--model", str(deep)]):
        t0 = time.perf_counter()
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "n_layers" in err and str(deep) in err and "Traceback" not in err and time.perf_counter() - t0 < 10
    assert not (tmp_path / "r").exists()
