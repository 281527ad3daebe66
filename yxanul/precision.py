"""Precision policy: the design note's ``precision_strategy`` YAML, plus explicit glob lists.

Resolution (deterministic; every module that owns parameters gets exactly one precision):

1. Each module gets a *component* from its name and type: ``embeddings`` (``embeddings.*``), ``layer_norms``
   (RMSNorm modules), ``attention_compute`` (``*.attn.{q,k,v,o}_proj``), ``ffn_compute``
   (``*.mlp.{gate,up,down}_proj``), ``output_head`` (``lm_head``). Its precision is the value of that key in
   ``precision_strategy``; anything else gets ``default_dtype``.
2. Explicit lists (``fp32_components``, ``bf16_components``, ``fp8_components``) override step 1. A pattern is
   an fnmatch glob (``*`` crosses dots) matched against the module name, the name with a ``model.`` prefix,
   and the name with its last part replaced by the module's type (so ``model.*.rmsnorm`` matches every
   RMSNorm inside a layer; the top-level final ``norm`` is matched by its name). When patterns of several lists match one module, the higher precision wins:
   fp32 > bf16 > fp8.
3. ``use_fp8: false`` turns every FP8 result into ``default_dtype`` (BF16 if that is FP8 too).
4. Patterns that name runtime state rather than modules (``optimizer.*``, ``loss_scale``,
   ``gradient_accumulator``, ``attention.softmax``, ...) are accepted and reported as runtime components.
   Any other pattern that matches no module is an error in strict mode (the default) and a warning otherwise.

The factorized, tied output head owns no parameters; it is listed as ``lm_head`` with 0 parameters and the
``output_head`` precision, which governs its GEMM.
"""
from __future__ import annotations

import fnmatch
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch.nn as nn

from .config import DEFAULT_POLICY, dataclass_from_dict, load_yaml
from .errors import YxanulError, brief
from .fp8.options import Fp8Options
from .fp8.recipe import Fp8Recipe

PRECISIONS = ("fp8_e4m3", "fp8_e5m2", "bf16", "fp16", "fp32")
BYTES = {"fp8_e4m3": 1, "fp8_e5m2": 1, "bf16": 2, "fp16": 2, "fp32": 4}
RANK = {"fp32": 4, "bf16": 3, "fp16": 2, "fp8_e5m2": 1, "fp8_e4m3": 0}  # higher wins on conflicts
_DTYPE_ALIASES = {
    "bfloat16": "bf16", "bf16": "bf16",
    "float16": "fp16", "fp16": "fp16", "half": "fp16",
    "float32": "fp32", "fp32": "fp32", "float": "fp32",
    "fp8_e4m3": "fp8_e4m3", "e4m3": "fp8_e4m3", "float8_e4m3fn": "fp8_e4m3",
    "fp8_e5m2": "fp8_e5m2", "e5m2": "fp8_e5m2", "float8_e5m2": "fp8_e5m2",
}
RUNTIME_COMPONENTS = ("optimizer.*", "optimizer", "loss_scale", "gradient_accumulator", "attention.softmax",
                      "activations", "master_weights")
COMPONENT_KEYS = ("embeddings", "layer_norms", "attention_compute", "ffn_compute", "output_head")


def canonical_dtype(value, source: str, key: str, fp8_format: str = "e4m3") -> str:
    if not isinstance(value, str):
        raise YxanulError(f"expected a dtype name, got {brief(value)}", source=source, key=key)
    v = value.strip().lower()
    if v == "fp8":
        v = f"fp8_{fp8_format}"
    out = _DTYPE_ALIASES.get(v)
    if out is None:
        raise YxanulError(f"unknown dtype {brief(value)} (expected one of: bfloat16, float16, float32, fp8_e4m3, "
                          f"fp8_e5m2)", source=source, key=key)
    return out


