"""Property test: whatever arrives, in whatever order, every caller gets exactly its own rows back.

Random requests (rows, shape variants, priorities, deadlines, cancellations) meet random settings (batch
sizes, preferred sizes, delays, instances, timeouts) and an engine whose batches take random time on the
fake clock. The engine computes a per-row function of rows that name their request, so any mix-up shows.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorgate.server.batching import Batcher, BatcherSettings, FakeClock
from tensorgate.server.errors import DeadlineExceededError, ResourceExhaustedError

Array = npt.NDArray[Any]

# Shape variants: (width, dtype). float32 and float64 of the same width would concatenate silently (numpy
# upcasts), so only the markers can prove they were never mixed.
VARIANTS: tuple[tuple[int, type[np.generic]], ...] = ((3, np.float32), (4, np.float32), (3, np.float64))


@dataclass(frozen=True)
class Submit:
    rows: int
    variant: int
    priority: int
    deadline: float | None  # relative to the submit time


@dataclass(frozen=True)
class Round:
    """Submits arriving in one loop turn, then cancels (same turn, or after the loop ran), then time moves."""

    submits: list[Submit]
    cancels: list[int]  # indexes into every submit so far, modulo their number
    settle_before_cancel: bool
    advance: float


@dataclass
class Scenario:
    settings: BatcherSettings
    rounds: list[Round]
    costs: list[float]  # engine time of batch i is costs[i % len(costs)]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    max_batch_size = draw(st.sampled_from([0, 1, 2, 3, 4, 4, 8, 8]))
    preferred: tuple[int, ...] = ()
    if max_batch_size > 1:
        preferred = tuple(sorted(draw(st.sets(st.integers(1, max_batch_size), max_size=2))))
    levels = draw(st.integers(1, 3))
    batcher_settings = BatcherSettings(
        max_batch_size=max_batch_size,
        preferred_batch_sizes=preferred,
        max_queue_delay=draw(st.sampled_from([0.0, 0.2, 1.0])),
        max_queue_size=draw(st.sampled_from([4, 16, 100])),
        priority_levels=levels,
        default_priority=draw(st.integers(1, levels)),
        default_timeout=draw(st.sampled_from([None, None, 1.5])),
        instances=draw(st.integers(1, 3)),
    )
    submit = st.builds(
        Submit,
        rows=st.integers(1, max(1, min(max_batch_size, 4))) if max_batch_size else st.integers(1, 3),
        variant=st.sampled_from([0, 0, 1, 2]),
        priority=st.integers(0, levels),
        deadline=st.sampled_from([None, None, 0.1, 0.3, 0.7, 2.0]),
    )
    a_round = st.builds(
        Round,
        submits=st.lists(submit, max_size=6),
        cancels=st.lists(st.integers(0, 99), max_size=2),
        settle_before_cancel=st.booleans(),
        advance=st.sampled_from([0.0, 0.05, 0.1, 0.3, 1.0]),
    )
    rounds = draw(st.lists(a_round, min_size=2, max_size=12))
    costs = draw(st.lists(st.sampled_from([0.0, 0.1, 0.5, 1.0]), min_size=1, max_size=5))
    return Scenario(batcher_settings, rounds, costs)


def rows_for(index: int, rows: int, variant: int) -> Array:
    """Rows that name their request: index*1000 + row*10 + column (exact in float32)."""
    width, dtype = VARIANTS[variant]
    return (index * 1000 + np.arange(rows)[:, None] * 10 + np.arange(width)[None, :]).astype(dtype)


def per_row(x: Array) -> dict[str, Array]:
    """The engine's function: row-wise, so a caller's rows of the output depend only on its rows of input."""
    return {"y": x * 2 + 1, "first": x[:, 0].copy()}


@dataclass
class Batch:
    start: float
    members: list[int]  # request index of each row, in row order
    requests: list[int]  # request indexes, in batch order


@dataclass
class Run:
    """What happened during one scenario."""

    batches: list[Batch] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)  # requests that reached the engine
    running: int = 0
    max_running: int = 0
    busy_instances: set[int] = field(default_factory=set)


async def play(scenario: Scenario) -> None:
    clock = FakeClock()
    config = scenario.settings
    run = Run()
    never = asyncio.Event()

    async def run_batch(instance: int, inputs: dict[str, Array]) -> dict[str, Array]:
        assert instance not in run.busy_instances, "two batches on one instance at once"
        run.busy_instances.add(instance)
        run.running += 1
        run.max_running = max(run.max_running, run.running)
        x = inputs["x"]
        members = [int(value) // 1000 for value in x[:, 0]]
        requests = list(dict.fromkeys(members))
        run.batches.append(Batch(clock.now(), members, requests))
        run.seen.update(requests)
        cost = scenario.costs[(len(run.batches) - 1) % len(scenario.costs)]
        try:
            await clock.wait(never, clock.now() + cost)  # engine time, on the fake clock
        finally:
            run.busy_instances.discard(instance)
            run.running -= 1
        return per_row(x)

    batcher = Batcher(run_batch, config, clock=clock)
    await batcher.start()
    sent: list[tuple[Submit, Array, float | None]] = []  # step, input, absolute deadline
    tasks: list[asyncio.Task[dict[str, Array]]] = []
    finished_at: dict[int, float] = {}
    cancelled_unseen: set[int] = set()  # cancelled before reaching the engine
    times = [clock.now()]

    def note_finish(index: int, _: object) -> None:
        finished_at[index] = clock.now()

    async def settle() -> None:
        for _ in range(40):
            await asyncio.sleep(0)

    for round_ in scenario.rounds:
        for step in round_.submits:
            index = len(sent)
            x = rows_for(index, step.rows, step.variant)
            now = clock.now()
            deadline = None if step.deadline is None else now + step.deadline
            effective = deadline
            if effective is None and config.default_timeout is not None:
                effective = now + config.default_timeout
            sent.append((step, x, effective))
            task = asyncio.ensure_future(
                batcher.submit({"x": x}, deadline=deadline, priority=step.priority, request_id=str(index))
            )
            task.add_done_callback(functools.partial(note_finish, index))
            tasks.append(task)
        await asyncio.sleep(0)  # one turn: the new submits run up to their wait, in order, at this time
        if round_.settle_before_cancel:
            await settle()
        for cancel in round_.cancels:
            # Without a settle first, the cancel lands in the same turn as the submits, or just after a worker
            # was woken: the batcher must still keep the request from the engine.
            if tasks and not tasks[index := cancel % len(tasks)].done():
                if index not in run.seen:
                    cancelled_unseen.add(index)
                tasks[index].cancel()
        clock.advance(round_.advance)
        times.append(clock.now())
        await settle()  # whatever is due at this time happens now (checked below)
        assert batcher.queue_depth <= config.max_queue_size

    stopping = asyncio.ensure_future(batcher.stop(drain=True))
    for _ in range(1000):
        await settle()
        if stopping.done():
            break
        clock.advance(0.5)
        times.append(clock.now())
    assert stopping.done(), "drain never finished"
    await stopping
    await settle()
    assert asyncio.all_tasks() == {asyncio.current_task()}, "the batcher left tasks behind"
    assert batcher.queue_depth == batcher.in_flight == 0

    # Batches: within limits, one shape variant each, each request's rows whole and in order.
    assert run.max_running <= config.instances
    for batch in run.batches:
        if config.max_batch_size == 0:
            assert len(batch.requests) == 1
        else:
            assert len(batch.members) <= config.max_batch_size
        assert len({sent[i][0].variant for i in batch.requests}) == 1, "shapes mixed in one batch"
        expected = [i for i in batch.requests for _ in range(sent[i][0].rows)]
        assert batch.members == expected, "a request's rows were split or reordered"
        for i in batch.requests:
            deadline = sent[i][2]
            assert deadline is None or batch.start < deadline, "an expired request reached the engine"
    ran = [i for batch in run.batches for i in batch.requests]
    assert len(ran) == len(set(ran)), "a request ran twice"
    assert not cancelled_unseen & run.seen, "a cancelled request reached the engine"

    for index, task in enumerate(tasks):
        step, x, deadline = sent[index]
        if task.cancelled():
            assert index in cancelled_unseen or index in run.seen
            continue
        error = task.exception()
        if isinstance(error, ResourceExhaustedError):
            assert index not in run.seen
        elif isinstance(error, DeadlineExceededError):
            assert deadline is not None
            assert index not in run.seen
            # Prompt: failed at the first moment the clock reached the deadline, not when a worker looked.
            assert finished_at[index] == min(t for t in times if t >= deadline)
        else:
            assert error is None, f"request {index}: unexpected {error!r}"
            result = task.result()
            wanted = per_row(x)
            assert result.keys() == wanted.keys()
            for name, array in wanted.items():
                assert result[name].dtype == array.dtype
                np.testing.assert_array_equal(result[name], array)


@settings(max_examples=80, deadline=None)
@given(scenarios())
def test_every_caller_gets_exactly_its_own_rows(scenario: Scenario) -> None:
    asyncio.run(play(scenario))
