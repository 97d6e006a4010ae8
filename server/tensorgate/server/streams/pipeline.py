"""One stream's frames through the model, results in frame order, memory bounded whatever the two ends do.

    wire -> reader task -> FrameBuffer (drop policy) -> dispatcher task -> decode (thread) -> batcher -> results
                                                           ^ takes a frame only when an in-flight slot is free;
                                                             a slot frees when the frame's result is handed on

- The reader takes every frame off the wire as it comes (under BLOCK, only while the buffer has room), so a
  fast camera costs at most the buffer's frames, never a growing queue; what does not fit is dropped and
  counted per the drop policy.
- The dispatcher moves a frame from the buffer into the pipeline only when one of the stream's `max_in_flight`
  slots is free, and a slot is only freed when that frame's result has been taken by the consumer (the gRPC
  handler, whose `yield` waits while the client does not read). So a client that stops reading stops the
  dispatcher; frames then wait in (or are dropped from) the buffer, and the server's memory stays bounded.
- Each dispatched frame is decoded (images on a worker thread) and submitted to the model's batcher at once, so
  frames of all the streams on a model meet in its queue and batch together.
- Frames are dispatched in arrival order and their results are handed on in that order.

Nothing here knows about gRPC or protobuf: the adapter (`tensorgate.server.api.stream`) makes `StreamFrame`s
and turns `FrameOutcome`s into messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy.typing as npt

from tensorgate.server.batching import RequestTimes
from tensorgate.server.errors import InvalidInputError, ResourceExhaustedError, TensorgateError
from tensorgate.server.inference import InferenceRequest, InferenceResult
from tensorgate.server.repository.routing import RoutingHints
from tensorgate.server.streams.policy import DropPolicy, FrameBuffer

__all__ = [
    "MAX_IN_FLIGHT",
    "MAX_QUEUE_SIZE",
    "FrameOutcome",
    "FrameStream",
    "StreamFrame",
    "StreamRegistry",
    "StreamSettings",
    "StreamStats",
]

log = logging.getLogger(__name__)

Inputs = dict[str, npt.NDArray[Any]]

#: Bounds on what a stream may ask for: each held or in-flight frame may be a large image.
MAX_QUEUE_SIZE = 64
MAX_IN_FLIGHT = 32
DEFAULT_QUEUE_SIZE = 8
RECENT_STREAMS = 64


_decode_pool: ThreadPoolExecutor | None = None


def decode_pool() -> ThreadPoolExecutor:
    """The process's threads for decoding and preprocessing images, one per core (made on first use).

    Pillow releases the GIL while it decodes and resizes, so these run beside the event loop; more threads than
    cores would only contend for the GIL with the loop (asyncio's default executor has cores + 4).
    """
    global _decode_pool
    if _decode_pool is None:
        _decode_pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="tensorgate-decode")
    return _decode_pool


class InferenceRunner(Protocol):
    """What a stream needs of the inference service."""

    async def infer(self, request: InferenceRequest) -> InferenceResult: ...


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """A stream's model and its drop policy and bounds."""

    model: str
    version: int | None = None
    outputs: tuple[str, ...] | None = None
    policy: DropPolicy = DropPolicy.LATEST
    queue_size: int = DEFAULT_QUEUE_SIZE
    max_in_flight: int = 1
    #: Absolute, on time.monotonic(); the whole stream's deadline, if the caller set one.
    deadline: float | None = None
    #: The call's routing headers (version pin, routing key): every frame goes where they send it.
    routing: RoutingHints | None = None

    @classmethod
    def create(
        cls,
        model: str,
        *,
        version: int | None = None,
        outputs: tuple[str, ...] | None = None,
        policy: DropPolicy = DropPolicy.LATEST,
        queue_size: int = 0,
        max_in_flight: int = 0,
        deadline: float | None = None,
        routing: RoutingHints | None = None,
    ) -> StreamSettings:
        """Settings with defaults for the zeros: InvalidInputError for bounds past the limits."""
        if queue_size > MAX_QUEUE_SIZE:
            raise InvalidInputError(f"queue_size {queue_size} is over the limit of {MAX_QUEUE_SIZE}")
        if max_in_flight > MAX_IN_FLIGHT:
            raise InvalidInputError(f"max_in_flight {max_in_flight} is over the limit of {MAX_IN_FLIGHT}")
        return cls(
            model=model,
            version=version,
            outputs=outputs,
            policy=policy,
            queue_size=1 if policy is DropPolicy.LATEST else (queue_size or DEFAULT_QUEUE_SIZE),
            max_in_flight=max_in_flight or (1 if policy is DropPolicy.LATEST else 4),
            deadline=deadline,
            routing=routing,
        )


@dataclass(slots=True)
class StreamFrame:
    """A frame as the reader took it off the wire: not yet decoded, so a dropped frame costs nothing more.

    `decode` makes the model's inputs, raising InvalidInputError for a bad frame; it runs on a worker thread
    when `in_thread` (images), on the event loop otherwise (tensors: views of the message's bytes).
    """

    sequence: int
    decode: Callable[[], Inputs]
    capture_time_ns: int = 0
    in_thread: bool = False
    #: time.perf_counter() when the frame was read.
    arrival: float = field(default_factory=time.perf_counter)


@dataclass(slots=True)
class FrameOutcome:
    """One frame's result (or error), with its timings in seconds and the drops just before it."""

    sequence: int
    capture_time_ns: int
    dropped: int
    outputs: Inputs = field(default_factory=dict)
    version: int = 0
    error: TensorgateError | None = None
    decode: float = 0.0
    queue: float = 0.0
    infer: float = 0.0
    server: float = 0.0


@dataclass(slots=True)
class StreamStats:
    """One stream's counters, for tests and operators. `peak_*` are high-water marks."""

    model: str
    policy: DropPolicy
    queue_size: int
    max_in_flight: int
    received: int = 0
    dropped: int = 0
    results: int = 0
    errors: int = 0
    buffered: int = 0
    in_flight: int = 0
    peak_buffered: int = 0
    peak_in_flight: int = 0


class FrameStream:
    """The frames of one stream, through the model, results in frame order (see the module docstring)."""

    def __init__(self, service: InferenceRunner, settings: StreamSettings, request_ids: Callable[[], str]) -> None:
        self.settings = settings
        self._service = service
        self._request_ids = request_ids
        self._buffer: FrameBuffer[StreamFrame] = FrameBuffer(settings.policy, settings.queue_size)
        self._received = 0
        self._results = 0
        self._errors = 0
        self._in_flight = 0
        self._peak_in_flight = 0
        self._reported_drops = 0

    @property
    def stats(self) -> StreamStats:
        """A snapshot of this stream's counters."""
        settings, buffer = self.settings, self._buffer
        return StreamStats(
            model=settings.model,
            policy=settings.policy,
            queue_size=buffer.capacity,
            max_in_flight=settings.max_in_flight,
            received=self._received,
            dropped=buffer.dropped,
            results=self._results,
            errors=self._errors,
            buffered=len(buffer),
            in_flight=self._in_flight,
            peak_buffered=buffer.peak,
            peak_in_flight=self._peak_in_flight,
        )

    async def results(self, frames: AsyncIterator[StreamFrame]) -> AsyncGenerator[FrameOutcome, None]:
        """Take `frames`, yield their outcomes in order; re-raise what stopped `frames`, after the earlier results.

        Closing the generator early (the client went away) cancels everything still in the pipeline.
        """
        slots = asyncio.Semaphore(self.settings.max_in_flight)
        ordered: asyncio.Queue[asyncio.Task[FrameOutcome] | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read(frames))
        dispatcher = asyncio.create_task(self._dispatch(slots, ordered))
        try:
            while (task := await ordered.get()) is not None:
                outcome = await task
                self._results += 1
                self._errors += outcome.error is not None
                yield outcome
                self._in_flight -= 1
                slots.release()
            await reader  # re-raises what stopped the reader, if anything did
        finally:
            reader.cancel()
            dispatcher.cancel()
            while not ordered.empty():
                if (task := ordered.get_nowait()) is not None:
                    task.cancel()
            for helper in (reader, dispatcher):
                with contextlib.suppress(asyncio.CancelledError):
                    await helper

    async def _read(self, frames: AsyncIterator[StreamFrame]) -> None:
        try:
            async for frame in frames:
                self._received += 1
                await self._buffer.put(frame)
        finally:
            self._buffer.close()

    async def _dispatch(
        self, slots: asyncio.Semaphore, ordered: asyncio.Queue[asyncio.Task[FrameOutcome] | None]
    ) -> None:
        try:
            while True:
                await slots.acquire()
                frame = await self._buffer.get()
                if frame is None:
                    return
                # Every frame dropped so far was older than this one (drops take the oldest waiting frame).
                dropped = self._buffer.dropped - self._reported_drops
                self._reported_drops = self._buffer.dropped
                self._in_flight += 1
                self._peak_in_flight = max(self._peak_in_flight, self._in_flight)
                ordered.put_nowait(asyncio.create_task(self._process(frame, dropped)))
        finally:
            ordered.put_nowait(None)

    async def _process(self, frame: StreamFrame, dropped: int) -> FrameOutcome:
        outcome = FrameOutcome(frame.sequence, frame.capture_time_ns, dropped)
        started = time.perf_counter()
        waited = started - frame.arrival
        try:
            if frame.in_thread:
                inputs = await asyncio.get_running_loop().run_in_executor(decode_pool(), frame.decode)
            else:
                inputs = frame.decode()
            decoded = time.perf_counter()
            outcome.decode = decoded - started
            times = RequestTimes()
            settings = self.settings
            result = await self._service.infer(
                InferenceRequest(
                    model=settings.model,
                    version=settings.version,
                    inputs=inputs,
                    outputs=settings.outputs,
                    request_id=self._request_ids(),
                    deadline=settings.deadline,
                    times=times,
                    routing=settings.routing,
                )
            )
            outcome.outputs, outcome.version = result.outputs, result.version
            outcome.queue, outcome.infer = waited + times.queued, times.infer
        except TensorgateError as exc:
            outcome.error = exc
            outcome.queue = waited
        except Exception as exc:  # a bug, but one frame's: the stream and its other frames go on
            log.exception("unexpected error on frame %d", frame.sequence)
            outcome.error = TensorgateError(f"internal error: {type(exc).__name__}: {exc}")
            outcome.queue = waited
        outcome.server = time.perf_counter() - frame.arrival
        return outcome


class StreamRegistry:
    """The server's open streams: enforces the stream limit and keeps the counters operators and tests read.

    A stream holds its place from the moment its call starts (`open`), before its config has been read, so
    idle calls count against the limit too; `attach` adds its `FrameStream` once there is one.
    """

    def __init__(self, max_streams: int = 0) -> None:
        #: 0: no limit.
        self.max_streams = max_streams
        self.opened = 0
        self.refused = 0
        self._streams: dict[int, FrameStream | None] = {}
        self._tokens = itertools.count(1)
        self._closed_dropped = 0
        self._closed_results = 0
        #: The final counters of the most recently closed streams, oldest first.
        self.recent: deque[StreamStats] = deque(maxlen=RECENT_STREAMS)

    def __len__(self) -> int:
        return len(self._streams)

    def open(self) -> int:
        """Take a place for a new stream and return its token; ResourceExhaustedError past the limit."""
        if self.max_streams and len(self._streams) >= self.max_streams:
            self.refused += 1
            raise ResourceExhaustedError(
                f"too many streams: {len(self._streams)} open, the limit is max_streams={self.max_streams}"
            )
        token = next(self._tokens)
        self._streams[token] = None
        self.opened += 1
        return token

    def attach(self, token: int, stream: FrameStream) -> None:
        """The stream that holds the place `token`."""
        self._streams[token] = stream

    def close(self, token: int) -> None:
        """Free the place `token` (its stream ended, failed, or its client went away)."""
        stream = self._streams.pop(token, None)
        if stream is not None:
            stats = stream.stats
            self._closed_dropped += stats.dropped
            self._closed_results += stats.results
            self.recent.append(stats)

    def active(self) -> list[StreamStats]:
        """A snapshot of the counters of every open stream that has read its config."""
        return [stream.stats for stream in self._streams.values() if stream is not None]

    @property
    def dropped(self) -> int:
        """Frames dropped over the server's life, by every stream, open or closed."""
        return self._closed_dropped + sum(stats.dropped for stats in self.active())

    @property
    def results(self) -> int:
        """Results handed on over the server's life."""
        return self._closed_results + sum(stats.results for stats in self.active())
