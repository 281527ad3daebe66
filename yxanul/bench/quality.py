"""Loss parity on real text: BF16 against the note's FP8 policy and against all-FP8.

Every mode trains the same model from the same initialization on the same batch order (the training loop's
batches are a pure function of the data seed and the step) and is evaluated on the same fixed validation
windows at the same steps. The BF16 noise band is the difference between two BF16 runs that differ only in
their data-order seed: a mode whose final validation loss differs from BF16 by less than that is
indistinguishable from BF16 at this budget.

Modes:
  ``bf16``            autocast BF16, FP32 master weights and optimizer states (the reference)
  ``fp8-<recipe>``    the note's policy (q/k/v/o/gate/up/down in FP8) with recipe blockwise | tensorwise |
                      rowwise | delayed; ``fp8`` is the policy file's own recipe
  ``fp8-head``        the note's policy plus the output head GEMM in FP8 (beyond the note)
  ``fp8-all``         everything the note keeps out of FP8 is quantized too: the embedding output, every
                      RMSNorm output, the embedding projection and the output head (E4M3, 1x128 tiles,
                      straight-through gradients for the fake-quantized activations)
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ..errors import YxanulError
from ..fmt import table
from ..io import atomic_write_json

BASE_MODES = ("bf16", "fp8", "fp8-blockwise", "fp8-tensorwise", "fp8-rowwise", "fp8-delayed", "fp8-head", "fp8-all")
NOISE_MODE = "bf16-seed2"


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in str(text).split(",") if m.strip()]
    if not modes:
        raise YxanulError("no modes given", key="--modes")
    for m in modes:
        if m not in BASE_MODES and m != NOISE_MODE:
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
    if mode in ("bf16", NOISE_MODE):
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


def _make_trainer(cfg, extra: dict, data_seed: int):
    """A Trainer whose batches follow `data_seed` (initialization still follows cfg.seed) and whose model gets
    the fused cross-entropy (and FP8 head / all-FP8 hooks) before compilation."""
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

    t = QualityTrainer(cfg, log=lambda *a, **k: print(*a, **k, flush=True))
    if data_seed != cfg.seed:
        t.loader = DataLoader(t.data_dir, cfg.batch_size, cfg.seq_len, seed=data_seed, rank=t.rank,
                              world_size=t.world_size, device=t.device)
    return t


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


def same_settings(a: dict | None, b: dict) -> bool:
    """Whether a stored result was trained with these settings. Keys set to None mean "not applicable" and
    are ignored, so results written before a setting became mode-specific (BF16 runs used to carry
    ``fp8_calibration_steps: null``) stay reusable."""
    if not isinstance(a, dict):
        return False
    return ({k: v for k, v in a.items() if v is not None} == {k: v for k, v in b.items() if v is not None})


def _read_curves(run_dir: Path) -> dict:
    train, val = [], []
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
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


def run_quality(model: str, data: str | None, tokens: int, modes: list[str], seeds: int = 2, batch: int = 16,
                seq: int = 2048, lr: float = 3e-3, min_lr: float | None = None, warmup: int | None = None,
                eval_every: int | None = None, eval_batches: int = 8, last_evals: int = 3, seed: int = 1337,
                policy: str | None = None, out: str = "runs/quality", device: str = "auto",
                calibration_steps: int | None = None, fp8_all_recipe: str = "blockwise",
                compile: bool = False, fp8_backend: str = "auto", reuse: bool = True, repeats: int = 1,
                compile_mode: str = "default", tune_kernels: bool = False) -> dict:
    """Train every mode; returns (and writes to OUT/quality.json) the comparison. ``fp8_all_recipe`` is the
    recipe of the fp8-all mode's linears (its extra activations are always 1 x 128 tiles).

    ``repeats=R`` trains every mode R times; repeat r uses data-order seed ``seed + REPEAT_SEED_STRIDE * r`` for
    all modes (so modes stay paired within a repeat) and lives in ``OUT/<mode>-r<r>`` (r >= 1). Rows then give
    the mean final loss, the per-repeat values, the paired difference from BF16 (mean over repeats) and its
    standard error; a difference is "within noise" when it is below twice that error.

    ``compile_mode`` (e.g. ``reduce-overhead``, CUDA graphs) changes how the kernels are launched, not what they
    compute, so it is not part of the settings that decide whether a stored result is reused; nor is
    ``tune_kernels`` (launch settings of the same kernels)."""
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise YxanulError(f"must be a positive integer, got {repeats!r}", key="--repeats")
    from ..fp8.recipe import RECIPES
    if fp8_all_recipe not in RECIPES:
        raise YxanulError(f"unknown recipe {fp8_all_recipe!r} (expected one of {', '.join(RECIPES)})",
                          key="--fp8-all-recipe")
    from ..model import COMPILE_MODES
    from ..train import load_train_config
    if compile_mode not in COMPILE_MODES:
        raise YxanulError(f"unknown compile mode {compile_mode!r} (expected one of {', '.join(COMPILE_MODES)})",
                          key="--compile-mode")
    if compile_mode != "default" and not compile:
        raise YxanulError(f"compile mode {compile_mode} needs --compile", key="--compile-mode")
    if tune_kernels and not compile:
        raise YxanulError("--tune-kernels needs --compile", key="--tune-kernels")

    out_dir = Path(out)
    tokens_per_step = batch * seq
    steps = max(1, tokens // tokens_per_step)
    eval_every = eval_every or max(1, steps // 20)
    warmup = warmup if warmup is not None else max(1, steps // 20)
    run_modes = list(modes)
    if seeds >= 2 and "bf16" in run_modes and NOISE_MODE not in run_modes:
        run_modes.insert(run_modes.index("bf16") + 1, NOISE_MODE)
    base = {"model": model, "data": data, "steps": steps, "batch_size": batch, "seq_len": seq, "lr": lr,
            "min_lr": lr / 10 if min_lr is None else min_lr, "warmup": warmup, "eval_every": eval_every,
            "eval_batches": eval_batches, "log_every": eval_every, "checkpoint_every": 0, "seed": seed,
            "device": device, "compile": compile, "fp8_backend": fp8_backend, "progress": False,
            "tensorboard": False, "policy": policy}
    result = {"model": model, "tokens": steps * tokens_per_step, "steps": steps, "batch": batch, "seq": seq,
              "lr": lr, "seed": seed, "device": None, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "repeats": repeats, "rows": [], "bf16_noise_pct": None,
              "curves": {}}
    recs: dict[tuple[str, int], dict] = {}
    jobs = [(mode, r) for r in range(repeats) for mode in run_modes if not (r and mode == NOISE_MODE)]
    for mode, r in jobs:
        name = mode if r == 0 else f"{mode}-r{r}"
        mode_dir = out_dir / name
        done = mode_dir / "result.json"
        data_seed = (seed + 1 if mode == NOISE_MODE else seed) + REPEAT_SEED_STRIDE * r
        over, extra = _mode_setup(mode, policy, out_dir, fp8_all_recipe)
        if over.get("precision") == "fp8" and calibration_steps is not None:
            # only FP8 modes' settings carry it, so BF16 results stay reusable when it changes
            over["fp8_calibration_steps"] = calibration_steps
        settings = _jsonable({**base, **over, "data_seed": data_seed, "extra": extra, "last_evals": last_evals})
        prev = json.loads(done.read_text(encoding="utf-8")) if (reuse and done.exists()) else None
        if prev is not None and same_settings(prev.get("settings"), settings) and prev.get("error") is None:
            rec = prev
            print(f"[quality] {name}: reusing {done}", flush=True)
        else:
            cfg = load_train_config(None, {**base, **over, "out": str(mode_dir), "compile_mode": compile_mode,
                                           "tune_kernels": bool(tune_kernels), "policy": over.get("policy", policy)})
            if mode_dir.exists() and (mode_dir / "metrics.jsonl").exists():
                import shutil
                shutil.rmtree(mode_dir)
            print(f"[quality] {name}: {steps} steps x {tokens_per_step} tokens", flush=True)
            t0 = time.perf_counter()
            error = None
            try:
                trainer = _make_trainer(cfg, extra, data_seed)
                device_name = (torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda"
                               else "cpu")
                summary = trainer.fit()
                del trainer
            except YxanulError as e:
                error, summary, device_name = str(e), {}, None
            curves = _read_curves(mode_dir)
            rec = {"mode": mode, "settings": settings, "compile_mode": compile_mode,
                   "tune_kernels": bool(tune_kernels), "curves": curves, "final_val_loss": final_val(curves, last_evals),
                   "final_train_loss": summary.get("final_loss"), "skipped_steps": summary.get("skipped_steps"),
                   "seconds": round(time.perf_counter() - t0, 1), "device": device_name, "error": error}
            atomic_write_json(done, rec)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        result["device"] = result["device"] or rec.get("device")
        result["curves"][name] = rec["curves"]
        recs[(mode, r)] = rec
        result["rows"] = _rows(recs, repeats)
        summarize(result)
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
    result["bf16_noise_pct"] = round(100.0 * abs(noise - ref) / ref, 4) if (noise is not None and ref) else None
    for r in result["rows"]:
        d, n = r.get("rel_diff_vs_bf16_pct"), result["bf16_noise_pct"]
        r["within_noise"] = (abs(d) <= n) if (d is not None and n is not None) else None
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
    for r in result["rows"]:
        v, d = r.get("final_val_loss"), r.get("rel_diff_vs_bf16_pct")
        if r.get("paired_rel_diff_pct") is not None and r.get("paired_sem_pct") is not None:
            d_text = f"{r['paired_rel_diff_pct']:+.3f}% ± {r['paired_sem_pct']:.3f}"
        else:
            d_text = f"{d:+.3f}%" if d is not None else "-"
        rows.append([r["mode"], f"{v:.4f}" if v is not None else "-", d_text,
                     {True: "yes", False: "no", None: "-"}[r.get("within_noise")], r.get("skipped_steps", "-"),
                     r.get("error") or ""])
    head = (f"{result['model']}: {result['tokens']:,} tokens per mode ({result['steps']} steps x "
            f"{result['batch']}x{result['seq']}), device {result['device']}, torch {result['torch']}")
    noise = result.get("bf16_noise_pct")
    tail = f"BF16 seed-to-seed noise band: {noise:.3f}%" if noise is not None else "BF16 noise band: not measured"
    if result.get("repeats", 1) > 1:
        std = result.get("bf16_repeat_std_pct")
        tail += (f"\n{result['repeats']} repeats per mode (paired by data order): 'vs bf16' is the mean paired "
                 f"difference ± its standard error" + (f"; BF16 repeat-to-repeat std {std:.3f}%" if std else ""))
    return head + "\n" + table(rows, ["mode", "final val loss", "vs bf16", "in noise", "skipped", "error"],
                               "lrrrrl") + "\n" + tail


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
