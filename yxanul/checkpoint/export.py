"""Export a Yxanul checkpoint as a Hugging Face ``LlamaForCausalLM`` folder (BF16/FP32, or FP8 blocks).

Yxanul is architecturally a Llama: pre-norm RMSNorm blocks, GQA attention with RoPE in the rotate-half
layout (so q/k weights need no permutation), SwiGLU MLP, no biases. Names map one to one::

    embeddings.tok.weight            -> model.embed_tokens.weight   (factorized: tok @ proj.T, exact)
    layers.N.attn.{q,k,v,o}_proj     -> model.layers.N.self_attn.{q,k,v,o}_proj
    layers.N.mlp.{gate,up,down}_proj -> model.layers.N.mlp.{gate,up,down}_proj
    layers.N.attn_norm / mlp_norm    -> model.layers.N.input_layernorm / post_attention_layernorm
    norm                             -> model.norm
    lm_head                          -> lm_head                     (untied models only)

A factorized tied embedding (``E`` V x r, ``P`` d x r) is multiplied out: the full embedding ``E @ P.T`` serves
both the lookup (``E[i] @ P.T``) and the tied head (``h @ (E @ P.T).T = (h @ P) @ E.T``), so
``tie_word_embeddings`` stays true.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..config import ModelConfig, dataclass_from_dict, load_model_config, model_differences
from .analyze import HEAD_MODULE, classify, modules_to_not_convert  # noqa: F401 (re-exported)
from ..errors import YxanulError, brief, first_line
from ..io import MARKER
from .layout import DCP_FOLDER, FP8_STATE_SUFFIXES, check_finite, is_dcp_checkpoint

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32",
          "fp16": "float16", "float16": "float16"}
DEFAULT_SHARD = 5 * 1024**3
_LAYER_MAP = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
              "attn.o_proj": "self_attn.o_proj", "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj",
              "mlp.down_proj": "mlp.down_proj", "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
BYTES_TOKENIZER_NOTE = """# Tokenizer

This model reads raw UTF-8 bytes: token ids 0-255 are the byte values and id {eot} is the end-of-text
token. No tokenizer file is needed:

```python
ids = list("text".encode("utf-8"))
text = bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
```
"""
O200K_TOKENIZER_NOTE = """# Tokenizer

This model uses tiktoken's `o200k_base` encoding; id {eot} is the end-of-text token:

```python
import tiktoken
enc = tiktoken.get_encoding("o200k_base")
ids = enc.encode("text", allowed_special="all")
text = enc.decode(ids)
```
"""


def _check_tokenizer_fits(tok, cfg: ModelConfig, source: str) -> None:
    """The recorded tokenizer's vocabulary and end-of-text id within the model's vocabulary (they become the
    exported config's token ids and generation's stop token)."""
    if not isinstance(tok, dict):
        return
    for key, limit in (("vocab_size", cfg.vocab_size + 1), ("eot_id", cfg.vocab_size)):
        v = tok.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < limit):
            raise YxanulError(f"must be an integer in [0, {limit - 1}] for a model of vocab_size {cfg.vocab_size}, "
                              f"got {brief(v)}", source=source, key=f"tokenizer.{key}")


def load_checkpoint_weights(ckpt: str | Path, model: str | None = None):
    """(ModelConfig, {parameter name: tensor}, meta) of a run folder, a step folder, or a bare ``.safetensors``.

    A bare file needs ``model`` (a preset name or YAML); folders read ``meta.json``. The FP8 layers' scaling
    state is dropped; a missing or misshapen parameter, or a tensor the model does not have (a checkpoint of
    another model), is an error.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..model import Yxanul
    from .sharded import read_dcp_model_state

    p = Path(ckpt)
    sharded = None
    if not p.exists():
        raise YxanulError("checkpoint not found", source=str(p))
    if p.is_file():
        if model is None:
            raise YxanulError("a bare .safetensors file needs --model PRESET (no meta.json to read)", source=str(p))
        cfg = load_model_config(model)
        meta = {"model_config": None, "tokenizer": None}
        weights = p
    else:
        from .training import read_meta, resolve_checkpoint

        folder = resolve_checkpoint(p)
        meta = read_meta(folder, weights_only=True)  # recorded sizes and hashes of what is read verified
        mc = meta.get("model_config")
        src = str(folder / "meta.json")
        if not isinstance(mc, dict):
            raise YxanulError("has no model_config object", source=src, key="model_config")
        cfg = dataclass_from_dict(ModelConfig, mc, src, prefix="model_config.").validate(src)
        _check_tokenizer_fits(meta.get("tokenizer"), cfg, src)
        if model is not None:
            if model_differences(load_model_config(model), cfg):
                raise YxanulError(f"checkpoint's model_config differs from --model {model}", source=src)
        weights = folder / "model.safetensors"
        if not weights.is_file() and is_dcp_checkpoint(folder):   # a sharded run's: its shards read in one process
            sharded = weights = folder / DCP_FOLDER
    try:
        sd = read_dcp_model_state(sharded) if sharded else load_file(str(weights))
    except FileNotFoundError:
        raise YxanulError("missing model.safetensors", source=str(weights)) from None
    except (SafetensorError, OSError, ValueError) as e:
        raise YxanulError(f"unreadable safetensors: {first_line(e)}", source=str(weights)) from None
    with torch.device("meta"):
        ref = Yxanul(cfg)
    known = {n for n, _ in ref.named_parameters()} | {n for n, _ in ref.named_buffers()}
    extra = sorted(k for k in sd if k not in known and not k.endswith(FP8_STATE_SUFFIXES))
    if extra:
        raise YxanulError(f"holds {len(extra)} tensor(s) that model {cfg.name} does not have, e.g. {brief(extra[0])}; "
                          "a checkpoint of another model? (pass the --model it was trained with)", source=str(weights))
    out = {}
    for name, prm in ref.named_parameters():
        t = sd.get(name)
        if t is None:
            raise YxanulError(f"missing parameter {name} for model {cfg.name}", source=str(weights))
        if tuple(t.shape) != tuple(prm.shape):
            raise YxanulError(f"{name} has shape {list(t.shape)}, the model config expects {list(prm.shape)}",
                              source=str(weights))
        if not t.is_floating_point():
            raise YxanulError(f"{name} has dtype {t.dtype}, expected a floating-point tensor", source=str(weights))
        out[name] = t
    check_finite(out, str(weights))
    return cfg, out, meta


