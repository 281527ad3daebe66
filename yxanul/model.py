"""The Yxanul decoder-only transformer, readable top to bottom.

Pre-norm blocks of GQA attention (RoPE, SDPA) and a SwiGLU MLP, RMSNorm everywhere, no biases.
The embedding may be factorized (``Embedding(V, r)`` then an ``r -> d`` projection); the output head is
then tied through the factorization: ``logits = (h @ P) @ E.T`` with the same ``P`` and ``E``.

Module names follow the design note's patterns so a policy YAML reads naturally:
``embeddings.{tok,proj}``, ``layers.N.attn.{q,k,v,o}_proj``, ``layers.N.mlp.{gate,up,down}_proj``,
``layers.N.{attn_norm,mlp_norm}``, ``norm`` and (untied models only) ``lm_head``.

Fused projections (``ModelConfig.fused_projections``, on by default): q/k/v, which read the same input, run as
one GEMM of width ``q + k + v``, and gate/up as one GEMM of width ``2 * ffn_hidden``. Only the compute is fused:
the separate layers (and their parameters) stay as they are, so checkpoints, exports, the precision policy and
optimizers see ``q_proj``, ``k_proj``, ... unchanged. See :func:`fusion_kind` for when a group is fused.

Initialization: every weight ~ N(0, init_std); the two residual-branch outputs (``o_proj`` and
``down_proj``) use init_std / sqrt(2 * n_layers), as GPT-2 does; RMSNorm weights start at 1.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .fp8.producers import cat_weight_copies, fp8_fusion_kind, norm_linear
from .fp8.linear import Fp8Linear, _Fp8LinearFn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    t = torch.arange(max_seq_len, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)  # Llama's rotate-half layout
    return emb.cos().float(), emb.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D]; cos/sin: [T, D]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.fused = cfg.fused_projections

    def forward(self, x, cos, sin, kv_cache=None, norm=None):
        """Attention over ``norm(x)`` (x itself when no norm is given)."""
        B, T, _ = x.shape
        q, k, v = project((self.q_proj, self.k_proj, self.v_proj), x, self.fused, norm)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        causal = True
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
            causal = T > 1  # one new token attends to the whole cache
            if causal and k.shape[2] != T:
                raise ValueError("prefill with a non-empty KV cache is not supported")
        if self.n_kv_heads != self.n_heads:  # GQA: share each KV head across its group of query heads
            rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    fp8_mlp = None  # the whole MLP as one FP8 function (yxanul.fp8.producers), set per instance by convert_model
    swiglu = None  # silu(g) * u with FP8-kept inputs (the recipe's cache_swiglu_inputs), set the same way

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)
        self.fused = cfg.fused_projections

    def forward(self, x, norm=None):
        """``down(silu(gate(x')) * up(x'))`` with x' = ``norm(x)`` (x itself when no norm is given)."""
        # FP8 recipes may install the whole-MLP function here (opt-in); it returns None while the layers cannot
        # or should not use it
        y = self.fp8_mlp(self, x, norm) if self.fp8_mlp is not None else None
        if y is not None:
            return y
        if norm is not None:
            x = norm(x)
        g, u = project((self.gate_proj, self.up_proj), x, self.fused)
        h = self.swiglu(g, u) if self.swiglu is not None else F.silu(g) * u
        return self.down_proj(h)


def fusion_kind(mods) -> str | None:
    """How linear layers that read the same input run as one GEMM over their concatenated weights:

    ``"linear"``  every layer a plain bias-free ``nn.Linear`` (the BF16 / FP32 path);
    ``"fp8"``     every layer a bias-free blockwise :class:`~yxanul.fp8.linear.Fp8Linear` of one recipe, format
                  and backend, each output width a multiple of the block size: the fused weight's block x block
                  scales are then exactly the separate weights' (no block straddles two layers), the input's
                  1 x block tiles are shared, and the output gradient's 1 x block tiles along the fused width
                  are the separate layers' tiles side by side;
    ``"fp8-tensor"`` every layer a bias-free per-tensor (tensorwise or delayed) Fp8Linear of one recipe, format,
                  backend and options, with the ``fused_tensor_projections`` option: one GEMM whose weight and
                  output gradient take one scale each for the group (the first layer's state), not each
                  layer's own;
    None          anything else, including layers of different precisions or settings, forward hooks, the
                  rowwise recipe, per-tensor recipes without that option (one scale would span several layers,
                  which is not what separate layers compute) and blockwise layers whose widths are not multiples
                  of the block size (a block would mix two layers' weights): the layers run separately.
    """
    first = mods[0]
    if not all(getattr(m, "bias", 0) is None and not (m._forward_hooks or m._forward_pre_hooks)
               and m.in_features == first.in_features for m in mods):
        return None
    if all(type(m) is nn.Linear for m in mods):
        return "linear"
    if all(type(m) is Fp8Linear for m in mods):
        return fp8_fusion_kind(mods)
    return None


def fused_linear(x: torch.Tensor, mods, kind: str | None = None) -> torch.Tensor | None:
    """``cat([m(x) for m in mods], -1)`` as one GEMM, or None when :func:`fusion_kind` says the layers must run
    separately. Gradients reach each layer's own weight.

    FP8: the fused GEMM's operands are the layers' own FP8 weight copies side by side and one quantization of
    ``x``; its non-finite flags and statistics of ``x`` and of the output gradient are recorded on the first
    layer (``q_proj``, ``gate_proj``); every layer records its weight's. ``kind``: :func:`fusion_kind` of
    ``mods`` where the caller has it."""
    kind = kind or fusion_kind(mods)
    if kind is None or x.shape[-1] != mods[0].in_features:  # a mismatch: the layers report it themselves
        return None
    w = torch.cat([m.weight for m in mods])
    if kind == "linear":
        return F.linear(x, w)
    first = mods[0]
    if kind == "fp8-tensor":  # the group's weight and operands scaled by the first layer's state
        sx = first._delayed_scale("x", x) if first.spec.delayed else None
        return _Fp8LinearFn.apply(x, w, None, *first._quantize_weight(w), sx, first)
    return _Fp8LinearFn.apply(x, w, None, *cat_weight_copies(mods), None, first)


def project(mods, x: torch.Tensor, fused: bool = True, norm=None) -> tuple[torch.Tensor, ...]:
    """``tuple(m(x') for m in mods)`` with x' = ``norm(x)`` (x itself without a norm), through one fused GEMM where
    ``fused`` and :func:`fused_linear` allow; blockwise FP8 layers with the ``fused_producers`` option then take
    the norm into the GEMM's input quantization (:func:`yxanul.fp8.producers.norm_linear`)."""
    kind = fusion_kind(mods) if fused else None
    y = norm_linear(x, mods, norm) if kind == "fp8" and norm is not None else None
    if y is None and norm is not None:
        x = norm(x)
    if y is None and kind is not None:
        y = fused_linear(x, mods, kind)
    if y is None:
        return tuple(m(x) for m in mods)
    return y.split([m.out_features for m in mods], dim=-1)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv_cache=None):
        x = x + self.attn(x, cos, sin, kv_cache, self.attn_norm)
        return x + self.mlp(x, self.mlp_norm)


