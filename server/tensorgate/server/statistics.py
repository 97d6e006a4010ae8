"""Per model-version inference statistics: counts and cumulative durations, with Triton's meanings.

One `VersionStatistics` lives with each loaded model version. Two places feed it, each with a few integer
additions per call and nothing else:

- `InferenceService.infer` records every request that reached the version: `request_succeeded` or
  `request_failed` with its duration (routing, checks, queue, batch and scatter).
- The version's batcher reports each batch it ran (`batch_ran`, the batcher's `BatchObserver`): the batch's
  rows and requests, the time its requests waited in the queue, and the time spent gathering the inputs
  (concatenation), running the engine, and scattering the outputs.

The Open Inference Protocol's ModelStatistics RPC reads them (`snapshot`). As in Triton, per-request figures
(`queue`, `compute_*`) count each request of a batch once and charge it the whole batch's compute time, while
`batch_sizes` counts executions per batch size; `inference_count` counts rows, `execution_count` batches.
Only the event loop thread touches these objects, so they need no lock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

__all__ = ["BatchSizeStatistics", "Duration", "StatisticsSnapshot", "VersionStatistics"]

_NS = 1_000_000_000


@dataclass(slots=True)
class Duration:
    """A count of events and their cumulative duration in nanoseconds."""

    count: int = 0
    ns: int = 0

    def copy(self) -> Duration:
        """An independent copy."""
        return Duration(self.count, self.ns)


@dataclass(slots=True)
class BatchSizeStatistics:
    """Executions of one batch size: each a count of batches and their cumulative durations."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(frozen=True, slots=True)
class StatisticsSnapshot:
    """A consistent copy of one version's statistics at one moment."""

    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    inference_count: int
    execution_count: int
    #: Milliseconds since the Unix epoch of the last batch that ran; 0 before the first.
    last_inference_ms: int
    #: By batch size (rows), ascending.
    batch_sizes: tuple[tuple[int, BatchSizeStatistics], ...]


class VersionStatistics:
    """Cumulative statistics of one model version (see the module docstring)."""

    __slots__ = (
        "_batch_sizes",
        "_compute_infer",
        "_compute_input",
        "_compute_output",
        "_execution_count",
        "_fail",
        "_inference_count",
        "_last_inference_ms",
        "_queue",
        "_success",
    )

    def __init__(self) -> None:
        self._success = Duration()
        self._fail = Duration()
        self._queue = Duration()
        self._compute_input = Duration()
        self._compute_infer = Duration()
        self._compute_output = Duration()
        self._inference_count = 0
        self._execution_count = 0
        self._last_inference_ms = 0
        self._batch_sizes: dict[int, BatchSizeStatistics] = {}

    def request_succeeded(self, duration_ns: int) -> None:
        """A request got its outputs after `duration_ns`."""
        success = self._success
        success.count += 1
        success.ns += duration_ns

    def request_failed(self, duration_ns: int) -> None:
        """A request that reached this version failed after `duration_ns`."""
        fail = self._fail
        fail.count += 1
        fail.ns += duration_ns

    def batch_ran(self, rows: int, requests: int, queued: float, gather: float, infer: float, scatter: float) -> None:
        """A batch of `rows` rows from `requests` requests ran: the batcher's `BatchObserver` hook.

        `queued` is the seconds its requests waited in the queue, summed over them; `gather`, `infer` and
        `scatter` are the seconds the batch spent concatenating inputs, in the engine, and splitting outputs.
        """
        gather_ns, infer_ns, scatter_ns = int(gather * _NS), int(infer * _NS), int(scatter * _NS)
        self._queue.count += requests
        self._queue.ns += int(queued * _NS)
        self._compute_input.count += requests
        self._compute_input.ns += requests * gather_ns
        self._compute_infer.count += requests
        self._compute_infer.ns += requests * infer_ns
        self._compute_output.count += requests
        self._compute_output.ns += requests * scatter_ns
        self._inference_count += rows
        self._execution_count += 1
        self._last_inference_ms = time.time_ns() // 1_000_000
        size = self._batch_sizes.get(rows)
        if size is None:
            size = self._batch_sizes[rows] = BatchSizeStatistics()
        size.compute_input.count += 1
        size.compute_input.ns += gather_ns
        size.compute_infer.count += 1
        size.compute_infer.ns += infer_ns
        size.compute_output.count += 1
        size.compute_output.ns += scatter_ns

    def snapshot(self) -> StatisticsSnapshot:
        """A copy of every figure, safe to keep while recording goes on."""
        return StatisticsSnapshot(
            success=self._success.copy(),
            fail=self._fail.copy(),
            queue=self._queue.copy(),
            compute_input=self._compute_input.copy(),
            compute_infer=self._compute_infer.copy(),
            compute_output=self._compute_output.copy(),
            inference_count=self._inference_count,
            execution_count=self._execution_count,
            last_inference_ms=self._last_inference_ms,
            batch_sizes=tuple(
                (
                    rows,
                    BatchSizeStatistics(
                        size.compute_input.copy(), size.compute_infer.copy(), size.compute_output.copy()
                    ),
                )
                for rows, size in sorted(self._batch_sizes.items())
            ),
        )
