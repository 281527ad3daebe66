"""Loss parity on real text: BF16 against the note's FP8 policy and against all-FP8.

Every mode trains the same model from the same initialization on the same batch order (the training loop's
batches are a pure function of the data seed and the step) and is evaluated on the same fixed validation
windows at the same steps. A second BF16 run on the same data (``bf16-b``, from scratch or as a second
branch of the fork) samples the run-to-run noise of GPU non-determinism; one that differs only in its
data-order seed (``bf16-seed2``) samples that of the data order too. Whether a mode is within the noise is
judged from repeats (``--repeats``), never from one pair.

Modes:
  ``bf16``            autocast BF16, FP32 master weights and optimizer states (the reference)
  ``fp8-<recipe>``    the note's policy (q/k/v/o/gate/up/down in FP8) with recipe blockwise | tensorwise |
                      rowwise | delayed; ``fp8`` is the policy file's own recipe
  ``fp8-head``        the note's policy plus the output head GEMM in FP8 (beyond the note)
  ``fp8-all``         everything the note keeps out of FP8 is quantized too: the embedding output, every
                      RMSNorm output, the embedding projection and the output head (E4M3, 1x128 tiles,
                      straight-through gradients for the fake-quantized activations)

Paired statistics. Every run ends with an evaluation of each validation window (the whole split, or the first
N windows; :mod:`yxanul.evaluate`). A mode's difference from BF16 in one repeat is
``delta = mean_w(L_mode[w] - L_bf16[w]) / mean_w(L_bf16[w])``, a ratio of means; its standard error comes from
the per-window paired differences by the delta method (the SE of the mean of
``z_w = (d_w - delta * L_bf16[w]) / mean(L_bf16)``). Over R repeats the reported delta is the mean of the
repeats' deltas, SD their sample standard deviation, and SE combines both sources of error:
``sqrt(s^2 / R + SE_w^2)``, SE_w being the window SE of the repeat-averaged per-window differences and s the
run-to-run noise of one run pair, pooled over the BF16 pairs and every mode's repeats (:func:`pooled_run_noise`;
the two overlap slightly, so SE errs on the large side). Where the same-data twin ``bf16-b`` ran, the reference
is the per-window mean of the two BF16 runs and s^2 counts 0.75 times (:func:`paired_rows`). A claim "delta lies in [lo, hi]" is confirmed when the 2-sigma
interval lies inside it, refuted when the interval lies wholly outside it, unresolved otherwise.

Fork protocol (:func:`run_fork`): one BF16 trunk trains to the fork step and is checkpointed; every mode
resumes from that checkpoint (weights, optimizer, step, learning-rate schedule) and trains to the end. Repeat r
draws its remaining batches with data-order seed ``seed + REPEAT_SEED_STRIDE * r``, the same for every mode of
the repeat (repeat 0 continues the trunk's order, so its BF16 branch is the straight run). Two BF16 branches
per repeat (``bf16`` and ``bf16-b``, same data) measure the noise floor.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path

import torch

from . import FP8_OPTION_FLAGS
from ..errors import YxanulError
from ..evaluate import window_losses
from ..fmt import table
from ..io import atomic_write_json, atomic_write_text

BASE_MODES = ("bf16", "fp8", "fp8-blockwise", "fp8-tensorwise", "fp8-rowwise", "fp8-delayed", "fp8-head", "fp8-all")
NOISE_MODE = "bf16-seed2"  # BF16 on another data order
FORK_NOISE_MODE = "bf16-b"  # a second BF16 run on the same data: differs from bf16 only by non-determinism
SE_METHOD = ("delta method on per-window paired differences, combined with the run-to-run noise pooled over every "
             "BF16 pair (its delta) and every mode's repeats (their deviations from the mode's mean), divided by R "
             "(verdicts unresolved without a measured noise); where both BF16 runs (bf16, bf16-b) ran, a mode is "
             "compared with their per-window mean, and its delta then carries 0.75 of one run pair's noise "
             "variance")


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in str(text).split(",") if m.strip()]
    if not modes:
        raise YxanulError("no modes given", key="--modes")
    for m in modes:
        if m not in BASE_MODES and m not in (NOISE_MODE, FORK_NOISE_MODE):
            raise YxanulError(f"unknown mode {m!r} (expected: {', '.join(BASE_MODES)})", key="--modes")
    if len(set(modes)) != len(modes):
        raise YxanulError("a mode is listed twice", key="--modes")
    return modes


def _straight_through_fp8(module, inputs, output):
    """Forward hook: replace the output by its 1x128 E4M3 fake quantization; gradients pass straight through."""
    from ..fp8.quant import fake_quantize
    if not torch.is_tensor(output) or output.shape[-1] % 16:
        return output
    q = fake_quantize(output.detach(), (1, 128), "e4m3", nonfinite="propagate").to(output.dtype)
    return output + (q - output).detach()


def apply_all_fp8(model) -> list[str]:
    """Quantize the activations the note keeps in BF16 (embedding output, RMSNorm outputs). Returns names."""
    names = []
    for name, mod in model.named_modules():
        if name == "embeddings" or type(mod).__name__ == "RMSNorm":
            mod.register_forward_hook(_straight_through_fp8)
            names.append(name)
    return names


def _all_fp8_policy(base_path: str | None, out_dir: Path) -> str:
    """The note's policy with the embedding projection and the (untied) head also in FP8."""
    from ..config import DEFAULT_POLICY, load_yaml
    import yaml
    data = load_yaml(base_path or DEFAULT_POLICY)
    data.setdefault("fp8_components", [])
    data["fp8_components"] = list(data["fp8_components"]) + ["model.*_proj", "model.lm_head"]
    path = out_dir / "policy-fp8-all.yaml"
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return str(path)


def _mode_setup(mode: str, policy: str | None, out_dir: Path, all_recipe: str = "blockwise") -> tuple[dict, dict]:
    """(TrainConfig overrides, extra options) for one mode."""
    if mode in ("bf16", NOISE_MODE, FORK_NOISE_MODE):
        return {"precision": "bf16"}, {}
    over = {"precision": "fp8"}
    extra: dict = {}
    if mode == "fp8-head":
        extra["head_fp8"] = True
    elif mode == "fp8-all":
        over["policy"] = _all_fp8_policy(policy, out_dir)
        over["fp8_recipe"] = all_recipe
        extra["head_fp8"] = True
        extra["all_fp8"] = True
    elif mode != "fp8":
        over["fp8_recipe"] = mode[len("fp8-"):]
    return over, extra


