"""Camera and other frame streams: drop policies, image preprocessing, and the per-stream pipeline.

The gRPC adapter is `tensorgate.server.api.stream`; nothing here imports grpc or protobuf.
"""

from __future__ import annotations

from tensorgate.server.streams.pipeline import (
    MAX_IN_FLIGHT,
    MAX_QUEUE_SIZE,
    FrameOutcome,
    FrameStream,
    StreamFrame,
    StreamRegistry,
    StreamSettings,
    StreamStats,
)
from tensorgate.server.streams.policy import DropPolicy, FrameBuffer
from tensorgate.server.streams.preprocess import (
    Color,
    EncodedImage,
    ImageFormat,
    ImagePlan,
    Layout,
    PreprocessSettings,
    resolve_plan,
)

__all__ = [
    "MAX_IN_FLIGHT",
    "MAX_QUEUE_SIZE",
    "Color",
    "DropPolicy",
    "EncodedImage",
    "FrameBuffer",
    "FrameOutcome",
    "FrameStream",
    "ImageFormat",
    "ImagePlan",
    "Layout",
    "PreprocessSettings",
    "StreamFrame",
    "StreamRegistry",
    "StreamSettings",
    "StreamStats",
    "resolve_plan",
]
