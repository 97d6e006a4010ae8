"""Dynamic batching: per model version, queue requests, form batches, run them, split the results back."""

from __future__ import annotations

from tensorgate.server.batching.batcher import (
    Array,
    Batcher,
    BatchInfo,
    RunBatch,
    current_batch,
)
from tensorgate.server.batching.clock import Clock, FakeClock, MonotonicClock
from tensorgate.server.batching.settings import BatcherSettings

__all__ = [
    "Array",
    "BatchInfo",
    "Batcher",
    "BatcherSettings",
    "Clock",
    "FakeClock",
    "MonotonicClock",
    "RunBatch",
    "current_batch",
]
