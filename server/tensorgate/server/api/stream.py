"""`tensorgate.v1.Stream`: bidirectional streaming of frames (camera feeds), results in frame order.

Thin: the first message's config becomes `StreamSettings` and, for image frames, an `ImagePlan`; each frame
becomes a `StreamFrame` whose decoding is deferred until the stream's drop policy lets it through; each
`FrameOutcome` becomes a `StreamResponse`. The pipeline itself (reader task, drop policy, in-flight bound,
ordering) is `tensorgate.server.streams`.

Written as an async generator: FACTS.md records that handlers written with context.read()/write() break
under interceptors.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any

import grpc
import numpy.typing as npt

from tensorgate.client.tensors import TensorFormatError, dtype_from_name, from_wire_dtype
from tensorgate.server.api.codec import RequestIds, deadline_from, decode_inputs, encode_outputs, status_number
from tensorgate.server.errors import InvalidInputError, TensorgateError
from tensorgate.server.inference import InferenceService
from tensorgate.server.overload import Limits
from tensorgate.server.repository import ModelVersion
from tensorgate.server.repository.routing import RoutingHints, routing_hints
from tensorgate.server.streams import (
    Color,
    DropPolicy,
    EncodedImage,
    FrameOutcome,
    FrameStream,
    ImageFormat,
    ImagePlan,
    Layout,
    PreprocessSettings,
    StreamFrame,
    StreamRegistry,
    StreamSettings,
    resolve_plan,
)
from tensorgate.server.telemetry import count_dropped_frames
from tensorgate.v1 import stream_pb2, stream_pb2_grpc

__all__ = ["StreamServicer"]

_POLICIES = {
    stream_pb2.DROP_POLICY_UNSPECIFIED: DropPolicy.LATEST,
    stream_pb2.DROP_POLICY_LATEST: DropPolicy.LATEST,
    stream_pb2.DROP_POLICY_QUEUE: DropPolicy.QUEUE,
    stream_pb2.DROP_POLICY_BLOCK: DropPolicy.BLOCK,
}
_FORMATS = {
    stream_pb2.IMAGE_FORMAT_UNSPECIFIED: ImageFormat.AUTO,
    stream_pb2.IMAGE_FORMAT_JPEG: ImageFormat.JPEG,
    stream_pb2.IMAGE_FORMAT_PNG: ImageFormat.PNG,
    stream_pb2.IMAGE_FORMAT_RGB: ImageFormat.RGB,
    stream_pb2.IMAGE_FORMAT_BGR: ImageFormat.BGR,
    stream_pb2.IMAGE_FORMAT_GRAY: ImageFormat.GRAY,
}
_COLORS = {
    stream_pb2.COLOR_ORDER_RGB: Color.RGB,
    stream_pb2.COLOR_ORDER_BGR: Color.BGR,
    stream_pb2.COLOR_ORDER_GRAY: Color.GRAY,
}
_LAYOUTS = {stream_pb2.LAYOUT_NCHW: Layout.NCHW, stream_pb2.LAYOUT_NHWC: Layout.NHWC}

Inputs = dict[str, npt.NDArray[Any]]


class StreamServicer(stream_pb2_grpc.StreamServicer):
    """Streams of frames in, results out in the same order, each stream under its drop policy."""

    def __init__(
        self, service: InferenceService, request_ids: RequestIds, *, registry: StreamRegistry | None = None
    ) -> None:
        self._service = service
        self._request_ids = request_ids
        self.registry = registry if registry is not None else StreamRegistry()

    async def Stream(  # noqa: N802 (the gRPC method's name)
        self,
        request_iterator: AsyncIterable[stream_pb2.StreamRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[stream_pb2.StreamResponse]:
        """Read a config, then frames; yield one result per frame not dropped, in order."""
        token = self.registry.open()  # counted from the start: an idle stream holds a slot too
        try:
            requests = aiter(request_iterator)
            try:
                first = await anext(requests)
            except StopAsyncIteration:
                return
            if first.WhichOneof("kind") != "config":
                raise InvalidInputError("the first message of a stream must carry `config` (model and version)")
            config = first.config
            # Fail the whole stream at once for an unknown model rather than every frame.
            target = self._service.repository.resolve(config.model, config.version or None)
            settings = _settings(config, deadline_from(context), routing_hints(context.invocation_metadata()))
            decoder = _Decoder(config, target, self._service.limits)
            stream = FrameStream(self._service, settings, self._request_ids.new)
            self.registry.attach(token, stream)
            # aclosing: a client that goes away cancels the stream's tasks now, not when the generator is collected.
            async with contextlib.aclosing(stream.results(_frames(requests, decoder))) as outcomes:
                async for outcome in outcomes:
                    count_dropped_frames(settings.model, outcome.dropped)  # the metric, when metrics are on
                    yield _response(outcome)
        finally:
            self.registry.close(token)


def _settings(config: stream_pb2.StreamConfig, deadline: float | None, routing: RoutingHints | None) -> StreamSettings:
    policy = _POLICIES.get(config.drop_policy)
    if policy is None:
        raise InvalidInputError(f"unknown drop_policy {config.drop_policy}")
    return StreamSettings.create(
        config.model,
        version=config.version or None,
        outputs=tuple(config.outputs) or None,
        policy=policy,
        queue_size=config.queue_size,
        max_in_flight=config.max_in_flight,
        deadline=deadline,
        routing=routing,
    )


def _preprocess_settings(message: stream_pb2.Preprocessing) -> PreprocessSettings:
    dtype = None
    if message.dtype:
        try:
            dtype = dtype_from_name(from_wire_dtype(message.dtype))
        except TensorFormatError as exc:
            raise InvalidInputError(f"preprocessing dtype: {exc}") from None
    if message.color and message.color not in _COLORS:
        raise InvalidInputError(f"unknown preprocessing color {message.color}")
    if message.layout and message.layout not in _LAYOUTS:
        raise InvalidInputError(f"unknown preprocessing layout {message.layout}")
    return PreprocessSettings(
        input=message.input or None,
        color=_COLORS.get(message.color),
        width=message.width or None,
        height=message.height or None,
        layout=_LAYOUTS.get(message.layout),
        dtype=dtype,
        scale=message.scale if message.HasField("scale") else None,
        mean=tuple(message.mean),
        std=tuple(message.std),
    )


class _Decoder:
    """Makes each frame's inputs: its tensors, and its image through the stream's `ImagePlan`."""

    def __init__(self, config: stream_pb2.StreamConfig, target: ModelVersion, limits: Limits) -> None:
        self.limits = limits
        self.plan: ImagePlan | None = None
        self.problem: TensorgateError | None = None
        signature = target.signature
        assert signature is not None  # a resolved version is ready
        try:
            self.plan = resolve_plan(
                _preprocess_settings(config.preprocessing),
                {name: parameter.string_value for name, parameter in target.config.parameters.items()},
                signature.inputs,
                batched=signature.max_batch_size > 0,
                model=target.name,
            )
        except TensorgateError as exc:
            if config.HasField("preprocessing"):
                raise  # the stream asked for preprocessing that cannot work: fail it now
            # Otherwise only image frames need a plan (a model without an image input takes tensor frames).
            self.problem = InvalidInputError(f"the frame has an image, but {exc}")

    def decoder(self, frame: stream_pb2.Frame) -> Callable[[], Inputs]:
        """The deferred decoding of `frame` (runs on a worker thread when the frame has an image)."""

        def decode() -> Inputs:
            self.limits.check_elements(frame.inputs)
            inputs = decode_inputs(frame.inputs)
            if frame.HasField("image"):
                if self.plan is None:
                    assert self.problem is not None
                    raise self.problem
                if self.plan.input in inputs:
                    raise InvalidInputError(f"input {self.plan.input!r} is given both as a tensor and as the image")
                image = frame.image
                kind = _FORMATS.get(image.format)
                if kind is None:
                    raise InvalidInputError(f"unknown image format {image.format}")
                inputs[self.plan.input] = self.plan.apply(EncodedImage(kind, image.data, image.width, image.height))
            return inputs

        return decode


def _reject(error: TensorgateError) -> Callable[[], Inputs]:
    def decode() -> Inputs:
        raise error

    return decode


async def _frames(requests: AsyncIterator[stream_pb2.StreamRequest], decoder: _Decoder) -> AsyncIterator[StreamFrame]:
    async for message in requests:
        kind = message.WhichOneof("kind")
        if kind == "frame":
            frame = message.frame
            if decoder.limits.max_frame_bytes:
                try:
                    decoder.limits.check_frame(frame.ByteSize())
                except TensorgateError as exc:  # that frame fails; the stream goes on
                    yield StreamFrame(frame.sequence, _reject(exc), frame.capture_time_ns)
                    continue
            yield StreamFrame(
                frame.sequence, decoder.decoder(frame), frame.capture_time_ns, in_thread=frame.HasField("image")
            )
        elif kind == "config":
            error = InvalidInputError("only the first message of a stream may carry `config`")
            yield StreamFrame(0, _reject(error))
        else:
            yield StreamFrame(0, _reject(InvalidInputError("the message carries neither `config` nor `frame`")))


def _response(outcome: FrameOutcome) -> stream_pb2.StreamResponse:
    timings = stream_pb2.FrameTimings(
        decode_ns=round(outcome.decode * 1e9),
        queue_ns=round(outcome.queue * 1e9),
        infer_ns=round(outcome.infer * 1e9),
        server_ns=round(outcome.server * 1e9),
    )
    if outcome.error is not None:
        return stream_pb2.StreamResponse(
            sequence=outcome.sequence,
            error=stream_pb2.FrameError(code=status_number(outcome.error.code), message=str(outcome.error)),
            capture_time_ns=outcome.capture_time_ns,
            timings=timings,
            dropped=outcome.dropped,
        )
    return stream_pb2.StreamResponse(
        sequence=outcome.sequence,
        outputs=encode_outputs(outcome.outputs),
        version=outcome.version,
        capture_time_ns=outcome.capture_time_ns,
        timings=timings,
        dropped=outcome.dropped,
    )
