"""The dynamic batcher's rules, one test (or a few) per rule, on a fake clock and a fake engine.

Nothing sleeps on the real clock: time moves only by `FakeClock.advance`, and `settle()` just lets the event
loop run what is ready.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from tensorgate.engines import EngineInputError
from tensorgate.server.batching import (
    Batcher,
    BatcherSettings,
    BatchInfo,
    FakeClock,
    MonotonicClock,
    RunBatch,
    current_batch,
)
from tensorgate.server.errors import (
    DeadlineExceededError,
    EngineFailedError,
    InvalidInputError,
    ModelConfigError,
    ResourceExhaustedError,
    UnavailableError,
)

Array = npt.NDArray[Any]
Result = dict[str, Array]


# -- fakes -------------------------------------------------------------------------------------------------


async def settle(turns: int = 30) -> None:
    """Let every ready callback and task run (yields to the loop; no clock moves)."""
    for _ in range(turns):
        await asyncio.sleep(0)


def rows_of(marker: int, rows: int, width: int = 3, dtype: type[np.generic] = np.float32) -> Array:
    """`rows` rows whose values name the request and the row: marker*1000 + row*10 + column."""
    grid = np.arange(rows)[:, None] * 10 + np.arange(width)[None, :]
    return (grid + marker * 1000).astype(dtype)


class FakeEngine:
    """A `run_batch` that records batches, can be held on a gate, can fail, and computes `y = 2 * x`."""

    def __init__(
        self,
        *,
        gated: bool = False,
        fail: Exception | None = None,
        transform: Callable[[dict[str, Array]], Mapping[str, Array]] | None = None,
    ) -> None:
        self.batches: list[tuple[int, dict[str, Array]]] = []
        self.infos: list[BatchInfo | None] = []
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()
        self.fail = fail
        self.transform = transform
        self.running = 0
        self.max_running = 0

    @property
    def sizes(self) -> list[int]:
        """Rows of each batch received, in order."""
        return [len(next(iter(inputs.values()))) for _, inputs in self.batches]

    def markers(self, index: int) -> list[int]:
        """The request markers of batch `index`, one per row."""
        return [int(row[0]) // 1000 for row in self.batches[index][1]["x"]]

    async def __call__(self, instance: int, inputs: dict[str, Array]) -> Mapping[str, Array]:
        self.batches.append((instance, inputs))
        self.infos.append(current_batch())
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await self.gate.wait()
        finally:
            self.running -= 1
        if self.fail is not None:
            fail, self.fail = self.fail, None  # fails once
            raise fail
        if self.transform is not None:
            return self.transform(inputs)
        return {"y": inputs["x"] * 2}


Make = Callable[..., Awaitable[Batcher]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def make(clock: FakeClock) -> AsyncIterator[Make]:
    """Build and start batchers on the fake clock; stop them at the end and check no task is left."""
    made: list[Batcher] = []

    async def factory(run_batch: RunBatch, **settings: Any) -> Batcher:
        settings.setdefault("max_batch_size", 8)
        batcher = Batcher(run_batch, BatcherSettings(**settings), clock=clock, name="m")
        await batcher.start()
        made.append(batcher)
        return batcher

    yield factory
    for batcher in made:
        await batcher.stop(drain=False)
    await settle()
    assert asyncio.all_tasks() == {asyncio.current_task()}


def submit(batcher: Batcher, inputs: dict[str, Array], **kwargs: Any) -> asyncio.Task[Result]:
    return asyncio.create_task(batcher.submit(inputs, **kwargs))


# -- rule 1: the delay, counted from the oldest arrival; the target; delay 0 ------------------------------


async def test_delay_is_counted_from_the_oldest_request(make: Make, clock: FakeClock) -> None:
    engine = FakeEngine()
    batcher = await make(engine, max_queue_delay=1.0)
    first = submit(batcher, {"x": rows_of(1, 1)})
    await settle()
    clock.advance(0.6)
    second = submit(batcher, {"x": rows_of(2, 1)})
    await settle()
    clock.advance(0.399)
    await settle()
    assert engine.batches == []
    clock.advance(0.001)  # 1.0 after the first arrival, 0.4 after the second
    await settle()
    assert engine.sizes == [2]
    assert (await first)["y"][0, 0] == 2000
    assert (await second)["y"][0, 0] == 4000


async def test_reaching_the_target_dispatches_at_once(make: Make) -> None:
    engine = FakeEngine()
    batcher = await make(engine, max_batch_size=4, max_queue_delay=10.0)
    tasks = [submit(batcher, {"x": rows_of(i, 1)}) for i in range(4)]
    await settle()
    assert engine.sizes == [4]
    await asyncio.gather(*tasks)


async def test_largest_preferred_size_is_the_target(make: Make) -> None:
    engine = FakeEngine()
    batcher = await make(engine, max_batch_size=8, preferred_batch_sizes=(2, 3), max_queue_delay=10.0)
    tasks = [submit(batcher, {"x": rows_of(i, 1)}) for i in range(2)]
    await settle()
    assert engine.sizes == []  # 2 rows is preferred but below the target, 3
    tasks.append(submit(batcher, {"x": rows_of(2, 1)}))
    await settle()
    assert engine.sizes == [3]
    await asyncio.gather(*tasks)


async def test_zero_delay_dispatches_whatever_is_queued(make: Make) -> None:
    engine = FakeEngine()
    batcher = await make(engine, max_batch_size=8, max_queue_delay=0.0)
    result = await batcher.submit({"x": rows_of(1, 1)})
    assert engine.sizes == [1]
    np.testing.assert_array_equal(result["y"], rows_of(1, 1) * 2)


async def test_preferred_sizes_cut_a_larger_batch(make: Make) -> None:
    engine = FakeEngine(gated=True)
    batcher = await make(engine, max_batch_size=8, preferred_batch_sizes=(2, 4))
    tasks = [submit(batcher, {"x": rows_of(0, 1)})]
    await settle()
    tasks += [submit(batcher, {"x": rows_of(i, 1)}) for i in range(1, 7)]  # 6 rows queued while busy
    await settle()
    engine.gate.set()
    await asyncio.gather(*tasks)
    assert engine.sizes == [1, 4, 2]


# -- rule 2: event-driven, no polling -------------------------------------------------------------------


async def test_waiting_batcher_does_not_poll(make: Make, clock: FakeClock) -> None:
    engine = FakeEngine()
    batcher = await make(engine, max_queue_delay=5.0)
    await settle()
    idle_waits = clock.wait_calls
    await settle(200)
    assert clock.wait_calls == idle_waits  # idle: nothing wakes up
    task = submit(batcher, {"x": rows_of(1, 1)})
    await settle()
    assert clock.next_deadline() == pytest.approx(clock.now() + 5.0)  # one timed wait, for the delay
    waits = clock.wait_calls
    await settle(200)
    assert clock.wait_calls == waits  # waiting for the delay: still nothing wakes up
    clock.advance(5.0)
    await task
    assert engine.sizes == [1]


# -- rule 3: batches form when an instance is free, and grow meanwhile ---------------------------------


async def test_batches_grow_while_every_instance_is_busy(make: Make) -> None:
    engine = FakeEngine(gated=True)
    batcher = await make(engine, max_batch_size=8, instances=1)
    first = submit(batcher, {"x": rows_of(0, 1)})
    await settle()
    rest = [submit(batcher, {"x": rows_of(i, 1)}) for i in range(1, 6)]
    await settle()
    assert engine.sizes == [1]
    assert batcher.queue_depth == 5
    assert batcher.in_flight == 1
    engine.gate.set()
    await asyncio.gather(first, *rest)
    assert engine.sizes == [1, 5]
    assert engine.markers(1) == [1, 2, 3, 4, 5]
    assert batcher.queue_depth == batcher.in_flight == 0


async def test_each_instance_runs_one_batch_at_a_time(make: Make) -> None:
    engine = FakeEngine(gated=True)
    batcher = await make(engine, max_batch_size=1, instances=2)
    tasks = [submit(batcher, {"x": rows_of(i, 1)}) for i in range(5)]
    await settle()
    assert engine.running == 2
    assert sorted(instance for instance, _ in engine.batches) == [0, 1]
    assert batcher.queue_depth == 3
    engine.gate.set()
    await asyncio.gather(*tasks)
    assert engine.max_running == 2
    assert len(engine.batches) == 5


# -- rule 4: bounded queue ------------------------------------------------------------------------------


async def test_full_queue_rejects_at_once(make: Make) -> None:
    engine = FakeEngine(gated=True)
    batcher = await make(engine, max_queue_size=2)
    running = submit(batcher, {"x": rows_of(0, 1)})
    await settle()
    queued = [submit(batcher, {"x": rows_of(i, 1)}) for i in (1, 2)]
    await settle()
    with pytest.raises(ResourceExhaustedError, match=r"queue full.*max_queue_size=2"):
        await batcher.submit({"x": rows_of(3, 1)})
    engine.gate.set()
    await asyncio.gather(running, *queued)


# -- rule 5: deadlines and cancellation -----------------------------------------------------------------


async def test_deadline_fails_promptly_while_every_instance_is_busy(make: Make, clock: FakeClock) -> None:
    engine = FakeEngine(gated=True)
    batcher = await make(engine)
    running = submit(batcher, {"x": rows_of(0, 1)})
    await settle()
    doomed = submit(batcher, {"x": rows_of(1, 1)}, deadline=clock.now() + 1.0)
    patient = submit(batcher, {"x": rows_of(2, 1)})
    await settle()
    clock.advance(1.0)
    await settle()
    assert doomed.done()  # failed by the timed wake-up, while the engine is still busy
    with pytest.raises(DeadlineExceededError):
        await doomed
    assert batcher.queue_depth == 1
    engine.gate.set()
    await asyncio.gather(running, patient)
    assert engine.sizes == [1, 1]
    assert engine.markers(1) == [2]


async def test_deadline_fails_promptly_while_waiting_for_the_delay(make: Make, clock: FakeClock) -> None:
    engine = FakeEngine()
    batcher = await make(engine, max_queue_delay=10.0)
    doomed = submit(batcher, {"x": rows_of(1, 1)}, deadline=clock.now() + 1.0)
    await settle()
    clock.advance(1.0)
    await settle()
    with pytest.raises(DeadlineExceededError):
        await doomed
    clock.advance(10.0)
    await settle()
    assert engine.batches == []


async def test_default_timeout_applies_to_requests_without_a_deadline(make: Make, clock: FakeClock) -> None:
    engine = FakeEngine(gated=True)
    batcher = await make(engine, default_timeout=2.0)
    running = submit(batcher, {"x": rows_of(0, 1)})  # in the engine: its timeout no longer applies
    await settle()
    queued = submit(batcher, {"x": rows_of(1, 1)})
    own = submit(batcher, {"x": rows_of(2, 1)}, deadline=clock.now() + 5.0)
    await settle()
    clock.advance(2.0)
    await settle()
    with pytest.raises(DeadlineExceededError):
        await queued
    assert not own.done()
    engine.gate.set()
    await asyncio.gather(running, own)
    assert [engine.markers(i) for i in range(2)] == [[0], [2]]


async def test_deadline_already_passed_is_rejected_without_queueing(make: Make, clock: FakeClock) -> None:
    engine = FakeEngine()
    batcher = await make(engine)
    with pytest.raises(DeadlineExceededError):
        await batcher.submit({"x": rows_of(1, 1)}, deadline=clock.now())
    assert batcher.queue_depth == 0
    assert engine.batches == []


async def test_expired_request_is_removed_when_a_batch_forms(clock: FakeClock) -> None:
    # With the reaper (the timed wake-up) taken away, the worker itself must drop the overdue request.
    engine = FakeEngine(gated=True)
    batcher = Batcher(engine, BatcherSettings(max_batch_size=8), clock=clock)
    await batcher.start()
    running = submit(batcher, {"x": rows_of(0, 1)})
    await settle()
    alive = submit(batcher, {"x": rows_of(2, 1)})
    doomed = submit(batcher, {"x": rows_of(1, 1)}, deadline=clock.now() + 1.0)  # behind a live request
    await settle()
    assert batcher._reaper is not None
    batcher._reaper.cancel()  # take the timed wake-up away
    await settle()
    clock.advance(1.0)
    engine.gate.set()
    await asyncio.gather(running, alive)
    with pytest.raises(DeadlineExceededError):
        await doomed
    assert engine.markers(1) == [2]
    await batcher.stop()


async def test_cancelled_caller_never_reaches_the_engine(make: Make) -> None:
    engine = FakeEngine(gated=True)
    batcher = await make(engine)
    running = submit(batcher, {"x": rows_of(0, 1)})
    await settle()
    cancelled = submit(batcher, {"x": rows_of(1, 1)})
    kept = submit(batcher, {"x": rows_of(2, 1)})
    await settle()
    cancelled.cancel()
    await settle()
    assert cancelled.cancelled()
    assert batcher.queue_depth == 1  # its slot is free at once
    engine.gate.set()
    await asyncio.gather(running, kept)
    assert engine.markers(1) == [2]


async def test_cancelled_caller_is_skipped_even_before_its_task_resumes(make: Make) -> None:
    engine = FakeEngine(gated=True)
    batcher = await make(engine)
    running = submit(batcher, {"x": rows_of(0, 1)})
    await settle()
    cancelled_head = submit(batcher, {"x": rows_of(1, 1)})
    kept = submit(batcher, {"x": rows_of(2, 1)})
    cancelled_later = submit(batcher, {"x": rows_of(3, 1)})
    await settle()
    engine.gate.set()  # the worker resumes first and forms the next batch at once...
    cancelled_head.cancel()  # ...before the cancelled callers' tasks get to run
    cancelled_later.cancel()
    await asyncio.gather(running, kept)
    assert cancelled_head.cancelled()
    assert cancelled_later.cancelled()
    assert engine.markers(1) == [2]
    assert batcher.queue_depth == 0


async def test_caller_cancelled_while_its_batch_runs(make: Make) -> None:
    engine = FakeEngine(gated=True)
    batcher = await make(engine)
    gone = submit(batcher, {"x": rows_of(0, 1)})
    await settle()
    gone.cancel()
    await settle()
    engine.gate.set()
    assert (await batcher.submit({"x": rows_of(1, 1)}))["y"][0, 0] == 2000  # the worker goes on
    assert gone.cancelled()


# -- rule 6: rows concatenated and split back; shapes never mixed; max_batch_size --------------------


async def test_multi_row_requests_get_exactly_their_rows(make: Make) -> None:
    engine = FakeEngine(gated=True)
    batcher = await make(engine, max_batch_size=8)
    first = submit(batcher, {"x": rows_of(9, 1)})
    await settle()
    tasks = [submit(batcher, {"x": rows_of(marker, rows)}) for marker, rows in ((1, 1), (2, 3), (3, 2))]
    await settle()
    engine.gate.set()
    results = await asyncio.gather(*tasks)
    await first
    assert engine.markers(1) == [1, 2, 2, 2, 3, 3]
    for (marker, rows), result in zip(((1, 1), (2, 3), (3, 2)), results, strict=True):
        assert list(result) == ["y"]
        np.testing.assert_array_equal(result["y"], rows_of(marker, rows) * 2)
    # Documented choice: results are views of the batch output, C-contiguous, disjoint.
    assert all(result["y"].flags.c_contiguous for result in results)
    assert results[1]["y"].base is results[2]["y"].base
    assert not np.shares_memory(results[1]["y"], results[2]["y"])


async def test_different_shapes_or_dtypes_never_share_a_batch(make: Make) -> None:
    engine = FakeEngine(gated=True)
    batcher = await make(engine, max_batch_size=8)
    first = submit(batcher, {"x": rows_of(0, 1)})
    await settle()
    tasks = [
        submit(batcher, {"x": rows_of(1, 1, width=3)}),
        submit(batcher, {"x": rows_of(2, 1, width=4)}),
        submit(batcher, {"x": rows_of(3, 2, width=3)}),
        submit(batcher, {"x": rows_of(4, 1, width=3, dtype=np.float64)}),
    ]
    await settle()
    engine.gate.set()
    results = await asyncio.gather(first, *tasks)
    groups = sorted(engine.markers(i) for i in range(1, len(engine.batches)))
    assert groups == [[1, 3, 3], [2], [4]]
    assert results[2]["y"].shape == (1, 4)
    assert results[4]["y"].dtype == np.float64


async def test_batch_never_exceeds_max_and_never_splits_a_request(make: Make) -> None:
    engine = FakeEngine(gated=True)
    batcher = await make(engine, max_batch_size=4)
    first = submit(batcher, {"x": rows_of(0, 1)})
    await settle()
    tasks = [submit(batcher, {"x": rows_of(marker, rows)}) for marker, rows in ((1, 3), (2, 2), (3, 2))]
    await settle()
    engine.gate.set()
    await asyncio.gather(first, *tasks)
    assert engine.sizes == [1, 3, 4]
    assert engine.markers(1) == [1, 1, 1]  # the 2-row request waited rather than being split


async def test_requests_that_cannot_be_batched_are_invalid(make: Make) -> None:
    batcher = await make(FakeEngine(), max_batch_size=4)
    with pytest.raises(InvalidInputError, match="5 rows"):
        await batcher.submit({"x": rows_of(1, 5)})
    with pytest.raises(InvalidInputError, match="'b' has 2 rows"):
        await batcher.submit({"a": rows_of(1, 1), "b": rows_of(1, 2)})
    with pytest.raises(InvalidInputError, match="scalar"):
        await batcher.submit({"x": np.float32(1.0) * np.ones(())})
    assert batcher.queue_depth == 0


# -- rule 7: priorities ---------------------------------------------------------------------------------


async def test_priority_levels_then_fifo(make: Make) -> None:
    engine = FakeEngine(gated=True)
    batcher = await make(engine, max_batch_size=1, priority_levels=3, default_priority=2)
    first = submit(batcher, {"x": rows_of(0, 1)})
    await settle()
    order = [(1, 3), (2, 2), (3, 1), (4, 1), (5, 0), (6, 2)]  # (marker, priority); 0 means level 2
    tasks = [submit(batcher, {"x": rows_of(marker, 1)}, priority=priority) for marker, priority in order]
    await settle()
    engine.gate.set()
    await asyncio.gather(first, *tasks)
    assert [engine.markers(i)[0] for i in range(len(engine.batches))] == [0, 3, 4, 2, 5, 6, 1]


async def test_higher_priority_shape_goes_first(make: Make) -> None:
    engine = FakeEngine(gated=True)
    batcher = await make(engine, max_batch_size=8, priority_levels=2)
    first = submit(batcher, {"x": rows_of(0, 1)})
    await settle()
    low = submit(batcher, {"x": rows_of(1, 1, width=3)}, priority=2)
    high = submit(batcher, {"x": rows_of(2, 1, width=4)}, priority=1)
    await settle()
    engine.gate.set()
    await asyncio.gather(first, low, high)
    assert [engine.markers(i) for i in range(3)] == [[0], [2], [1]]


async def test_delay_counts_from_an_older_lower_priority_request(make: Make, clock: FakeClock) -> None:
    engine = FakeEngine()
    batcher = await make(engine, max_queue_delay=1.0, priority_levels=2)
    low = submit(batcher, {"x": rows_of(1, 1)}, priority=2)
    await settle()
    clock.advance(0.5)
    high = submit(batcher, {"x": rows_of(2, 1)}, priority=1)
    await settle()
    clock.advance(0.5)  # 1.0 after the older, lower-priority request: they go together, now
    await asyncio.gather(low, high)
    assert engine.markers(0) == [2, 1]


async def test_priority_outside_the_levels_is_invalid(make: Make) -> None:
    batcher = await make(FakeEngine(), priority_levels=3)
    for priority in (4, -1):
        with pytest.raises(InvalidInputError, match=f"priority {priority}"):
            await batcher.submit({"x": rows_of(1, 1)}, priority=priority)


# -- rule 8: engine failures ----------------------------------------------------------------------------


async def test_engine_failure_fails_only_its_batch(make: Make) -> None:
    cause = RuntimeError("boom")
    engine = FakeEngine(gated=True, fail=cause)
    batcher = await make(engine)
    tasks = [submit(batcher, {"x": rows_of(i, 1)}, request_id=f"r{i}") for i in range(2)]
    await settle()
    engine.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert engine.sizes == [2]
    for i, error in enumerate(results):
        assert isinstance(error, EngineFailedError)
        assert error.request_id == f"r{i}"
        assert f"r{i}" in str(error)
        assert "boom" in str(error)
        assert error.__cause__ is cause
    ok = await batcher.submit({"x": rows_of(7, 1)})  # the worker keeps going
    assert ok["y"][0, 0] == 14000


async def test_an_input_the_engine_refuses_before_running_is_invalid_not_internal(make: Make) -> None:
    # E.g. a shape outside a TensorRT profile that slipped past the request checks: the caller's fault.
    engine = FakeEngine(gated=True, fail=EngineInputError("input 'x' has 9 rows, the profile takes at most 8"))
    batcher = await make(engine)
    task = submit(batcher, {"x": rows_of(1, 1)})
    await settle()
    engine.gate.set()
    with pytest.raises(InvalidInputError, match="the profile takes at most 8"):
        await task


async def test_output_with_the_wrong_rows_is_an_engine_failure(make: Make) -> None:
    engine = FakeEngine(gated=True, transform=lambda inputs: {"y": inputs["x"][:1]})
    batcher = await make(engine)
    tasks = [submit(batcher, {"x": rows_of(i, 1)}, request_id=f"r{i}") for i in range(2)]
    await settle()
    engine.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for error in results:
        assert isinstance(error, EngineFailedError)
        assert "'y' has 1 rows, the batch has 2 rows" in str(error)


# -- rule 9: max_batch_size 0 ---------------------------------------------------------------------------


async def test_no_batch_dimension_runs_each_request_alone_untouched(make: Make) -> None:
    engine = FakeEngine(gated=True, transform=lambda inputs: {"y": inputs["x"] + 1})
    batcher = await make(engine, max_batch_size=0, max_queue_delay=1.0)
    inputs = [{"x": np.arange(4, dtype=np.int32).reshape(2, 2) + i} for i in range(3)]
    tasks = [submit(batcher, request) for request in inputs]
    await settle()
    engine.gate.set()
    results = await asyncio.gather(*tasks)
    assert len(engine.batches) == 3
    assert all(got is sent for (_, got), sent in zip(engine.batches, inputs, strict=True))
    for request, result in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(result["y"], request["x"] + 1)


# -- rule 10: stopping ----------------------------------------------------------------------------------


async def test_stop_drains_queued_and_running_work(clock: FakeClock) -> None:
    engine = FakeEngine(gated=True)
    batcher = Batcher(engine, BatcherSettings(max_batch_size=2, max_queue_delay=100.0), clock=clock)
    await batcher.start()
    tasks = [submit(batcher, {"x": rows_of(i, 1)}) for i in range(5)]
    await settle()
    stopping = asyncio.create_task(batcher.stop(drain=True))
    await settle()
    with pytest.raises(UnavailableError):
        await batcher.submit({"x": rows_of(9, 1)})
    engine.gate.set()
    await stopping
    results = await asyncio.gather(*tasks)  # none waited out the 100 s delay: draining dispatches at once
    assert [int(result["y"][0, 0]) for result in results] == [0, 2000, 4000, 6000, 8000]
    assert asyncio.all_tasks() == {asyncio.current_task()}
    await batcher.stop()  # again: harmless


async def test_stop_without_drain_fails_queued_requests(clock: FakeClock) -> None:
    engine = FakeEngine(gated=True)
    batcher = Batcher(engine, BatcherSettings(max_batch_size=1), clock=clock)
    await batcher.start()
    running = submit(batcher, {"x": rows_of(0, 1)})
    await settle()
    queued = [submit(batcher, {"x": rows_of(i, 1)}) for i in (1, 2)]
    await settle()
    stopping = asyncio.create_task(batcher.stop(drain=False))
    await settle()
    for task in queued:
        with pytest.raises(UnavailableError):
            await task
    engine.gate.set()
    await stopping
    assert (await running)["y"][0, 0] == 0  # running work still finishes
    assert len(engine.batches) == 1
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_cancelled_stop_fails_running_work_and_leaves_no_task(clock: FakeClock) -> None:
    engine = FakeEngine(gated=True)  # never released: an engine that hangs
    batcher = Batcher(engine, BatcherSettings(max_batch_size=1), clock=clock)
    await batcher.start()
    tasks = [submit(batcher, {"x": rows_of(i, 1)}) for i in range(3)]
    await settle()
    stopping = asyncio.create_task(batcher.stop())
    await settle()
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    for task in tasks:
        with pytest.raises(UnavailableError):
            await task
    await settle()
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_submit_before_start_is_unavailable(clock: FakeClock) -> None:
    batcher = Batcher(FakeEngine(), BatcherSettings(max_batch_size=1), clock=clock)
    with pytest.raises(UnavailableError, match="not started"):
        await batcher.submit({"x": rows_of(1, 1)})
    await batcher.stop()


# -- the rest of the public surface ---------------------------------------------------------------------


async def test_run_batch_sees_its_members(make: Make) -> None:
    engine = FakeEngine(gated=True)
    batcher = await make(engine)
    tasks = [submit(batcher, {"x": rows_of(i, 1)}, request_id=f"r{i}", tag=("span", i)) for i in range(2)]
    await settle()
    engine.gate.set()
    await asyncio.gather(*tasks)
    assert engine.infos == [BatchInfo(instance=0, rows=2, request_ids=("r0", "r1"), tags=(("span", 0), ("span", 1)))]
    assert current_batch() is None


async def test_fast_path_creates_no_task_per_request(make: Make) -> None:
    engine = FakeEngine(gated=True)
    batcher = await make(engine, instances=2)
    before = len(asyncio.all_tasks())
    result = asyncio.ensure_future(batcher.submit({"x": rows_of(1, 1)}))
    await settle()
    assert engine.running == 1
    assert len(asyncio.all_tasks()) == before + 1  # the caller's own task only
    engine.gate.set()
    await result


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"max_batch_size": -1}, "max_batch_size"),
        ({"max_batch_size": 4, "preferred_batch_sizes": (5,)}, "preferred_batch_sizes"),
        ({"max_batch_size": 0, "preferred_batch_sizes": (1,)}, "preferred_batch_sizes"),
        ({"max_batch_size": 4, "max_queue_delay": -0.1}, "max_queue_delay"),
        ({"max_batch_size": 4, "max_queue_size": 0}, "max_queue_size"),
        ({"max_batch_size": 4, "priority_levels": 0}, "priority_levels"),
        ({"max_batch_size": 4, "priority_levels": 2, "default_priority": 3}, "default_priority"),
        ({"max_batch_size": 4, "default_timeout": 0.0}, "default_timeout"),
        ({"max_batch_size": 4, "instances": 0}, "instances"),
    ],
)
def test_invalid_settings_name_the_field(settings: dict[str, Any], field: str) -> None:
    with pytest.raises(ModelConfigError, match=field):
        BatcherSettings(**settings)


async def test_fake_clock_wakes_only_waits_that_are_due(clock: FakeClock) -> None:
    early, late = asyncio.Event(), asyncio.Event()
    waits = [asyncio.create_task(clock.wait(event, clock.now() + delay)) for event, delay in ((early, 1), (late, 2))]
    await settle()
    clock.advance(1.5)
    await settle()
    assert waits[0].done()
    assert not waits[1].done()
    assert await waits[0] is False
    late.set()
    assert await waits[1] is True
    assert clock.timed_waiters == 0


async def test_monotonic_clock_waits_on_the_event() -> None:
    clock = MonotonicClock()
    event = asyncio.Event()
    assert await clock.wait(event, clock.now() - 1.0) is False  # already past: returns at once
    asyncio.get_running_loop().call_soon(event.set)
    assert await clock.wait(event, clock.now() + 60.0) is True
    assert await clock.wait(event, None) is True
