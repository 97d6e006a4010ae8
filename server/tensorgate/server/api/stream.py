"""`tensorgate.v1.Stream`: bidirectional streaming, results in frame order.

A reader task takes frames off the wire and submits each to the model's batcher at once, so frames of many
streams meet in one batch; the handler yields results in the order the frames came. At most
`max_in_flight` frames per stream are in the server: past that the reader stops reading, and HTTP/2 flow
control pushes back on the sender. (Drop policies for cameras come on top of this.)

Written as an async generator: FACTS.md records that handlers written with context.read()/write() break
under interceptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import grpc

from tensorgate.server.api.codec import (
    RequestIds,
    deadline_from,
    decode_inputs,
    encode_outputs,
    status_number,
)
from tensorgate.server.errors import InvalidInputError, TensorgateError
from tensorgate.server.inference import InferenceRequest, InferenceService
from tensorgate.v1 import stream_pb2, stream_pb2_grpc

__all__ = ["StreamServicer"]

log = logging.getLogger(__name__)

Pending = asyncio.Queue["asyncio.Task[stream_pb2.StreamResponse] | None"]


class StreamServicer(stream_pb2_grpc.StreamServicer):
    """Streams of frames in, results out in the same order."""

    def __init__(self, service: InferenceService, request_ids: RequestIds, *, max_in_flight: int = 16) -> None:
        self._service = service
        self._request_ids = request_ids
        self._max_in_flight = max_in_flight

    async def Stream(  # noqa: N802 (the gRPC method's name)
        self,
        request_iterator: AsyncIterable[stream_pb2.StreamRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[stream_pb2.StreamResponse]:
        """Read a config, then frames; yield one result per frame, in order."""
        requests = aiter(request_iterator)
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            return
        if first.WhichOneof("kind") != "config":
            raise InvalidInputError("the first message of a stream must carry `config` (model and version)")
        config = first.config
        # Fail the whole stream at once for an unknown model rather than every frame.
        self._service.repository.resolve(config.model, config.version or None)
        pending: Pending = asyncio.Queue(self._max_in_flight)
        reader = asyncio.create_task(self._read(requests, config, deadline_from(context), pending))
        try:
            while (task := await pending.get()) is not None:
                yield await task
            await reader  # re-raises what stopped the reader, if anything did
        finally:
            reader.cancel()
            while not pending.empty():
                if (task := pending.get_nowait()) is not None:
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _read(
        self,
        requests: AsyncIterator[stream_pb2.StreamRequest],
        config: stream_pb2.StreamConfig,
        deadline: float | None,
        pending: Pending,
    ) -> None:
        try:
            async for message in requests:
                if message.WhichOneof("kind") != "frame":
                    error = InvalidInputError("only the first message of a stream may carry `config`")
                    task = asyncio.create_task(_failed(message.frame.sequence, error))
                else:
                    task = asyncio.create_task(self._run(message.frame, config, deadline))
                await pending.put(task)
        finally:
            await pending.put(None)

    async def _run(
        self, frame: stream_pb2.Frame, config: stream_pb2.StreamConfig, deadline: float | None
    ) -> stream_pb2.StreamResponse:
        try:
            result = await self._service.infer(
                InferenceRequest(
                    model=config.model,
                    version=config.version or None,
                    inputs=decode_inputs(frame.inputs),
                    outputs=tuple(config.outputs) or None,
                    request_id=self._request_ids.new(),
                    deadline=deadline,
                )
            )
        except TensorgateError as exc:
            return await _failed(frame.sequence, exc)
        except Exception as exc:  # a bug, but one frame's: the stream and its other frames go on
            log.exception("unexpected error on frame %d", frame.sequence)
            return await _failed(frame.sequence, TensorgateError(f"internal error: {type(exc).__name__}: {exc}"))
        return stream_pb2.StreamResponse(
            sequence=frame.sequence, outputs=encode_outputs(result.outputs), version=result.version
        )


async def _failed(sequence: int, exc: TensorgateError) -> stream_pb2.StreamResponse:
    return stream_pb2.StreamResponse(
        sequence=sequence, error=stream_pb2.FrameError(code=status_number(exc.code), message=str(exc))
    )
