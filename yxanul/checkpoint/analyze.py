"""Precision analysis of safetensors checkpoints from their headers alone.

Every tensor is classified by name into a component, paired with its block-scale tensor where it has one, and
counted by dtype, component and layer. No tensor data is read, so a multi-GB shard costs one small read.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from ..errors import YxanulError
from ..fmt import human_bytes, table
from .layout import latest_checkpoint
from .safetensors_header import INDEX_NAME, Checkpoint, TensorInfo, open_checkpoint, safe_name

COMPONENTS = ("embeddings", "norms", "attention", "mlp", "moe_experts", "shared_experts", "router", "lm_head",
              "scales", "other")
COMPONENT_LABELS = {
    "embeddings": "Embeddings", "norms": "Norms", "attention": "Attention projections", "mlp": "MLP gate/up/down",
    "moe_experts": "MoE experts", "shared_experts": "MoE shared experts", "router": "Router / gate",
    "lm_head": "LM head", "scales": "Quantization scales", "other": "Other",
}
# Order used in tables: compute precisions first, like the note
DTYPE_ORDER = ("F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "BF16", "F16", "F32", "F64",
               "I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "C64", "BOOL")

_SCALE_SUFFIXES = ("_scale_inv", "_scale", ".scale_inv", ".scale")
_ATTN = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
         "kv_b_proj", "c_attn", "c_proj_attn", "query_key_value", "query", "key", "value", "out_proj", "wq", "wk",
         "wv", "wo", "wqkv", "Wqkv", "in_proj"}
_MLP = {"gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "c_fc", "w1", "w2", "w3",
        "dense_h_to_4h", "dense_4h_to_h", "fc_in", "fc_out"}
_ATTN_PARENTS = {"self_attn", "attn", "attention", "self_attention"}
_MLP_PARENTS = {"mlp", "feed_forward", "ffn", "block_sparse_moe"}
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def scale_base(name: str) -> str | None:
    """For a block-scale tensor name, the name of the weight it scales (``x.weight_scale_inv`` -> ``x.weight``)."""
    for suf in _SCALE_SUFFIXES:
        if name.endswith(suf) and len(name) > len(suf):
            return name[: -len(suf)]
    return None


def is_scale_name(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return scale_base(name) is not None or last in ("input_scale", "weight_scale", "scale_inv", "amax")


def classify(name: str) -> str:
    """Component of a tensor, from its name (HF Llama/Qwen/DeepSeek/GPT-2/Mixtral and yxanul conventions)."""
    if is_scale_name(name):
        return "scales"
    parts = name.split(".")
    mods = parts[:-1] if len(parts) > 1 and parts[-1] in ("weight", "bias", "e_score_correction_bias") else parts
    last = mods[-1] if mods else name
    low = [m.lower() for m in mods]
    if "shared_experts" in low or "shared_expert" in low:
        return "shared_experts"
    if "experts" in low:
        return "moe_experts"
    if last in ("lm_head", "head", "output", "embed_out") and not any("norm" in m for m in low):
        return "lm_head"
    if parts[-1] == "e_score_correction_bias" or last in ("router", "gate", "shared_expert_gate") and \
            (len(mods) < 2 or mods[-2] in _MLP_PARENTS or mods[-2] in ("moe", "router")):
        return "router"
    if any(k in m for m in low for k in ("embed", "wte", "wpe", "tok_embeddings", "word_embeddings")) \
            and "norm" not in last.lower():
        return "embeddings"
    if "norm" in last.lower() or last.startswith("ln") or last in ("enorm", "hnorm"):
        return "norms"
    if last in _ATTN or (len(mods) >= 2 and mods[-2] in _ATTN_PARENTS):
        return "attention"
    if last in _MLP or (len(mods) >= 2 and mods[-2] in _MLP_PARENTS):
        return "mlp"
    if last == "c_proj" and len(mods) >= 2:
        return "attention" if mods[-2] == "attn" else "mlp" if mods[-2] == "mlp" else "other"
    return "other"


def layer_of(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def _dim_block(n: int, s: int) -> int | None:
    """A block size b with ceil(n / b) == s (s >= 2), preferring a power of two, then a multiple of 16."""
    if s < 2 or n < s:
        return None
    lo = -(-n // s)                # smallest b with ceil(n / b) <= s
    if -(-n // lo) != s:
        return None
    hi = (n - 1) // (s - 1)        # largest b with ceil(n / b) >= s
    p = 1 << (lo - 1).bit_length()  # smallest power of two >= lo
    if p <= hi:
        return p
    m16 = -(-lo // 16) * 16
    return m16 if m16 <= hi else lo


def infer_block(weight_shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> list[int] | None:
    """Block shape [br, bc] that maps ``weight_shape`` to ``scale_shape`` (``None`` if none fits).

    A scalar scale means one block for the whole tensor; a ``[rows, 1]`` scale on a 2-D weight means per-row.
    An axis of scale size 1 spans the whole dim, so its block is that dim.
    """
    if len(scale_shape) == 0 or math.prod(scale_shape) == 1 and len(weight_shape) <= 2:
        if len(weight_shape) == 2:
            return [int(weight_shape[0]), int(weight_shape[1])]
        if len(weight_shape) == 1:
            return [1, int(weight_shape[0])]
        return None
    if len(weight_shape) == 2 and len(scale_shape) == 1 and scale_shape[0] == weight_shape[0]:
        return [1, int(weight_shape[1])]   # per-output-channel
    if len(weight_shape) != 2 or len(scale_shape) != 2:
        return None
    out = []
    for n, s in zip(weight_shape, scale_shape):
        if s == 1:
            out.append(int(n))
            continue
        b = _dim_block(int(n), int(s))
        if b is None:
            return None
        out.append(b)
    return out


def pair_scales(tensors: dict[str, TensorInfo]) -> tuple[list[dict], list[str]]:
    """Pair each ``*_scale_inv`` / ``*_scale`` with its weight. Returns (pairs, warnings)."""
    pairs, warnings = [], []
    for name, t in tensors.items():
        base = scale_base(name)
        if base is None:
            continue
        w = tensors.get(base)
        if w is None and not base.endswith(".weight"):
            w = tensors.get(base + ".weight")
        if w is None:
            if base.rsplit(".", 1)[-1] not in ("input", "activation", "kv", "k", "v", "q", "prob", "output"):
                warnings.append(f"scale {safe_name(name)} has no weight {safe_name(base)}")
            continue
        block = infer_block(w.shape, t.shape)
        if block is None:
            warnings.append(f"scale {safe_name(name)} {list(t.shape)} does not tile weight {safe_name(w.name)} "
                            f"{list(w.shape)}")
            continue
        pairs.append({"weight": w.name, "scale": name, "block": block})
    pairs.sort(key=lambda d: d["weight"])
    return pairs, warnings


def resolve_run_folder(path) -> Path:
    """A training run folder (``checkpoints/`` inside, no weights beside it) -> its latest checkpoint's weights;
    any other path unchanged."""
    p = Path(path)
    if not p.is_dir() or not (p / "checkpoints").is_dir() or (p / INDEX_NAME).exists() \
            or any(p.glob("*.safetensors")):
        return p
    ckpt = latest_checkpoint(p)
    if ckpt is None:
        raise YxanulError("run folder holds no checkpoint yet", source=str(p))
    weights = ckpt / "model.safetensors"
    if not weights.is_file():
        raise YxanulError("sharded checkpoint without model.safetensors; make one with `yxanul checkpoint "
                          "consolidate`", source=str(ckpt))
    return weights


def analyze(path_or_ckpt) -> dict:
    """Analyze a checkpoint (a path, a training run folder, or a :class:`Checkpoint`). Returns the report dict
    (JSON-serializable)."""
    ck: Checkpoint = path_or_ckpt if isinstance(path_or_ckpt, Checkpoint) else \
        open_checkpoint(resolve_run_folder(path_or_ckpt))
    all_t: dict[str, TensorInfo] = {}
    for _, t in ck.tensors():
        all_t[t.name] = t
    total_params = sum(t.numel for t in all_t.values())
    total_bytes = sum(t.nbytes for t in all_t.values())

    by_dtype: dict[str, dict] = {}
    by_comp: dict[str, dict] = {}
    by_layer: dict[str, dict] = {}
    for t in all_t.values():
        d = by_dtype.setdefault(t.dtype, {"tensors": 0, "params": 0, "bytes": 0, "percent": 0.0})
        d["tensors"] += 1
        d["params"] += t.numel
        d["bytes"] += t.nbytes
        comp = classify(t.name)
        c = by_comp.setdefault(comp, {"tensors": 0, "params": 0, "bytes": 0, "dtypes": {}, "sizes": []})
        c["tensors"] += 1
        c["params"] += t.numel
        c["bytes"] += t.nbytes
        c["dtypes"][t.dtype] = c["dtypes"].get(t.dtype, 0) + t.numel
        c["sizes"].append(t.nbytes)
        layer = layer_of(t.name)
        key = f"layer {layer}" if layer is not None else "non-layer"
        lay = by_layer.setdefault(key, {"layer": layer, "tensors": 0, "params": 0, "bytes": 0, "dtypes": {}})
        lay["tensors"] += 1
        lay["params"] += t.numel
        lay["bytes"] += t.nbytes
        lay["dtypes"][t.dtype] = lay["dtypes"].get(t.dtype, 0) + t.numel
    for d in by_dtype.values():
        d["percent"] = round(100.0 * d["params"] / total_params, 6) if total_params else 0.0
    pairs, warnings = pair_scales(all_t)

    def dorder(k):
        return DTYPE_ORDER.index(k) if k in DTYPE_ORDER else len(DTYPE_ORDER)

    comp_out = {}
    for k in sorted(by_comp, key=COMPONENTS.index):
        c = by_comp[k]
        sizes = c.pop("sizes")
        comp_out[k] = {"params": c["params"], "bytes": c["bytes"], "dtypes": sorted(c["dtypes"], key=dorder),
                       "dtype_params": dict(c["dtypes"]), "tensors": c["tensors"], "mean_tensor_bytes": sum(sizes) // len(sizes)}
    layers = sorted(by_layer.values(), key=lambda v: (v["layer"] is None, v["layer"] or 0))
    return {
        "files": len(ck.headers),
        "tensors": len(all_t),
        "total_params": total_params,
        "total_bytes": total_bytes,
        "by_dtype": {k: by_dtype[k] for k in sorted(by_dtype, key=dorder)},
        "by_component": comp_out,
        "block_scales": pairs,
        "by_layer": [{"layer": v["layer"], "tensors": v["tensors"], "params": v["params"], "bytes": v["bytes"],
                      "dtypes": {k: v["dtypes"][k] for k in sorted(v["dtypes"], key=dorder)}} for v in layers],
        "warnings": warnings,
        "path": str(ck.index.path if ck.index else (ck.headers[0].path if len(ck.headers) == 1 else ck.root)),
    }


def public_json(report: dict) -> dict:
    """The documented JSON object (issue schema plus ``by_layer`` and ``warnings``)."""
    comp = {k: {"params": v["params"], "bytes": v["bytes"], "dtypes": v["dtypes"]}
            for k, v in report["by_component"].items()}
    return {"files": report["files"], "tensors": report["tensors"], "total_params": report["total_params"],
            "total_bytes": report["total_bytes"], "by_dtype": report["by_dtype"], "by_component": comp,
            "block_scales": report["block_scales"], "by_layer": report["by_layer"], "warnings": report["warnings"]}


def _count(n: int) -> str:
    for div, suf in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suf}"
    return str(n)


def _pct(p: float) -> str:
    return f"{p:.2f}%" if p >= 0.01 or p == 0 else f"{p:.3g}%"


def render(report: dict, by: str = "dtype") -> str:
    """Note-style text: precision distribution, then the breakdown chosen by ``by``."""
    lines = [f"{report['path']}: {report['files']} file(s), {report['tensors']:,} tensors, "
             f"{report['total_params']:,} params, {human_bytes(report['total_bytes'])}", ""]
    lines.append(f"Precision Distribution ({_count(report['total_params'])} params)")
    for dt, d in report["by_dtype"].items():
        comps = [COMPONENT_LABELS[k] for k, c in report["by_component"].items() if dt in c["dtypes"]]
        lines.append(f"- {dt}: {_count(d['params'])} params ({_pct(d['percent'])}), "
                     f"{human_bytes(d['bytes'])} - {', '.join(comps)}")
    lines.append("")
    if by == "dtype":
        rows = [[dt, d["tensors"], f"{d['params']:,}", _pct(d["percent"]), human_bytes(d["bytes"])]
                for dt, d in report["by_dtype"].items()]
        lines.append(table(rows, ["dtype", "tensors", "params", "percent", "bytes"], "lrrrr"))
    elif by == "component":
        tot = report["total_params"] or 1
        rows = [[COMPONENT_LABELS[k], "/".join(c["dtypes"]), c["tensors"], f"{c['params']:,}",
                 _pct(100.0 * c["params"] / tot), human_bytes(c["bytes"]), human_bytes(c["mean_tensor_bytes"])]
                for k, c in report["by_component"].items()]
        lines.append("Component breakdown")
        lines.append(table(rows, ["component", "precision", "tensors", "params", "percent", "size", "size each"],
                           "llrrrrr"))
    elif by == "layer":
        rows = []
        for v in report["by_layer"]:
            mix = ", ".join(f"{k} {_pct(100.0 * n / v['params'])}" if v["params"] else k
                            for k, n in v["dtypes"].items())
            rows.append([v["layer"] if v["layer"] is not None else "-", v["tensors"], f"{v['params']:,}",
                         human_bytes(v["bytes"]), mix])
        lines.append("Layer-by-layer breakdown")
        lines.append(table(rows, ["layer", "tensors", "params", "bytes", "dtype mix (params)"], "rrrrl"))
    else:
        raise ValueError(by)
    if report["block_scales"]:
        blocks: dict[tuple, int] = {}
        for p in report["block_scales"]:
            blocks[tuple(p["block"])] = blocks.get(tuple(p["block"]), 0) + 1
        desc = ", ".join(f"{n} x {b[0]}x{b[1]}" for b, n in sorted(blocks.items(), key=lambda kv: -kv[1]))
        lines += ["", f"Block scales: {len(report['block_scales'])} weight/scale pairs ({desc})"]
        ex = report["block_scales"][0]
        lines.append(f"  e.g. {safe_name(ex['scale'])} pairs with {safe_name(ex['weight'])}, block {ex['block'][0]}x{ex['block'][1]}")
    for w in report["warnings"][:20]:
        lines.append(f"warning: {w}")
    if len(report["warnings"]) > 20:
        lines.append(f"warning: ... and {len(report['warnings']) - 20} more")
    return "\n".join(lines)


def plot(report: dict, out: str | Path, overwrite: bool = True) -> None:
    """Draw params by dtype and by component (stacked by dtype) to a PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from ..errors import YxanulError
        raise YxanulError("--plot needs matplotlib (pip install 'yxanul[plot]')", key="--plot") from None
    from ..io import atomic_path

    dts = list(report["by_dtype"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    vals = [report["by_dtype"][d]["params"] for d in dts]
    a1.bar(dts, vals, color=[f"C{i}" for i in range(len(dts))])
    for i, d in enumerate(dts):
        a1.text(i, vals[i], _pct(report["by_dtype"][d]["percent"]), ha="center", va="bottom", fontsize=8)
    a1.set_ylabel("parameters")
    a1.set_title("Parameters by dtype")
    comps = list(report["by_component"])
    labels = [COMPONENT_LABELS[c] for c in comps]
    left = [0] * len(comps)
    for i, d in enumerate(dts):
        w = [report["by_component"][c].get("dtype_params", {}).get(d, 0) for c in comps]
        a2.barh(labels, w, left=left, color=f"C{i}", label=d)
        left = [x + y for x, y in zip(left, w)]
    a2.set_xlabel("parameters")
    a2.set_title("Parameters by component")
    a2.legend(fontsize=8)
    fig.suptitle(f"{Path(report['path']).name}: {_count(report['total_params'])} params")
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


HEAD_MODULE = "lm_head"  # the output head's module name in Hugging Face Llama checkpoints


def modules_to_not_convert(kept_weights, quantized_weights) -> list[str]:
    """``quantization_config.modules_to_not_convert`` for an FP8 block checkpoint: every linear left unquantized.

    ``kept_weights``: names of the 2-D ``*.weight`` tensors written in their original dtype;
    ``quantized_weights``: names of those written as FP8. Module names are the checkpoint's own (``lm_head``,
    ``model.layers.0.mlp.down_proj``), which transformers (prefix, regex or suffix match) and vLLM (prefix match)
    compare against their module names. Embedding lookup tables are left out (no loader turns them into FP8
    linears); an embedding projection is a linear and is listed. The output head is always listed unless its own
    weight was quantized: a tied head has no weight in the checkpoint, so a loader that converted it would find
    nothing to load.
    """
    out = set()
    for name in kept_weights:
        mod = name[: -len(".weight")] if name.endswith(".weight") else name
        if classify(name) == "embeddings" and "proj" not in mod.rsplit(".", 1)[-1]:
            continue
        out.add(mod)
    if not any(classify(n) == "lm_head" for n in quantized_weights):
        out.add(HEAD_MODULE)
    return sorted(out)
