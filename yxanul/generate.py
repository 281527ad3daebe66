"""Text generation with a KV cache: greedy (temperature 0) or temperature / top-k / top-p sampling.

The model comes from a training run or checkpoint folder, a bare ``.safetensors`` file with ``--model``, or a
folder written by ``yxanul export`` (BF16/FP16/FP32, or FP8 blocks, which are dequantized first).
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .checkpoint.convert import dequantize_checkpoint
from .checkpoint.export import _LAYER_MAP, load_model
from .checkpoint.layout import check_tokenizer_spec
from .checkpoint.safetensors_header import INDEX_NAME, open_checkpoint
from .config import ModelConfig
from .errors import YxanulError, first_line
from .io import read_json_file
from .model import Yxanul

DEVICE_TYPES = ("cpu", "cuda")
_HF_LAYER_MAP = {hf: ours for ours, hf in _LAYER_MAP.items()}


class KVCache:
    """One layer's keys and values, preallocated to `max_len` positions; ``update`` appends and returns all."""

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, max_len: int, dtype=torch.float32,
                 device=None):
        self.k = torch.zeros(batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.len = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        end = self.len + t
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions, {end} requested")
        self.k[:, :, self.len:end] = k
        self.v[:, :, self.len:end] = v
        self.len = end
        return self.k[:, :, :end], self.v[:, :, :end]


def new_caches(model, batch: int, max_len: int) -> list[KVCache]:
    cfg = model.cfg
    p = next(model.parameters())
    return [KVCache(batch, cfg.n_kv_heads, cfg.head_dim, max_len, p.dtype, p.device) for _ in range(cfg.n_layers)]


@dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_at_eot: bool = True

    def validate(self) -> "SamplingOptions":
        if self.max_new_tokens < 0:
            raise YxanulError(f"must be >= 0, got {self.max_new_tokens}", source="--max-new-tokens")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise YxanulError(f"must be >= 0, got {self.temperature}", source="--temperature")
        if self.top_k < 0:
            raise YxanulError(f"must be >= 0, got {self.top_k}", source="--top-k")
        if not (0 < self.top_p <= 1):
            raise YxanulError(f"must be in (0, 1], got {self.top_p}", source="--top-p")
        if self.seed is not None and not 0 <= self.seed < 2 ** 63:  # torch.Generator takes a 64-bit seed
            raise YxanulError(f"must be in [0, 2**63), got {str(self.seed)[:40]}", source="--seed")
        return self


def sample_next(logits: torch.Tensor, opts: SamplingOptions, gen: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]."""
    logits = logits.float()
    if opts.temperature == 0:
        return logits.argmax(-1)
    # subtract the row max first: a tiny temperature then sends the others to -inf instead of overflowing to NaN
    logits = logits - logits.amax(-1, keepdim=True)
    if opts.temperature * torch.finfo(logits.dtype).max >= 1:
        logits = logits / opts.temperature
    else:  # 1/T past float32 (T rounds to 0 there): 0/0 would be NaN; the limit T -> 0 keeps the row's maxima
        logits = logits.masked_fill(logits < 0, float("-inf"))
    if opts.top_k and opts.top_k < logits.shape[-1]:
        kth = torch.topk(logits, opts.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if opts.top_p < 1.0:
        srt, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(srt, -1)
        drop = probs.cumsum(-1) - probs > opts.top_p  # keep the smallest prefix whose mass reaches top_p
        srt = srt.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, srt)
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate_ids(model, prompt_ids: list[int], opts: SamplingOptions, eot_id: int | None = None):
    """Yield new token ids one at a time: one prefill over the prompt, then one cached step per token."""
    opts = opts.validate()
    if not prompt_ids:
        raise YxanulError("the prompt encodes to no tokens", source="--prompt")
    cfg = model.cfg
    if max(prompt_ids) >= cfg.vocab_size or min(prompt_ids) < 0:
        raise YxanulError(f"prompt token id {max(prompt_ids)} is outside the model's vocabulary "
                          f"({cfg.vocab_size}): tokenizer mismatch", source="--prompt")
    n = min(opts.max_new_tokens, cfg.max_seq_len - len(prompt_ids))
    if len(prompt_ids) >= cfg.max_seq_len:   # at max_seq_len there is no room for one new token
        raise YxanulError(f"prompt of {len(prompt_ids)} tokens leaves no room in the model's context of "
                          f"max_seq_len {cfg.max_seq_len} tokens", source="--prompt")
    dev = next(model.parameters()).device
    gen = None
    if opts.seed is not None:
        gen = torch.Generator(device=dev).manual_seed(opts.seed)
    caches = new_caches(model, 1, len(prompt_ids) + max(n, 0))
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=dev)
    pos = 0
    for _ in range(n):
        h = model.hidden(idx, kv_caches=caches, pos=pos)
        pos += idx.shape[1]
        nxt = sample_next(model.logits(h[:, -1]), opts, gen)
        tok = int(nxt.item())
        yield tok
        if opts.stop_at_eot and eot_id is not None and tok == eot_id:
            return
        idx = nxt.view(1, 1)


class _Bytes:
    """Fallback byte tokenizer (ids 0-255 are bytes, 256 is end-of-text)."""
    vocab_size, eot_id = 257, 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def load_tokenizer(spec):
    try:
        from .data.tokenizers import get_tokenizer
    except ImportError:
        get_tokenizer = None
    if spec in (None, "bytes", {"kind": "bytes"}) and get_tokenizer is None:
        return _Bytes()
    if get_tokenizer is None:
        raise YxanulError("this tokenizer needs yxanul.data.tokenizers", source="tokenizer")
    return get_tokenizer(spec if spec is not None else "bytes")


def stream_decode(tokenizer, ids_iter, eot_id: int | None):
    """Yield decoded text pieces as tokens arrive, holding back an incomplete UTF-8 tail."""
    ids: list[int] = []
    shown = ""
    for t in ids_iter:
        if eot_id is not None and t == eot_id:
            break
        ids.append(t)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            continue  # likely a multi-byte character split across tokens
        if text.startswith(shown):
            piece, shown = text[len(shown):], text
            if piece:
                yield piece
    text = tokenizer.decode(ids)
    if text.startswith(shown) and len(text) > len(shown):
        yield text[len(shown):]


def is_hf_folder(path: str | Path) -> bool:
    """A folder written by ``yxanul export`` (or any Llama folder): config.json beside safetensors weights."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and not (p / "meta.json").exists() \
        and not (p / "checkpoints").is_dir()


def _read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    conf = read_json_file(path)
    if not isinstance(conf, dict) or conf.get("model_type") != "llama":
        raise YxanulError("not a Llama config.json (model_type must be 'llama')", source=str(path))
    unsupported = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "rope_scaling": None}
    for key, want in unsupported.items():
        if conf.get(key, want) != want:
            raise YxanulError(f"must be {want!r} for this model family, got {conf.get(key)!r}"[:240],
                              source=str(path), key=key)
    return conf


