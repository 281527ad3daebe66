"""Optimizer pieces of the training loop: the learning-rate schedule, weight-decay groups, the FP16 loss
scaler and AdamW with BF16 moments."""
from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn as nn


class Schedule(Protocol):
    """What the schedule reads from a train config."""
    lr: float
    min_lr: float
    warmup: int
    steps: int


def lr_at(cfg: Schedule, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup over `warmup` steps, then cosine decay
    from lr to min_lr at the last step."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - 1 - cfg.warmup)  # the last step run is steps - 1: it gets min_lr
    t = min(1.0, (step - cfg.warmup) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


class DynamicLossScaler:
    """FP16 loss scaling: multiply the loss by `scale`; on non-finite grads back off and skip the step;
    after `growth_interval` clean steps in a row multiply the scale by `growth_factor`.

    Written here rather than using ``torch.amp.GradScaler`` so that one device-side finiteness flag drives both
    the scaler and the project's skipped-step accounting (and the fused optimizer's ``found_inf``), and so that
    its state is two plain tensors in ``state.pt``.
    """

    def __init__(self, init_scale: float = 65536.0, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, device="cpu", min_scale: float = 2.0 ** -24,
                 max_scale: float = 2.0 ** 24):
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval, self.min_scale, self.max_scale = growth_interval, min_scale, max_scale
        self.scale = torch.tensor(float(init_scale), dtype=torch.float32, device=device)
        self.tracker = torch.zeros((), dtype=torch.int64, device=device)

    def update(self, ok: torch.Tensor) -> None:
        grown = self.tracker + 1 >= self.growth_interval
        new = torch.where(ok, torch.where(grown, self.scale * self.growth_factor, self.scale),
                          self.scale * self.backoff_factor)
        self.scale = new.clamp(self.min_scale, self.max_scale)
        self.tracker = torch.where(ok & ~grown, self.tracker + 1, torch.zeros_like(self.tracker))

    def state_dict(self) -> dict:
        return {"scale": self.scale.detach().cpu(), "tracker": self.tracker.detach().cpu()}

    def load_state_dict(self, sd: dict) -> None:
        self.scale = sd["scale"].to(self.scale.device)
        self.tracker = sd["tracker"].to(self.tracker.device)


class AdamWBF16States(torch.optim.Optimizer):
    """AdamW whose moments are stored in BF16 (as DeepSeek-V3 does) and updated in FP32.

    torch's AdamW keeps its moments in the parameter's dtype (FP32 here), so halving optimizer memory needs
    this small variant: each step upcasts the moments, updates them and the FP32 weights in FP32, and rounds
    the moments back to BF16 (round-to-nearest).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)  # casts the moments to the parameters' dtype (FP32): undo that
        for st in self.state.values():
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    st[k] = st[k].to(torch.bfloat16)  # exact: the saved values were BF16

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                st["step"] += 1
                t = float(st["step"])
                g = p.grad.float()
                m = st["exp_avg"].float().lerp_(g, 1 - b1)
                v = st["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                if wd:
                    p.mul_(1 - lr * wd)
                denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
                st["exp_avg"].copy_(m)
                st["exp_avg_sq"].copy_(v)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices of linear layers only; none on norms, embeddings and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.startswith("embeddings.") or name.endswith(".bias"):  # norms and biases are 1-D
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
