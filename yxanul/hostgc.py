"""Python's garbage collector around a training loop.

A compiled model leaves hundreds of thousands of long-lived Python objects behind (graphs, guards, generated
code). Every full (generation 2) collection walks all of them, on the host, while the GPU waits for the next
CUDA-graph replay; how often one falls inside the timed steps depends on what the process allocated before, so
the same step can measure differently in two processes. ``settle`` collects once after warm-up and freezes
everything alive then (``gc.freeze``): later collections only walk objects allocated since. :class:`GcWatch`
counts the collections and their host time inside a window, so a benchmark can report them.
"""
from __future__ import annotations

import gc
import time

HOST_GC_MODES = ("freeze", "default")


def settle(mode: str = "freeze") -> None:
    """After compilation and warm-up: with ``"freeze"``, collect once and move every surviving object out of
    the collector's reach (``gc.freeze``); ``"default"`` leaves the collector as it is."""
    if mode not in HOST_GC_MODES:
        raise ValueError(f"host GC mode must be one of {', '.join(HOST_GC_MODES)}, got {mode!r}")
    if mode == "freeze":
        gc.collect()
        gc.freeze()


def release() -> None:
    """Undo :func:`settle` (the frozen objects become collectable again), e.g. before building another model."""
    gc.unfreeze()


class GcWatch:
    """Context manager: the number of collections per generation and their total host time while active."""

    def __init__(self):
        self.counts = [0, 0, 0]
        self.seconds = 0.0
        self._t0 = None

    def _callback(self, phase, info):
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self.counts[info.get("generation", 0)] += 1
            self._t0 = None

    def __enter__(self) -> "GcWatch":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self, steps: int) -> dict:
        """``gc_ms_per_step`` and ``gc_collections`` (per generation) of the window, for ``steps`` steps."""
        return {"gc_ms_per_step": round(self.seconds * 1000 / max(steps, 1), 3), "gc_collections": list(self.counts)}
