"""The dynamic batcher: one per model version. It queues requests, forms batches, runs them, splits results.

How it works, in brief:

- Queue: one dict per priority level, mapping a *shape key* (every input's name, dtype and non-batch shape)
  to a FIFO group of requests. Only requests of one key can share a batch, so forming a batch never scans
  requests of other shapes; each group keeps a running count of its queued rows, so deciding whether a batch
  is ready costs O(levels x shapes), not O(queue).
- Workers: one task per engine instance. Idle workers take turns (a lock) to form the next batch, so a batch
  is only formed when an instance is free, and the queue keeps growing while every instance is busy.
- Waits: the forming worker waits on an `asyncio.Event` that `submit` sets, with a timed wait on the
  injected clock for the oldest candidate's `arrival + max_queue_delay`. No loop ever polls.
- Deadlines: one reaper task sleeps on the clock until the earliest queued deadline (a lazy heap) and fails
  expired requests at once with `DeadlineExceededError`; batch forming also drops expired requests, so none
  reaches the engine.
- Cancellation: `submit` catches the caller's cancellation and takes its request out of the queue
  (O(1): the request is marked dead, counts are updated, its queue slot is skipped later).
- Removal is lazy: dead requests stay in their group's deque until they reach its head or a batch skips them.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from tensorgate.engines.base import EngineInputError
from tensorgate.server.batching.clock import Clock, MonotonicClock
from tensorgate.server.batching.settings import BatcherSettings
from tensorgate.server.errors import (
    DeadlineExceededError,
    EngineFailedError,
    InvalidInputError,
    ResourceExhaustedError,
    TensorgateError,
    UnavailableError,
)

__all__ = [
    "Array",
    "BatchInfo",
    "BatchObserver",
    "Batcher",
    "BatcherSettings",
    "RequestTimes",
    "RunBatch",
    "current_batch",
]

Array = npt.NDArray[Any]
RunBatch = Callable[[int, dict[str, Array]], Awaitable[Mapping[str, Array]]]
"""Runs one batch: `(instance, batched inputs) -> outputs`, each output with the batch's rows on dim 0."""

# Request states. Plain ints: compared on every queue operation.
_QUEUED: Final = 0
_RUNNING: Final = 1
_DONE: Final = 2  # cancelled, expired or failed while queued

# Batcher states.
_NEW: Final = 0
_STARTED: Final = 1
_DRAINING: Final = 2
_STOPPED: Final = 3

_Key = tuple[tuple[str, np.dtype[Any], tuple[int, ...]], ...] | None


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """The batch `run_batch` is running, for telemetry (e.g. a batch span linking its members' spans)."""

    instance: int
    rows: int
    request_ids: tuple[str, ...]
    tags: tuple[object, ...]
    """Each member's `submit(tag=...)`, in batch order."""


@dataclass(slots=True)
class RequestTimes:
    """Where one request's time went, filled in by `submit(times=...)` once its batch has run (clock seconds)."""

    queued: float = 0.0
    """From `submit` to its batch starting."""
    infer: float = 0.0
    """Its batch in `run_batch`."""


class BatchObserver(Protocol):
    """Told about every batch that ran successfully (e.g. to keep statistics). Called on the event loop."""

    def batch_ran(self, rows: int, requests: int, queued: float, gather: float, infer: float, scatter: float) -> None:
        """`queued`: seconds the requests waited in the queue, summed over them; `gather`, `infer`, `scatter`:
        seconds spent concatenating the inputs, in `run_batch`, and splitting the outputs (clock seconds)."""
        ...


# (instance, rows, members): BatchInfo is only built when asked for, off the hot path.
_current_batch: ContextVar[tuple[int, int, list[_Request]] | None] = ContextVar("tensorgate_batch", default=None)


def current_batch() -> BatchInfo | None:
    """The batch being run, when called from inside `run_batch` (in the worker's context); else None."""
    running = _current_batch.get()
    if running is None:
        return None
    instance, rows, batch = running
    return BatchInfo(
        instance, rows, tuple(request.request_id for request in batch), tuple(request.tag for request in batch)
    )


class _Group:
    """The queued requests of one priority level that share a shape key, oldest first."""

    __slots__ = ("key", "requests", "rows")

    def __init__(self, key: _Key) -> None:
        self.key = key
        self.requests: deque[_Request] = deque()
        self.rows = 0  # rows of the requests still queued (dead ones excluded)


