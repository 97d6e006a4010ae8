"""One stream's pipeline (tensorgate.server.streams.FrameStream) against a fake inference service, no sockets.

The fake service answers after a number of event-loop turns, so "the model is slower than the camera" is exact
and deterministic: no clock, no sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from tensorgate.server.batching import Batcher, BatcherSettings, FakeClock, RequestTimes
from tensorgate.server.errors import InvalidInputError, ResourceExhaustedError, TensorgateError
from tensorgate.server.inference import InferenceRequest, InferenceResult
from tensorgate.server.streams import (
    DropPolicy,
    FrameOutcome,
    FrameStream,
    StreamFrame,
    StreamRegistry,
    StreamSettings,
)

Inputs = dict[str, npt.NDArray[Any]]


async def settle(turns: int = 20) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


class FakeService:
    """Answers `y = x + 1` after `turns` event-loop turns; records how many requests it holds at once."""

    def __init__(self, turns: int = 0) -> None:
        self.turns = turns
        self.calls: list[int] = []
        self.running = 0
        self.max_running = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def infer(self, request: InferenceRequest) -> InferenceResult:
        self.calls.append(int(request.inputs["x"][0]))
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await self.gate.wait()
            await settle(self.turns)
        finally:
            self.running -= 1
        if request.times is not None:
            request.times.queued, request.times.infer = 0.5, 0.25
        return InferenceResult(request.model, 3, {"y": request.inputs["x"] + 1})


def frame(sequence: int, decode: Callable[[], Inputs] | None = None, *, in_thread: bool = False) -> StreamFrame:
    def tensor() -> Inputs:
        return {"x": np.array([sequence], np.int64)}

    return StreamFrame(sequence, decode or tensor, capture_time_ns=1000 + sequence, in_thread=in_thread)


async def camera(
    frames: list[StreamFrame], *, turns: int = 1, done: asyncio.Event | None = None
) -> AsyncIterator[StreamFrame]:
    """Sends `frames`, one every `turns` event-loop turns."""
    for item in frames:
        yield item
        await settle(turns)
    if done is not None:
        done.set()


def settings(policy: DropPolicy = DropPolicy.LATEST, **values: Any) -> StreamSettings:
    return StreamSettings.create("m", policy=policy, **values)


def ids() -> Callable[[], str]:
    counter = iter(range(10**9))
    return lambda: f"r{next(counter)}"


async def collect(stream: FrameStream, frames: AsyncIterator[StreamFrame]) -> list[FrameOutcome]:
    return [outcome async for outcome in stream.results(frames)]


async def test_latest_drops_stale_frames_counts_them_and_keeps_order() -> None:
    service = FakeService(turns=10)  # ten times slower than the camera
    stream = FrameStream(service, settings(), ids())

    outcomes = await collect(stream, camera([frame(i) for i in range(60)]))

    sequences = [outcome.sequence for outcome in outcomes]
    assert sequences == sorted(sequences)
    assert sequences[0] == 0
    assert sequences[-1] == 59
    assert len(outcomes) + sum(outcome.dropped for outcome in outcomes) == 60
    assert 0 < len(outcomes) < 20
    for outcome in outcomes:
        assert outcome.error is None
        assert int(outcome.outputs["y"][0]) == outcome.sequence + 1
        assert outcome.capture_time_ns == 1000 + outcome.sequence
    stats = stream.stats
    assert (stats.received, stats.results, stats.dropped) == (60, len(outcomes), 60 - len(outcomes))
    assert stats.peak_in_flight == 1
    assert stats.peak_buffered == 1
    assert service.max_running == 1


async def test_drops_are_reported_with_the_next_result() -> None:
    # Frame 0 runs; 1, 2 and 3 arrive meanwhile and only 3 survives: its result says 2 were dropped.
    service = FakeService()
    service.gate.clear()
    stream = FrameStream(service, settings(), ids())

    async def frames() -> AsyncIterator[StreamFrame]:
        yield frame(0)
        await settle()  # frame 0 reaches the model
        for sequence in (1, 2, 3):
            yield frame(sequence)

    results = stream.results(frames())
    first = asyncio.ensure_future(anext(results))
    await settle(40)
    assert service.calls == [0]
    assert stream.stats.dropped == 2
    service.gate.set()
    assert (await first).dropped == 0
    second = await anext(results)
    assert (second.sequence, second.dropped) == (3, 2)
    with pytest.raises(StopAsyncIteration):
        await anext(results)


async def test_queue_policy_keeps_a_bounded_backlog() -> None:
    service = FakeService(turns=10)
    stream = FrameStream(service, settings(DropPolicy.QUEUE, queue_size=3, max_in_flight=2), ids())

    outcomes = await collect(stream, camera([frame(i) for i in range(60)]))

    sequences = [outcome.sequence for outcome in outcomes]
    assert sequences == sorted(sequences)
    assert sequences[-3:] == [57, 58, 59]  # the backlog at the end is served, not dropped
    assert len(outcomes) + sum(outcome.dropped for outcome in outcomes) == 60
    stats = stream.stats
    assert stats.dropped > 0
    assert stats.peak_buffered <= 3
    assert stats.peak_in_flight <= 2
    assert service.max_running <= 2


async def test_block_policy_answers_every_frame() -> None:
    service = FakeService(turns=10)
    stream = FrameStream(service, settings(DropPolicy.BLOCK, queue_size=2, max_in_flight=3), ids())

    outcomes = await collect(stream, camera([frame(i) for i in range(40)], turns=0))

    assert [outcome.sequence for outcome in outcomes] == list(range(40))
    assert all(outcome.dropped == 0 for outcome in outcomes)
    assert stream.stats.peak_buffered <= 2
    assert stream.stats.peak_in_flight <= 3


async def test_a_consumer_that_stops_reading_bounds_what_the_stream_holds() -> None:
    service = FakeService()
    stream = FrameStream(service, settings(DropPolicy.QUEUE, queue_size=4, max_in_flight=2), ids())
    sent = asyncio.Event()
    results = stream.results(camera([frame(i) for i in range(500)], done=sent))

    first = await anext(results)  # then read nothing more while the camera sends the rest
    await asyncio.wait_for(sent.wait(), timeout=10)
    await settle()

    stats = stream.stats
    assert first.sequence == 0
    assert stats.received == 500  # the reader kept taking frames off the wire...
    assert stats.buffered <= 4
    assert stats.in_flight <= 2
    assert len(service.calls) <= 1 + 2  # ...and nothing more reached the model
    assert stats.dropped >= 500 - 1 - 2 - 4
    await results.aclose()
    assert asyncio.all_tasks() == {asyncio.current_task()}  # closing cancels the reader and the pipeline


async def test_bad_frames_get_error_outcomes_and_the_stream_goes_on() -> None:
    def bad() -> Inputs:
        raise InvalidInputError("the frame's PNG image cannot be decoded")

    def buggy() -> Inputs:
        raise ZeroDivisionError("oops")

    stream = FrameStream(FakeService(), settings(DropPolicy.BLOCK), ids())
    frames = [frame(0), frame(1, bad), frame(2, buggy, in_thread=True), frame(3)]

    outcomes = await collect(stream, camera(frames))

    assert [outcome.sequence for outcome in outcomes] == [0, 1, 2, 3]
    assert outcomes[1].error is not None
    assert outcomes[1].error.code == "INVALID_ARGUMENT"
    assert outcomes[2].error is not None
    assert outcomes[2].error.code == "INTERNAL"
    assert "ZeroDivisionError" in str(outcomes[2].error)
    assert outcomes[3].error is None
    assert stream.stats.errors == 2


async def test_an_error_reading_the_wire_comes_after_the_earlier_results() -> None:
    async def broken() -> AsyncIterator[StreamFrame]:
        yield frame(0)
        yield frame(1)
        raise InvalidInputError("the request message cannot be parsed")

    stream = FrameStream(FakeService(turns=3), settings(DropPolicy.BLOCK), ids())
    seen: list[int] = []

    async def consume() -> None:
        async for outcome in stream.results(broken()):
            seen.append(outcome.sequence)

    with pytest.raises(InvalidInputError, match="cannot be parsed"):
        await consume()
    assert seen == [0, 1]


async def test_timings_come_from_the_decode_and_the_batcher() -> None:
    stream = FrameStream(FakeService(), settings(), ids())

    (outcome,) = await collect(stream, camera([frame(0, in_thread=True)]))

    assert outcome.infer == 0.25
    assert outcome.queue >= 0.5  # the batcher's queue time plus the time among the stream's frames
    assert outcome.decode >= 0
    assert outcome.server >= outcome.decode
    assert outcome.version == 3


def test_settings_defaults_and_limits() -> None:
    latest = StreamSettings.create("m")
    assert (latest.policy, latest.queue_size, latest.max_in_flight) == (DropPolicy.LATEST, 1, 1)
    block = StreamSettings.create("m", policy=DropPolicy.BLOCK)
    assert (block.queue_size, block.max_in_flight) == (8, 4)
    with pytest.raises(InvalidInputError, match="queue_size"):
        StreamSettings.create("m", policy=DropPolicy.QUEUE, queue_size=10_000)
    with pytest.raises(InvalidInputError, match="max_in_flight"):
        StreamSettings.create("m", max_in_flight=10_000)


async def test_registry_enforces_the_stream_limit_and_keeps_counters() -> None:
    registry = StreamRegistry(max_streams=2)
    first, second = registry.open(), registry.open()
    with pytest.raises(ResourceExhaustedError, match="max_streams=2"):
        registry.open()
    assert registry.refused == 1

    stream = FrameStream(FakeService(), settings(), ids())
    registry.attach(first, stream)
    await collect(stream, camera([frame(i) for i in range(3)], turns=0))
    assert [stats.results for stats in registry.active()] == [stream.stats.results]
    registry.close(first)
    registry.close(second)
    registry.close(second)  # twice is harmless

    assert len(registry) == 0
    assert registry.results == stream.stats.results
    assert registry.dropped == stream.stats.dropped
    assert [stats.received for stats in registry.recent] == [3]
    third = registry.open()  # a freed place can be taken again
    registry.close(third)
    assert StreamRegistry(max_streams=0).open() == 1  # 0: no limit


async def test_the_batcher_fills_in_request_times() -> None:
    clock = FakeClock()
    gate = asyncio.Event()

    async def run_batch(instance: int, inputs: Inputs) -> dict[str, npt.NDArray[Any]]:
        await gate.wait()
        return {"y": inputs["x"]}

    batcher = Batcher(run_batch, BatcherSettings(max_batch_size=4, max_queue_delay=0.01), clock=clock, name="m")
    await batcher.start()
    try:
        times = RequestTimes()
        result = asyncio.create_task(batcher.submit({"x": np.zeros((1, 2), np.float32)}, times=times))
        await settle()
        clock.advance(0.01)  # the queue delay passes: the batch starts
        await settle()
        clock.advance(0.2)  # the engine takes 0.2 s
        gate.set()
        await result
        assert times.queued == pytest.approx(0.01)
        assert times.infer == pytest.approx(0.2)
    finally:
        await batcher.stop()


async def test_an_unknown_error_type_from_the_service_fails_only_its_frame() -> None:
    class Failing(FakeService):
        async def infer(self, request: InferenceRequest) -> InferenceResult:
            if int(request.inputs["x"][0]) == 1:
                raise TensorgateError("engine exploded")
            return await super().infer(request)

    stream = FrameStream(Failing(), settings(DropPolicy.BLOCK), ids())

    outcomes = await collect(stream, camera([frame(i) for i in range(3)]))

    assert [(outcome.sequence, outcome.error is None) for outcome in outcomes] == [(0, True), (1, False), (2, True)]