@dataclass(frozen=True)
class PrecisionStrategy:
    default_dtype: str = "bfloat16"
    use_fp8: bool = True
    fp8_format: str = "e4m3"
    embeddings: str = "bfloat16"
    layer_norms: str = "bfloat16"
    attention_compute: str = "fp8_e4m3"
    ffn_compute: str = "fp8_e4m3"
    output_head: str = "bfloat16"
    optimizer_dtype: str = "float32"
    master_weights: str = "float32"
    gradient_accumulation: str = "float32"
    tile_size: int = 128
    scale_dtype: str = "float32"
    calibration_steps: int = 0


@dataclass(frozen=True)
class ModulePrecision:
    name: str
    kind: str          # Linear, Embedding, RMSNorm, TiedHead
    component: str     # embeddings, layer_norms, attention_compute, ffn_compute, output_head, other
    precision: str     # canonical
    params: int
    rule: str          # which rule decided


@dataclass
class Policy:
    strategy: PrecisionStrategy = field(default_factory=PrecisionStrategy)
    fp32_components: tuple[str, ...] = ()
    bf16_components: tuple[str, ...] = ()
    fp8_components: tuple[str, ...] = ()
    recipe: Fp8Recipe = field(default_factory=Fp8Recipe)
    fp8_options: Fp8Options = field(default_factory=Fp8Options)  # how (not what) the FP8 layers compute
    strict: bool = True
    source: str = "<default>"
    settings: dict = field(default_factory=dict, repr=False, compare=False)  # the file as read (JSON-safe)

    # -- derived settings ---------------------------------------------------------------------------
    @property
    def fp8_format(self) -> str:
        return self.strategy.fp8_format

    def dtype_of(self, key: str) -> str:
        return canonical_dtype(getattr(self.strategy, key), self.source, f"precision_strategy.{key}",
                               self.strategy.fp8_format)

    def with_recipe(self, **changes) -> "Policy":
        r = asdict(self.recipe)
        r.update({k: v for k, v in changes.items() if v is not None})
        out = Policy(**{**self.__dict__})
        out.recipe = Fp8Recipe(**r).validate(self.source)
        return out

    def with_fp8_options(self, **changes) -> "Policy":
        """A copy whose FP8 options have `changes` (None values ignored), validated."""
        o = self.fp8_options.as_dict()
        o.update({k: v for k, v in changes.items() if v is not None})
        out = Policy(**{**self.__dict__})
        out.fp8_options = Fp8Options(**o).validate(self.source)
        return out

    def with_fp8(self, enabled: bool) -> "Policy":
        out = Policy(**{**self.__dict__})
        out.strategy = PrecisionStrategy(**{**asdict(self.strategy), "use_fp8": enabled})
        return out

    # -- resolution ---------------------------------------------------------------------------------
    def resolve(self, model: nn.Module, strict: bool | None = None) -> list[ModulePrecision]:
        strict = self.strict if strict is None else strict
        default = self.dtype_of("default_dtype")
        fallback = default if not default.startswith("fp8") else "bf16"
        lists = (("fp32", self.fp32_components), ("bf16", self.bf16_components),
                 ("fp8_" + self.strategy.fp8_format, self.fp8_components))
        used: set[str] = set()
        out: list[ModulePrecision] = []
        for name, mod, kind in _param_modules(model):
            comp = _component(name, kind)
            if comp in COMPONENT_KEYS:
                prec, rule = self.dtype_of(comp), f"precision_strategy.{comp}"
            else:
                prec, rule = default, "precision_strategy.default_dtype"
            best = None
            for lp, pats in lists:
                for pat in pats:
                    if _matches(pat, name, kind):
                        used.add(pat)
                        if best is None or RANK[lp] > RANK[best[0]]:
                            best = (lp, pat)
            if best is not None:
                prec, rule = best[0], f"pattern {best[1]!r}"
            if prec.startswith("fp8") and not self.strategy.use_fp8:
                prec, rule = fallback, "use_fp8: false"
            elif prec.startswith("fp8") and kind != "Linear":
                # training converts Linear layers only: a norm, the embedding or a tied head keeps its compute dtype
                prec, rule = fallback, f"{rule} (FP8 is for Linear layers only)"
            params = sum(p.numel() for p in mod.parameters(recurse=False)) if mod is not None else 0
            out.append(ModulePrecision(name, kind, comp, prec, params, rule))
        for lp, pats in lists:
            for pat in pats:
                if pat in used or _is_runtime(pat):
                    continue
                msg = f"pattern {pat!r} matches no module"
                if strict:
                    raise YxanulError(msg + " (pass --lax to only warn)", source=self.source,
                                      key=f"{lp.split('_')[0]}_components")
                warnings.warn(f"{self.source}: {msg}", stacklevel=2)
        return out

    def fp8_modules(self, model: nn.Module) -> dict[str, str]:
        """Names of the Linear modules that compute in FP8 -> their precision."""
        return {m.name: m.precision for m in self.resolve(model) if m.kind == "Linear" and m.precision.startswith("fp8")}

    def runtime_components(self) -> list[tuple[str, str]]:
        out = []
        for lp, pats in (("fp32", self.fp32_components), ("bf16", self.bf16_components)):
            out += [(p, lp) for p in pats if _is_runtime(p)]
        return out


