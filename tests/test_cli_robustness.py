"""Hostile and first-time inputs to the command line: one-line errors with exit 2, and consistent behaviour."""
import json

import pytest

from yxanul.cli import build_parser, main
from yxanul.errors import YxanulError


def _one_line_error(capsys, *needles):
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.count("\n") == 1 and "Traceback" not in cap.err, cap.err
    for n in needles:
        assert n in cap.err, (n, cap.err)
    return cap.err


# -- plot ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, needle", [
    ("[1, 2]", "line 2: expected a JSON object, got list"),
    ('"text"', "line 2: expected a JSON object, got str"),
    ("7", "line 2: expected a JSON object, got int"),
    ('{"step": 2, "loss": "low"}', "line 2: loss must be a number"),
    ('{"step": [2], "loss": 1.0}', "line 2: step must be a number"),
    ("{oops", "line 2: invalid JSON"),
])
def test_plot_malformed_metrics_line(tmp_path, capsys, line, needle):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n' + line + "\n")
    out = tmp_path / "loss.png"
    assert main(["plot", str(run), "--out", str(out)]) == 2
    _one_line_error(capsys, "metrics.jsonl", needle)
    assert not out.exists()


def test_plot_single_point_has_marker(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    drawn = []
    real = Axes.plot

    def spy(self, *args, **kwargs):
        lines = real(self, *args, **kwargs)
        drawn.extend(lines)
        return lines

    monkeypatch.setattr(Axes, "plot", spy)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    out = tmp_path / "loss.png"
    assert main(["plot", str(run), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert len(drawn) == 1 and len(drawn[0].get_xdata()) == 1
    assert drawn[0].get_marker() not in (None, "None", "", " ") and drawn[0].get_markersize() > 0


# -- --help -------------------------------------------------------------------------------------------------------

def _subparsers(parser):
    import argparse
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                for sub_name, subsub in _subparsers(sub):
                    yield f"{name} {sub_name}", subsub


def test_help_shows_defaults(capsys):
    parser = build_parser()
    helps = {name: sub.format_help() for name, sub in _subparsers(parser)}
    assert {"train", "generate", "analyze", "plot"} <= set(helps)
    flat = {k: " ".join(v.split()) for k, v in helps.items()}
    assert "--max-new-tokens MAX_NEW_TOKENS (default: 128)" in flat["generate"]
    assert "0 = greedy (default: 0.8)" in flat["generate"]
    assert "--steps STEPS optimizer steps (default: 120)" in flat["train"]  # overrides the train config
    assert "(default: 0.003)" in flat["train"] and "(default: 1337)" in flat["train"]
    assert "--progress, --no-progress progress bar" in flat["train"]
    for name, text in flat.items():
        assert "(default: None)" not in text and "(default: False)" not in text, name


# -- numeric bounds -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, needle", [
    (["--batch-size", "100000000000000"], "batch_size"),
    (["--lr", "1e308"], "lr: must be <= 10"),
    (["--lr", "nan"], "lr"),
    (["--lr", "inf"], "lr"),
    (["--inject-nan-at", "9-3"], "inject_nan_at"),
    (["--inject-nan-at", "1-x"], "inject_nan_at"),
])
def test_train_absurd_numbers_one_line(tmp_path, capsys, flags, needle):
    out = tmp_path / "run"
    assert main(["train", "--steps", "1", "--out", str(out), "--no-progress"] + flags) == 2
    _one_line_error(capsys, needle)
    assert not out.exists()


def test_train_config_bounds(tmp_path, capsys):
    from yxanul.errors import YxanulError
    from yxanul.train import TrainConfig

    for kwargs in ({"loss_scale_init": float("inf")}, {"loss_scale_init": float("nan")},
                   {"loss_scale_init": 2.0 ** 70}, {"lr": 1e308, "min_lr": 0.0}, {"batch_size": 2 ** 40}):
        with pytest.raises(YxanulError):
            TrainConfig(**kwargs).validate()
    TrainConfig(lr=1.0, min_lr=0.1, loss_scale_init=2.0 ** 16).validate()
    cfg = tmp_path / "t.yaml"
    cfg.write_text("loss_scale_init: .inf\n")
    assert main(["train", "--train-config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    _one_line_error(capsys, "t.yaml", "loss_scale_init")


def test_inject_nan_steps_are_lazy():
    import time

    from yxanul.train import parse_steps

    t0 = time.perf_counter()
    steps = parse_steps("1-100000000000,200000000005")
    assert time.perf_counter() - t0 < 0.1
    assert 1 in steps and 100000000000 in steps and 100000000001 not in steps and 200000000005 in steps
    assert 0 not in steps
    small = parse_steps("3,5-7")
    assert [s for s in range(10) if s in small] == [3, 5, 6, 7]
    assert not parse_steps("") and small


@pytest.mark.parametrize("key, value", [("vocab_size", 10 ** 12), ("d_model", 10 ** 9), ("n_layers", 10 ** 8)])
def test_model_config_absurd_sizes(tmp_path, capsys, key, value):
    y = tmp_path / "m.yaml"
    y.write_text(f"preset: tiny\n{key}: {value}\n")
    out = tmp_path / "run"
    assert main(["train", "--model", str(y), "--steps", "1", "--out", str(out), "--no-progress"]) == 2
    _one_line_error(capsys, "m.yaml", key)
    assert not out.exists()


# -- data shards --------------------------------------------------------------------------------------------------

def _corrupt_data(tmp_path, split, bad_id, meta_max=None):
    import numpy as np

    from yxanul.data.loader import read_meta
    from yxanul.data.prepare import prepare
    from yxanul.data.tokenizers import ByteTokenizer

    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "t.txt"
    src.write_text("".join(chr(97 + i % 26) for i in range(6000)))
    d = tmp_path / "d"
    prepare([str(src)], ByteTokenizer(), d, val_fraction=0.2, progress=False, shard_tokens=1000)
    shard = d / read_meta(d)["splits"][split]["shards"][-1]["file"]
    arr = np.memmap(shard, dtype=np.uint32, mode="r+")
    arr[:] = bad_id
    arr.flush()
    del arr
    if meta_max is not None:
        meta = json.loads((d / "meta.json").read_text())
        meta["max_token_id"] = meta_max
        (d / "meta.json").write_text(json.dumps(meta))
    return d, shard


@pytest.mark.parametrize("bad_id, meta_max", [(70000, None), (200, 150)])  # the first is above any vocabulary
def test_token_id_above_meta_maximum_names_the_shard(tmp_path, bad_id, meta_max):
    from yxanul.data.loader import DataLoader
    from yxanul.errors import YxanulError

    d, shard = _corrupt_data(tmp_path, "train", bad_id, meta_max)
    loader = DataLoader(d, 4, 16, seed=0)
    assert loader.max_id == (meta_max or 256)
    with pytest.raises(YxanulError, match=f"token id {bad_id} .*max_token_id") as e:
        for step in range(200):
            loader.batch(step)
    assert str(shard) in str(e.value)

    d, shard = _corrupt_data(tmp_path / "v", "val", bad_id, meta_max)
    loader = DataLoader(d, 4, 16, seed=0)
    with pytest.raises(YxanulError, match=f"token id {bad_id}") as e:
        list(loader.val_batches(200))
    assert str(shard) in str(e.value)


def test_train_on_corrupt_shard_one_line(tmp_path, capsys):
    d, shard = _corrupt_data(tmp_path, "train", 70000)
    argv = ["train", "--data", str(d), "--model", "tiny", "--steps", "40", "--batch-size", "8", "--seq-len", "16",
            "--eval-every", "0", "--checkpoint-every", "0", "--no-progress", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and shard.name in err and "max_token_id" in err, err
    assert not (tmp_path / "run").exists()   # a run that failed before its first record leaves nothing


def _prepared(tmp_path):
    from yxanul.data.prepare import prepare
    from yxanul.data.tokenizers import ByteTokenizer

    src = tmp_path / "t.txt"
    src.write_text("".join(chr(97 + i % 26) for i in range(3000)))
    prepare([str(src)], ByteTokenizer(), tmp_path / "d", val_fraction=0.2, progress=False)
    return tmp_path / "d"


def _shard_outside(m):
    m["splits"]["train"]["shards"][0]["file"] = "../../../../etc/passwd"
    return m


def _shard_tokens(m):
    m["splits"]["train"]["shards"][0]["tokens"] = "many"
    return m


@pytest.mark.parametrize("edit, needle", [
    (lambda m: b'{"format": "\xff"}', "meta.json"),
    (lambda m: {**m, "splits": ["train", "val"]}, "splits"),
    (_shard_outside, "file name inside the data folder"),
    (_shard_tokens, "tokens must be a non-negative integer"),
    (lambda m: {**m, "vocab_size": "big"}, "vocab_size"),
    (lambda m: {**m, "tokenizer": None}, "tokenizer"),
])
def test_malformed_data_meta_is_one_line(tmp_path, capsys, micro_model, edit, needle):
    d = _prepared(tmp_path)
    meta = edit(json.loads((d / "meta.json").read_text()))
    (d / "meta.json").write_bytes(meta if isinstance(meta, bytes) else json.dumps(meta).encode())
    for argv in (["data", "info", str(d)],
                 ["train", "--data", str(d), "--model", micro_model, "--steps", "1", "--batch-size", "2",
                  "--seq-len", "16", "--no-progress", "--precision", "fp32", "--out", str(tmp_path / "run")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and "meta.json" in err and needle in err, err
    assert not (tmp_path / "run").exists()


def test_train_out_that_cannot_be_created_is_one_line(tmp_path, capsys, micro_model):
    f = tmp_path / "notes.txt"
    f.write_text("keep")
    assert main(["train", "--model", micro_model, "--steps", "1", "--batch-size", "2", "--seq-len", "16",
                 "--no-progress", "--precision", "fp32", "--out", str(f / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "notes.txt" in err and "cannot write" in err, err
    assert f.read_text() == "keep"


def test_model_beyond_memory_is_refused_before_allocating(tmp_path, capsys):
    y = tmp_path / "m.yaml"
    y.write_text("preset: tiny\nd_model: 1048576\nn_heads: 8192\nn_kv_heads: 8192\n")
    out = tmp_path / "run"
    assert main(["train", "--model", str(y), "--steps", "1", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "parameters" in err and "of memory" in err, err
    assert not out.exists()


def test_exported_config_is_checked_against_its_weights_before_allocating(tmp_path, capsys):
    from test_export import make_run

    run, _ = make_run(tmp_path)
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    conf_path = tmp_path / "hf" / "config.json"
    conf = json.loads(conf_path.read_text())
    conf.update(hidden_size=1 << 20, num_attention_heads=8192, num_key_value_heads=8192, head_dim=128)
    conf_path.write_text(json.dumps(conf))
    assert main(["generate", str(tmp_path / "hf"), "--prompt", "Hi"]) == 2
    _one_line_error(capsys, "hf: weights do not match config.json", "shape")


@pytest.mark.parametrize("seed", ["1000000000000000000000000", "-1"])
def test_generate_seed_out_of_range_one_line(seed, capsys):
    from yxanul.generate import SamplingOptions
    with pytest.raises(YxanulError, match="--seed"):
        SamplingOptions(seed=int(seed)).validate()
