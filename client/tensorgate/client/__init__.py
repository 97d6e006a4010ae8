"""The tensorgate client: `Client` (blocking) and `AsyncClient` (asyncio) with the same methods.

    from tensorgate.client import Client

    with Client("127.0.0.1:8001", timeout=10) as client:
        outputs = client.predict("digits", {"image": images})      # {"probabilities": ..., "label": ...}
        for result in client.stream("digits", ({"image": frame} for frame in camera)):
            print(result.sequence, result.outputs if result.ok else result.error)
        # Encoded camera images, decoded and preprocessed on the server; stale frames dropped (policy="latest"):
        for result in client.stream("detector", (Image(jpeg) for jpeg in camera)):
            print(result.sequence, result.latency, result.dropped, result.timings)

Failed calls raise the exceptions of `tensorgate.client.errors` (root: `TensorgateClientError`), which keep
the gRPC status code and the server's message. Arrays travel with `tensorgate.client.tensors`.
"""

from tensorgate.client._async import AsyncClient
from tensorgate.client._common import (
    DEFAULT_CHANNEL_OPTIONS,
    FrameError,
    ModelInfo,
    ModelMetadata,
    RepositoryEntry,
    StreamResult,
    TensorInfo,
    VersionInfo,
)
from tensorgate.client._retry import NO_RETRIES, RETRY_SERVICE_CONFIG_JSON
from tensorgate.client._sync import Client
from tensorgate.client.errors import (
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    TensorgateClientError,
    UnauthenticatedError,
    UnavailableError,
)
from tensorgate.client.frames import Frame, FrameTimings, Image, Preprocessing

__all__ = [
    "DEFAULT_CHANNEL_OPTIONS",
    "NO_RETRIES",
    "RETRY_SERVICE_CONFIG_JSON",
    "AsyncClient",
    "Client",
    "DeadlineExceededError",
    "Frame",
    "FrameError",
    "FrameTimings",
    "Image",
    "InternalError",
    "InvalidArgumentError",
    "ModelInfo",
    "ModelMetadata",
    "NotFoundError",
    "PermissionDeniedError",
    "Preprocessing",
    "RepositoryEntry",
    "ResourceExhaustedError",
    "StreamResult",
    "TensorInfo",
    "TensorgateClientError",
    "UnauthenticatedError",
    "UnavailableError",
    "VersionInfo",
]