def _is_runtime(pat: str) -> bool:
    p = pat[len("model."):] if pat.startswith("model.") else pat
    return any(fnmatch.fnmatchcase(p, r) or fnmatch.fnmatchcase(r, p) for r in RUNTIME_COMPONENTS)


def _param_modules(model: nn.Module):
    seen_head = False
    for name, mod in model.named_modules():
        if not name or not any(True for _ in mod.parameters(recurse=False)):
            continue
        if name == "lm_head":
            seen_head = True
        kind = "RMSNorm" if type(mod).__name__ == "RMSNorm" else \
            "Embedding" if isinstance(mod, nn.Embedding) else \
            "Linear" if isinstance(mod, nn.Linear) or hasattr(mod, "in_features") else type(mod).__name__
        yield name, mod, kind
    if not seen_head and hasattr(model, "embeddings") and getattr(model, "lm_head", 0) is None:
        yield "lm_head", None, "TiedHead"


def _component(name: str, kind: str) -> str:
    last = name.rsplit(".", 1)[-1]
    if name == "lm_head" or last == "lm_head":
        return "output_head"
    if name.startswith("embeddings") or kind == "Embedding":
        return "embeddings"
    if kind == "RMSNorm" or "norm" in last:
        return "layer_norms"
    if last in ("q_proj", "k_proj", "v_proj", "o_proj"):
        return "attention_compute"
    if last in ("gate_proj", "up_proj", "down_proj"):
        return "ffn_compute"
    return "other"


def _matches(pat: str, name: str, kind: str) -> bool:
    cands = (name, "model." + name)
    if "." in name:
        typed = name.rsplit(".", 1)[0] + "." + kind.lower()
        cands += (typed, "model." + typed)
    return any(fnmatch.fnmatchcase(c, pat) for c in cands)


_TOP_KEYS = {"precision_strategy", "fp32_components", "bf16_components", "fp8_components", "recipe", "strict"}


def policy_record(policy: Policy) -> dict:
    """What a checkpoint records of the policy it trained with: the file and its settings as read, so that a
    resumed run can tell an edited policy from the one its layers were converted by."""
    return {"source": policy.source, "settings": policy.settings}


def policy_changes(recorded: dict, current: dict) -> list[str]:
    """The settings (``section.key``) in which two :func:`policy_record` results differ, sorted."""
    a, b = recorded.get("settings") or {}, current.get("settings") or {}
    out = set()
    for k in set(a) | set(b):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.update(f"{k}.{kk}" for kk in set(va) | set(vb) if va.get(kk) != vb.get(kk))
        elif va != vb:
            out.add(str(k))
    return sorted(out)


