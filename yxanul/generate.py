"""Text generation with a KV cache: greedy (temperature 0) or temperature / top-k / top-p sampling."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import YxanulError


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
        return self


def sample_next(logits: torch.Tensor, opts: SamplingOptions, gen: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]."""
    logits = logits.float()
    if opts.temperature == 0:
        return logits.argmax(-1)
    # subtract the row max first: a tiny temperature then sends the others to -inf instead of overflowing to NaN
    logits = (logits - logits.amax(-1, keepdim=True)) / opts.temperature
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
    if len(prompt_ids) > cfg.max_seq_len:
        raise YxanulError(f"prompt of {len(prompt_ids)} tokens exceeds max_seq_len {cfg.max_seq_len}",
                          source="--prompt")
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


def generate_text(ckpt, prompt: str, opts: SamplingOptions, model: str | None = None, tokenizer=None,
                  device: str = "cpu"):
    """Load a checkpoint and yield the continuation of `prompt` piece by piece."""
    from .checkpoint.export import load_model

    opts = opts.validate()
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise YxanulError(f"unknown device {device!r}", source="--device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise YxanulError("CUDA is not available on this machine", source="--device")
    m, meta = load_model(ckpt, model)
    m = m.to(dev)
    spec = tokenizer if tokenizer is not None else (meta.get("tokenizer") or "bytes")
    tok = load_tokenizer(spec)
    if tok.vocab_size > m.cfg.vocab_size:
        raise YxanulError(f"tokenizer has {tok.vocab_size} ids but the model only {m.cfg.vocab_size}: "
                          f"tokenizer mismatch", source="tokenizer")
    eot = getattr(tok, "eot_id", None)
    ids = tok.encode(prompt)
    yield from stream_decode(tok, generate_ids(m, ids, opts, eot), eot)
