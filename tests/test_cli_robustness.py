"""Hostile and first-time inputs to the command line: one-line errors with exit 2, and consistent behaviour."""
import json

import pytest

from yxanul.cli import build_parser, main


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
    assert "--steps STEPS (default: 250)" in flat["train"]  # a flag that only overrides the train config
    assert "(default: 0.003)" in flat["train"] and "(default: 1337)" in flat["train"]
    assert "--no-progress no progress bar" in flat["train"]  # switches carry no default
    for name, text in flat.items():
        assert "(default: None)" not in text and "(default: False)" not in text, name