def load_model(ckpt: str | Path, model: str | None = None, dtype=None):
    """(Yxanul model in eval mode with the checkpoint's weights, meta)."""

    from ..model import Yxanul

    cfg, sd, meta = load_checkpoint_weights(ckpt, model)
    m = Yxanul(cfg)
    m.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    if dtype is not None:
        m = m.to(dtype)
    return m.eval(), meta


def hf_state_dict(cfg: ModelConfig, sd: dict, dtype: str = "bfloat16") -> dict:
    """Yxanul parameter names -> Llama names, the factorized embedding multiplied out (in FP64), cast to `dtype`."""
    import torch

    td = getattr(torch, DTYPES[dtype])

    def cast(name: str, t):
        """`t` in `td`; finite weights that overflow its range (FP16 past ±65504) are refused, not written as Inf."""
        c = t.to(td).contiguous()
        if c.numel() and not bool(torch.isfinite(c).all()):
            raise YxanulError(f"{name} has values beyond the {DTYPES[dtype]} range (largest magnitude "
                              f"{float(t.float().abs().max()):.6g}, {DTYPES[dtype]} max {torch.finfo(td).max:.6g}); "
                              f"export with --dtype {'bf16 or ' if td == torch.float16 else ''}fp32", source="--dtype")
        return c

    out = {}
    E = sd["embeddings.tok.weight"]
    if cfg.embed_rank:
        P = sd["embeddings.proj.weight"]  # [d, r]
        full = (E.double() @ P.double().T)
    else:
        full = E
    out["model.embed_tokens.weight"] = cast("model.embed_tokens.weight", full)
    for name, t in sd.items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            mod, leaf = rest.rsplit(".", 1)
            hf = f"model.layers.{i}.{_LAYER_MAP[mod]}.{leaf}"
            out[hf] = cast(hf, t)
        elif name == "norm.weight":
            out["model.norm.weight"] = cast("model.norm.weight", t)
        elif name == "lm_head.weight":
            out["lm_head.weight"] = cast("lm_head.weight", t)
    return out


def hf_config(cfg: ModelConfig, dtype: str, tok: dict | None) -> dict:
    eot = (tok or {}).get("eot_id")
    eot = int(eot) if isinstance(eot, int) and not isinstance(eot, bool) else None
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": bool(cfg.tie_embeddings),
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "torch_dtype": DTYPES[dtype],
        "dtype": DTYPES[dtype],
        "yxanul": {"name": cfg.name, "embed_rank": cfg.embed_rank},
    }


def _write_weights(out: Path, state: dict, max_shard_size: int) -> list[str]:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for fname, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(out / fname), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return sorted(split.filename_to_tensors)