class _Request:
    __slots__ = (
        "arrival",
        "deadline",
        "future",
        "group",
        "inputs",
        "request_id",
        "rows",
        "seq",
        "state",
        "tag",
        "times",
    )

    def __init__(
        self,
        inputs: dict[str, Array],
        rows: int,
        group: _Group,
        seq: int,
        arrival: float,
        deadline: float | None,
        future: asyncio.Future[dict[str, Array]],
        request_id: str,
        tag: object,
        times: RequestTimes | None = None,
    ) -> None:
        self.inputs = inputs
        self.rows = rows
        self.group = group
        self.seq = seq
        self.arrival = arrival
        self.deadline = deadline
        self.future = future
        self.request_id = request_id
        self.tag = tag
        self.times = times
        self.state = _QUEUED


class _BadOutputError(Exception):
    """The engine returned outputs that cannot be split back into the batch's requests."""


class Batcher:
    """Dynamic batcher for one model version.

    `submit` queues a request and returns its own rows of the outputs; batches run on `settings.instances`
    workers through `run_batch`. Errors: `ResourceExhaustedError` (queue full), `DeadlineExceededError`
    (deadline passed while queued), `UnavailableError` (not started, stopping or stopped),
    `InvalidInputError` (bad priority or rows), `EngineFailedError` (its batch failed; has the request id).

    Results are *views*: each caller gets `output[start:stop]` of the batch's outputs, no copy. The response
    encoder copies the bytes out anyway, so a copy here would be a second one, and a dim-0 slice of a
    C-contiguous output is itself C-contiguous. The cost: a result keeps the whole batch output alive until
    every member has dropped its result (about the time it takes to encode the responses).

    Contract for `run_batch`: it must not modify its inputs (a batch of one request gets the caller's own
    dict and arrays, uncopied), and must return arrays it will not reuse, because results alias them (an
    engine with reusable host buffers copies out of them).
    """

    def __init__(
        self,
        run_batch: RunBatch,
        settings: BatcherSettings,
        *,
        clock: Clock | None = None,
        name: str = "",
        observer: BatchObserver | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._observer = observer
        self._settings = settings
        self._clock: Clock = clock if clock is not None else MonotonicClock()
        self._name = name
        self._label = f"model {name}" if name else "batcher"
        self._batched = settings.max_batch_size > 0
        self._limit = settings.max_batch_size if self._batched else 1
        self._target = settings.target_batch_size if self._batched else 1
        self._preferred = frozenset(settings.preferred_batch_sizes)
        self._levels: list[dict[_Key, _Group]] = [{} for _ in range(settings.priority_levels)]
        self._queued = 0
        self._in_flight = 0
        self._seq = itertools.count()
        self._changed = asyncio.Event()  # set by submit and the reaper: the queue changed
        self._form_lock = asyncio.Lock()  # the idle worker holding it forms the next batch
        self._deadlines: list[tuple[float, int, _Request]] = []  # heap; stale entries dropped lazily
        self._reaper_wake = asyncio.Event()
        self._state = _NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._reaper: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        """The name given at construction (used in error messages)."""
        return self._name

    @property
    def settings(self) -> BatcherSettings:
        """The settings this batcher runs with."""
        return self._settings

    @property
    def queue_depth(self) -> int:
        """Requests waiting in the queue (not yet in a batch)."""
        return self._queued

    @property
    def in_flight(self) -> int:
        """Requests in batches that are running now."""
        return self._in_flight

    async def start(self) -> None:
        """Start one worker per engine instance (and the deadline reaper). Call once."""
        if self._state != _NEW:
            raise RuntimeError(f"{self._label}: start() may be called once, before stop()")
        self._loop = loop = asyncio.get_running_loop()
        self._state = _STARTED
        self._workers = [
            loop.create_task(self._work(i), name=f"{self._label} instance {i}") for i in range(self._settings.instances)
        ]
        self._reaper = loop.create_task(self._reap(), name=f"{self._label} deadlines")

    async def stop(self, *, drain: bool = True) -> None:
        """Refuse new work, then wait for the workers to finish; safe to call again.

        `drain=True` runs everything already queued first; `drain=False` fails queued requests with
        `UnavailableError` and waits only for running batches. If `stop` itself is cancelled (a grace period
        ran out), running batches are cancelled and every queued or running request gets `UnavailableError`.
        On return no task of the batcher is left.
        """
        if self._state == _NEW:
            self._state = _STOPPED
            return
        if self._state == _STARTED:
            self._state = _DRAINING
        if not drain:
            self._fail_queued("stopped before the request ran")
        self._changed.set()  # a forming worker dispatches at once (or exits) instead of waiting out a delay
        try:
            await asyncio.gather(*self._workers)  # cancelling stop cancels them (gather propagates)
        except asyncio.CancelledError:
            self._fail_queued("stopped before the request ran")
            raise
        finally:
            self._state = _STOPPED
            self._reaper_wake.set()
            if self._reaper is not None:
                if not self._reaper.done():
                    self._reaper.cancel()
                await asyncio.gather(self._reaper, return_exceptions=True)

    async def __aenter__(self) -> Batcher:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def submit(
        self,
        inputs: dict[str, Array],
        *,
        deadline: float | None = None,
        priority: int = 0,
        request_id: str = "",
        tag: object = None,
        times: RequestTimes | None = None,
    ) -> dict[str, Array]:
        """Queue one request and return its outputs (its own rows only, as views; see the class docstring).

        `deadline` is absolute on the batcher's clock. `priority` 0 means `default_priority`. `tag` is opaque,
        handed to `run_batch` through `current_batch()` (e.g. the request's trace context). `times`, when given,
        is filled in before the result is returned. With
        `max_batch_size > 0`, every input must have the same dim-0 size (the request's rows).
        """
        if self._state != _STARTED:
            why = "is not started" if self._state == _NEW else "is stopping"
            raise UnavailableError(f"{self._label} {why}; the request was not queued")
        settings = self._settings
        if priority == 0:
            priority = settings.default_priority
        elif not 1 <= priority <= settings.priority_levels:
            raise InvalidInputError(
                f"{self._label}: priority {priority} is outside 1..{settings.priority_levels} (0 = default)"
            )
        if self._queued >= settings.max_queue_size:
            raise ResourceExhaustedError(
                f"{self._label}: queue full ({self._queued} requests waiting, the limit is "
                f"max_queue_size={settings.max_queue_size})"
            )
        key, rows = self._batch_key(inputs) if self._batched else (None, 1)
        now = self._clock.now()
        if deadline is None and settings.default_timeout is not None:
            deadline = now + settings.default_timeout
        if deadline is not None and deadline <= now:
            raise DeadlineExceededError(f"{self._label}: the deadline passed before the request was queued")

        level = self._levels[priority - 1]
        group = level.get(key)
        if group is None:
            group = level[key] = _Group(key)
        assert self._loop is not None
        future: asyncio.Future[dict[str, Array]] = self._loop.create_future()
        request = _Request(inputs, rows, group, next(self._seq), now, deadline, future, request_id, tag, times)
        group.requests.append(request)
        group.rows += rows
        self._queued += 1
        if deadline is not None:
            self._watch_deadline(request, deadline)
        self._changed.set()
        try:
            return await future
        except asyncio.CancelledError:
            # The caller gave up (its task was cancelled, which cancelled the future). If the request is still
            # queued, take it out now so it frees its queue slot and never reaches the engine.
            if request.state == _QUEUED:
                self._unqueue(request)
            raise

    # -- queue ---------------------------------------------------------------------------------------------

    def _batch_key(self, inputs: dict[str, Array]) -> tuple[_Key, int]:
        """The request's shape key and rows. Sorted by name: input order never splits compatible requests."""
        rows = -1
        first = ""
        parts = []
        for name in sorted(inputs):
            shape = inputs[name].shape
            if not shape:
                raise InvalidInputError(f"{self._label}: input {name!r} is a scalar; it needs a dim 0")
            if rows < 0:
                rows, first = shape[0], name
            elif shape[0] != rows:
                raise InvalidInputError(
                    f"{self._label}: input {name!r} has {shape[0]} rows but input {first!r} has {rows}; "
                    "every input of a request needs the same batch size"
                )
            parts.append((name, inputs[name].dtype, shape[1:]))
        if rows < 0:
            raise InvalidInputError(f"{self._label}: the request has no inputs")
        if not 1 <= rows <= self._limit:
            raise InvalidInputError(
                f"{self._label}: the request has {rows} rows; allowed 1..max_batch_size={self._limit}"
            )
        return tuple(parts), rows

    def _watch_deadline(self, request: _Request, deadline: float) -> None:
        heap = self._deadlines
        if len(heap) > 2 * self._queued + 64:
            # Entries of requests that already left the queue pile up; drop them (amortised O(1) per push).
            heap[:] = [entry for entry in heap if entry[2].state == _QUEUED]
            heapq.heapify(heap)
        wake = not heap or deadline < heap[0][0]
        heapq.heappush(heap, (deadline, request.seq, request))
        if wake:  # only a new earliest deadline changes when the reaper must wake
            self._reaper_wake.set()

    def _unqueue(self, request: _Request) -> None:
        request.state = _DONE
        request.group.rows -= request.rows
        self._queued -= 1

    def _expire(self, request: _Request, now: float) -> None:
        self._unqueue(request)
        if not request.future.done():
            request.future.set_exception(
                DeadlineExceededError(
                    f"{self._label}: the deadline passed after {now - request.arrival:.6f}s in the queue"
                )
            )

    def _fail_queued(self, why: str) -> None:
        for level in self._levels:
            for group in level.values():
                for request in group.requests:
                    if request.state == _QUEUED:
                        self._unqueue(request)
                        if not request.future.done():
                            request.future.set_exception(UnavailableError(f"{self._label} {why}"))
            level.clear()

    def _live_head(self, group: _Group, now: float) -> _Request | None:
        """Drop dead requests at the group's head, expiring overdue ones; return the oldest live one."""
        requests = group.requests
        while requests:
            head = requests[0]
            if head.state == _QUEUED:
                if head.future.done():  # cancelled; its caller's task has not resumed yet to unqueue it
                    self._unqueue(head)
                elif head.deadline is None or head.deadline > now:
                    return head
                else:
                    self._expire(head, now)
            requests.popleft()
        return None

    def _candidate(self, now: float) -> tuple[_Key, int, float] | None:
        """The next batch's shape key, its queued rows and oldest arrival; None if nothing is queued.

        The key is that of the oldest request of the highest non-empty priority level (FIFO within a level).
        """
        for level in self._levels:
            best: _Request | None = None
            for group_key in list(level):
                head = self._live_head(level[group_key], now)
                if head is None:
                    del level[group_key]
                elif best is None or head.seq < best.seq:
                    best = head
            if best is None:
                continue
            key = best.group.key
            rows = 0
            oldest = best.arrival
            for other in self._levels:  # lower levels of the same shape join the batch if there is room
                group = other.get(key)
                if group is not None and (head := self._live_head(group, now)) is not None:
                    rows += group.rows
                    oldest = min(oldest, head.arrival)
            return key, rows, oldest
        return None

    def _take(self, key: _Key, now: float) -> list[_Request]:
        """Remove and return the next batch of `key`: FIFO by level, up to the row limit, no request split."""
        batch: list[_Request] = []
        rows = 0
        full = False
        for level in self._levels:
            group = level.get(key)
            if group is None:
                continue
            for request in group.requests:
                if request.state != _QUEUED:
                    continue
                if request.future.done():  # cancelled, and its caller's task has not resumed yet
                    self._unqueue(request)
                    continue
                if request.deadline is not None and request.deadline <= now:
                    self._expire(request, now)
                    continue
                if rows + request.rows > self._limit:
                    full = True  # it waits for the next batch; later ones too, so order is kept
                    break
                batch.append(request)
                rows += request.rows
                if rows == self._limit:
                    full = True
                    break
            if full:
                break
        if len(batch) > 1 and self._preferred and rows not in self._preferred:
            cut, cumulative = 0, 0
            for i, request in enumerate(batch, 1):
                cumulative += request.rows
                if cumulative in self._preferred:
                    cut = i
            if cut:
                del batch[cut:]
        for request in batch:
            request.state = _RUNNING
            request.group.rows -= request.rows
        self._queued -= len(batch)
        for level in self._levels:
            group = level.get(key)
            if group is not None:
                requests = group.requests
                while requests and requests[0].state != _QUEUED:
                    requests.popleft()
                if not requests:
                    del level[key]
        return batch

    # -- workers -------------------------------------------------------------------------------------------

    async def _work(self, instance: int) -> None:
        shared = self._settings.instances > 1
        while True:
            if shared:
                async with self._form_lock:
                    batch = await self._next_batch()
            else:  # a lone worker needs no turn-taking
                batch = await self._next_batch()
            if batch is None:
                return
            await self._run(instance, batch)

    async def _next_batch(self) -> list[_Request] | None:
        """Wait until a batch is due and take it; None once stopping with nothing queued."""
        clock = self._clock
        delay = self._settings.max_queue_delay
        while True:
            # Cleared before looking: a submit between here and the wait below makes the wait return at once.
            self._changed.clear()
            if not self._queued:
                if self._state != _STARTED:
                    return None
                await clock.wait(self._changed, None)
                continue
            now = clock.now()
            candidate = self._candidate(now)
            if candidate is None:
                # Every group is empty now (what was left was overdue or cancelled), so nothing is queued; saying
                # so keeps a bookkeeping slip from spinning this loop.
                self._queued = 0
                continue
            key, rows, oldest = candidate
            if self._state == _STARTED and delay > 0 and rows < self._target and now < oldest + delay:
                await clock.wait(self._changed, oldest + delay)
                continue
            batch = self._take(key, now)
            if batch:
                return batch

    async def _run(self, instance: int, batch: list[_Request]) -> None:
        count = len(batch)
        rows = batch[0].rows if count == 1 else sum(request.rows for request in batch)
        self._in_flight += count
        token = _current_batch.set((instance, rows, batch))
        now = self._clock.now
        try:
            try:
                started = now()
                if count == 1:
                    inputs = batch[0].inputs  # as given: no copy (and untouched when max_batch_size is 0)
                else:
                    inputs = {
                        name: np.concatenate([request.inputs[name] for request in batch], axis=0)
                        for name in batch[0].inputs
                    }
                gathered = now()
                outputs = await self._run_batch(instance, inputs)
                ran = now()
                results = self._scatter(batch, rows, outputs)
                scattered = now()
            except asyncio.CancelledError:
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(
                            UnavailableError(f"{self._label} stopped while the request was running")
                        )
                raise
            except Exception as exc:
                # Only this batch fails; the worker goes on with the next one.
                why = f"{type(exc).__name__}: {exc}" if not isinstance(exc, _BadOutputError) else str(exc)
                for request in batch:
                    if not request.future.done():
                        error: TensorgateError
                        if isinstance(exc, EngineInputError):  # refused before it ran: the input's fault
                            error = InvalidInputError(f"{self._label}: {exc}")
                        else:
                            error = EngineFailedError(
                                f"{self._label}: the engine failed on a batch of {rows} rows "
                                f"({count} requests) on instance {instance}: {why}",
                                request_id=request.request_id,
                            )
                        error.__cause__ = exc
                        request.future.set_exception(error)
                return
            for request, result in zip(batch, results, strict=True):
                if request.times is not None:
                    request.times.queued = started - request.arrival
                    request.times.infer = ran - gathered
                if not request.future.done():  # the caller may have been cancelled meanwhile
                    request.future.set_result(result)
            if self._observer is not None:
                queued = started * count - sum(request.arrival for request in batch)
                self._observer.batch_ran(rows, count, queued, gathered - started, ran - gathered, scattered - ran)
        finally:
            self._in_flight -= count
            _current_batch.reset(token)

    def _scatter(self, batch: list[_Request], rows: int, outputs: Mapping[str, Array]) -> list[dict[str, Array]]:
        if not self._batched:
            return [dict(outputs)]
        for name, array in outputs.items():
            shape = getattr(array, "shape", None)
            if not shape or shape[0] != rows:
                got = "no batch dimension" if not shape else f"{shape[0]} rows"
                raise _BadOutputError(f"engine output {name!r} has {got}, the batch has {rows} rows (dim 0 must match)")
        if len(batch) == 1:
            return [dict(outputs)]
        results = []
        start = 0
        for request in batch:
            stop = start + request.rows
            results.append({name: array[start:stop] for name, array in outputs.items()})
            start = stop
        return results

    # -- deadlines -----------------------------------------------------------------------------------------

    async def _reap(self) -> None:
        """Fail queued requests the moment their deadline passes, even while every instance is busy."""
        heap = self._deadlines
        clock = self._clock
        while self._state != _STOPPED:
            now = clock.now()
            expired = False
            while heap:
                deadline, _, request = heap[0]
                if request.state != _QUEUED:
                    heapq.heappop(heap)
                elif deadline <= now:
                    heapq.heappop(heap)
                    self._expire(request, now)
                    expired = True
                else:
                    break
            if expired:
                self._changed.set()  # the forming worker's oldest request may be gone
            self._reaper_wake.clear()
            await clock.wait(self._reaper_wake, heap[0][0] if heap else None)