class Embeddings(nn.Module):
    """Token embedding, optionally factorized: ``tok`` is V x r and ``proj`` maps r -> d."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        r = cfg.embed_rank or cfg.d_model
        self.tok = nn.Embedding(cfg.vocab_size, r)
        self.proj = nn.Linear(r, cfg.d_model, bias=False) if cfg.embed_rank else None

    def forward(self, idx):
        e = self.tok(idx)
        return self.proj(e) if self.proj is not None else e

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(E, P) with logits = (h @ P) @ E.T, P None when not factorized."""
        return self.tok.weight, (self.proj.weight if self.proj is not None else None)


class Yxanul(nn.Module):
    compiled_hidden = None  # set per instance by compile_model(scope="trunk")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        std = self.cfg.init_std
        resid_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, resid_std)
            else:
                p.normal_(0.0, std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def __getstate__(self):
        # the compiled trunk is bound to this instance: a copy (or a pickled model) runs its own trunk eagerly
        state = dict(super().__getstate__())
        state.pop("compiled_hidden", None)
        return state

    # -- forward -----------------------------------------------------------------------------------
    def hidden(self, idx: torch.Tensor, kv_caches=None, pos: int = 0) -> torch.Tensor:
        T = idx.shape[1]
        if pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {pos + T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]
        x = self.embeddings(idx)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv_caches[i] if kv_caches is not None else None)
        return self.norm(x)

    def head_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W, P): logits = (h @ P) @ W.T; P is None unless the embedding is factorized and tied."""
        if self.lm_head is not None:
            return self.lm_head.weight, None
        return self.embeddings.head_weights()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        W, P = self.head_weight()
        if P is not None:
            h = h @ P.to(h.dtype)
        return F.linear(h, W)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits for `idx`, or the mean cross-entropy against `targets` (ignore_index=-1)."""
        h = (self.compiled_hidden or self.hidden)(idx)
        if targets is None:
            return self.logits(h)
        loss_fn = getattr(self, "loss_fn", None)
        if loss_fn is not None:
            return loss_fn(self, h, targets)
        logits = self.logits(h)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)


