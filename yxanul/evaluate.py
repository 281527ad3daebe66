"""Validation loss per window.

The validation split is cut into fixed, non-overlapping windows of ``seq_len + 1`` tokens, numbered in order
(:meth:`yxanul.data.loader.DataLoader.val_batches` walks them). :func:`window_losses` returns the mean token
loss of each window in that order, so two models evaluated on the same loader can be compared window by window
(paired differences); their mean is the scalar validation loss the training loop logs.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F


def val_window_count(loader) -> int:
    """How many distinct windows the loader's validation split holds (0 without a split)."""
    if loader.val is None:
        return 0
    return loader.val.tokens // (loader.T + 1)


def window_index(loader, k: int) -> int:
    """The window number of the k-th loss :func:`window_losses` returns on this rank."""
    n = val_window_count(loader)
    i, j = divmod(k, loader.B)
    return ((i * loader.world_size + loader.rank) * loader.B + j) % n


class _PerWindowLoss:
    """A ``model.loss_fn`` returning one mean loss per sequence ([B]) instead of the batch mean."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, model, h, targets):
        if self.inner is not None:  # the fused head + loss returns a mean: one call per window
            return torch.stack([self.inner(model, h[b:b + 1], targets[b:b + 1]).float() for b in range(h.shape[0])])
        logits = model.logits(h).float()
        tok = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-1, reduction="none")
        valid = (targets != -1).float()
        return (tok * valid).sum(1) / valid.sum(1)


@contextlib.contextmanager
def _per_window_loss(model):
    had = "loss_fn" in vars(model)
    inner = getattr(model, "loss_fn", None)
    model.loss_fn = _PerWindowLoss(inner)
    try:
        yield
    finally:
        if had:
            model.loss_fn = inner
        else:
            del model.loss_fn


@torch.no_grad()
def window_losses(model, loader, windows: int | None = None, autocast: Callable | None = None,
                  before_forward: Callable | None = None) -> torch.Tensor:
    """The loss of each of this rank's first `windows` validation windows (default: every window once), as a
    float64 CPU tensor in window order (see :func:`window_index`; one process: window k is the k-th entry).
    At most as many windows as the split holds are evaluated (a larger `windows` asks for the split once: repeating
    windows adds time, not information).

    `model` is a :class:`yxanul.model.Yxanul` (or a module wrapping one in place, such as FSDP2's); its own
    loss path is used (the fused cross-entropy when installed), one window at a time for the fused one.
    `autocast` returns the context each forward runs in; `before_forward` is called before each forward (CUDA
    graphs: ``torch.compiler.cudagraph_mark_step_begin``)."""
    n_total = val_window_count(loader)
    if n_total == 0:
        return torch.zeros(0, dtype=torch.float64)
    windows = n_total if windows is None else min(int(windows), n_total)
    if windows <= 0:
        return torch.zeros(0, dtype=torch.float64)
    batches = math.ceil(windows / loader.B)
    was_training = model.training
    model.eval()
    out = []
    try:
        with _per_window_loss(model):
            for x, y in loader.val_batches(batches):
                if before_forward is not None:
                    before_forward()
                with (autocast() if autocast is not None else contextlib.nullcontext()):
                    out.append(model(x, y).double())  # on the device: one sync at the end
    finally:
        model.train(was_training)
    return torch.cat(out)[:windows].cpu()
