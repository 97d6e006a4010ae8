"""The server's exception tree. Every error a caller can see is one of these.

Each class names the gRPC status code it maps to (as a string, so the core never imports grpc); the one map
from exceptions to status codes is `tensorgate.server.api.interceptors`.

    TensorgateError                 INTERNAL
    ├── ModelNotFoundError          NOT_FOUND           unknown model or version
    ├── InvalidInputError           INVALID_ARGUMENT    bad dtype, shape, missing/extra input, byte length
    ├── ModelConfigError            INVALID_ARGUMENT    a config.pbtxt or model file that cannot be served
    ├── ResourceExhaustedError      RESOURCE_EXHAUSTED  queue full, rate limited, too many (with a retry hint)
    ├── DeadlineExceededError       DEADLINE_EXCEEDED   the deadline passed before or during the work
    ├── UnavailableError            UNAVAILABLE         model loading/unloading, draining, breaker open (retryable)
    ├── UnauthenticatedError        UNAUTHENTICATED     credentials needed and none given
    ├── PermissionDeniedError       PERMISSION_DENIED   credentials not accepted for the call
    └── EngineFailedError           INTERNAL            the engine failed on a batch; carries the request id
"""

from __future__ import annotations

__all__ = [
    "DeadlineExceededError",
    "EngineFailedError",
    "InvalidInputError",
    "ModelConfigError",
    "ModelNotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "TensorgateError",
    "UnauthenticatedError",
    "UnavailableError",
]


class TensorgateError(Exception):
    """Root of every error the server reports to a caller.

    `retry_after` (seconds, keyword-only; the class's default when not given) is when a retry may succeed; the
    error interceptor sends it as the retry hint (`grpc-retry-pushback-ms`, `retry-after`). None: no hint.
    """

    code: str = "INTERNAL"
    retry_after: float | None = None

    def __init__(self, *args: object, retry_after: float | None = None) -> None:
        super().__init__(*args)
        if retry_after is not None:
            self.retry_after = retry_after


class ModelNotFoundError(TensorgateError):
    """The model, or the requested version of it, is not in the repository."""

    code = "NOT_FOUND"


class InvalidInputError(TensorgateError):
    """The request does not match the model's inputs; the message names the tensor."""

    code = "INVALID_ARGUMENT"


class ModelConfigError(TensorgateError):
    """A model's configuration or file cannot be served; the message names the file and the problem."""

    code = "INVALID_ARGUMENT"


class ResourceExhaustedError(TensorgateError):
    """A bound was reached (a full queue, a rate limit, too many streams); retrying later may succeed.

    Every one carries a retry hint: 1 s unless the raiser knows better (the rate limiter computes it).
    """

    code = "RESOURCE_EXHAUSTED"
    retry_after = 1.0


class DeadlineExceededError(TensorgateError):
    """The request's deadline (or the model's queue timeout) passed before its result was ready."""

    code = "DEADLINE_EXCEEDED"


class UnavailableError(TensorgateError):
    """The model or the server cannot take the request right now (loading, unloading, draining)."""

    code = "UNAVAILABLE"


class UnauthenticatedError(TensorgateError):
    """The call needs credentials and carried none (or none in a form the server reads)."""

    code = "UNAUTHENTICATED"


class PermissionDeniedError(TensorgateError):
    """The call's credentials are not accepted for it: a wrong token, an identity not allowed, or no way to
    authorize the call at all on this server."""

    code = "PERMISSION_DENIED"


class EngineFailedError(TensorgateError):
    """The engine failed while running a batch. Only that batch fails; the server keeps serving."""

    code = "INTERNAL"

    def __init__(self, message: str, *, request_id: str = "") -> None:
        super().__init__(f"{message} (request id {request_id})" if request_id else message)
        self.request_id = request_id