def param_count(cfg: ModelConfig) -> int:
    """The parameter count of a model of ``cfg``: models of one and two layers built on the meta device (nothing
    allocated), the blocks being alike, so that a deep config is counted as fast as a shallow one."""
    from dataclasses import replace
    with torch.device("meta"):
        one, two = (Yxanul(replace(cfg, n_layers=n)).num_params() for n in (1, 2))
    return one + (cfg.n_layers - 1) * (two - one)


def compile_blocks(model: nn.Module, mode: str | None = None, tune_kernels: bool = False, **kwargs) -> nn.Module:
    """torch.compile every transformer block in place (``Block.compile``), leaving the embedding, final norm and
    loss eager. Identical blocks share one compiled graph (parameters are graph inputs), so compiling the
    28-layer model costs about what one layer costs, and a loss that launches its own kernels (the fused
    cross-entropy) stays outside the graph. ``mode`` is torch.compile's; ``tune_kernels`` adds inductor's
    coordinate-descent tuning of its generated kernels' launch settings (minutes more compile time; how it
    measured is in docs/perf-notes.md). Returns the model."""
    kwargs.update(compile_kwargs(mode, tune_kernels, kwargs.pop("options", None)))
    _allow_graph_variants()
    n = 0
    for m in model.modules():
        if isinstance(m, Block):
            m.compile(**kwargs)
            n += 1
    if n == 0:
        raise ValueError("compile_blocks: the model has no transformer blocks")
    return model


def _allow_graph_variants() -> None:
    """Room for a compiled graph's variants: train / eval, FP8 statistics on / off, delayed calibration on / off."""
    import torch._dynamo.config as dcfg
    for name in ("recompile_limit", "cache_size_limit"):
        if getattr(dcfg, name, 16) < 16:
            setattr(dcfg, name, 16)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_SCOPES = ("blocks", "trunk")


def compile_model(model: nn.Module, scope: str = "blocks", mode: str | None = None, tune_kernels: bool = False,
                  **kwargs) -> nn.Module:
    """torch.compile `model` in place at `scope`:

    ``blocks``  every transformer block (:func:`compile_blocks`): one graph shared by identical blocks, so the
                compile costs about one layer's;
    ``trunk``   the embedding, every block and the final norm as one graph (``model(idx)`` and
                ``model(idx, targets)``; generation with a KV cache stays eager): inductor may fuse across
                block boundaries (a block's residual add with the next block's norm and the quantization of its
                output), and with CUDA graphs each pass replays one graph instead of one per block. Compiling
                costs about the whole depth's, and again for every FP8 layer state (calibrating, statistics).

    The loss stays outside the graph either way (the fused cross-entropy launches its own kernels). Returns the
    model."""
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"unknown compile scope {scope!r} (expected one of: {', '.join(COMPILE_SCOPES)})")
    if scope == "blocks":
        return compile_blocks(model, mode=mode, tune_kernels=tune_kernels, **kwargs)
    if not isinstance(model, Yxanul):
        raise ValueError("compile_model: scope 'trunk' needs a Yxanul model")
    kwargs.update(compile_kwargs(mode, tune_kernels, kwargs.pop("options", None)))
    _allow_graph_variants()
    model.compiled_hidden = torch.compile(model.hidden, **kwargs)
    return model


def compile_kwargs(mode: str | None = None, tune_kernels: bool = False, options: dict | None = None) -> dict:
    """torch.compile's ``mode=`` / ``options=`` arguments for a compile mode, with inductor's coordinate-descent
    tuning added when ``tune_kernels`` and the caller's ``options`` kept (torch.compile takes a mode or options,
    not both, so with options the mode becomes its options)."""
    if mode == "default":
        mode = None
    extra = {**(options or {}), **({"coordinate_descent_tuning": True} if tune_kernels else {})}
    if extra:
        return {"options": {**mode_options(mode), **extra}}
    return {"mode": mode} if mode is not None else {}


def mode_options(mode: str | None) -> dict:
    """The inductor options torch.compile's `mode` stands for (``{}`` for the default mode)."""
    if not mode or mode == "default":
        return {}
    from torch._inductor import list_mode_options
    return dict(list_mode_options(mode))


def compile_mode_uses_cuda_graphs(mode: str | None) -> bool:
    """Whether torch.compile's `mode` replays graphs as CUDA graphs (reduce-overhead, max-autotune). A loop
    driving such a model calls ``torch.compiler.cudagraph_mark_step_begin()`` before each forward pass and must
    not keep tensors of one replay past the next."""
    if not mode or mode == "default":
        return False
    try:
        return bool(mode_options(mode).get("triton.cudagraphs", False))
    except Exception:  # noqa: BLE001 - an unknown mode or an older torch
        return mode in ("reduce-overhead", "max-autotune")