def _write_tokenizer(out: Path, tok: dict | None, cfg: ModelConfig) -> list[str]:
    if not isinstance(tok, dict):
        return []
    kind, eot = tok.get("kind"), tok.get("eot_id")
    written = ["yxanul_tokenizer.json"]
    (out / "yxanul_tokenizer.json").write_text(json.dumps(tok, indent=2) + "\n", encoding="utf-8")
    if kind == "bytes":
        (out / "TOKENIZER.md").write_text(BYTES_TOKENIZER_NOTE.format(eot=eot), encoding="utf-8")
        written.append("TOKENIZER.md")
    elif kind == "o200k":
        (out / "TOKENIZER.md").write_text(O200K_TOKENIZER_NOTE.format(eot=eot), encoding="utf-8")
        written.append("TOKENIZER.md")
    elif kind == "hf":
        src = Path(str(tok.get("path") or ""))
        if src.is_dir():
            src = src / "tokenizer.json"
        if not src.is_file():
            raise YxanulError("tokenizer.json not found (the checkpoint's tokenizer path)", source=str(src),
                              key="tokenizer.path")
        shutil.copyfile(src, out / "tokenizer.json")
        written.append("tokenizer.json")
        tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len}
        (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n", encoding="utf-8")
        written.append("tokenizer_config.json")
    return written


def _write_bf16_folder(out: Path, cfg: ModelConfig, sd: dict, meta: dict, dtype: str, max_shard_size: int) -> dict:
    state = hf_state_dict(cfg, sd, dtype)
    files = _write_weights(out, state, max_shard_size)
    tok = meta.get("tokenizer")
    conf = hf_config(cfg, dtype, tok)
    (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n", encoding="utf-8")
    gen = {"bos_token_id": conf["bos_token_id"], "eos_token_id": conf["eos_token_id"], "do_sample": True,
           "temperature": 1.0, "top_p": 1.0, "max_length": cfg.max_seq_len}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    files += ["config.json", "generation_config.json"] + _write_tokenizer(out, tok, cfg)
    return {"tensors": len(state), "params": sum(t.numel() for t in state.values()), "files": files}


def export_hf(ckpt: str | Path, out: str | Path, *, fp8: bool = False, overwrite: bool = False,
              model: str | None = None, dtype: str = "bfloat16", max_shard_size: int = DEFAULT_SHARD,
              block: int = 128, policy=None) -> dict:
    """Write a transformers ``LlamaForCausalLM`` folder at `out`; returns a small report.

    ``fp8``: quantize the policy's FP8 linears into E4M3 ``block x block`` tiles with FP32 ``weight_scale_inv``
    and a ``quantization_config`` (transformers FineGrainedFP8 / vLLM format); the rest stays `dtype`.
    """
    from ..io import atomic_dir, check_apart, check_replaceable

    if dtype not in DTYPES:
        raise YxanulError(f"unknown dtype {dtype!r} (expected bf16, fp16 or fp32)", source="--dtype")
    dtype = DTYPES[dtype]
    if fp8 and dtype == "float32":
        raise YxanulError("--fp8 keeps the unquantized tensors in BF16; drop --dtype fp32", source="--dtype")
    check_apart(out, [ckpt])
    check_replaceable(out, "export", overwrite)
    cfg, sd, meta = load_checkpoint_weights(ckpt, model)
    with atomic_dir(out, overwrite=overwrite, command="export", inputs=[ckpt]) as tmp:
        if not fp8:
            rep = _write_bf16_folder(tmp, cfg, sd, meta, dtype, max_shard_size)
            rep["quantization_config"] = None
        else:
            from .convert import quantize_checkpoint

            # the BF16 intermediate lives inside the output's temporary folder: a killed export leaves nothing
            # beside OUT that the next one would not remove
            with tempfile.TemporaryDirectory(prefix=".yxanul-export-", dir=tmp) as td:
                src = Path(td) / "bf16"
                src.mkdir()
                rep = _write_bf16_folder(src, cfg, sd, meta, dtype, max_shard_size)
                qrep = quantize_checkpoint(src, Path(td) / "fp8", block=block, fmt="e4m3", pow2_scales=False,
                                           skip=(), policy=policy)
                for f in (Path(td) / "fp8").iterdir():
                    if not (tmp / f.name).exists():
                        os.replace(f, tmp / f.name)
                for f in src.iterdir():  # side files the converter does not carry over
                    if f.is_file() and not (tmp / f.name).exists() and not f.name.endswith(".safetensors") \
                            and f.name != "model.safetensors.index.json":
                        shutil.copyfile(f, tmp / f.name)
                conf = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
                if not conf.get("quantization_config"):
                    conf["quantization_config"] = qrep.get("quantization_config")
                    (tmp / "config.json").write_text(json.dumps(conf, indent=2) + "\n", encoding="utf-8")
                rep["quantization_config"] = conf["quantization_config"]
                # what the output folder holds (not the intermediate folder, nor the output marker of yxanul.io)
                rep["files"] = sorted(f.name for f in tmp.iterdir() if f.name != MARKER and Path(f) != Path(td))
    rep.update({"out": str(out), "model": cfg.name, "dtype": dtype, "fp8": fp8,
                "tie_word_embeddings": cfg.tie_embeddings, "factorized_embedding_multiplied_out": bool(cfg.embed_rank)})
    return rep
