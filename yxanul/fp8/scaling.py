"""Delayed (history-based) per-tensor scaling, in Transformer Engine's vocabulary.

Each FP8 linear keeps, for its three GEMM operands (``x``, ``w``, ``dy``):

``amax_history`` ``[amax_history_len, 3]``  row 0 is the step in progress (max over its micro-batches),
                                              rows 1.. are the previous optimizer steps, newest first
``scale_inv``    ``[3]``                     the dequantization scale used now: ``x ~= q * scale_inv``
``scale_ready``  ``[3]``                     1 once a scale has been computed from a recorded history

At every optimizer step (:func:`advance`):

1. ``amax = max(history)`` (``amax_compute_algo: max``) or ``history[0]`` (``most_recent``);
2. ``scale_inv = amax / (FMT_MAX / 2**margin)`` where that amax is positive (a tensor that was all zeros keeps
   its previous scale);
3. the history rolls by one row and row 0 starts empty.

So the scale used during step t comes from steps t-1, t-2, ... (it is "delayed"). Until a scale exists
(the very first step), and during the recipe's ``calibration_steps`` while the history fills, the operand is
scaled by its current amax instead (current per-tensor scaling), so those steps are never clipped.
All updates are tensor ops on the buffers' device: no host synchronization. Once every operand of a layer has
a scale, ``fp8_step`` (one host sync, normally once) switches the layer to casting with ``scale_inv`` alone:
the cast then no longer depends on the current amax (still recorded for the history), which lets a compiler
fuse it into the kernel that produces the operand. That is where delayed scaling's speed comes from.
"""
from __future__ import annotations

import torch

from .formats import pow2_ceil

SLOTS = ("x", "w", "dy")


@torch.no_grad()
def record_amax(history: torch.Tensor, slot: int, amax: torch.Tensor) -> None:
    """Fold this micro-batch's amax into the current row (max over micro-batches)."""
    cur = history[0, slot]
    cur.copy_(torch.maximum(cur, amax.detach().float().reshape(())))


def _history_amax(history: torch.Tensor, algo: str) -> torch.Tensor:
    """The amax each operand's scale is computed from; ``history`` is ``[..., L, 3]``."""
    return history.amax(dim=-2) if algo == "max" else history[..., 0, :]


def _advanced(history, scale_inv, ready, algo, fmt_max, margin, pow2):
    """(history, scale_inv, ready) after one optimizer step, for ``[..., L, 3]`` histories (one layer or a
    stack of layers): new scales where the history's amax is positive, then the history rolled by one row.
    A non-finite entry (a NaN/Inf operand: the layer's flag records it, see ``fp8_step``) counts as no value:
    it would otherwise turn the scale into Inf or NaN, and every cast after it into NaN, for a whole window."""
    history = torch.nan_to_num(history, nan=0.0, posinf=0.0, neginf=0.0)
    amax = _history_amax(history, algo)
    new = amax / (fmt_max / (2.0 ** margin))
    if pow2:
        new = pow2_ceil(new.clamp_min(1e-30))
    has = amax > 0
    rolled = torch.roll(history, 1, dims=-2)
    rolled[..., 0, :] = 0
    return rolled, torch.where(has, new, scale_inv), torch.where(has, torch.ones_like(ready), ready)


@torch.no_grad()
def advance(history: torch.Tensor, scale_inv: torch.Tensor, ready: torch.Tensor, algo: str,
            fmt_max: torch.Tensor, margin: int, pow2: bool = False) -> None:
    """End of an optimizer step: new scales from the history, then roll the history (in place)."""
    h, s, r = _advanced(history, scale_inv, ready, algo, fmt_max, margin, pow2)
    scale_inv.copy_(s)
    ready.copy_(r)
    history.copy_(h)


def current_scale(amax_now: torch.Tensor, fmt_max: float, margin: int, pow2: bool = False) -> torch.Tensor:
    """The scale from the current amax (current per-tensor scaling): the calibration steps and a first step.
    With margin 0 it is the tensorwise recipe's scale (rounded up to a power of two with ``pow2``, as the
    history's scales are)."""
    s = amax_now.float().clamp_min(1e-12) / (fmt_max / (2.0 ** margin))
    return pow2_ceil(s) if pow2 else s


def current_or_delayed(amax_now: torch.Tensor, scale_inv: torch.Tensor, ready: torch.Tensor, fmt_max: float,
                       margin: int, pow2: bool = False) -> torch.Tensor:
    """The scale to use now for one operand: the delayed one if ready, else from the current amax."""
    return torch.where(ready > 0, scale_inv, current_scale(amax_now, fmt_max, margin, pow2))


@torch.no_grad()
def advance_many(histories: list[torch.Tensor], scale_invs: list[torch.Tensor], readies: list[torch.Tensor],
                 algo: str, fmt_max: torch.Tensor, margin: int, pow2: bool = False) -> None:
    """:func:`advance` for many layers with the same recipe at once: a fixed number of kernel launches (stack,
    compute, multi-tensor copy back) instead of about twenty per layer, which for a 28-layer model kept the
    GPU waiting on the host for tens of milliseconds per step."""
    if not histories:
        return
    h, s, r = _advanced(torch.stack(histories), torch.stack(scale_invs), torch.stack(readies), algo, fmt_max,
                        margin, pow2)
    torch._foreach_copy_(scale_invs, list(s.unbind(0)))
    torch._foreach_copy_(readies, list(r.unbind(0)))
    torch._foreach_copy_(histories, list(h.unbind(0)))
