"""How long Python's garbage collector stops the process, as a histogram and a warning.

A collection holds the GIL from start to end: the event loop sends no heartbeat and
reads no message meanwhile. Once, answered write batches kept alive for seconds made
young collections take 10-36 ms and a middle one 117 ms, enough for an election at a
100 ms election timeout (docs/performance.md); this is what shows such a pause to an
operator: ``liferaft_gc_pause_seconds`` and a ``gc_pause`` warning for any pause of at
least ``warn_s``.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from liferaft.observability.logs import event

log = logging.getLogger("liferaft.node")


class GcWatch:
    """``gc.callbacks`` entry; ``install()`` adds it, ``remove()`` takes it out."""

    def __init__(self, histogram: Any, *, warn_s: float) -> None:
        self._histogram = histogram  # observes seconds (prometheus_client Histogram)
        self._warn_s = warn_s
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        seconds = time.perf_counter() - self._started
        self._histogram.observe(seconds)
        if seconds >= self._warn_s:
            event(
                log,
                "gc_pause",
                level=logging.WARNING,
                generation=info.get("generation"),
                ms=round(seconds * 1000, 1),
                collected=info.get("collected"),
            )

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)