class _ForkReached(Exception):
    """Raised by a trunk trainer when it is asked for the step after the fork."""


def _make_trainer(cfg, extra: dict, data_seed: int, resume: str | None = None, stop_at: int | None = None):
    """A Trainer whose batches follow `data_seed` (initialization still follows cfg.seed) and whose model gets
    the fused cross-entropy (and FP8 head / all-FP8 hooks) before compilation. With `stop_at` its ``fit`` ends
    by raising :class:`_ForkReached` before training step `stop_at` (the schedule stays that of cfg.steps)."""
    from ..data.loader import DataLoader
    from ..train import Trainer

    class QualityTrainer(Trainer):
        def wrap_model(self, model):
            if extra.get("head_fp8"):  # the loop itself uses the fused loss on CUDA; this adds the FP8 head
                from ..kernels.linear_ce import use_fused_ce
                use_fused_ce(model, head_fp8=True)
            if extra.get("all_fp8"):
                self.all_fp8_modules = apply_all_fp8(model)
            return super().wrap_model(model)

        def train_step(self, step):
            if stop_at is not None and step >= stop_at:
                raise _ForkReached
            return super().train_step(step)

    t = QualityTrainer(cfg, resume=resume, log=lambda *a, **k: print(*a, **k, flush=True))
    if data_seed != cfg.seed:
        t.loader = DataLoader(t.data_dir, cfg.batch_size, cfg.seq_len, seed=data_seed, rank=t.rank,
                              world_size=t.world_size, device=t.device, meta=t.data_meta)
    return t


_FP8_OPTION_WORDS = {"fprop_fast_accum": "FP8 forward GEMMs with fast accumulation",
                     "fused_producers": "fused FP8 producers",
                     "fused_tensor_projections": "per-tensor q/k/v and gate/up as one GEMM each"}


def _fp8_options(fp8_options: dict | None) -> dict:
    opts = dict(fp8_options or {})
    bad = sorted(set(opts) - set(FP8_OPTION_FLAGS))
    if bad:
        raise YxanulError(f"unknown FP8 option(s) {', '.join(bad)} (expected: {', '.join(FP8_OPTION_FLAGS)})",
                          key="fp8_options")
    return {k: bool(opts.get(k, False)) for k in FP8_OPTION_FLAGS}


def _fp8_only(over: dict, calibration_steps: int | None, fp8_options: dict) -> None:
    """FP8 settings added (in place) to an FP8 mode's overrides only, so that BF16 results stay reusable when
    they change."""
    if over.get("precision") == "fp8":
        if calibration_steps is not None:
            over["fp8_calibration_steps"] = calibration_steps
        over.update({f"fp8_{k}": True for k, on in fp8_options.items() if on})


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


def same_settings(a: dict | None, b: dict) -> bool:
    """Whether a stored result was trained with these settings. Keys set to None mean "not applicable" and
    are ignored, so results written before a setting became mode-specific (BF16 runs used to carry
    ``fp8_calibration_steps: null``) stay reusable."""
    if not isinstance(a, dict):
        return False
    return ({k: v for k, v in a.items() if v is not None} == {k: v for k, v in b.items() if v is not None})


def _metric_records(path: Path):
    """The JSON records of a metrics.jsonl (none when it is missing; a torn last line is skipped)."""
    if not path.exists():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except (ValueError, RecursionError):  # a line cut short by a kill, or nothing this trainer wrote
            continue
        if isinstance(r, dict):
            yield r


def _read_curves(run_dir: Path) -> dict:
    train, val = [], []
    for r in _metric_records(run_dir / "metrics.jsonl"):
        if r.get("loss") is not None:
            train.append([r["step"], r["loss"]])
        if r.get("val_loss") is not None:
            val.append([r["step"], r["val_loss"]])
    return {"train": train, "val": val}


def final_val(curves: dict, last: int) -> float | None:
    vals = [v for _, v in curves["val"] if v is not None and math.isfinite(v)]
    if not vals:
        return None
    tail = vals[-last:]
    return sum(tail) / len(tail)