def hf_model_config(conf: dict, source: str) -> ModelConfig:
    """The ModelConfig of a Llama ``config.json`` as ``yxanul export`` writes it (full embedding, rank 0)."""
    def field(key, typ, default=None):
        v = conf.get(key, default)
        if isinstance(v, bool) or not isinstance(v, typ):
            raise YxanulError(f"expected a {typ.__name__ if isinstance(typ, type) else 'number'}, got {v!r}"[:240],
                              source=source, key=key)
        return v

    rope = conf.get("rope_parameters") if isinstance(conf.get("rope_parameters"), dict) else {}
    n_heads = field("num_attention_heads", int)
    d_model = field("hidden_size", int)
    own = conf.get("yxanul") if isinstance(conf.get("yxanul"), dict) else {}
    return ModelConfig(
        vocab_size=field("vocab_size", int), d_model=d_model, n_layers=field("num_hidden_layers", int),
        n_heads=n_heads, n_kv_heads=field("num_key_value_heads", int, n_heads),
        head_dim=field("head_dim", int, d_model // n_heads if n_heads > 0 else 0),
        ffn_hidden=field("intermediate_size", int), norm_eps=float(field("rms_norm_eps", (int, float), 1e-6)),
        rope_theta=float(field("rope_theta", (int, float), rope.get("rope_theta", 10000.0))),
        max_seq_len=field("max_position_embeddings", int), embed_rank=0,
        tie_embeddings=bool(conf.get("tie_word_embeddings", True)),
        init_std=float(field("initializer_range", (int, float), 0.02)),
        name=str(own.get("name", "hf"))[:64]).validate(source)


def _ours(name: str) -> str | None:
    """Llama parameter name -> Yxanul name (None for names the model does not have)."""
    if name == "model.embed_tokens.weight":
        return "embeddings.tok.weight"
    if name == "model.norm.weight":
        return "norm.weight"
    if name == "lm_head.weight":
        return name
    parts = name.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"]:
        mod, leaf = ".".join(parts[3:-1]), parts[-1]
        if mod in _HF_LAYER_MAP:
            return f"layers.{parts[2]}.{_HF_LAYER_MAP[mod]}.{leaf}"
    return None


def _read_hf_weights(folder: Path) -> dict:
    """The folder's weights under Yxanul names. With a ``model.safetensors.index.json`` exactly the shards its
    weight_map names are read, each holding exactly the tensors mapped to it (any other .safetensors file is
    not part of the model); without one, every .safetensors file, no tensor in two of them."""
    if not (folder / INDEX_NAME).is_file() and not any(f.is_file() for f in folder.glob("*.safetensors")):
        raise YxanulError("no .safetensors weights beside config.json", source=str(folder))
    files = [Path(h.path) for h in open_checkpoint(folder).headers]  # index and headers checked against each other
    sd = {}
    for f in files:
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise YxanulError(f"unreadable safetensors: {first_line(e)}", source=str(f)) from None
        for name, t in part.items():
            ours = _ours(name)
            if ours is None:
                raise YxanulError(f"unexpected tensor {name[:120]!r} for a Llama model", source=str(f))
            sd[ours] = t
    return sd


def _hf_tokenizer(folder: Path):
    if (folder / "tokenizer.json").is_file():
        return {"kind": "hf", "path": str(folder / "tokenizer.json")}
    spec = folder / "yxanul_tokenizer.json"
    if spec.is_file():
        tok = read_json_file(spec)
        if isinstance(tok, dict):
            return check_tokenizer_spec(tok, str(spec), key="")
    return None


def load_hf_model(folder: str | Path):
    """(Yxanul model in eval mode, meta) of a folder written by ``yxanul export``; FP8 blocks are dequantized."""
    folder = Path(folder)
    conf = _read_hf_config(folder)
    cfg = hf_model_config(conf, str(folder / "config.json"))
    if conf.get("quantization_config"):
        with tempfile.TemporaryDirectory(prefix="yxanul-generate-") as td:
            dequantize_checkpoint(folder, Path(td) / "bf16", dtype="fp32")
            sd = _read_hf_weights(Path(td) / "bf16")
    else:
        sd = _read_hf_weights(folder)
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    with torch.device("meta"):   # names and shapes checked before anything of config.json's size is allocated
        want = {k: tuple(v.shape) for k, v in Yxanul(cfg).state_dict().items()}
    for name, t in sd.items():
        if name in want and tuple(t.shape) != want[name]:
            raise YxanulError(f"weights do not match config.json: {name} has shape {list(t.shape)}, config.json "
                              f"implies {list(want[name])}", source=str(folder))
    from .memory import check_model_fits
    check_model_fits(cfg)
    m = Yxanul(cfg)
    try:
        m.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:240]
        raise YxanulError(f"weights do not match config.json: {detail}", source=str(folder)) from None
    return m.eval(), {"tokenizer": _hf_tokenizer(folder)}


