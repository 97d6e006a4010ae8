"""Dynamic batching: per model version, queue requests, form batches, run them, split the results back."""

from __future__ import annotations

from tensorgate.server.batching.batcher import (
    Array,
    Batcher,
    BatchInfo,
    BatchObserver,
    RequestTimes,
    RunBatch,
    current_batch,
)
from tensorgate.server.batching.clock import Clock, FakeClock, MonotonicClock
from tensorgate.server.batching.settings import BatcherSettings

__all__ = [
    "Array",
    "BatchInfo",
    "BatchObserver",
    "Batcher",
    "BatcherSettings",
    "Clock",
    "FakeClock",
    "MonotonicClock",
    "RequestTimes",
    "RunBatch",
    "current_batch",
]