def _prepare(model, data, tokens, batch, seq, lr, min_lr, warmup, eval_every, eval_batches, seed, policy, device,
             fp8_all_recipe, compile, fp8_backend, repeats, compile_mode, tune_kernels,
             eval_windows) -> tuple[dict, int, dict]:
    """Validate the shared options; returns (the TrainConfig fields every run shares, steps, the launch options
    that are not compared when reusing results)."""
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise YxanulError(f"must be a positive integer, got {repeats!r}", key="--repeats")
    if eval_windows is not None and eval_windows < 2:
        raise YxanulError(f"needs at least 2 windows for a standard error, got {eval_windows}", key="--eval-windows")
    from ..fp8.recipe import RECIPES
    if fp8_all_recipe not in RECIPES:
        raise YxanulError(f"unknown recipe {fp8_all_recipe!r} (expected one of {', '.join(RECIPES)})",
                          key="--fp8-all-recipe")
    from ..model import COMPILE_MODES
    if compile_mode not in COMPILE_MODES:
        raise YxanulError(f"unknown compile mode {compile_mode!r} (expected one of {', '.join(COMPILE_MODES)})",
                          key="--compile-mode")
    if compile_mode != "default" and not compile:
        raise YxanulError(f"compile mode {compile_mode} needs --compile", key="--compile-mode")
    if tune_kernels and not compile:
        raise YxanulError("--tune-kernels needs --compile", key="--tune-kernels")
    steps = max(1, tokens // (batch * seq))
    eval_every = eval_every or max(1, steps // 20)
    warmup = warmup if warmup is not None else max(1, steps // 20)
    base = {"model": model, "data": data, "steps": steps, "batch_size": batch, "seq_len": seq, "lr": lr,
            "min_lr": lr / 10 if min_lr is None else min_lr, "warmup": warmup, "eval_every": eval_every,
            "eval_batches": eval_batches, "log_every": eval_every, "checkpoint_every": 0, "seed": seed,
            "device": device, "compile": compile, "fp8_backend": fp8_backend, "progress": False,
            "tensorboard": False, "policy": policy}
    # the settings every run shares, checked before the first one trains (a bad value would otherwise fail each
    # mode in turn, after the runs before it)
    from ..train import load_train_config
    load_train_config(None, {**base, "compile_mode": compile_mode, "tune_kernels": bool(tune_kernels)})
    if data is not None:
        from ..data.loader import read_meta
        read_meta(data)
    # how the compiled kernels are launched, not what they compute: not compared when results are reused
    # (compiling itself is: inductor's fused kernels round differently from eager ones)
    return base, steps, {"compile_mode": compile_mode, "tune_kernels": bool(tune_kernels)}


def _compared(settings: dict) -> dict:
    """The settings a stored result is compared on: a BF16 run reads neither the policy nor the FP8 backend
    (None: not compared, see :func:`same_settings`), so its result holds for any --config or --fp8-backend."""
    if settings.get("precision") == "bf16":
        settings = {**settings, "policy": None, "fp8_backend": None}
    return _jsonable(settings)


def run_quality(model: str, data: str | None, tokens: int, modes: list[str], seeds: int = 2, batch: int = 16,
                seq: int = 2048, lr: float = 3e-3, min_lr: float | None = None, warmup: int | None = None,
                eval_every: int | None = None, eval_batches: int = 8, last_evals: int = 3, seed: int = 1337,
                policy: str | None = None, out: str = "runs/quality", device: str = "auto",
                calibration_steps: int | None = None, fp8_all_recipe: str = "blockwise",
                compile: bool = False, fp8_backend: str = "auto", reuse: bool = True, repeats: int = 1,
                compile_mode: str = "default", tune_kernels: bool = False, eval_windows: int | None = None,
                fp8_options: dict | None = None) -> dict:
    """Train every mode from scratch; returns (and writes to OUT/quality.json) the comparison.
    ``fp8_all_recipe`` is the recipe of the fp8-all mode's linears (its extra activations are always 1 x 128
    tiles).

    ``repeats=R`` trains every mode R times; repeat r uses data-order seed ``seed + REPEAT_SEED_STRIDE * r`` for
    all modes (so modes stay paired within a repeat) and lives in ``OUT/<mode>-r<r>`` (r >= 1). Rows then give
    the mean final loss, the per-repeat values, the paired difference from BF16 (mean over repeats) and its
    standard error; a difference is "within noise" when it is below twice that error. With ``seeds >= 2`` every
    repeat also trains ``bf16-seed2``, BF16 on another data order.

    Each run ends with a per-window evaluation (the first `eval_windows` validation windows, default all of
    them); ``result["paired"]`` holds the paired per-window statistics against BF16 (module docstring).

    ``compile_mode`` (e.g. ``reduce-overhead``, CUDA graphs) changes how the kernels are launched, not what they
    compute, so it is not part of the settings that decide whether a stored result is reused; nor is
    ``tune_kernels`` (launch settings of the same kernels). ``fp8_options``: FP8 options switched on for the FP8
    branches (:data:`yxanul.bench.FP8_OPTION_FLAGS`, e.g. ``{"fprop_fast_accum": True}``), recorded in the result."""
    from ..train import load_train_config
    if not isinstance(last_evals, int) or isinstance(last_evals, bool) or last_evals < 1:
        raise YxanulError(f"must be a positive integer, got {last_evals!r}", key="--last-evals")
    if seeds not in (1, 2) or isinstance(seeds, bool):
        raise YxanulError(f"must be 1 or 2 (2 adds BF16 on a second data order), got {seeds!r}", key="--seeds")
    fp8_options = _fp8_options(fp8_options)
    base, steps, launch = _prepare(model, data, tokens, batch, seq, lr, min_lr, warmup, eval_every, eval_batches,
                                   seed, policy, device, fp8_all_recipe, compile, fp8_backend, repeats,
                                   compile_mode, tune_kernels, eval_windows)
    out_dir = Path(out)
    tokens_per_step = batch * seq
    run_modes = list(modes)
    if seeds >= 2 and "bf16" in run_modes and NOISE_MODE not in run_modes:
        run_modes.insert(run_modes.index("bf16") + 1, NOISE_MODE)
    result = {"model": model, "tokens": steps * tokens_per_step, "steps": steps, "batch": batch, "seq": seq,
              "lr": lr, "warmup": base["warmup"], "seed": seed, **fp8_options, "device": None, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "repeats": repeats, "rows": [], "bf16_noise_pct": None,
              "curves": {}, "windows": {}, "paired": [],
              "se_method": SE_METHOD}
    recs: dict[tuple[str, int], dict] = {}
    jobs = [(mode, r) for r in range(repeats) for mode in run_modes]
    for mode, r in jobs:
        name = mode if r == 0 else f"{mode}-r{r}"
        mode_dir = out_dir / name
        done = mode_dir / "result.json"
        data_seed = (seed + 1 if mode == NOISE_MODE else seed) + REPEAT_SEED_STRIDE * r
        over, extra = _mode_setup(mode, policy, out_dir, fp8_all_recipe)
        _fp8_only(over, calibration_steps, fp8_options)
        settings = _compared({**base, **over, "data_seed": data_seed, "extra": extra, "last_evals": last_evals,
                              "eval_windows": eval_windows})
        rec = _reusable(done, settings, reuse)
        if rec is not None:
            print(f"[quality] {name}: reusing {done}", flush=True)
        else:
            cfg = load_train_config(None, {**base, **over, "out": str(mode_dir), **launch,
                                           "policy": over.get("policy", policy)})
            if mode_dir.is_dir():  # a run with other settings, or one that failed: trained again from scratch
                shutil.rmtree(mode_dir)
            print(f"[quality] {name}: {steps} steps x {tokens_per_step} tokens", flush=True)
            run = _train_and_evaluate(cfg, extra, data_seed, eval_windows)
            curves = _read_curves(mode_dir)
            rec = {"mode": mode, "settings": settings, **launch, "curves": curves,
                   "final_val_loss": final_val(curves, last_evals), "windows": run["windows"],
                   "final_train_loss": run["summary"].get("final_loss"),
                   "skipped_steps": run["summary"].get("skipped_steps"), "seconds": run["seconds"],
                   "device": run["device"], "error": run["error"]}
            atomic_write_json(done, rec)
        result["device"] = result["device"] or rec.get("device")
        result["curves"][name] = rec["curves"]
        result["windows"][name] = rec.get("windows")
        recs[(mode, r)] = rec
        result["rows"] = _rows(recs, repeats)
        summarize(result)
        result["paired"] = paired_rows({k: v.get("windows") for k, v in recs.items()}, run_modes)
        paired = {p["mode"]: p for p in result["paired"]}
        for row in result["rows"]:  # the paired statistics over repeats decide, not a single BF16 pair
            if row["mode"] in paired:
                row["within_noise"] = paired[row["mode"]]["within_noise"]
        atomic_write_json(out_dir / "quality.json", result)
    return result


REPEAT_SEED_STRIDE = 1000


def _rows(recs: dict, repeats: int) -> list[dict]:
    """One row per mode (in the order first run); with repeats, the mean over the finished repeats."""
    rows, order = {}, []
    for (mode, r), rec in recs.items():
        if mode not in rows:
            order.append(mode)
            rows[mode] = {"mode": mode, "final_val_loss": None, "final_train_loss": None, "skipped_steps": 0,
                          "seconds": 0.0, "error": None}
            if repeats > 1:
                rows[mode]["repeat_val_losses"] = [None] * repeats
        row = rows[mode]
        row["skipped_steps"] = (row["skipped_steps"] or 0) + (rec.get("skipped_steps") or 0)
        row["seconds"] = round(row["seconds"] + (rec.get("seconds") or 0.0), 1)
        row["error"] = row["error"] or rec.get("error")
        if repeats > 1:
            row["repeat_val_losses"][r] = rec.get("final_val_loss")
        if r == 0:
            row["final_val_loss"], row["final_train_loss"] = rec.get("final_val_loss"), rec.get("final_train_loss")
    if repeats > 1:
        for row in rows.values():
            vals = [v for v in row["repeat_val_losses"] if v is not None]
            row["final_val_loss"] = sum(vals) / len(vals) if vals else None
    return [rows[m] for m in order]


def _mean_sem(xs: list[float]) -> tuple[float, float | None]:
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var / len(xs))


def summarize(result: dict) -> dict:
    by = {r["mode"]: r for r in result["rows"]}
    ref = (by.get("bf16") or {}).get("final_val_loss")
    for r in result["rows"]:
        v = r.get("final_val_loss")
        r["rel_diff_vs_bf16_pct"] = round(100.0 * (v - ref) / ref, 4) if (v is not None and ref) else None
    noise = (by.get(NOISE_MODE) or {}).get("final_val_loss")
    # one BF16 pair is one sample of the noise, not its size: "within noise" needs repeats (set below)
    result["bf16_noise_pct"] = round(100.0 * abs(noise - ref) / ref, 4) if (noise is not None and ref) else None
    for r in result["rows"]:
        r["within_noise"] = None
    base = (by.get("bf16") or {}).get("repeat_val_losses")
    if base:
        bv = [v for v in base if v is not None]
        if len(bv) >= 2:
            m, sem = _mean_sem(bv)
            result["bf16_repeat_std_pct"] = round(100.0 * sem * math.sqrt(len(bv)) / m, 4)
        for r in result["rows"]:
            vals = r.get("repeat_val_losses") or []
            pairs = [100.0 * (v - b) / b for v, b in zip(vals, base) if v is not None and b]
            if r["mode"] == "bf16" or not pairs:
                continue
            m, sem = _mean_sem(pairs)
            r["paired_rel_diff_pct"] = round(m, 4)
            r["paired_sem_pct"] = round(sem, 4) if sem is not None else None
            if sem is not None:
                r["within_noise"] = abs(m) <= 2 * sem
    return result


def format_table(result: dict) -> str:
    rows = []
    paired = {p["mode"]: p for p in result.get("paired") or []}
    for r in result["rows"]:
        v, d = r.get("final_val_loss"), r.get("rel_diff_vs_bf16_pct")
        p = paired.get(r["mode"])
        if p is not None and p.get("se_pct") is not None:
            # the per-window paired statistics, which also decide "in noise" (see run_quality)
            d_text = f"{p['delta_pct']:+.3f}% ± {p['se_pct']:.3f} (paired)"
        elif r.get("paired_rel_diff_pct") is not None and r.get("paired_sem_pct") is not None:
            d_text = f"{r['paired_rel_diff_pct']:+.3f}% ± {r['paired_sem_pct']:.3f}"
        else:
            d_text = f"{d:+.3f}%" if d is not None else "-"
        rows.append([r["mode"], f"{v:.4f}" if v is not None else "-", d_text,
                     {True: "yes", False: "no", None: "-"}[r.get("within_noise")], r.get("skipped_steps", "-"),
                     r.get("error") or ""])
    head = (f"{result['model']}: {result['tokens']:,} tokens per mode ({result['steps']} steps x "
            f"{result['batch']}x{result['seq']}), device {result['device']}, torch {result['torch']}")
    noise = result.get("bf16_noise_pct")
    tail = (f"one BF16 pair (another data order) ended {noise:.3f}% apart: one sample of the noise; 'in noise' "
            "needs --repeats 2 or more" if noise is not None else "BF16 noise: not measured")
    if result.get("repeats", 1) > 1:
        std = result.get("bf16_repeat_std_pct")
        tail += (f"\n{result['repeats']} repeats per mode (paired by data order): 'vs bf16' is the mean paired "
                 f"difference ± its standard error" + (f"; BF16 repeat-to-repeat std {std:.3f}%" if std else ""))
    text = head + "\n" + table(rows, ["mode", "final val loss", "vs bf16", "in noise", "skipped", "error"],
                               "lrrrrl") + "\n" + tail
    if result.get("paired"):
        n = result["paired"][0]["windows"]
        text += (f"\n\nPaired per-window statistics ({n} validation windows; SE: {result['se_method']}):\n"
                 + markdown_table(result["paired"]))
    return text


def plot(result: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ..io import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode, c in result["curves"].items():
        if c["train"]:
            s, v = zip(*c["train"])
            axes[0].plot(s, v, label=mode, lw=1)
        if c["val"]:
            s, v = zip(*c["val"])
            axes[1].plot(s, v, label=mode, lw=1, marker=".")
    for ax, title in zip(axes, ("train loss", "validation loss")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    vals = [v for c in result["curves"].values() for _, v in c["val"]]
    if vals:
        lo = min(vals)
        axes[1].set_ylim(lo - 0.05, lo + max(0.5, 0.25 * (max(vals) - lo)))
    fig.suptitle(f"{result['model']} loss parity, {result['tokens']:,} tokens per mode ({result['device']})")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# -- paired per-window statistics -------------------------------------------------------------------------

CLAIMS = {"0.1%": (-0.1, 0.1), "0.25%": (-0.25, 0.25)}  # FP8 within this many percent of BF16
ALL_FP8_CLAIM = ("2-5% worse", (2.0, 5.0))  # the note on fp8-all


def paired_delta(mode: list[float], ref: list[float]) -> tuple[float, float | None]:
    """(delta, SE) in percent: delta = mean(mode - ref) / mean(ref) over paired windows, SE by the delta
    method (None with fewer than two windows)."""
    if len(mode) != len(ref) or not ref:
        raise YxanulError(f"paired windows differ in number ({len(mode)} against {len(ref)})", key="windows")
    n = len(ref)
    d = [m - r for m, r in zip(mode, ref)]
    mean_ref = sum(ref) / n
    delta = (sum(d) / n) / mean_ref
    if n < 2:
        return 100.0 * delta, None
    z = [(di - delta * ri) / mean_ref for di, ri in zip(d, ref)]
    return 100.0 * delta, 100.0 * statistics.stdev(z) / math.sqrt(n)


def verdict(delta: float | None, se: float | None, lo: float, hi: float) -> str:
    """A claim "delta lies in [lo, hi]" at 2 sigma: confirmed, refuted or unresolved."""
    if delta is None or se is None:
        return "unresolved"
    a, b = delta - 2 * se, delta + 2 * se
    if lo <= a and b <= hi:
        return "confirmed"
    if b < lo or a > hi:
        return "refuted"
    return "unresolved"


def paired_row(mode: str, pairs: list[tuple[list[float], list[float]]], run_noise: float | None = None,
               noise_df: int = 0) -> dict:
    """Statistics of one mode against its reference over repeats: `pairs` holds (mode windows, reference
    windows) per repeat, the same windows in the same order.

    The per-window SE covers only which windows were evaluated; two runs of the same mode also differ by
    run-to-run noise (GPU non-determinism, data order), which can be much larger
    (docs/benchmarks.md, "Loss parity"). `run_noise` is that noise as the SD of one run pair's delta, with `noise_df` degrees of
    freedom (:func:`pooled_run_noise`); the mode's delta, a mean over R repeats, carries run_noise^2 / R of it.
    Without `run_noise` the mode's own SD over repeats is used, and with neither the verdicts are "unresolved".
    Whether the delta is within the noise, and the verdicts, are judged only from a noise with two or more degrees
    of freedom."""
    per = [paired_delta(m, r) for m, r in pairs]
    deltas = [d for d, _ in per]
    R = len(pairs)
    n = len(pairs[0][1])
    if any(len(r) != n for _, r in pairs):
        raise YxanulError("repeats were evaluated on different numbers of windows", key="windows")
    avg_m = [sum(m[w] for m, _ in pairs) / R for w in range(n)]
    avg_r = [sum(r[w] for _, r in pairs) / R for w in range(n)]
    _, se_w = paired_delta(avg_m, avg_r)
    sd = statistics.stdev(deltas) if R >= 2 else None
    if run_noise is None and sd:  # an SD of 0 (bit-identical repeats) is no measured noise
        run_noise, noise_df = sd, R - 1
    run_var = None if run_noise is None else run_noise ** 2 / R
    se = None if (se_w is None or run_var is None) else math.sqrt(se_w ** 2 + run_var)
    delta = sum(deltas) / R
    se_v = se if noise_df >= 2 else None  # one pair's noise is no estimate to give a verdict on
    row = {"mode": mode, "delta_pct": delta, "sd_pct": sd, "se_pct": se, "window_se_pct": se_w, "R": R,
           "windows": n, "repeat_delta_pct": deltas, "repeat_window_se_pct": [e for _, e in per],
           "run_noise_pct": run_noise, "noise_df": noise_df if run_noise is not None else 0,
           "within_noise": (abs(delta) <= 2 * se) if (se is not None and noise_df >= 2) else None,
           "verdicts": {k: verdict(delta, se_v, lo, hi) for k, (lo, hi) in CLAIMS.items()}}
    if mode == "fp8-all":
        name, (lo, hi) = ALL_FP8_CLAIM
        row["verdicts"][name] = verdict(delta, se_v, lo, hi)
    return row


def pooled_run_noise(twin_deltas: list[float], mode_deltas: list[list[float]],
                     factors: list[float] | None = None) -> tuple[float | None, int]:
    """(SD of one run pair's delta, degrees of freedom), pooled: each BF16 pair's delta (two runs that should
    agree: mean zero) is one degree of freedom, and each mode's R repeats add R - 1 (deviations from the
    mode's mean, divided by the mode's variance factor in `factors`: 0.75 for a delta against the mean of two
    BF16 runs, see :func:`paired_rows`). A bit-identical BF16 pair (deterministic, or a CPU) measured no
    noise, not zero noise, and is left out, as are a mode's bit-identical repeats. (None, 0) when nothing
    measured it."""
    ss = sum(d * d for d in twin_deltas if d != 0.0)
    df = sum(1 for d in twin_deltas if d != 0.0)
    for ds, k in zip(mode_deltas, factors or [1.0] * len(mode_deltas)):
        if len(ds) >= 2 and max(ds) != min(ds):  # bit-identical repeats measured no noise either
            m = sum(ds) / len(ds)
            ss += sum((d - m) ** 2 for d in ds) / k
            df += len(ds) - 1
    return (math.sqrt(ss / df) if df and ss > 0 else None), (df if ss > 0 else 0)


PAIR_MEAN_FACTOR = 0.75  # Var(L - (L_a + L_b) / 2) = 1.5 run variances = 0.75 x Var(L_a - L_b)


def paired_rows(windows: dict, modes: list[str], ref: str = "bf16") -> list[dict]:
    """One row per mode other than `ref` that has paired windows: `windows[(mode, repeat)]` lists per-window
    losses; repeats missing either side are left out.

    Reference: where every repeat of a mode also has the same-data BF16 twin (``bf16-b``), the mode is compared
    with the per-window mean of the two BF16 runs, whose own run-to-run noise is half a run's: the delta's
    variance is then 0.75 of that of a delta against one BF16 run (1.5 run variances instead of 2). The twin's
    row itself is against `ref`. Every row's run-to-run noise is pooled (:func:`pooled_run_noise`) from the
    twin (or the from-scratch ``bf16-seed2``) and every mode's repeats, scaled by the row's variance factor;
    the twin's own row keeps its own SD over repeats."""
    repeats = sorted({r for _, r in windows})
    pairs_of, factor_of = {}, {}
    for mode in modes:
        if mode == ref:
            continue
        reps = [r for r in repeats if windows.get((mode, r)) and windows.get((ref, r))]
        if not reps:
            continue
        mean_ref = (mode != FORK_NOISE_MODE and FORK_NOISE_MODE in modes
                    and all(windows.get((FORK_NOISE_MODE, r)) for r in reps))
        if mean_ref:
            pairs_of[mode] = [(windows[(mode, r)], [(a + b) / 2 for a, b in zip(windows[(ref, r)],
                                                                                 windows[(FORK_NOISE_MODE, r)])])
                              for r in reps]
        else:
            pairs_of[mode] = [(windows[(mode, r)], windows[(ref, r)]) for r in reps]
        factor_of[mode] = PAIR_MEAN_FACTOR if mean_ref else 1.0
    # the same-data twin first: FP8 and BF16 runs of one repeat share their data, so its noise is theirs
    noise_mode = next((m for m in (FORK_NOISE_MODE, NOISE_MODE) if m in pairs_of), None)
    deltas = {m: [paired_delta(a, b)[0] for a, b in pairs] for m, pairs in pairs_of.items()}
    # with the same-data twin as the noise, bf16-seed2 (another data order: more noise than the modes see) stays
    # out of the pool
    others = [m for m in deltas if m != noise_mode and not (noise_mode == FORK_NOISE_MODE and m == NOISE_MODE)]
    noise, df = pooled_run_noise(deltas.get(noise_mode, []), [deltas[m] for m in others],
                                 [factor_of[m] for m in others])
    rows = []
    for mode, pairs in pairs_of.items():
        if mode == noise_mode:
            row = paired_row(mode, pairs)
        else:
            row = paired_row(mode, pairs, None if noise is None else noise * math.sqrt(factor_of[mode]), df)
        row["reference"] = f"mean of {ref} and {FORK_NOISE_MODE}" if factor_of[mode] != 1.0 else ref
        row["pair_noise_pct"] = None if mode == noise_mode else noise  # the SD of one run pair's delta
        rows.append(row)
    return rows


SE_TARGETS = (0.08, 0.05)  # % : resolves 0.25% at 2 sigma; resolves 0.1% at 2 sigma if the true delta is 0


def repeats_for_se(target_pct: float, pair_noise_pct: float, window_se_pct: float,
                   factor: float = PAIR_MEAN_FACTOR) -> int | None:
    """The fewest repeats R with ``sqrt(window_se^2 + factor * pair_noise^2 / R) <= target`` (the SE a row gets,
    :func:`paired_rows`); None when the per-window SE alone exceeds the target."""
    room = target_pct ** 2 - window_se_pct ** 2
    if room <= 0:
        return None
    return max(1, math.ceil(factor * pair_noise_pct ** 2 / room - 1e-9))


def _pct(v: float | None, sign: bool = False) -> str:
    return "-" if v is None else (f"{v:+.3f}%" if sign else f"{v:.3f}%")


def markdown_table(rows: list[dict]) -> str:
    """``mode | delta vs bf16 | SD | SE | R | verdict 0.1% / 0.25%`` (fp8-all also gets the note's 2-5%)."""
    lines = ["| mode | delta vs bf16 | SD | SE | R | verdict 0.1% / 0.25% |", "|---|---:|---:|---:|---:|---|"]
    refs = {r.get("reference") for r in rows if r["mode"] != FORK_NOISE_MODE}
    for r in rows:
        v = r["verdicts"]
        text = f"{v['0.1%']} / {v['0.25%']}"
        if ALL_FP8_CLAIM[0] in v:
            text += f" ({ALL_FP8_CLAIM[0]}: {v[ALL_FP8_CLAIM[0]]})"
        # one table, two references (a mode without the twin in some repeat): each row says which
        name = r["mode"] + (f" (vs {r['reference']})" if len(refs) > 1 and r.get("reference") else "")
        lines.append(f"| {name} | {_pct(r['delta_pct'], True)} | {_pct(r['sd_pct'])} | {_pct(r['se_pct'])} "
                     f"| {r['R']} | {text} |")
    return "\n".join(lines)


def plot_deltas(rows: list[dict], path, title: str = "") -> None:
    """Delta vs BF16 per mode with 2-sigma bars and the 0.1% / 0.25% bands (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ..io import atomic_path

    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 2), 4.2))
    xs = list(range(len(rows)))
    ys = [r["delta_pct"] for r in rows]
    err = [2 * r["se_pct"] if r["se_pct"] is not None else 0.0 for r in rows]
    for band, alpha in ((0.25, 0.08), (0.1, 0.15)):
        ax.axhspan(-band, band, color="tab:green", alpha=alpha, lw=0, label=f"±{band}%")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=4, color="tab:blue", label="delta ± 2 SE")
    ax.set_xticks(xs, [f"{r['mode']}\nR={r['R']}" for r in rows])
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylabel("final validation loss vs bf16 (%)")
    ax.set_title(title or "loss parity: paired per-window delta vs bf16")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# -- fork protocol ---------------------------------------------------------------------------------------

CUBLAS_DETERMINISTIC = ":4096:8"


@contextlib.contextmanager
def deterministic_algorithms(on: bool):
    """With `on`: ``torch.use_deterministic_algorithms(True)``, strict (an operation without a deterministic
    implementation fails; in warn-only mode cuDNN's attention backward keeps its non-deterministic algorithm),
    and cuBLAS's fixed workspace, which must be set before CUDA is initialized. Both are restored on exit."""
    if not on:
        yield
        return
    # CUBLAS_WORKSPACE_CONFIG is cuBLAS's own setting, which its deterministic mode requires before CUDA starts;
    # the switch is the --deterministic flag, and the variable is restored afterwards
    prev_env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if prev_env not in (CUBLAS_DETERMINISTIC, ":16:8") and torch.cuda.is_initialized():
        raise YxanulError("deterministic cuBLAS must be configured before CUDA is initialized; run it in a fresh "
                          "process", key="--deterministic")
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if prev_env not in (CUBLAS_DETERMINISTIC, ":16:8"):
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_DETERMINISTIC
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        if prev_env is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = prev_env


def _train_and_evaluate(cfg, extra: dict, data_seed: int, eval_windows: int | None,
                        resume: str | None = None) -> dict:
    """Train one run to its end and evaluate every validation window: {summary, windows, device, error,
    seconds}. A YxanulError becomes the run's error (the other modes still run)."""
    t0 = time.perf_counter()
    out = {"summary": {}, "windows": None, "device": None, "error": None}
    try:
        trainer = _make_trainer(cfg, extra, data_seed, resume=resume)
        out["device"] = torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else "cpu"
        out["summary"] = trainer.fit()
        out["windows"] = _eval_windows(trainer, eval_windows)
        del trainer
    except YxanulError as e:
        out["error"] = str(e)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _eval_windows(trainer, windows: int | None) -> list[float]:
    mark = torch.compiler.cudagraph_mark_step_begin if getattr(trainer, "graphs", False) else None
    return window_losses(trainer.model, trainer.loader, windows, trainer.autocast, mark).tolist()


def _steady_tokens_per_s(curves_path: Path, after: int) -> float | None:
    """Median logged tokens/s of the records after step `after` (the first one, with compilation, left out)."""
    rates = [r["tokens_per_s"] for r in _metric_records(curves_path)
             if r.get("step", 0) > after and r.get("tokens_per_s")]
    return statistics.median(rates[1:]) if len(rates) > 1 else (rates[0] if rates else None)


def _link_checkpoint(src: Path, dst: Path) -> None:
    """The trunk's checkpoint folder inside a branch's run folder: hard links (copies where links fail)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)


def _reusable(path: Path, settings: dict, reuse: bool) -> dict | None:
    if not (reuse and path.exists()):
        return None
    try:
        prev = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # unreadable: trained again
        return None
    ok = same_settings(prev.get("settings"), settings) and prev.get("error") is None
    return prev if ok else None


def _fork_trunk(base: dict, launch: dict, out_dir: Path, fork_at: int, reuse: bool) -> tuple[Path, dict]:
    """Train (or reuse) the BF16 trunk to `fork_at`; returns (checkpoint folder, record)."""
    from ..checkpoint.training import checkpoint_name
    from ..train import load_train_config

    trunk = out_dir / "trunk"
    ckpt = trunk / "checkpoints" / checkpoint_name(fork_at)
    settings = _compared({**base, "precision": "bf16", "fork_at": fork_at})
    prev = _reusable(trunk / "trunk.json", settings, reuse)
    if prev is not None and (ckpt / "meta.json").exists():
        print(f"[quality] trunk: reusing {ckpt}", flush=True)
        return ckpt, prev
    if trunk.exists():
        shutil.rmtree(trunk)
    cfg = load_train_config(None, {**base, **launch, "precision": "bf16", "out": str(trunk),
                                   "checkpoint_every": fork_at, "keep_last": 1})
    print(f"[quality] trunk: bf16 to step {fork_at} of {base['steps']}", flush=True)
    t0 = time.perf_counter()
    trainer = _make_trainer(cfg, {}, base["seed"], stop_at=fork_at)
    try:
        trainer.fit()
    except _ForkReached:
        pass
    if not (ckpt / "meta.json").exists():
        raise YxanulError(f"the trunk wrote no checkpoint at step {fork_at} (a bad step there?)", source=str(trunk))
    rec = {"settings": settings, "curves": _read_curves(trunk), "seconds": round(time.perf_counter() - t0, 1),
           "device": str(trainer.device), "error": None}
    del trainer
    atomic_write_json(trunk / "trunk.json", rec)
    return ckpt, rec


def _fork_branch(name: str, mode: str, over: dict, extra: dict, settings: dict, base: dict, ckpt: Path,
                 out_dir: Path, data_seed: int, eval_windows: int | None) -> dict:
    """Resume `mode` from the trunk's checkpoint in OUT/name, train to the end, evaluate every window."""
    from ..train import load_train_config

    run = out_dir / name
    if run.exists():
        shutil.rmtree(run)
    _link_checkpoint(ckpt, run / "checkpoints" / ckpt.name)
    shutil.copy2(ckpt.parent.parent / "metrics.jsonl", run / "metrics.jsonl")  # the trunk's part of the curves
    cfg = load_train_config(None, {**base, **over, "out": str(run), "checkpoint_every": 0})
    print(f"[quality] {name}: {mode} from step {settings['fork_at']} to {base['steps']}, data seed {data_seed}",
          flush=True)
    res = _train_and_evaluate(cfg, extra, data_seed, eval_windows, resume=str(run / "checkpoints" / ckpt.name))
    windows = res["windows"]
    rec = {"mode": mode, "settings": settings, "curves": _read_curves(run), "windows": windows,
           "final_val_loss": sum(windows) / len(windows) if windows else None,
           "final_train_loss": res["summary"].get("final_loss"), "skipped_steps": res["summary"].get("skipped_steps"),
           "seconds": res["seconds"], "tokens_per_s": _steady_tokens_per_s(run / "metrics.jsonl", settings["fork_at"]),
           "device": res["device"], "error": res["error"]}
    atomic_write_json(run / "result.json", rec)
    return rec


def _bit_identical(a: dict | None, b: dict | None) -> bool | None:
    """Whether two branches produced the same bits: every per-window loss and every logged training loss."""
    if not a or not b or a.get("windows") is None or b.get("windows") is None:
        return None
    tail = lambda rec: [x for x in rec["curves"]["train"] if x[0] > rec["settings"]["fork_at"]]  # noqa: E731
    return a["windows"] == b["windows"] and tail(a) == tail(b)


def fork_modes(modes: list[str]) -> list[str]:
    """The branches of one repeat: bf16 first, its twin for the noise floor, then the other modes."""
    rest = [m for m in modes if m not in ("bf16", FORK_NOISE_MODE, NOISE_MODE)]
    return ["bf16", FORK_NOISE_MODE] + rest


def run_fork(model: str, data: str | None, tokens: int, modes: list[str], fork_at: int, repeats: int = 1,
             batch: int = 16, seq: int = 2048, lr: float = 3e-3, min_lr: float | None = None,
             warmup: int | None = None, eval_every: int | None = None, eval_batches: int = 8,
             eval_windows: int | None = None, seed: int = 1337, policy: str | None = None,
             out: str = "runs/quality-fork", device: str = "auto", calibration_steps: int | None = None,
             fp8_all_recipe: str = "blockwise", compile: bool = False, fp8_backend: str = "auto",
             reuse: bool = True, compile_mode: str = "default", tune_kernels: bool = False,
             deterministic: bool = False, fp8_options: dict | None = None) -> dict:
    """The fork protocol (module docstring): a BF16 trunk to `fork_at`, then every mode to the end, `repeats`
    times. Writes OUT/fork.json (everything, per-window losses included) and OUT/fork.md (the table) after
    every branch; finished branches with the same settings are reused, so an interrupted run continues where it
    stopped. Returns the result. ``fp8_options`` as for :func:`run_quality`."""
    fp8_options = _fp8_options(fp8_options)
    base, steps, launch = _prepare(model, data, tokens, batch, seq, lr, min_lr, warmup, eval_every, eval_batches,
                                   seed, policy, device, fp8_all_recipe, compile, fp8_backend, repeats,
                                   compile_mode, tune_kernels, eval_windows)
    if not isinstance(fork_at, int) or isinstance(fork_at, bool) or not 0 < fork_at < steps:
        raise YxanulError(f"must be a step between 1 and {steps - 1} (the run has {steps} steps), got {fork_at!r}",
                          key="--fork-at")
    out_dir = Path(out)
    result = {"protocol": "fork", "model": model, "tokens": steps * batch * seq, "steps": steps, "fork_at": fork_at,
              "batch": batch, "seq": seq, "lr": base["lr"], "min_lr": base["min_lr"], "warmup": base["warmup"],
              "seed": seed, "repeats": repeats, "deterministic": bool(deterministic),
              **fp8_options, "device": None,
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "se_method": SE_METHOD,
              "branches": {}, "windows": {}, "curves": {}, "paired": [], "noise_floor": None,
              "bf16_pairs_bit_identical": []}
    with deterministic_algorithms(deterministic):
        ckpt, trunk = _fork_trunk(base, launch, out_dir, fork_at, reuse)
        result["trunk"] = {"seconds": trunk.get("seconds"), "curves": trunk.get("curves"), "checkpoint": str(ckpt)}
        recs: dict[tuple[str, int], dict] = {}
        for r in range(repeats):
            data_seed = seed + REPEAT_SEED_STRIDE * r
            for mode in fork_modes(modes):
                name = f"{mode}-r{r}"
                over, extra = _mode_setup("bf16" if mode == FORK_NOISE_MODE else mode, policy, out_dir,
                                          fp8_all_recipe)
                _fp8_only(over, calibration_steps, fp8_options)
                settings = _compared({**base, **over, "fork_at": fork_at, "data_seed": data_seed, "extra": extra,
                                      "eval_windows": eval_windows, "deterministic": bool(deterministic)})
                rec = _reusable(out_dir / name / "result.json", settings, reuse)
                if rec is not None:
                    print(f"[quality] {name}: reusing {out_dir / name / 'result.json'}", flush=True)
                else:
                    rec = _fork_branch(name, mode, over, extra, settings, {**base, **launch}, ckpt, out_dir,
                                       data_seed, eval_windows)
                recs[(mode, r)] = rec
                _fork_summary(result, recs, modes)
                atomic_write_json(out_dir / "fork.json", result)
                atomic_write_text(out_dir / "fork.md", fork_markdown(result) + "\n")
    return result


def _fork_summary(result: dict, recs: dict, modes: list[str]) -> None:
    for (mode, r), rec in recs.items():
        name = f"{mode}-r{r}"
        result["device"] = result["device"] or rec.get("device")
        result["branches"][name] = {k: rec.get(k) for k in ("mode", "final_val_loss", "final_train_loss",
                                                             "skipped_steps", "seconds", "tokens_per_s", "error")}
        result["windows"][name] = rec.get("windows")
        if r == 0:
            result["curves"][mode] = rec.get("curves")
    windows = {k: v.get("windows") for k, v in recs.items()}
    rows = paired_rows(windows, fork_modes(modes))
    result["noise_floor"] = next((x for x in rows if x["mode"] == FORK_NOISE_MODE), None)
    result["paired"] = [x for x in rows if x["mode"] != FORK_NOISE_MODE]
    reps = sorted({r for _, r in recs})
    result["bf16_pairs_bit_identical"] = [_bit_identical(recs.get(("bf16", r)), recs.get((FORK_NOISE_MODE, r)))
                                          for r in reps]


def fork_markdown(result: dict) -> str:
    rows = ([result["noise_floor"]] if result.get("noise_floor") else []) + result.get("paired", [])
    start = (f"BF16 trunk to step {result['fork_at']}, branches to step {result['steps']}"
             if result.get("fork_at") is not None else f"from scratch, {result['steps']} steps")
    head = (f"{result['model']}: {start} "
            f"({result['batch']}x{result['seq']} tokens per step, lr {result['lr']:g}, warm-up {result['warmup']}), "
            f"{result['repeats']} repeat(s), device {result['device']}, torch {result['torch']}"
            + (", deterministic algorithms" if result.get("deterministic") else "")
            + "".join(f", {_FP8_OPTION_WORDS[k]}" for k in FP8_OPTION_FLAGS if result.get(k)))
    n = next((x["windows"] for x in rows), None)
    noise = next((x for x in result.get("paired", []) if x.get("pair_noise_pct") is not None), None)
    flags = result.get("bf16_pairs_bit_identical")
    tail = (f"delta = mean over {n} validation windows of (L_mode - L_ref) / mean L_ref, mean over repeats, L_ref "
            f"the per-window mean of bf16 and {FORK_NOISE_MODE} where both ran (else bf16; {FORK_NOISE_MODE}'s own "
            f"row: bf16); "
            f"SE: {result['se_method']}"
            + (f"; run-to-run noise of one run pair's delta {noise['pair_noise_pct']:.3f}% ({noise['noise_df']} "
               f"degrees of freedom)"
               if noise else "") + f". {FORK_NOISE_MODE}: a second BF16 branch on the same data (noise floor). "
            + (f"BF16 pairs bit-identical per repeat: {flags}" if any(x is not None for x in flags or [None])
               else "BF16 pairs bit-identical: not recorded"))
    if noise:  # what more repeats would buy, at this noise (a mode against the BF16 pair's mean)
        wse = max(r["window_se_pct"] for r in result["paired"] if r.get("window_se_pct") is not None)
        need = [(t, repeats_for_se(t, noise["pair_noise_pct"], wse)) for t in SE_TARGETS]
        tail += ("\n\nAt this noise a mode's SE against the BF16 pair's mean reaches "
                 + ", ".join(f"{t:.2f}% with R = {n} repeats" if n is not None
                             else f"{t:.2f}% with no number of repeats (the per-window SE alone is above it)"
                             for t, n in need)
                 + " (the noise is known to its degrees of freedom only).")
    return head + "\n\n" + markdown_table(rows) + "\n\n" + tail