def _check_finite(model, source: str) -> None:
    for name, prm in model.named_parameters():
        if not bool(torch.isfinite(prm).all()):
            raise YxanulError(f"parameter {name} holds NaN or Inf values; the weights are corrupt", source=source)


def _device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise YxanulError(f"unknown device {device[:40]!r} (expected cpu or cuda)", source="--device") from None
    if dev.type not in DEVICE_TYPES:
        raise YxanulError(f"cannot generate on {dev.type!r} (expected cpu or cuda)", source="--device")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise YxanulError("CUDA is not available on this machine", source="--device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise YxanulError(f"no CUDA device {dev.index} ({torch.cuda.device_count()} present)", source="--device")
    return dev


def check_prompt(prompt: str, source: str = "--prompt") -> str:
    """`prompt` unless it holds characters that are not valid UTF-8 (surrogate-escaped bytes from argv)."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise YxanulError(f"not valid UTF-8 text (undecodable byte at character {e.start})", source=source) from None
    return prompt


def load_for_generation(ckpt, model: str | None = None):
    """(model, meta) of a run/step folder, a bare .safetensors (with `model`), or an exported folder."""
    if is_hf_folder(ckpt):
        if model is not None:
            raise YxanulError("an exported folder carries its config.json; drop --model", source=str(ckpt))
        m, meta = load_hf_model(ckpt)
    else:
        m, meta = load_model(ckpt, model)
    _check_finite(m, str(ckpt))
    return m, meta


def generate_text(ckpt, prompt: str, opts: SamplingOptions, model: str | None = None, tokenizer=None,
                  device: str = "cpu", prompt_source: str = "--prompt"):
    """Load a checkpoint and yield the continuation of `prompt` piece by piece."""
    opts = opts.validate()
    check_prompt(prompt, prompt_source)
    dev = _device(device)
    m, meta = load_for_generation(ckpt, model)
    m = m.to(dev)
    spec = tokenizer if tokenizer is not None else (meta.get("tokenizer") or "bytes")
    tok = load_tokenizer(spec)
    if tok.vocab_size > m.cfg.vocab_size:
        raise YxanulError(f"tokenizer has {tok.vocab_size} ids but the model only {m.cfg.vocab_size}: "
                          f"tokenizer mismatch", source="tokenizer")
    eot = getattr(tok, "eot_id", None)
    ids = tok.encode(prompt)
    yield from stream_decode(tok, generate_ids(m, ids, opts, eot), eot)
