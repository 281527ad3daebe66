"""The Yxanul architecture as a user would write it in plain PyTorch: the `bf16-plain` baseline of the benchmarks.

Separate ``nn.Linear`` projections, ``F.rms_norm``, RoPE in the rotate-half layout, SDPA with ``enable_gqa`` (no
expanded K/V), SwiGLU, the factorized embedding with its tied head ``(h @ P) @ E.T``, ``F.cross_entropy`` on FP32
logits. Nothing from this project's kernels; train it under BF16 autocast with fused AdamW and ``torch.compile``
of the whole model. Same parameters, same count and same initialization scheme as :class:`yxanul.model.Yxanul`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, hd = c.d_model, c.head_dim
        self.h, self.kv, self.hd, self.eps = c.n_heads, c.n_kv_heads, hd, c.norm_eps
        self.attn_norm, self.mlp_norm = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))
        self.q = nn.Linear(d, c.n_heads * hd, bias=False)
        self.k = nn.Linear(d, c.n_kv_heads * hd, bias=False)
        self.v = nn.Linear(d, c.n_kv_heads * hd, bias=False)
        self.o = nn.Linear(c.n_heads * hd, d, bias=False)
        self.gate = nn.Linear(d, c.ffn_hidden, bias=False)
        self.up = nn.Linear(d, c.ffn_hidden, bias=False)
        self.down = nn.Linear(c.ffn_hidden, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        a = F.rms_norm(x, (x.shape[-1],), self.attn_norm, self.eps)
        q = rope(self.q(a).view(B, T, self.h, self.hd).transpose(1, 2), cos, sin)
        k = rope(self.k(a).view(B, T, self.kv, self.hd).transpose(1, 2), cos, sin)
        v = self.v(a).view(B, T, self.kv, self.hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv != self.h)
        x = x + self.o(y.transpose(1, 2).reshape(B, T, -1))
        m = F.rms_norm(x, (x.shape[-1],), self.mlp_norm, self.eps)
        return x + self.down(F.silu(self.gate(m)) * self.up(m))


def padded_vocab(vocab_size: int, vocab_multiple: int = 1) -> int:
    """The embedding's rows of a :class:`PlainLM` with this ``vocab_multiple``: the vocabulary rounded up."""
    return -(-vocab_size // vocab_multiple) * vocab_multiple


class PlainLM(nn.Module):
    """``vocab_multiple=M`` (M > 1) sizes the embedding (and an untied head) at the vocabulary rounded up to a
    multiple of M, as users often do so that the head's GEMMs have aligned dimensions: the extra rows are never a
    target, but they take part in the softmax (their logits are learned down) and add ``pad × width``
    parameters. The default, 1, is the vocabulary as it is."""

    def __init__(self, c, vocab_multiple: int = 1):
        super().__init__()
        if not isinstance(vocab_multiple, int) or isinstance(vocab_multiple, bool) or vocab_multiple < 1:
            raise ValueError(f"vocab_multiple must be a positive integer, got {vocab_multiple!r}")
        rows = padded_vocab(c.vocab_size, vocab_multiple)
        r = c.embed_rank or c.d_model
        self.eps = c.norm_eps
        self.vocab_size, self.vocab_multiple = c.vocab_size, vocab_multiple
        self.tok = nn.Embedding(rows, r)
        self.proj = nn.Linear(r, c.d_model, bias=False) if c.embed_rank else None
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = nn.Parameter(torch.ones(c.d_model))
        self.head = None if c.tie_embeddings else nn.Linear(c.d_model, rows, bias=False)
        inv = 1.0 / c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim)
        f = torch.outer(torch.arange(c.max_seq_len, dtype=torch.float64), inv).repeat(1, 2)
        self.register_buffer("cos", f.cos().float(), persistent=False)
        self.register_buffer("sin", f.sin().float(), persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                resid = name.endswith(("o.weight", "down.weight"))
                nn.init.normal_(p, 0.0, c.init_std / (math.sqrt(2 * c.n_layers) if resid else 1.0))

    def forward(self, idx, targets):
        return F.cross_entropy(self.logits(idx).float().flatten(0, 1), targets.flatten(), ignore_index=-1)

    def logits(self, idx):
        x = self.tok(idx)
        x = self.proj(x) if self.proj is not None else x
        cos, sin = self.cos[: idx.shape[1]], self.sin[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x, cos, sin)
        h = F.rms_norm(x, (x.shape[-1],), self.norm, self.eps)
        w = self.head.weight if self.head is not None else self.tok.weight      # [rows, width]
        if self.head is None and self.proj is not None:
            h = h @ self.proj.weight
        return h @ w.T
