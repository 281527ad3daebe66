"""Training-memory estimator: what one training step of a Yxanul model keeps in device memory.

The estimate follows the model's real forward pass (``yxanul/model.py``) under BF16 autocast with FP32
parameters, tensor by tensor, and counts what autograd saves for the backward pass:

* **weights** - compute copies. Under autocast every ``Linear`` casts its FP32 weight to BF16 once per
  forward and that copy is *saved for backward*, so it lives from the forward until the layer's backward.
  FP8 linears keep an E4M3 copy of the weight plus, for the backward pass, its transpose. The embedding
  lookup and RMSNorm read the FP32 parameters directly (no copy).
* **master weights** (the parameters, ``precision_strategy.master_weights``), **gradients**
  (``gradient_accumulation``) and **optimizer states** (AdamW: two states at ``optimizer_dtype``).
* **scales** - FP8 weight scale factors (block x block tiles for the blockwise recipe, one per row or per
  tensor otherwise, both orientations) and the delayed recipe's amax histories.
* **activations** - per layer: both RMSNorms save their FP32 input, ``rsqrt`` and normalized output; each
  linear saves its (BF16, or FP8 + 1 x block scales with the FP8 activation cache) input; SDPA saves q,
  the GQA-expanded k and v, its output and the FP32 logsumexp; the MLP saves gate, silu(gate), up and
  their product (with the recipe's ``cache_swiglu_inputs`` and FP8 gate and up: gate and up as FP8
  1 x block tiles with FP32 scales, silu recomputed). The residual stream is FP32 when the embedding is a plain lookup (its output is FP32
  under autocast) and BF16 when it is factorized (the ``r -> d`` projection runs in BF16); an FP32
  residual makes every linear cast its input separately. With activation checkpointing only each
  block's input is kept, plus one block's activations while it is recomputed.
* **logits** - the loss training runs on the device (``device``, ``fused_ce`` as in the training config).
  On CUDA the fused loss: for a head of rank <= 256 (the factorized tied head) the register-only kernels,
  which save h's gradient up to a row scale (FP32, N x rank) and per-row statistics and compute W's gradient
  in FP32 in the backward pass; for a wider head the chunked loss, which saves both gradients (h's in BF16,
  W's in FP32) and holds one chunk of logits at a time. Without the fused loss (CPU by default) the full
  logits: the FP32 log-softmax output (saved), its incoming gradient and the outgoing gradient, 12 bytes
  per token per vocabulary entry (the forward pass peaks at 10: BF16 logits, their FP32 upcast and the
  log-softmax); with a 200k vocabulary this term dominates.

Everything is summed: the total is the peak at the start of the backward pass of a step where the
gradients already exist (gradient accumulation, or ``zero_grad(set_to_none=False)``), or during the loss's
forward pass when its working set is larger, an upper bound of the allocator's ``max_memory_allocated`` of
an eager step up to fragmentation and kernel workspaces.

**Compiled** (``compiled="blocks"``: each block under ``torch.compile``, as training compiles them;
``"model"``: the whole model and its loss, as a user compiles a plain model): inductor recomputes cheap
elementwise results in the backward pass instead of saving them. A block then saves its input and the two
norms' ``rsqrt`` (not their FP32 input and output), the transposed copy of SDPA's output that o_proj reads,
and gate and up but not silu(gate) (the SwiGLU product, down's input, stays saved); everything else is
counted as in eager mode (an FP8 linear saves what its autograd function saves, compiled or not). With the
whole model compiled and no fused loss, the loss saves the BF16 logits and writes their BF16 gradient into the
same buffer (one BF16 logit tensor instead of the three FP32 ones of eager mode); on CUDA, with a vocabulary that
is not a multiple of 8, inductor pads the head's GEMMs and the gradient is a padded copy beside the logits (two).
The gradients exist at the start of the backward pass only with gradient accumulation (one process's steps end
with ``zero_grad(set_to_none=True)``; under DDP the gradient buckets stay allocated, so add the gradients), so the
total is the larger of that start and the end of the backward pass (every gradient, no activations).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import ModelConfig
from .errors import YxanulError
from .fp8.recipe import Fp8Spec, resolve
from .precision import BYTES, Policy
from .train_config import check_step_sizes

OPTIMIZERS = {"adamw": 2, "sgd": 1}  # number of per-parameter states (SGD: momentum)
PRECISION_MODES = ("bf16", "fp8")
DEVICES = ("cuda", "cpu")
FUSED_CE = ("auto", "on", "off")
COMPILED = ("none", "blocks", "model")
CUT_MAX_RANK = 256  # the register-only loss kernels' largest head rank (yxanul.kernels.cut_ce.MAX_K)
GEMM_ALIGN = 8  # inductor pads a 16-bit GEMM's dimensions that are not multiples of this (CUDA only)
CHUNK_BYTES = 1 << 30  # the chunked loss's budget for one chunk's FP32 logits (yxanul.kernels.linear_ce)
_COMPONENT_OF = {"embeddings": "embeddings", "layer_norms": "layer_norms", "attention_compute": "attention",
                 "ffn_compute": "ffn", "output_head": "output_head", "other": "other"}


@dataclass(frozen=True)
class MemoryOptions:
    batch: int = 8
    seq: int | None = 2048  # None: min(2048, max_seq_len)
    optimizer: str = "adamw"
    grad_accum: int = 1
    precision: str | None = None              # None: fp8 if the policy enables it, else bf16
    activation_checkpointing: bool = False
    fp8_activation_cache: bool | None = None  # None: the policy recipe's cache_fp8_activations
    device: str = "cuda"                      # where training runs: decides the loss training uses
    fused_ce: str = "auto"                    # auto (on for CUDA) | on | off, as in the training config
    compiled: str = "none"                    # none | blocks (torch.compile of each block) | model (all, loss too)

    def validate(self, cfg: ModelConfig) -> "MemoryOptions":
        if self.seq is None:
            import dataclasses
            return dataclasses.replace(self, seq=min(2048, cfg.max_seq_len)).validate(cfg)
        for k in ("batch", "seq", "grad_accum"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise YxanulError(f"must be a positive integer, got {v!r}", source=f"--{k.replace('_', '-')}")
        if self.seq > cfg.max_seq_len:
            raise YxanulError(f"{self.seq} exceeds the model's max_seq_len {cfg.max_seq_len}", source="--seq")
        check_step_sizes(self.batch, self.seq, self.grad_accum, None, ("--batch", "--seq", "--grad-accum"))
        if self.optimizer not in OPTIMIZERS:
            raise YxanulError(f"unknown optimizer {self.optimizer!r} (expected one of: {', '.join(OPTIMIZERS)})",
                              source="--optimizer")
        if self.device not in DEVICES:
            raise YxanulError(f"unknown device {self.device!r} (expected cuda or cpu)", source="--device")
        if self.compiled not in COMPILED:
            raise YxanulError(f"expected none, blocks or model, got {self.compiled!r}", source="--compiled")
        if self.fused_ce not in FUSED_CE:
            raise YxanulError(f"expected auto, on or off, got {self.fused_ce!r}", source="--fused-ce")
        if self.precision is not None and self.precision not in PRECISION_MODES:
            raise YxanulError(f"unknown precision {self.precision!r} (expected bf16 or fp8)", source="--precision")
        return self


def _linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Every GEMM weight the forward pass uses: name -> (out_features, in_features)."""
    d, dq, dkv, f, v = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_hidden, \
        cfg.vocab_size
    out: dict[str, tuple[int, int]] = {}
    if cfg.embed_rank:
        out["embeddings.proj"] = (d, cfg.embed_rank)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        out[p + "attn.q_proj"] = (dq, d)
        out[p + "attn.k_proj"] = (dkv, d)
        out[p + "attn.v_proj"] = (dkv, d)
        out[p + "attn.o_proj"] = (d, dq)
        out[p + "mlp.gate_proj"] = (f, d)
        out[p + "mlp.up_proj"] = (f, d)
        out[p + "mlp.down_proj"] = (d, f)
    out["lm_head"] = (v, cfg.embed_rank if (cfg.tie_embeddings and cfg.embed_rank) else d)
    return out


