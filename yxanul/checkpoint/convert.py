"""BF16/FP32 <-> FP8 block-quantized checkpoints in the HF FineGrainedFP8 / vLLM / DeepSeek-V3 layout.

Quantized layout: each selected weight ``<name>`` is stored as ``F8_E4M3`` (or ``F8_E5M2``) with the same shape,
plus ``<name>_scale_inv`` (F32, ``[ceil(out / b), ceil(in / b)]``) so that ``w ~= q.float() * scale_inv`` per
``b x b`` block. ``config.json`` (when present) gets a ``quantization_config`` with ``quant_method: fp8``.

Both directions stream: the output header is planned from the input headers alone (shapes and dtypes are known
before any data is read), written first, then each tensor is read, converted and appended in row slabs one
block high, so peak memory is bounded by a slab, not by the tensor. Before anything is written, the planned
output size is checked against the free disk space and a slab's working memory against the available memory.
Everything is written into a temporary folder renamed onto OUT only on success; OUT may not be, contain or lie
inside the input, and ``--overwrite`` replaces only an empty folder or an earlier output of the same command.
"""
from __future__ import annotations

import fnmatch
import json
import math
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import NonFiniteError, YxanulError, first_line
from ..io import atomic_dir, atomic_write_json, check_disk, check_memory
from .analyze import classify, infer_block
from .analyze import modules_to_not_convert as unquantized_linear_modules
from .safetensors_header import DTYPE_BITS, INDEX_NAME, Checkpoint, TensorInfo, open_checkpoint, safe_name

def _yerr(msg: str, source=None, key=None) -> YxanulError:
    """A one-line error: names from checkpoint headers may hold control characters."""
    return YxanulError(safe_name(msg, 1000), source=None if source is None else safe_name(source, 1000),
                       key=None if key is None else safe_name(key))


_FLOAT_IN = {"BF16", "F16", "F32", "F64"}
_FP8 = {"F8_E4M3", "F8_E5M2"}
_SCALE_DTYPES = {"F32", "BF16", "F16", "F8_E8M0"}
_COPY_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".md", ".py")   # tokenizer, generation config...
_COPY_MAX_BYTES = 256 * 1024 * 1024
# the largest --block (DeepSeek uses 128): a padded 4096 x 4096 FP32 tile is 64 MiB
MAX_BLOCK = 4096
_COPY_CHUNK = 16 * 1024 * 1024


# ---------------------------------------------------------------------------------------------------------------
# planning: the output layout, decided from headers only
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Out:
    name: str
    dtype: str
    shape: tuple[int, ...]
    op: str                 # "copy" | "quant" | "scale" | "dequant"
    src: TensorInfo         # the tensor it comes from (for "scale": the weight)
    src_file: str
    scale: TensorInfo | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BITS[self.dtype] // 8


def _check_block(block) -> None:
    """``--block``: an integer in [1, MAX_BLOCK]."""
    if not isinstance(block, int) or isinstance(block, bool) or not 0 < block <= MAX_BLOCK:
        raise _yerr(f"block size must be an integer in [1, {MAX_BLOCK}], got {block!r}", key="--block")


def _header_bytes(outs: list[_Out], metadata: dict[str, str]) -> tuple[bytes, list[_Out]]:
    """Order tensors like safetensors does (wider dtypes first, then name) so every tensor stays aligned."""
    outs = sorted(outs, key=lambda o: (-DTYPE_BITS[o.dtype], o.name))
    hdr: dict = {"__metadata__": metadata} if metadata else {}
    pos = 0
    for o in outs:
        hdr[o.name] = {"dtype": o.dtype, "shape": list(o.shape), "data_offsets": [pos, pos + o.nbytes]}
        pos += o.nbytes
    raw = json.dumps(hdr, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-len(raw)) % 8)
    return raw, outs


def _write_shard(path: Path, outs: list[_Out], metadata: dict[str, str], produce) -> int:
    """Write one safetensors file; ``produce(out, fh)`` writes exactly ``out.nbytes`` bytes for each tensor."""
    raw, outs = _header_bytes(outs, metadata)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for o in outs:
            start = fh.tell()
            produce(o, fh)
            if fh.tell() - start != o.nbytes:  # pragma: no cover - internal invariant
                raise RuntimeError(f"{o.name}: wrote {fh.tell() - start} bytes, planned {o.nbytes}")
    return 8 + len(raw) + sum(o.nbytes for o in outs)


