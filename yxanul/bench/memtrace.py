"""Which tensors are alive at a step's memory peak, from the CUDA caching allocator's trace.

``torch.cuda.memory._record_memory_history`` records every allocation and free with its Python stack;
:func:`peak_live` replays one device's trace and returns the allocations alive when the traced bytes peaked,
largest first, each with the frames that made it. A compiled model's buffers are named by the line of
inductor's generated code that allocated them (``buf3 = empty_strided_cuda((32768, 200005), ...)``), so the
peak reads as a list of graph buffers. :func:`record_step` runs a callable under the recorder.
"""
from __future__ import annotations

import linecache

_FREE = ("free_requested", "free_completed")


def peak_live(events: list[dict], min_bytes: int = 1 << 28, frames: int = 4) -> dict:
    """Replay allocator `events` (a device trace of ``torch.cuda.memory._snapshot()``): ``{"peak_bytes": the
    most bytes allocated at once, counted from the start of the trace (add what was allocated before recording
    for the absolute peak), "at_event": its index, "live": [{"bytes", "frames": [...]}, ...]}``, the
    allocations of the trace alive at the peak of at least `min_bytes`, largest first, each with its first
    `frames` frames as ``file:line name | source line``. A block counts as freed at its first free event
    (requested or completed); freeing a block allocated before recording lowers the count by its size."""
    live: dict[int, dict] = {}
    gone: set = set()   # blocks from before recording, already freed (their completed free is not counted again)
    total = peak = 0
    at, snapshot = -1, {}
    for i, ev in enumerate(events):
        action, addr = ev.get("action"), ev.get("addr")
        if action == "alloc":
            live[addr] = ev
            gone.discard(addr)
            total += int(ev.get("size", 0))
            if total > peak:
                peak, at, snapshot = total, i, dict(live)
        elif action in _FREE:
            if addr in live:
                total -= int(live.pop(addr).get("size", 0))
                gone.add(addr)
            elif addr not in gone:
                total -= int(ev.get("size", 0))
                gone.add(addr)
    blocks = sorted((ev for ev in snapshot.values() if int(ev.get("size", 0)) >= min_bytes),
                    key=lambda ev: -int(ev.get("size", 0)))
    return {"peak_bytes": peak, "at_event": at,
            "live": [{"bytes": int(ev["size"]), "frames": [_frame(f) for f in (ev.get("frames") or [])[:frames]]}
                     for ev in blocks]}


def _frame(f: dict) -> str:
    name, line = f.get("filename", "?"), int(f.get("line", 0) or 0)
    src = linecache.getline(name, line).strip() if line else ""
    return f"{name}:{line} {f.get('name', '?')}" + (f" | {src[:160]}" if src else "")


def record_step(fn, device=None, max_entries: int = 200_000) -> list[dict]:
    """Run ``fn()`` with the allocator's history recorded (Python stacks) and return the device's trace events;
    recording is switched off afterwards whatever happens."""
    import torch
    torch.cuda.synchronize(device)
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python",
                                             max_entries=max_entries)
    try:
        fn()
        torch.cuda.synchronize(device)
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    idx = torch.cuda.current_device() if device is None else torch.device(device).index or 0
    traces = snap.get("device_traces") or []
    return list(traces[idx]) if idx < len(traces) else []