def _weight_scale_count(o: int, i: int, spec: Fp8Spec) -> int:
    g, b = spec.w.granularity, spec.w.block
    if g == "block":
        return math.ceil(o / b) * math.ceil(i / b)
    if g == "tile":
        return o * math.ceil(i / b)
    if g == "row":
        return o
    return 1


def _act_scale_bytes_per_elem(in_features: int, spec: Fp8Spec) -> float:
    g = spec.x.granularity
    if g in ("tile", "block"):
        return 4.0 / spec.x.block
    if g == "row":
        return 4.0 / in_features
    return 0.0


def loss_impl(opts: MemoryOptions, head_rank: int) -> str:
    """The cross-entropy training runs: ``full`` (logits for every token, then ``F.cross_entropy``), ``cut``
    (CUDA kernels that keep logit tiles in registers) or ``chunked`` (logits one chunk of tokens at a time)."""
    fused = opts.fused_ce == "on" or (opts.fused_ce == "auto" and opts.device == "cuda")
    if not fused:
        return "full"
    return "cut" if opts.device == "cuda" and head_rank <= CUT_MAX_RANK else "chunked"


def _default_chunk(n_tokens: int, vocab: int) -> int:
    rows = max(16, 2 ** int(math.floor(math.log2(max(1, CHUNK_BYTES // (4 * max(vocab, 1)))))))
    return max(1, min(n_tokens, rows))


def loss_parts(impl: str, tokens: int, vocab: int, rank: int, device: str,
               compiled: bool = False) -> tuple[dict[str, int], int]:
    """(bytes the loss holds at the start of the backward pass by part, the peak of its own forward pass)."""
    n, v, k = tokens, vocab, rank
    if impl == "full" and compiled:
        # inductor fuses the FP32 upcast and log-softmax into its reductions: the BF16 logits are saved, and
        # the backward pass writes their BF16 gradient into the same buffer, except where inductor pads the head's
        # GEMMs (CUDA, a vocabulary not a multiple of 8): the gradient then goes to a padded copy beside the logits
        parts = {"logits_bf16_saved": 2 * n * v}
        if device == "cuda" and v % GEMM_ALIGN:
            parts["grad_logits_bf16_padded"] = 2 * n * (v + (-v) % GEMM_ALIGN)
        return parts, 2 * n * v
    if impl == "full":
        parts = {"log_softmax_fp32_saved": 4 * n * v, "grad_log_softmax_fp32": 4 * n * v,
                 "grad_logits_fp32": 4 * n * v}
        return parts, (2 + 4 + 4) * n * v   # BF16 logits, their FP32 upcast and the log-softmax
    if impl == "cut":
        # saved: h's gradient up to a per-row scale (FP32), the row log-sum-exp, targets and their mask;
        # the backward's weight gradient is computed in FP32 (the BF16 h and W it reads are counted as the
        # head's input and compute weight)
        parts = {"grad_h_fp32": 4 * n * k, "row_stats": (4 + 8 + 1) * n, "grad_W_fp32": 4 * v * k}
        return parts, parts["grad_h_fp32"] + parts["row_stats"]
    # chunked: both gradients are computed in the forward pass and saved (h's in BF16, W's in FP32); one
    # chunk's logits live at a time: BF16, turned in place into their gradient by the CUDA kernel; on CPU
    # BF16, their FP32 upcast and the BF16 gradient
    chunk = _default_chunk(n, v)
    parts = {"grad_h": 2 * n * k, "grad_W_fp32": 4 * v * k}
    chunk_bytes = chunk * (v + (-v) % 64) * 2 if device == "cuda" else chunk * v * (2 + 4 + 2)
    return parts, sum(parts.values()) + chunk_bytes


def check_model_fits(cfg: ModelConfig, what: str = "its FP32 weights", bytes_per_param: int = 4) -> int:
    """Refuse, before anything is allocated, a model whose weights alone exceed the available memory (a
    config asking for terabytes is a one-line error, not an allocator failure); returns the parameter count."""
    from .io import check_memory
    from .model import param_count

    n = param_count(cfg)
    check_memory(bytes_per_param * n, f"model {cfg.name} ({n:,} parameters): {what}")
    return n


def estimate(cfg: ModelConfig, policy: Policy, opts: MemoryOptions | None = None) -> dict:
    """The memory of one training step; see the module docstring for what each term holds."""
    import torch

    from .model import Yxanul

    opts = (opts or MemoryOptions()).validate(cfg)
    mode = opts.precision or ("fp8" if policy.strategy.use_fp8 else "bf16")
    pol = policy.with_fp8(mode == "fp8")
    recipe = pol.recipe
    spec = resolve(recipe)
    cache = recipe.cache_fp8_activations if opts.fp8_activation_cache is None else opts.fp8_activation_cache
    with torch.device("meta"):
        model = Yxanul(cfg)
    mods = pol.resolve(model, strict=False)
    prec = {m.name: m.precision for m in mods}
    comp_of = {m.name: _COMPONENT_OF.get(m.component, "other") for m in mods}
    n_params = model.num_params()

    master_b = BYTES[pol.dtype_of("master_weights")]
    grad_b = BYTES[pol.dtype_of("gradient_accumulation")]
    opt_b = BYTES[pol.dtype_of("optimizer_dtype")]
    low_b = 2  # autocast compute dtype: BF16

    # -- parameters by component ------------------------------------------------------------------------
    params_by: dict[str, int] = {}
    for m in mods:
        c = comp_of[m.name]
        params_by[c] = params_by.get(c, 0) + m.params

    # -- compute copies of GEMM weights and their scales -------------------------------------------------
    shapes = _linear_shapes(cfg)
    weights_by = {c: 0 for c in params_by}
    weights_by.setdefault("output_head", 0)
    fp8_by = {c: 0 for c in weights_by}
    scales = 0
    n_fp8 = 0
    for name, (o, i) in shapes.items():
        p = prec.get(name, "bf16")
        c = comp_of.get(name, "output_head" if name == "lm_head" else "other")
        if p.startswith("fp8"):
            n_fp8 += 1
            fp8_by[c] = fp8_by.get(c, 0) + 2 * o * i        # W and its transpose for the dgrad GEMM
            weights_by[c] = weights_by.get(c, 0) + 2 * o * i
            scales += 2 * 4 * _weight_scale_count(o, i, spec)
        elif master_b != low_b:
            weights_by[c] = weights_by.get(c, 0) + low_b * o * i  # autocast's BF16 copy, saved for backward
    if cfg.embed_rank and cfg.tie_embeddings and master_b != low_b:
        # the tied head computes (h @ P.to(h.dtype)) @ E.T: an explicit BF16 copy of P next to autocast's
        weights_by["embeddings"] = weights_by.get("embeddings", 0) + low_b * cfg.d_model * cfg.embed_rank
    if spec.delayed and n_fp8:
        scales += n_fp8 * 3 * recipe.amax_history_len * 4 + n_fp8 * 3 * 4  # amax histories + scales
    weights = sum(weights_by.values())

    # -- activations ------------------------------------------------------------------------------------
    d, f, hq, hkv, hd = cfg.d_model, cfg.ffn_hidden, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    tokens = opts.batch * opts.seq
    res_b = low_b if cfg.embed_rank else master_b  # dtype of the residual stream under autocast

    def linear_inputs(names: list[str], in_features: int, in_b: int, already_saved: bool) -> float:
        """Bytes per token the linears `names` save of their common input (`in_b` bytes per element)."""
        total = 0.0
        shared_low = False
        # q/k/v and gate/up run as one GEMM (cfg.fused_projections) when none of them is FP8: one cast input
        fused = cfg.fused_projections and len(names) > 1 and not any(prec.get(n, "bf16").startswith("fp8")
                                                                     for n in names)
        for n in names:
            p = prec.get(n, "bf16")
            if p.startswith("fp8") and cache:
                total += in_features * (1 + _act_scale_bytes_per_elem(in_features, spec))
            elif in_b == low_b or fused:
                shared_low = True  # one BF16 tensor for all consumers
            else:
                total += low_b * in_features  # each consumer casts its FP32 input separately
        if shared_low and not already_saved:
            total += low_b * in_features
        return total

    per_layer: dict[str, float] = {}
    norm = 4 * d + 4 + 4 * d  # FP32 input (or its upcast), rsqrt, normalized output
    L0 = "layers.0."
    # compiled: the block's input and rsqrt; the normalized output is the q/k/v input, counted there
    compiled = opts.compiled != "none"
    per_layer["attn_norm"] = res_b * d + 4 if compiled else norm
    per_layer["qkv_inputs"] = linear_inputs([L0 + "attn.q_proj", L0 + "attn.k_proj", L0 + "attn.v_proj"], d,
                                            res_b, False)
    kv_heads_saved = hq if hkv != hq else hkv
    per_layer["sdpa_q_k_v"] = low_b * hd * (hq + 2 * kv_heads_saved)
    per_layer["sdpa_out"] = low_b * hq * hd
    per_layer["sdpa_logsumexp"] = 4 * hq
    # eager: a view of SDPA's output; compiled: its transposed copy is saved apart
    per_layer["o_proj_input"] = linear_inputs([L0 + "attn.o_proj"], hq * hd, low_b, not compiled)
    per_layer["gate_up_inputs"] = linear_inputs([L0 + "mlp.gate_proj", L0 + "mlp.up_proj"], d, res_b, False)
    gate_up_fp8 = all(prec.get(L0 + n, "bf16").startswith("fp8") for n in ("mlp.gate_proj", "mlp.up_proj"))
    # compiled: rsqrt, and the norm's BF16 output unless gate/up's inputs already hold it (FP8-cached inputs do not)
    per_layer["mlp_norm"] = (4 + (low_b * d if cache and gate_up_fp8 else 0)) if compiled else norm
    if recipe.cache_swiglu_inputs and gate_up_fp8:
        # gate and up as FP8 1 x block tiles with FP32 scales; silu(gate) recomputed (yxanul.fp8.swiglu)
        per_layer["gate_up_fp8"] = 2 * f * (1 + 4 / recipe.block_size)
    elif compiled:
        per_layer["gate_up"] = 2 * low_b * f  # silu(gate) recomputed
    else:
        per_layer["gate_silu_up"] = 3 * low_b * f
    per_layer["down_input"] = linear_inputs([L0 + "mlp.down_proj"], f, low_b, False)
    layer_token = sum(per_layer.values())
    layer_bytes = {k: int(round(v * tokens)) for k, v in per_layer.items()}
    layer_total = sum(layer_bytes.values())

    glob: dict[str, int] = {"token_ids": 8 * tokens}
    if cfg.embed_rank:
        glob["embed_proj_input"] = int(round(tokens * linear_inputs(["embeddings.proj"], cfg.embed_rank, master_b,
                                                                    False)))
    glob["final_norm"] = int((res_b * d + 4 if opts.compiled == "model" else norm) * tokens)
    head_rank = shapes["lm_head"][1]
    impl = loss_impl(opts, head_rank)
    factorized_head = bool(cfg.embed_rank and cfg.tie_embeddings)
    if impl == "chunked":  # the chunked loss keeps its gradients, not its input; h @ P still saves h
        glob["head_input"] = int(tokens * low_b * d) if factorized_head else 0
    elif factorized_head:
        # h @ P saves h; the head GEMM saves h @ P (rank r)
        glob["head_input"] = int(tokens * (low_b * d + linear_inputs(["lm_head"], cfg.embed_rank, low_b, False)))
    else:
        glob["head_input"] = int(round(tokens * linear_inputs(["lm_head"], d, res_b, False)))
    if opts.activation_checkpointing:
        block_inputs = cfg.n_layers * res_b * d * tokens
        activations = block_inputs + layer_total + sum(glob.values())
    else:
        block_inputs = 0
        activations = cfg.n_layers * layer_total + sum(glob.values())

    logits_parts, logits_forward_peak = loss_parts(impl, tokens, cfg.vocab_size, head_rank, opts.device,
                                                   opts.compiled == "model")
    if impl == "chunked" and weights_by.get("output_head"):
        # the chunked loss casts the head weight inside its forward pass and saves no copy of it
        logits_forward_peak += weights_by["output_head"]
        weights -= weights_by["output_head"]
        weights_by["output_head"] = 0
    logits = sum(logits_parts.values())

    master = master_b * n_params
    grads = grad_b * n_params
    optimizer = OPTIMIZERS[opts.optimizer] * opt_b * n_params
    # the peak is the larger of the start of the backward pass (gradients, everything saved, the loss's saved
    # part) and the loss's own forward pass (everything saved so far plus its working set, gradients included)
    total = weights + master + grads + optimizer + scales + activations + max(logits, logits_forward_peak)
    if compiled:  # gradients exist at the start only with accumulation; at the end of backward all do
        start = weights + activations + max(logits, logits_forward_peak) + (grads if opts.grad_accum > 1 else 0)
        # the end: every gradient; with checkpointing the first block is recomputed while they exist
        end = grads + (layer_total if opts.activation_checkpointing else 0)
        peak_phase = "start of backward" if start >= end else "end of backward"
        total = master + optimizer + scales + max(start, end)
    else:
        peak_phase = "start of backward (gradients counted)"
    return {
        "model": cfg.name,
        "params": n_params,
        "precision": mode,
        "recipe": recipe.name,
        "batch": opts.batch,
        "seq": opts.seq,
        "grad_accum": opts.grad_accum,
        "tokens_per_step": tokens * opts.grad_accum,
        "optimizer": opts.optimizer,
        "activation_checkpointing": opts.activation_checkpointing,
        "fp8_activation_cache": bool(cache) and mode == "fp8",
        "device": opts.device,
        "compiled": opts.compiled,
        "peak_phase": peak_phase,
        "loss": impl,
        "weights_bytes": weights,
        "master_weights_bytes": master,
        "grads_bytes": grads,
        "optimizer_bytes": optimizer,
        "scales_bytes": scales,
        "activations_bytes": activations,
        "logits_bytes": logits,
        "total_bytes": total,
        "breakdown": {
            "params_by_component": params_by,
            "weights_by_component": weights_by,
            "fp8_weights_by_component": {k: v for k, v in fp8_by.items() if v},
            "dtypes": {"master_weights": pol.dtype_of("master_weights"),
                       "grads": pol.dtype_of("gradient_accumulation"),
                       "optimizer_states": pol.dtype_of("optimizer_dtype"),
                       "residual_stream": "fp32" if res_b == 4 else "bf16"},
            "activations": {"per_layer_bytes": layer_total, "per_layer": layer_bytes,
                            "per_layer_bytes_per_token": layer_token, "layers": cfg.n_layers,
                            "checkpointed_block_inputs_bytes": block_inputs, "global": glob},
            "logits": {**logits_parts, "forward_peak_bytes": logits_forward_peak, "loss": impl},
        },
    }


# -- the design note's "Memory Layout for Yxanul 197M" table, checked ----------------------------------------
NOTE_ROWS = [  # (row, note's BF16 MB, note's mixed-precision MB)
    ("Embeddings (200k vocab)", 307, 307),
    ("LayerNorms (28 layers)", 0.4, 0.4),
    ("Attention (28 layers)", 66, 33),
    ("FFN (28 layers)", 263, 131),
    ("Scale factors", 0, 2),
    ("Total Model", 637, 474),
    ("Optimizer states", 1274, 1274),
    ("Total Memory", 1911, 1748),
]


def note_comparison(bf16: dict, fp8: dict) -> list[dict]:
    """The note's rows against the figures for the model the table describes (decimal MB, like the note)."""
    p = bf16["breakdown"]["params_by_component"]
    emb, head = p.get("embeddings", 0), p.get("output_head", 0)
    norms, attn, ffn = p.get("layer_norms", 0), p.get("attention", 0), p.get("ffn", 0)
    total_p = bf16["params"]
    fp8_w = fp8["breakdown"]["fp8_weights_by_component"]
    mb = 1e6
    rows = [
        ("Embeddings (200k vocab)", 2 * (emb + head), 2 * (emb + head),
         f"the note counts one {emb:,}-param embedding; the seed also has an untied lm_head of {head:,} params, "
         "and both stay BF16 under the policy"),
        ("LayerNorms (28 layers)", 2 * norms, 2 * norms,
         f"{norms:,} params (2 per layer + final, d_model each) are {2 * norms / mb:.2f} MB in BF16, not 0.4 MB"),
        ("Attention (28 layers)", 2 * attn, attn,
         f"GQA q/k/v/o hold {attn:,} params = {2 * attn / mb:.1f} MB in BF16; one FP8 byte each is "
         f"{attn / mb:.1f} MB - but FP8 training keeps the transposed copy too ({fp8_w.get('attention', 0) / mb:.1f} MB)"),
        ("FFN (28 layers)", 2 * ffn, ffn,
         f"{ffn:,} params: BF16 {2 * ffn / mb:.1f} MB, FP8 {ffn / mb:.1f} MB (+ transposed copy in training: "
         f"{fp8_w.get('ffn', 0) / mb:.1f} MB)"),
        ("Scale factors", 0, fp8["scales_bytes"],
         f"128x128 weight blocks need only {fp8['scales_bytes'] // 8:,} FP32 scales per orientation; the "
         "per-token 1x128 activation scales are activations"),
        ("Total Model", 2 * total_p, total_p + (emb + head + norms),
         f"{total_p:,} params; FP8 compute copies do not replace the FP32 master weights, they add to them"),
        ("Optimizer states", bf16["optimizer_bytes"], fp8["optimizer_bytes"],
         "AdamW keeps two FP32 states = 8 bytes/param; the note's row is 2 bytes/param per state"),
        ("Total Memory", bf16["total_bytes"], fp8["total_bytes"],
         f"the note forgets FP32 master weights ({bf16['master_weights_bytes'] / mb:,.0f} MB), FP32 gradients "
         f"({bf16['grads_bytes'] / mb:,.0f} MB), activations and the 200k-vocab logits "
         f"(batch {bf16['batch']} x seq {bf16['seq']})"),
    ]
    out = []
    for (name, note_bf16, note_mp), (_, ok_bf16, ok_mp, why) in zip(NOTE_ROWS, rows):
        wrong = abs(note_bf16 - ok_bf16 / mb) > max(0.05, 0.02 * note_bf16) or \
            abs(note_mp - ok_mp / mb) > max(0.05, 0.02 * note_mp)
        out.append({"row": name, "note_bf16_mb": note_bf16, "note_mixed_mb": note_mp,
                    "correct_bf16_bytes": int(ok_bf16), "correct_mixed_bytes": int(ok_mp),
                    "wrong": bool(wrong), "why": why})
    return out


def measure_peak(cfg: ModelConfig, policy: Policy, opts: MemoryOptions, steps: int = 3) -> dict:
    """Run `steps` real training steps on CUDA (AdamW, BF16 autocast, FP8 linears when the precision is fp8, the
    cross-entropy training uses on CUDA: the fused loss unless ``opts.fused_ce`` is off) and return
    ``torch.cuda.max_memory_allocated``."""
    import torch

    from .model import Yxanul

    if not torch.cuda.is_available():
        raise YxanulError("needs a CUDA device (this machine has none); drop --measure for the estimate",
                          source="--measure")
    if steps < 1:
        raise YxanulError(f"must be >= 1, got {steps}", source="--steps")
    opts = opts.validate(cfg)
    if opts.device != "cuda":
        raise YxanulError("measures on CUDA; drop --device cpu", source="--measure")
    mode = opts.precision or ("fp8" if policy.strategy.use_fp8 else "bf16")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = Yxanul(cfg).to(dev)
    if mode == "fp8":
        try:
            from . import kernels  # noqa: F401  (registers the Triton quantizers, as training does)
            from .fp8.linear import convert_model
        except ImportError:
            raise YxanulError("FP8 training layers (yxanul.fp8.linear) are not available; use --precision bf16",
                              source="--measure") from None
        pol = policy.with_fp8(True)
        if opts.fp8_activation_cache is not None:
            pol = pol.with_recipe(cache_fp8_activations=opts.fp8_activation_cache)
        model = convert_model(model, pol) or model
    impl = loss_impl(opts, _linear_shapes(cfg)["lm_head"][1])
    if impl != "full":
        from .kernels.linear_ce import use_fused_ce

        use_fused_ce(model)
    if opts.activation_checkpointing:
        from torch.utils.checkpoint import checkpoint

        for blk in model.layers:
            fwd = blk.forward
            blk.forward = (lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k))(fwd)
    if opts.compiled == "blocks":
        from .model import compile_model

        compile_model(model, "blocks")
    elif opts.compiled == "model":
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True) if opts.optimizer == "adamw" else \
        torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    g = torch.Generator(device=dev).manual_seed(0)
    # compiled: one step first, so that compilation's own allocations (autotuning) are not the peak
    first = int(opts.compiled != "none")
    for i in range(steps + first):
        if i == first:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(opts.grad_accum):
            idx = torch.randint(0, cfg.vocab_size, (opts.batch, opts.seq + 1), device=dev, generator=g)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(idx[:, :-1], idx[:, 1:])
            (loss / opts.grad_accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"device": torch.cuda.get_device_name(), "steps": steps, "precision": mode, "loss": impl,
            "compiled": opts.compiled,
            "peak_bytes": int(peak),
            "final_loss": float(loss.item())}
