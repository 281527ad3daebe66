"""Training FLOPs per token and device peaks: the one definition of MFU that training and benchmarks share."""
from __future__ import annotations

import torch

# Dense BF16 tensor-core peak (FLOP/s) by device-name substring, most specific first; MFU is always relative
# to the BF16 peak, also for FP8 runs.
PEAK_BF16_FLOPS = {
    "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12, "H800": 989.4e12,
    "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12,
}


def peak_flops(device: torch.device) -> float | None:
    """BF16 peak of a CUDA device (None on CPU or an unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, v in PEAK_BF16_FLOPS.items():
        if key in name:
            return v
    return None


def flops_per_token(cfg, seq: int) -> float:
    """Training FLOPs per token: 6 x (parameters used in matmuls) + causal attention (6 x L x H x Dh x T)."""
    d, L, H, Hkv, Dh, Fh = cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_hidden
    per_layer = d * H * Dh * 2 + d * Hkv * Dh * 2 + 3 * d * Fh
    r = cfg.embed_rank or 0
    head = cfg.vocab_size * (r or d) + (d * r if r and cfg.tie_embeddings else 0)
    embed_proj = d * r if r else 0
    return 6.0 * (L * per_layer + head + embed_proj) + 6.0 * L * H * Dh * seq
