"""The garbage-collection watch: every collection is timed into the histogram, and one
at least as long as the threshold is logged as a ``gc_pause`` warning."""

from __future__ import annotations

import gc
import logging

import pytest

from liferaft.observability.gcwatch import GcWatch
from liferaft.observability.metrics import NodeMetrics


def _count(metrics: NodeMetrics) -> float:
    value = metrics.registry.get_sample_value("liferaft_gc_pause_seconds_count")
    return value or 0.0


def test_each_collection_is_timed_and_a_long_one_is_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = NodeMetrics("n1")
    watch = GcWatch(metrics.gc_pause, warn_s=0.0)  # every pause counts as long
    watch.install()
    try:
        with caplog.at_level(logging.WARNING, logger="liferaft.node"):
            before = _count(metrics)
            gc.collect()
            assert _count(metrics) >= before + 1
    finally:
        watch.remove()
    pauses = [r for r in caplog.records if r.getMessage() == "gc_pause"]
    assert pauses


def test_a_short_pause_is_timed_but_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    metrics = NodeMetrics("n1")
    watch = GcWatch(metrics.gc_pause, warn_s=3600.0)
    watch.install()
    try:
        with caplog.at_level(logging.WARNING, logger="liferaft.node"):
            gc.collect(0)
    finally:
        watch.remove()
    assert _count(metrics) >= 1
    assert not [r for r in caplog.records if r.getMessage() == "gc_pause"]
    assert watch not in gc.callbacks
