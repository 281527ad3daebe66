"""scripts/hostile_inputs.py: its case table covers the hostile cases, and its quick subset, each case a real
``yxanul`` subprocess, meets the contract (no traceback, exit 2 with one error line, no payload run, inputs
unchanged, no partial output). The whole table runs with ``python scripts/hostile_inputs.py``."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "hostile_inputs.py"


def _runner():
    if "hostile_inputs" in sys.modules:
        return sys.modules["hostile_inputs"]
    spec = importlib.util.spec_from_file_location("hostile_inputs", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


def test_case_table_covers_every_kind_of_hostile_input():
    h = _runner()
    names = [c.name for c in h.CASES]
    assert len(names) == len(set(names))
    for needed in ("dcp-payload-consolidate", "dcp-payload-resume", "export-out-is-run", "prepare-out-is-parent",
                   "prepare-out-is-input-file", "quantize-out-foreign", "yaml-bomb-train-config",
                   "flipped-model-resume", "flipped-state-resume", "nan-weights-resume", "latest-points-to-other-run",
                   "sparse-1tib-quantize", "dequantize-scale-3x3", "dequantize-nan-byte",
                   "escape-in-tensor-name-quantize", "quantize-read-only-out", "latest-non-utf8-resume",
                   "latest-folder-export", "state-without-optimizer", "state-optimizer-shape", "state-rng-shape",
                   "metrics-non-object-plot", "shard-id-above-max", "nan-weights-generate", "generate-device-meta",
                   "generate-prompt-not-utf8", "train-batch-size-1e14", "train-vocab-size-1e12", "train-lr-1e308",
                   "train-inject-nan-huge-range", "train-loss-scale-init-inf-yaml", "killed-before-checkpoint-resume",
                   "killed-before-checkpoint-restart", "stale-temporaries-quantize", "plot-out-exists",
                   "bench-json-out-exists"):
        assert needed in names, needed
    assert {c.group for c in h.CASES if c.quick} >= {"foreign code", "overwrite", "bounded", "checkpoint", "records"}


def test_quick_subset_meets_the_contract(tmp_path):
    h = _runner()
    results = h.run_cases(h.select(quick=True), tmp_path, jobs=2, log=lambda *a: None)
    assert results and not [r for r in results if r.skipped and "matplotlib" not in r.skipped]
    failed = {r.case.name: r.violations for r in results if r.violations}
    assert not failed, failed
