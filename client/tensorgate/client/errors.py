"""The client's exception tree: every failed call raises one of these, never a bare `grpc.RpcError`.

Each class stands for one gRPC status code and keeps the server's message; the original `grpc.RpcError` is the
exception's `__cause__`. What tensorgate means by each code (see the server's table):

    TensorgateClientError            .code (grpc.StatusCode), .details (str)
    ├── CallCancelledError           CANCELLED           the call was cancelled
    ├── UnknownError                 UNKNOWN             the server failed without a status
    ├── InvalidArgumentError         INVALID_ARGUMENT    bad dtype, shape, missing/extra input (names it)
    ├── DeadlineExceededError        DEADLINE_EXCEEDED   the deadline passed before or during the work
    ├── NotFoundError                NOT_FOUND           unknown model or version
    ├── AlreadyExistsError           ALREADY_EXISTS
    ├── PermissionDeniedError        PERMISSION_DENIED   wrong token, identity not allowed, auth not configured
    ├── ResourceExhaustedError       RESOURCE_EXHAUSTED  queue full, message too large, too many streams
    ├── FailedPreconditionError      FAILED_PRECONDITION
    ├── AbortedError                 ABORTED
    ├── OutOfRangeError              OUT_OF_RANGE
    ├── UnimplementedError           UNIMPLEMENTED       the server does not serve this method
    ├── InternalError                INTERNAL            engine failure (the message has the request id)
    ├── UnavailableError             UNAVAILABLE         loading, draining, unreachable: the retryable one
    ├── DataLossError                DATA_LOSS
    └── UnauthenticatedError         UNAUTHENTICATED     no credentials: the call needs a token or a client cert

`CallCancelledError` is not named `CancelledError` so that it cannot be mistaken for (or shadow)
`asyncio.CancelledError`, which is a different thing: the local task being cancelled.

Local mistakes (an array numpy cannot encode, a negative version) raise `ValueError`/`TypeError` before any
call is made; they are not in this tree.
"""

from __future__ import annotations

from typing import ClassVar

import grpc

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "CallCancelledError",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "TensorgateClientError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "error_for_code",
    "from_rpc_error",
    "status_code_from_number",
]


class TensorgateClientError(Exception):
    """Root of every error a call to the server raises.

    Attributes:
        code: the gRPC status code of the failed call.
        details: the server's message (for tensorgate, it names the model, version or tensor at fault).
    """

    #: The status code a subclass stands for (the root is used only for codes outside the tree).
    status: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    #: Whether the same call may succeed if retried later, unchanged.
    retryable: ClassVar[bool] = False

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}" if self.details else self.code.name


class CallCancelledError(TensorgateClientError):
    """CANCELLED: the call was cancelled, by the caller or the server."""

    status = grpc.StatusCode.CANCELLED


class UnknownError(TensorgateClientError):
    """UNKNOWN: the server failed without giving a status."""

    status = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(TensorgateClientError):
    """INVALID_ARGUMENT: the request does not fit the model (dtype, shape, missing or extra input)."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(TensorgateClientError):
    """DEADLINE_EXCEEDED: the call's deadline passed before its result was ready."""

    status = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(TensorgateClientError):
    """NOT_FOUND: the model, the version or the health service name is unknown to the server."""

    status = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(TensorgateClientError):
    """ALREADY_EXISTS."""

    status = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(TensorgateClientError):
    """PERMISSION_DENIED: the credentials were read but do not allow this call.

    From tensorgate: the bearer token is wrong, the client certificate's identity is not in the server's
    `admin_identities`, or the server has no credentials configured and refuses state-changing calls (it is
    not on loopback). The message says which, and what the server would accept.
    """

    status = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(TensorgateClientError):
    """RESOURCE_EXHAUSTED: a bound was reached (a full queue, a message too large, too many streams)."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(TensorgateClientError):
    """FAILED_PRECONDITION."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(TensorgateClientError):
    """ABORTED."""

    status = grpc.StatusCode.ABORTED


class OutOfRangeError(TensorgateClientError):
    """OUT_OF_RANGE."""

    status = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(TensorgateClientError):
    """UNIMPLEMENTED: the server does not serve this method (an older server, or another service)."""

    status = grpc.StatusCode.UNIMPLEMENTED


class InternalError(TensorgateClientError):
    """INTERNAL: the engine (or the server) failed; the message carries the request id."""

    status = grpc.StatusCode.INTERNAL


class UnavailableError(TensorgateClientError):
    """UNAVAILABLE: the server or the model cannot take calls right now (unreachable, loading, draining)."""

    status = grpc.StatusCode.UNAVAILABLE
    retryable = True


class DataLossError(TensorgateClientError):
    """DATA_LOSS."""

    status = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(TensorgateClientError):
    """UNAUTHENTICATED: the call needs credentials and carried none the server could read.

    From tensorgate: a model load/unload (or, under the server's `auth_inference`, any inference or listing
    call) without `token=` (an `authorization: Bearer <token>` header) or an allowed client certificate. The
    message says what the server accepts.
    """

    status = grpc.StatusCode.UNAUTHENTICATED


_CLASSES: dict[grpc.StatusCode, type[TensorgateClientError]] = {
    cls.status: cls
    for cls in (
        CallCancelledError,
        UnknownError,
        InvalidArgumentError,
        DeadlineExceededError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        ResourceExhaustedError,
        FailedPreconditionError,
        AbortedError,
        OutOfRangeError,
        UnimplementedError,
        InternalError,
        UnavailableError,
        DataLossError,
        UnauthenticatedError,
    )
}
# grpc.StatusCode members are (number, description) tuples; the number is what travels in FrameError.code.
_CODES_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def status_code_from_number(number: int) -> grpc.StatusCode:
    """The `grpc.StatusCode` with this wire number (UNKNOWN for a number outside the gRPC range)."""
    return _CODES_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def error_for_code(code: grpc.StatusCode, details: str) -> TensorgateClientError:
    """The exception for a status code and message: the code's subclass, or the root for OK."""
    return _CLASSES.get(code, TensorgateClientError)(code, details)


def from_rpc_error(error: grpc.RpcError) -> TensorgateClientError:
    """Convert a failed call's `grpc.RpcError` (sync) or `grpc.aio.AioRpcError` to its class in the tree.

    Raise the result `from error` to keep gRPC's debug string in the traceback.
    """
    # Every RpcError a call raises is also a grpc.Call (sync) or an AioRpcError, both of which have code() and
    # details(); a bare RpcError (only ever constructed by hand) has neither, so it reads as UNKNOWN.
    code_method = getattr(error, "code", None)
    details_method = getattr(error, "details", None)
    code = code_method() if callable(code_method) else grpc.StatusCode.UNKNOWN
    details = details_method() if callable(details_method) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return error_for_code(code, details if isinstance(details, str) else "")