def load_policy(path: str | Path | None = None, strict: bool | None = None) -> Policy:
    """Load a policy YAML (default: the shipped mixed_precision_config.yaml) and validate it fully."""
    path = Path(path) if path is not None else DEFAULT_POLICY
    src = str(path)
    data = {k.lower() if isinstance(k, str) else k: v for k, v in load_yaml(path).items()}
    for k in data:
        if k not in _TOP_KEYS:
            raise YxanulError(f"unknown key (expected: {', '.join(sorted(_TOP_KEYS))})", source=src, key=str(k))
    ps = data.get("precision_strategy", {}) or {}
    if not isinstance(ps, dict):
        raise YxanulError("expected a mapping", source=src, key="precision_strategy")
    strategy = dataclass_from_dict(PrecisionStrategy, ps, src, prefix="precision_strategy.")
    pol = Policy(strategy=strategy, source=src, settings=json.loads(json.dumps(data, default=str)))
    fmt = strategy.fp8_format.lower()
    strategy = PrecisionStrategy(**{**asdict(strategy), "fp8_format": fmt})
    pol.strategy = strategy
    if fmt not in ("e4m3", "e5m2"):
        raise YxanulError(f"unknown FP8 format {strategy.fp8_format!r} (expected e4m3 or e5m2)", source=src,
                          key="precision_strategy.fp8_format")
    for key in ("default_dtype", *COMPONENT_KEYS, "optimizer_dtype", "master_weights", "gradient_accumulation"):
        pol.dtype_of(key)
    for key in ("optimizer_dtype", "master_weights", "gradient_accumulation"):
        if pol.dtype_of(key).startswith("fp8"):
            raise YxanulError("must not be an FP8 dtype", source=src, key=f"precision_strategy.{key}")
    if strategy.scale_dtype.lower() not in ("float32", "fp32"):
        raise YxanulError(f"unsupported scale dtype {strategy.scale_dtype!r} (FP32 scales only)", source=src,
                          key="precision_strategy.scale_dtype")
    if strategy.tile_size <= 0 or strategy.tile_size % 16:
        raise YxanulError(f"must be a positive multiple of 16, got {strategy.tile_size}", source=src,
                          key="precision_strategy.tile_size")
    if strategy.calibration_steps < 0:
        raise YxanulError("must be >= 0", source=src, key="precision_strategy.calibration_steps")
    for lst in ("fp32_components", "bf16_components", "fp8_components"):
        v = data.get(lst, []) or []
        if not isinstance(v, list) or not all(isinstance(p, str) and p for p in v):
            raise YxanulError("expected a list of glob patterns", source=src, key=lst)
        setattr(pol, lst, tuple(v))
    rec = data.get("recipe", {}) or {}
    if not isinstance(rec, dict):
        raise YxanulError("expected a mapping", source=src, key="recipe")
    base = Fp8Recipe(block_size=strategy.tile_size, calibration_steps=strategy.calibration_steps)
    pol.recipe = dataclass_from_dict(Fp8Recipe, rec, src, prefix="recipe.", base=base).validate(src)
    if "strict" in data:
        if not isinstance(data["strict"], bool):
            raise YxanulError("expected true/false", source=src, key="strict")
        pol.strict = data["strict"]
    if strict is not None:
        pol.strict = strict
    return pol


def distribution(mods: list[ModulePrecision]) -> dict:
    total = sum(m.params for m in mods)
    by: dict[str, dict] = {}
    for m in mods:
        d = by.setdefault(m.precision, {"params": 0, "bytes": 0, "percent": 0.0})
        d["params"] += m.params
        d["bytes"] += m.params * BYTES[m.precision]
    for d in by.values():
        d["percent"] = round(100.0 * d["params"] / total, 4) if total else 0.0
    order = sorted(by, key=lambda k: PRECISIONS.index(k))
    return {"total_params": total, "by_precision": {k: by[k] for k in order}}