def _copy_raw(src_file: str, t: TensorInfo, data_start: int, fh) -> None:
    with open(src_file, "rb") as f:
        f.seek(data_start + t.offsets[0])
        left = t.nbytes
        while left:
            chunk = f.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise _yerr("file shrank while reading tensor data", source=src_file, key=safe_name(t.name))
            fh.write(chunk)
            left -= len(chunk)


def _tensor_bytes(t, fh) -> None:
    import torch
    fh.write(t.contiguous().view(torch.uint8).reshape(-1).numpy().data)


_SLAB_BYTES_PER_ELEMENT = 24   # source + float32 copy + scaled copy + FP8 result + dequantized check, rounded up


def _slabs(rows: int, height: int):
    """(first, last) row ranges of `height` rows covering `rows`."""
    for r0 in range(0, rows, height):
        yield r0, min(rows, r0 + height)


def _check_resources(dst, outs_by_shard: dict, slab_elements: int) -> None:
    """Refuse up front when the output cannot fit on disk or one slab cannot fit in memory."""
    need = sum(o.nbytes for outs in outs_by_shard.values() for o in outs)
    check_disk(dst, need, what="the output")
    check_memory(slab_elements * _SLAB_BYTES_PER_ELEMENT, what="one row slab")


def _module_of(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


# ---------------------------------------------------------------------------------------------------------------
# which weights are FP8: the precision policy applied to checkpoint names
# ---------------------------------------------------------------------------------------------------------------
class _Leaf:
    """A parameter-owning stand-in module, enough for :meth:`Policy.resolve` (name, type, param count)."""

    def __init__(self, numel: int, linear: bool):
        self._numel = numel
        if linear:
            self.in_features = 0

    def parameters(self, recurse: bool = False):
        yield _Count(self._numel)


class _Count:
    def __init__(self, n: int):
        self._n = n

    def numel(self) -> int:
        return self._n


class RMSNorm(_Leaf):
    """Stand-in for a norm module (the policy keys RMSNorm by type name)."""


class _Names:
    """A module tree rebuilt from checkpoint tensor names (``a.b.weight`` -> module ``a.b``)."""

    def __init__(self, tensors: list[TensorInfo]):
        import torch.nn as nn

        self._mods: dict[str, object] = {}
        for t in tensors:
            if not t.name.endswith(".weight"):
                continue
            mod, comp = _module_of(t.name), classify(t.name)
            if comp == "embeddings" and len(t.shape) == 2:
                self._mods[mod] = nn.Embedding(t.shape[0], t.shape[1], device="meta")
            elif comp == "norms" or len(t.shape) == 1:
                self._mods[mod] = RMSNorm(t.numel, linear=False)
            else:
                self._mods[mod] = _Leaf(t.numel, linear=len(t.shape) == 2)

    def named_modules(self):
        return iter(self._mods.items())


def weight_precisions(tensors: list[TensorInfo], policy) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Tensor name -> (precision, rule) for every ``*.weight`` tensor, plus policy warnings.

    The policy's own rules decide (component keys, explicit glob lists, ``use_fp8``). Names the policy does not
    know as attention/FFN (DeepSeek MLA ``q_a_proj``/``kv_b_proj``..., other projection names) but that
    :func:`classify` recognises as attention / MLP / experts follow ``attention_compute`` / ``ffn_compute`` unless
    an explicit pattern decided.
    """
    names = _Names(tensors)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mods = policy.resolve(names, strict=False)
    warns = [str(w.message) for w in caught]
    default = policy.dtype_of("default_dtype")
    fallback = default if not default.startswith("fp8") else "bf16"
    out: dict[str, tuple[str, str]] = {}
    for m in mods:
        prec, rule = m.precision, m.rule
        if m.component == "other" and m.rule == "precision_strategy.default_dtype":
            comp = classify(m.name + ".weight")
            key = {"attention": "attention_compute", "mlp": "ffn_compute", "moe_experts": "ffn_compute",
                   "shared_experts": "ffn_compute", "lm_head": "output_head", "embeddings": "embeddings",
                   "norms": "layer_norms"}.get(comp)
            if key:
                prec, rule = policy.dtype_of(key), f"precision_strategy.{key} (name {comp})"
                if prec.startswith("fp8") and not policy.strategy.use_fp8:
                    prec, rule = fallback, "use_fp8: false"
        out[m.name + ".weight"] = (prec, rule)
    return out, warns


# ---------------------------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------------------------
def _read_config(ck: Checkpoint) -> tuple[dict | None, Path | None]:
    p = ck.root / "config.json"
    if not p.is_file():
        return None, None
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _yerr("is not valid JSON", source=str(p)) from None
    if not isinstance(cfg, dict):
        raise _yerr("must be a JSON object", source=str(p))
    return cfg, p


def _copy_side_files(ck: Checkpoint, tmp: Path) -> list[str]:
    """Copy the small side files of a folder checkpoint (tokenizer, generation config, README, custom code)."""
    if ck.index is None and len(ck.headers) == 1 and not Path(ck.headers[0].path).name == "model.safetensors":
        return []
    copied = []
    for f in sorted(ck.root.iterdir()):
        if not f.is_file() or f.name in ("config.json", INDEX_NAME) or f.name.startswith(".") \
                or not f.name.endswith(_COPY_SUFFIXES) or f.stat().st_size > _COPY_MAX_BYTES:
            continue
        shutil.copy2(f, tmp / f.name)
        copied.append(f.name)
    return copied


def _write_index(tmp: Path, ck: Checkpoint, shards: dict[str, list[_Out]], total: int, extra: dict) -> None:
    if ck.index is None and len(shards) == 1:
        return
    meta = dict(ck.index.metadata) if ck.index else {}
    meta["total_size"] = total
    meta.update(extra)
    wm = {o.name: fname for fname, outs in shards.items() for o in outs}
    atomic_write_json(tmp / INDEX_NAME, {"metadata": meta, "weight_map": dict(sorted(wm.items()))})


def _errstats(x, y) -> tuple[float, float]:
    """(sum x^2, sum (x-y)^2) in float64."""
    x64 = x.double()
    return float(x64.square().sum()), float((x64 - y.double()).square().sum())


def _rel_sqnr(sig: float, err: float) -> tuple[float, float | None]:
    rel = math.sqrt(err / sig) if sig > 0 else (0.0 if err == 0 else float("inf"))
    sqnr = 10.0 * math.log10(sig / err) if err > 0 and sig > 0 else None
    return rel, sqnr


def _torch_dtype(st: str):
    import torch
    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
            "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}[st]


def _get(handles: dict, path: str, name: str, rows: tuple[int, int] | None = None):
    """Tensor `name` of file `path` (only rows ``[r0, r1)`` when `rows` is given)."""
    from safetensors import safe_open

    h = handles.get(path)
    if h is None:
        try:
            h = handles[path] = safe_open(path, framework="pt", device="cpu")
        except Exception as e:  # noqa: BLE001 - the library's own error types vary by version
            raise _yerr(f"cannot open ({first_line(e)})",
                        source=path) from None
    try:
        return h.get_tensor(name) if rows is None else h.get_slice(name)[rows[0]:rows[1]]
    except Exception as e:  # noqa: BLE001
        raise _yerr(f"cannot read tensor ({first_line(e)})",
                    source=path, key=safe_name(name)) from None


# ---------------------------------------------------------------------------------------------------------------
# quantize
# ---------------------------------------------------------------------------------------------------------------
def quantize_checkpoint(src, dst, block: int = 128, fmt: str = "e4m3", pow2_scales: bool = False, skip=(),
                        policy=None, overwrite: bool = False) -> dict:
    """Quantize the policy's FP8 linear weights of a safetensors checkpoint into ``b x b`` FP8 blocks.

    ``src``: a ``.safetensors`` file, a folder (with or without ``model.safetensors.index.json``) or an index.
    ``dst``: the output folder. ``skip``: fnmatch globs of tensor or module names kept as they are.
    ``policy``: a :class:`yxanul.precision.Policy`, a policy YAML path, or None (the shipped default policy).
    Returns the report: per-tensor rows and totals.
    """
    import torch

    from ..fp8.formats import get_format
    from ..fp8.quant import compute_scale_inv, dequantize, quantize, scale_shape, tile_amax
    from ..precision import Policy, load_policy

    _check_block(block)
    f8 = get_format(fmt)
    skip = tuple(skip or ())
    pol = policy if isinstance(policy, Policy) else load_policy(policy)
    ck = open_checkpoint(src)
    inputs = _inputs_of(src, ck)
    all_t = [t for _, t in ck.tensors()]
    for t in all_t:
        if t.dtype in _FP8 or t.name.endswith("_scale_inv"):
            raise _yerr(f"already holds FP8 weights or block scales ({t.name}, {t.dtype}); "
                        f"dequantize it first", source=str(src))
    precisions, warns = weight_precisions(all_t, pol)
    cfg, cfg_path = _read_config(ck)

    shards: dict[str, list[_Out]] = {}
    rows: list[dict] = []
    not_converted: list[str] = []
    tile = (block, block)
    for h in ck.headers:
        fname = Path(h.path).name
        outs = shards.setdefault(fname, [])
        for t in h.tensors.values():
            prec, rule = precisions.get(t.name, (None, "not a weight"))
            reason = None
            if not t.name.endswith(".weight"):
                reason = "not a weight"
            elif len(t.shape) != 2:
                reason = f"{len(t.shape)}-D"
            elif t.dtype not in _FLOAT_IN:
                reason = f"dtype {t.dtype}"
            elif any(fnmatch.fnmatchcase(t.name, g) or fnmatch.fnmatchcase(_module_of(t.name), g) for g in skip):
                reason = "--skip"
            elif prec is None or not prec.startswith("fp8"):
                reason = f"policy: {prec} ({rule})"
            elif t.numel == 0:
                reason = "empty"
            if reason is not None:
                outs.append(_Out(t.name, t.dtype, t.shape, "copy", t, h.path))
                if t.name.endswith(".weight") and len(t.shape) == 2:
                    not_converted.append(t.name)
                rows.append({"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "out_dtype": t.dtype,
                             "action": "kept", "reason": reason, "bytes_before": t.nbytes, "bytes_after": t.nbytes})
                continue
            sname = t.name + "_scale_inv"
            if any(sname in hh.tensors for hh in ck.headers):
                raise _yerr(f"tensor {sname} already exists", source=h.path, key=safe_name(sname))
            outs.append(_Out(t.name, f8.safetensors, t.shape, "quant", t, h.path))
            outs.append(_Out(sname, "F32", scale_shape(t.shape, tile), "scale", t, h.path))
            rows.append({"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "out_dtype": f8.safetensors,
                         "action": "fp8", "reason": rule, "bytes_before": t.nbytes,
                         "bytes_after": outs[-2].nbytes + outs[-1].nbytes, "scale_shape": list(outs[-1].shape)})
    row_of = {r["name"]: r for r in rows}
    partial = [r for r in rows if r["action"] == "fp8" and (r["shape"][0] % block or r["shape"][1] % block)]
    if partial:
        ex = partial[0]
        warns.append(f"{len(partial)} quantized weight(s) have a dim not divisible by {block} (e.g. "
                     f"{safe_name(ex['name'])} {ex['shape']}): their partial edge blocks load in DeepSeek/vLLM-style "
                     f"block kernels, but transformers' CPU dequantize path rejects them or infers a wrong block")

    qcfg = {"quant_method": "fp8", "fmt": f8.name, "activation_scheme": "dynamic",
            "weight_block_size": [block, block], "modules_to_not_convert": unquantized_linear_modules(
                not_converted, [r["name"] for r in rows if r["action"] == "fp8"])}
    if pow2_scales:
        qcfg["scale_fmt"] = "ue8m0"

    handles: dict = {}
    tot = {"sig": 0.0, "err": 0.0}
    data_starts = {h.path: h.data_start for h in ck.headers}
    _check_resources(dst, shards, max((block * o.shape[1] for outs in shards.values() for o in outs
                                       if o.op == "quant"), default=0))

    def produce(o: _Out, fh):
        if o.op == "copy":
            _copy_raw(o.src_file, o.src, data_starts[o.src_file], fh)
            return
        # scales are laid out before the 1-byte weights (alignment), so each is recomputed from the source
        # when written; both passes read one slab of `block` rows at a time
        key = o.src.name
        sig = err = 0.0
        for rows in _slabs(o.src.shape[0], block):
            x = _get(handles, o.src_file, key, rows)
            if o.op == "scale":   # the same scale quantize() computes, without building q
                amax = tile_amax(x, block, block)
                if not bool(torch.isfinite(amax).all()):
                    raise NonFiniteError("NaN or Inf in the input; refusing to quantize", source=o.src_file,
                                         key=safe_name(key))
                _tensor_bytes(compute_scale_inv(amax, f8, pow2_scales), fh)
                continue
            q, s = quantize(x, tile, f8, pow2_scales=pow2_scales, nonfinite="raise", name=safe_name(key))
            ds, de = _errstats(x.float(), dequantize(q, s, tile))
            sig, err = sig + ds, err + de
            _tensor_bytes(q, fh)
        if o.op == "quant":
            rel, sqnr = _rel_sqnr(sig, err)
            row_of[key].update(rel_l2=rel, sqnr_db=sqnr)
            tot["sig"] += sig
            tot["err"] += err

    with torch.no_grad(), atomic_dir(dst, overwrite, command="quantize", inputs=inputs) as tmp:
        _write_shards(tmp, ck, shards, produce)
        if cfg is not None:
            atomic_write_json(tmp / "config.json", {**cfg, "quantization_config": qcfg})
        copied = _copy_side_files(ck, tmp)
    return _report(rows, tot, ck, dst, qcfg, warns, copied, cfg is not None, "quantize")


def _report(rows, tot, ck, dst, qcfg, warns, copied, had_config, what, measured=None) -> dict:
    before = sum(r["bytes_before"] for r in rows)
    after = sum(r["bytes_after"] for r in rows)
    conv = [r for r in rows if r["action"] != "kept"]
    rel, sqnr = _rel_sqnr(tot["sig"], tot["err"])
    if not had_config:
        warns = warns + ["no config.json next to the input; none written"]
    return {
        "command": what,
        "input": str(ck.index.path if ck.index else (ck.headers[0].path if len(ck.headers) == 1 else ck.root)),
        "output": str(dst),
        "files": len(ck.headers),
        "tensors": rows,
        "totals": {"tensors": len(rows), "converted": len(conv), "kept": len(rows) - len(conv),
                   "converted_params": sum(math.prod(r["shape"]) for r in conv),
                   "bytes_before": before, "bytes_after": after,
                   "ratio": (after / before) if before else 1.0,
                   "rel_l2": rel, "sqnr_db": sqnr},
        "error_measured": measured or "round trip: original weights vs their FP8 dequantization",
        "quantization_config": qcfg,
        "copied_files": copied,
        "warnings": warns,
    }


# ---------------------------------------------------------------------------------------------------------------
# dequantize
# ---------------------------------------------------------------------------------------------------------------
def _write_shards(tmp: Path, ck, shards: dict, produce) -> int:
    """Write every output shard (keeping each input shard's metadata) and the index; returns the bytes written."""
    total_after = 0
    for fname, outs in shards.items():
        meta = dict(next(h for h in ck.headers if Path(h.path).name == fname).metadata)
        meta.setdefault("format", "pt")
        _write_shard(tmp / fname, outs, meta, produce)
        total_after += sum(o.nbytes for o in outs)
    _write_index(tmp, ck, shards, total_after, {})
    return total_after


def _inputs_of(src, ck) -> list:
    """Everything a conversion reads: the given path, its shards, index and config (a folder is one input)."""
    inputs = [src] + [h.path for h in ck.headers] + [ck.root / "config.json"]
    if ck.index is not None:
        inputs += [ck.index.path, ck.root]
    return inputs


def _declared_block(t: TensorInfo, st: TensorInfo, cfg_block, flag_block):
    """The block of an FP8 weight: declared (config or --block), else inferred only when unambiguous."""
    if cfg_block or flag_block:
        return tuple(cfg_block or flag_block), None
    blk = infer_block(t.shape, st.shape)
    if blk is None:
        return None, None
    # a block inferred from shapes alone is trusted only if it is a power of two (128x128, per-row, ...)
    # or spans the whole dim; anything else (a [3, 3] scale on [256, 256] -> 96) is a mismatch
    odd = [b for b, n, s in zip(blk, t.shape, st.shape) if s != 1 and b & (b - 1)]
    return tuple(blk), (f"block {blk[0]}x{blk[1]} inferred from the shapes is not a power of two" if odd else None)


def dequantize_checkpoint(src, dst, dtype: str = "bf16", overwrite: bool = False, block: int | None = None) -> dict:
    """Turn every FP8 weight with a ``<name>_scale_inv`` back into ``dtype`` (bf16 or fp32); drop the scales.

    The block comes from ``config.json``'s ``quantization_config.weight_block_size``, else from ``block``,
    else it is inferred from each weight/scale shape pair (a power of two, or a whole dim). Every scale must be
    finite and positive and every dequantized value finite (FP8 NaN bytes are refused). The original weights
    are not available here, so the report's error is the rounding the output dtype adds to the FP8 values.
    Returns the report (per-tensor rows and totals).
    """
    import torch

    from ..fp8.quant import dequantize, scale_shape

    dt = {"bf16": "BF16", "bfloat16": "BF16", "fp32": "F32", "float32": "F32"}.get(str(dtype).lower())
    if dt is None:
        raise _yerr(f"unknown dtype {dtype!r} (expected bf16 or fp32)", key="--dtype")
    if block is not None:
        _check_block(block)
    ck = open_checkpoint(src)
    inputs = _inputs_of(src, ck)
    cfg, cfg_path = _read_config(ck)
    qcfg = (cfg or {}).get("quantization_config")
    cfg_block = None
    if isinstance(qcfg, dict) and qcfg.get("weight_block_size") is not None:
        wbs = qcfg["weight_block_size"]
        if not (isinstance(wbs, list) and len(wbs) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                 and v > 0 for v in wbs)):
            raise _yerr(f"must be two positive integers, got {wbs!r}", source=str(cfg_path),
                        key="quantization_config.weight_block_size")
        cfg_block = (wbs[0], wbs[1])
        if block is not None and cfg_block != (block, block):
            raise _yerr(f"--block {block} disagrees with the folder's declared block size {list(cfg_block)}; drop "
                        "--block (the declared size is used)", source=str(cfg_path),
                        key="quantization_config.weight_block_size")

    where: dict[str, tuple] = {}
    for h, t in ck.tensors():
        where[t.name] = (h, t)
    scales_used: set[str] = set()
    shards: dict[str, list[_Out]] = {}
    rows: list[dict] = []
    blocks: dict[str, tuple[int, int]] = {}
    for h in ck.headers:
        fname = Path(h.path).name
        outs = shards.setdefault(fname, [])
        for t in h.tensors.values():
            if t.name.endswith("_scale_inv"):
                base = t.name[: -len("_scale_inv")]
                if base not in where:
                    raise _yerr(f"scale tensor has no weight {base!r}", source=h.path, key=safe_name(t.name))
                if where[base][1].dtype not in _FP8:
                    raise _yerr(f"scale of a {where[base][1].dtype} weight: only FP8 block weights can be "
                                f"dequantized (dropping the scale would corrupt it)", source=h.path,
                                key=safe_name(t.name))
                continue
            if t.dtype not in _FP8:
                outs.append(_Out(t.name, t.dtype, t.shape, "copy", t, h.path))
                rows.append({"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "out_dtype": t.dtype,
                             "action": "kept", "reason": f"dtype {t.dtype}", "bytes_before": t.nbytes,
                             "bytes_after": t.nbytes})
                continue
            sname = t.name + "_scale_inv"
            if sname not in where:
                raise _yerr(f"FP8 tensor has no {sname}", source=h.path, key=safe_name(t.name))
            sh, st = where[sname]
            if st.dtype not in _SCALE_DTYPES:
                raise _yerr(f"scale dtype {st.dtype} is not a float scale", source=sh.path, key=safe_name(sname))
            if len(t.shape) != 2:
                raise _yerr(f"FP8 block weight must be 2-D, got shape {list(t.shape)}", source=h.path,
                            key=safe_name(t.name))
            blk, doubt = _declared_block(t, st, cfg_block, (block, block) if block else None)
            if blk is None or doubt or tuple(st.shape) != tuple(scale_shape(t.shape, blk)):
                exp = doubt or (f"expected {list(scale_shape(t.shape, blk))} for block {list(blk)}" if blk else
                                "no block size fits")
                raise _yerr(f"scale shape {list(st.shape)} inconsistent with weight {list(t.shape)} ({exp}; "
                            f"declare the block with --block or quantization_config.weight_block_size)",
                            source=sh.path, key=safe_name(sname))
            blocks[t.name] = tuple(blk)
            scales_used.add(sname)
            o = _Out(t.name, dt, t.shape, "dequant", t, h.path, scale=st)
            outs.append(o)
            rows.append({"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "out_dtype": dt,
                         "action": "dequantized", "reason": f"block {blk[0]}x{blk[1]}",
                         "bytes_before": t.nbytes + st.nbytes, "bytes_after": o.nbytes})
    row_of = {r["name"]: r for r in rows}
    data_starts = {h.path: h.data_start for h in ck.headers}
    handles: dict = {}
    tot = {"sig": 0.0, "err": 0.0}
    target = _torch_dtype(dt)
    _check_resources(dst, shards, max((blocks[o.name][0] * o.shape[1] for outs in shards.values() for o in outs
                                       if o.op == "dequant"), default=0))

    def produce(o: _Out, fh):
        if o.op == "copy":
            _copy_raw(o.src_file, o.src, data_starts[o.src_file], fh)
            return
        br, bc = blocks[o.name]
        sname = o.name + "_scale_inv"
        spath = where[sname][0].path
        sig = err = 0.0
        for r0, r1 in _slabs(o.shape[0], br):
            q = _get(handles, o.src_file, o.name, (r0, r1))
            s = _get(handles, spath, sname, (r0 // br, r0 // br + 1)).float()
            if not bool((torch.isfinite(s) & (s > 0)).all()):
                raise _yerr("block scales must be finite and positive", source=spath, key=safe_name(sname))
            x = dequantize(q, s, (br, bc), dtype=torch.float32)
            bad = (~torch.isfinite(x)).nonzero()
            if bad.numel():
                r, c = int(bad[0, 0]) + r0, int(bad[0, 1])
                raise NonFiniteError(f"NaN or Inf in the FP8 data (first at row {r}, column {c}); refusing to "
                                     f"dequantize", source=o.src_file, key=safe_name(o.name))
            y = x.to(target)
            ds, de = _errstats(x, y.float())
            sig, err = sig + ds, err + de
            _tensor_bytes(y, fh)
        rel, sqnr = _rel_sqnr(sig, err)
        row_of[o.name].update(rel_l2=rel, sqnr_db=sqnr)
        tot["sig"] += sig
        tot["err"] += err

    with torch.no_grad(), atomic_dir(dst, overwrite, command="dequantize", inputs=inputs) as tmp:
        _write_shards(tmp, ck, shards, produce)
        if cfg is not None:
            out_cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
            if dt == "BF16" and "torch_dtype" in out_cfg:
                out_cfg["torch_dtype"] = "bfloat16"
            atomic_write_json(tmp / "config.json", out_cfg)
        copied = _copy_side_files(ck, tmp)
    measured = (f"{dt} rounding of the dequantized FP8 values (the original weights are not available)"
                if dt != "F32" else "none: FP32 holds the dequantized FP8 values exactly "
                                    "(the original weights are not available)")
    return _report(rows, tot, ck, dst, None, [], copied, cfg is not None, "dequantize", measured)
